"""``python train.py --config configs/<run>.yaml [--section.option value ...] [--ckpt_path last]``

Fine-tune a RoPE causal LM for a longer context (LightningCLI; ``--help`` lists every option with its
documentation, ``--print_config`` prints the resolved config). Config sections:

* ``model``      -- :class:`~posheads.lit.module.LengthExtensionModule`: ``target_length``, ``lm`` (which model,
  dtype, attention, LoRA, gradient checkpointing), ``rope`` (scaling method and factor), ``optim`` (AdamW and
  schedule).
* ``data``       -- :class:`~posheads.lit.datamodule.LengthExtensionDataModule`: ``corpus``, ``batch_size``,
  validation windows.
* ``trainer``    -- Lightning ``Trainer``: ``max_steps``, ``accumulate_grad_batches``, ``gradient_clip_val``,
  ``precision`` (bf16-mixed, 16-mixed, 32), ``strategy`` (auto, ddp, fsdp, ...), ``devices``, ``num_nodes``,
  ``val_check_interval``, ...
* ``run``, ``wandb``, ``checkpoint``, ``export``, ``report`` -- :mod:`posheads.lit.config`.
* ``seed_everything``, ``ckpt_path``.

Every run writes ``<run.output_dir>/<run.name>/``: ``config.yaml`` (the resolved config, re-runnable with
``--config``), ``checkpoints/`` (``last.ckpt`` and periodic ones), ``csv/version_N/metrics.csv``, ``wandb/``
(when configured), ``final/`` (the trained model as a Transformers directory), ``lora_adapter/`` (LoRA runs) and
``report.json``. Dotted overrides follow the config: ``--model.optim.lr 1e-4 --trainer.max_steps 200``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger

from posheads.lit.config import CheckpointConfig, ExportConfig, ReportConfig, RunConfig, WandbConfig
from posheads.lit.datamodule import LengthExtensionDataModule
from posheads.lit.export import HFExport
from posheads.lit.loggers import build_loggers
from posheads.lit.module import LengthExtensionModule
from posheads.lit.report import PerplexityReport

__all__ = ["TRAINER_DEFAULTS", "PosheadsCLI", "SaveResolvedConfig", "main", "parse_config", "validate_config"]

#: Trainer defaults that differ from Lightning's (all overridable in a config).
TRAINER_DEFAULTS: dict[str, Any] = {
    # the data module shards the data itself, so that the data position can be resumed
    "use_distributed_sampler": False,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}

_SECTIONS = (
    ("run", RunConfig),
    ("wandb", WandbConfig),
    ("checkpoint", CheckpointConfig),
    ("export", ExportConfig),
    ("report", ReportConfig),
)


class SaveResolvedConfig(SaveConfigCallback):
    """Save the resolved config as ``<run>/config.yaml`` (rank 0; overwritten on resume) and log it to W&B."""

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Namespace,
        run_dir: str | os.PathLike = ".",
        **kwargs: Any,
    ):
        kwargs.update(overwrite=True, save_to_log_dir=False)
        super().__init__(parser, config, **kwargs)
        self.run_dir = Path(run_dir)

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / self.config_filename
        try:  # keep explicit nulls: a null that overrides a non-null default must survive a re-run
            self.parser.save(self.config, str(path), skip_unset=False, overwrite=True, multifile=False)
        except TypeError:  # jsonargparse < 4.49 names it skip_none
            self.parser.save(self.config, str(path), skip_none=False, overwrite=True, multifile=False)
        resolved = yaml.safe_load(path.read_text())
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": resolved})


class PosheadsCLI(LightningCLI):
    """LightningCLI for :class:`LengthExtensionModule` + :class:`LengthExtensionDataModule` with the run sections.

    ``parse_only=True`` parses and validates the arguments without instantiating anything (see
    :func:`parse_config`).
    """

    def __init__(self, args: ArgsType = None, parse_only: bool = False, **kwargs: Any):
        self.parse_only = parse_only
        kwargs.setdefault("save_config_callback", SaveResolvedConfig)
        kwargs.setdefault("trainer_defaults", dict(TRAINER_DEFAULTS))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_kwargs", {"description": __doc__})
        super().__init__(
            model_class=LengthExtensionModule,
            datamodule_class=LengthExtensionDataModule,
            args=args,
            run=False,
            auto_configure_optimizers=False,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for name, cls in _SECTIONS:
            parser.add_class_arguments(cls, name, fail_untyped=True, sub_configs=True)
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help=(
                "Resume training: 'last' = <run>/checkpoints/last.ckpt (a fresh start when there is none yet, so a "
                "preemptible job can always pass it), or a checkpoint path. Restores weights, optimizer, "
                "scheduler, step counters and the training data position."
            ),
        )

    def _set_seed(self) -> None:
        if not self.parse_only:
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        threads = self.config["run"].get("torch_threads")
        if threads is not None and not self.parse_only:
            torch.set_num_threads(int(threads))
            # Lightning's DDP launchers set OMP_NUM_THREADS (and the thread count) unless it is already set;
            # spawned processes inherit it
            os.environ["OMP_NUM_THREADS"] = str(int(threads))

    def instantiate_classes(self) -> None:
        if self.parse_only:
            return
        super().instantiate_classes()

    def _section(self, name: str) -> Any:
        return self._get(self.config_init, name)

    @property
    def run_dir(self) -> Path:
        run: RunConfig = (
            self._section("run") if hasattr(self, "config_init") else RunConfig(**self.config["run"])
        )
        return run.dir

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        run: RunConfig = self._section("run")
        wandb: WandbConfig = self._section("wandb")
        ckpt: CheckpointConfig = self._section("checkpoint")
        export: ExportConfig = self._section("export")
        report: ReportConfig = self._section("report")
        run_dir = run.dir
        resume = self.config.get("ckpt_path") is not None

        trainer_config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        loggers: list[Logger] = build_loggers(run_dir, run.name, wandb, resume=resume)
        user_logger = trainer_config.get("logger")
        if isinstance(user_logger, Logger):
            loggers.append(user_logger)
        elif isinstance(user_logger, (list, tuple)):
            loggers.extend(lg for lg in user_logger if isinstance(lg, Logger))
        trainer_config["logger"] = loggers
        trainer_config["default_root_dir"] = str(run_dir)

        callbacks = list(trainer_config.get("callbacks") or [])
        if trainer_config.get("enable_checkpointing", True) is not False:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=str(run_dir / "checkpoints"),
                    filename="step={step}",
                    auto_insert_metric_name=False,
                    every_n_train_steps=ckpt.every_n_train_steps or None,
                    save_last=ckpt.save_last,
                    save_top_k=ckpt.save_top_k,
                    monitor=ckpt.monitor,
                    mode=ckpt.mode,
                    save_on_exception=ckpt.save_on_exception,
                )
            )
        callbacks.append(
            HFExport(
                export.dir or run_dir / "final",
                lora_dir=export.lora_dir or run_dir / "lora_adapter",
                dtype=export.dtype,
            )
        )
        if report.enabled:
            seed = self.config.get("seed_everything")
            callbacks.append(PerplexityReport(run_dir, report.before, report.unscaled_baseline, seed=seed))
        trainer_config["callbacks"] = callbacks
        self.save_config_kwargs = {**self.save_config_kwargs, "run_dir": run_dir}

        extra_callbacks = [
            self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys
        ]
        return self._instantiate_trainer(trainer_config, extra_callbacks)

    def fit(self) -> None:
        """Run ``trainer.fit`` with ``ckpt_path`` from the config."""
        self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=self.config.get("ckpt_path"))
        for logger in self.trainer.loggers:  # close the W&B run so that its files are complete
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()
        if self.trainer.is_global_zero:
            exporter = next((c for c in cast(Any, self.trainer).callbacks if isinstance(c, HFExport)), None)
            where = exporter.exported if exporter is not None else None
            print(
                f"[posheads] run directory: {self.run_dir}" + (f"; final model: {where}" if where else ""),
                flush=True,
            )


def parse_config(args: ArgsType) -> Namespace:
    """Parse (and type-check) command-line style ``args`` without instantiating or running anything."""
    return PosheadsCLI(args=args, parse_only=True).config


def validate_config(config: Namespace) -> dict[str, Any]:
    """Instantiate the dataclass parts of a parsed config (which runs their validation) -- everything except the
    model weights, the data and the Trainer. Returns them by section."""
    from posheads.data import CorpusConfig
    from posheads.lit.config import OptimConfig
    from posheads.models import ModelConfig
    from posheads.rope import RopeScaling

    def build(cls: type, value: Any) -> Any:
        if value is None:
            return None
        value = value.as_dict() if isinstance(value, Namespace) else dict(value)
        return cls(**value)

    out: dict[str, Any] = {name: build(cls, config[name]) for name, cls in _SECTIONS}
    model = config["model"]
    out["lm"] = build(ModelConfig, model.get("lm")) or ModelConfig()
    out["rope"] = build(RopeScaling, model.get("rope"))
    out["optim"] = build(OptimConfig, model.get("optim")) or OptimConfig()
    out["corpus"] = build(CorpusConfig, config["data"].get("corpus")) or CorpusConfig()
    return out


def main(args: ArgsType = None) -> PosheadsCLI:
    """Entry point of ``train.py``: parse, build, fit, export. Returns the CLI (its ``trainer``, ``model``,
    ``datamodule``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cli = PosheadsCLI(args=args)
    cli.fit()
    return cli
