"""Attention sinks: a planted "local + sink" head and a planted distance-tracking head, built from synthetic
post-RoPE q/k fed straight to the statistics collector; the sink option's validation and outputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posheads.heads import (
    AttentionCall,
    HeadsConfig,
    PairStatsCollector,
    RowPlan,
    analyze,
    num_bins_for,
    sample_query_rows,
)

HEAD_DIM = 16
PAIRS = HEAD_DIM // 2
LENGTH = 256
INV_FREQ = 10000.0 ** (-torch.arange(PAIRS, dtype=torch.float64) / PAIRS)


def rotate(content: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE (rotate-half layout) of ``content [L, d]`` at ``positions [L]``."""
    angle = positions[:, None].double() * INV_FREQ[None, :]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = content[:, :PAIRS].double(), content[:, PAIRS:].double()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).float()


def constant(amplitudes: dict[int, float], scale: float) -> torch.Tensor:
    """Position-independent content with ``|q_i| |k_i| = scale^2 * amplitude`` on the given pairs (phase 0)."""
    v = torch.zeros(HEAD_DIM)
    for i, amp in amplitudes.items():
        v[i] = math.sqrt(amp) * scale
    return v.expand(LENGTH, HEAD_DIM)


def planted_heads() -> tuple[torch.Tensor, torch.Tensor]:
    """q~, k~ ``[1, 4, L, d]`` of four heads:

    0. distance tracker: constant content on pairs 3, 5, 7; with distance the dominant pair moves to lower
       frequencies (the construction of tests/test_heads_identify.py), no sink.
    1. local + sink: high-frequency pairs 0-1 aligned at distance 0 (local attention), noise elsewhere, and key
       0 carries a large component on the lowest-frequency pair 7 that the queries share: a sink whose
       dominant pair is 7 at the largest distance of every row.
    2. a moderate distance tracker (constant content on pairs 2 and 6): the bar the sink head has to clear.
    3. a head whose pair allocation runs the other way (constant content on pairs 1 and 3).
    """
    gen = torch.Generator().manual_seed(0)
    pos = torch.arange(LENGTH)
    tracker = constant({3: 1.0, 5: 0.9, 7: 0.8}, 2.0)
    q_sink = 0.5 * torch.randn(LENGTH, HEAD_DIM, generator=gen)
    k_sink = 0.5 * torch.randn(LENGTH, HEAD_DIM, generator=gen)
    for i, amp in ((0, 3.0), (1, 2.1)):
        q_sink[:, i] += amp
        k_sink[:, i] += amp
    q_sink[:, PAIRS - 1] += 4.0
    k_sink[0, PAIRS - 1] += 8.0
    moderate = constant({2: 1.0, 6: 0.5}, 2.0)
    reverse = constant({1: 1.0, 3: 0.6}, 2.0)
    q = torch.stack([rotate(x, pos) for x in (tracker, q_sink, moderate, reverse)])
    k = torch.stack([rotate(x, pos) for x in (tracker, k_sink, moderate, reverse)])
    return q.unsqueeze(0), k.unsqueeze(0)


def collect(q: torch.Tensor, k: torch.Tensor, sink_keys: int, keys_per_bin: int | None = None, seed: int = 0):
    col = PairStatsCollector(
        1, q.shape[1], HEAD_DIM, num_bins_for(LENGTH), keys_per_bin=keys_per_bin, sink_keys=sink_keys
    )
    col.plan = RowPlan(sample_query_rows(torch.ones(1, LENGTH, dtype=torch.bool), 64, seed), seed=seed)
    col(None, AttentionCall(0, q, k, None, HEAD_DIM**-0.5))
    return col


@pytest.mark.parametrize("keys_per_bin", [None, 8])
def test_local_sink_head_is_selected_only_with_sinks(keys_per_bin):
    """Top 2 of 4 heads: with sinks included the local + sink head is selected (its sink pairs correlate
    distance with pair 7); with ``sink_keys=1`` it falls below the moderate tracker; the true tracker is
    selected either way."""
    q, k = planted_heads()
    col = collect(q, k, sink_keys=1, keys_per_bin=keys_per_bin)
    cfg = HeadsConfig(top_fraction=0.5, sink_keys=1)
    a = analyze(col.stats, cfg, i_c=4, sink_stats=col.sink_stats)
    full = a.with_sinks()
    assert full.config.sink_keys == 0
    assert full.positional_heads() == [(0, 0), (0, 1)], full.scores
    assert a.positional_heads() == [(0, 0), (0, 2)], a.scores
    # the sink head's score is mostly sink: high with it, about nothing without it
    assert float(full.scores[0, 1]) > float(full.scores[0, 2]) + 0.1
    assert float(a.scores[0, 1]) < 0.15
    # the tracker has no sink: its score does not depend on the option
    assert float(a.scores[0, 0]) == pytest.approx(float(full.scores[0, 0]), abs=0.02)
    # the sink share: the sink head puts a large part of its attention on key 0, the others almost none
    assert float(a.sink_share[0, 1]) > 0.4 and float(a.sink_share[0, [0, 2, 3]].max()) < 0.05
    assert float(a.sink_share_se[0, 1]) < 0.05
    # the table carries both variants
    rows = {(r["layer"], r["head"]): r for r in a.table()}
    assert rows[(0, 1)]["positional_with_sinks"] and not rows[(0, 1)]["positional"]
    assert rows[(0, 1)]["score_with_sinks"] == pytest.approx(float(full.scores[0, 1]))
    assert rows[(0, 1)]["rank_with_sinks"] <= 2 < rows[(0, 1)]["rank"]
    sinks = a.summary()["sinks"]
    assert sinks["keys"] == 1 and sinks["with_sinks"]["shared_positional_heads"] == 1


def test_sink_keys_zero_keeps_every_key_and_equals_the_split_sums():
    """``sink_keys=0`` accumulates every key in ``stats``; ``sink_keys=2`` splits the same sums in two."""
    q, k = planted_heads()
    whole = collect(q, k, sink_keys=0)
    split = collect(q, k, sink_keys=2)
    assert whole.sink_stats is None and split.sink_stats is not None
    joined = split.stats + split.sink_stats
    for name in ("dom", "g", "pp", "p", "moments"):
        torch.testing.assert_close(getattr(joined, name), getattr(whole.stats, name), rtol=1e-5, atol=1e-4)
    # the pairs of keys 0 and 1 are gone from the split statistics (bin 0 of the row at position 0, 1)
    assert float(split.stats.rows) == float(whole.stats.rows) == float(joined.rows)
    mass_key01 = split.stats.sink_mass[..., :2].sum(-1)
    assert torch.allclose(split.sink_stats.mass(1).sum(-1), mass_key01, rtol=1e-4)


def test_sink_keys_validation_and_outputs(tmp_path):
    with pytest.raises(ValueError, match="heads.sink_keys=-1"):
        HeadsConfig(sink_keys=-1)
    with pytest.raises(ValueError, match="heads.sink_keys=True"):
        HeadsConfig(sink_keys=True)
    with pytest.raises(ValueError, match="heads.sink_keys=8 leaves no key of a 8-token"):
        HeadsConfig(sink_keys=8).validate_for(2, 4, 16, length=8)
    from posheads.eval.config import IdentifySettings

    assert IdentifySettings(analysis={"sink_keys": 0}).analysis.sink_keys == 0
    with pytest.raises(ValueError, match="heads.sink_keys='one'"):
        IdentifySettings(analysis={"sink_keys": "one"})
    q, k = planted_heads()
    col = collect(q, k, sink_keys=1)
    a = analyze(col.stats, HeadsConfig(top_fraction=0.5), i_c=4, sink_stats=col.sink_stats)
    paths = a.save(tmp_path)
    assert paths["sink_heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = paths["csv"].read_text().splitlines()[0].split(",")
    assert {"sink_share", "sink_share_se", "score_with_sinks", "positional_with_sinks"} <= set(header)
    payload = json.loads(paths["json"].read_text())
    assert payload["sink_keys"] == 1 and payload["sinks"]["share_median"] is not None
    assert payload["sinks"]["with_sinks"]["positional_heads"] == [[0, 0], [0, 1]]
    saved = torch.load(paths["stats"])
    assert "sink_stats" in saved
