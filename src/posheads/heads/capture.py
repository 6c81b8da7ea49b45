"""Capture of post-RoPE queries and keys from the model's own attention computation.

Transformers dispatches every attention layer through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the *already rotated* query and key (``q~ = R_m q``, ``k~ = R_n k``, including any RoPE scaling: PI,
NTK, YaRN with its attention factor folded into cos/sin, ...) and ``module.layer_idx``. We register, at import
time, one wrapper per real implementation under the name ``"posheads+<impl>"`` (``posheads+sdpa``,
``posheads+eager``, ...). The wrapper runs the hooks that are active for that attention module and then
delegates to the real implementation, so attention itself is unchanged. The matching mask function is
registered under the same name with :class:`transformers.masking_utils.AttentionMaskInterface` -- without it
``create_causal_mask`` early-exits and padding masks silently arrive as ``None``.

Registration at import time matters for multi-process training: spawned DDP workers import this module
(through ``posheads.heads``) and see the same registry.

Hooks are scoped: :func:`attention_hooks` swaps ``config._attn_implementation`` to the wrapper for the
duration of a ``with`` block and restores it (and removes the hooks) on exit, even on exception. Nested blocks
(e.g. an ablation inside a statistics pass) compose; hooks run in registration order and each may replace the
query seen by the next hook and by the real attention.

Pair layout: Hugging Face's rotate-half convention pairs component ``i`` with ``i + d/2``
(:func:`pair_contributions`); interleaved checkpoints pair ``2i, 2i+1`` (``layout="interleaved"``). Partial-rotary
and MLA models have pass-through components besides the pairs: :mod:`posheads.rope.layout` describes (and
verifies) where the pairs of every layer are, and :func:`pair_contributions` accepts that description.

Attention modules are found by structure: a submodule with an integer ``layer_idx``, a ``config`` and an output
projection (:func:`output_projection`: the linear layer that maps the concatenated head outputs back to the
hidden size -- ``o_proj``, ``dense``, ``out_proj``, ... whatever its name).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = [
    "WRAPPED_PREFIX",
    "SUPPORTED_IMPLEMENTATIONS",
    "AttentionCall",
    "AttentionHook",
    "QKRecorder",
    "attention_modules",
    "attention_hooks",
    "capture_qk",
    "content_contribution",
    "head_output_width",
    "output_projection",
    "pair_contributions",
    "to_half_layout",
]

WRAPPED_PREFIX = "posheads+"
SUPPORTED_IMPLEMENTATIONS = (
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
)
PAIR_LAYOUTS = ("half", "interleaved")


@dataclass
class AttentionCall:
    """What one attention layer hands to the attention implementation (shapes as Transformers passes them).

    Attributes:
        layer_idx: the decoder layer.
        query: post-RoPE queries ``[B, H, Lq, d]``.
        key: post-RoPE keys ``[B, H_kv, Lk, d]`` (GQA: query head ``h`` reads key head ``h // (H / H_kv)``).
        attention_mask: ``None`` (pure causal), a boolean ``[B, 1, Lq, Lk]`` mask (True = may attend) or an
            additive float mask (0 = may attend), whichever the implementation's mask function built.
        scaling: the logit scale (``1/sqrt(d)`` for Llama, ``query_pre_attn_scalar ** -0.5`` for Gemma 2/3,
            ``attention_multiplier`` for Granite, the YaRN ``mscale`` for DeepSeek).
        softcap: the ``tanh`` logit soft-cap the model passes (Gemma 2), ``None`` if none.
        sinks: the per-head attention-sink logits the model passes (``s_aux``), ``None`` if none.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    attention_mask: torch.Tensor | None
    scaling: float
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the model's soft-cap to scaled logits ``q . k * scaling`` (identity without one)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap

    @property
    def num_key_value_groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def allowed_rows(self, batch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N, Lk]``: which keys query ``pos[j]`` of sequence ``batch[j]`` may attend to.

        Only the requested rows are built (never an ``L x L`` mask when the mask is implicit, i.e. ``None``).
        Handles the 4D masks of sdpa/eager and the 2D padding masks of the flash implementations.
        """
        lq, lk = self.query.shape[2], self.key.shape[2]
        k_pos = torch.arange(lk, device=pos.device)
        causal = k_pos[None, :] <= (pos + (lk - lq))[:, None]  # queries are the last lq positions
        mask = self._mask_tensor()
        if mask is None:
            return causal
        b = batch if mask.shape[0] > 1 else torch.zeros_like(batch)
        if mask.dim() == 2:  # [B, Lk] padding mask (1 = token)
            return causal & mask_allowed(mask)[b]
        return mask_allowed(mask[b, 0, pos])

    def query_valid(self) -> torch.Tensor:
        """Boolean ``[B, Lq]``: queries that may attend to themselves (i.e. not padding)."""
        bsz, _, lq, _ = self.query.shape
        lk = self.key.shape[2]
        mask = self._mask_tensor()
        if mask is None:
            return torch.ones(bsz, lq, dtype=torch.bool, device=self.query.device)
        if mask.dim() == 2:
            return mask_allowed(mask[:, lk - lq :]).expand(bsz, lq)
        diag = torch.diagonal(mask[:, 0, :, lk - lq :], dim1=-2, dim2=-1)  # [B or 1, Lq]
        return mask_allowed(diag).expand(bsz, lq)

    def _mask_tensor(self) -> torch.Tensor | None:
        mask = self.attention_mask
        if mask is not None and not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"attention mask of type {type(mask).__name__} (flex attention) is not supported by the statistics; "
                "run the analysis with attn_implementation='sdpa' or 'eager'"
            )
        return mask


def mask_allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean view of a Transformers attention mask (bool: True = attend; float: additive, 0 = attend;
    integer: a 2D padding mask, 1 = token)."""
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    return mask > torch.finfo(mask.dtype).min / 2


class AttentionHook(Protocol):
    """Called with the attention module and the call; may return a replacement query ``[B, H, Lq, d]``."""

    def __call__(self, module: nn.Module, call: AttentionCall) -> torch.Tensor | None: ...


# id(attention module) -> hooks active on it, in registration order
_ACTIVE: dict[int, list[AttentionHook]] = {}


def _generic_eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's eager attention, used only if the model's modeling file defines no ``eager_attention_forward``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, H, Lq, Lk]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, Lq, H, d]
    return out, weights


def _base_function(base: str, module: nn.Module) -> Callable[..., Any]:
    if base == "eager":
        modeling = sys.modules.get(type(module).__module__)
        return getattr(modeling, "eager_attention_forward", _generic_eager)
    return ALL_ATTENTION_FUNCTIONS[base]


def _make_wrapper(base: str) -> Callable[..., Any]:
    def attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        hooks = _ACTIVE.get(id(module))
        if hooks:
            scaling = kwargs.get("scaling")
            if scaling is None:
                scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
            layer_idx = int(getattr(module, "layer_idx", -1))
            softcap = kwargs.get("softcap")
            softcap = float(softcap) if softcap else None
            sinks = kwargs.get("s_aux")
            for hook in list(hooks):
                call = AttentionCall(layer_idx, query, key, attention_mask, float(scaling), softcap, sinks)
                replaced = hook(module, call)
                if replaced is not None:
                    if replaced.shape != query.shape:
                        raise ValueError(
                            f"attention hook {hook!r} returned a query of shape {tuple(replaced.shape)}, "
                            f"expected {tuple(query.shape)}"
                        )
                    query = replaced
        return _base_function(base, module)(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"posheads_{base}_attention"
    attention.__qualname__ = attention.__name__
    return attention


def _register() -> None:
    """Register the wrappers and their mask functions (idempotent; runs at import)."""
    masks = AttentionMaskInterface._global_mapping
    for base in SUPPORTED_IMPLEMENTATIONS:
        name = WRAPPED_PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_wrapper(base))
        if base in masks and name not in masks:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


_register()


# ------------------------------------------------------------------------------------------- module lookup


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else model


def _features(layer: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a linear layer (also a peft-wrapped one), else ``None``."""
    base = getattr(layer, "base_layer", layer)
    fin, fout = getattr(base, "in_features", None), getattr(base, "out_features", None)
    if (
        isinstance(fin, int)
        and isinstance(fout, int)
        and isinstance(getattr(base, "weight", None), torch.Tensor)
    ):
        return fin, fout
    return None


def output_projection(module: nn.Module) -> nn.Module | None:
    """The output projection of an attention module, found by structure: among its direct children that are
    linear layers mapping ``num_attention_heads * w`` features (``w`` = a per-head width) to
    ``hidden_size``, the last one registered (Transformers defines the output projection after the q/k/v
    projections: Llama ``o_proj``, GPT-NeoX / Persimmon / Phi ``dense``, GPT-J ``out_proj``). ``None`` if none.
    """
    cfg = getattr(module, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(hidden, int) or not isinstance(heads, int):
        return None
    found = None
    for child in module.children():
        feats = _features(child)
        if feats is not None and feats[1] == hidden and feats[0] % heads == 0:
            found = child
    return found


def head_output_width(module: nn.Module) -> int:
    """Per-head width of the input of the output projection (the value head width; ``v_head_dim`` for MLA)."""
    proj = output_projection(module)
    feats = None if proj is None else _features(proj)
    if feats is None:
        raise ValueError(f"{type(module).__name__} has no output projection")
    config: Any = module.config
    return feats[0] // int(config.num_attention_heads)


def attention_modules(model: nn.Module) -> dict[int, Any]:
    """``{layer_idx: attention module}`` of a (possibly peft-wrapped) decoder model.

    An attention module is any submodule with an integer ``layer_idx``, a ``config`` and an output projection
    (:func:`output_projection`), whatever the projection is called.
    """
    found: dict[int, nn.Module] = {}
    for module in _base_model(model).modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and hasattr(module, "config") and output_projection(module) is not None:
            if idx in found and found[idx] is not module:
                raise ValueError(f"two attention modules claim layer_idx={idx}")
            found[idx] = module
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules (a module with `layer_idx`, a config and an "
            "output projection to hidden_size)"
        )
    return dict(sorted(found.items()))


def _configs(model: nn.Module, modules: Mapping[int, nn.Module]) -> list[Any]:
    seen: dict[int, Any] = {}
    base = _base_model(model)
    for obj in [base, *modules.values()]:
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextmanager
def _wrapped_attention(model: nn.Module, modules: Mapping[int, nn.Module]) -> Iterator[None]:
    """Switch every config of ``model`` to the ``posheads+`` wrapper of its implementation; restore on exit."""
    saved: list[tuple[Any, Any]] = []
    try:
        for cfg in _configs(model, modules):
            current = cfg._attn_implementation
            saved.append((cfg, current))
            if isinstance(current, str) and current.startswith(WRAPPED_PREFIX):
                continue  # already wrapped by an enclosing block
            base = "eager" if current is None else current
            if base not in SUPPORTED_IMPLEMENTATIONS:
                raise ValueError(
                    f"attn_implementation={current!r} is not one of {list(SUPPORTED_IMPLEMENTATIONS)}; "
                    "q/k capture and ablation need one of them"
                )
            cfg._attn_implementation = WRAPPED_PREFIX + base
        yield
    finally:
        for cfg, value in reversed(saved):
            cfg._attn_implementation = value


@contextmanager
def attention_hooks(
    model: nn.Module, hooks: AttentionHook | Mapping[int, AttentionHook], layers: list[int] | None = None
) -> Iterator[dict[int, nn.Module]]:
    """Run ``hooks`` inside every (or the chosen) attention layer for the duration of the block.

    Args:
        model: a Transformers decoder model, possibly wrapped by peft.
        hooks: one hook for every layer, or ``{layer_idx: hook}``.
        layers: restrict a single hook to these layers.

    Yields ``{layer_idx: attention module}``. On exit (normal or exception) the hooks are removed and every
    ``config._attn_implementation`` is restored.
    """
    modules = attention_modules(model)
    if isinstance(hooks, Mapping):
        per_layer = dict(hooks)
    else:
        chosen = list(modules) if layers is None else list(layers)
        per_layer = dict.fromkeys(chosen, hooks)
    unknown = sorted(set(per_layer) - set(modules))
    if unknown:
        raise ValueError(f"layers={unknown} out of range: the model has layers 0..{max(modules)}")
    installed: list[tuple[int, AttentionHook]] = []
    with _wrapped_attention(model, modules):
        try:
            for idx, hook in per_layer.items():
                key = id(modules[idx])
                _ACTIVE.setdefault(key, []).append(hook)
                installed.append((key, hook))
            yield modules
        finally:
            for key, hook in reversed(installed):
                active = _ACTIVE.get(key, [])
                for j in range(len(active) - 1, -1, -1):
                    if active[j] is hook:
                        del active[j]
                        break
                if not active:
                    _ACTIVE.pop(key, None)


# -------------------------------------------------------------------------------------------- recording


def to_half_layout(x: torch.Tensor, layout: Any = "half") -> torch.Tensor:
    """Reorder the last dim so that pair ``i`` is components ``(i, i + P)`` (identity for ``"half"``).

    ``layout`` is ``"half"``, ``"interleaved"`` (the whole head is rotary) or a
    :class:`posheads.rope.layout.LayerRope`, whose order puts the ``2P`` rotary components first (pairs
    ``(i, i + P)``) and the pass-through components after them.
    """
    if not isinstance(layout, str):
        return x.index_select(-1, layout.order().to(x.device))
    if layout == "half":
        return x
    if layout != "interleaved":
        raise ValueError(f"layout={layout!r} is not one of {list(PAIR_LAYOUTS)}")
    d = x.shape[-1]
    order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]).to(x.device)
    return x.index_select(-1, order)


def pair_contributions(q: torch.Tensor, k: torch.Tensor, layout: Any = "half") -> torch.Tensor:
    """Per-pair logit contributions ``g_i = q~[a_i] k~[a_i] + q~[b_i] k~[b_i]``.

    ``q`` and ``k`` broadcast against each other with last dim ``d``. With a string layout the whole head is
    rotary: the result has last dim ``d/2`` and ``g.sum(-1) == (q * k).sum(-1)``, the unscaled logit. With a
    :class:`~posheads.rope.layout.LayerRope` the result has last dim ``P`` (its pairs) and
    ``g.sum(-1) + content_contribution(q, k, rope) == (q * k).sum(-1)``.
    """
    q, k = to_half_layout(q, layout), to_half_layout(k, layout)
    half = q.shape[-1] // 2 if isinstance(layout, str) else layout.num_pairs
    return q[..., :half] * k[..., :half] + q[..., half : 2 * half] * k[..., half : 2 * half]  # [..., P]


def content_contribution(q: torch.Tensor, k: torch.Tensor, rope: Any) -> torch.Tensor:
    """The logit contribution of the pass-through (non-rotary) components of ``rope`` (a ``LayerRope``)."""
    idx = rope.pass_components().to(q.device)
    return (q.index_select(-1, idx) * k.index_select(-1, idx)).sum(-1)


@dataclass
class QKRecorder:
    """Keeps (detached copies of) the post-RoPE query and key of every call, per layer. For small inputs."""

    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, L, d]
    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H_kv, L, d]
    masks: dict[int, torch.Tensor | None] = field(default_factory=dict)
    scalings: dict[int, float] = field(default_factory=dict)
    softcaps: dict[int, float | None] = field(default_factory=dict)
    sinks: dict[int, bool] = field(default_factory=dict)

    def __call__(self, module: nn.Module, call: AttentionCall) -> None:
        self.softcaps[call.layer_idx] = call.softcap
        self.sinks[call.layer_idx] = call.sinks is not None
        self.queries[call.layer_idx] = call.query.detach().clone()
        self.keys[call.layer_idx] = call.key.detach().clone()
        self.masks[call.layer_idx] = (
            None if call.attention_mask is None else call.attention_mask.detach().clone()
        )
        self.scalings[call.layer_idx] = call.scaling


@contextmanager
def capture_qk(model: nn.Module, layers: list[int] | None = None) -> Iterator[QKRecorder]:
    """``with capture_qk(model) as rec: model(ids)`` then ``rec.queries[layer]`` / ``rec.keys[layer]``."""
    recorder = QKRecorder()
    with attention_hooks(model, recorder, layers=layers):
        yield recorder
