"""results.json (atomic, append-as-you-go, resume), plots and the summary table."""

from __future__ import annotations

import json
import math

import pytest

from posheads.eval.plots import condition_families, plot_results, summary_tables
from posheads.eval.results import ResultsFile, load_results


def _fill(res: ResultsFile):
    res.set(
        "conditions",
        [{"name": "none", "family": "none"}]
        + [{"name": f"random@{s}", "family": "random"} for s in range(3)],
    )
    for cond, base in [("none", 10.0), ("random@0", 11.0), ("random@1", 12.0), ("random@2", 13.0)]:
        for length in (128, 256):
            nll = math.log(base * length / 128)
            res.append(
                "perplexity",
                {
                    "condition": cond,
                    "length": length,
                    "nll": nll,
                    "ppl": math.exp(nll),
                    "tokens": 100,
                    "documents": 2,
                    "windows": 3,
                },
            )
            for depth in (0.1, 0.9):
                res.append(
                    "passkey",
                    {
                        "condition": cond,
                        "length": length,
                        "depth": depth,
                        "accuracy": depth,
                        "trials": 10,
                        "correct": round(10 * depth),
                    },
                )


def test_rows_are_written_as_they_come_and_atomically(tmp_path):
    res = ResultsFile(tmp_path, {"model": "m", "lengths": (1, 2)})
    data = load_results(tmp_path)
    assert set(data) >= {"protocol", "heads", "perplexity", "passkey", "needle", "status"}
    assert data["protocol"]["lengths"] == [1, 2] and data["status"] == "running"
    res.append(
        "perplexity",
        {"condition": "none", "length": 8, "nll": 1.0, "ppl": math.e, "tokens": 3, "documents": 1},
    )
    assert load_results(tmp_path / "results.json")["perplexity"][0]["length"] == 8
    res.append(
        "perplexity",
        {"condition": "none", "length": 8, "nll": 2.0, "ppl": math.e**2, "tokens": 3, "documents": 1},
    )
    assert [r["nll"] for r in load_results(tmp_path)["perplexity"]] == [2.0]  # same key replaces
    res.append(
        "perplexity",
        {
            "condition": "none",
            "length": 9,
            "nll": float("nan"),
            "ppl": float("inf"),
            "tokens": 0,
            "documents": 0,
        },
    )
    assert load_results(tmp_path)["perplexity"][1]["ppl"] is None  # strict JSON
    assert not list(tmp_path.glob(".results-*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="section='bogus'"):
        res.append("bogus", {})


def test_resume_keeps_rows(tmp_path):
    res = ResultsFile(tmp_path, {"model": "m"})
    res.append(
        "passkey",
        {"condition": "none", "length": 8, "depth": 0.5, "accuracy": 1.0, "trials": 2, "correct": 2},
    )
    res.trial({"x": 1})
    again = ResultsFile(tmp_path, {"model": "m"}, resume=True)
    assert again.has("passkey", condition="none", length=8, depth=0.5)
    assert not again.has("passkey", condition="none", length=8, depth=0.25)
    assert (tmp_path / "trials.jsonl").read_text().count("\n") == 1
    fresh = ResultsFile(tmp_path, {"model": "m"})
    assert fresh.rows("passkey") == [] and not (tmp_path / "trials.jsonl").exists()
    # ... and the earlier run is kept beside it, never overwritten (twice: two names)
    kept = sorted(p.name for p in tmp_path.glob("*.replaced-*"))
    assert (
        len(kept) == 2 and kept[0].startswith("results.replaced-") and kept[1].startswith("trials.replaced-")
    )
    assert load_results(tmp_path / kept[0])["passkey"][0]["accuracy"] == 1.0
    ResultsFile(tmp_path, {"model": "m"})
    assert len(list(tmp_path.glob("results.replaced-*.json"))) == 2


def test_plots_and_summary(tmp_path):
    res = ResultsFile(tmp_path, {"model": "tiny"})
    _fill(res)
    data = json.loads((tmp_path / "results.json").read_text())
    assert condition_families(data) == {"none": ["none"], "random": ["random@0", "random@1", "random@2"]}
    paths = plot_results(data, tmp_path)
    assert sorted(p.name for p in paths) == ["passkey.png", "perplexity.png"]
    for p in paths:
        assert p.stat().st_size > 5000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = summary_tables(data)
    assert "Perplexity" in text and "passkey accuracy" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("random@1"))
    assert "12.000" in line and "24.000" in line
    acc = next(
        ln
        for ln in text.splitlines()[
            text.splitlines().index("passkey accuracy (mean over depths [95% Wilson interval]; trials)") :
        ]
        if ln.startswith("none")
    )
    assert "0.50 [0.30, 0.70] (20)" in acc  # Wilson 95 % for 10 / 20
