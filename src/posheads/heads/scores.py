"""Positional scores of attention heads, their permuted-position null, z-scores and Positional-Head selection.

Hong et al. (arXiv 2410.08703) call *Positional Heads* the heads whose allocation of attention across RoPE
frequency pairs tracks token distance. The paper's exact formula is not available to us; docs/definitions.md
(positional score) defines the score as a correlation between distance and the dominant pair ``D = argmax_i g_i`` over causal
(query, key) pairs. All variants below are computed from the sums of :class:`~posheads.heads.stats.PairStats`.

Variants (``SCORE_VARIANTS``):

* ``pearson_weighted`` (**default**): attention-weighted Pearson correlation of ``log(1 + delta)`` with ``D``.
  Justification: (i) weighting by ``a(m, n)`` measures the pairs the head actually *reads* -- an unweighted
  correlation is dominated by the many far keys a local head ignores, so it describes the geometry of q/k
  rather than the head's behaviour; (ii) ``log(1 + delta)`` matches the log-spaced distance bins and keeps
  the few longest distances from dominating; (iii) Pearson on the pair index keeps the *size* of the shift
  towards high pairs, which Spearman's ranks discard, and is exact from the accumulated moments.
* ``pearson``: the same, unweighted.
* ``spearman_weighted`` / ``spearman``: rank correlation of distance and ``D``, ranks at bin level (distances
  within one log2 bin are ties; mid-ranks from the joint (bin, D) histogram).
* ``soft_pearson_weighted`` / ``soft_pearson``: Pearson with the soft dominant pair ``S = E_p[i]``.
* ``per_pair_weighted`` / ``per_pair``: ``r_{h,i} = corr(t, p_i)`` per pair (``t = delta`` by default, or
  ``log(1 + delta)``), summarised as ``mean_{i >= i_c} r - mean_{i < i_c} r``.

**Null.** Every variant is also computed with the permuted distances ``delta'`` (the distances of all sampled
(query, key) pairs of a sequence permuted among themselves; see :mod:`posheads.heads.stats`), which keeps the attention pattern and the pair allocation
but breaks their link to distance: its expectation is 0 for every head.

**z-score and ranking.** Raw correlations can be positive in every head (high-frequency pairs average out over
distance), so heads are compared relative to each other: ``z = (value - mean) / sd`` over all heads of the model,
``value`` being the score (default, ``HeadsConfig.rank_by="score"``) or ``excess = score - null``. The null
shows what a head with no distance dependence scores (about 0 in every head: SmolLM2's nulls are
0.006 +- 0.020); subtracting one permutation draw per head adds its noise to the ranking without removing a
bias, so the score is the default ranking value and the null is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from posheads.heads.stats import PairStats

__all__ = [
    "DEFAULT_SCORE",
    "SCORE_VARIANTS",
    "head_set",
    "jaccard",
    "per_layer_counts",
    "per_pair_correlations",
    "positional_scores",
    "select_heads",
    "zscores",
]

SCORE_VARIANTS = (
    "pearson_weighted",
    "pearson",
    "spearman_weighted",
    "spearman",
    "soft_pearson_weighted",
    "soft_pearson",
    "per_pair_weighted",
    "per_pair",
)
DEFAULT_SCORE = "pearson_weighted"
PER_PAIR_DISTANCES = ("linear", "log")

# indices into PairStats.moments[..., row, column] (see stats.DIST_TERMS / FEATURE_TERMS)
_ONE, _X, _DELTA, _XN, _DN, _D, _S2 = 0, 1, 2, 3, 4, 5, 6


def _corr(
    s: torch.Tensor,
    sx: torch.Tensor,
    sy: torch.Tensor,
    sxx: torch.Tensor,
    syy: torch.Tensor,
    sxy: torch.Tensor,
):
    """Weighted Pearson correlation from sums (NaN where a variance vanishes)."""
    cov = s * sxy - sx * sy
    var = (s * sxx - sx * sx).clamp(min=0) * (s * syy - sy * sy).clamp(min=0)
    out = cov / var.sqrt()
    return torch.where(var > 0, out, torch.full_like(out, float("nan")))


def _select_bins(stats: PairStats, bins: slice | None) -> PairStats:
    if bins is None:
        return stats
    return PairStats(
        dom=stats.dom[..., bins, :],
        dom_null=stats.dom_null[..., bins, :],
        g=stats.g[..., bins, :],
        pp=stats.pp[..., bins, :],
        p=stats.p[..., bins, :, :],
        moments=stats.moments[..., bins, :, :],
        rows=stats.rows,
        content=None if stats.content is None else stats.content[..., bins, :],
        sink_mass=stats.sink_mass,
        sink_sq=stats.sink_sq,
    )


def _weighting(variant: str) -> int:
    return 1 if variant.endswith("_weighted") else 0


def _pearson_dominant(stats: PairStats, w: int, null: bool) -> torch.Tensor:
    m = stats.moments[w].sum(2)  # [NL, H, 5, 7] summed over bins
    pairs = torch.arange(stats.num_pairs, dtype=torch.float64)
    dom = stats.dom[w].sum(2)  # [NL, H, P]
    sdd = (dom * pairs.square()).sum(-1)
    xr = _XN if null else _X
    return _corr(m[..., _ONE, _ONE], m[..., _ONE, xr], m[..., _ONE, _D], m[..., xr, xr], sdd, m[..., xr, _D])


def _pearson_soft(stats: PairStats, w: int, null: bool) -> torch.Tensor:
    m = stats.moments[w].sum(2)
    p = stats.p[w].sum(2)  # [NL, H, 5, P]
    # the soft pair is accumulated centred, S - (P-1)/2 (correlations are shift invariant)
    pairs = torch.arange(stats.num_pairs, dtype=torch.float64) - (stats.num_pairs - 1) / 2
    xr = _XN if null else _X
    s_s = (p[..., _ONE, :] * pairs).sum(-1)
    s_xs = (p[..., xr, :] * pairs).sum(-1)
    return _corr(m[..., _ONE, _ONE], m[..., _ONE, xr], s_s, m[..., xr, xr], m[..., _ONE, _S2], s_xs)


def _midranks(weights: torch.Tensor) -> torch.Tensor:
    """Weighted mid-ranks of ordered categories: ``weights [..., K]`` -> ``[..., K]``."""
    cum = weights.cumsum(-1)
    return cum - weights / 2


def _spearman(stats: PairStats, w: int, null: bool) -> torch.Tensor:
    table = (stats.dom_null if null else stats.dom)[w]  # [NL, H, NB, P] joint (distance bin, D) weights
    total = table.sum((-1, -2))
    rank_b = _midranks(table.sum(-1))  # [NL, H, NB]
    rank_i = _midranks(table.sum(-2))  # [NL, H, P]
    s_b = (table.sum(-1) * rank_b).sum(-1)
    s_i = (table.sum(-2) * rank_i).sum(-1)
    s_bb = (table.sum(-1) * rank_b.square()).sum(-1)
    s_ii = (table.sum(-2) * rank_i.square()).sum(-1)
    s_bi = (table * rank_b.unsqueeze(-1) * rank_i.unsqueeze(-2)).sum((-1, -2))
    return _corr(total, s_b, s_i, s_bb, s_ii, s_bi)


def per_pair_correlations(
    stats: PairStats,
    weighted: bool = True,
    distance: str = "linear",
    null: bool = False,
    bins: slice | None = None,
) -> torch.Tensor:
    """``r_{h,i} = corr(t, p_i)`` for every (layer, head, pair): ``[NL, H, P]`` (``t = delta`` or ``log(1+delta)``).

    With ``null=True`` the permuted distance ``t'`` replaces ``t``.
    """
    if distance not in PER_PAIR_DISTANCES:
        raise ValueError(f"per_pair_distance={distance!r} is not one of {list(PER_PAIR_DISTANCES)}")
    stats = _select_bins(stats, bins)
    w = 1 if weighted else 0
    t = {("linear", False): _DELTA, ("log", False): _X, ("linear", True): _DN, ("log", True): _XN}[
        (distance, null)
    ]
    m = stats.moments[w].sum(2)  # [NL, H, 5, 7]
    p = stats.p[w].sum(2)  # [NL, H, 5, P]
    pp = stats.pp[w].sum(2)  # [NL, H, P]

    def u(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)

    return _corr(
        u(m[..., _ONE, _ONE]), u(m[..., _ONE, t]), p[..., _ONE, :], u(m[..., t, t]), pp, p[..., t, :]
    )


def positional_scores(
    stats: PairStats,
    variant: str = DEFAULT_SCORE,
    *,
    null: bool = False,
    i_c: int | list[int] | None = None,
    per_pair_distance: str = "linear",
    bins: slice | None = None,
) -> torch.Tensor:
    """The positional score of every head, ``[num_layers, num_heads]`` float64 (NaN: undefined, e.g. no data).

    Args:
        stats: accumulated sums.
        variant: one of :data:`SCORE_VARIANTS` (see the module docstring; default ``pearson_weighted``).
        null: compute the permuted-position null instead.
        i_c: critical pair, required by the ``per_pair`` variants.
        per_pair_distance: ``"linear"`` (``delta``, as in docs/definitions.md) or ``"log"`` for the per-pair variants.
        bins: restrict to a slice of distance bins.
    """
    if variant not in SCORE_VARIANTS:
        raise ValueError(f"score={variant!r} is not one of {list(SCORE_VARIANTS)}")
    stats = _select_bins(stats, bins)
    w = _weighting(variant)
    base = variant.removesuffix("_weighted")
    if base == "pearson":
        return _pearson_dominant(stats, w, null)
    if base == "soft_pearson":
        return _pearson_soft(stats, w, null)
    if base == "spearman":
        return _spearman(stats, w, null)
    if i_c is None:
        raise ValueError(f"score={variant!r} needs the critical pair i_c")
    critical = [i_c] * stats.num_layers if isinstance(i_c, int) else list(i_c)  # one per layer (Gemma 3)
    if len(critical) != stats.num_layers or not all(0 < c < stats.num_pairs for c in critical):
        raise ValueError(f"i_c={i_c!r} must be in 1..{stats.num_pairs - 1} for score={variant!r}")
    r = per_pair_correlations(stats, weighted=bool(w), distance=per_pair_distance, null=null)
    high = torch.arange(stats.num_pairs).view(1, -1) >= torch.tensor(critical).view(-1, 1)  # [NL, P]
    high = high.unsqueeze(1).expand_as(r)
    nan = torch.full_like(r, float("nan"))
    return torch.where(high, r, nan).nanmean(-1) - torch.where(high, nan, r).nanmean(-1)


def zscores(scores: torch.Tensor, null: torch.Tensor | None = None) -> torch.Tensor:
    """``z`` of ``scores - null`` (or of ``scores``) over all heads; NaN heads stay NaN."""
    excess = scores - null if null is not None else scores
    finite = excess[torch.isfinite(excess)]
    if finite.numel() < 2:
        return torch.full_like(excess, float("nan"))
    sd = finite.std()
    if not sd > 0:
        return torch.zeros_like(excess).masked_fill(~torch.isfinite(excess), float("nan"))
    return (excess - finite.mean()) / sd


def select_heads(
    values: torch.Tensor,
    z: torch.Tensor | None = None,
    *,
    top_fraction: float | None = 0.10,
    z_threshold: float | None = None,
    combine: str = "and",
) -> torch.Tensor:
    """Boolean ``[NL, H]`` mask of the Positional Heads.

    Args:
        values: ranking values (the score, or ``score - null``: ``HeadsConfig.rank_by``).
        z: z-scores, needed with ``z_threshold``.
        top_fraction: keep the ``ceil(top_fraction * heads)`` best heads (``None``: no such rule).
        z_threshold: keep heads with ``z >= z_threshold`` (``None``: no such rule).
        combine: ``"and"`` (both rules) or ``"or"`` (either) when both rules are given.
    """
    if top_fraction is None and z_threshold is None:
        raise ValueError("select: set top_fraction and/or z_threshold")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction={top_fraction!r} must be in (0, 1]")
    if combine not in ("and", "or"):
        raise ValueError(f"combine={combine!r} is not one of ['and', 'or']")
    finite = torch.isfinite(values)
    masks = []
    if top_fraction is not None:
        import math

        k = max(1, math.ceil(top_fraction * values.numel() - 1e-9))
        k = min(k, int(finite.sum()))
        flat = torch.where(finite, values, torch.full_like(values, float("-inf"))).flatten()
        order = torch.argsort(flat, descending=True, stable=True)
        top = torch.zeros_like(flat, dtype=torch.bool)
        top[order[:k]] = True
        masks.append(top.view_as(values))
    if z_threshold is not None:
        if z is None:
            raise ValueError("select: z_threshold needs z-scores")
        masks.append(torch.nan_to_num(z, nan=float("-inf")) >= z_threshold)
    if len(masks) == 1:
        return masks[0]
    return masks[0] & masks[1] if combine == "and" else masks[0] | masks[1]


def head_set(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(layer, head)]`` of a boolean ``[NL, H]`` mask, sorted."""
    return [(int(layer), int(head)) for layer, head in mask.nonzero().tolist()]


def per_layer_counts(
    mask_or_heads: torch.Tensor | Iterable[tuple[int, int]], num_layers: int | None = None
) -> list[int]:
    """Number of selected heads in every layer."""
    if isinstance(mask_or_heads, torch.Tensor):
        return [int(x) for x in mask_or_heads.sum(-1).tolist()]
    heads = list(mask_or_heads)
    n = num_layers if num_layers is not None else (max((layer for layer, _ in heads), default=-1) + 1)
    counts = [0] * n
    for layer, _ in heads:
        counts[layer] += 1
    return counts


def jaccard(
    a: torch.Tensor | Sequence[tuple[int, int]], b: torch.Tensor | Sequence[tuple[int, int]]
) -> float:
    """Jaccard overlap ``|A & B| / |A | B|`` of two head sets (masks or (layer, head) lists); 1.0 if both empty."""
    sa = set(head_set(a)) if isinstance(a, torch.Tensor) else {tuple(x) for x in a}
    sb = set(head_set(b)) if isinstance(b, torch.Tensor) else {tuple(x) for x in b}
    union = sa | sb
    return 1.0 if not union else len(sa & sb) / len(union)
