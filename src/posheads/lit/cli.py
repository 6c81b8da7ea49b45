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

Everything the input can get wrong is checked before any weights load (:func:`check_config`): the config
alone (every section, the checkpoint to resume from, the run directory), then the model's config (RoPE
present, the pre-training context stated, ``target_length`` not below it under a scaling, LoRA target modules
that exist). A run directory holding a run of another protocol (its ``config.yaml`` differs in anything but
:data:`RESUME_FREE`) is refused -- resumed or fresh -- unless ``--allow_protocol_change true``, which keeps the
old ``config.yaml`` as ``config.replaced-<time>.yaml`` and records the change in ``protocol_changes.jsonl``.
Bad input is one line, ``error: <option>=<value>: <reason>`` (exit status 2); ``--traceback`` or
``POSHEADS_TRACEBACK=1`` shows the traceback. Checkpoints are written atomically
(:class:`~posheads.lit.checkpoint_io.AtomicCheckpointIO`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import Logger, WandbLogger

from posheads.atomic import atomic_write_text
from posheads.errors import ConfigError, from_argparse, located, run_cli, user_input
from posheads.lit.checkpoint_io import AtomicCheckpointIO, check_checkpoint_file
from posheads.lit.config import CheckpointConfig, ExportConfig, ReportConfig, RunConfig, WandbConfig
from posheads.lit.datamodule import LengthExtensionDataModule
from posheads.lit.export import HFExport
from posheads.lit.loggers import build_loggers
from posheads.lit.module import LengthExtensionModule
from posheads.lit.report import PerplexityReport
from posheads.protocol_diff import describe_changes, flatten, protocol_changes

__all__ = [
    "RESUME_FREE",
    "TRAINER_DEFAULTS",
    "PosheadsCLI",
    "SaveResolvedConfig",
    "check_config",
    "main",
    "parse_config",
    "validate_config",
]

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
        if trainer.global_rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / self.config_filename
        text = _dump(self.parser, self.config)
        atomic_write_text(path, text)  # check_config refused a run directory of another protocol before
        resolved = yaml.safe_load(text)
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
        kwargs.setdefault("parser_kwargs", {"description": __doc__, "exit_on_error": False})
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
        parser.add_argument(
            "--allow_protocol_change",
            type=bool,
            default=False,
            help=(
                "Run in a run directory whose config.yaml records another protocol (resumed or fresh): the old "
                "config.yaml is kept as config.replaced-<time>.yaml and the differing options are recorded in "
                "protocol_changes.jsonl. Refused without it."
            ),
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            try:
                known = list(flatten(parser.get_defaults(skip_validation=True).as_dict()))
            except Exception:  # pragma: no cover - the hint is optional
                known = []
            raise from_argparse(err, known) from None

    def _set_seed(self) -> None:
        if not self.parse_only:
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        if not self.parse_only:
            check_config(self.config, self.parser)
        threads = self.config["run"].get("torch_threads")
        if threads is not None and not self.parse_only:
            torch.set_num_threads(int(threads))
            # Lightning's DDP launchers set OMP_NUM_THREADS (and the thread count) unless it is already set;
            # spawned processes inherit it
            os.environ["OMP_NUM_THREADS"] = str(int(threads))

    def instantiate_classes(self) -> None:
        if self.parse_only:
            return
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            with located():  # the module's, data module's and Trainer's own argument checks
                super().instantiate_classes()
        except MisconfigurationException as err:
            raise ConfigError("trainer", reason=str(err).strip().splitlines()[0]) from err

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
        plugins = trainer_config.get("plugins")
        plugins = (
            [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        )
        from lightning.fabric.plugins import CheckpointIO

        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer_config["plugins"] = plugins
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


def _dump(parser: Any, config: Namespace) -> str:
    """The resolved config as YAML, explicit nulls kept (a null that overrides a non-null default must survive
    a re-run)."""
    try:
        return parser.dump(config, skip_none=False)
    except TypeError:  # pragma: no cover - other jsonargparse versions
        return parser.dump(config)


#: Options that may differ between a run directory's ``config.yaml`` and a run resumed (or restarted) in it:
#: how long to run, logging, checkpoint frequency and threads -- not how the model is trained.
RESUME_FREE = (
    "ckpt_path",
    "allow_protocol_change",
    "config",
    "trainer.max_steps",
    "trainer.max_time",
    "trainer.max_epochs",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "run.torch_threads",
    "wandb",
    "checkpoint",
)


def _writable(option: str, value: str, directory: Path) -> None:
    try:  # a test file: os.access says yes to root everywhere
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise ConfigError(
            option,
            value,
            f"{directory} is not a writable directory ({type(err).__name__}: {err.strerror or err})",
            hint="choose a directory you can write to",
        ) from err


def _check_run_dir(config: Namespace, parser: Any, run: RunConfig) -> None:
    """The run directory is writable, the checkpoint to resume from readable, and a ``config.yaml`` already
    there records the same protocol (else refused, or with ``--allow_protocol_change`` kept and recorded)."""
    run_dir = run.dir
    _writable("run.output_dir", run.output_dir, run_dir)
    ckpt = config.get("ckpt_path")
    if ckpt == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.exists():
            check_checkpoint_file(last)
    elif ckpt is not None and ckpt not in ("best", "hpc", "registry"):
        check_checkpoint_file(ckpt)
    path = run_dir / "config.yaml"
    if not path.is_file():
        return
    try:
        old = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise ConfigError(
            "run.name",
            run.name,
            f"{path} cannot be read ({type(err).__name__}: {err})",
            hint="choose another run.name, or repair / remove that file",
        ) from err
    new = yaml.safe_load(_dump(parser, config)) or {}
    try:
        defaults = yaml.safe_load(_dump(parser, parser.get_defaults(skip_validation=True))) or {}
    except Exception:  # pragma: no cover - defaults only soften the comparison for options added later
        defaults = {}
    changes = protocol_changes(old, new, defaults=defaults, free=RESUME_FREE)
    if not changes:
        return
    option, value = ("ckpt_path", ckpt) if ckpt is not None else ("run.name", run.name)
    if not config.get("allow_protocol_change"):
        raise ConfigError(
            option,
            value,
            f"{run_dir} holds a run made with another protocol: {describe_changes(changes)}",
            hint=(
                "resume with that run's settings (--config " + str(path) + "), choose another run.name, or "
                "pass --allow_protocol_change true (the old config.yaml is kept and the change recorded)"
            ),
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kept = path.with_name(f"config.replaced-{stamp}.yaml")
    os.replace(path, kept)
    record = {"time": stamp, "ckpt_path": ckpt, "previous_config": kept.name, "changes": changes}
    with (run_dir / "protocol_changes.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def _check_model(config: Namespace, sections: dict[str, Any]) -> None:
    """Stage 2: the model's config (no weights) -- RoPE present, the pre-training context stated (or given),
    ``model.target_length`` not below it under a RoPE scaling, LoRA target modules present."""
    from posheads.models import (
        ModelLoadError,
        config_declares_context,
        load_model_config,
        module_names,
    )
    from posheads.rope import apply_rope_scaling, base_rope_theta, original_context_length

    lm, rope = sections["lm"], sections["rope"]
    model = config["model"]
    catch = (ValueError, OSError, ModelLoadError)
    with located(("model", "model.lm"), catch=catch):
        hf_config = load_model_config(lm)
    text = getattr(hf_config, "get_text_config", lambda: hf_config)()
    try:
        base_rope_theta(text)
    except (ValueError, AttributeError, KeyError, TypeError) as err:
        raise ConfigError(
            "model.lm.name_or_path",
            lm.name_or_path,
            f"model_type={getattr(text, 'model_type', None)!r} has no rotary position embedding ({err})",
            hint="posheads extends RoPE models (Llama, Mistral, Qwen, SmolLM, Gemma, Phi-3 ...)",
        ) from err
    scaling = rope is not None and rope.method != "none"
    original = model.get("original_length") or (rope.original_max_position_embeddings if rope else None)
    if original is None and not config_declares_context(lm):
        option = "model.rope.original_max_position_embeddings" if scaling else "model.original_length"
        raise ConfigError(
            option,
            None,
            f"the config of model.lm.name_or_path={lm.name_or_path!r} does not state the context it was "
            "pre-trained on (no max_position_embeddings); Transformers would fill in a default",
            hint=f"set {option} to the model's pre-training context",
        )
    if scaling:
        with located(("rope", "model.rope"), catch=(ValueError, TypeError)):
            apply_rope_scaling(copy.deepcopy(hf_config), rope)
        if original is None:
            original = original_context_length(text)
        target = int(model["target_length"])
        if target < int(original):
            raise ConfigError(
                "model.target_length",
                target,
                f"is below the pre-trained context {original}: model.rope.method={rope.method!r} (factor "
                f"{rope.factor:g}) extends a context, it does not shorten it",
                hint=f"set model.target_length >= {original}, or model.rope.method=none to fine-tune at a "
                "shorter length",
            )
    _check_tracking_tables(config, lm, hf_config)
    if lm.lora is not None:
        try:
            names = module_names(hf_config)
        except Exception:  # pragma: no cover - an architecture that cannot be built on the meta device
            names = None
        if names is not None:
            missing = [t for t in lm.lora.target_modules if t not in names]
            if missing:
                linear = sorted(
                    n for n in names if n.endswith("_proj") or n in ("c_attn", "c_proj", "fc1", "fc2")
                )
                raise ConfigError(
                    "model.lm.lora.target_modules",
                    list(lm.lora.target_modules),
                    f"{missing} are not modules of {lm.describe()}",
                    hint=f"its projection modules are {linear}",
                )


def _check_tracking_tables(config: Namespace, lm: Any, hf_config: Any) -> None:
    """A ``PositionalHeadTracker(head_table=...)`` reads a head table: it must be readable and identified on
    this model (:mod:`posheads.eval.headtable`)."""
    from posheads.eval.headtable import check_identity, model_identity, read_identity
    from posheads.eval.sweep import ModelShape, positional_heads, read_head_table, validate_heads

    trainer = config.get("trainer") or {}
    callbacks = trainer.get("callbacks") if hasattr(trainer, "get") else None
    if not isinstance(callbacks, list):
        return
    identity = None
    for i, cb in enumerate(callbacks):
        if not str(getattr(cb, "class_path", "") or "").endswith("PositionalHeadTracker"):
            continue
        args = getattr(cb, "init_args", None)
        table = args.get("head_table") if args is not None and hasattr(args, "get") else None
        if not table:
            continue
        option = f"trainer.callbacks[{i}].init_args.head_table"
        try:
            rows = read_head_table(table)
            recorded = read_identity(table)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                option, table, f"cannot be read as a head table ({type(err).__name__}: {err})"
            ) from err
        identity = identity or model_identity(lm, hf_config)
        check_identity(
            option,
            table,
            recorded,
            identity,
            hint="identify the heads on this model (evaluate.py with tasks: [heads]) and track that heads.csv",
        )
        heads = [[layer, head] for layer, head in positional_heads(rows)]
        validate_heads(heads, ModelShape.from_config(hf_config), option=option)


def check_config(config: Namespace, parser: Any = None) -> dict[str, Any]:
    """Every check that needs no weights, as :class:`~posheads.errors.ConfigError`: stage 1, the config alone
    (:func:`validate_config`; the run directory and the checkpoint to resume from, when ``parser`` is given);
    stage 2, the model's config. Returns the validated sections."""
    from posheads.models import ModelLoadError

    with user_input(extra=(ModelLoadError,)):
        sections = validate_config(config)
        model = config.get("model") or {}
        for name in ("target_length", "original_length"):
            value = model.get(name)
            if value is None and name == "original_length":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ConfigError(f"model.{name}", value, "must be an int >= 2")
        trainer = config.get("trainer") or {}
        max_steps = trainer.get("max_steps") if hasattr(trainer, "get") else None
        if sections["optim"].total_steps is None and max_steps == 0:
            raise ConfigError(
                "trainer.max_steps",
                0,
                "leaves the learning-rate schedule no step (model.optim.total_steps is unset, so it spans "
                "trainer.max_steps)",
                hint="set trainer.max_steps >= 1",
            )
        if parser is not None:
            _check_run_dir(config, parser, sections["run"])
        _check_model(config, sections)
    return sections


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

    def build(cls: type, value: Any, *moves: tuple[str, str]) -> Any:
        if value is None:
            return None
        value = value.as_dict() if isinstance(value, Namespace) else dict(value)
        with located(*moves):  # errors name the option as written in a training config
            return cls(**value)

    out: dict[str, Any] = {name: build(cls, config[name]) for name, cls in _SECTIONS}
    model = config["model"]
    out["lm"] = build(ModelConfig, model.get("lm"), ("model", "model.lm")) or ModelConfig()
    out["rope"] = build(RopeScaling, model.get("rope"), ("rope", "model.rope"))
    out["optim"] = build(OptimConfig, model.get("optim"), ("optim", "model.optim")) or OptimConfig()
    out["corpus"] = (
        build(CorpusConfig, config["data"].get("corpus"), ("corpus", "data.corpus")) or CorpusConfig()
    )
    return out


def main(args: Sequence[str] | None = None) -> PosheadsCLI:
    """Entry point of ``train.py``: parse, check, build, fit, export. Returns the CLI (its ``trainer``,
    ``model``, ``datamodule``). Bad input exits with status 2 and one ``error: ...`` line
    (:func:`posheads.errors.run_cli`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_cli(_main, args, "train.py")


def _main(args: list[str]) -> PosheadsCLI:
    cli = PosheadsCLI(args=args)
    cli.fit()
    return cli
