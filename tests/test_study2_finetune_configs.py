"""The Study 2b fine-tuning configs (configs/study2/finetune_*.yaml): every one parses and validates, the grid
is complete with one token budget, and each runs a few steps on the tiny model (same file, only the model,
the lengths and the trainer scaled down), tracker and report on; the final model is then measured by
``posheads.eval.study2`` (point ``as_loaded``) and read by ``posheads.lit.compare_methods``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from posheads.lit.cli import PosheadsCLI, parse_config, validate_config
from posheads.rope import critical_pair

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = sorted((ROOT / "configs" / "study2").glob("finetune_*.yaml"))
METHODS = ("linear", "ntk", "yarn", "llama3", "longrope")


def test_the_grid_is_complete_with_one_budget():
    names = {p.name for p in FINETUNE}
    assert names == {f"finetune_smollm2_{m}_16k_{mode}.yaml" for m in METHODS for mode in ("lora", "full")}
    budgets = set()
    for p in FINETUNE:
        c = yaml.safe_load(p.read_text())
        t = c["trainer"]
        budgets.add(t["max_steps"] * t.get("accumulate_grad_batches", 1) * c["data"]["batch_size"])
        assert c["model"]["target_length"] == 16384
        assert any("PositionalHeadTracker" in cb["class_path"] for cb in t["callbacks"])
        assert c["report"]["enabled"] and c["wandb"]["project"]
    assert len(budgets) == 1  # sequences per run, the same for every method and mode


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_finetune_config_parses_and_validates(path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = parse_config(["--config", str(path)])
    parts = validate_config(config)
    rope, lm = parts["rope"], parts["lm"]
    assert rope.factor * rope.original_max_position_embeddings == config.model.target_length == 16384
    assert (lm.lora is not None) == path.name.endswith("_lora.yaml")
    if rope.method == "longrope":
        i_c = critical_pair(64, 100000.0, 8192)  # SmolLM2: head_dim 64, rope_theta 1e5
        assert rope.long_factor == [1.0] * i_c + [2.0] * (32 - i_c) and rope.short_factor == [1.0] * 32


TINY = {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


def _tiny(path: Path, run_dir: Path) -> dict:
    """The shipped config with the model, lengths and trainer scaled down to a few CPU steps."""
    c = yaml.safe_load(path.read_text())
    c["model"]["target_length"] = 64
    c["model"]["lm"].update({"name_or_path": "tiny", "tiny": dict(TINY), "gradient_checkpointing": False})
    rope = c["model"]["rope"]
    rope["original_max_position_embeddings"] = 32
    if rope["method"] == "longrope":
        i_c = critical_pair(16, 10000.0, 32)
        rope["short_factor"], rope["long_factor"] = [1.0] * 8, [1.0] * i_c + [2.0] * (8 - i_c)
    c["data"].update(
        {"corpus": {"kind": "pydoc", "max_documents": 40}, "batch_size": 2, "val_windows": 2, "cache_dir": ""}
    )
    c["trainer"].update(
        {
            "accelerator": "cpu",
            "precision": "32-true",
            "max_steps": 3,
            "val_check_interval": 3,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        }
    )
    tracker = c["trainer"]["callbacks"][0]["init_args"]
    tracker.update(
        {
            "every_n_steps": 2,
            "heads": {"rows_per_sequence": 8, "keys_per_bin": 4, "top_fraction": 0.25, "critical": "quarter"},
        }
    )
    c["run"] = {"output_dir": str(run_dir), "name": path.stem, "torch_threads": 1}
    c["checkpoint"] = {"every_n_train_steps": 3}
    c["wandb"]["mode"] = "disabled"
    c["report"]["before"] = False
    return c


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["finetune_smollm2_longrope_16k_lora.yaml", "finetune_smollm2_yarn_16k_full.yaml"]
)
def test_finetune_config_runs_on_the_tiny_model_and_is_measured(name, monkeypatch, tmp_path, capsys):
    from posheads.eval.study2 import main as measure
    from posheads.lit import compare_methods as cm

    path = ROOT / "configs" / "study2" / name
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cfg_path = tmp_path / name
    cfg_path.write_text(yaml.safe_dump(_tiny(path, tmp_path)))
    cli = PosheadsCLI(args=["--config", str(cfg_path), "--seed_everything", "1"])
    cli.fit()
    run = tmp_path / path.stem
    assert cli.trainer.global_step == 3
    timeline = json.loads((run / "tracking" / "timeline.json").read_text())
    assert len(timeline["evaluations"]) >= 2
    report = json.loads((run / "report.json").read_text())
    assert report["protocol"]["seed"] == 1
    # the final model measured as loaded (its own scaling), then compared
    measure_cfg = {
        "model": {"name_or_path": str(run / "final")},
        "points": [{"method": "as_loaded"}],
        "corpus": {"kind": "pydoc"},
        "windows": {"min_doc_tokens": 20, "max_doc_tokens": 400, "buckets": [0, 32, 48, 64]},
        "identify": {
            "length": 32,
            "num_sequences": 2,
            "analysis": {
                "rows_per_sequence": 8,
                "keys_per_bin": 4,
                "top_fraction": 0.25,
                "critical": "quarter",
            },
            "variants": {"sinks_out": {"sink_keys": 1}},
        },
        "passkey": {"keys_per_length": 0, "lengths": [64]},
        "hda_rows": 8,
        "hda_keys_per_bin": 4,
        "n_boot": 50,
        "threads": 1,
    }
    mc = tmp_path / "measure.yaml"
    mc.write_text(yaml.safe_dump(measure_cfg))
    measure(["--config", str(mc), "--output_dir", str(run / "study2")])
    res = json.loads((run / "study2" / "as_loaded" / "results.json").read_text())
    method = yaml.safe_load(path.read_text())["model"]["rope"]["method"]
    assert res["protocol"]["method"] == method and res["protocol"]["factor"] == 2.0
    capsys.readouterr()
    result = cm.main([str(run)])
    (row,) = result["runs"]
    mode = "lora" if name.endswith("_lora.yaml") else "full"
    assert row["setting"] == f"fine-tuned ({mode})" and row["seed"] == 1 and row["method"] == method
    assert row["tracking_area_final"] is not None
