"""Perplexity by length: equality with an independent plain-loss computation, windows, score_last."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posheads.data import TokenizedDocument, window_document
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.perplexity import (
    evaluate_perplexity,
    evaluate_perplexity_lengths,
    perplexity_intervals,
    perplexity_windows,
    scored_offset,
    token_nll_sums,
)


@pytest.fixture(scope="module")
def model():
    from posheads.models import tiny_llama

    return tiny_llama()


def _docs(lengths=(300, 170, 90, 520), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        TokenizedDocument(f"d{i}", torch.randint(0, 256, (n,), generator=g)) for i, n in enumerate(lengths)
    ]


def _reference(model, docs, length, stride=None, score_last=None):
    """Plain Hugging Face loss over the same windows: labels -100 before the scored region."""
    total, count, used = 0.0, 0, set()
    for doc in docs:
        for w in window_document(doc, length, stride=stride):
            ids = doc.ids[w.start : w.end][None]
            labels = ids.clone()
            first = w.score_offset
            if score_last is not None:
                first = max(
                    first,
                    length - (score_last if isinstance(score_last, int) else math.ceil(score_last * length)),
                )
            labels[:, :first] = -100
            n = int((labels[:, 1:] != -100).sum())
            with torch.no_grad():
                loss = model(input_ids=ids, labels=labels).loss
            total += float(loss) * n
            count += n
            used.add(doc.name)
    return total / count, count, len(used)


@pytest.mark.parametrize("stride,score_last", [(None, None), (32, None), (None, 40), (48, 0.25)])
def test_matches_plain_model_loss(model, stride, score_last):
    docs = _docs()
    (row,) = evaluate_perplexity(model, docs, 128, stride=stride, score_last=score_last, progress=False)
    nll, tokens, documents = _reference(model, docs, 128, stride, score_last)
    assert row.condition == "none" and row.length == 128
    assert row.tokens == tokens and row.documents == documents == 3  # the 90-token document is too short
    assert row.nll == pytest.approx(nll, rel=1e-5)
    assert row.ppl == pytest.approx(math.exp(nll), rel=1e-5)


def test_sliding_windows_score_every_token_once(model):
    docs = _docs((300,))
    (row,) = evaluate_perplexity(model, docs, 128, stride=64, progress=False)
    assert row.tokens == 300 - 1  # every token but the first is predicted exactly once


def test_token_nll_chunking_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 37, 11, generator=g)
    targets = torch.randint(0, 11, (2, 37), generator=g)
    ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1).double()
    torch.testing.assert_close(token_nll_sums(logits, targets, chunk=5), ref, rtol=1e-6, atol=1e-6)


def test_scored_offset_rules():
    docs = _docs((300,))
    w0, w1 = window_document(docs[0], 128, stride=64)[:2]
    assert scored_offset(w0, None) == 1  # nothing before the first token
    assert scored_offset(w1, None) == 64
    assert scored_offset(w0, 16) == 112
    assert scored_offset(w1, 100) == 64  # never re-scores what the previous window scored
    assert scored_offset(w0, 0.5) == 64
    with pytest.raises(ValueError, match="score_last"):
        scored_offset(w0, 1.5)


def test_no_document_long_enough_is_a_clear_error():
    with pytest.raises(ValueError, match="length=1000: no document has at least 1000 tokens"):
        perplexity_windows(_docs(), 1000)


def test_same_documents_for_every_length():
    docs = _docs()  # 300, 170, 90, 520 tokens
    assert {d.name for d, _ in perplexity_windows(docs, 64)} == {"d0", "d1", "d2", "d3"}
    assert {d.name for d, _ in perplexity_windows(docs, 64, min_document_tokens=256)} == {"d0", "d3"}
    with pytest.raises(ValueError, match="no document has at least 600 tokens"):
        perplexity_windows(docs, 64, min_document_tokens=600)


def test_caps_on_windows_and_documents():
    pairs = perplexity_windows(_docs(), 64, max_windows_per_doc=2, max_documents=2)
    assert [(d.name, w.start) for d, w in pairs] == [("d0", 0), ("d0", 64), ("d1", 0), ("d1", 64)]
    assert len(perplexity_windows(_docs(), 64, max_windows=3)) == 3


def test_runner_rows_and_groups(model):
    """Every condition of a runner gets a row; no-op conditions equal 'none' exactly, in any grouping."""
    conds = [NONE, Condition("empty", "heads", ()), Condition("also-none")]
    docs = _docs((300, 200))
    seen = []
    for rows in (1, 2, 3):
        runner = ConditionRunner(model, conds, max_rows=rows)
        out = evaluate_perplexity(model, docs, 96, runner=runner, progress=False, on_row=seen.append)
        assert [r.condition for r in out] == ["none", "empty", "also-none"]
        assert len({r.nll for r in out}) == 1
    assert len(seen) == 9


def test_runner_rejects_ablating_conditions_without_apply(model):
    runner = ConditionRunner(model, [NONE, Condition("x", "heads", ((0, 1),))], max_rows=2)
    with pytest.raises(ValueError, match="without an ablation function"):
        evaluate_perplexity(model, _docs(), 64, runner=runner, progress=False)


def test_out_of_memory_falls_back_to_smaller_groups(model):
    conds = [NONE, Condition("b"), Condition("c"), Condition("d")]
    calls = []

    def fake_forward(n):
        calls.append(n)
        if n > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return torch.zeros(n)

    runner = ConditionRunner(model, conds, max_rows=4)
    out = runner.call(conds, fake_forward)
    assert len(out) == 4 and calls == [4, 2, 1, 1, 1, 1]
    assert runner.max_rows == 1


# ---------------------------------------------------------------------------------------------------------
# per-window records, nested prefixes, intervals
# ---------------------------------------------------------------------------------------------------------


def test_rows_name_their_windows(model):
    (row,) = evaluate_perplexity(model, _docs(), 64, max_windows_per_doc=2, progress=False)
    assert row.windows == len(row.per_window) == 7  # d0: 2, d1: 2, d2: 1, d3: 2
    assert {w["document"] for w in row.per_window} == {"d0", "d1", "d2", "d3"}
    assert sum(w["tokens"] for w in row.per_window) == row.tokens
    assert math.isclose(sum(w["nll_sum"] for w in row.per_window) / row.tokens, row.nll, rel_tol=1e-12)
    first = row.per_window[0]
    assert (first["start"], first["end"], first["scored_from"], first["tokens"]) == (0, 64, 1, 63)


@pytest.mark.parametrize("score_last", [None, 20])
def test_nested_prefixes_equal_separate_windows(model, score_last):
    docs = _docs((300, 170, 90, 520, 260))
    lengths = [64, 128, 256]
    conds = [NONE, Condition("h", "heads", ((0, 1), (1, 0)))]

    from posheads.eval.identify import ablation_apply

    def run(nested):
        runner = ConditionRunner(model, conds, ablation_apply("zero", None, None), max_rows=2)
        return evaluate_perplexity_lengths(
            model,
            docs,
            lengths,
            nested=nested,
            score_last=score_last,
            max_windows_per_doc=1,
            max_documents=3,
            max_documents_per_length={256: 2},
            runner=runner,
            progress=False,
        )

    sep = {(r.condition, r.length): r for r in run(False)}
    nest = {(r.condition, r.length): r for r in run(True)}
    assert set(sep) == set(nest) == {(c.name, L) for c in conds for L in lengths}
    for key, r in sep.items():
        n = nest[key]
        assert [(w["document"], w["start"], w["end"], w["tokens"]) for w in n.per_window] == [
            (w["document"], w["start"], w["end"], w["tokens"]) for w in r.per_window
        ]
        assert n.nll == pytest.approx(r.nll, abs=2e-5), key
    assert sep[("none", 256)].documents == 2 and sep[("none", 64)].documents == 3
    assert sep[("h", 128)].nll != sep[("none", 128)].nll  # the ablation acted


def test_nested_refuses_sliding_windows(model):
    with pytest.raises(ValueError, match="nested perplexity needs disjoint windows"):
        evaluate_perplexity_lengths(model, _docs(), [64], nested=True, stride=32, progress=False)


def _results(per_doc_nll, tokens, conditions):
    rows = []
    for cond, values in per_doc_nll.items():
        windows = [
            {"document": f"d{i}", "start": 0, "end": t + 1, "scored_from": 1, "tokens": t, "nll_sum": v * t}
            for i, (v, t) in enumerate(zip(values, tokens))
        ]
        total = sum(tokens)
        nll = sum(w["nll_sum"] for w in windows) / total
        rows.append(
            {"condition": cond, "length": 64, "nll": nll, "ppl": math.exp(nll), "per_window": windows}
        )
    return {"perplexity": rows, "conditions": conditions}


def test_perplexity_intervals_contrasts_are_paired_and_pooled():
    base = [2.0, 3.0, 2.5, 4.0, 1.5, 3.5]
    tokens = [63, 40, 63, 50, 63, 30]
    per_doc = {
        "none": base,
        "positional": [v + 0.5 for v in base],  # +0.5 on every document
        "random@0": [v + 0.1 for v in base],
        "random@1": [v + 0.2 for v in base],
        "lowest": [v + 0.05 for v in base],
    }
    conds = [
        {"name": "none", "kind": "none", "family": "none"},
        {"name": "positional", "kind": "heads", "family": "positional"},
        {"name": "random@0", "kind": "heads", "family": "random"},
        {"name": "random@1", "kind": "heads", "family": "random"},
        {"name": "lowest", "kind": "heads", "family": "lowest"},
    ]
    out = perplexity_intervals(_results(per_doc, tokens, conds), n_boot=300)
    at = out["lengths"]["64"]
    k = at["contrasts"]
    assert at["n_documents"] == 6 and at["documents"] == [f"d{i}" for i in range(6)]
    # paired: a constant per-token shift has a zero-width interval despite wide per-condition intervals
    for name, value in (
        ("positional - none", 0.5),
        ("positional - random@0", 0.4),
        ("positional - mean(random)", 0.35),
        ("positional - lowest", 0.45),
        ("mean(random) - none", 0.15),
    ):
        assert k[name]["value"] == pytest.approx(value), name
        assert k[name]["lo"] == pytest.approx(value) and k[name]["hi"] == pytest.approx(value), name
    assert at["conditions"]["none"]["hi"] - at["conditions"]["none"]["lo"] > 0.3
    # a row on other documents is left out of the paired comparison, not silently mixed in
    data = _results(per_doc, tokens, conds)
    data["perplexity"][2]["per_window"][0]["document"] = "elsewhere"
    assert perplexity_intervals(data, n_boot=50)["lengths"]["64"]["skipped"] == ["random@0"]


@pytest.mark.parametrize("nested", [False, True])
def test_conditions_at_restricts_a_length(model, nested):
    from posheads.eval.identify import ablation_apply

    conds = [
        NONE,
        Condition("r@0", "heads", ((0, 1),), family="r"),
        Condition("r@1", "heads", ((1, 1),), family="r"),
        Condition("x", "heads", ((1, 0),)),
    ]
    runner = ConditionRunner(model, conds, ablation_apply("zero", None, None), max_rows=1)
    calls = []
    original = runner.call

    def counting(group, fn, *a, **k):
        calls.append([c.name for c in group])
        return original(group, fn, *a, **k)

    runner.call = counting
    rows = evaluate_perplexity_lengths(
        model,
        _docs((300, 520, 260)),
        [64, 256],
        nested=nested,
        max_windows_per_doc=1,
        conditions_at={256: ["none", "r"]},
        runner=runner,
        progress=False,
    )
    got = {(r.condition, r.length) for r in rows}
    assert got == {
        ("none", 64),
        ("r@0", 64),
        ("r@1", 64),
        ("x", 64),
        ("none", 256),
        ("r@0", 256),
        ("r@1", 256),
    }
    if nested:  # x is fed only at 64 tokens: one forward per document, none at 256
        assert sum(1 for c in calls if c == ["x"]) == 3


def test_summary_tables_and_plot_carry_the_intervals(tmp_path):
    from posheads.eval.plots import plot_perplexity, summary_tables

    base = [2.0, 3.0, 2.5, 4.0]
    per_doc = {"none": base, "positional": [v + 0.5 for v in base], "random@0": [v + 0.1 for v in base]}
    per_doc["random@1"] = [v + 0.3 for v in base]
    conds = [
        {"name": "none", "kind": "none", "family": "none"},
        {"name": "positional", "kind": "heads", "family": "positional"},
        {"name": "random@0", "kind": "heads", "family": "random"},
        {"name": "random@1", "kind": "heads", "family": "random"},
    ]
    data = _results(per_doc, [63, 40, 63, 50], conds)
    for r in data["perplexity"]:
        r.update(tokens=216, documents=4, windows=4)
    data["perplexity_intervals"] = perplexity_intervals(data, n_boot=200)
    text = summary_tables(data)
    assert "[95% document-bootstrap interval]" in text
    assert "positional - mean(random)  +0.3000 [+0.3000, +0.3000]" in text
    assert "positional - none" in text and "documents" in text
    png = plot_perplexity(data, tmp_path / "p.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_merge_split_sweeps(tmp_path):
    from posheads.eval.merge import main as merge_main
    from posheads.eval.merge import merge_results

    base = [2.0, 3.0, 2.5, 4.0]
    tokens = [63, 40, 63, 50]
    conds = {
        "none": {"name": "none", "kind": "none", "family": "none"},
        "positional": {"name": "positional", "kind": "heads", "family": "positional"},
        "random@0": {"name": "random@0", "kind": "heads", "family": "random"},
    }
    a = _results(
        {"none": base, "positional": [v + 0.5 for v in base]}, tokens, [conds["none"], conds["positional"]]
    )
    b = _results(
        {"none": base, "random@0": [v + 0.1 for v in base]}, tokens, [conds["none"], conds["random@0"]]
    )
    for run, names in ((a, ["none", "positional"]), (b, ["none", "random@0"])):
        run["protocol"] = {"model": "m", "conditions": names, "perplexity": {"n_boot": 100}}
        for r in run["perplexity"]:
            r.update(tokens=216, documents=4, windows=4)
    merged = merge_results([a, b])
    assert [c["name"] for c in merged["conditions"]] == ["none", "positional", "random@0"]
    k = merged["perplexity_intervals"]["lengths"]["64"]["contrasts"]["positional - random@0"]
    assert k["value"] == pytest.approx(0.4) and k["lo"] == pytest.approx(0.4)
    # a shared row that differs, or another protocol, is refused
    bad = json.loads(json.dumps(b))
    bad["perplexity"][0]["nll"] += 0.01
    with pytest.raises(ValueError, match="differs between the runs"):
        merge_results([a, bad])
    other = json.loads(json.dumps(b))
    other["protocol"]["model"] = "n"
    with pytest.raises(ValueError, match=r"protocol keys \['model'\]"):
        merge_results([a, other])
    for name, run in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(run))
    merge_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    assert "positional - random@0" in (tmp_path / "m" / "summary.txt").read_text()
    assert (tmp_path / "m" / "perplexity.png").is_file()
