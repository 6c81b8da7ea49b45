"""Document bootstrap, Wilson intervals and grouped permutation tests against closed forms, scipy and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from posheads.eval.intervals import (
    bootstrap_indices,
    bootstrap_nll,
    correlation,
    grouped_permutation_test,
    percentile_interval,
    wilson_interval,
    within_group_correlations,
)

# ---------------------------------------------------------------------------------------------------------
# bootstrap over documents
# ---------------------------------------------------------------------------------------------------------


def test_point_estimate_is_token_weighted_not_mean_of_document_means():
    tokens = [10, 1]
    sums = {"a": [20.0, 1.0]}  # 2.0 and 1.0 nat/token
    out = bootstrap_nll(sums, tokens, n_boot=10)
    assert out["conditions"]["a"]["nll"] == pytest.approx(21.0 / 11.0)  # a mean of ratios would be 1.5
    assert out["conditions"]["a"]["ppl"] == pytest.approx(math.exp(21.0 / 11.0))


def test_bootstrap_variance_matches_closed_form():
    # Equal tokens: the resampled mean of D iid draws from the empirical distribution has variance
    # sigma^2 / D with sigma^2 the population (ddof=0) variance of the per-document NLLs.
    rng = np.random.default_rng(1)
    per_doc = rng.normal(2.0, 0.5, size=12)
    tokens = np.full(12, 100.0)
    idx = bootstrap_indices(12, 40000, seed=3)
    boot = (per_doc * 100.0)[idx].sum(1) / tokens[idx].sum(1)
    assert boot.var() == pytest.approx(per_doc.var() / 12, rel=0.03)
    # and the interval of the public function is close to the normal one for this many resamples
    out = bootstrap_nll({"a": per_doc * 100.0}, tokens, n_boot=40000, seed=3)
    lo, hi = out["conditions"]["a"]["lo"], out["conditions"]["a"]["hi"]
    sd = math.sqrt(per_doc.var() / 12)
    assert hi - lo == pytest.approx(2 * 1.96 * sd, rel=0.08)


def test_bootstrap_distribution_matches_brute_force_enumeration():
    # 3 documents: the 27 equally likely resamples define the exact bootstrap distribution.
    sums = np.array([30.0, 5.0, 12.0])
    toks = np.array([10.0, 5.0, 4.0])
    exact = [sums[list(r)].sum() / toks[list(r)].sum() for r in itertools.product(range(3), repeat=3)]
    idx = bootstrap_indices(3, 60000, seed=0)
    boot = sums[idx].sum(1) / toks[idx].sum(1)
    assert boot.mean() == pytest.approx(np.mean(exact), rel=5e-3)
    assert boot.std() == pytest.approx(np.std(exact), rel=2e-2)


def test_contrast_is_paired_on_the_same_resample():
    # Documents differ a lot, but condition b is a + exactly 0.1 nat per token on every document: a paired
    # bootstrap gives the difference a zero-width interval; independent resampling would give a wide one.
    rng = np.random.default_rng(0)
    toks = rng.integers(200, 2000, size=10).astype(float)
    per_tok = rng.uniform(1.0, 3.0, size=10)
    a = per_tok * toks
    b = (per_tok + 0.1) * toks
    out = bootstrap_nll({"a": a, "b": b}, toks, {"b-a": {"b": 1, "a": -1}}, n_boot=500, seed=1)
    k = out["contrasts"]["b-a"]
    assert k["value"] == pytest.approx(0.1)
    assert k["lo"] == pytest.approx(0.1, abs=1e-12) and k["hi"] == pytest.approx(0.1, abs=1e-12)
    ca = out["conditions"]["a"]
    assert ca["hi"] - ca["lo"] > 0.2  # the conditions themselves are uncertain


def test_pooled_contrast_and_percentile_commutes_with_exp():
    toks = np.array([100.0, 200.0, 300.0, 150.0])
    sums = {
        "pos": np.array([300.0, 500.0, 800.0, 400.0]),
        "r0": np.array([250.0, 480.0, 700.0, 350.0]),
        "r1": np.array([260.0, 470.0, 720.0, 330.0]),
    }
    w = {"pos": 1.0, "r0": -0.5, "r1": -0.5}
    out = bootstrap_nll(sums, toks, {"pos-random": w}, n_boot=300, seed=5)
    nll = {c: sums[c].sum() / toks.sum() for c in sums}
    assert out["contrasts"]["pos-random"]["value"] == pytest.approx(nll["pos"] - (nll["r0"] + nll["r1"]) / 2)
    c = out["conditions"]["pos"]
    assert c["ppl_lo"] == pytest.approx(math.exp(c["lo"])) and c["ppl_hi"] == pytest.approx(math.exp(c["hi"]))
    assert c["lo"] <= c["nll"] <= c["hi"]


def test_bootstrap_is_seeded_and_validates():
    args = ({"a": [3.0, 4.0, 8.0, 1.0, 7.5, 2.2, 9.1]}, [2, 2, 3, 1, 4, 2, 5])
    assert bootstrap_nll(*args, seed=4, n_boot=50) == bootstrap_nll(*args, seed=4, n_boot=50)
    a = bootstrap_nll(*args, seed=4, n_boot=50)["conditions"]["a"]
    b = bootstrap_nll(*args, seed=5, n_boot=50)["conditions"]["a"]
    assert (a["lo"], a["hi"]) != (b["lo"], b["hi"])
    with pytest.raises(ValueError, match="common length"):
        bootstrap_nll({"a": [1.0, 2.0], "b": [1.0]}, [1, 1])
    with pytest.raises(ValueError, match="no NLL sums"):
        bootstrap_nll({"a": [1.0]}, [1], {"x": {"b": 1}})
    one = bootstrap_nll({"a": [5.0]}, [2], n_boot=20)["conditions"]["a"]
    assert one["lo"] == one["hi"] == one["nll"] == 2.5


def test_percentile_interval():
    lo, hi = percentile_interval(np.arange(1001, dtype=float), 0.9)
    assert (lo, hi) == pytest.approx((50.0, 950.0))


# ---------------------------------------------------------------------------------------------------------
# Wilson
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,n,level", [(0, 10, 0.95), (3, 10, 0.95), (10, 10, 0.95), (17, 40, 0.9), (1, 3, 0.99)]
)
def test_wilson_matches_scipy(k, n, level):
    ref = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    assert wilson_interval(k, n, level) == pytest.approx((ref.low, ref.high), abs=1e-9)


def test_wilson_closed_form_at_zero_and_empty():
    z = stats.norm.ppf(0.975)
    assert wilson_interval(0, 20)[1] == pytest.approx(z * z / (20 + z * z))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


# ---------------------------------------------------------------------------------------------------------
# grouped permutation tests
# ---------------------------------------------------------------------------------------------------------


def _separated_but_uncorrelated_within():
    # Within each method Spearman rho = 0 exactly (sum d^2 = 20 for n = 5); the methods sit far apart in
    # both x and y, so the pooled rho is strongly negative.
    x0 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    y0 = np.array([2.0, 5.0, 3.0, 1.0, 4.0])
    x = np.concatenate([x0, x0 + 10])
    y = np.concatenate([y0 + 10, y0])
    groups = ["yarn"] * 5 + ["pi"] * 5
    return x, y, groups


def test_method_separation_alone_is_not_significant():
    x, y, groups = _separated_but_uncorrelated_within()
    naive = stats.spearmanr(x, y)
    assert naive.statistic < -0.5 and naive.pvalue < 0.05  # what an ungrouped test would report
    within = within_group_correlations(x, y, groups)
    assert within == {
        "yarn": {"rho": pytest.approx(0.0, abs=1e-12), "n": 5},
        "pi": {"rho": pytest.approx(0.0, abs=1e-12), "n": 5},
    }
    for stat in ("stratified", "pooled"):
        res = grouped_permutation_test(x, y, groups, mode="within", within_statistic=stat)
        assert res["exact"] is True and res["n_permutations"] == 120 * 120
        assert res["pooled"] == pytest.approx(naive.statistic)
        assert res["p_value"] > 0.5, stat
    assert res["statistic"] == pytest.approx(naive.statistic)
    lab = grouped_permutation_test(x, y, groups, mode="labels")
    assert lab["n"] == 10 and lab["n_groups"] == 2 and lab["p_value"] == 1.0  # 2 groups: nothing to test


def test_within_association_is_detected():
    rng = np.random.default_rng(0)
    x = np.concatenate([np.arange(7.0), np.arange(7.0) + 20])
    y = np.concatenate(
        [np.arange(7.0) * 2 + rng.normal(0, 0.1, 7), np.arange(7.0) - 30 + rng.normal(0, 0.1, 7)]
    )
    groups = ["a"] * 7 + ["b"] * 7
    # Within each group y rises with x, while the separation of the groups runs the other way: the pooled
    # rho is negative and the stratified statistic still finds the (positive) within-group association.
    res = grouped_permutation_test(x, y, groups, mode="within", n_perm=4000, max_exact=0)
    assert res["exact"] is False and res["p_value"] < 0.01
    assert res["statistic"] > 0.9 and res["pooled"] < 0
    pooled = grouped_permutation_test(x, y, groups, within_statistic="pooled", n_perm=2000, max_exact=0)
    assert pooled["p_value"] > 0.5  # the pooled statistic hides it: why stratified is the default


def test_exact_within_permutation_p_matches_brute_force():
    x = np.array([0.3, 1.2, 2.0, 5.0, 5.5, 7.1, 6.0])
    y = np.array([1.0, 0.5, 2.5, 3.0, 2.0, 4.5, 4.0])
    groups = ["a", "a", "a", "b", "b", "b", "b"]
    obs = stats.spearmanr(x, y).statistic
    hits = total = 0
    for perm in itertools.permutations(range(7)):  # every permutation; keep those that respect the groups
        if any(groups[p] != groups[i] for i, p in enumerate(perm)):
            continue
        total += 1
        hits += abs(stats.spearmanr(x, y[list(perm)]).statistic) >= abs(obs) - 1e-12
    res = grouped_permutation_test(x, y, groups, mode="within", within_statistic="pooled")
    assert res["n_permutations"] == total == 6 * 24
    assert res["p_value"] == pytest.approx(hits / total)
    mc = grouped_permutation_test(
        x, y, groups, mode="within", within_statistic="pooled", max_exact=0, n_perm=6000, seed=2
    )
    assert mc["p_value"] == pytest.approx(hits / total, abs=0.03)
    # stratified: Pearson of within-group centred ranks, brute force with scipy ranks
    rx = np.concatenate([stats.rankdata(x[:3]) - 2, stats.rankdata(x[3:]) - 2.5])
    ry = np.concatenate([stats.rankdata(y[:3]) - 2, stats.rankdata(y[3:]) - 2.5])
    obs_s = stats.pearsonr(rx, ry).statistic
    hits_s = sum(
        abs(stats.pearsonr(rx, ry[list(a) + [3 + i for i in b]]).statistic) >= abs(obs_s) - 1e-12
        for a in itertools.permutations(range(3))
        for b in itertools.permutations(range(4))
    )
    strat = grouped_permutation_test(x, y, groups, mode="within")
    assert strat["statistic"] == pytest.approx(obs_s)
    assert strat["p_value"] == pytest.approx(hits_s / 144)


def test_labels_mode_brute_force():
    x = np.array([1.0, 1.2, 3.0, 3.1, 5.0, 5.3, 7.0, 7.2])
    y = np.array([9.0, 8.0, 6.0, 7.0, 4.0, 5.0, 1.0, 2.0])
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    xm = np.array([1.1, 3.05, 5.15, 7.1])
    ym = np.array([8.5, 6.5, 4.5, 1.5])
    obs = stats.pearsonr(xm, ym).statistic
    perms = list(itertools.permutations(range(4)))
    hits = sum(abs(stats.pearsonr(xm, ym[list(p)]).statistic) >= abs(obs) - 1e-12 for p in perms)
    res = grouped_permutation_test(x, y, groups, mode="labels", method="pearson")
    assert res["statistic"] == pytest.approx(obs)
    assert res["p_value"] == pytest.approx(hits / 24) == pytest.approx(2 / 24)


def test_correlation_matches_scipy_with_ties():
    x = [1.0, 2.0, 2.0, 3.0, 7.0, 7.0, 1.5]
    y = [3.0, 1.0, 4.0, 4.0, 5.0, 9.0, 2.0]
    assert correlation(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)
    assert correlation(x, y, "pearson") == pytest.approx(stats.pearsonr(x, y).statistic)
    assert math.isnan(correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
