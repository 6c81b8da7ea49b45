"""Every shipped training config parses through the CLI parser (nothing is run or loaded), its typed parts
validate, and ``--help`` documents every option."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from posheads.lit.cli import PosheadsCLI, parse_config, validate_config
from posheads.lit.config import (
    CheckpointConfig,
    ExportConfig,
    OptimConfig,
    ReportConfig,
    RunConfig,
    WandbConfig,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "quickstart.yaml", *sorted((ROOT / "configs" / "train").glob("*.yaml"))]


def test_the_shipped_configs_are_there():
    names = {p.name for p in CONFIGS}
    assert {"quickstart.yaml", "pretrain_tiny.yaml", "llama2_7b_yarn_32k_fsdp.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_parses_and_validates(path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = parse_config(["--config", str(path)])
    parts = validate_config(config)
    target = config.model.target_length
    rope, lm = parts["rope"], parts["lm"]
    assert lm.attn_implementation != "eager"
    if rope is not None and rope.method not in ("none", "dynamic") and rope.original_max_position_embeddings:
        assert target <= rope.factor * rope.original_max_position_embeddings, (
            "target length beyond the scaled context"
        )
    assert config.trainer.use_distributed_sampler is False  # the data module shards the data itself
    assert parts["run"].name and (config.trainer.max_steps or 0) > 0


def test_fsdp_config_builds_its_strategy(monkeypatch):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = parse_config(["--config", str(ROOT / "configs" / "train" / "llama2_7b_yarn_32k_fsdp.yaml")])
    strategy = config.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.FSDPStrategy"
    built = FSDPStrategy(**strategy.init_args.as_dict())
    assert built.kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}
    assert (
        config.trainer.devices == 8
        and config.model.rope.method == "yarn"
        and config.model.target_length == 32768
    )


def test_quickstart_extends_the_pretrained_context(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    pre = parse_config(["--config", str(ROOT / "configs" / "train" / "pretrain_tiny.yaml")])
    quick = parse_config(["--config", str(ROOT / "configs" / "quickstart.yaml")])
    exported = Path(pre.run.output_dir) / pre.run.name / "final"
    assert Path(quick.model.lm.name_or_path) == exported
    assert (
        quick.model.rope.original_max_position_embeddings
        == pre.model.target_length
        == pre.model.lm.tiny.max_position_embeddings
    )
    assert quick.model.target_length == 4 * pre.model.target_length
    assert quick.data.split_seed == pre.data.split_seed and quick.data.val_fraction == pre.data.val_fraction


def test_dotted_overrides_and_validation_errors(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    base = ["--config", str(ROOT / "configs" / "quickstart.yaml")]
    config = parse_config(
        [
            *base,
            "--model.optim.lr",
            "1e-4",
            "--model.rope.factor",
            "8",
            "--trainer.max_steps",
            "5",
            "--ckpt_path",
            "last",
        ]
    )
    assert (config.model.optim.lr, config.model.rope.factor, config.trainer.max_steps, config.ckpt_path) == (
        1e-4,
        8.0,
        5,
        "last",
    )
    with pytest.raises(ValueError, match="optim.schedule='step'"):
        validate_config(parse_config([*base, "--model.optim.schedule", "step"]))
    with pytest.raises(ValueError, match="rope.method='rotary'"):
        validate_config(parse_config([*base, "--model.rope.method", "rotary"]))


def _help(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        PosheadsCLI(args=args, parse_only=True)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_documents_every_option(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    text = _help(["--help"], capsys)
    sections = {
        "run": RunConfig,
        "wandb": WandbConfig,
        "checkpoint": CheckpointConfig,
        "export": ExportConfig,
        "report": ReportConfig,
        "model.optim": OptimConfig,
    }
    for prefix, cls in sections.items():
        for f in dataclasses.fields(cls):
            assert f"--{prefix}.{f.name}" in text, f"--{prefix}.{f.name} missing from --help"
    for option in (
        "--model.target_length",
        "--model.lm.name_or_path",
        "--model.lm.lora",
        "--model.rope",
        "--data.corpus.kind",
        "--data.batch_size",
        "--data.val_windows",
        "--trainer.strategy",
        "--trainer.precision",
        "--trainer.accumulate_grad_batches",
        "--trainer.gradient_clip_val",
        "--ckpt_path",
    ):
        assert option in text, option
    assert "the context length to train at" in text and "W&B project" in text  # documentation, not only names
    rope_help = _help(["--model.rope.help", "RopeScaling"], capsys)
    for name in ("method", "factor", "original_max_position_embeddings", "beta_fast"):
        assert f"--model.rope.{name}" in rope_help
