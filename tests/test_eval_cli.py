"""evaluate.py: configuration, bad input refused before any model work, the CI config end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import posheads.models
from posheads.eval.cli import main, parse_config

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "eval" / "ci_tiny.yaml"
SMOLLM2_CONFIG = ROOT / "configs" / "eval" / "smollm2_positional_ablation.yaml"


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the model's weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_model was called before the input was validated")

    monkeypatch.setattr(posheads.models, "load_model", refuse)


def _ci(tmp_path, *overrides):
    return ["--config", str(CI_CONFIG), "--output.dir", str(tmp_path / "run"), *overrides]


def test_help_works():
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for option in ("--config", "--perplexity.lengths", "--sweep.conditions", "--passkey.depths", "--tasks"):
        assert option in out.stdout


@pytest.mark.parametrize("path", [CI_CONFIG, SMOLLM2_CONFIG], ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.tasks and cfg.output.dir


def test_dotted_overrides():
    cfg = parse_config(
        [
            "--config",
            str(CI_CONFIG),
            "--perplexity.lengths",
            "[32, 16]",
            "--sweep.max_rows",
            "1",
            "--tasks",
            "[perplexity, heads]",
        ]
    )
    assert cfg.perplexity.lengths == [16, 32] and cfg.sweep.max_rows == 1
    assert cfg.tasks == ["heads", "perplexity"]  # canonical order


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["--sweep.conditions", "[none, bogus]"], "unknown condition 'bogus'"),
        (["--tasks", "[perplexity, speed]"], "unknown task 'speed'"),
        (["--passkey.depths", "[0.5, 1.5]"], r"passkey.depths=\[0.5, 1.5\]: 1.5 is not a depth"),
        (["--perplexity.stride", "100"], "perplexity.stride=100 exceeds the shortest length 64"),
        (
            ["--tasks", "[perplexity]"],
            r"need the Positional Heads: add 'heads' to tasks or set heads.from_results",
        ),
        (["--sweep.conditions", "[none, heads]", "--sweep.user_heads", "[]"], "user_heads=\\[\\] is empty"),
        (["--length_policy", "maybe"], "length_policy='maybe'"),
    ],
)
def test_bad_config_is_refused(tmp_path, no_weights, overrides, match):
    with pytest.raises(ValueError, match=match):
        main(_ci(tmp_path, *overrides))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["--sweep.user_heads", "[[0, 1], [2, 0]]"],
            r"entry \[2, 0\]: layer 2 is out of range, the model has 2 layers",
        ),
        (
            ["--sweep.user_heads", "['1.4']"],
            r"entry \[1, 4\]: head 4 is out of range, the model has 4 attention heads",
        ),
        (
            ["--perplexity.lengths", "[64, 100000]", "--length_policy", "allow"],
            r"perplexity.lengths \[100000\]: no document",
        ),
        (["--heads.length", "100000", "--length_policy", "allow"], "heads.length=100000: no document"),
        (
            ["--passkey.lengths", "[600]", "--length_policy", "error"],
            r"passkey.lengths \[600\] exceed the 512 tokens",
        ),
        (["--passkey.lengths", "[200]"], r"passkey.lengths \[200\] are too short"),
        (["--sweep.critical_pair", "9"], "critical_pair=9 must be in"),
    ],
)
def test_bad_input_is_refused_before_model_work(tmp_path, no_weights, overrides, match):
    with pytest.raises(ValueError, match=match):
        main(_ci(tmp_path, *overrides))
    assert not (tmp_path / "run" / "results.json").exists()


def test_length_above_supported_warns_by_default(tmp_path, no_weights):
    with (
        pytest.warns(UserWarning, match=r"passkey.lengths \[600\] exceed the 512 tokens"),
        pytest.raises(AssertionError, match="load_model"),
    ):
        main(_ci(tmp_path, "--passkey.lengths", "[600]"))


def test_rope_scaling_raises_the_supported_length(tmp_path, no_weights):
    with pytest.raises(AssertionError, match="load_model"):  # validated, then stopped at the weights
        main(
            _ci(
                tmp_path,
                "--passkey.lengths",
                "[900]",
                "--length_policy",
                "error",
                "--rope.method",
                "linear",
                "--rope.factor",
                "2",
            )
        )


def test_previous_head_table_is_validated(tmp_path, no_weights):
    table = tmp_path / "heads.json"
    table.write_text(json.dumps([{"layer": 5, "head": 0, "score": 1.0, "z": 2.0, "positional": True}]))
    with pytest.raises(ValueError, match=r"heads.from_results entry \[5, 0\]: layer 5 is out of range"):
        main(_ci(tmp_path, "--tasks", "[perplexity]", "--heads.from_results", str(table)))
