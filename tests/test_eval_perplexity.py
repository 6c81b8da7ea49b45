"""Perplexity by length: equality with an independent plain-loss computation, windows, score_last."""

from __future__ import annotations

import math

import pytest
import torch

from posheads.data import TokenizedDocument, window_document
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.perplexity import (
    evaluate_perplexity,
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
