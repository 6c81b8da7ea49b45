"""AdamW with weight-decay groups and a warm-up + cosine / linear / constant learning-rate schedule (pure PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from posheads.lit.config import LR_SCHEDULES, OptimConfig

__all__ = ["LRSchedule", "build_optimizer", "build_scheduler", "decays", "param_groups"]


@dataclass
class LRSchedule:
    """The learning-rate multiplier ``m(step)`` of :class:`~posheads.lit.config.OptimConfig` (see its docstring).

    A dataclass rather than a closure so that ``LambdaLR.state_dict()`` stores its fields (plain numbers) and a
    checkpoint can be loaded with ``torch.load(weights_only=True)``.
    """

    warmup_steps: int
    total_steps: int
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {list(LR_SCHEDULES)}")
        if self.total_steps < 1:
            raise ValueError(f"optim.total_steps={self.total_steps!r} must be >= 1")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        r = self.min_lr_ratio
        if self.schedule == "cosine":
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - r) * progress  # linear


def decays(name: str) -> bool:
    """Whether parameter ``name`` gets weight decay: weight matrices yes; biases and normalisation weights no.

    Decided from the name only (not ``param.ndim``), so that the grouping is the same on every rank when FSDP
    has flattened and sharded the parameters.
    """
    leaf = name.lower()
    if leaf.endswith(".bias") or leaf == "bias":
        return False
    parts = leaf.split(".")
    return not any("norm" in p or p in ("ln_f", "ln_1", "ln_2") for p in parts)


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW groups over the parameters that require gradients: with and without weight decay."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named_params:
        if p.requires_grad:
            (decay if decays(name) else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no parameter that requires gradients: nothing to train")
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused kernel when ``cfg.fused`` (auto: CPU or CUDA float params)."""
    groups = param_groups(named_params, cfg.weight_decay)
    fused = cfg.fused
    if fused is None:
        params = [p for g in groups for p in g["params"]]
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        # the fused kernel needs plain tensors (not DTensor shards); be conservative with subclasses
        fused = fused and all(type(p) is nn.Parameter for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])), eps=cfg.eps, fused=bool(fused)
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepping :class:`LRSchedule` once per optimizer step."""
    schedule = LRSchedule(cfg.warmup_steps, int(total_steps), cfg.schedule, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
