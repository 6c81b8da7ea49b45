"""Long-input perplexity by length (DESIGN.md §2, "Evaluation protocols").

For a length ``L``: the documents with at least ``L`` tokens are cut into windows of ``L`` tokens
(:func:`posheads.data.window_document`) -- disjoint, or sliding with a stride as in the YaRN evaluation
(Peng et al. 2023, arXiv 2309.00071) and the Hugging Face guide "Perplexity of fixed-length models" --
and every window is scored on its scored region (for sliding windows, the tokens the previous window did
not score). ``score_last`` narrows that to the last tokens of each window, the ones that see at least
``L - score_last`` tokens of context. The result is the mean negative log-likelihood over all scored tokens
of all windows (a token-weighted mean, not a mean of per-window means), its exponential (perplexity), and
the numbers of tokens, windows and documents used.

Logits are requested only for the scored tail of each window (``logits_to_keep``), and the log-softmax is
taken in chunks of positions, so that a long window never materialises more than
``chunk x vocabulary`` float32 log-probabilities at once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from posheads.data import TokenizedDocument, Window, window_document
from posheads.eval.conditions import NONE, Condition, ConditionRunner

__all__ = [
    "PerplexityRow",
    "evaluate_perplexity",
    "perplexity_windows",
    "scored_offset",
    "token_nll_sums",
    "window_nll_sums",
]

#: Positions per chunk of the float32 log-softmax.
NLL_CHUNK = 1024


@dataclass(frozen=True)
class PerplexityRow:
    """One perplexity result (a row of ``results.json["perplexity"]``)."""

    condition: str
    length: int
    nll: float
    ppl: float
    tokens: int
    documents: int
    windows: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "length": self.length,
            "nll": self.nll,
            "ppl": self.ppl,
            "tokens": self.tokens,
            "documents": self.documents,
            "windows": self.windows,
        }


def scored_offset(window: Window, score_last: int | float | None) -> int:
    """Index inside ``window`` of the first token whose prediction is scored (at least 1: the first token of
    a window has nothing before it to be predicted from).

    ``score_last``: ``None`` scores the window's whole scored region; an int ``n`` only its last ``n``
    tokens; a float ``f`` in ``(0, 1]`` only its last ``ceil(f * L)`` tokens.
    """
    offset = window.score_offset
    if score_last is not None:
        if isinstance(score_last, float) and not isinstance(score_last, bool):
            if not 0.0 < score_last <= 1.0:
                raise ValueError(f"score_last={score_last!r} must be an int >= 1 or a float in (0, 1]")
            n_last = math.ceil(score_last * window.length)
        else:
            n_last = int(score_last)
            if n_last < 1:
                raise ValueError(f"score_last={score_last!r} must be an int >= 1 or a float in (0, 1]")
        offset = max(offset, window.length - n_last)
    return max(offset, 1)


def token_nll_sums(logits: torch.Tensor, targets: torch.Tensor, chunk: int = NLL_CHUNK) -> torch.Tensor:
    """Sum over positions of ``-log softmax(logits)[target]`` per row.

    Args:
        logits: ``[B, K, V]`` (any float dtype; computed in float32).
        targets: int64 ``[B, K]``.
    Returns float64 ``[B]``.
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    total = torch.zeros(logits.shape[0], dtype=torch.float64, device=logits.device)  # [B]
    for s in range(0, logits.shape[1], chunk):
        lp = torch.log_softmax(logits[:, s : s + chunk].float(), dim=-1)  # [B, k, V]
        picked = lp.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1)  # [B, k]
        total -= picked.double().sum(dim=1)
    return total


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def window_nll_sums(model: Any, input_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Summed NLL of tokens ``offset .. L-1`` of each row of ``input_ids`` (``[B, L]``), each predicted from
    the tokens before it. Returns float64 ``[B]``; the number of scored tokens is ``L - offset``."""
    length = input_ids.shape[1]
    if not 1 <= offset < length:
        raise ValueError(f"offset={offset} must be in [1, {length - 1}] for a window of {length} tokens")
    keep = length - offset + 1  # logits of positions offset-1 .. L-1
    if _accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits  # [B, keep, V]
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, -keep:]  # [B, keep, V]
    return token_nll_sums(logits[:, :-1], input_ids[:, offset:])  # [B]


def perplexity_windows(
    docs: Sequence[TokenizedDocument],
    length: int,
    stride: int | None = None,
    max_windows_per_doc: int | None = None,
    max_windows: int | None = None,
    max_documents: int | None = None,
    min_document_tokens: int | None = None,
) -> list[tuple[TokenizedDocument, Window]]:
    """The ``(document, window)`` pairs evaluated at ``length``: documents with at least ``length`` tokens
    (and at least ``min_document_tokens``: pass the longest length to compare every length on the same
    documents), in order, at most ``max_documents`` of them; at most ``max_windows_per_doc`` windows per
    document and ``max_windows`` in total. Raises ``ValueError`` naming the length when no document is long
    enough."""
    need = max(length, min_document_tokens or 0)
    long_enough = [d for d in docs if d.n_tokens >= need]
    if not long_enough:
        longest = max((d.n_tokens for d in docs), default=0)
        raise ValueError(
            f"perplexity length={length}: no document has at least {need} tokens "
            f"(the longest of {len(docs)} has {longest}); use shorter lengths or a corpus of longer documents"
        )
    if max_documents is not None:
        long_enough = long_enough[:max_documents]
    out: list[tuple[TokenizedDocument, Window]] = []
    for doc in long_enough:
        for w in window_document(doc, length, stride=stride, max_windows=max_windows_per_doc):
            out.append((doc, w))
            if max_windows is not None and len(out) >= max_windows:
                return out
    return out


@torch.inference_mode()
def evaluate_perplexity(
    model: Any,
    docs: Sequence[TokenizedDocument],
    length: int,
    *,
    stride: int | None = None,
    score_last: int | float | None = None,
    max_windows_per_doc: int | None = None,
    max_windows: int | None = None,
    max_documents: int | None = None,
    min_document_tokens: int | None = None,
    runner: ConditionRunner | None = None,
    conditions: Sequence[Condition] | None = None,
    on_row: Callable[[PerplexityRow], None] | None = None,
    progress: bool = True,
) -> list[PerplexityRow]:
    """Perplexity at ``length`` under each condition of ``runner`` (default: no ablation only).

    Conditions are evaluated group by group (a group = one batched forward per window, one row per
    condition); ``on_row`` is called as soon as a condition's row is complete. ``conditions`` restricts
    the runner's conditions (e.g. to the ones a resumed run still lacks).
    """
    runner = runner or ConditionRunner(model, [NONE])
    pairs = perplexity_windows(
        docs, length, stride, max_windows_per_doc, max_windows, max_documents, min_document_tokens
    )
    device = next(model.parameters()).device
    rows: list[PerplexityRow] = []
    for group in runner.groups(length, conditions):
        totals = torch.zeros(len(group), dtype=torch.float64)  # [G]
        tokens = 0
        names = ",".join(c.name for c in group)
        bar = tqdm(pairs, desc=f"ppl L={length} [{names}]", unit="win", disable=not progress, leave=False)
        for doc, window in bar:
            offset = scored_offset(window, score_last)
            ids = doc.ids[window.start : window.end].to(device)  # [L]

            def fn(n: int, ids: torch.Tensor = ids, offset: int = offset) -> torch.Tensor:
                return window_nll_sums(model, ids.expand(n, -1), offset).cpu()  # [n]

            totals += torch.stack(runner.call(group, fn))
            tokens += window.length - offset
        documents = len({doc.name for doc, _ in pairs})
        for i, cond in enumerate(group):
            nll = float(totals[i] / tokens)
            row = PerplexityRow(cond.name, length, nll, math.exp(nll), tokens, documents, len(pairs))
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows
