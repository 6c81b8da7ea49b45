"""Positional-Head analysis (Hong et al., arXiv 2410.08703): q/k capture, per-pair statistics, scores, HDA,
ablation and identification. Pure torch + transformers (no Lightning, no W&B).

Importing this package registers the ``posheads+<impl>`` attention and mask functions with Transformers
(:mod:`posheads.heads.capture`), so spawned DDP workers that import it see them too.
"""

from posheads.heads.ablation import (
    ABLATION_MODES,
    DIMENSION_SIDES,
    ablate,
    ablate_dimensions,
    ablate_heads,
    head_mask,
    head_means,
)
from posheads.heads.capture import (
    AttentionCall,
    QKRecorder,
    attention_hooks,
    attention_modules,
    capture_qk,
    pair_contributions,
)
from posheads.heads.config import HeadsConfig
from posheads.heads.hda import (
    critical_pair_for,
    hda_area,
    hda_curves,
    hda_extension,
    resolve_critical_pair,
    set_average,
)
from posheads.heads.identify import HeadAnalysis, analyze, collector_for_config, identify_positional_heads
from posheads.heads.scores import (
    DEFAULT_SCORE,
    SCORE_VARIANTS,
    head_set,
    jaccard,
    per_layer_counts,
    per_pair_correlations,
    positional_scores,
    select_heads,
    zscores,
)
from posheads.heads.stats import (
    PairStats,
    PairStatsCollector,
    RowPlan,
    all_reduce,
    bin_edges,
    collector_for_model,
    distance_bin,
    num_bins_for,
    sample_query_rows,
)

__all__ = [
    "ABLATION_MODES",
    "DEFAULT_SCORE",
    "DIMENSION_SIDES",
    "SCORE_VARIANTS",
    "AttentionCall",
    "HeadAnalysis",
    "HeadsConfig",
    "PairStats",
    "PairStatsCollector",
    "QKRecorder",
    "RowPlan",
    "ablate",
    "ablate_dimensions",
    "ablate_heads",
    "all_reduce",
    "analyze",
    "attention_hooks",
    "attention_modules",
    "bin_edges",
    "capture_qk",
    "collector_for_config",
    "collector_for_model",
    "critical_pair_for",
    "distance_bin",
    "hda_area",
    "hda_curves",
    "hda_extension",
    "head_mask",
    "head_means",
    "head_set",
    "identify_positional_heads",
    "jaccard",
    "num_bins_for",
    "pair_contributions",
    "per_layer_counts",
    "per_pair_correlations",
    "positional_scores",
    "resolve_critical_pair",
    "sample_query_rows",
    "select_heads",
    "set_average",
    "zscores",
]
