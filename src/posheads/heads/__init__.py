"""Positional-Head analysis: q/k capture, per-pair statistics, scores, HDA and ablation."""

from posheads.heads.capture import attention_hooks, attention_modules, capture_qk, pair_contributions
from posheads.heads.stats import PairStats, PairStatsCollector, RowPlan, all_reduce, sample_query_rows
