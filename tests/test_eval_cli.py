"""evaluate.py: configuration, bad input refused before any model work, the CI config end to end."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

import posheads.models
from posheads.eval.cli import main, parse_config

ROOT = Path(__file__).resolve().parents[1]
CI_CONFIG = ROOT / "configs" / "eval" / "ci_tiny.yaml"


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if the model's weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("load_model was called before the input was validated")

    monkeypatch.setattr(posheads.models, "load_model", refuse)


def _ci(tmp_path, *overrides):
    """Arguments of a CI run; ``--traceback`` makes a refused input raise its ``ConfigError`` (a ``ValueError``)
    instead of exiting with status 2 (tests/test_bad_input.py checks the exit and the printed line)."""
    return ["--config", str(CI_CONFIG), "--output.dir", str(tmp_path / "run"), "--traceback", *overrides]


def test_help_works(monkeypatch, capsys):
    """``python evaluate.py --help`` (the real entry file, run in-process to save the interpreter start)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "evaluate.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--config", "--perplexity.lengths", "--sweep.conditions", "--passkey.depths", "--tasks"):
        assert option in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
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
        (["--perplexity.stride", "100"], "perplexity.stride=100: exceeds the shortest length 64"),
        (
            ["--tasks", "[perplexity]"],
            r"need the Positional Heads: add 'heads' to tasks or set heads.from_results",
        ),
        (["--sweep.conditions", "[none, heads]", "--sweep.user_heads", "[]"], "user_heads=\\[\\] is empty"),
        (["--length_policy", "maybe"], "length_policy='maybe'"),
        (
            ["--heads.from_results", "old/results.json"],
            "heads.from_results='old/results.json' and tasks with 'heads'",
        ),
        (["--heads.analysis.rank_by", "z"], "heads.analysis.rank_by=.z.: is not one of"),
        (
            ["--perplexity.conditions_at", "{128: [none, lowst]}"],
            r"conditions_at\[128\]: unknown condition 'lowst'",
        ),
        (
            ["--perplexity.conditions_at", "{100: [none]}"],
            "conditions_at: 100 is not one of perplexity.lengths",
        ),
        (["--perplexity.nested", "true", "--perplexity.stride", "32"], "nested=true:? needs stride: null"),
        (["--sweep.conditions", "[none, dims_high:mean]"], "takes no ablation mode"),
        (["--sweep.conditions", "[none, positional, positional]"], "has duplicates"),
    ],
)
def test_bad_config_is_refused(tmp_path, no_weights, overrides, match):
    with pytest.raises(ValueError, match=match):
        main(_ci(tmp_path, *overrides))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["--sweep.user_heads", "[[0, 1], [4, 0]]"],
            r"entry \[4, 0\]: layer 4 is out of range, the model has 4 layers",
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
        (["--sweep.critical_pair", "9"], "critical_pair=9: must be in"),
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


def test_table_without_recorded_probes_is_refused(tmp_path, no_weights):
    table = tmp_path / "heads.json"
    table.write_text(json.dumps([{"layer": 1, "head": 0, "score": 1.0, "z": 2.0, "positional": True}]))
    with pytest.raises(ValueError, match="does not record the documents its heads were identified on"):
        main(_ci(tmp_path, "--tasks", "[perplexity]", "--heads.from_results", str(table)))
    with pytest.raises(ValueError, match=r"heads.probe_documents: \['nope'\] are not documents"):
        main(
            _ci(
                tmp_path,
                "--tasks",
                "[perplexity]",
                "--heads.from_results",
                str(table),
                "--heads.probe_documents",
                "[nope]",
            )
        )


def test_ci_config_end_to_end(tmp_path):
    data = main(_ci(tmp_path))
    run = tmp_path / "run"
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(data))
    assert {"protocol", "heads", "perplexity", "passkey", "needle"} <= set(on_disk)
    assert on_disk["status"] == "complete"
    proto = on_disk["protocol"]
    for key in (
        "model",
        "dtype",
        "attn_implementation",
        "scaling",
        "corpus",
        "lengths",
        "stride",
        "seeds",
        "versions",
    ):
        assert key in proto, key
    assert proto["versions"]["torch"] and proto["critical_pair"] == 4  # quarter of head_dim 16

    heads = on_disk["heads"]
    assert len(heads) == 4 * 4 and all({"layer", "head", "score", "z", "positional"} <= set(r) for r in heads)
    n_pos = sum(r["positional"] for r in heads)
    assert n_pos == 4  # top 25 % of 16 heads

    names = [c["name"] for c in on_disk["conditions"]]
    assert names == [
        "none",
        "positional",
        "random@0",
        "random@1",
        "random@2",
        "lowest",
        "heads",
        "dims_high",
        "dims_low",
    ]
    ppl = on_disk["perplexity"]
    assert {(r["condition"], r["length"]) for r in ppl} == {(n, L) for n in names for L in (64, 128, 256)}
    for r in ppl:
        assert set(r) >= {"condition", "length", "nll", "ppl", "tokens", "documents"}
        assert r["ppl"] == pytest.approx(2.718281828459045 ** r["nll"]) and r["documents"] == 2
    for task, lengths, depths in (("passkey", (300, 400), (0.2, 0.8)), ("needle", (320, 400), (0.5,))):
        rows = on_disk[task]
        assert {(r["condition"], r["length"], r["depth"]) for r in rows} == {
            (n, L, d) for n in names for L in lengths for d in depths
        }
        assert all(set(r) >= {"condition", "length", "depth", "accuracy", "trials"} for r in rows)
    # held-out text: the probes are named, and no perplexity window comes from a probe document
    probes = {p["document"] for p in proto["probes"]}
    assert len(probes) == 2 and proto["corpus"]["held_out"] == sorted(
        probes, key=proto["corpus"]["held_out"].index
    )
    for r in ppl:
        assert r["per_window"] and not {w["document"] for w in r["per_window"]} & probes
        assert sum(w["tokens"] for w in r["per_window"]) == r["tokens"]
    # intervals over documents for every row, paired contrasts against none and the random controls
    iv = on_disk["perplexity_intervals"]["lengths"]["128"]
    assert iv["n_documents"] == 2 and set(iv["conditions"]) == set(names)
    for name, c in iv["conditions"].items():
        row = next(r for r in ppl if r["condition"] == name and r["length"] == 128)
        assert c["nll"] == pytest.approx(row["nll"]) and c["lo"] <= c["nll"] <= c["hi"]
    assert {
        "positional - none",
        "positional - mean(random)",
        "positional - random@1",
        "positional - lowest",
    } <= set(iv["contrasts"])
    assert "dims_high - dims_low" in iv["contrasts"]
    for c in on_disk["conditions"]:
        if c["family"] == "random" or c["name"] == "lowest":
            pos = {
                tuple(h) for h in next(x for x in on_disk["conditions"] if x["name"] == "positional")["heads"]
            }
            assert not {tuple(h) for h in c["heads"]} & pos
    trials = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    greedy_trials = [t for t in trials if t.get("section") != "retrieval"]
    assert len(greedy_trials) == len(names) * (4 + 2)
    lc = on_disk["perplexity_lc"]
    assert {r["condition"] for r in lc} == set(names) and all(r["length"] == 128 for r in lc)
    assert len({r["tokens_lc"] for r in lc}) == 1 and 0 < lc[0]["tokens_lc"] < lc[0]["tokens"]
    # the suite: 6 depth tasks x 1 depth + cwe x 1 difficulty, 1 trial each, every condition
    suite = on_disk["retrieval"]
    assert len(suite) == len(names) * 7
    assert len(trials) - len(greedy_trials) == len(names) * 7
    assert all(r["trials"] == 1 and r["greedy_agrees"] == 1 for r in suite)  # scoring: both
    assert {r["task"] for r in suite} == {
        "passkey", "needle", "multikey", "multivalue", "multiquery", "vartrack", "cwe"
    }  # fmt: skip
    assert proto["retrieval_templates"]["multikey"]["question"].startswith("What is the special magic")
    assert (run / "retrieval_vartrack.png").read_bytes()[:4] == b"\x89PNG"
    summary = on_disk["retrieval_summary"]  # pooled over depths; one prompt each: no interval to give
    assert {c["task"] for c in summary["cells"]} == {r["task"] for r in suite}
    assert all(c["prompts"] == 1 and c["logprob"]["lo"] is None for c in summary["cells"])
    versus = {(c["set"], c["versus"]) for c in summary["contrasts"]}
    assert versus == {("positional", "none"), ("positional", "random"), ("positional", "lowest")}
    for png in ("retrieval_accuracy.png", "retrieval_contrasts.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png
    for png in ("perplexity.png", "passkey.png", "needle.png", "scores_heatmap.png", "hda_curves.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG", png
    assert (run / "heads.csv").is_file()


def test_resume_skips_finished_rows_and_reads_a_previous_table(tmp_path, monkeypatch):
    first = main(_ci(tmp_path, "--tasks", "[heads, perplexity]", "--output.plots", "false"))
    run = str(tmp_path / "run")
    import posheads.eval.cli as cli

    def refuse(*args, **kwargs):
        raise AssertionError("a finished row was computed again")

    monkeypatch.setattr(cli, "evaluate_perplexity_lengths", refuse)
    again = main(
        _ci(
            tmp_path,
            "--tasks",
            "[perplexity]",
            "--heads.from_results",
            run,
            "--output.resume",
            "true",
            "--output.plots",
            "false",
        )
    )
    assert again["perplexity"] == first["perplexity"] and again["heads"] == first["heads"]

    # a new run reading the first run's head table reproduces its conditions and numbers
    monkeypatch.undo()
    other = str(tmp_path / "other")
    reused = main(
        _ci(
            tmp_path,
            "--tasks",
            "[perplexity]",
            "--heads.from_results",
            run,
            "--output.dir",
            other,
            "--output.plots",
            "false",
        )
    )
    assert reused["conditions"] == first["conditions"]
    assert reused["heads"] == []
    by = {(r["condition"], r["length"]): r["nll"] for r in first["perplexity"]}
    for r in reused["perplexity"]:
        assert r["nll"] == pytest.approx(by[(r["condition"], r["length"])], rel=1e-9)

    # resuming into a directory made with another protocol is refused, naming what differs
    with pytest.raises(ValueError, match=r"output.resume=True: .* another protocol: .*sweep.random_seeds"):
        main(
            _ci(
                tmp_path,
                "--tasks",
                "[perplexity]",
                "--heads.from_results",
                run,
                "--output.resume",
                "true",
                "--sweep.random_seeds",
                "[7, 8, 9]",
            )
        )


@pytest.mark.slow
def test_wandb_logging_offline(tmp_path, monkeypatch):
    """With output.wandb set, tables, summary values and the PNGs go to an (offline) W&B run in the run dir."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    main(
        _ci(
            tmp_path,
            "--tasks",
            "[perplexity]",
            "--sweep.conditions",
            "[none]",
            "--output.wandb.project",
            "posheads-test",
            "--output.wandb.mode",
            "offline",
        )
    )
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb")), "no W&B event file was written"
    import os

    assert "WANDB_DIR" not in os.environ  # the run's W&B directories are scoped to the call


def test_mean_ablation_of_a_previous_table_without_a_corpus_task(tmp_path):
    """A passkey-only suite (no haystack, so no corpus task) with mean ablation still takes the head means on
    the previous identification's probe documents (regression: the corpus was not loaded and the run failed)."""
    main(_ci(tmp_path, "--tasks", "[heads]", "--output.plots", "false"))
    out = main(
        _ci(
            tmp_path,
            "--tasks",
            "[retrieval]",
            "--retrieval.tasks",
            "[passkey]",
            "--sweep.conditions",
            '[none, "positional:mean"]',
            "--heads.from_results",
            str(tmp_path / "run"),
            "--output.dir",
            str(tmp_path / "mean"),
            "--output.plots",
            "false",
        )
    )
    assert {r["condition"] for r in out["retrieval"]} == {"none", "positional:mean"}
    assert out["protocol"]["corpus"]["held_out"]
