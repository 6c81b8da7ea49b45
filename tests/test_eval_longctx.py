"""Long-context-sensitive perplexity: per-token log-probs against a plain forward, the short-context scheme
against brute force, the selection rule, and the per-condition rows (none = plain NLL on the same windows)."""

from __future__ import annotations

import math

import pytest
import torch

from posheads.data import TokenizedDocument
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.identify import ablation_apply
from posheads.eval.longctx import (
    evaluate_long_context_perplexity,
    long_context_intervals,
    select_long_context_tokens,
    short_context_logprobs,
    token_logprobs,
)
from posheads.eval.perplexity import evaluate_perplexity
from posheads.heads.ablation import shared_prefix
from posheads.models import TinySpec, tiny_llama

SPEC = TinySpec(num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=512)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(SPEC).eval()


@pytest.fixture(scope="module")
def docs():
    g = torch.Generator().manual_seed(0)
    return [TokenizedDocument(f"d{i}", torch.randint(3, 256, (200,), generator=g)) for i in range(3)]


@torch.inference_mode()
def test_token_logprobs_match_a_plain_forward(model):
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[
        ..., 0
    ]
    assert torch.allclose(token_logprobs(model, ids, chunk=7), ref, atol=1e-5)


@torch.inference_mode()
def test_short_context_logprobs_against_brute_force(model):
    ids = torch.randint(3, 256, (61,), generator=torch.Generator().manual_seed(2))
    short, half = 16, 8
    got = short_context_logprobs(model, ids, short)
    for t in range(1, 61):
        start = 0 if t < short else (t // half - 1) * half
        assert half <= t - start < short or start == 0
        lp = torch.log_softmax(model(input_ids=ids[None, start:t]).logits[0, -1].double(), -1)[ids[t]]
        assert float(got[t - 1]) == pytest.approx(float(lp), abs=1e-5), t
    with pytest.raises(ValueError, match="even"):
        short_context_logprobs(model, ids, 15)


def test_selection_rule():
    long_lp = torch.tensor([-1.0, -0.5, -3.0, -0.1, -2.0], dtype=torch.float64)
    short_lp = torch.tensor([-1.0, -3.0, -3.5, -4.0, -2.0], dtype=torch.float64)
    assert select_long_context_tokens(long_lp, short_lp, 1.0).tolist() == [False, True, False, True, False]
    assert select_long_context_tokens(long_lp, short_lp, 1.0, offset=4).tolist() == [False] * 3 + [
        True,
        False,
    ]


@torch.inference_mode()
def test_rows_per_condition(model, docs):
    conds = [NONE, Condition("pos", "heads", ((1, 0), (2, 1)))]
    runner = ConditionRunner(
        model, conds, ablation_apply("zero", 2, None), max_rows=2, prefix=shared_prefix, num_layers=3
    )
    rows = evaluate_long_context_perplexity(
        model, docs, 128, short=32, threshold=0.0, runner=runner, progress=False
    )
    by = {r.condition: r for r in rows}
    plain = {
        r.condition: r
        for r in evaluate_perplexity(model, docs, 128, max_windows_per_doc=1, runner=runner, progress=False)
    }
    for name in ("none", "pos"):
        assert by[name].nll == pytest.approx(plain[name].nll, abs=1e-5)
        assert by[name].tokens == 3 * 127 and by[name].windows == 3
    # the selection is the same for every condition, and decided on the unablated model
    assert by["none"].tokens_lc == by["pos"].tokens_lc and 0 < by["none"].tokens_lc < by["none"].tokens
    ref = []
    for d in docs:
        lp = token_logprobs(model, d.ids[None, :128])[0]
        ref.append(select_long_context_tokens(lp, short_context_logprobs(model, d.ids[:128], 32), 0.0))
    assert by["none"].tokens_lc == sum(int(m.sum()) for m in ref)
    nll_lc = -sum(float((token_logprobs(model, d.ids[None, :128])[0] * m).sum()) for d, m in zip(docs, ref))
    assert by["none"].nll_lc == pytest.approx(nll_lc / by["none"].tokens_lc, abs=1e-6)
    assert by["pos"].nll_lc != pytest.approx(by["none"].nll_lc, abs=1e-4)
    assert math.isclose(by["none"].to_dict()["fraction"], by["none"].tokens_lc / by["none"].tokens)
    # the per-document sums behind the row, and their document bootstrap
    for r in rows:
        assert len(r.doc_nll_lc) == len(r.doc_tokens_lc) == len(r.document_names) == 3
        assert sum(r.doc_tokens_lc) == r.tokens_lc and sum(r.doc_tokens) == r.tokens
        assert sum(r.doc_nll_lc) / r.tokens_lc == pytest.approx(r.nll_lc, rel=1e-12)
        assert sum(r.doc_nll) / r.tokens == pytest.approx(r.nll, rel=1e-12)
    (iv,) = long_context_intervals([r.to_dict() for r in rows], n_boot=500)
    assert iv["length"] == 128 and iv["n_documents"] == 3
    for kind, point in (("lc", "nll_lc"), ("plain", "nll")):
        for name in ("none", "pos"):
            c = iv[kind]["conditions"][name]
            assert c["nll"] == pytest.approx(getattr(by[name], point), rel=1e-12)
            assert c["lo"] <= c["nll"] <= c["hi"]
        assert "minus_none" not in iv[kind]["conditions"]["none"]
        d = iv[kind]["conditions"]["pos"]["minus_none"]
        assert d["value"] == pytest.approx(getattr(by["pos"], point) - getattr(by["none"], point), rel=1e-9)
        assert d["lo"] <= d["value"] <= d["hi"]


def test_long_context_intervals_resample_documents_not_tokens():
    """Two documents, one with all the loss: the resampled NLL must span both documents' NLLs (a token-level
    bootstrap would give a tight interval around the pooled value)."""
    rows = [
        {
            "condition": name,
            "length": 64,
            "document_names": ["a", "b"],
            "doc_nll_lc": [s * 10.0, s * 1.0],
            "doc_tokens_lc": [10, 10],
            "doc_nll": [s * 10.0, s * 1.0],
            "doc_tokens": [10, 10],
        }
        for name, s in (("none", 1.0), ("pos", 2.0))
    ]
    (iv,) = long_context_intervals(rows, n_boot=2000, seed=0)
    c = iv["lc"]["conditions"]["none"]
    assert c["nll"] == pytest.approx(0.55) and c["lo"] == pytest.approx(0.1) and c["hi"] == pytest.approx(1.0)
    d = iv["lc"]["conditions"]["pos"]["minus_none"]  # paired: pos - none = none per document
    assert (
        d["value"] == pytest.approx(0.55) and d["lo"] == pytest.approx(0.1) and d["hi"] == pytest.approx(1.0)
    )


def test_long_context_intervals_compare_a_set_with_the_mean_of_its_own_controls():
    def row(name, scale):
        return {"condition": name, "length": 64, "document_names": ["a", "b", "c"],
                "doc_nll_lc": [scale * 1.0, scale * 2.0, scale * 3.0], "doc_tokens_lc": [1, 1, 1],
                "doc_nll": [scale, scale, scale], "doc_tokens": [1, 1, 1]}  # fmt: skip

    rows = [row("none", 1.0), row("positional", 4.0), row("random@0", 2.0), row("random@1", 3.0)]
    rows.append(row("random_allkeys@0", 9.0))  # another set's control: not averaged in
    (iv,) = long_context_intervals(rows, n_boot=500)
    c = iv["lc"]["conditions"]["positional"]["minus_random"]
    assert c["controls"] == ["random@0", "random@1"]
    assert c["value"] == pytest.approx(4.0 * 2 - 2.5 * 2)  # NLL = 2 x scale: 8 - mean(4, 6)
    assert c["lo"] <= c["value"] <= c["hi"]
    assert "minus_random" not in iv["lc"]["conditions"]["random@0"]
