"""The sampled-key estimator against the exact all-keys statistics, over many heads and many draws.

``keys_per_bin=C`` replaces the sums over every key of a sampled row by Horvitz-Thompson estimates. For every
quantity below -- the linear sums (pair counts, attention mass and per-pair contributions per bin) and what the
analysis reads from them (attention shares per bin, the score variants, HDA) -- the mean of ``R`` independent
draws must lie within 4 standard errors of the exact value, the standard error estimated from the draws'
spread (``sd / sqrt(R)``), plus a float32 rounding allowance. An unbiased estimator passes; the last check shows
that a 3 % bias in the attention shares is far outside the band.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import (
    AttentionCall,
    PairStats,
    PairStatsCollector,
    RowPlan,
    capture_qk,
    hda_curves,
    num_bins_for,
    positional_scores,
    sample_query_rows,
)

LENGTH = 384
LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 4, 16
DRAWS = 64
I_C = 4


def quantities(stats: PairStats) -> dict[str, torch.Tensor]:
    mass = stats.mass(1)
    return {
        "pair count per bin": stats.mass(0),
        "attention mass per bin": mass,
        "attention share per bin": mass / mass.sum(-1, keepdim=True),
        "weighted g per bin and pair": stats.g[1],
        "score pearson_weighted": positional_scores(stats, "pearson_weighted"),
        "score pearson": positional_scores(stats, "pearson"),
        "score soft_pearson_weighted": positional_scores(stats, "soft_pearson_weighted"),
        "score spearman_weighted": positional_scores(stats, "spearman_weighted"),
        "score per_pair_weighted": positional_scores(stats, "per_pair_weighted", i_c=I_C),
        "HDA hard": hda_curves(stats, I_C, "hard"),
        "HDA soft": hda_curves(stats, I_C, "soft"),
    }


@pytest.fixture(scope="module")
def draws() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Exact statistics and ``DRAWS`` sampled-key estimates (``C = 8``, one seed each) of the same 48 rows of a
    tiny GQA Llama's 16 heads (layer q/k captured once, the collector run on them directly)."""
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=128,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, LENGTH), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_qk(model) as rec:
        model(ids)
    calls = [
        AttentionCall(i, rec.queries[i], rec.keys[i], None, rec.scalings[i]) for i in sorted(rec.queries)
    ]
    rows = sample_query_rows(torch.ones(1, LENGTH, dtype=torch.bool), 48, 0)

    def run(keys_per_bin: int | None, seed: int) -> PairStats:
        col = PairStatsCollector(
            LAYERS, HEADS, HEAD_DIM, num_bins_for(LENGTH), keys_per_bin=keys_per_bin, sink_keys=1
        )
        col.plan = RowPlan(rows, seed)
        for call in calls:
            col(None, call)
        return col.stats

    exact = quantities(run(None, 0))
    return exact, [quantities(run(8, seed)) for seed in range(DRAWS)]


def band(exact: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(|mean - exact|, allowed = 4 SE + rounding, finite mask)``."""
    mean, se = sample.mean(0), sample.std(0) / math.sqrt(sample.shape[0])
    finite = torch.isfinite(exact) & torch.isfinite(mean)
    rounding = 1e-5 * float(exact[finite].abs().max())
    return (mean - exact).abs(), 4 * se + rounding, finite


def test_sampled_keys_are_unbiased_within_four_standard_errors(draws):
    exact, sampled = draws
    for name, value in exact.items():
        sample = torch.stack([d[name] for d in sampled])
        dev, allowed, finite = band(value, sample)
        assert finite.float().mean() > 0.9, name  # the check covers (almost) every element
        bad = (dev > allowed) & finite
        assert not bool(bad.any()), (name, int(bad.sum()), float((dev / allowed)[finite].max()))


def test_the_band_rejects_a_small_bias(draws):
    exact, sampled = draws
    name = "attention share per bin"
    sample = torch.stack([d[name] for d in sampled]) * 1.03
    dev, allowed, finite = band(exact[name], sample)
    assert bool(((dev > allowed) & finite).any())
