"""Uncertainty of evaluation numbers: bootstrap over documents, Wilson intervals, grouped permutation tests.

Pure math on numpy arrays (no torch, no Lightning, no W&B).

* :func:`bootstrap_nll` -- the **document bootstrap** of token-weighted NLLs. A sample of ``D`` documents
  is resampled with replacement ``n_boot`` times (seeded); on every resample the token-weighted NLL of every
  condition is recomputed (``sum of the resampled documents' NLL sums / sum of their scored tokens``), and so
  is every requested *contrast* (a linear combination of conditions, e.g. ``positional - none`` or
  ``positional - mean(random@0..4)``) **on the same resample** -- the conditions were scored on the same
  documents, so the contrast's interval is a paired one. Percentile intervals; the perplexity interval is the
  exponential of the NLL interval (percentiles commute with monotone maps).
* :func:`wilson_interval` -- the Wilson score interval of a binomial proportion (retrieval accuracy).
* :func:`grouped_permutation_test` -- a permutation test of a correlation that keeps a grouping (the
  scaling method of a fine-tuning run): ``mode="within"`` permutes the outcome only *within* groups (the
  null: no association beyond what the groups' separation produces), ``mode="labels"`` correlates the group
  means and permutes which group mean of ``y`` goes with which group mean of ``x``. Exact (every
  permutation) when there are few, Monte Carlo otherwise.
* :func:`within_group_correlations` -- the correlation inside every group, with its ``n``.

Definitions: ``docs/definitions.md`` ("Intervals").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_BOOT",
    "DEFAULT_LEVEL",
    "bootstrap_indices",
    "bootstrap_nll",
    "correlation",
    "grouped_permutation_test",
    "percentile_interval",
    "wilson_interval",
    "within_group_correlations",
]

DEFAULT_BOOT = 2000
DEFAULT_LEVEL = 0.95


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1)")


def bootstrap_indices(n_docs: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, n_docs]`` document indices drawn with replacement (seeded; the same for every condition)."""
    if n_docs < 1:
        raise ValueError(f"n_docs={n_docs} must be >= 1")
    if n_boot < 1:
        raise ValueError(f"n_boot={n_boot} must be >= 1")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_docs, size=(n_boot, n_docs))


def percentile_interval(
    samples: Sequence[float] | np.ndarray, level: float = DEFAULT_LEVEL
) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap ``samples``."""
    _check_level(level)
    arr = np.asarray(samples, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("percentile_interval of no samples")
    lo, hi = np.quantile(arr, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_nll(
    nll_sums: Mapping[str, Sequence[float] | np.ndarray],
    tokens: Sequence[float] | np.ndarray | Mapping[str, Sequence[float] | np.ndarray],
    contrasts: Mapping[str, Mapping[str, float]] | None = None,
    *,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """Paired document bootstrap of token-weighted NLLs and of linear contrasts between conditions.

    Args:
        nll_sums: ``{condition: [D] summed NLL of each document's scored tokens}``, documents in the same
            order for every condition.
        tokens: ``[D]`` scored tokens per document (the same for every condition), or one ``[D]`` per
            condition.
        contrasts: ``{name: {condition: weight}}``, e.g. ``{"positional-none": {"positional": 1, "none": -1}}``;
            the contrast is ``sum_c weight_c * NLL_c`` (NLL = token-weighted mean of the resample).
        n_boot: resamples. seed: the resampling seed. level: interval coverage.

    Returns ``{"conditions": {c: {nll, lo, hi, ppl, ppl_lo, ppl_hi}}, "contrasts": {name: {value, lo, hi,
    weights}}, "n_documents", "n_boot", "seed", "level", "method"}``. With one document the intervals are
    the point itself (nothing to resample) -- read ``n_documents`` beside them.
    """
    _check_level(level)
    if not nll_sums:
        raise ValueError("bootstrap_nll needs at least one condition")
    sums = {c: np.asarray(v, dtype=np.float64) for c, v in nll_sums.items()}
    sizes = {c: v.shape for c, v in sums.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"nll_sums must be 1-d arrays of one common length (documents), got {sizes}")
    n_docs = next(iter(sums.values())).shape[0]
    if isinstance(tokens, Mapping):
        toks = {c: np.asarray(tokens[c], dtype=np.float64) for c in sums}
    else:
        common = np.asarray(tokens, dtype=np.float64)
        toks = {c: common for c in sums}
    for c, t in toks.items():
        if t.shape != (n_docs,):
            raise ValueError(f"tokens of {c!r} have shape {t.shape}, expected ({n_docs},)")
        if (t <= 0).any():
            raise ValueError(f"tokens of {c!r} must be positive per document")
    idx = bootstrap_indices(n_docs, n_boot, seed)  # [B, D]
    point = {c: float(sums[c].sum() / toks[c].sum()) for c in sums}
    boot = {c: sums[c][idx].sum(axis=1) / toks[c][idx].sum(axis=1) for c in sums}  # [B] each
    out_c: dict[str, Any] = {}
    for c in sums:
        lo, hi = percentile_interval(boot[c], level)
        out_c[c] = {
            "nll": point[c],
            "lo": lo,
            "hi": hi,
            "ppl": math.exp(point[c]),
            "ppl_lo": math.exp(lo),
            "ppl_hi": math.exp(hi),
        }
    out_k: dict[str, Any] = {}
    for name, weights in (contrasts or {}).items():
        missing = [c for c in weights if c not in sums]
        if missing:
            raise ValueError(f"contrast {name!r} names conditions {missing} that have no NLL sums")
        value = sum(float(w) * point[c] for c, w in weights.items())
        samples = sum(float(w) * boot[c] for c, w in weights.items())
        lo, hi = percentile_interval(np.asarray(samples, dtype=np.float64), level)
        out_k[name] = {
            "value": value,
            "lo": lo,
            "hi": hi,
            "weights": {c: float(w) for c, w in weights.items()},
        }
    return {
        "conditions": out_c,
        "contrasts": out_k,
        "n_documents": int(n_docs),
        "n_boot": int(n_boot),
        "seed": int(seed),
        "level": float(level),
        "method": "paired percentile bootstrap over documents (token-weighted NLL recomputed per resample)",
    }


def wilson_interval(correct: int, trials: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The Wilson score interval of ``correct / trials`` (two-sided, coverage ``level``).

    ``(0.0, 1.0)`` for ``trials == 0`` (nothing is known)."""
    _check_level(level)
    if trials < 0 or correct < 0 or correct > trials:
        raise ValueError(
            f"wilson_interval: need 0 <= correct <= trials, got correct={correct}, trials={trials}"
        )
    if trials == 0:
        return 0.0, 1.0
    from statistics import NormalDist

    z = NormalDist().inv_cdf((1 + level) / 2)
    p = correct / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return max(0.0, centre - half), min(1.0, centre + half)


# --------------------------------------------------------------------------------------------------------
# Correlations that keep a grouping
# --------------------------------------------------------------------------------------------------------


def _ranks(a: np.ndarray) -> np.ndarray:
    """Mid-ranks (ties share the mean of their positions)."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def correlation(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, method: str = "spearman"
) -> float:
    """Pearson or Spearman correlation; ``nan`` when either side is constant or fewer than 2 points."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"x {xa.shape} and y {ya.shape} must be 1-d of the same length")
    if method == "spearman":
        xa, ya = _ranks(xa), _ranks(ya)
    elif method != "pearson":
        raise ValueError(f"method={method!r} is not 'pearson' or 'spearman'")
    if len(xa) < 2:
        return math.nan
    xc, yc = xa - xa.mean(), ya - ya.mean()
    den = math.sqrt(float((xc * xc).sum() * (yc * yc).sum()))
    return float((xc * yc).sum() / den) if den > 0 else math.nan


def _group_index(groups: Sequence[Any]) -> dict[Any, np.ndarray]:
    out: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        out.setdefault(g, []).append(i)
    return {g: np.asarray(v) for g, v in out.items()}


def within_group_correlations(
    x: Sequence[float], y: Sequence[float], groups: Sequence[Any], method: str = "spearman"
) -> dict[str, dict[str, Any]]:
    """``{group: {"rho", "n"}}``: the correlation inside each group (``rho`` is ``None`` when undefined:
    fewer than 3 points or a constant side)."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for g, idx in _group_index(groups).items():
        rho = correlation(xa[idx], ya[idx], method) if len(idx) >= 3 else math.nan
        out[str(g)] = {"rho": None if math.isnan(rho) else rho, "n": int(len(idx))}
    return out


def _none_if_nan(v: float) -> float | None:
    return None if math.isnan(v) else v


def _centred_within(a: np.ndarray, blocks: Sequence[np.ndarray], method: str) -> np.ndarray:
    """``a`` (ranked inside each group for Spearman) minus its group mean."""
    out = np.empty_like(a)
    for b in blocks:
        v = _ranks(a[b]) if method == "spearman" else a[b]
        out[b] = v - v.mean()
    return out


def _n_within_permutations(index: Mapping[Any, np.ndarray]) -> int:
    return math.prod(math.factorial(len(v)) for v in index.values())


def grouped_permutation_test(
    x: Sequence[float],
    y: Sequence[float],
    groups: Sequence[Any],
    *,
    mode: str = "within",
    method: str = "spearman",
    within_statistic: str = "stratified",
    n_perm: int = 10000,
    seed: int = 0,
    max_exact: int = 50000,
) -> dict[str, Any]:
    """Two-sided permutation test of the correlation of ``x`` and ``y`` that keeps the grouping.

    ``mode="within"``: ``y`` is permuted only inside each group, so whatever correlation the separation of
    the groups produces is kept by every permutation and only association *within* groups can make the
    observed value extreme. ``within_statistic="stratified"`` (default) tests the pooled within-group
    correlation: the correlation of the values centred on their group means (for Spearman: of the ranks
    taken inside each group, centred), blind to where the groups sit; ``"pooled"`` tests the correlation
    over all points (the number a report quotes), which a within-group association of the opposite sign
    to the separation can hide.
    ``mode="labels"``: the statistic is the correlation of the group means of ``x`` and ``y`` (one point per
    group); the permutations reassign the groups' ``y`` means among the groups.

    The p-value is ``#{|stat_perm| >= |stat_obs|} / #perms`` over every permutation when there are at most
    ``max_exact`` of them (exact; the identity is one of them), else ``(1 + #{...}) / (1 + n_perm)`` over
    ``n_perm`` seeded random ones. Returns ``{"statistic", "p_value", "n", "n_groups", "mode", "method",
    "exact", "n_permutations"}``; ``statistic``/``p_value`` are ``None`` when the correlation is undefined.
    """
    if mode not in ("within", "labels"):
        raise ValueError(f"mode={mode!r} is not 'within' or 'labels'")
    if within_statistic not in ("stratified", "pooled"):
        raise ValueError(f"within_statistic={within_statistic!r} is not 'stratified' or 'pooled'")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if not (xa.shape == ya.shape == (len(groups),)):
        raise ValueError(f"x {xa.shape}, y {ya.shape} and groups ({len(groups)}) must have one length")
    index = _group_index(groups)
    keys = list(index)
    base: dict[str, Any] = {"n": int(len(xa)), "n_groups": len(keys), "mode": mode, "method": method}
    # The statistic is correlation(px, py[perm], how), perm permuting py inside each of ``blocks``.
    if mode == "labels":
        px = np.asarray([xa[index[g]].mean() for g in keys])
        py = np.asarray([ya[index[g]].mean() for g in keys])
        how = method
        blocks = [np.arange(len(keys))]
    else:
        blocks = [index[g] for g in keys]
        base["within_statistic"] = within_statistic
        base["pooled"] = _none_if_nan(correlation(xa, ya, method))
        if within_statistic == "stratified":
            px, py, how = _centred_within(xa, blocks, method), _centred_within(ya, blocks, method), "pearson"
        else:
            px, py, how = xa, ya, method
    observed = correlation(px, py, how)
    total = _n_within_permutations({i: b for i, b in enumerate(blocks)})

    def stat_of(perm: Sequence[int]) -> float:
        return correlation(px, py[list(perm)], how)

    def exact_iter() -> Iterator[list[int]]:
        for parts in itertools.product(*(itertools.permutations(b.tolist()) for b in blocks)):
            perm = np.arange(len(px))
            for b, part in zip(blocks, parts):
                perm[b] = part
            yield perm.tolist()

    def random_order(rng: np.random.Generator) -> list[int]:
        perm = np.arange(len(px))
        for b in blocks:
            perm[b] = rng.permutation(b)
        return perm.tolist()

    if math.isnan(observed):
        return {**base, "statistic": None, "p_value": None, "exact": None, "n_permutations": 0}
    tol = 1e-12
    if total <= max_exact:
        hits = count = 0
        for order in exact_iter():
            s = stat_of(order)
            count += 1
            hits += int(not math.isnan(s) and abs(s) >= abs(observed) - tol)
        p = hits / count
        return {**base, "statistic": observed, "p_value": p, "exact": True, "n_permutations": count}
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_perm):
        s = stat_of(random_order(rng))
        hits += int(not math.isnan(s) and abs(s) >= abs(observed) - tol)
    p = (1 + hits) / (1 + n_perm)
    return {**base, "statistic": observed, "p_value": p, "exact": False, "n_permutations": n_perm}
