"""The retrieval suite: teacher-forced exact match == greedy exact match (on many prompts, near misses
included), the task generators (exact length, answers in the prompt, seeded, paired depths), and the shared
prefix of a group of conditions (same numbers as sequential evaluation)."""

from __future__ import annotations

import random

import pytest
import torch

from posheads.data import TokenizedDocument
from posheads.data.retrieval import haystack_pool
from posheads.data.tasks import SUITE_TASKS, TaskSpec, make_prompt, suite_prompts
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.identify import ablation_apply
from posheads.eval.perplexity import evaluate_perplexity
from posheads.eval.retrieval import (
    evaluate_suite,
    greedy_decode,
    greedy_exact,
    score_answers,
    teacher_forced_logits,
)
from posheads.heads.ablation import shared_prefix
from posheads.models import TinySpec, tiny_llama, tiny_tokenizer

SPEC = TinySpec(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tiny_llama(SPEC).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def pool(tok):
    from pydoc_data.topics import topics

    docs = [torch.tensor(tok(topics[k], add_special_tokens=False)["input_ids"]) for k in sorted(topics)[:30]]
    return haystack_pool(docs, tok)


# --------------------------------------------------------------------------------------------------------
# teacher forcing == greedy
# --------------------------------------------------------------------------------------------------------


def _near_misses(model, prompt, greedy, rng):
    """Answers that agree with the greedy continuation except at one position, where they take the
    second-best token (the closest possible miss), plus the greedy continuation itself and a random one."""
    answers = [greedy.clone()]
    for j in {0, len(greedy) // 2, len(greedy) - 1}:
        logits = teacher_forced_logits(model, prompt, greedy, 1)[0, j]  # [V]
        second = int(logits.topk(2).indices[1])
        miss = greedy.clone()
        miss[j] = second
        answers.append(miss)
    answers.append(torch.tensor([rng.randrange(259) for _ in range(len(greedy))]))
    return answers


@torch.inference_mode()
def test_teacher_forced_exact_match_equals_greedy_on_many_prompts(model):
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    agree = positives = total = 0
    for _ in range(40):
        length = rng.randrange(20, 120)
        prompt = torch.randint(3, 259, (length,), generator=g)
        a = rng.randrange(1, 7)
        greedy = greedy_decode(model, prompt[None], a, stop_after_number=False)[0]  # [a]
        for answer in _near_misses(model, prompt, greedy, rng):
            tf = score_answers(teacher_forced_logits(model, prompt, answer, 1), answer)[0]
            gr, tokens = greedy_exact(model, prompt, answer, 1)[0]
            assert tf.exact == gr, (prompt.tolist(), answer.tolist(), tokens)
            assert tf.exact == (tokens == answer.tolist())
            # exact match <=> every token has rank 0 (no ties in float logits of a random model)
            assert tf.exact == all(r == 0 for r in tf.ranks)
            agree += 1
            positives += tf.exact
            total += 1
    assert agree == total and 40 <= positives < total  # both outcomes occur: the test can fail either way


@torch.inference_mode()
def test_teacher_forced_logprob_equals_stepwise_log_softmax(model):
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, 259, (50,), generator=g)
    answer = torch.randint(3, 259, (5,), generator=g)
    tf = score_answers(teacher_forced_logits(model, prompt, answer, 1), answer)[0]
    ref, ranks = 0.0, []
    ids = prompt.clone()
    for t in range(len(answer)):
        logits = model(input_ids=ids[None]).logits[0, -1].double()
        ref += float(torch.log_softmax(logits, -1)[answer[t]])
        ranks.append(int((logits > logits[answer[t]]).sum()))
        ids = torch.cat([ids, answer[t : t + 1]])
    assert tf.logprob == pytest.approx(ref, abs=1e-4)
    assert list(tf.ranks) == ranks


@torch.inference_mode()
def test_teacher_forced_equals_greedy_under_batched_ablation(model):
    conds = [
        NONE,
        Condition("pos", "heads", ((1, 0), (2, 3))),
        Condition("rnd", "heads", ((1, 2), (3, 1))),
        Condition("dims", "dims", ((2, 0), (2, 1)), side="high"),
    ]
    runner = ConditionRunner(model, conds, ablation_apply("zero", 2, None), max_rows=4)
    g = torch.Generator().manual_seed(3)
    rows_seen = set()
    for _ in range(10):
        prompt = torch.randint(3, 259, (60,), generator=g)
        # the answer: condition "pos"'s greedy continuation, so that rows disagree
        new = runner.call(
            [conds[1]],
            lambda n, p=prompt: greedy_decode(model, p[None].expand(n, -1), 4, stop_after_number=False),
            broadcast=False,
        )[0]
        tf = runner.call(
            conds, lambda n, p=prompt, a=new: score_answers(teacher_forced_logits(model, p, a, n), a)
        )
        gr = runner.call(conds, lambda n, p=prompt, a=new: greedy_exact(model, p, a, n), broadcast=False)
        for s, (ok, _) in zip(tf, gr):
            assert s.exact == ok
        rows_seen.update(i for i, s in enumerate(tf) if s.exact)
    assert 1 in rows_seen


# --------------------------------------------------------------------------------------------------------
# task generators
# --------------------------------------------------------------------------------------------------------


def _levels(task):
    return [1, 3] if task == "cwe" else [0.0, 0.5, 1.0]


@pytest.mark.parametrize("task", SUITE_TASKS)
def test_suite_prompts_exact_length_answers_and_seeding(tok, pool, task):
    lengths = [1200, 1401] if task == "cwe" else [700, 901]  # byte tokens: a list entry is ~12 tokens
    ps = suite_prompts(tok, pool, task, lengths, _levels(task), 2, seed=1)
    again = suite_prompts(tok, pool, task, lengths, _levels(task), 2, seed=1)
    other = suite_prompts(tok, pool, task, lengths, _levels(task), 2, seed=2)
    assert len(ps) == 2 * len(_levels(task)) * 2
    for p, q, r in zip(ps, again, other):
        assert p.input_ids.shape == (p.length,) and p.input_ids[0] == tok.bos_token_id
        assert torch.equal(p.input_ids, q.input_ids) and torch.equal(p.answer_ids, q.answer_ids)
        assert not torch.equal(p.input_ids, r.input_ids)
        text = tok.decode(p.input_ids, skip_special_tokens=True)
        assert tok.decode(p.answer_ids) == p.answer and p.answer.startswith(" ")
        for a, b in p.items:
            item = tok.decode(p.answer_ids[a:b]).strip(" ,")
            assert item and item in text, (task, item)
        if task != "cwe":
            assert 0.0 <= p.actual_depth <= 1.0


def test_multikey_asks_the_target_among_distractors(tok, pool):
    p = make_prompt("multikey", tok, pool, 800, 0.3, seed=5, spec=TaskSpec(distractors=3))
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    assert text.count("The special magic number for") == 4 + 1  # 4 needles + the answer prefix
    value = p.answer.strip()
    assert f"is: {value}." in text
    key = text.split("The special magic number for ")[-1].split(" mentioned")[0]
    assert f"The special magic number for {key} is: {value}." in text
    assert (
        tok.decode(p.input_ids[p.key_start :])
        .lstrip("\n")
        .startswith(f"The special magic number for {key} is")
    )


def test_multivalue_answer_in_order_of_appearance(tok, pool):
    for seed in range(5):
        p = make_prompt("multivalue", tok, pool, 800, 0.6, seed=seed, spec=TaskSpec(values=4))
        text = tok.decode(p.input_ids, skip_special_tokens=True)
        values = [v.strip() for v in p.answer.split(",")]
        assert len(values) == 4
        assert [text.index(f"is: {v}.") for v in values] == sorted(text.index(f"is: {v}.") for v in values)


def test_multiquery_answers_in_question_order(tok, pool):
    p = make_prompt("multiquery", tok, pool, 800, 0.5, seed=3, spec=TaskSpec(queries=3))
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    asked = text.split("What are the special magic numbers for ")[1].split(" mentioned")[0]
    keys = asked.replace(" and ", ", ").split(", ")
    values = [v.strip() for v in p.answer.split(",")]
    for k, v in zip(keys, values):
        assert f"The special magic number for {k} is: {v}." in text
    assert len(p.items) == 3


def test_vartrack_chain(tok, pool):
    p = make_prompt("vartrack", tok, pool, 900, 0.2, seed=4, spec=TaskSpec(hops=3))
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    names = p.answer.split()
    assert len(names) == 4
    value = text.split(f"VAR {names[0]} = ")[1].split(".")[0]
    assert value.isdigit()
    pos = [text.index(f"VAR {names[i]} = VAR {names[i - 1]}.") for i in range(1, 4)]
    assert text.index(f"VAR {names[0]} = {value}.") < pos[0] and pos == sorted(pos)
    assert f"4 variables are assigned the value {value}" in text


def test_cwe_most_common_words(tok):
    p = make_prompt("cwe", tok, None, 1200, 3, seed=2)
    text = tok.decode(p.input_ids, skip_special_tokens=True)
    listed = [line.split(". ", 1)[1] for line in text.split("\n") if line[:1].isdigit()]
    counts = {w: listed.count(w) for w in set(listed)}
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    assert [w.strip() for w in p.answer.split(",")] == top
    assert len({counts[w] for w in top}) == 3 and counts[top[2]] > max(
        c for w, c in counts.items() if w not in top
    )


def test_depths_of_a_trial_share_the_haystack(tok, pool):
    ps = suite_prompts(tok, pool, "multikey", [800], [0.2, 0.8], 1, seed=0)
    a, b = ps
    assert a.key_start < b.key_start
    # identical up to the first insert of either prompt (instruction + the same haystack span)
    first = min(a.key_start, b.key_start) - 60  # distractors may sit before the target: compare a safe prefix
    n = next(i for i in range(800) if a.input_ids[i] != b.input_ids[i])
    assert n >= min(first, 20)


def test_depth_out_of_range_and_too_short(tok, pool):
    with pytest.raises(ValueError, match="depth"):
        make_prompt("multikey", tok, pool, 800, 1.5, seed=0)
    with pytest.raises(ValueError, match="too short"):
        make_prompt("multiquery", tok, pool, 120, 0.5, seed=0)
    with pytest.raises(ValueError, match="not one of"):
        make_prompt("nope", tok, pool, 800, 0.5, seed=0)


# --------------------------------------------------------------------------------------------------------
# evaluate_suite and the shared prefix
# --------------------------------------------------------------------------------------------------------

CONDS = [
    NONE,
    Condition("late", "heads", ((3, 0), (3, 2))),
    Condition("mid", "heads", ((2, 1), (3, 3))),
    Condition("mid2", "heads", ((2, 2), (3, 1)), family="random", seed=0),
    Condition("dims", "dims", ((2, 0), (3, 0)), side="high"),
    Condition("early", "heads", ((1, 1),)),
]


def _runner(model, rows, share):
    return ConditionRunner(
        model,
        CONDS,
        ablation_apply("zero", 2, None),
        max_rows=rows,
        prefix=shared_prefix if share else None,
        num_layers=SPEC.num_layers,
    )


def test_groups_are_ordered_by_first_ablated_layer(model):
    runner = _runner(model, 2, True)
    groups = runner.groups(100)
    assert [[c.name for c in g] for g in groups] == [["none", "late"], ["mid", "mid2"], ["dims", "early"]]
    assert [runner.first_layer(g) for g in groups] == [3, 2, 1]
    # unlimited rows: the partition minimising layer work, checked against every contiguous partition
    runner = _runner(model, 6, True)
    groups = runner.groups(100)
    flat = [c for g in groups for c in g]
    assert sorted(c.name for c in flat) == sorted(c.name for c in CONDS)
    best = min(
        runner.layer_work([flat[a:b] for a, b in zip((0, *cuts), (*cuts, len(flat)))])
        for k in range(len(flat))
        for cuts in __import__("itertools").combinations(range(1, len(flat)), k)
    )
    assert runner.layer_work(groups) == best < runner.layer_work([flat])
    # a condition that changes layer 0 gets a forward of its own instead of cutting everyone's prefix
    runner = ConditionRunner(
        model,
        [*CONDS, Condition("first", "heads", ((0, 0),))],
        max_rows=8,
        prefix=shared_prefix,
        num_layers=4,
    )
    last = runner.groups(100)[-1]
    assert "first" in [c.name for c in last] and all((c.first_layer or 0) <= 1 for c in last)


@torch.inference_mode()
def test_shared_prefix_equals_sequential(model, tok, pool):
    g = torch.Generator().manual_seed(0)
    docs = [TokenizedDocument(f"d{i}", torch.randint(0, 256, (300,), generator=g)) for i in range(2)]
    seq = evaluate_perplexity(
        model, docs, 128, max_windows=3, runner=_runner(model, 1, False), progress=False
    )
    for rows in (3, 6):
        runner = _runner(model, rows, True)
        got = evaluate_perplexity(model, docs, 128, max_windows=3, runner=runner, progress=False)
        assert runner.shared_layer_rows > 0
        ref = {r.condition: r.nll for r in seq}
        for r in got:
            assert r.nll == pytest.approx(ref[r.condition], abs=1e-5), r.condition
    prompts = suite_prompts(tok, pool, "multikey", [700], [0.5], 3, seed=0)
    a = evaluate_suite(model, prompts, runner=_runner(model, 1, False), progress=False)
    b = evaluate_suite(model, prompts, runner=_runner(model, 6, True), progress=False)
    ref = {r["condition"]: r for r in a}
    for r in b:
        assert r["correct"] == ref[r["condition"]]["correct"]
        assert r["logprob"] == pytest.approx(ref[r["condition"]]["logprob"], abs=1e-4)


@torch.inference_mode()
def test_shared_prefix_past_an_ablated_layer_is_refused(model):
    """Sharing a prefix that covers an ablated layer would hand that layer one row for several conditions:
    the per-row ablation hooks refuse it (instead of silently ablating every row or none)."""
    ids = torch.randint(3, 259, (1, 64), generator=torch.Generator().manual_seed(0)).expand(2, -1)
    apply = ablation_apply("zero", 2, None)
    for group in (
        [NONE, Condition("early", "heads", ((1, 1), (1, 2)))],
        [NONE, Condition("early", "dims", ((1, 1), (1, 2)), side="low")],
    ):
        with apply(model, group):
            right = model(input_ids=ids).logits
            with shared_prefix(model, 1):
                shared_ok = model(input_ids=ids).logits
            with shared_prefix(model, 3), pytest.raises(ValueError, match="per-row ablation mask"):
                model(input_ids=ids)
        assert torch.allclose(right, shared_ok, atol=1e-5)
        assert not torch.allclose(right[0], right[1], atol=1e-3)
    with shared_prefix(model, 2), pytest.raises(ValueError, match="rows of the forward differ"):
        model(input_ids=torch.randint(3, 259, (2, 10)))


def test_evaluate_suite_rows_have_intervals(model, tok, pool):
    prompts = suite_prompts(tok, pool, "multiquery", [700], [0.5], 4, seed=0)
    trials = []
    rows = evaluate_suite(model, prompts, scoring="both", on_trial=trials.append, progress=False)
    (row,) = rows
    assert row["trials"] == 4 and row["items"] == 4 * 3
    lo, hi = row["accuracy_ci"]
    assert 0.0 <= lo <= row["accuracy"] <= hi <= 1.0
    assert row["logprob_ci"][0] <= row["logprob"] <= row["logprob_ci"][1]
    assert row["greedy_agrees"] == 4 and len(trials) == 4
