"""The retrieval-suite summary: pooled cells, contrasts against each Positional set's own clean controls, and
intervals that resample haystacks (the depths of one trial together), not prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from posheads.data.retrieval import derive_seed
from posheads.eval.retrieval_summary import (
    attach_trials,
    summarize,
    summarize_run,
    summary_tables,
)
from posheads.eval.sweep import control_family, own_controls


def _records(
    offsets,
    *,
    task="passkey",
    length=1024,
    depths=(0.1, 0.5, 0.9),
    trials=8,
    base=None,
    correct=None,
    answer_tokens=2,
):
    """One record per (condition, depth, trial): logprob = base[trial] + offsets[condition]."""
    rng = np.random.default_rng(0)
    base = rng.normal(-2.0, 1.0, trials) if base is None else base
    out = []
    for cond, off in offsets.items():
        for depth in depths:
            for t in range(trials):
                lp = float(base[t] + off)
                ok = correct(cond, t) if correct else lp > -3.0
                out.append(
                    {"section": "retrieval", "task": task, "condition": cond, "length": length, "depth": depth,
                     "difficulty": None, "seed": derive_seed(task, 0, length, depth, t), "trial": t,
                     "logprob": lp, "correct": bool(ok), "ranks": [0] * answer_tokens}
                )  # fmt: skip
    return out


def test_control_family():
    assert control_family("random@2") == "random"
    assert control_family("random_allkeys@0") == "random_allkeys"
    assert control_family("random@0:mean") == "random:mean"
    assert control_family("positional") == "positional"
    names = ["none", "random@0", "random@1:mean", "random_allkeys@0", "lowest", "positional:mean"]
    assert own_controls("positional", names) == {"random": ["random@0"], "lowest": ["lowest"]}
    assert own_controls("positional:mean", names) == {"random:mean": ["random@1:mean"]}
    assert own_controls("positional_allkeys", names) == {"random_allkeys": ["random_allkeys@0"]}
    assert own_controls("random@0", names) == {}


def test_contrasts_use_each_sets_own_controls_per_prompt():
    offsets = {
        "none": 0.0,
        "positional": -10.0,
        "random@0": -2.0,
        "random@1": -4.0,
        "positional_allkeys": -5.0,
        "random_allkeys@0": -1.0,
        "random_allkeys@1": -1.0,
    }
    s = summarize(_records(offsets), n_boot=300)
    con = {(c["set"], c["versus"]): c for c in s["contrasts"]}
    assert set(con) == {
        ("positional", "none"),
        ("positional", "random"),
        ("positional_allkeys", "none"),
        ("positional_allkeys", "random_allkeys"),
    }
    c = con[("positional", "random")]
    assert c["controls"] == ["random@0", "random@1"] and c["prompts"] == 24 and c["haystacks"] == 8
    assert c["logprob"]["value"] == pytest.approx(-7.0)  # -10 - mean(-2, -4): per prompt, constant
    assert c["logprob"]["lo"] == pytest.approx(-7.0) and c["logprob"]["hi"] == pytest.approx(-7.0)
    assert c["per_control"]["random@0"]["logprob"]["value"] == pytest.approx(-8.0)
    assert c["per_control"]["random@1"]["logprob"]["value"] == pytest.approx(-6.0)
    assert c["token_logprob"]["value"] == pytest.approx(-3.5)  # 2 answer tokens
    assert c["below_every_control_logprob"]
    assert con[("positional_allkeys", "random_allkeys")]["logprob"]["value"] == pytest.approx(-4.0)
    assert con[("positional_allkeys", "none")]["logprob"]["value"] == pytest.approx(-5.0)
    cells = {c["condition"]: c for c in s["cells"]}
    assert cells["positional"]["minus_none"]["logprob"]["value"] == pytest.approx(-10.0)
    assert "minus_none" not in cells["none"] and cells["none"]["prompts"] == 24
    assert "positional" in summary_tables(s)


def test_intervals_resample_haystacks_not_prompts():
    """Three depths of a trial that agree perfectly carry one haystack's information, not three: the interval
    must equal the one from a single depth (a per-prompt bootstrap would be ~sqrt(3) narrower)."""
    base = np.random.default_rng(1).normal(0.0, 3.0, 12)
    offsets = {"none": 0.0, "positional": 0.0}

    def pos_correct(cond, t):
        return t % 2 == 0

    three = summarize(_records(offsets, base=base, trials=12, correct=pos_correct), n_boot=2000, seed=3)
    one = summarize(
        _records(offsets, base=base, trials=12, depths=(0.5,), correct=pos_correct), n_boot=2000, seed=3
    )
    for metric in ("logprob", "accuracy"):
        a = next(c for c in three["cells"] if c["condition"] == "none")[metric]
        b = next(c for c in one["cells"] if c["condition"] == "none")[metric]
        assert a["value"] == pytest.approx(b["value"])
        assert (a["lo"], a["hi"]) == pytest.approx((b["lo"], b["hi"]))


def test_pooled_weighs_tasks_equally_and_prompts_must_pair():
    recs = _records({"none": 0.0, "positional": -2.0}, task="passkey", trials=4)
    recs += _records({"none": 0.0, "positional": -8.0}, task="vartrack", trials=10)
    # a cut-off cell: one positional prompt without its `none` partner is left out of the paired numbers
    recs = [r for r in recs if not (r["task"] == "vartrack" and r["condition"] == "none" and r["trial"] == 9)]
    s = summarize(recs, n_boot=200)
    (p,) = [p for p in s["pooled"] if p["versus"] == "none"]
    assert p["logprob"]["value"] == pytest.approx(-5.0) and p["tasks"] == ["passkey", "vartrack"]
    vt = next(c for c in s["contrasts"] if c["task"] == "vartrack" and c["versus"] == "none")
    assert vt["prompts"] == 27 and vt["haystacks"] == 9


def test_attach_trials_recovers_old_records_and_refuses_strangers():
    recs = [
        {"task": "passkey", "length": 512, "depth": 0.5, "difficulty": None,
         "seed": derive_seed("passkey", 7, 512, 0.5, 3)},
        {"task": "needle", "length": 512, "depth": 0.9, "difficulty": None,
         "seed": derive_seed("haystack", "needle", 7, 512, 2)},
        {"task": "cwe", "length": 512, "depth": None, "difficulty": 3, "seed": derive_seed("cwe", 7, 512, 3, 4)},
    ]  # fmt: skip
    assert [r["trial"] for r in attach_trials(recs, seed=7, trials=5)] == [3, 2, 4]
    with pytest.raises(ValueError, match="no trial of retrieval.seed=8"):
        attach_trials(recs, seed=8, trials=5)


def test_summarize_run_reads_a_run_directory(tmp_path):
    recs = _records({"none": 0.0, "positional": -3.0, "random@0": -1.0}, trials=3)
    for r in recs:
        del r["trial"]  # as written before the index was recorded: recovered from the seed
    (tmp_path / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"cut off')
    proto = {"model": "tiny", "retrieval": {"seed": 0, "trials": 3}}
    (tmp_path / "results.json").write_text(json.dumps({"protocol": proto}))
    s = summarize_run(tmp_path, n_boot=100)
    assert s["protocol"]["model"] == "tiny" and s["protocol"]["retrieval"]["trials"] == 3
    c = next(c for c in s["contrasts"] if c["versus"] == "random")
    assert c["logprob"]["value"] == pytest.approx(-2.0) and c["haystacks"] == 3


def test_a_mean_ablated_set_is_compared_with_mean_ablated_controls():
    offsets = {
        "none": 0.0,
        "positional:mean": -6.0,
        "random@0:mean": -1.0,
        "random@1:mean": -3.0,
        "random@0": -9.0,
    }
    s = summarize(_records(offsets), n_boot=100)
    con = {(c["set"], c["versus"]): c for c in s["contrasts"]}
    assert set(con) == {("positional:mean", "none"), ("positional:mean", "random:mean")}
    assert con[("positional:mean", "random:mean")]["controls"] == ["random@0:mean", "random@1:mean"]
    assert con[("positional:mean", "random:mean")]["logprob"]["value"] == pytest.approx(-4.0)
