"""Passkey / needle prompt generators (pure, seeded, exact length) and greedy-decoding retrieval scoring."""

from __future__ import annotations

import pytest
import torch

from posheads.data.retrieval import (
    PASSKEY_FILLER,
    answer_matches,
    derive_seed,
    haystack_pool,
    needle_prompt,
    passkey_prompt,
    prompt_overhead,
)
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.retrieval import evaluate_retrieval, greedy_decode


@pytest.fixture(scope="module")
def tok():
    from posheads.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    from posheads.models import tiny_llama

    return tiny_llama()


@pytest.fixture(scope="module")
def pool(tok):
    from pydoc_data.topics import topics

    docs = [torch.tensor(tok(topics[k], add_special_tokens=False)["input_ids"]) for k in sorted(topics)[:30]]
    return haystack_pool(docs, tok)


@pytest.mark.parametrize("length", [300, 301, 777])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt_exact_length_and_content(tok, length, depth):
    p = passkey_prompt(tok, length, depth, seed=3)
    assert p.input_ids.shape == (length,) and p.length == length
    assert p.input_ids[0] == tok.bos_token_id
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    assert f"The pass key is {p.answer}. Remember it. {p.answer} is the pass key." in text
    assert text.endswith("What is the pass key? The pass key is")
    assert len(p.answer) == 5 and p.answer[0] != "0"
    # the key sentence starts at key_start and sits at the requested depth (within one filler sentence)
    assert tok.decode(p.input_ids[p.key_start :]).startswith(" The pass key is")
    longest = max(len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in PASSKEY_FILLER)
    filler = length - prompt_overhead(tok, "passkey")
    assert abs(p.actual_depth - depth) * filler <= longest / 2 + 1


def test_passkey_prompt_is_seeded_and_pure(tok):
    a = passkey_prompt(tok, 400, 0.3, seed=derive_seed("passkey", 0, 400, 0.3, 0))
    b = passkey_prompt(tok, 400, 0.3, seed=derive_seed("passkey", 0, 400, 0.3, 0))
    c = passkey_prompt(tok, 400, 0.3, seed=derive_seed("passkey", 0, 400, 0.3, 1))
    assert torch.equal(a.input_ids, b.input_ids) and a.answer == b.answer
    assert a.answer != c.answer
    keys = {passkey_prompt(tok, 400, 0.5, seed=s).answer for s in range(20)}
    assert len(keys) == 20


def test_passkey_depth_moves_the_key(tok):
    starts = [passkey_prompt(tok, 600, d, seed=1).key_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert starts == sorted(starts) and len(set(starts)) == 5


def test_passkey_too_short_is_an_error(tok):
    with pytest.raises(ValueError, match="passkey length=100 is too short"):
        passkey_prompt(tok, 100, 0.5, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 400, 1.5, seed=0)


def test_needle_prompt(tok, pool):
    p = needle_prompt(tok, pool, 900, 0.5, seed=5)
    q = needle_prompt(tok, pool, 900, 0.5, seed=5)
    assert torch.equal(p.input_ids, q.input_ids) and p.input_ids.shape == (900,)
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    assert f"is: {p.answer}." in text and len(p.answer) == 7
    assert text.rstrip().endswith("mentioned in the provided text is:")
    assert abs(p.actual_depth - 0.5) < 0.1
    # the haystack is real corpus text: a contiguous span of the pool appears in the prompt
    ids = p.input_ids.tolist()
    head = ids[p.key_start - 40 : p.key_start]
    flat = pool.tolist()
    assert any(flat[i : i + 40] == head for i in range(len(flat) - 40))
    other = needle_prompt(tok, pool, 900, 0.5, seed=6)
    assert other.answer != p.answer


def test_needle_pool_too_small(tok):
    small = torch.arange(65, 65 + 26).repeat(4)
    with pytest.raises(ValueError, match="corpus pool has only 104"):
        needle_prompt(tok, small, 800, 0.5, seed=0)


def test_haystack_pool_strips_special_tokens(tok):
    docs = [torch.tensor([256, 65, 66]), torch.tensor([256, 67, 257])]
    assert haystack_pool(docs, tok).tolist() == [65, 66, 10, 10, 67]


def test_answer_matching():
    assert answer_matches(" 12345. Remember", "12345")
    assert not answer_matches(" 123456", "12345")
    assert not answer_matches(" 1234", "12345")
    assert not answer_matches("no digits", "12345")
    assert answer_matches("\n\n12345", "12345")


def test_greedy_decode_matches_generate(model):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    ours = greedy_decode(model, ids, 6, tokenizer=None)
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=258)[:, 40:]
    assert torch.equal(ours, ref)


class _Oracle(torch.nn.Module):
    """A 'model' that answers with a fixed text's tokens, to check the scoring path end to end."""

    def __init__(self, tok, text):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.answer = tok(text, add_special_tokens=False)["input_ids"]
        self.step = 0

    def forward(self, input_ids, cache=None, use_cache=True, logits_to_keep=0, **kw):
        if cache is None:
            self.step = 0
        tokid = self.answer[min(self.step, len(self.answer) - 1)]
        self.step += 1
        logits = torch.full((input_ids.shape[0], 1, 259), -1.0)
        logits[..., tokid] = 1.0

        class Out:
            pass

        out = Out()
        out.logits, out.cache = logits, "cache"
        return out


def test_evaluate_retrieval_scores_correct_answers(tok):
    prompts = [passkey_prompt(tok, 300, d, seed=derive_seed(d)) for d in (0.2, 0.8)]
    prompts = [p for p in prompts for _ in range(1)]
    oracle = _Oracle(tok, " " + prompts[0].answer + ". ")
    trials = []
    rows = evaluate_retrieval(oracle, tok, prompts, max_new_tokens=10, on_trial=trials.append, progress=False)
    assert [(r.depth, r.accuracy, r.trials) for r in rows] == [(0.2, 1.0, 1), (0.8, 0.0, 1)]
    assert trials[0]["generated"].strip().startswith(prompts[0].answer)
    # decoding stopped once the number was complete
    assert oracle.step <= len(tok(" " + prompts[0].answer + ". ", add_special_tokens=False)["input_ids"])


def test_retrieval_conditions_get_rows(model, tok):
    prompts = [passkey_prompt(tok, 260, 0.5, seed=s) for s in range(2)]
    runner = ConditionRunner(model, [NONE, Condition("empty", "heads", ())], max_rows=2)
    rows = evaluate_retrieval(model, tok, prompts, max_new_tokens=4, runner=runner, progress=False)
    assert [(r.condition, r.trials) for r in rows] == [("none", 2), ("empty", 2)]
    assert rows[0].accuracy == rows[1].accuracy
