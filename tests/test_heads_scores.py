"""Scores, null, z-scores, selection, Jaccard and HDA against direct computations on every (query, key) pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import (
    RowPlan,
    attention_hooks,
    capture_qk,
    collector_for_model,
    distance_bin,
    hda_area,
    hda_curves,
    hda_extension,
    jaccard,
    num_bins_for,
    pair_contributions,
    per_layer_counts,
    per_pair_correlations,
    positional_scores,
    resolve_critical_pair,
    select_heads,
    set_average,
    zscores,
)
from posheads.heads.scores import SCORE_VARIANTS

LENGTH = 48


@pytest.fixture(scope="module")
def run():
    """A tiny GQA model, exact statistics of 6 rows, and every (row, key) pair of every head."""
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        attn_implementation="sdpa",
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (1, LENGTH))
    rows = torch.tensor([[5, 13, 22, 31, 40, 47]])
    col = collector_for_model(model, num_bins_for(LENGTH), keys_per_bin=None)
    plan = RowPlan(rows=rows, seed=7)
    col.plan = plan
    with torch.no_grad(), capture_qk(model) as rec, attention_hooks(model, col):
        model(ids)
    pairs: dict[tuple[int, int], dict[str, list]] = {}
    for layer in rec.queries:
        q, k = rec.queries[layer].double(), rec.keys[layer].double().repeat_interleave(2, dim=1)
        for m in rows[0].tolist():
            n = torch.arange(m + 1)
            a = torch.softmax(torch.einsum("hd,hnd->hn", q[0, :, m], k[0][:, n]) * rec.scalings[layer], -1)
            g = pair_contributions(q[0, :, m].unsqueeze(1), k[0][:, n])  # [H, n, P]
            p = torch.softmax(g, -1)
            for h in range(4):
                d = pairs.setdefault((layer, h), {k_: [] for k_ in ("delta", "null", "D", "S", "p", "a")})
                d["delta"].append(m - n)
                d["null"].append(plan.null_map(layer)[(0, m)][m - n])
                d["D"].append(g[h].argmax(-1))
                d["S"].append((p[h] * torch.arange(8)).sum(-1))
                d["p"].append(p[h])
                d["a"].append(a[h])
    flat = {key: {k_: torch.cat(v).double() for k_, v in d.items()} for key, d in pairs.items()}
    return col.stats, flat


def wcorr(x, y, w):
    x, y, w = (np.asarray(t, dtype=np.float64) for t in (x, y, w))
    mx, my = np.average(x, weights=w), np.average(y, weights=w)
    cov = np.average((x - mx) * (y - my), weights=w)
    return cov / np.sqrt(np.average((x - mx) ** 2, weights=w) * np.average((y - my) ** 2, weights=w))


def wspearman_binned(bins, dom, w):
    """Weighted Spearman with distance ranks at bin level (ties within a bin), weighted mid-ranks."""

    def midranks(values):
        ranks = np.empty_like(values, dtype=np.float64)
        order = np.unique(values)
        cum = 0.0
        for v in order:
            sel = values == v
            total = w[sel].sum()
            ranks[sel] = cum + total / 2
            cum += total
        return ranks

    bins, dom, w = np.asarray(bins), np.asarray(dom), np.asarray(w, dtype=np.float64)
    return wcorr(midranks(bins), midranks(dom), w)


@pytest.mark.parametrize("null", [False, True])
def test_scores_equal_direct_correlations(run, null):
    stats, pairs = run
    nb = stats.num_bins
    for (layer, head), d in pairs.items():
        dist = d["null"] if null else d["delta"]
        x = torch.log1p(dist)
        ones = torch.ones_like(x)
        got = {v: float(positional_scores(stats, v, null=null, i_c=3)[layer, head]) for v in SCORE_VARIANTS}
        assert got["pearson_weighted"] == pytest.approx(wcorr(x, d["D"], d["a"]), abs=1e-5)
        assert got["pearson"] == pytest.approx(wcorr(x, d["D"], ones), abs=1e-5)
        # the soft pair's moments come from float32 per-pair sums (see the per-pair check below)
        assert got["soft_pearson_weighted"] == pytest.approx(wcorr(x, d["S"], d["a"]), abs=1e-4)
        bins = distance_bin(dist.long(), nb)
        assert got["spearman_weighted"] == pytest.approx(wspearman_binned(bins, d["D"], d["a"]), abs=1e-5)
        # unweighted Spearman with bin ties is scipy's tie-corrected Spearman
        assert got["spearman"] == pytest.approx(sps.spearmanr(bins.numpy(), d["D"].numpy())[0], abs=1e-5)
        r = [wcorr(dist, d["p"][:, i], d["a"]) for i in range(8)]
        direct = per_pair_correlations(stats, weighted=True, distance="linear", null=null)[layer, head]
        # float32 sums within a chunk: per-pair covariances of near-constant shares agree to ~1e-4
        np.testing.assert_allclose(direct.numpy(), r, atol=1e-4)
        assert got["per_pair_weighted"] == pytest.approx(np.mean(r[3:]) - np.mean(r[:3]), abs=1e-4)
        r_log = [wcorr(x, d["p"][:, i], ones) for i in range(8)]
        got_log = per_pair_correlations(stats, weighted=False, distance="log", null=null)[layer, head]
        np.testing.assert_allclose(got_log.numpy(), r_log, atol=1e-4)


def test_hda_equals_direct_shares(run):
    stats, pairs = run
    i_c = 3
    hard = hda_curves(stats, i_c, "hard")
    soft = hda_curves(stats, i_c, "soft")
    for (layer, head), d in pairs.items():
        bins = distance_bin(d["delta"].long(), stats.num_bins)
        for b in range(stats.num_bins):
            sel = bins == b
            if not bool(sel.any()):
                assert torch.isnan(hard[layer, head, b])
                continue
            a = d["a"][sel]
            assert float(hard[layer, head, b]) == pytest.approx(
                float((a * (d["D"][sel] >= i_c)).sum() / a.sum()), abs=1e-5
            )
            high = d["p"][sel][:, i_c:].sum(-1)
            assert float(soft[layer, head, b]) == pytest.approx(float((a * high).sum() / a.sum()), abs=1e-5)


def test_hda_extension_area_and_set_average():
    curves = torch.tensor(
        [[[0.9, 0.8, 0.6, 0.4, 0.55, float("nan")], [0.1, 0.2, 0.3, 0.2, 0.1, 0.0]]], dtype=torch.float64
    )
    ext, dist = hda_extension(curves, 0.5)
    assert ext.tolist() == [[4, -1]]
    assert dist.tolist() == [[15, -1]]  # bin 4 holds distances 8..15
    area, mean = hda_area(curves)
    assert area[0, 0].item() == pytest.approx(0.8 + 0.6 + 0.4 + 0.55)
    assert mean[0, 0].item() == pytest.approx((0.8 + 0.6 + 0.4 + 0.55) / 4)
    mask = torch.tensor([[True, False]])
    torch.testing.assert_close(set_average(curves, mask), curves[0, 0], equal_nan=True)
    assert torch.isnan(set_average(curves, torch.zeros_like(mask))).all()
    with pytest.raises(ValueError, match="tau=1.5"):
        hda_extension(curves, 1.5)


def test_zscores_selection_counts_jaccard():
    scores = torch.tensor([[0.1, 0.5, 0.2], [0.9, float("nan"), 0.3]], dtype=torch.float64)
    null = torch.full_like(scores, 0.1)
    z = zscores(scores, null)
    excess = (scores - null)[torch.isfinite(scores)]
    assert float(z[1, 0]) == pytest.approx(float((0.8 - excess.mean()) / excess.std()))
    assert torch.isnan(z[1, 1])
    top = select_heads(scores - null, z, top_fraction=0.34)  # ceil(0.34 * 6) = 3 heads
    assert top.tolist() == [[False, True, False], [True, False, True]]
    thr = select_heads(scores - null, z, top_fraction=None, z_threshold=0.5)
    assert thr.sum() == int((torch.nan_to_num(z, nan=-9) >= 0.5).sum())
    both = select_heads(scores - null, z, top_fraction=0.34, z_threshold=0.5, combine="and")
    assert bool((both <= top).all()) and bool((both <= thr).all())
    assert per_layer_counts(top) == [1, 2]
    assert per_layer_counts([(0, 1), (1, 0), (1, 2)], num_layers=3) == [1, 2, 0]
    assert jaccard(top, [(0, 1), (1, 0)]) == pytest.approx(2 / 3)
    assert jaccard([], []) == 1.0
    with pytest.raises(ValueError, match="top_fraction=0"):
        select_heads(scores, top_fraction=0)
    with pytest.raises(ValueError, match="score='nope'"):
        positional_scores(run_stats_placeholder(), "nope")


def run_stats_placeholder():
    from posheads.heads import PairStats

    return PairStats.zeros(1, 1, 2, 4)


def test_critical_pair_rules():
    # SmolLM2: d = 64, theta = 1e5, L0 = 8192: 2 pi 1e5^(2i/64) > 8192 first at i = 20
    assert resolve_critical_pair("critical", 64, 1e5, 8192) == 20
    assert resolve_critical_pair("quarter", 64, 1e5, 8192) == 16
    assert resolve_critical_pair(7, 64, 1e5, 8192) == 7
    with pytest.raises(ValueError, match="critical='half'"):
        resolve_critical_pair("half", 64, 1e5, 8192)
    with pytest.raises(ValueError, match="critical=40"):
        resolve_critical_pair(40, 64, 1e5, 8192)
