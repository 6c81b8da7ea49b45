"""The Lightning layer: fine-tuning a RoPE LM for a longer context (``python train.py --config ...``).

* :class:`LengthExtensionModule` -- the LightningModule (model + RoPE scaling, full or LoRA, AdamW + schedule,
  per-length validation perplexity). Callbacks reach ``module.model``, ``module.tokenizer``,
  ``module.original_length``, ``module.target_length``, ``module.eval_lengths`` and
  ``module.validation_perplexity()``.
* :class:`LengthExtensionDataModule` -- corpus -> tokenised documents -> packed rows of the target length, and
  validation windows at every length over the same text; resumable data order.
* :mod:`posheads.lit.cli` -- the LightningCLI (``main``), run directory, loggers, checkpoints, export, report.
"""

from posheads.lit.config import (
    CheckpointConfig,
    ExportConfig,
    OptimConfig,
    ReportConfig,
    RunConfig,
    WandbConfig,
)
from posheads.lit.datamodule import (
    LengthExtensionDataModule,
    ResumableDataLoader,
    ResumableSampler,
    ValidationSet,
    build_validation_sets,
)
from posheads.lit.export import HFExport, export_pretrained, merge_lora_state_dict
from posheads.lit.metrics import NLLSum, TokenNLL
from posheads.lit.module import LengthExtensionModule
from posheads.lit.optim import LRSchedule
from posheads.lit.report import PerplexityReport

__all__ = [
    "CheckpointConfig",
    "ExportConfig",
    "HFExport",
    "LRSchedule",
    "LengthExtensionDataModule",
    "LengthExtensionModule",
    "NLLSum",
    "OptimConfig",
    "PerplexityReport",
    "ReportConfig",
    "ResumableDataLoader",
    "ResumableSampler",
    "RunConfig",
    "TokenNLL",
    "ValidationSet",
    "WandbConfig",
    "build_validation_sets",
    "export_pretrained",
    "merge_lora_state_dict",
]
