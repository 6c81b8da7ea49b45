"""Long-input perplexity by length (docs/definitions.md, "perplexity protocol").

For a length ``L``: the documents with at least ``L`` tokens are cut into windows of ``L`` tokens
(:func:`posheads.data.window_document`) -- disjoint, or sliding with a stride as in the YaRN evaluation
(Peng et al. 2023, arXiv 2309.00071) and the Hugging Face guide "Perplexity of fixed-length models" --
and every window is scored on its scored region (for sliding windows, the tokens the previous window did
not score). ``score_last`` narrows that to the last tokens of each window, the ones that see at least
``L - score_last`` tokens of context. The result is the mean negative log-likelihood over all scored tokens
of all windows (a token-weighted mean, not a mean of per-window means), its exponential (perplexity), and
the numbers of tokens, windows and documents used.

Every row keeps its windows (``per_window``: document, token range, scored tokens, NLL sum), so a reader
sees which text is behind a number and :func:`perplexity_intervals` can bootstrap over documents
(:mod:`posheads.eval.intervals`): intervals for every condition's NLL / PPL, for its difference from
``none``, and for the Positional - control differences (pooled over random seeds and per seed), all paired
(the conditions see the same documents).

:func:`evaluate_perplexity_lengths` runs every length; with ``nested=True`` (one window per document, the
window of length ``L`` being the document's first ``L`` tokens) a document is fed once, at the longest
length it is used for, and the shorter lengths are read off the same forward: a causal model's prediction
at position ``t`` depends only on tokens ``<= t``, so the NLL of the first ``L`` tokens inside a longer
forward is the NLL of the ``L``-token window (up to floating-point summation order).

Logits are requested only for the scored tail of each window (``logits_to_keep``), and the log-softmax is
taken in chunks of positions, so that a long window never materialises more than
``chunk x vocabulary`` float32 log-probabilities at once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from posheads.data import TokenizedDocument, Window, window_document
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.distributed import SINGLE, Ranks
from posheads.eval.intervals import DEFAULT_BOOT, DEFAULT_LEVEL, bootstrap_nll

__all__ = [
    "PerplexityRow",
    "evaluate_perplexity",
    "evaluate_perplexity_lengths",
    "perplexity_intervals",
    "perplexity_windows",
    "scored_offset",
    "token_nll_sums",
    "token_nlls",
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
    per_window: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "condition": self.condition,
            "length": self.length,
            "nll": self.nll,
            "ppl": self.ppl,
            "tokens": self.tokens,
            "documents": self.documents,
            "windows": self.windows,
            "per_window": [dict(w) for w in self.per_window],
        }


def _window_record(doc: TokenizedDocument, window: Window, offset: int, nll_sum: float) -> dict[str, Any]:
    """One window behind a row: the document, the tokens fed ``[start, end)``, the first scored token
    (absolute index), the scored tokens and their summed NLL."""
    return {
        "document": doc.name,
        "start": window.start,
        "end": window.end,
        "scored_from": window.start + offset,
        "tokens": window.length - offset,
        "nll_sum": nll_sum,
    }


def _row(condition: str, length: int, records: Sequence[dict[str, Any]]) -> PerplexityRow:
    tokens = sum(int(r["tokens"]) for r in records)
    nll = float(sum(float(r["nll_sum"]) for r in records) / tokens)
    documents = len({r["document"] for r in records})
    return PerplexityRow(
        condition, length, nll, math.exp(nll), tokens, documents, len(records), tuple(records)
    )


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


def token_nlls(logits: torch.Tensor, targets: torch.Tensor, chunk: int = NLL_CHUNK) -> torch.Tensor:
    """``-log softmax(logits)[target]`` per position: float64 ``[B, K]`` (``logits`` ``[B, K, V]``)."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match")
    out = torch.empty(targets.shape, dtype=torch.float64, device=logits.device)  # [B, K]
    for s in range(0, logits.shape[1], chunk):
        lp = torch.log_softmax(logits[:, s : s + chunk].float(), dim=-1)  # [B, k, V]
        out[:, s : s + chunk] = -lp.gather(-1, targets[:, s : s + chunk, None]).squeeze(-1).double()
    return out


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
    ranks: Ranks = SINGLE,
) -> list[PerplexityRow]:
    """Perplexity at ``length`` under each condition of ``runner`` (default: no ablation only).

    Conditions are evaluated group by group (a group = one batched forward per window, one row per
    condition); ``on_row`` is called as soon as a condition's row is complete. ``conditions`` restricts
    the runner's conditions (e.g. to the ones a resumed run still lacks). ``ranks``: the windows are split
    over the evaluation processes and their sums gathered in order (:mod:`posheads.eval.distributed`), so every
    rank returns the single-process rows.
    """
    runner = runner or ConditionRunner(model, [NONE])
    pairs = perplexity_windows(
        docs, length, stride, max_windows_per_doc, max_windows, max_documents, min_document_tokens
    )
    device = next(model.parameters()).device
    rows: list[PerplexityRow] = []
    for group in runner.groups(length, conditions):
        records: list[list[dict[str, Any]]] = [[] for _ in group]
        names = ",".join(c.name for c in group)

        def bar(items: Any, names: str = names) -> Any:
            desc = f"ppl L={length} [{names}]"
            return tqdm(items, desc=desc, unit="win", disable=not progress, leave=False)

        def window_sums(pair: tuple[TokenizedDocument, Window], group: Any = group) -> torch.Tensor:
            doc, window = pair
            offset = scored_offset(window, score_last)
            ids = doc.ids[window.start : window.end].to(device)  # [L]

            def fn(n: int) -> torch.Tensor:
                return window_nll_sums(model, ids.expand(n, -1), offset).cpu()  # [n]

            return torch.stack(runner.call(group, fn))  # [G]

        for (doc, window), sums in zip(pairs, ranks.map(window_sums, pairs, wrap=bar)):
            offset = scored_offset(window, score_last)
            for i in range(len(group)):
                records[i].append(_window_record(doc, window, offset, float(sums[i])))
        for i, cond in enumerate(group):
            row = _row(cond.name, length, records[i])
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def nested_plan(
    docs: Sequence[TokenizedDocument],
    lengths: Sequence[int],
    *,
    max_documents: int | None = None,
    max_documents_per_length: Mapping[int, int] | None = None,
    min_document_tokens: int | None = None,
) -> dict[int, list[TokenizedDocument]]:
    """The documents of every length for a nested evaluation (one window per document, its first ``L``
    tokens): ``{L: documents}``, each list a prefix of the documents long enough (for ``L`` and
    ``min_document_tokens``), cut to ``max_documents`` and ``max_documents_per_length[L]``."""
    plan: dict[int, list[TokenizedDocument]] = {}
    for length in lengths:
        pairs = perplexity_windows(
            docs,
            length,
            max_windows_per_doc=1,
            max_documents=(max_documents_per_length or {}).get(length, max_documents),
            min_document_tokens=min_document_tokens,
        )
        chosen = [d for d, _ in pairs]
        if max_documents is not None:
            chosen = chosen[:max_documents]
        plan[length] = chosen
    return plan


@torch.inference_mode()
def evaluate_perplexity_lengths(
    model: Any,
    docs: Sequence[TokenizedDocument],
    lengths: Sequence[int],
    *,
    nested: bool = False,
    stride: int | None = None,
    score_last: int | float | None = None,
    max_windows_per_doc: int | None = None,
    max_windows: int | None = None,
    max_documents: int | None = None,
    max_documents_per_length: Mapping[int, int] | None = None,
    min_document_tokens: int | None = None,
    runner: ConditionRunner | None = None,
    conditions: Sequence[Condition] | None = None,
    conditions_at: Mapping[int, Sequence[str]] | None = None,
    on_row: Callable[[PerplexityRow], None] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
) -> list[PerplexityRow]:
    """Perplexity at every length of ``lengths`` under each condition.

    ``nested=False``: :func:`evaluate_perplexity` per length. ``nested=True`` (needs ``stride=None`` and one
    window per document): each document is fed once per condition, at the longest length it is used for
    (:func:`nested_plan`), and every shorter length is scored on a prefix of that forward.
    ``conditions_at``: ``{length: names}`` -- only conditions whose name or family is listed run at that
    length. ``ranks``: windows (documents when nested) split over the evaluation processes, results gathered
    in order (:mod:`posheads.eval.distributed`).
    """
    runner = runner or ConditionRunner(model, [NONE])
    todo = list(runner.conditions if conditions is None else conditions)

    def runs_at(cond: Condition, length: int) -> bool:
        names = (conditions_at or {}).get(length)
        return names is None or cond.name in names or cond.family in names

    if not nested:
        rows: list[PerplexityRow] = []
        for length in lengths:
            here = [c for c in todo if runs_at(c, length)]
            if not here:
                continue
            cap = (max_documents_per_length or {}).get(length, max_documents)
            rows += evaluate_perplexity(
                model,
                docs,
                length,
                stride=stride,
                score_last=score_last,
                max_windows_per_doc=max_windows_per_doc,
                max_windows=max_windows,
                max_documents=cap,
                min_document_tokens=min_document_tokens,
                runner=runner,
                conditions=here,
                on_row=on_row,
                progress=progress,
                ranks=ranks,
            )
        return rows
    if stride is not None or (max_windows_per_doc not in (None, 1)):
        raise ValueError("nested perplexity needs disjoint windows (stride=None) and max_windows_per_doc=1")
    plan = nested_plan(
        docs,
        lengths,
        max_documents=max_documents
        if max_windows is None
        else min(max_documents or max_windows, max_windows),
        max_documents_per_length=max_documents_per_length,
        min_document_tokens=min_document_tokens,
    )
    device = next(model.parameters()).device
    out: list[PerplexityRow] = []
    longest = max(lengths)
    # conditions that run at the same lengths share their groups (their documents' forwards coincide)
    by_lengths: dict[tuple[int, ...], list[Condition]] = {}
    for c in todo:
        by_lengths.setdefault(tuple(L for L in sorted(plan) if runs_at(c, L)), []).append(c)
    work = [(ls, g) for ls, conds in by_lengths.items() if ls for g in runner.groups(longest, conds)]
    for active, group in work:
        feed: dict[
            str, tuple[TokenizedDocument, int]
        ] = {}  # document -> (doc, longest length it is used for)
        for length in active:
            for d in plan[length]:
                feed[d.name] = (d, length)
        records: dict[int, list[list[dict[str, Any]]]] = {L: [[] for _ in group] for L in active}
        names = ",".join(c.name for c in group)
        items = list(feed.values())

        def bar(items: Any, names: str = names) -> Any:
            return tqdm(items, desc=f"ppl nested [{names}]", unit="doc", disable=not progress, leave=False)

        def doc_nlls(item: tuple[TokenizedDocument, int], group: Any = group) -> torch.Tensor:
            doc, top = item
            ids = doc.ids[:top].to(device)  # [top]

            def fn(n: int) -> torch.Tensor:
                logits = model(input_ids=ids.expand(n, -1), use_cache=False).logits  # [n, top, V]
                return token_nlls(logits[:, :-1], ids[1:].expand(n, -1)).cpu()  # [n, top-1]

            return torch.stack(runner.call(group, fn))  # [G, top-1]; entry t-1 predicts token t

        for (doc, _top), per_pos in zip(items, ranks.map(doc_nlls, items, wrap=bar)):
            for length in active:
                if doc.name not in {d.name for d in plan[length]}:
                    continue
                window = Window(doc.name, 0, length, 0)
                offset = scored_offset(window, score_last)
                sums = per_pos[:, offset - 1 : length - 1].sum(dim=1)  # [G]
                for i in range(len(group)):
                    records[length][i].append(_window_record(doc, window, offset, float(sums[i])))
        for length in active:
            for i, cond in enumerate(group):
                row = _row(cond.name, length, records[length][i])
                out.append(row)
                if on_row is not None:
                    on_row(row)
    return out


# --------------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------------


def _per_document(row: Mapping[str, Any]) -> dict[str, tuple[float, int]]:
    """``{document: (NLL sum, scored tokens)}`` of a results row (its windows summed per document)."""
    out: dict[str, tuple[float, int]] = {}
    for w in row.get("per_window") or []:
        s, t = out.get(w["document"], (0.0, 0))
        out[w["document"]] = (s + float(w["nll_sum"]), t + int(w["tokens"]))
    return out


def _control_family(cond: Mapping[str, Any], control: str) -> str | None:
    """The family name of ``cond``'s matched control ``control`` (``random`` / ``lowest``): the same
    operation (ablation mode, or dims side) on the control heads; ``None`` when ``cond`` is not a
    Positional-set condition."""
    name = str(cond["name"])
    base = str(cond.get("family", name)).split(":")[0]
    if cond.get("kind") == "heads" and base in ("positional", "positional_allkeys"):
        mode = name.split(":", 1)[1] if ":" in name else None
        return base.replace("positional", control, 1) + (f":{mode}" if mode else "")
    if cond.get("kind") == "dims" and cond.get("target", "positional") == "positional":
        return f"{name}[{control}]"
    return None


def perplexity_intervals(
    results: Mapping[str, Any], *, n_boot: int = DEFAULT_BOOT, seed: int = 0, level: float = DEFAULT_LEVEL
) -> dict[str, Any]:
    """Document-bootstrap intervals of a ``results.json``'s perplexity rows, per length.

    For every length: every condition's NLL / PPL; every condition minus ``none``; every multi-member
    family's mean (e.g. ``random`` over seeds); every Positional-set condition minus its controls --
    ``positional - random`` (the random family pooled: the mean over seeds), ``positional - random@s`` (each
    seed), ``positional - lowest``, and the same for ``positional:mean`` and ``dims_high`` / ``dims_low``
    (against ``dims_high[random]`` ...); and ``dims_high - dims_low`` in every head family. Contrasts are
    differences of token-weighted NLLs, computed on the same resample of documents (paired).

    Rows without ``per_window`` records, or whose documents differ from the other conditions' at that
    length, are left out (the output lists them under ``skipped``).
    """
    rows = results.get("perplexity") or []
    described = {c["name"]: c for c in results.get("conditions") or []}
    out: dict[str, Any] = {"level": level, "n_boot": n_boot, "seed": seed, "lengths": {}}
    for length in sorted({int(r["length"]) for r in rows}):
        at = {r["condition"]: _per_document(r) for r in rows if int(r["length"]) == length}
        at = {c: v for c, v in at.items() if v}
        if not at:
            continue
        ref_docs = sorted(at.get("none") or next(iter(at.values())))
        skipped = sorted(c for c, v in at.items() if sorted(v) != ref_docs)
        at = {c: v for c, v in at.items() if c not in skipped}
        sums = {c: [v[d][0] for d in ref_docs] for c, v in at.items()}
        tokens = {c: [v[d][1] for d in ref_docs] for c, v in at.items()}
        families: dict[str, list[str]] = {}
        for c in at:
            families.setdefault(described.get(c, {}).get("family", c), []).append(c)
        contrasts: dict[str, dict[str, float]] = {}
        if "none" in at:
            for c in at:
                if c != "none":
                    contrasts[f"{c} - none"] = {c: 1.0, "none": -1.0}
        for fam, members in families.items():
            if len(members) > 1:
                contrasts[f"mean({fam})"] = {m: 1.0 / len(members) for m in members}
                if "none" in at:
                    contrasts[f"mean({fam}) - none"] = {
                        **{m: 1.0 / len(members) for m in members},
                        "none": -1.0,
                    }
        for c in at:
            cond = described.get(c, {"name": c})
            for control in ("random", "lowest"):
                ctrl = _control_family(cond, control)
                members = families.get(ctrl or "", [])
                if not members:
                    continue
                if len(members) > 1:
                    w = {m: -1.0 / len(members) for m in members}
                    contrasts[f"{c} - mean({ctrl})"] = {c: 1.0, **w}
                for m in members:
                    contrasts[f"{c} - {m}"] = {c: 1.0, m: -1.0}
        if "positional" in at and "positional_allkeys" in at:
            contrasts["positional - positional_allkeys"] = {"positional": 1.0, "positional_allkeys": -1.0}
        for c in at:
            cond = described.get(c, {})
            if cond.get("kind") == "dims" and cond.get("side") == "high":
                low = c.replace("dims_high", "dims_low", 1)
                if low in at:
                    contrasts[f"{c} - {low}"] = {c: 1.0, low: -1.0}
        for fam, members in families.items():
            if fam.startswith("dims_high[") and len(members) > 1:
                lows = [m.replace("dims_high", "dims_low", 1) for m in members]
                if all(m in at for m in lows):
                    w = {m: 1.0 / len(members) for m in members}
                    w.update({m: -1.0 / len(lows) for m in lows})
                    contrasts[f"mean({fam}) - mean({fam.replace('dims_high', 'dims_low', 1)})"] = w
        boot = bootstrap_nll(sums, tokens, contrasts, n_boot=n_boot, seed=seed, level=level)
        boot["documents"] = ref_docs
        boot["skipped"] = skipped
        out["lengths"][str(length)] = boot
    return out
