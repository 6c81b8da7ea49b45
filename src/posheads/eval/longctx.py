"""Long-context-sensitive perplexity: the NLL of the tokens whose prediction depends on long context.

Plain perplexity averages over every token, and most tokens of a document are predictable from the last few
hundred (the idea of LongPPL, Fang et al. 2024, "What is Wrong with Perplexity for Long-context Language
Modeling?", arXiv 2410.23771; implemented here from its definition). For a window of ``L`` tokens:

1. **Selection, once, on the unablated model.** Every token ``t`` gets its log-probability with the whole
   window before it (``lp_long(t)``) and with a short context (``lp_short(t)``): windows of ``short`` tokens
   with stride ``short / 2``, each token read in the window where it has between ``short / 2`` and
   ``short`` tokens of context (tokens in the first ``short`` of the window keep their long context: their
   gain is 0). A token is *long-context sensitive* when its gain ``lp_long(t) - lp_short(t) > threshold``
   (nats). The selected positions are recorded (count, fraction, threshold, short context).
2. **Scoring, per condition.** The NLL over the selected tokens only (token-weighted), from one forward over
   the window per group of conditions (rows = conditions, layers before the first ablated one shared when the
   runner has a prefix), next to the plain NLL of the same windows.

Pure torch; no Lightning, no W&B.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from posheads.data import TokenizedDocument
from posheads.eval.conditions import NONE, Condition, ConditionRunner
from posheads.eval.distributed import SINGLE, Ranks
from posheads.eval.intervals import DEFAULT_BOOT, DEFAULT_LEVEL, bootstrap_indices, percentile_interval
from posheads.eval.perplexity import NLL_CHUNK, perplexity_windows
from posheads.eval.sweep import own_controls

__all__ = [
    "LongContextRow",
    "evaluate_long_context_perplexity",
    "long_context_intervals",
    "select_long_context_tokens",
    "short_context_logprobs",
    "token_logprobs",
]


def token_logprobs(model: Any, input_ids: torch.Tensor, chunk: int = NLL_CHUNK) -> torch.Tensor:
    """``log p(x_t | x_<t)`` for ``t = 1 .. L-1`` of every row of ``input_ids`` (``[B, L]``).
    Returns float64 ``[B, L-1]`` (position ``j`` is token ``j + 1``)."""
    head = model.get_output_embeddings()
    capped = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if head is None or capped:  # the full forward (its logits post-processing included)
        hidden, head = model(input_ids=input_ids, use_cache=False).logits, None  # [B, L, V]
    else:  # the decoder once, the output projection chunk by chunk (never L x V logits at once)
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, D]
    out = torch.empty(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float64)
    for s in range(0, input_ids.shape[1] - 1, chunk):
        part = hidden[:, s : s + chunk]
        logits = part if head is None else head(part)  # [B, k, V]
        lp = torch.log_softmax(logits.float(), dim=-1)  # [B, k, V]
        tgt = input_ids[:, s + 1 : s + 1 + chunk]  # [B, k]
        out[:, s : s + tgt.shape[1]] = (
            lp[:, : tgt.shape[1]].gather(-1, tgt[..., None]).squeeze(-1).double().cpu()
        )
    return out


def short_context_logprobs(model: Any, ids: torch.Tensor, short: int) -> torch.Tensor:
    """``log p(x_t | a short context)`` for ``t = 1 .. L-1`` of a 1-D ``ids`` (``[L]``): windows of ``short``
    tokens starting every ``short // 2``; token ``t`` is read in the window where it has between
    ``short // 2`` and ``short - 1`` tokens before it (tokens ``t < short``: window 0, their whole context).
    Returns float64 ``[L-1]``."""
    if short < 2 or short % 2:
        raise ValueError(f"short={short!r} must be an even number >= 2")
    ids = ids.reshape(-1)
    n = ids.numel()
    half = short // 2
    out = torch.full((n - 1,), math.nan, dtype=torch.float64)
    start = 0
    while True:
        window = ids[start : start + short]
        if window.numel() < 2:
            break
        lp = token_logprobs(model, window[None])[0]  # [w-1]; j -> token start + j + 1
        lo = 1 if start == 0 else half  # first in-window position read from this window
        for j in range(lo - 1, lp.numel()):
            out[start + j] = lp[j]
        if start + short >= n:
            break
        start += half
    assert not torch.isnan(out).any()
    return out


def select_long_context_tokens(
    long_lp: torch.Tensor, short_lp: torch.Tensor, threshold: float, offset: int = 1
) -> torch.Tensor:
    """Boolean ``[L-1]`` mask of the long-context-sensitive tokens: ``long - short > threshold`` among
    the positions ``>= offset`` (token index; position ``j`` is token ``j + 1``)."""
    gain = long_lp - short_lp
    mask = gain > threshold
    mask[: max(0, offset - 1)] = False
    return mask


@dataclass(frozen=True)
class LongContextRow:
    """One row of ``results.json["perplexity_lc"]``; ``doc_*`` hold the per-document sums behind the NLLs
    (document order as in ``document_names``) for the document bootstrap (:func:`long_context_intervals`)."""

    condition: str
    length: int
    nll_lc: float
    ppl_lc: float
    tokens_lc: int
    nll: float
    ppl: float
    tokens: int
    windows: int
    documents: int
    short: int
    threshold: float
    document_names: tuple[str, ...] = ()
    doc_nll_lc: tuple[float, ...] = ()
    doc_tokens_lc: tuple[int, ...] = ()
    doc_nll: tuple[float, ...] = ()
    doc_tokens: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        return dict(d, fraction=self.tokens_lc / self.tokens if self.tokens else math.nan)


@torch.inference_mode()
def evaluate_long_context_perplexity(
    model: Any,
    docs: Sequence[TokenizedDocument],
    length: int,
    *,
    short: int = 256,
    threshold: float = 2.0,
    max_windows: int | None = None,
    max_documents: int | None = None,
    min_document_tokens: int | None = None,
    runner: ConditionRunner | None = None,
    conditions: Sequence[Condition] | None = None,
    on_row: Callable[[LongContextRow], None] | None = None,
    progress: bool = True,
    ranks: Ranks = SINGLE,
) -> list[LongContextRow]:
    """Plain and long-context-sensitive NLL at ``length`` (one window per document, its first ``length``
    tokens) under each condition; the token selection is made on the unablated model (``model`` outside any
    ablation) and is the same for every condition. ``ranks``: the documents are split over the evaluation
    processes (selection and scoring) and gathered in order; every rank returns the single-process rows."""
    if not 2 <= short < length or short % 2:
        raise ValueError(f"short={short!r} must be an even number in [2, length={length})")
    runner = runner or ConditionRunner(model, [NONE])
    pairs = perplexity_windows(
        docs,
        length,
        max_windows_per_doc=1,
        max_windows=max_windows,
        max_documents=max_documents,
        min_document_tokens=min_document_tokens,
    )
    device = next(model.parameters()).device

    def window(pair: Any) -> torch.Tensor:
        doc, w = pair
        return doc.ids[w.start : w.end].to(device)

    def select(pair: Any) -> torch.Tensor:
        ids = window(pair)
        long_lp = token_logprobs(model, ids[None])[0]
        return select_long_context_tokens(long_lp, short_context_logprobs(model, ids, short), threshold).cpu()

    def bar(items: Any, desc: str = f"lc-ppl select L={length}") -> Any:
        return tqdm(items, desc=desc, disable=not progress, leave=False)

    masks = list(ranks.map(select, pairs, wrap=bar))  # [L-1] bool per window
    names = tuple(doc.name for doc, _ in pairs)
    doc_tokens = tuple(int(m.numel()) for m in masks)
    doc_tokens_lc = tuple(int(m.sum()) for m in masks)
    selected, total = sum(doc_tokens_lc), sum(doc_tokens)
    rows: list[LongContextRow] = []
    for group in runner.groups(length, conditions):

        def sums(item: Any, group: Any = group) -> torch.Tensor:
            pair, mask = item
            ids = window(pair)

            def fn(n: int) -> torch.Tensor:
                return token_logprobs(model, ids.expand(n, -1))  # [n, L-1]

            lp = torch.stack(runner.call(group, fn)).double()  # [G, L-1]
            m = mask.to(lp.device)
            return torch.stack([-(lp * m).sum(1), -lp.sum(1)], dim=1).cpu()  # [G, 2]: lc, plain NLL sums

        def scoring_bar(
            items: Any, desc: str = f"lc-ppl L={length} [{','.join(c.name for c in group)}]"
        ) -> Any:
            return bar(items, desc)

        per_doc = torch.stack(list(ranks.map(sums, list(zip(pairs, masks)), wrap=scoring_bar)))  # [D, G, 2]
        for i, cond in enumerate(group):
            lc_sums, plain_sums = per_doc[:, i, 0], per_doc[:, i, 1]
            nll_lc = float(lc_sums.sum() / selected) if selected else math.nan
            nll = float(plain_sums.sum() / total)
            row = LongContextRow(
                cond.name,
                length,
                nll_lc,
                math.exp(nll_lc) if selected else math.nan,
                selected,
                nll,
                math.exp(nll),
                total,
                len(pairs),
                len(set(names)),
                short,
                float(threshold),
                names,
                tuple(float(x) for x in lc_sums),
                doc_tokens_lc,
                tuple(float(x) for x in plain_sums),
                doc_tokens,
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    return rows


def long_context_intervals(
    rows: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> list[dict[str, Any]]:
    """Per length: the long-context-sensitive and the plain NLL of every condition with a paired percentile
    bootstrap over documents (the token-weighted NLL recomputed per resample), each condition minus ``none``
    and each Positional set minus the mean of its own clean controls (``minus_random``, ...;
    :func:`posheads.eval.sweep.own_controls`) on the same resamples. ``rows``: ``results.json["perplexity_lc"]`` (rows without per-document
    sums, written before they were recorded, are skipped)."""
    out = []
    for length in sorted({int(r["length"]) for r in rows}):
        rs = [r for r in rows if int(r["length"]) == length and r.get("doc_nll_lc")]
        if not rs:
            continue
        names = rs[0]["document_names"]
        if any(r["document_names"] != names for r in rs):
            raise ValueError(f"perplexity_lc rows at length {length} cover different documents")
        idx = bootstrap_indices(len(names), n_boot, seed)  # [B, D]
        entry: dict[str, Any] = {"length": length, "n_documents": len(names), "documents": list(names)}
        for kind, num, den in (("lc", "doc_nll_lc", "doc_tokens_lc"), ("plain", "doc_nll", "doc_tokens")):
            tok = np.asarray(rs[0][den], dtype=np.float64)
            boot_den = tok[idx].sum(axis=1)  # [B]
            point, boot = {}, {}
            for r in rs:
                sums = np.asarray(r[num], dtype=np.float64)
                point[r["condition"]] = float(sums.sum() / tok.sum()) if tok.sum() else math.nan
                with np.errstate(invalid="ignore", divide="ignore"):
                    boot[r["condition"]] = np.where(boot_den > 0, sums[idx].sum(axis=1) / boot_den, np.nan)
            conds: dict[str, dict[str, Any]] = {}
            for c, b in boot.items():
                lo, hi = _finite_interval(b, level)
                conds[c] = {"nll": point[c], "lo": lo, "hi": hi}
                if c != "none" and "none" in boot:
                    dlo, dhi = _finite_interval(b - boot["none"], level)
                    conds[c]["minus_none"] = {"value": point[c] - point["none"], "lo": dlo, "hi": dhi}
            for c in conds:  # a Positional set minus the mean of its own clean controls, same resamples
                for fam, members in own_controls(c, boot).items():
                    value = point[c] - float(np.mean([point[m] for m in members]))
                    lo, hi = _finite_interval(boot[c] - np.mean([boot[m] for m in members], axis=0), level)
                    conds[c][f"minus_{fam}"] = {"value": value, "lo": lo, "hi": hi, "controls": members}
            entry[kind] = {"tokens": int(tok.sum()), "conditions": conds}
        entry.update(
            n_boot=n_boot, seed=seed, level=level, method="paired percentile bootstrap over documents"
        )
        out.append(entry)
    return out


def _finite_interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    """Percentile interval of the finite resamples (a resample of documents without a selected token has no
    long-context NLL)."""
    finite = samples[np.isfinite(samples)]
    if finite.size < 2:
        return None, None
    return percentile_interval(finite, level)
