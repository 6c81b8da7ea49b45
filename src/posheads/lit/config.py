"""Typed, validated settings of a training run that are not the model's or the data's.

Each dataclass is a top-level section of a training config (``python train.py --config x.yaml``):

* ``run``        -- :class:`RunConfig`: where the run directory is.
* ``wandb``      -- :class:`WandbConfig`: Weights & Biases (off unless ``project`` is set).
* ``checkpoint`` -- :class:`CheckpointConfig`: periodic and last Lightning checkpoints.
* ``export``     -- :class:`ExportConfig`: the final Transformers directory (and LoRA adapters).
* ``report``     -- :class:`ReportConfig`: perplexity before / after fine-tuning, printed with its protocol.

The optimiser settings (:class:`OptimConfig`) are an init argument of the LightningModule (``model.optim``).
Errors name the option as it is written in a config (``optim.lr=-1.0 must be > 0``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LR_SCHEDULES",
    "WANDB_MODES",
    "CheckpointConfig",
    "ExportConfig",
    "OptimConfig",
    "ReportConfig",
    "RunConfig",
    "WandbConfig",
]

#: ``optim.schedule`` values (after the linear warm-up).
LR_SCHEDULES = ("cosine", "linear", "constant")
#: ``wandb.mode`` values; ``auto`` = online when an API key and the network are there, else offline.
WANDB_MODES = ("auto", "online", "offline", "disabled")


def _finite(name: str, value: float, low: float | None = None, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name}={value!r} must be {'>' if low_open else '>='} {low}")
    return float(value)


def _int(name: str, value: int | None, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}" + (" or None" if allow_none else ""))


@dataclass
class OptimConfig:
    """AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) with a linear warm-up and a decay schedule.

    The learning rate at optimizer step ``t`` (0-based) is ``lr * m(t)`` with ``m(t) = (t + 1) / warmup_steps``
    during warm-up, then, with ``p = (t - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1],
    ``cosine``: ``r + (1 - r) (1 + cos(pi p)) / 2``; ``linear``: ``1 - (1 - r) p``; ``constant``: 1, where
    ``r = min_lr_ratio``.

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay, applied to weight matrices only (not to biases, norms).
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warm-up.
        schedule: decay after warm-up: cosine | linear | constant.
        min_lr_ratio: final learning rate as a fraction of ``lr`` (cosine and linear).
        total_steps: optimizer steps the schedule spans; ``None`` = the trainer's estimate
            (``trainer.max_steps``, or epochs x batches / accumulation).
        fused: use the fused AdamW kernel; ``None`` = when the parameters' device supports it and the
            precision is not mixed (Lightning's mixed-precision plugin cannot clip gradients of a fused optimizer).

    On resume (``--ckpt_path``) the schedule saved in the checkpoint continues unchanged.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    total_steps: int | None = None
    fused: bool | None = None

    def __post_init__(self) -> None:
        self.lr = _finite("optim.lr", self.lr, 0.0, low_open=True)
        self.weight_decay = _finite("optim.weight_decay", self.weight_decay, 0.0)
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= _finite("optim.betas", b) < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas!r} must be two numbers in [0, 1)")
        self.eps = _finite("optim.eps", self.eps, 0.0, low_open=True)
        _int("optim.warmup_steps", self.warmup_steps, 0)
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r} is not one of {list(LR_SCHEDULES)}")
        self.min_lr_ratio = _finite("optim.min_lr_ratio", self.min_lr_ratio, 0.0)
        if self.min_lr_ratio > 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        _int("optim.total_steps", self.total_steps, 1, allow_none=True)


@dataclass
class RunConfig:
    """Where a run writes: ``<output_dir>/<name>/`` holds ``config.yaml`` (the resolved config),
    ``checkpoints/`` (Lightning checkpoints, ``last.ckpt``), ``csv/`` (metrics), ``wandb/``, ``final/`` (the
    exported Transformers model), ``lora_adapter/`` (peft adapters, LoRA runs) and ``report.json``.

    Attributes:
        output_dir: parent directory of all runs (relative paths are relative to the working directory).
        name: the run's directory name (also the W&B run name unless ``wandb.name`` is set).
        torch_threads: CPU threads of PyTorch's intra-op pool (``torch.set_num_threads``); ``None`` = PyTorch's
            default (one per core). On a small CPU shared with other processes, 1 avoids the large slow-down
            of oversubscribed OpenMP threads.
    """

    output_dir: str = "runs"
    name: str = "run"
    torch_threads: int | None = None

    def __post_init__(self) -> None:
        _int("run.torch_threads", self.torch_threads, 1, allow_none=True)
        if not self.output_dir:
            raise ValueError("run.output_dir='' must name a directory")
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.+=-]+", self.name) or self.name in (".", ".."):
            raise ValueError(f"run.name={self.name!r} must be a non-empty name of letters, digits and _.+=-")

    @property
    def dir(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass
class WandbConfig:
    """Weights & Biases logging, in addition to the CSV log that every run writes.

    W&B is used when ``project`` is set and ``mode`` is not ``disabled``. With ``mode: auto`` the run is
    online when an API key (``WANDB_API_KEY`` or ``~/.netrc``) and the W&B server are available, and offline
    otherwise (``wandb sync <run>/wandb/offline-run-*`` uploads it later). All W&B files go inside the run
    directory (``WANDB_DIR`` and the cache / config / data / artifact directories are set there unless
    already set in the environment).

    Attributes:
        project: W&B project; ``None`` = no W&B.
        name: run name; ``None`` = ``run.name``.
        entity: W&B entity (user or team); ``None`` = the account default.
        group: W&B group (e.g. a sweep over scaling methods).
        tags: run tags.
        notes: free-text notes.
        mode: auto | online | offline | disabled.
        log_model: upload checkpoints as W&B artifacts (Lightning's ``WandbLogger(log_model=...)``).
    """

    project: str | None = None
    name: str | None = None
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    notes: str | None = None
    mode: str = "auto"
    log_model: bool = False

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"wandb.mode={self.mode!r} is not one of {list(WANDB_MODES)}")
        if self.project is not None and not self.project:
            raise ValueError("wandb.project='' must be a project name or null")
        self.tags = [str(t) for t in self.tags]

    @property
    def enabled(self) -> bool:
        return self.project is not None and self.mode != "disabled"


@dataclass
class CheckpointConfig:
    """Lightning checkpoints in ``<run>/checkpoints/``: periodic ``step=N.ckpt`` files and ``last.ckpt``.

    A checkpoint holds the weights (for LoRA runs only the trainable adapter weights), the optimizer and
    scheduler states, the loop counters and the training data position, so ``--ckpt_path last`` resumes
    exactly where the run stopped.

    Attributes:
        every_n_train_steps: save every N optimizer steps (``None`` or 0: only at epoch ends / validation).
        save_last: keep ``last.ckpt`` up to date (needed by ``--ckpt_path last``).
        save_top_k: periodic checkpoints to keep (-1: all; with ``monitor``: the best k).
        monitor: metric ranking the kept checkpoints (e.g. ``val/ppl``); ``None`` = the most recent.
        mode: min | max, for ``monitor``.
        save_on_exception: also save when training stops with an exception (e.g. ``KeyboardInterrupt``).
    """

    every_n_train_steps: int | None = 500
    save_last: bool = True
    save_top_k: int = 1
    monitor: str | None = None
    mode: str = "min"
    save_on_exception: bool = False

    def __post_init__(self) -> None:
        _int("checkpoint.every_n_train_steps", self.every_n_train_steps, 0, allow_none=True)
        _int("checkpoint.save_top_k", self.save_top_k, -1)
        if self.mode not in ("min", "max"):
            raise ValueError(f"checkpoint.mode={self.mode!r} is not one of ['min', 'max']")


@dataclass
class ExportConfig:
    """The model written when training ends.

    ``<run>/final/`` (or ``dir``) always receives a plain Transformers checkpoint -- weights, config (with the
    RoPE scaling in ``rope_parameters``) and tokenizer -- that ``ModelConfig(name_or_path=<dir>)`` and
    ``from_pretrained`` load; for a LoRA run the adapters are merged into it. A LoRA run also writes the
    adapters alone, in peft format, to ``<run>/lora_adapter/`` (or ``lora_dir``).

    Attributes:
        dir: directory of the final model; ``None`` = ``<run>/final``.
        lora_dir: directory of the peft adapters; ``None`` = ``<run>/lora_adapter``.
        dtype: cast the exported weights (float32 | bfloat16 | float16); ``None`` = as trained.
    """

    dir: str | None = None
    lora_dir: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        from posheads.models.loading import DTYPES

        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"export.dtype={self.dtype!r} is not one of {sorted(DTYPES)} or null")


@dataclass
class ReportConfig:
    """Perplexity at every validation length before and after fine-tuning, printed as a table with its
    protocol and written to ``<run>/report.json`` (and logged as ``report/...``).

    Attributes:
        enabled: evaluate and print the report.
        before: evaluate the loaded model (with its RoPE scaling) before the first step (skipped on resume).
        unscaled_baseline: also evaluate the loaded model with its RoPE scaling removed (the pre-trained
            model as it is), to show what the scaling alone does. Skipped when there is no scaling.
    """

    enabled: bool = True
    before: bool = True
    unscaled_baseline: bool = True
