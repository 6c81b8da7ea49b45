"""Bad input to ``train.py`` and ``evaluate.py``: one ``error: <option>=<value>: <reason>`` line, exit status 2,
no traceback, the option path as the user writes it -- and all of it before any weights load.

Both entry points run in-process through their ``main(argv)`` on the tiny model; a fixture makes loading
weights fail the test. The second half checks what must not be lost: atomic files with the user's permissions,
the previous file kept on a failed write, a resumed evaluation writing each trial once, a failed evaluation
recorded as failed, head tables that know their model, checkpoints that are written atomically and read with a
clear error.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

import posheads.models
from posheads.errors import ConfigError, as_config_error, from_argparse

ROOT = Path(__file__).resolve().parents[1]
CI_EVAL = ROOT / "configs" / "eval" / "ci_tiny.yaml"
sys.path.insert(0, str(Path(__file__).parent))
from scripts.train_helpers import tiny_config, write_config  # noqa: E402


@pytest.fixture
def no_weights(monkeypatch):
    """Loading weights fails the test: every refusal must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the weights were loaded before the input was refused")

    import posheads.lit.module as lit_module

    monkeypatch.setattr(posheads.models, "load_model", refuse)
    monkeypatch.setattr(lit_module, "load_model", refuse)
    monkeypatch.delenv("POSHEADS_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["prog"])  # LightningCLI warns when sys.argv holds arguments too


def _refused(main, argv, capsys, option: str, *words: str) -> str:
    """Run ``main(argv)``; assert exit 2, no traceback, an ``error: <option>`` line (and ``words`` in it)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    line = lines[0]
    # "<option>=<value>: why", "<option>: why" or "<option> [the offending values]: why"
    assert re.match(rf"error: {re.escape(option)}[=: ]", line), line
    for word in words:
        assert word in err, (word, err)
    return err


# ------------------------------------------------------------------------------------------ training


def _train(tmp_path: Path, **overrides) -> list[str]:
    config = tiny_config(tmp_path / "runs", "bad", steps=2, **overrides)
    return ["--config", str(write_config(tmp_path / "train.yaml", config))]


def _train_main(argv):
    from posheads.lit.cli import main

    return main(argv)


def _local_model(tmp_path: Path, drop: tuple[str, ...] = (), **fields) -> str:
    """A local model directory holding only the tiny Llama's config.json (minus ``drop``, plus ``fields``)."""
    from posheads.models import tiny_llama_config

    raw = tiny_llama_config().to_dict()
    for key in drop:
        raw.pop(key, None)
    raw.update(fields)
    directory = tmp_path / "local_model"
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    return str(directory)


TRAIN_CASES = [
    # (id, overrides on the command line, option path, words in the message)
    ("lr", ["--model.optim.lr", "-1"], "model.optim.lr", ["> 0"]),
    ("schedule", ["--model.optim.schedule", "step"], "model.optim.schedule", ["cosine"]),
    ("rope_method", ["--model.rope.method", "rotary"], "model.rope.method", ["yarn"]),
    ("rope_factor", ["--model.rope.factor", "0.5"], "model.rope.factor", []),
    ("lora_r", ["--model.lm.lora", "{r: 0}"], "model.lm.lora.r", [">= 1"]),
    ("dtype", ["--model.lm.dtype", "float8"], "model.lm.dtype", ["float32"]),
    ("tiny_shape", ["--model.lm.tiny.head_dim", "15"], "model.lm.tiny.head_dim", ["even"]),
    ("no_model", ["--model.lm.name_or_path", "/nonexistent/model"], "model.lm.name_or_path", []),
    (
        "lora_targets",
        ["--model.lm.lora", "{r: 4, target_modules: [q_proj, attn_q]}"],
        "model.lm.lora.target_modules",
        ["attn_q", "k_proj"],
    ),
    ("target_below_original", ["--model.target_length", "16"], "model.target_length", ["32"]),
    ("typo", ["--model.target_lenght", "64"], "model.target_lenght", ["--model.target_length"]),
    ("type", ["--trainer.max_steps", "many"], "trainer.max_steps", ["int"]),
    ("unknown_section", ["--modle.target_length", "64"], "modle.target_length", ["not an option"]),
    ("run_name", ["--run.name", "a/b"], "run.name", []),
    ("wandb_mode", ["--wandb.mode", "loud"], "wandb.mode", ["offline"]),
    ("checkpoint_mode", ["--checkpoint.mode", "up"], "checkpoint.mode", []),
    ("corpus_kind", ["--data.corpus.kind", "novels"], "data.corpus.kind", ["stdlib"]),
    ("corpus_paths", ["--data.corpus", "{kind: files}"], "data.corpus.paths", []),
    (
        "no_steps",
        ["--trainer.max_steps", "0", "--model.optim.total_steps", "null"],
        "trainer.max_steps",
        ["max_steps >= 1"],
    ),
    ("missing_checkpoint", ["--ckpt_path", "nowhere/last.ckpt"], "ckpt_path", ["no such checkpoint"]),
    ("betas", ["--model.optim.betas", "[0.9, 1.5]"], "model.optim.betas", []),
    ("warmup", ["--model.optim.warmup_steps", "-3"], "model.optim.warmup_steps", []),
    ("target_type", ["--model.target_length", "1"], "model.target_length", [">= 2"]),
]


@pytest.mark.parametrize(
    "overrides,option,words", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES]
)
def test_train_refuses(tmp_path, no_weights, capsys, overrides, option, words):
    _refused(_train_main, _train(tmp_path) + overrides, capsys, option, *words)


def test_train_missing_config_file(tmp_path, no_weights, capsys):
    _refused(_train_main, ["--config", str(tmp_path / "nope.yaml")], capsys, "--config", "does not exist")


def test_train_output_dir_not_writable(tmp_path, no_weights, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = _train(tmp_path) + ["--run.output_dir", str(blocker / "runs")]
    _refused(_train_main, argv, capsys, "run.output_dir", "not a writable directory")


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_train_unreadable_checkpoint(tmp_path, no_weights, capsys, damage):
    ckpt = tmp_path / "step=1.ckpt"
    with zipfile.ZipFile(tmp_path / "full.zip", "w") as zf:
        zf.writestr("archive/data.pkl", b"x" * 4096)
    data = (tmp_path / "full.zip").read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    err = _refused(_train_main, _train(tmp_path) + ["--ckpt_path", str(ckpt)], capsys, "ckpt_path", str(ckpt))
    assert "hint:" in err


def test_train_local_model_without_context_is_not_guessed(tmp_path, no_weights, capsys):
    model = _local_model(tmp_path, drop=("max_position_embeddings",))
    argv = _train(tmp_path) + ["--model.lm", json.dumps({"name_or_path": model})]
    _refused(_train_main, argv, capsys, "model.rope.original_max_position_embeddings", "pre-trained on")
    argv = _train(tmp_path) + ["--model.lm", json.dumps({"name_or_path": model}), "--model.rope", "null"]
    _refused(_train_main, argv, capsys, "model.original_length", "max_position_embeddings")


def test_train_model_without_rope(tmp_path, no_weights, capsys):
    directory = tmp_path / "gpt2"
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": 64})
    )
    argv = _train(tmp_path) + ["--model.lm", json.dumps({"name_or_path": str(directory)})]
    _refused(_train_main, argv, capsys, "model.lm.name_or_path", "rotary")


def test_train_tracking_head_table_from_another_model(tmp_path, no_weights, capsys):
    identity = {"model": "smollm2", "model_type": "llama", "num_layers": 30, "num_heads": 9, "head_dim": 64}
    table = _table(tmp_path / "heads.csv", identity)
    tracker = {
        "class_path": "posheads.callbacks.PositionalHeadTracker",
        "init_args": {"head_table": str(table)},
    }
    argv = _train(tmp_path, **{"trainer.callbacks": [tracker]})
    _refused(
        _train_main,
        argv,
        capsys,
        "trainer.callbacks[0].init_args.head_table",
        "num_layers: table 30 vs model 2",
    )


def test_train_tracking_head_table_out_of_range(tmp_path, no_weights, capsys):
    table = tmp_path / "heads.csv"
    table.write_text("layer,head,score,z,positional\n9,0,0.9,2.0,True\n")  # no identity: the shape decides
    tracker = {
        "class_path": "posheads.callbacks.PositionalHeadTracker",
        "init_args": {"head_table": str(table)},
    }
    argv = _train(tmp_path, **{"trainer.callbacks": [tracker]})
    _refused(_train_main, argv, capsys, "trainer.callbacks[0].init_args.head_table", "layer 9")


def _resolved_config(argv: list[str]) -> str:
    from posheads.lit.cli import PosheadsCLI, _dump

    cli = PosheadsCLI(args=argv, parse_only=True)
    return _dump(cli.parser, cli.config)


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "fresh"])
def test_train_run_directory_of_another_protocol(tmp_path, no_weights, capsys, resume):
    """The run directory holds a run made with YaRN; a run with PI there is refused, resumed or not, naming the
    option that differs, and its config.yaml stays as it was."""
    argv = _train(tmp_path)
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    before = _resolved_config(argv)
    (run_dir / "config.yaml").write_text(before)
    extra = ["--model.rope.method", "linear"] + (["--ckpt_path", "last"] if resume else [])
    option = "ckpt_path" if resume else "run.name"
    _refused(_train_main, argv + extra, capsys, option, "model.rope.method", "'yarn' -> 'linear'")
    assert (run_dir / "config.yaml").read_text() == before


def test_train_protocol_change_allowed_explicitly_is_recorded(tmp_path, no_weights):
    argv = _train(tmp_path)
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    before = _resolved_config(argv)
    (run_dir / "config.yaml").write_text(before)
    from posheads.lit.cli import PosheadsCLI, check_config

    cli = PosheadsCLI(
        args=argv + ["--model.rope.method", "linear", "--allow_protocol_change", "true"], parse_only=True
    )
    check_config(cli.config, cli.parser)
    kept = list(run_dir.glob("config.replaced-*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == before
    record = json.loads((run_dir / "protocol_changes.jsonl").read_text().splitlines()[0])
    assert record["changes"]["model.rope.method"] == {"before": "yarn", "after": "linear"}


def test_train_same_protocol_may_resume(tmp_path, no_weights):
    """Only run-control options differ (max_steps): the checks pass."""
    argv = _train(tmp_path)
    run_dir = tmp_path / "runs" / "bad"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(_resolved_config(argv))
    from posheads.lit.cli import PosheadsCLI, check_config

    cli = PosheadsCLI(args=argv + ["--trainer.max_steps", "50", "--ckpt_path", "last"], parse_only=True)
    sections = check_config(cli.config, cli.parser)
    assert sections["rope"].method == "yarn"


def test_traceback_on_request(tmp_path, no_weights, monkeypatch, capsys):
    argv = _train(tmp_path) + ["--model.optim.lr", "-1"]
    with pytest.raises(ConfigError, match=r"model\.optim\.lr=-1\.0"):
        _train_main(argv + ["--traceback"])
    monkeypatch.setenv("POSHEADS_TRACEBACK", "1")
    with pytest.raises(ConfigError):
        _train_main(argv)


# ------------------------------------------------------------------------------------------ evaluation


def _eval(tmp_path: Path, *overrides: str) -> list[str]:
    return ["--config", str(CI_EVAL), "--output.dir", str(tmp_path / "run"), *overrides]


def _eval_main(argv):
    from posheads.eval.cli import main

    return main(argv)


EVAL_CASES = [
    ("lengths", ["--perplexity.lengths", "[0]"], "perplexity.lengths", ["positive integer"]),
    ("lengths_type", ["--perplexity.lengths", "many"], "perplexity.lengths", ["list"]),
    ("typo", ["--perplexity.lenghts", "[64]"], "perplexity.lenghts", ["--perplexity.lengths"]),
    ("top_fraction", ["--heads.analysis.top_fraction", "2"], "heads.analysis.top_fraction", ["(0, 1]"]),
    ("rank_by", ["--heads.analysis.rank_by", "z"], "heads.analysis.rank_by", []),
    ("rope_method", ["--rope.method", "rotary"], "rope.method", ["yarn"]),
    ("rope_factor", ["--rope", "{method: yarn, factor: 0.5}"], "rope.factor", []),
    ("lora_r", ["--model.lora", "{r: 0}"], "model.lora.r", [">= 1"]),
    ("haystack_kind", ["--needle.haystack", "{kind: novels}"], "needle.haystack.kind", ["stdlib"]),
    ("task", ["--tasks", "[perplexity, speed]"], "tasks", ["speed"]),
    ("condition", ["--sweep.conditions", "[none, bogus]"], "sweep.conditions", ["bogus"]),
    ("depth", ["--passkey.depths", "[0.5, 1.5]"], "passkey.depths", ["[0, 1]"]),
    ("stride", ["--perplexity.stride", "100"], "perplexity.stride", ["64"]),
    ("length_policy", ["--length_policy", "maybe"], "length_policy", []),
    ("device", ["--device", "tpu"], "device", []),
    ("no_model", ["--model.name_or_path", "/nonexistent/model"], "model.name_or_path", []),
    ("user_heads", ["--sweep.user_heads", "[[0, 1], [9, 0]]"], "sweep.user_heads", ["layer 9"]),
    (
        "no_table",
        ["--tasks", "[perplexity]", "--heads.from_results", "nowhere.csv"],
        "heads.from_results",
        [],
    ),
    (
        "too_long",
        ["--perplexity.lengths", "[64, 100000]", "--length_policy", "allow"],
        "perplexity.lengths",
        ["no document"],
    ),
    (
        "over_supported",
        ["--passkey.lengths", "[600]", "--length_policy", "error"],
        "passkey.lengths",
        ["512"],
    ),
    ("prompt_too_long", ["--passkey.lengths", "[200]"], "passkey.lengths", ["too short"]),
    (
        "heads_length",
        ["--heads.length", "100000", "--length_policy", "allow"],
        "heads.length",
        ["no document"],
    ),
    ("critical_pair", ["--sweep.critical_pair", "9"], "sweep.critical_pair", []),
]


@pytest.mark.parametrize(
    "overrides,option,words", [c[1:] for c in EVAL_CASES], ids=[c[0] for c in EVAL_CASES]
)
def test_eval_refuses(tmp_path, no_weights, capsys, overrides, option, words):
    _refused(_eval_main, _eval(tmp_path, *overrides), capsys, option, *words)
    assert not (tmp_path / "run" / "results.json").exists()


def test_eval_output_dir_not_writable(tmp_path, no_weights, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = _eval(tmp_path) + ["--output.dir", str(blocker / "run")]
    _refused(_eval_main, argv, capsys, "output.dir", "not a writable directory")


def test_eval_local_model_without_context_is_not_guessed(tmp_path, no_weights, capsys):
    model = _local_model(tmp_path, drop=("max_position_embeddings",))
    argv = _eval(tmp_path, "--model", json.dumps({"name_or_path": model}))
    _refused(_eval_main, argv, capsys, "heads.analysis.original_context", "pre-trained on")
    argv = _eval(
        tmp_path, "--model", json.dumps({"name_or_path": model}), "--rope", "{method: yarn, factor: 2}"
    )
    _refused(_eval_main, argv, capsys, "rope.original_max_position_embeddings")


def _results(run: Path, config: dict, rows: bool = True) -> None:
    run.mkdir(parents=True, exist_ok=True)
    data = {
        "protocol": {"config": config},
        "perplexity": [{"condition": "none", "length": 64}] if rows else [],
    }
    (run / "results.json").write_text(json.dumps(data))


def test_eval_resume_unreadable_results(tmp_path, no_weights, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text('{"protocol": {"config": ')  # cut off
    argv = _eval(tmp_path, "--output.resume", "true")
    _refused(_eval_main, argv, capsys, "output.resume", "cannot be read", "hint:")


def test_eval_resume_with_another_protocol(tmp_path, no_weights, capsys):
    """results.json was made on another model: resuming would mix the two under the new protocol."""
    import dataclasses

    from posheads.eval.cli import parse_config

    cfg = parse_config(_eval(tmp_path))
    old = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    old["model"]["tiny"]["seed"] = 7
    _results(tmp_path / "run", old)
    before = (tmp_path / "run" / "results.json").read_text()
    argv = _eval(tmp_path, "--output.resume", "true")
    _refused(_eval_main, argv, capsys, "output.resume", "model.tiny.seed (7 -> 0)")
    assert (tmp_path / "run" / "results.json").read_text() == before


def _table(path: Path, identity: dict | None) -> Path:
    head = "" if identity is None else "# posheads-model: " + json.dumps(identity) + "\n"
    rows = "layer,head,score,z,positional\n0,1,0.9,2.0,True\n1,2,0.1,0.0,False\n"
    path.write_text(head + rows)
    return path


def _tiny_identity(tmp_path: Path) -> dict:
    from posheads.eval.cli import parse_config, peek_model_config
    from posheads.eval.headtable import model_identity

    cfg = parse_config(_eval(tmp_path))
    return model_identity(cfg.model, peek_model_config(cfg.model))


def test_eval_head_table_from_another_model(tmp_path, no_weights, capsys):
    identity = dict(_tiny_identity(tmp_path), model="meta-llama/Llama-2-7b-hf")
    table = _table(tmp_path / "heads.csv", identity)
    argv = _eval(tmp_path, "--tasks", "[perplexity]", "--heads.from_results", str(table))
    _refused(_eval_main, argv, capsys, "heads.from_results", "another model", "heads.allow_other_model")


def test_eval_head_table_unreadable(tmp_path, no_weights, capsys):
    table = tmp_path / "heads.json"
    table.write_text("[{")
    argv = _eval(tmp_path, "--tasks", "[perplexity]", "--heads.from_results", str(table))
    _refused(_eval_main, argv, capsys, "heads.from_results", "cannot be read")


def test_eval_head_table_of_this_model_passes_the_checks(tmp_path, no_weights):
    """Same identity: the checks pass and the run stops only at the weights (the fixture)."""
    from posheads.eval.headtable import read_identity

    identity = _tiny_identity(tmp_path)
    table = _table(tmp_path / "heads.csv", identity)
    assert read_identity(table) == identity
    argv = _eval(tmp_path, "--tasks", "[passkey]", "--heads.from_results", str(table))
    with pytest.raises(AssertionError, match="weights were loaded"):
        _eval_main(argv)


# ------------------------------------------------------------------------------------------ the messages


@pytest.mark.parametrize(
    "message,option,line",
    [
        ("optim.lr=-1.0 must be > 0.0", "optim.lr", "optim.lr=-1.0: must be > 0.0"),
        ("perplexity.lengths=[0]: 0 is not a positive integer", "perplexity.lengths", None),
        ("tasks: unknown task 'x'", "tasks", "tasks: unknown task 'x'"),
    ],
)
def test_plain_messages_become_one_format(message, option, line):
    err = as_config_error(ValueError(message))
    assert err.option == option
    assert err.lines()[0] == "error: " + (line or message)


def test_relocation_moves_every_mention():
    from posheads.errors import located

    with pytest.raises(ConfigError) as info, located(("rope", "model.rope")):
        raise ValueError(
            "rope.max_position_embeddings=10 must be >= rope.original_max_position_embeddings=20"
        )
    assert str(info.value) == (
        "model.rope.max_position_embeddings=10: must be >= model.rope.original_max_position_embeddings=20"
    )


def test_argparse_union_error_keeps_our_message():
    import argparse

    text = (
        'Parser key "rope":\n  Does not validate against any of the Union subtypes\n  Errors:\n'
        "    - rope.method='foo' is not one of ['yarn']\n    - Expected a <class 'NoneType'>"
    )
    err = from_argparse(argparse.ArgumentError(None, text))
    assert err.option == "rope.method" and "Expected" not in str(err)


# ------------------------------------------------------------------------------------------ files


def test_atomic_write_keeps_the_previous_file_and_the_umask(tmp_path):
    from posheads.atomic import atomic_open, atomic_write_json

    path = tmp_path / "results.json"
    atomic_write_json(path, {"rows": 1})
    old_mask = os.umask(0o022)
    try:
        atomic_write_json(path, {"rows": 2})
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as open() would make it, not mkstemp's 0600
        with pytest.raises(RuntimeError), atomic_open(path) as fh:  # a crash in the middle of the write
            fh.write('{"rows": 3, "cut')
            raise RuntimeError("disk full")
        with pytest.raises(TypeError):  # not serialisable: nothing is written
            atomic_write_json(path, {"rows": object()})
    finally:
        os.umask(old_mask)
    assert json.loads(path.read_text()) == {"rows": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_results_file_mode_follows_umask(tmp_path):
    from posheads.eval.results import ResultsFile

    old_mask = os.umask(0o027)
    try:
        ResultsFile(tmp_path, {"model": "m"})
    finally:
        os.umask(old_mask)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o640


def test_resumed_evaluation_writes_each_trial_once(tmp_path):
    """Interrupted in the middle of a cell: its trials are on disk but its row is not. The resumed run computes
    the cell again; trials.jsonl ends with each trial once."""
    from posheads.eval.results import ResultsFile

    def trial(depth, seed):
        return {
            "task": "passkey",
            "condition": "none",
            "length": 8,
            "depth": depth,
            "seed": seed,
            "correct": True,
        }

    res = ResultsFile(tmp_path, {"model": "m"})
    for seed in (1, 2):
        res.trial(trial(0.5, seed))
    res.append("passkey", {"condition": "none", "length": 8, "depth": 0.5, "accuracy": 1.0, "trials": 2})
    res.trial(trial(0.25, 3))  # the interrupted cell: one of its trials written, no row
    with (tmp_path / "trials.jsonl").open("a") as fh:
        fh.write('{"task": "passkey", "cond')  # a line cut off by the kill

    again = ResultsFile(tmp_path, {"model": "m"}, resume=True)
    for seed in (1, 2):  # a finished cell's trials offered again are not written twice
        again.trial(trial(0.5, seed))
    for seed in (3, 4):  # the unfinished cell, computed again
        again.trial(trial(0.25, seed))
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    keys = [(r["depth"], r["seed"]) for r in records]
    assert sorted(keys) == [(0.25, 3), (0.25, 4), (0.5, 1), (0.5, 2)]


def test_failed_evaluation_is_recorded_as_failed(tmp_path, monkeypatch):
    import posheads.eval.cli as cli

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(cli, "evaluate_perplexity_lengths", boom)
    argv = _eval(
        tmp_path, "--tasks", "[perplexity]", "--sweep.conditions", "[none]", "--output.plots", "false"
    )
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(argv)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["status"] == "failed" and data["failure"] == "RuntimeError: out of memory"


def test_empty_file_is_not_a_document(tmp_path):
    from posheads.data import LocalFilesCorpus

    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n")
    (tmp_path / "rows.jsonl").write_text('{"text": "row"}\n{"text": ""}\n')
    names = [d.name for d in LocalFilesCorpus([str(tmp_path)]).documents()]
    assert [Path(n.split(":")[0]).name for n in names] == ["a.txt", "rows.jsonl"]


def test_head_table_stamp_round_trip(tmp_path):
    from posheads.eval.headtable import read_identity, stamp_csv
    from posheads.eval.sweep import read_head_table

    table = _table(tmp_path / "heads.csv", None)
    assert read_identity(table) is None
    identity = {"model": "m", "model_type": "llama", "num_layers": 2, "num_heads": 4, "head_dim": 16}
    stamp_csv(table, identity)
    stamp_csv(table, identity)  # idempotent: one identity line
    assert read_identity(table) == identity
    assert table.read_text().count("# posheads-model") == 1
    rows = read_head_table(table)
    assert [(r["layer"], r["head"], r["positional"]) for r in rows] == [(0, 1, True), (1, 2, False)]


def test_checkpoint_io_is_atomic_and_reports_corruption(tmp_path):
    import torch

    from posheads.lit.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 4}, path)
    assert io.load_checkpoint(path)["global_step"] == 4

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):  # the write fails half-way: the previous checkpoint stays whole
        io.save_checkpoint({"global_step": 5, "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["global_step"] == 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]

    data = path.read_bytes()
    path.write_bytes(data[:-200])
    with pytest.raises(ConfigError, match=r"ckpt_path=.*last\.ckpt.*cannot be read") as info:
        io.load_checkpoint(path)
    assert info.value.hint and "truncated or corrupt" in info.value.hint


def test_run_config_yaml_is_valid_after_save(tmp_path):
    """The saved config.yaml is the resolved config, parseable again (written atomically)."""
    text = _resolved_config(_train(tmp_path))
    assert yaml.safe_load(text)["model"]["rope"]["method"] == "yarn"
