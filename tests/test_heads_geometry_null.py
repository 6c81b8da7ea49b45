"""The RoPE-geometry null: a null that can fail. For a head whose q/k content does not depend on position the
score is pure RoPE geometry, and the geometry null reproduces it (the permuted-position null, 0 by
construction, cannot); a head whose key content is tied to a position (a sink) scores above it."""

from __future__ import annotations

import pytest
import torch

from posheads.heads import (
    AttentionCall,
    HeadsConfig,
    PairStatsCollector,
    RowPlan,
    analyze,
    identify_positional_heads,
    num_bins_for,
    sample_query_rows,
)
from test_heads_identify import PLANTED, planted_model
from test_heads_sinks import HEAD_DIM, INV_FREQ, LENGTH, planted_heads


def geometry_analysis(sink_keys: int):
    q, k = planted_heads()
    col = PairStatsCollector(
        1,
        4,
        HEAD_DIM,
        num_bins_for(LENGTH),
        keys_per_bin=None,
        sink_keys=sink_keys,
        geometry_null=True,
        rope_inv_freq=INV_FREQ,
    )
    col.plan = RowPlan(sample_query_rows(torch.ones(1, LENGTH, dtype=torch.bool), 64, 0), seed=0)
    col(None, AttentionCall(0, q, k, None, HEAD_DIM**-0.5))
    cfg = HeadsConfig(top_fraction=0.5, sink_keys=sink_keys)
    return analyze(col.stats, cfg, 4, sink_stats=col.sink_stats, geometry_stats=col.geometry_stats)


def test_geometry_null_reproduces_pure_geometry_and_not_a_sink():
    """Heads 0, 2, 3 have position-independent content: their geometry null equals their score (0.61, 0.24,
    -0.17), while the permuted-position null is about 0 for all of them. Head 1's score with every key comes
    from its sink (content at position 0): shuffling the key content over positions removes it."""
    a = geometry_analysis(sink_keys=0)
    assert a.null_geometry is not None
    for h in (0, 2, 3):
        assert float(a.null_geometry[0, h]) == pytest.approx(float(a.scores[0, h]), abs=1e-3)
        assert abs(float(a.null[0, h])) < 0.05
    assert float(a.scores[0, 0]) > 0.5 and abs(float(a.scores[0, 3])) > 0.1  # far from 0 either way
    assert float(a.scores[0, 1]) - float(a.null_geometry[0, 1]) > 0.25
    rows = {(r["layer"], r["head"]): r for r in a.table()}
    assert rows[(0, 0)]["excess_geometry"] == pytest.approx(0.0, abs=1e-3)
    assert rows[(0, 1)]["excess_geometry"] > 0.25
    summary = a.summary()["null_geometry"]
    assert summary["positional_count"] == 2 and summary["positional_above"] >= 1


def test_geometry_null_keeps_the_sink_keys_in_place():
    """With ``sink_keys=1`` the sink key keeps its content and position (its attention share is unchanged
    under the null); the constant-content heads still match their score exactly."""
    a = geometry_analysis(sink_keys=1)
    assert a.geometry_stats is not None
    share_null, _ = a.geometry_stats.sink_share()
    assert float(share_null[0, 1]) == pytest.approx(float(a.sink_share[0, 1]), abs=0.05)
    for h in (0, 2, 3):
        assert float(a.null_geometry[0, h]) == pytest.approx(float(a.scores[0, h]), abs=1e-3)


def test_geometry_null_on_a_model_uses_its_own_frequencies():
    """Through the model: the planted head's keys (and its GQA group's) are position-independent, so the
    shuffled-and-re-rotated keys equal the real ones only if the un-/re-rotation uses the model's pairing and
    frequencies; random heads differ from their null."""
    model = planted_model()
    sequences = torch.randint(0, 97, (2, 128), generator=torch.Generator().manual_seed(0))
    cfg = HeadsConfig(rows_per_sequence=32, keys_per_bin=None, seed=1)
    a = identify_positional_heads(model, sequences, cfg, progress=False)
    assert a.null_geometry is not None and torch.isfinite(a.null_geometry).all()
    layer, head = PLANTED
    for h in (head - 1, head):  # heads 0 and 1 share key head 0 (GQA), whose key is the planted bias
        assert float(a.null_geometry[layer, h]) == pytest.approx(float(a.scores[layer, h]), abs=1e-3)
    other = (a.null_geometry - a.scores)[0].abs()  # layer 0: random content, position-dependent via tokens
    assert float(other.max()) > 0.02
    off = identify_positional_heads(
        model, sequences, HeadsConfig(rows_per_sequence=8, geometry_null=False), progress=False
    )
    assert off.null_geometry is None and off.table()[0]["null_geometry"] is None
    with pytest.raises(ValueError, match="heads.geometry_null='yes'"):
        HeadsConfig(geometry_null="yes")  # type: ignore[arg-type]
