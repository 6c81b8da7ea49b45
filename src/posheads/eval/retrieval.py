"""Passkey retrieval and needle-in-a-haystack accuracy (DESIGN.md §2, "Evaluation protocols").

Prompts come from :mod:`posheads.data.retrieval` (seeded, exact lengths). Each prompt is answered by greedy
decoding -- one prefill forward, then one token at a time with the KV cache -- in a batch whose rows are
the ablation conditions of a group (every row sees the same prompt, so no padding is needed). A trial is
correct when the first run of digits in the generated text equals the answer
(:func:`posheads.data.retrieval.answer_matches`). Accuracy is reported per ``(condition, length, depth)``
over the seeded trials.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from posheads.data.retrieval import RetrievalPrompt, answer_matches
from posheads.eval.conditions import NONE, Condition, ConditionRunner

__all__ = ["RetrievalRow", "evaluate_retrieval", "greedy_decode"]

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
) -> list[RetrievalRow]:
    """Accuracy of greedy answers to ``prompts`` under each condition of ``runner`` (default: none).

    Prompts are grouped by ``(length, depth)``; rows are emitted (``on_row``) per condition and cell as soon
    as a cell is complete for a group of conditions. ``on_trial`` receives every trial's record
    (condition, length, depth, seed, answer, generated text, correct).
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
            bar = tqdm(
                cell,
                desc=f"{task} L={length} d={depth:g} [{names}]",
                unit="trial",
                disable=not progress,
                leave=False,
            )
            for prompt in bar:
                ids = prompt.input_ids.to(device)  # [L]

                def fn(n: int, ids: torch.Tensor = ids) -> list[str]:
                    new = greedy_decode(model, ids.expand(n, -1), max_new_tokens, tokenizer)  # [n, t]
                    return tokenizer.batch_decode(new, skip_special_tokens=True)

                texts = runner.call(group, fn)
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
