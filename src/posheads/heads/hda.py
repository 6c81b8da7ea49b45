"""High-dimensional attention allocation (HDA) per head and distance bin.

Hong et al. (arXiv 2410.08703) report that Positional Heads allocate attention to the *higher* (low-frequency)
RoPE dimensions, and that extrapolation training extends this allocation to longer distances. DESIGN.md
section 2 makes it precise: for a head and a log2 distance bin ``b``,

* hard: ``HDA_h(b) = sum a(m,n) [D(m,n) >= i_c] / sum a(m,n)`` over the pairs with ``delta`` in ``b``;
* soft: the attention-weighted mean of ``sum_{i >= i_c} p_i``.

The critical pair ``i_c`` defaults to the critical dimension of the original context (Liu et al. 2023,
"Scaling Laws of RoPE-based Extrapolation", arXiv 2310.05209): the first pair whose wavelength exceeds the
pre-training context, from :func:`posheads.rope.critical_pair`; alternatives are ``d/4`` (the upper half of
the pairs) or a number.

Summaries: the **extension** -- the largest bin with ``HDA >= tau`` (default 0.5), reported as a bin index
and as that bin's largest distance in tokens -- and the **area** under the HDA curve over log2 distance,
``sum_b HDA(b)`` over the bins ``b >= 1`` that hold data (each bin is one octave of distance, so the area is
in octaves; ``hda_mean`` is the same divided by the number of such bins).
"""

from __future__ import annotations

from typing import Any

import torch

from posheads.heads.stats import PairStats, bin_edges

__all__ = [
    "CRITICAL_RULES",
    "HDA_VARIANTS",
    "critical_pair_for",
    "hda_area",
    "hda_curves",
    "hda_extension",
    "resolve_critical_pair",
    "set_average",
]

CRITICAL_RULES = ("critical", "quarter")
HDA_VARIANTS = ("hard", "soft")


def resolve_critical_pair(rule: str | int, head_dim: int, rope_theta: float, original_context: int) -> int:
    """``i_c`` from a rule: ``"critical"`` (Liu et al. critical dimension), ``"quarter"`` (``d/4``) or an int."""
    pairs = head_dim // 2
    if isinstance(rule, bool):
        raise ValueError(f"critical={rule!r} is not one of {list(CRITICAL_RULES)} or an int")
    if isinstance(rule, int):
        if not 0 <= rule <= pairs:
            raise ValueError(f"critical={rule} must be a pair index in 0..{pairs}")
        return rule
    if rule == "quarter":
        return head_dim // 4
    if rule == "critical":
        from posheads.rope import critical_pair

        return int(critical_pair(head_dim, float(rope_theta), int(original_context)))
    raise ValueError(f"critical={rule!r} is not one of {list(CRITICAL_RULES)} or an int")


def critical_pair_for(config: Any, rule: str | int = "critical", original_context: int | None = None) -> int:
    """``i_c`` of a Transformers config (or model): the pre-trained RoPE base and original context are read
    through :mod:`posheads.rope` (so a scaled model still uses the context it was pre-trained on)."""
    from posheads.rope import base_rope_theta, original_context_length, rope_head_dim

    config = getattr(config, "config", config)
    head_dim = rope_head_dim(config)
    context = original_context if original_context is not None else original_context_length(config)
    return resolve_critical_pair(rule, head_dim, base_rope_theta(config), context)


def hda_curves(stats: PairStats, i_c: int, variant: str = "hard", weighted: bool = True) -> torch.Tensor:
    """``HDA [num_layers, num_heads, num_bins]`` (NaN where a bin holds no mass)."""
    if variant not in HDA_VARIANTS:
        raise ValueError(f"hda_variant={variant!r} is not one of {list(HDA_VARIANTS)}")
    if not 0 <= i_c <= stats.num_pairs:
        raise ValueError(f"i_c={i_c!r} must be in 0..{stats.num_pairs}")
    w = 1 if weighted else 0
    if variant == "hard":
        hist = stats.dom[w]  # [NL, H, NB, P]
        num, den = hist[..., i_c:].sum(-1), hist.sum(-1)
    else:
        num = stats.p[w][..., 0, i_c:].sum(-1)  # sum w p_i over i >= i_c
        den = stats.moments[w][..., 0, 0]
    out = num / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan")))


def hda_extension(curves: torch.Tensor, tau: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest bin with ``HDA >= tau``: ``(bin index [..], its largest distance in tokens [..])``; -1 if none."""
    if not 0 <= tau <= 1:
        raise ValueError(f"tau={tau!r} must be in [0, 1]")
    nb = curves.shape[-1]
    hit = torch.nan_to_num(curves, nan=-1.0) >= tau
    idx = torch.arange(nb).expand_as(hit)
    ext = torch.where(hit, idx, torch.full_like(idx, -1)).amax(-1)
    last_distance = torch.tensor([hi - 1 for _, hi in bin_edges(nb)] + [-1])
    return ext, last_distance[ext]  # index -1 picks the appended -1


def hda_area(curves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(area in octaves, mean HDA)`` over the bins ``>= 1`` that hold data."""
    body = curves[..., 1:]
    have = torch.isfinite(body)
    area = torch.where(have, body, torch.zeros_like(body)).sum(-1)
    n = have.sum(-1)
    mean = torch.where(n > 0, area / n.clamp(min=1), torch.full_like(area, float("nan")))
    return area, mean


def set_average(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the heads of ``mask [NL, H]`` of ``values [NL, H, ...]`` (NaN-aware); NaN if the set is empty."""
    sel = values[mask]  # [n, ...]
    if sel.shape[0] == 0:
        return torch.full(values.shape[2:], float("nan"), dtype=torch.float64)
    return sel.double().nanmean(0)
