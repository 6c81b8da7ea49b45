"""High-dimensional attention allocation (HDA) per head and distance bin.

Hong et al. (arXiv 2410.08703) report that Positional Heads allocate attention to the *higher* (low-frequency)
RoPE dimensions, and that extrapolation training extends this allocation to longer distances. docs/definitions.md
(HDA) makes it precise: for a head and a log2 distance bin ``b``,

* hard: ``HDA_h(b) = sum a(m,n) [D(m,n) >= i_c] / sum a(m,n)`` over the pairs with ``delta`` in ``b``;
* soft: the attention-weighted mean of ``sum_{i >= i_c} p_i``.

The critical pair ``i_c`` defaults to the critical dimension of the original context (Liu et al. 2023,
"Scaling Laws of RoPE-based Extrapolation", arXiv 2310.05209): the first pair whose wavelength exceeds the
pre-training context, from :func:`posheads.rope.critical_pair` applied to the layer's rotary width and
``theta``; alternatives are ``P/2`` (the upper half of the rotary pairs) or a number. Models whose layer
types have different ``theta`` (Gemma 3 local / global layers) get one ``i_c`` per layer: every function
here accepts ``i_c`` as an int or as one int per layer. Pass-through components of partial-rotary heads are
no pairs and never count as "high".

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
        return head_dim // 4  # half of the pairs
    if rule == "critical":
        from posheads.rope import critical_pair

        return int(critical_pair(head_dim, float(rope_theta), int(original_context)))
    raise ValueError(f"critical={rule!r} is not one of {list(CRITICAL_RULES)} or an int")


def critical_pair_for(
    config: Any, rule: str | int = "critical", original_context: int | None = None
) -> int | list[int]:
    """``i_c`` of a Transformers config (or model), from its RoPE description
    (:func:`posheads.rope.layout.describe_rope`): each layer's rotary width and pre-trained ``theta``, and the
    original context (recorded by a posheads scaling, so a scaled model still uses the context it was
    pre-trained on). An int when every layer has the same, else one int per layer."""
    from posheads.rope import original_context_length
    from posheads.rope.layout import describe_rope

    rope = describe_rope(config)
    config = getattr(config, "config", config)
    if original_context is None:
        try:
            original_context = original_context_length(config)
        except ValueError:  # per-layer-type rope_parameters or no rope_parameters (GPT-J)
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            original_context = int(text.max_position_embeddings)
    values = [
        resolve_critical_pair(rule, layer.rotary_dim, layer.rope_theta, original_context)
        for layer in rope.layers
    ]
    return values[0] if len(set(values)) == 1 else values


def _high_mask(i_c: Any, num_layers: int, num_pairs: int) -> torch.Tensor:
    """``[NL, 1, 1, P]`` bool: pairs ``>= i_c`` of each layer."""
    from posheads.heads.ablation import per_layer_critical

    values = torch.tensor(per_layer_critical(i_c, num_layers, num_pairs))
    return (torch.arange(num_pairs).view(1, -1) >= values.view(-1, 1)).view(num_layers, 1, 1, num_pairs)


def hda_curves(stats: PairStats, i_c: Any, variant: str = "hard", weighted: bool = True) -> torch.Tensor:
    """``HDA [num_layers, num_heads, num_bins]`` (NaN where a bin holds no mass); ``i_c`` an int or one per
    layer."""
    if variant not in HDA_VARIANTS:
        raise ValueError(f"hda_variant={variant!r} is not one of {list(HDA_VARIANTS)}")
    high = _high_mask(i_c, stats.num_layers, stats.num_pairs).to(stats.dom.device)
    w = 1 if weighted else 0
    if variant == "hard":
        hist = stats.dom[w]  # [NL, H, NB, P]
        num, den = (hist * high).sum(-1), hist.sum(-1)
    else:
        num = (stats.p[w][..., 0, :] * high).sum(-1)  # sum w p_i over i >= i_c
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
