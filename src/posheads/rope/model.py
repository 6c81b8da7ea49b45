"""Applying a RoPE scaling to an already built model, and reading back the frequencies a model uses.

A Transformers rotary-embedding module (``LlamaRotaryEmbedding`` and its copies in every RoPE model)
computes ``inv_freq`` and ``attention_scaling`` once, in ``__init__``, from ``config.rope_parameters``;
dynamic NTK and LongRoPE additionally cache state between forwards (``max_seq_len_cached``,
``original_inv_freq``, ``long_inv_freq``). Changing the config of a loaded model therefore changes nothing
until every such module is rebuilt, which :func:`apply_rope_scaling_to_model` does in place.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .scaling import RopeScaling, _model_type, apply_rope_scaling, rope_config, rope_head_dim

__all__ = ["apply_rope_scaling_to_model", "model_inverse_frequencies", "rotary_embedding_modules"]


def _is_rotary_embedding(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return (
        isinstance(getattr(module, "inv_freq", None), torch.Tensor)
        and hasattr(module, "rope_type")
        and config is not None
        and bool(getattr(config, "rope_parameters", None))
    )


def rotary_embedding_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every rotary-embedding module in ``model`` (also inside a peft wrapper):
    modules with an ``inv_freq`` tensor, a ``rope_type`` and a config with ``rope_parameters``."""
    return [(name, m) for name, m in model.named_modules() if _is_rotary_embedding(m)]


def _no_rope_error(model: nn.Module) -> ValueError:
    config = getattr(model, "config", None)
    if config is not None:
        try:
            rope_config(config)  # raises the "model_type=... has no rotary position embedding" error
        except ValueError as err:
            return err
    return ValueError(
        f"{type(model).__name__} (model_type={_model_type(config)!r}) has no rotary-embedding module "
        "(a module with an `inv_freq` buffer, a `rope_type` and a RoPE config)"
    )


def _rebuild(module: nn.Module) -> nn.Module:
    """A fresh instance of ``module``'s class built from its (updated) config, on the CPU."""
    cls = type(module)
    try:
        return cls(config=module.config)
    except TypeError:
        return cls(module.config)


def _reinit_in_place(module: nn.Module) -> None:
    """Give ``module`` the buffers and state of a freshly built instance; keep its device (buffers float32),
    its identity and its hooks, and drop caches the fresh instance does not have (e.g. ``long_inv_freq``)."""
    inv_freq: torch.Tensor = module.inv_freq  # type: ignore[assignment]
    device = inv_freq.device
    if device.type == "meta":
        device = torch.device("cpu")
    fresh = _rebuild(module)
    for name, buf in fresh.named_buffers(recurse=False):
        value = buf.to(device=device, dtype=torch.float32) if buf.is_floating_point() else buf.to(device)
        module.register_buffer(name, value, persistent=name not in fresh._non_persistent_buffers_set)
    for name in list(module._buffers):
        if name not in fresh._buffers:
            del module._buffers[name]
            module._non_persistent_buffers_set.discard(name)
    state = {k: v for k, v in vars(fresh).items() if not k.startswith("_") and k != "training"}
    for key, value in list(vars(module).items()):
        stale_cache = isinstance(value, torch.Tensor) or key.endswith("max_seq_len_cached")
        if not key.startswith("_") and key not in state and stale_cache:
            delattr(module, key)
    for key, value in state.items():
        setattr(module, key, value)


def apply_rope_scaling_to_model(model: nn.Module, scaling: RopeScaling) -> nn.Module:
    """Apply ``scaling`` to a built or loaded model (plain or peft-wrapped), in place, and return it.

    Every config the model's rotary-embedding modules read (normally the one ``model.config``) gets
    :func:`~posheads.rope.apply_rope_scaling`; every rotary-embedding module is then rebuilt in place from it
    (same module object and device, ``inv_freq`` in float32, dynamic / LongRoPE caches reset), so the next
    forward uses the new scaling, exactly as a model built from the scaled config with the same weights.
    Applying a second scaling replaces the first (both start from the pre-trained RoPE).
    """
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    modules = rotary_embedding_modules(model)
    if not modules:
        raise _no_rope_error(model)

    configs: dict[int, Any] = {}
    top = getattr(model, "config", None)
    if top is not None:
        try:
            cfg = rope_config(top)
            configs[id(cfg)] = cfg
        except ValueError:
            pass
    for _, module in modules:
        cfg = rope_config(module.config)
        configs[id(cfg)] = cfg
    for cfg in configs.values():
        apply_rope_scaling(cfg, scaling)
    for _, module in modules:
        _reinit_in_place(module)
    return model


def _config_frequencies(config: Any, seq_len: int | None) -> tuple[torch.Tensor, float]:
    cfg = rope_config(config)
    rope_type = cfg.rope_parameters.get("rope_type", cfg.rope_parameters.get("type", "default"))
    if rope_type == "default":
        dim = rope_head_dim(cfg)
        base = cfg.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))  # [dim/2]
        return inv_freq, 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"rope_parameters['rope_type']={rope_type!r} is not in Transformers' ROPE_INIT_FUNCTIONS"
        )
    length: Any = seq_len
    if rope_type == "dynamic":
        # the model recomputes only when the sequence outgrows max_position_embeddings, with a tensor length
        length = (
            torch.tensor(seq_len) if seq_len is not None and seq_len > cfg.max_position_embeddings else None
        )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len=length)
    return inv_freq, float(attention_factor)


def model_inverse_frequencies(model_or_config: Any, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [rotary_dim/2] float32 on CPU, attention_factor)`` that the model uses for a sequence of
    ``seq_len`` tokens (``None``: a sequence within the original context).

    For a model this runs (a copy of) its first rotary-embedding module on one position ``seq_len - 1``, so
    dynamic NTK and LongRoPE switch exactly as in the model's forward; the model itself is not touched. For
    a config it calls the same Transformers init function the model would. ``attention_factor`` is what
    ``cos`` and ``sin`` are multiplied by (YaRN, LongRoPE), so attention logits scale by its square.
    """
    if seq_len is not None and (not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1):
        raise ValueError(f"seq_len={seq_len!r} must be a positive int or None")
    if not isinstance(model_or_config, nn.Module):
        return _config_frequencies(model_or_config, seq_len)

    modules = rotary_embedding_modules(model_or_config)
    if not modules:
        raise _no_rope_error(model_or_config)
    module = modules[0][1]
    probe = copy.deepcopy(module, memo={id(module.config): module.config})
    probe_inv_freq: torch.Tensor = probe.inv_freq  # type: ignore[assignment]
    device = probe_inv_freq.device
    x = torch.zeros(1, dtype=torch.float32, device=device)
    position_ids = torch.tensor([[(1 if seq_len is None else seq_len) - 1]], device=device)  # [1, 1]
    with torch.no_grad():
        try:
            probe(x, position_ids)
        except Exception:
            if seq_len is not None:
                raise
    inv_freq: torch.Tensor = probe.inv_freq  # type: ignore[assignment]  # forward may have replaced it
    attention_factor = float(probe.attention_scaling)  # type: ignore[arg-type]
    return inv_freq.detach().to(device="cpu", dtype=torch.float32).clone(), attention_factor
