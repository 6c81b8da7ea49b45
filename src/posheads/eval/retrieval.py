"""Passkey retrieval and needle-in-a-haystack accuracy (docs/definitions.md, "passkey / needle").

Prompts come from :mod:`posheads.data.retrieval` (seeded, exact lengths). Each prompt is answered by greedy
decoding -- one prefill forward, then one token at a time with the KV cache -- in a batch whose rows are
the ablation conditions of a group (every row sees the same prompt, so no padding is needed). A trial is
correct when the first run of digits in the generated text equals the answer
(:func:`posheads.data.retrieval.answer_matches`). Accuracy is reported per ``(condition, length, depth)``
over the seeded trials.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from posheads.data.retrieval import RetrievalPrompt, answer_matches
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.distributed import SINGLE, Ranks

__all__ = [
    "SCORINGS",
    "AnswerScore",
    "RetrievalRow",
    "evaluate_retrieval",
    "evaluate_suite",
    "greedy_decode",
    "greedy_exact",
    "score_answers",
    "suite_row",
    "teacher_forced_logits",
]

_DONE = re.compile(r"\d+\D")


@dataclass(frozen=True)
class RetrievalRow:
    """One accuracy cell (a row of ``results.json["passkey"]`` or ``["needle"]``)."""

    condition: str
    length: int
    depth: float
    accuracy: float
    trials: int
    correct: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "length": self.length,
            "depth": self.depth,
            "accuracy": self.accuracy,
            "trials": self.trials,
            "correct": self.correct,
        }


def _cache_argument(model: Any) -> str:
    """Transformers >= 5.2x names the KV cache argument ``cache``; earlier versions ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


@torch.inference_mode()
def greedy_decode(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    tokenizer: Any = None,
    stop_after_number: bool = True,
) -> torch.Tensor:
    """Greedy continuation of ``input_ids`` (``[B, L]``, no padding). Returns int64 ``[B, <= max_new_tokens]``.

    With a ``tokenizer`` and ``stop_after_number``, decoding stops early once every row has produced a run
    of digits followed by something else (or EOS) -- all that exact-match scoring reads.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 1")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    cache_arg = _cache_argument(model)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    past = _cache_of(out)
    nxt = out.logits[:, -1].argmax(dim=-1)  # [B]
    generated = [nxt]
    for _ in range(max_new_tokens - 1):
        if tokenizer is not None and stop_after_number:
            seqs = torch.stack(generated, dim=1)  # [B, t]
            texts = tokenizer.batch_decode(seqs, skip_special_tokens=False)
            if all(_DONE.search(t) or (eos is not None and eos in s.tolist()) for t, s in zip(texts, seqs)):
                break
        out = model(input_ids=nxt[:, None], use_cache=True, **{cache_arg: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1].argmax(dim=-1)  # [B]
        generated.append(nxt)
    return torch.stack(generated, dim=1)  # [B, t]


@torch.inference_mode()
def evaluate_retrieval(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[RetrievalPrompt],
    *,
    task: str = "passkey",
    max_new_tokens: int = 10,
    runner: ConditionRunner | None = None,
    conditions: Sequence[Condition] | None = None,
    on_row: Callable[[RetrievalRow], None] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
) -> list[RetrievalRow]:
    """Accuracy of greedy answers to ``prompts`` under each condition of ``runner`` (default: none).

    Prompts are grouped by ``(length, depth)``; rows are emitted (``on_row``) per condition and cell as soon
    as a cell is complete for a group of conditions. ``on_trial`` receives every trial's record
    (condition, length, depth, seed, answer, generated text, correct). ``ranks``: the prompts of a cell are
    split over the evaluation processes and their answers gathered in order (:mod:`posheads.eval.distributed`):
    every rank returns the single-process rows and sees every trial record.
    """
    runner = runner or ConditionRunner(model, [NONE])
    device = next(model.parameters()).device
    cells: dict[tuple[int, float], list[RetrievalPrompt]] = {}
    for p in prompts:
        cells.setdefault((p.length, p.depth), []).append(p)
    rows: list[RetrievalRow] = []
    for (length, depth), cell in cells.items():
        for group in runner.groups(length, conditions):
            correct = [0] * len(group)
            names = ",".join(c.name for c in group)

            def bar(items: Any, names: str = names, length: int = length, depth: float = depth) -> Any:
                desc = f"{task} L={length} d={depth:g} [{names}]"
                return tqdm(items, desc=desc, unit="trial", disable=not progress, leave=False)

            def answers(prompt: RetrievalPrompt, group: Any = group) -> list[str]:
                ids = prompt.input_ids.to(device)  # [L]

                def fn(n: int) -> list[str]:
                    new = greedy_decode(model, ids.expand(n, -1), max_new_tokens, tokenizer)  # [n, t]
                    return tokenizer.batch_decode(new, skip_special_tokens=True)

                return list(runner.call(group, fn, broadcast=False))  # decoding: rows diverge

            for prompt, texts in zip(cell, ranks.map(answers, cell, wrap=bar)):
                for i, (cond, text) in enumerate(zip(group, texts)):
                    ok = answer_matches(text, prompt.answer)
                    correct[i] += ok
                    if on_trial is not None:
                        on_trial(
                            {
                                "task": task,
                                "condition": cond.name,
                                "length": length,
                                "depth": depth,
                                "actual_depth": prompt.actual_depth,
                                "seed": prompt.seed,
                                "answer": prompt.answer,
                                "generated": text,
                                "correct": ok,
                            }
                        )
            for i, cond in enumerate(group):
                row = RetrievalRow(cond.name, length, depth, correct[i] / len(cell), len(cell), correct[i])
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# Teacher-forced scoring (the suite)
# --------------------------------------------------------------------------------------------------------

#: How a suite prompt is scored: one teacher-forced forward, greedy decoding, or both (a check).
SCORINGS = ("teacher_forced", "greedy", "both")


@dataclass(frozen=True)
class AnswerScore:
    """Teacher-forced scores of one answer under one condition.

    Attributes:
        exact: every answer token is the argmax given the prompt and the answer's earlier tokens -- the same
            as greedy decoding producing exactly ``answer_ids`` first (by induction on the answer tokens).
        logprob: ``sum_t log p(answer_t | prompt, answer_<t)``.
        token_logprobs: the per-token terms of ``logprob``.
        ranks: per answer token, how many vocabulary entries have a strictly larger logit (0 = top).
        items: per answer item (span of :attr:`~posheads.data.tasks.TaskPrompt.items`), whether all its tokens
            are the argmax (teacher forced: earlier items are given, so each item is scored on its own).
    """

    exact: bool
    logprob: float
    token_logprobs: tuple[float, ...]
    ranks: tuple[int, ...]
    items: tuple[bool, ...]


def teacher_forced_logits(
    model: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, rows: int
) -> torch.Tensor:
    """Logits of the answer positions: one forward over ``prompt + answer[:-1]`` (``rows`` identical rows, one
    per condition of a group). Returns ``[rows, A, V]``: row ``r``, position ``t`` predicts ``answer[t]``."""
    if answer_ids.numel() < 1:
        raise ValueError("an answer needs at least one token")
    ids = torch.cat([prompt_ids.reshape(-1), answer_ids.reshape(-1)[:-1]])[None]  # [1, L + A - 1]
    ids = ids.to(next(model.parameters()).device).expand(rows, -1)
    n = answer_ids.numel()
    return model(input_ids=ids, use_cache=False, logits_to_keep=n).logits[:, -n:]  # [rows, A, V]


def score_answers(
    logits: torch.Tensor, answer_ids: torch.Tensor, items: Sequence[tuple[int, int]] = ()
) -> list[AnswerScore]:
    """:class:`AnswerScore` per row of ``logits`` (``[B, A, V]``, position ``t`` predicting ``answer_ids[t]``)."""
    logits = logits.float()
    target = answer_ids.reshape(-1).to(logits.device)  # [A]
    if logits.shape[1] != target.numel():
        raise ValueError(f"logits cover {logits.shape[1]} positions, the answer has {target.numel()} tokens")
    lp = torch.log_softmax(logits, dim=-1)  # [B, A, V]
    picked = lp.gather(-1, target.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)  # [B, A]
    tgt_logit = logits.gather(-1, target.view(1, -1, 1).expand(lp.shape[0], -1, 1))  # [B, A, 1]
    ranks = (logits > tgt_logit).sum(-1)  # [B, A]
    hit = logits.argmax(-1) == target.view(1, -1)  # [B, A]
    spans = list(items) or [(0, target.numel())]
    out = []
    for r in range(logits.shape[0]):
        out.append(
            AnswerScore(
                bool(hit[r].all()),
                float(picked[r].double().sum()),
                tuple(float(x) for x in picked[r]),
                tuple(int(x) for x in ranks[r]),
                tuple(bool(hit[r, a:b].all()) for a, b in spans),
            )
        )
    return out


def greedy_exact(
    model: Any, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, rows: int
) -> list[tuple[bool, list[int]]]:
    """Greedy decoding check: per row, whether the first ``A`` greedy tokens are exactly ``answer_ids`` and
    the tokens generated (decoding stops at ``A`` tokens)."""
    ids = prompt_ids.reshape(1, -1).to(next(model.parameters()).device).expand(rows, -1)
    new = greedy_decode(model, ids, answer_ids.numel(), tokenizer=None, stop_after_number=False)  # [rows, A]
    target = answer_ids.reshape(1, -1).to(new.device)
    return [(bool(torch.equal(new[r], target[0])), new[r].tolist()) for r in range(rows)]


def _mean_interval(values: Sequence[float], seed: int, level: float = 0.95, n_boot: int = 2000) -> tuple:
    """Mean and its percentile-bootstrap interval over trials (``None`` bounds for fewer than 2 values)."""
    import numpy as np

    from posheads.eval.intervals import bootstrap_indices, percentile_interval

    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean()) if arr.size else float("nan")
    if arr.size < 2:
        return mean, None, None
    idx = bootstrap_indices(arr.size, n_boot, seed)  # [n_boot, n]
    lo, hi = percentile_interval(arr[idx].mean(axis=1), level)
    return mean, lo, hi


def suite_row(
    task: str,
    condition: str,
    cell: tuple[int, float | None, int | None],
    scores: Sequence[AnswerScore],
    greedy: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """One row of ``results.json["retrieval"]``: accuracy with its Wilson interval, the mean answer
    log-probability (and per token) with a bootstrap interval over trials, mean rank, per-item accuracy."""
    from posheads.eval.intervals import wilson_interval

    length, depth, difficulty = cell
    n = len(scores)
    correct = sum(s.exact for s in scores)
    lo, hi = wilson_interval(correct, n)
    seed = derive_seed_for_row(task, condition, length, depth, difficulty)
    lp, lp_lo, lp_hi = _mean_interval([s.logprob for s in scores], seed)
    per_tok = [s.logprob / max(1, len(s.token_logprobs)) for s in scores]
    items = sum(len(s.items) for s in scores)
    items_ok = sum(sum(s.items) for s in scores)
    ilo, ihi = wilson_interval(items_ok, items) if items else (None, None)
    row = {
        "task": task,
        "condition": condition,
        "length": length,
        "depth": depth,
        "difficulty": difficulty,
        "trials": n,
        "correct": correct,
        "accuracy": correct / n if n else float("nan"),
        "accuracy_ci": [lo, hi],
        "logprob": lp,
        "logprob_ci": [lp_lo, lp_hi],
        "token_logprob": sum(per_tok) / n if n else float("nan"),
        "mean_rank": sum(sum(s.ranks) / len(s.ranks) for s in scores) / n if n else float("nan"),
        "items": items,
        "items_correct": items_ok,
        "item_accuracy": items_ok / items if items else float("nan"),
        "item_accuracy_ci": [ilo, ihi],
        "scoring": "teacher_forced",
    }
    if greedy is not None:
        row["greedy_correct"] = int(sum(greedy))
        row["greedy_agrees"] = int(sum(g == s.exact for g, s in zip(greedy, scores)))
    return row


def derive_seed_for_row(*parts: Any) -> int:
    from posheads.data.retrieval import derive_seed

    return derive_seed("bootstrap", *parts) % (2**32)


@torch.inference_mode()
def evaluate_suite(
    model: Any,
    prompts: Sequence[Any],
    *,
    runner: ConditionRunner | None = None,
    conditions: Sequence[Condition] | None = None,
    scoring: str = "teacher_forced",
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
) -> list[dict[str, Any]]:
    """Teacher-forced scores of suite prompts (:class:`posheads.data.tasks.TaskPrompt`) under each condition.

    Prompts are grouped by ``(task, length, depth, difficulty)``; for each cell and group of conditions one
    forward per prompt scores every condition (rows = conditions; layers before the group's first ablated
    layer shared when the runner has a prefix). ``scoring="both"`` also decodes greedily and records the
    agreement (``greedy_agrees``); ``"greedy"`` uses greedy exact match as the accuracy (log-probabilities
    still teacher-forced). ``ranks``: the prompts of a cell are split over the evaluation processes and their
    scores gathered in order (:mod:`posheads.eval.distributed`): every rank returns the single-process rows
    and sees every trial record.
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not one of {list(SCORINGS)}")
    runner = runner or ConditionRunner(model, [NONE])
    cells: dict[tuple[str, int, Any, Any], list[Any]] = {}
    for p in prompts:
        cells.setdefault((p.task, p.length, p.depth, p.difficulty), []).append(p)
    rows: list[dict[str, Any]] = []
    for (task, length, depth, difficulty), cell in cells.items():
        for group in runner.groups(length + 16, conditions):
            scores: list[list[AnswerScore]] = [[] for _ in group]
            greedy: list[list[bool]] = [[] for _ in group]
            names = ",".join(c.name for c in group)
            desc = f"{task} L={length} " + (f"d={depth:g}" if depth is not None else f"k={difficulty}")

            def bar(items: Any, desc: str = f"{desc} [{names}]") -> Any:
                return tqdm(items, desc=desc, unit="trial", disable=not progress, leave=False)

            def score(prompt: Any, group: Any = group) -> tuple[list[AnswerScore], list[Any]]:
                def fn(n: int) -> list[AnswerScore]:
                    logits = teacher_forced_logits(model, prompt.input_ids, prompt.answer_ids, n)
                    return score_answers(logits, prompt.answer_ids, prompt.items)

                got = list(runner.call(group, fn))
                checks: list[Any] = [None] * len(group)
                if scoring != "teacher_forced":

                    def gfn(n: int) -> list[tuple[bool, list[int]]]:
                        return greedy_exact(model, prompt.input_ids, prompt.answer_ids, n)

                    checks = list(runner.call(group, gfn, broadcast=False))
                return got, checks

            for prompt, (got, checks) in zip(cell, ranks.map(score, cell, wrap=bar)):
                for i, (cond, s) in enumerate(zip(group, got)):
                    if scoring == "greedy":
                        s = dataclasses.replace(s, exact=checks[i][0])
                    scores[i].append(s)
                    if checks[i] is not None:
                        greedy[i].append(checks[i][0])
                    if on_trial is not None:
                        rec = {
                            "section": "retrieval",
                            "task": task,
                            "condition": cond.name,
                            "length": length,
                            "depth": depth,
                            "difficulty": difficulty,
                            "actual_depth": prompt.actual_depth,
                            "seed": prompt.seed,
                            "trial": prompt.trial,
                            "answer": prompt.answer,
                            "correct": s.exact,
                            "logprob": s.logprob,
                            "ranks": list(s.ranks),
                            "items": list(s.items),
                        }
                        if checks[i] is not None:
                            rec["greedy_correct"] = checks[i][0]
                            rec["greedy_tokens"] = checks[i][1]
                        on_trial(rec)
            for i, cond in enumerate(group):
                row = suite_row(
                    task,
                    cond.name,
                    (length, depth, difficulty),
                    scores[i],
                    greedy[i] if scoring != "teacher_forced" else None,
                )
                if scoring == "greedy":
                    row["scoring"] = "greedy"
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows
