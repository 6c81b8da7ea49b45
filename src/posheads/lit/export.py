"""Exporting the trained model as a plain Transformers directory (and LoRA adapters in peft format).

The final directory is what evaluation and later stages load with ``ModelConfig(name_or_path=<dir>)``: weights,
``config.json`` (its ``rope_parameters`` carry the RoPE scaling the model was trained with, and
``max_position_embeddings`` the extended length), the tokenizer, and ``posheads_training.json`` (how it was
trained). A LoRA model is merged first -- ``W + (alpha / r) B A`` per adapted linear layer (Hu et al. 2021,
arXiv 2106.09685) -- so the directory needs neither peft nor the base model.

Under FSDP the full state dict is gathered to rank 0 first (CPU offload); every rank must call
:func:`full_state_dict`, only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from posheads.models import base_model
from posheads.models.loading import DTYPES

log = logging.getLogger(__name__)

__all__ = ["HFExport", "export_pretrained", "full_state_dict", "lora_layers", "merge_lora_state_dict"]

_PEFT_PREFIX = "base_model.model."


def full_state_dict(module: LightningModule) -> dict[str, torch.Tensor] | None:
    """The state dict of ``module.model`` (keys as in ``module.model.state_dict()``), detached, on the CPU.

    Under Lightning's ``FSDPStrategy`` the full state dict is gathered (collective: call on every rank) and
    only rank 0 receives it; other ranks get ``None``.
    """
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if strategy is not None and type(strategy).__name__ == "FSDPStrategy":
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        wrapped: Any = strategy.model
        with FSDP.state_dict_type(wrapped, StateDictType.FULL_STATE_DICT, config):
            state = wrapped.state_dict()  # keys of the LightningModule: "model.<...>"
        if cast(Any, strategy).global_rank != 0:
            return None
        return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    model: Any = module.model
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def lora_layers(model: nn.Module) -> dict[str, tuple[str, float, bool]]:
    """``{qualified module name: (adapter name, scaling, fan_in_fan_out)}`` of every active LoRA layer of a
    peft model (names as in ``model.state_dict()`` without the parameter suffix)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            adapters = list(getattr(m, "active_adapters", []) or [])
            if len(adapters) != 1:
                raise ValueError(
                    f"LoRA layer {name} has active adapters {adapters}; merging needs exactly one"
                )
            adapter = adapters[0]
            if getattr(m, "use_dora", {}).get(adapter, False):
                raise ValueError(
                    f"LoRA layer {name} uses DoRA, which merge_lora_state_dict does not implement"
                )
            out[name] = (adapter, float(m.scaling[adapter]), bool(getattr(m, "fan_in_fan_out", False)))
    return out


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], layers: dict[str, tuple[str, float, bool]]
) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict merged into the plain base model's state dict.

    For every LoRA layer ``n``: ``W = base_layer.weight + scaling * (lora_B @ lora_A)`` (transposed for
    ``fan_in_fan_out`` layers), computed in float32 and cast back. Keys lose the ``base_model.model.`` prefix
    and the ``.base_layer`` infix; adapter tensors are dropped.
    """
    merged: dict[str, torch.Tensor] = {}
    consumed: set[str] = set()
    for name, (adapter, scaling, fan_in_fan_out) in layers.items():
        w_key = f"{name}.base_layer.weight"
        a_key, b_key = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
        missing = [k for k in (w_key, a_key, b_key) if k not in state]
        if missing:
            raise KeyError(f"merge_lora_state_dict: {missing} missing from the state dict")
        w, a, b = state[w_key], state[a_key], state[b_key]  # [out, in], [r, in], [out, r]
        delta = b.float() @ a.float()  # [out, in]
        if fan_in_fan_out:
            delta = delta.T
        merged[_plain_key(w_key)] = (w.float() + scaling * delta).to(w.dtype)
        consumed.update((w_key, a_key, b_key))
    for key, value in state.items():
        if key in consumed:
            continue
        if ".lora_" in key:
            raise ValueError(f"merge_lora_state_dict: adapter tensor {key!r} belongs to no known LoRA layer")
        merged[_plain_key(key)] = value
    return merged


def _plain_key(key: str) -> str:
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    return key.replace(".base_layer.", ".")


def _save_plain(config: Any, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Build the plain model class of ``config`` on the meta device, assign ``state`` and ``save_pretrained``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])
    missing = [
        k
        for k in missing
        if k not in tied and not (getattr(config, "tie_word_embeddings", False) and k == "lm_head.weight")
    ]
    if missing or unexpected:
        raise ValueError(
            f"exported state dict does not fit {type(plain).__name__}: missing {missing}, unexpected {unexpected}"
        )
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.save_pretrained(directory)


def export_pretrained(
    module: LightningModule,
    directory: str | os.PathLike,
    lora_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    info: dict[str, Any] | None = None,
) -> Path | None:
    """Write ``module.model`` as a plain Transformers directory (+ tokenizer + ``posheads_training.json``).

    LoRA models are merged (:func:`merge_lora_state_dict`); with ``lora_dir`` their adapters are also saved in
    peft format there. ``dtype`` casts floating-point weights. Collective under FSDP (call on every rank); the
    files are written by rank 0 only, which returns the directory (other ranks ``None``).
    """
    state = full_state_dict(module)
    if state is None:
        return None
    trainer = module._trainer
    if trainer is not None and trainer.global_rank != 0:
        return None
    directory = Path(directory)
    model: Any = module.model
    hf = base_model(model)
    config = copy.deepcopy(hf.config)
    is_peft = hf is not model
    if is_peft:
        if lora_dir is not None:
            model.save_pretrained(str(lora_dir), state_dict=state)
            cast(Any, module).tokenizer.save_pretrained(str(lora_dir))
            _write_info(Path(lora_dir), info)
        state = merge_lora_state_dict(state, lora_layers(model))
    if dtype is not None:
        torch_dtype = DTYPES[dtype]
        state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in state.items()}
        config.dtype = torch_dtype
    directory.mkdir(parents=True, exist_ok=True)
    _save_plain(config, state, directory)
    cast(Any, module).tokenizer.save_pretrained(str(directory))
    _write_info(directory, info)
    log.info("exported the trained model to %s", directory)
    return directory


def _write_info(directory: Path, info: dict[str, Any] | None) -> None:
    if info is not None:
        (directory / "posheads_training.json").write_text(json.dumps(info, indent=2, default=str) + "\n")


class HFExport(Callback):
    """At the end of training, export the model with :func:`export_pretrained` (all ranks take part, rank 0
    writes, the others wait)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        lora_dir: str | os.PathLike | None = None,
        dtype: str | None = None,
    ):
        self.directory = Path(directory)
        self.lora_dir = Path(lora_dir) if lora_dir is not None else None
        self.dtype = dtype
        self.exported: Path | None = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        info = {
            **cast(Any, pl_module).describe(),
            "global_step": trainer.global_step,
            "tokens_seen": getattr(pl_module, "_tokens_seen", None),
        }
        rope = getattr(pl_module, "rope", None)
        info["rope"] = rope.to_dict() if rope is not None else None
        lora_dir = self.lora_dir if getattr(pl_module, "is_lora", False) else None
        self.exported = export_pretrained(
            pl_module, self.directory, lora_dir=lora_dir, dtype=self.dtype, info=info
        )
        trainer.strategy.barrier("posheads-export")
