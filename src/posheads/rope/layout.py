"""One description of a model's RoPE per layer, derived from its config and verified on the model itself.

Every analysis of posheads (q/k capture, per-pair statistics, scores, HDA, ``i_c``, dimension ablation, the
tracker) reads the attention of a layer as RoPE *pairs* -- two components of the post-RoPE query and key that
one rotation by ``m * omega_i`` acts on -- plus, for partial-rotary and MLA models, *pass-through* components
that no rotation touches (their logit share is reported as "content", never as a pair). Hugging Face models
differ in where those components are:

=====================  ====================================================================================
layout                 pair ``i`` (``P`` pairs, rotary components from ``offset``)
=====================  ====================================================================================
``half``               ``(offset + i, offset + i + P)`` -- rotate-half (Llama, Mistral, Qwen, GPT-NeoX, ...)
``interleaved``        ``(offset + 2i, offset + 2i + 1)`` -- rotate-every-two (Cohere, GLM, GPT-J, DeepSeek-V2)
=====================  ====================================================================================

with ``2P`` = the rotary width (``head_dim * partial_rotary_factor``; ``qk_rope_head_dim`` for MLA, whose
rotary part comes *after* its ``qk_nope_head_dim`` pass-through part, so ``offset = qk_nope_head_dim``).

:func:`describe_rope` derives the description from the config (per layer: layer type, rotary width, layout,
``theta`` and the scaling of that layer type, logit scale and soft-cap). :func:`verify_rope` checks it on the
model with a **position-shift test**: the same tokens are run at positions ``0..n-1`` and ``s..s+n-1`` and the
captured post-RoPE queries and keys must satisfy, in every layer, ``q~(m + s) = R(s omega_i) q~(m)`` for every
declared pair (rotation by the declared frequency) and ``q~(m + s) = q~(m)`` on every pass-through component.
Equivalently each pair's logit contribution ``g_i`` is invariant to a common shift of query and key. A wrong
layout, rotary width, offset or frequency fails it; the error names the model type, the layer, what was
declared and -- when one fits -- the layout and width that would pass. :func:`model_rope` returns the verified
description of a model (cached on the model until its RoPE config changes).

Families whose attention cannot be expressed this way are refused by :func:`describe_rope` with a message that
names the feature: multimodal RoPE (``mrope_section``), layers without RoPE (``no_rope_layers``), attention
sinks (``s_aux``), attention that does not go through Transformers' attention interface.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "INTERLEAVED_MODEL_TYPES",
    "PAIR_LAYOUTS",
    "LayerRope",
    "ModelRope",
    "describe_rope",
    "model_rope",
    "rope_at_length",
    "verify_rope",
]

PAIR_LAYOUTS = ("half", "interleaved")

#: model types whose post-RoPE q/k pair components (2i, 2i+1). Every other type is rotate-half. The
#: verification checks the choice on the model, so a wrong entry here is an error, never a wrong number.
INTERLEAVED_MODEL_TYPES = frozenset(
    {"cohere", "cohere2", "glm", "glm4", "gptj", "codegen", "deepseek_v2", "helium"}
)

#: model types refused up front, with the feature that is not supported
REFUSED_MODEL_TYPES: dict[str, str] = {
    "llama4_text": "Llama 4 (layers without RoPE, chunked attention and attention-temperature tuning)",
    "llama4": "Llama 4 (layers without RoPE, chunked attention and attention-temperature tuning)",
    "diffllama": "differential attention (two softmaxes per head)",
    "cohere2": "layers without RoPE (Cohere 2 rotates only in its sliding-window layers)",
    "falcon": "Falcon attention does not go through Transformers' attention interface (q/k cannot be captured)",
    "gpt_oss": "attention sinks (s_aux): a learned logit joins each softmax, the statistics' probabilities omit it",
}


@dataclass(frozen=True)
class LayerRope:
    """The RoPE of one attention layer.

    Attributes:
        layer: decoder layer index.
        layer_type: ``config.layer_types[layer]`` (``None`` when the model has one layer type).
        head_dim: width of one query/key head as the attention sees it (``qk_head_dim`` for MLA).
        rotary_dim: rotated components per head (``2 P``).
        offset: first rotary component (``qk_nope_head_dim`` for MLA, else 0).
        layout: ``"half"`` or ``"interleaved"`` (see the module docstring).
        rope_theta: pre-trained base of this layer's type (before any posheads scaling).
        inv_freq: ``[P]`` float64 frequencies ``omega_i`` within the original context (scaling included).
        softcap: ``tanh`` logit soft-cap (Gemma 2), ``None`` if none.
    """

    layer: int
    layer_type: str | None
    head_dim: int
    rotary_dim: int
    offset: int
    layout: str
    rope_theta: float
    inv_freq: tuple[float, ...]
    softcap: float | None = None

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2

    @property
    def content_dim(self) -> int:
        """Pass-through (non-rotary) components per head."""
        return self.head_dim - self.rotary_dim

    def pair_components(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` LongTensors ``[P]``: pair ``i`` is components ``a[i]`` and ``b[i]``."""
        return _pair_components(self.layout, self.rotary_dim, self.offset)

    def pass_components(self) -> torch.Tensor:
        a, b = self.pair_components()
        rotary = torch.zeros(self.head_dim, dtype=torch.bool)
        rotary[a] = True
        rotary[b] = True
        return (~rotary).nonzero().flatten()

    def order(self) -> torch.Tensor:
        """``[head_dim]`` permutation to ``[a_0..a_{P-1}, b_0..b_{P-1}, pass...]``: after it, pair ``i`` is
        components ``(i, i + P)`` and the pass-through components follow at ``2P..``."""
        a, b = self.pair_components()
        return torch.cat([a, b, self.pass_components()])

    def describe(self) -> str:
        rot = f"rotary_dim={self.rotary_dim} of head_dim={self.head_dim}"
        if self.offset:
            rot += f" from component {self.offset}"
        lt = f" ({self.layer_type})" if self.layer_type else ""
        return f"layer {self.layer}{lt}: layout={self.layout!r}, {rot}, theta={self.rope_theta:g}"


@dataclass(frozen=True)
class ModelRope:
    """The RoPE of every attention layer of a model (see :class:`LayerRope`).

    Attributes:
        model_type: the config's ``model_type``.
        layers: one :class:`LayerRope` per decoder layer, in order.
        verified: whether :func:`verify_rope` checked it on the model.
        shift: the position shift the verification used (0 if not verified).
        max_error: the largest relative error of the verification.
    """

    model_type: str
    layers: tuple[LayerRope, ...]
    verified: bool = False
    shift: int = 0
    max_error: float = float("nan")

    def __getitem__(self, layer: int) -> LayerRope:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def _uniform(self, name: str) -> Any:
        values = {getattr(layer, name) for layer in self.layers}
        if len(values) != 1:
            raise ValueError(
                f"model_type={self.model_type!r}: {name} differs across layers ({sorted(values)}); "
                "the per-pair statistics need one number of RoPE pairs per model"
            )
        return values.pop()

    @property
    def num_pairs(self) -> int:
        """RoPE pairs per head (the same in every layer, else ``ValueError``)."""
        return int(self._uniform("num_pairs"))

    @property
    def head_dim(self) -> int:
        return int(self._uniform("head_dim"))

    @property
    def content_dim(self) -> int:
        return int(self._uniform("content_dim"))

    def layouts(self) -> set[str]:
        return {layer.layout for layer in self.layers}

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary for protocols."""
        types = sorted({str(layer.layer_type) for layer in self.layers})
        return {
            "model_type": self.model_type,
            "layout": sorted(self.layouts()),
            "head_dim": sorted({layer.head_dim for layer in self.layers}),
            "rotary_dim": sorted({layer.rotary_dim for layer in self.layers}),
            "offset": sorted({layer.offset for layer in self.layers}),
            "rope_theta": {
                t: sorted({la.rope_theta for la in self.layers if str(la.layer_type) == t}) for t in types
            },
            "softcap": sorted({la.softcap for la in self.layers if la.softcap is not None}),
            "verified": self.verified,
            "shift": self.shift,
            "max_error": None if math.isnan(self.max_error) else self.max_error,
        }


def _pair_components(layout: str, rotary_dim: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = rotary_dim // 2
    i = torch.arange(pairs)
    if layout == "half":
        return offset + i, offset + i + pairs
    if layout == "interleaved":
        return offset + 2 * i, offset + 2 * i + 1
    raise ValueError(f"layout={layout!r} is not one of {list(PAIR_LAYOUTS)}")


# ------------------------------------------------------------------------------------------ from the config


def _text_config(config: Any) -> Any:
    config = getattr(config, "config", config)
    if getattr(config, "rope_parameters", None) or hasattr(config, "rotary_dim"):
        return config
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text(decoder=True)
        except (TypeError, ValueError):
            text = None
        if text is not None:
            return text
    return config


def _model_type(cfg: Any) -> str:
    return str(getattr(cfg, "model_type", None) or type(cfg).__name__)


def _layer_parameters(cfg: Any, layer_type: str | None) -> dict[str, Any]:
    rp = getattr(cfg, "rope_parameters", None) or {}
    nested = cfg.nested_rope_parameter_keys(rp) if hasattr(cfg, "nested_rope_parameter_keys") else []
    if nested:
        if layer_type not in rp:
            raise ValueError(
                f"model_type={_model_type(cfg)!r}: layer type {layer_type!r} has no entry in the per-layer-type "
                f"rope_parameters (keys {sorted(rp)})"
            )
        return dict(rp[layer_type])
    return dict(rp)


def _inv_freq(
    cfg: Any, params: Mapping[str, Any], layer_type: str | None, rotary_dim: int, seq_len: int | None = None
) -> torch.Tensor:
    """``[P]`` float64 frequencies as Transformers' rotary module computes them for a sequence of ``seq_len``
    tokens (``None``: within the original context)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    if rope_type == "default":
        return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"model_type={_model_type(cfg)!r}: rope_type={rope_type!r} is not one of Transformers' "
            f"ROPE_INIT_FUNCTIONS {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    nested = bool(layer_type is not None and isinstance((cfg.rope_parameters or {}).get(layer_type), Mapping))
    kwargs = {"layer_type": layer_type} if nested else {}
    length: Any = None
    if seq_len is not None and rope_type == "dynamic" and seq_len > int(cfg.max_position_embeddings):
        length = torch.tensor(seq_len)  # the model grows the base only beyond max_position_embeddings
    elif seq_len is not None and rope_type == "longrope":
        length = int(seq_len)  # long factors beyond the original context
    inv, _ = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=length, **kwargs)
    return inv.detach().double().cpu()


def rope_at_length(model_or_config: Any, rope: ModelRope, seq_len: int | None) -> ModelRope:
    """``rope`` with every layer's frequencies as the model uses them on a sequence of ``seq_len`` tokens from
    position 0: dynamic NTK grows its base beyond ``max_position_embeddings`` and LongRoPE switches to its
    long factors beyond the original context; every other scaling is static (returned unchanged)."""
    cfg = _text_config(model_or_config)
    rp = getattr(cfg, "rope_parameters", None) or {}
    if seq_len is None or not rp:
        return rope
    layers = []
    for layer in rope.layers:
        params = _layer_parameters(cfg, layer.layer_type)
        if params.get("rope_type", params.get("type")) in ("dynamic", "longrope"):
            inv = _inv_freq(cfg, params, layer.layer_type, layer.rotary_dim, seq_len)
            layer = replace(layer, inv_freq=tuple(float(x) for x in inv))
        layers.append(layer)
    return replace(rope, layers=tuple(layers))


def describe_rope(model_or_config: Any) -> ModelRope:
    """The RoPE of every layer of ``model_or_config`` as its config declares it (not verified).

    Raises ``ValueError`` naming the model type and the feature for families posheads does not support.
    """
    cfg = _text_config(model_or_config)
    mt = _model_type(cfg)
    if mt in REFUSED_MODEL_TYPES:
        raise ValueError(f"model_type={mt!r} is not supported: {REFUSED_MODEL_TYPES[mt]}")
    if re.search(r"(_vl|4v|omni)(_moe)?(_text)?$", mt):
        raise ValueError(
            f"model_type={mt!r} is not supported: multimodal RoPE (mrope_section) rotates by 3-D (time, height, "
            "width) positions"
        )
    rp = getattr(cfg, "rope_parameters", None) or {}
    gptj_style = not rp and getattr(cfg, "rotary_dim", "missing") != "missing"
    if not rp and not gptj_style:
        raise ValueError(
            f"model_type={mt!r} ({type(cfg).__name__}) has no rotary position embedding (no `rope_parameters` "
            "in its config)"
        )
    flat = (
        rp if not (hasattr(cfg, "nested_rope_parameter_keys") and cfg.nested_rope_parameter_keys(rp)) else {}
    )
    if "mrope_section" in flat or any(isinstance(v, Mapping) and "mrope_section" in v for v in rp.values()):
        raise ValueError(
            f"model_type={mt!r} is not supported: multimodal RoPE (mrope_section) rotates by 3-D positions"
        )
    no_rope = getattr(cfg, "no_rope_layers", None)
    if no_rope is not None and not all(bool(x) for x in no_rope):
        raise ValueError(
            f"model_type={mt!r} is not supported: layers without RoPE (no_rope_layers={list(no_rope)}) have no "
            "frequency pairs to analyse"
        )
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    layer_types = getattr(cfg, "layer_types", None)
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    softcap = float(softcap) if softcap else None
    qk_rope = getattr(cfg, "qk_rope_head_dim", None)
    qk_nope = getattr(cfg, "qk_nope_head_dim", None)
    layout = "interleaved" if mt in INTERLEAVED_MODEL_TYPES else "half"
    if mt == "deepseek_v3" or (qk_rope and getattr(cfg, "rope_interleave", False)):
        layout = (
            "half"  # interleaved weights, de-interleaved before rotate-half (apply_rotary_pos_emb_interleave)
        )
    layers = []
    for layer in range(n_layers):
        layer_type = str(layer_types[layer]) if layer_types else None
        params = _layer_parameters(cfg, layer_type) if rp else {}
        if qk_rope:  # MLA: [nope | rope]
            head_dim, rotary_dim, offset = int(qk_nope or 0) + int(qk_rope), int(qk_rope), int(qk_nope or 0)
        else:
            head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
            offset = 0
            if gptj_style:
                rotary_dim = int(cfg.rotary_dim or head_dim)
            else:
                partial = params.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
                rotary_dim = int(head_dim * (1.0 if partial is None else float(partial)))
        if rotary_dim < 2 or rotary_dim % 2 or offset + rotary_dim > head_dim:
            raise ValueError(
                f"model_type={mt!r}: rotary width {rotary_dim} (offset {offset}) does not fit head_dim={head_dim}"
            )
        theta = float(params.get("rope_theta", 10000.0))
        from posheads.rope.scaling import PROVENANCE_ATTRIBUTE

        prov = getattr(cfg, PROVENANCE_ATTRIBUTE, None)
        # a posheads scaling records the pre-trained theta (an NTK scaling rewrites rope_theta); flat configs only
        base_theta = float(prov["base_rope_theta"]) if isinstance(prov, Mapping) and flat else theta
        if gptj_style:
            inv = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        else:
            inv = _inv_freq(cfg, params, layer_type, rotary_dim)
        if inv.numel() != rotary_dim // 2:
            raise ValueError(
                f"model_type={mt!r}: the config's RoPE has {inv.numel()} frequencies for a rotary width of "
                f"{rotary_dim} ({rotary_dim // 2} pairs)"
            )
        layers.append(
            LayerRope(
                layer=layer,
                layer_type=layer_type,
                head_dim=head_dim,
                rotary_dim=rotary_dim,
                offset=offset,
                layout=layout,
                rope_theta=base_theta,
                inv_freq=tuple(float(x) for x in inv),
                softcap=softcap,
            )
        )
    return ModelRope(model_type=mt, layers=tuple(layers))


# ---------------------------------------------------------------------------------------- verification


def _rotate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate components ``(a[i], b[i])`` of ``x [..., d]`` by ``angle[i]``: returns ``[..., 2, P]``."""
    xa, xb = x[..., a], x[..., b]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    return torch.stack([xa * cos - xb * sin, xb * cos + xa * sin], dim=-2)


def _shift_error(
    x0: torch.Tensor,
    x1: torch.Tensor,
    layout: str,
    rotary_dim: int,
    offset: int,
    inv_freq: torch.Tensor,
    s: int,
) -> tuple[float, int]:
    """Relative error of ``x1 = R(s omega) x0`` per pair (and of ``x1 = x0`` on the pass-through components,
    reported as pair -1), aggregated over heads and positions: ``sum |x1 - expected| / sum (|x1| + rms)``, so
    rounding noise of 16-bit models averages out while a wrong layout, width or frequency (a systematic
    error of order 1) does not. Returns the worst ``(error, pair)``. ``x0, x1 [..., d]`` float64."""
    d = x0.shape[-1]
    a, b = _pair_components(layout, rotary_dim, offset)
    expect = _rotate(x0, a, b, s * inv_freq.to(x0.device))  # [..., 2, P]
    got = torch.stack([x1[..., a], x1[..., b]], dim=-2)
    scale = x1.norm(dim=-1, keepdim=True).clamp(min=1e-30) / math.sqrt(d)  # [..., 1] rms component
    num = (got - expect).norm(dim=-2).flatten(0, -2).sum(0)  # [P]
    den = (got.norm(dim=-2) + scale).flatten(0, -2).sum(0)
    err = num / den
    worst, pair = float(err.max()), int(err.argmax())
    rotary = torch.zeros(d, dtype=torch.bool)
    rotary[a] = True
    rotary[b] = True
    passing = (~rotary).nonzero().flatten().to(x0.device)
    if passing.numel():
        diff = (x1[..., passing] - x0[..., passing]).abs().flatten(0, -2).sum(0)
        pe = (diff / (x1[..., passing].abs() + scale).flatten(0, -2).sum(0)).max()
        if float(pe) > worst:
            worst, pair = float(pe), -1
    return worst, pair


@contextmanager
def _no_active_hooks(model: nn.Module) -> Iterator[None]:
    """Run a forward without the hooks that an enclosing block installed: the posheads attention hooks and
    the modules' forward (pre-)hooks (head ablation, recorders); all are restored on exit."""
    from collections import OrderedDict

    from posheads.heads import capture

    saved = dict(capture._ACTIVE)
    capture._ACTIVE.clear()
    stashed = []
    for module in model.modules():
        stashed.append((module, module._forward_pre_hooks, module._forward_hooks))
        module._forward_pre_hooks = OrderedDict()
        module._forward_hooks = OrderedDict()
    try:
        yield
    finally:
        for module, pre, post in stashed:
            module._forward_pre_hooks = pre
            module._forward_hooks = post
        capture._ACTIVE.clear()
        capture._ACTIVE.update(saved)


def _decoder(model: nn.Module) -> nn.Module:
    get_base: Any = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, nn.Module):
            return decoder
    return base


def _candidates(head_dim: int, declared: LayerRope) -> Iterator[tuple[str, int, int]]:
    widths = sorted(
        {declared.rotary_dim, head_dim, head_dim // 2, head_dim // 4, head_dim * 3 // 4}, reverse=True
    )
    for layout in PAIR_LAYOUTS:
        for width in widths:
            if width < 2 or width % 2:
                continue
            for offset in sorted({0, head_dim - width}):
                if (layout, width, offset) != (declared.layout, declared.rotary_dim, declared.offset):
                    yield layout, width, offset


@torch.no_grad()
def verify_rope(
    model: nn.Module, rope: ModelRope | None = None, length: int = 8, shift: int | None = None
) -> ModelRope:
    """Check ``rope`` (default :func:`describe_rope` of ``model``) on ``model`` with the position-shift test.

    Runs the decoder twice on ``length`` seeded random tokens (positions ``0..`` and ``shift..``; default shift
    ``min(L - length - 1, 2048)``, ``L`` the smaller of ``max_position_embeddings`` and the original context,
    where every scaling rotates with fixed frequencies) with the posheads capture wrapper and checks every
    layer (module docstring). Tolerance: 1e-3 relative in float32/float64; 0.2 in 16-bit dtypes, whose own rotation at large positions is off by up to ~6 % (a wrong layout or width is off by order 1). Also checks
    that every attention layer goes through the attention interface, that the captured head width is the
    declared one and that the soft-cap the model passes is the declared one. Returns the description marked
    verified; raises ``ValueError`` (one line) otherwise.
    """
    from posheads.heads.capture import capture_qk

    rope = rope if rope is not None else describe_rope(model)
    cfg = _text_config(model)
    mt = rope.model_type
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 0.2
    max_pos = int(
        getattr(cfg, "max_position_embeddings", 0) or getattr(cfg, "n_positions", 0) or 2 * length + 2
    )
    rp = getattr(cfg, "rope_parameters", None) or {}
    top = {"original_max_position_embeddings": getattr(cfg, "original_max_position_embeddings", None)}
    for params in [top, rp, *(v for v in rp.values() if isinstance(v, Mapping))]:
        original = params.get("original_max_position_embeddings")
        if original:  # stay within the original context: LongRoPE switches factors beyond it
            max_pos = min(max_pos, int(original))
    s = shift if shift is not None else max(1, min(max_pos - length - 1, 2048))
    vocab = int(getattr(cfg, "vocab_size", 0) or 2)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(min(vocab, 1000), (1, length), generator=gen).to(device)
    decoder = _decoder(model)
    was_training = model.training
    model.eval()
    captured = []
    try:
        with _no_active_hooks(model):
            for start in (0, s):
                pos = torch.arange(start, start + length, device=device).unsqueeze(0)
                with capture_qk(model) as rec:
                    decoder(input_ids=ids, position_ids=pos)
                captured.append(rec)
    finally:
        model.train(was_training)
    r0, r1 = captured
    worst_all = 0.0
    for layer in rope.layers:
        idx = layer.layer
        if idx not in r0.queries:
            raise ValueError(
                f"model_type={mt!r}: layer {idx} did not call Transformers' attention interface, so its queries "
                "and keys cannot be captured"
            )
        q0, q1 = r0.queries[idx].double(), r1.queries[idx].double()
        k0, k1 = r0.keys[idx].double(), r1.keys[idx].double()
        if q0.shape[-1] != layer.head_dim or k0.shape[-1] != layer.head_dim:
            raise ValueError(
                f"model_type={mt!r}: layer {idx} attends with q/k heads of width {q0.shape[-1]}/{k0.shape[-1]}, "
                f"the config declares head_dim={layer.head_dim}"
            )
        call_softcap = r0.softcaps.get(idx)
        if (call_softcap or None) != layer.softcap:
            raise ValueError(
                f"model_type={mt!r}: layer {idx} passes softcap={call_softcap!r} to the attention, the config "
                f"declares attn_logit_softcapping={layer.softcap!r}"
            )
        if r0.sinks.get(idx):
            raise ValueError(
                f"model_type={mt!r} is not supported: attention sinks (s_aux) in layer {idx} join the softmax"
            )
        inv = torch.tensor(layer.inv_freq, dtype=torch.float64)
        errs = [
            _shift_error(x0, x1, layer.layout, layer.rotary_dim, layer.offset, inv, s)
            for x0, x1 in ((q0, q1), (k0, k1))
        ]
        err, pair = max(errs)
        worst_all = max(worst_all, err)
        if err > tol:
            what = "a pass-through component" if pair < 0 else f"pair {pair}"
            fits = []
            for lay, width, off in _candidates(layer.head_dim, layer):
                alt = _default_freq(layer, width)
                e = max(_shift_error(x0, x1, lay, width, off, alt, s)[0] for x0, x1 in ((q0, q1), (k0, k1)))
                if e <= tol:
                    fits.append(f"layout={lay!r} rotary_dim={width} offset={off}")
            hint = (
                f"; what fits: {fits[0]}" if fits else "; no half/interleaved layout of a standard width fits"
            )
            if all(
                torch.allclose(x0, x1, rtol=tol, atol=tol * float(x0.abs().max()))
                for x0, x1 in ((q0, q1), (k0, k1))
            ):
                hint = "; this layer applies no RoPE at all (its q/k do not move with the position)"
            raise ValueError(
                f"model_type={mt!r}: the declared RoPE ({layer.describe()}) fails the position-shift check "
                f"(shift {s}): {what} is off by {err:.3g} relative (tolerance {tol:g}){hint}"
            )
    return replace(rope, verified=True, shift=s, max_error=worst_all)


def _default_freq(layer: LayerRope, width: int) -> torch.Tensor:
    """Frequencies of an alternative width for the hint (the declared ones when the width matches)."""
    if width == layer.rotary_dim:
        return torch.tensor(layer.inv_freq, dtype=torch.float64)
    theta = layer.rope_theta
    return 1.0 / theta ** (torch.arange(0, width, 2, dtype=torch.float64) / width)


_CACHE_ATTRIBUTE = "_posheads_model_rope"


def _fingerprint(model: nn.Module) -> str:
    cfg = _text_config(model)
    param = next(model.parameters())
    from posheads.rope.scaling import PROVENANCE_ATTRIBUTE

    return repr(
        (
            getattr(cfg, "rope_parameters", None),
            getattr(cfg, "rotary_dim", None),
            getattr(cfg, PROVENANCE_ATTRIBUTE, None),
            getattr(cfg, "max_position_embeddings", None),
            param.dtype,
        )
    )


def model_rope(model: nn.Module, verify: bool = True) -> ModelRope:
    """The (verified) RoPE description of ``model``, cached on the model until its RoPE config changes.

    Verification is skipped for models whose parameters are sharded (FSDP: a forward on one rank would
    deadlock) or on the meta device; the description is then the config's, marked ``verified=False``.
    """
    get_base: Any = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    key = _fingerprint(base)
    cached = getattr(base, _CACHE_ATTRIBUTE, None)
    if cached is not None and cached[0] == key and (cached[1].verified or not verify):
        return cached[1]
    rope = describe_rope(base)
    param = next(base.parameters())
    sharded = type(param).__name__ in ("DTensor", "FlatParameter") or param.device.type == "meta"
    if verify and not sharded:
        rope = verify_rope(model, rope)
    object.__setattr__(base, _CACHE_ATTRIBUTE, (key, rope))
    return rope
