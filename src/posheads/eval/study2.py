"""Study 2b, training-free: does the extension of the Positional Heads' high-dimensional attention allocation
(HDA) predict which RoPE scaling method extrapolates? (Hong et al., arXiv 2410.08703, third claim.)

One model, several ``(method, factor)`` scalings applied *without fine-tuning*, each measured with the same
probes at one target length ``L`` (16384 for SmolLM2-135M, whose pre-training context is 8192):

1. **Identification** (once, on the *unscaled* model): the Positional Heads are identified on probe
   sequences (:func:`posheads.heads.identify_positional_heads`), once per analysis *variant* (e.g. the
   attention sink's keys included / excluded from the statistics). The probe documents are disjoint from
   the evaluation documents (checked, names recorded).
2. **One forward per evaluation window and scaling** (:func:`measure_window`): a window of ``L`` tokens
   (:func:`assemble_window`) of held-out text -- documents concatenated (``[BOS] doc_1 \\n\\n doc_2 ...``)
   because a single file is rarely that long; every document's token span is recorded -- with a multi-key
   passkey in it, is run once with one statistics collector per variant installed in the attention layers,
   so that the same forward gives

   * the per-token NLL of the document tokens, summed per (position bucket, document): e.g. tokens 0-8k,
     8k-12k, 12k-16k; a bucket's NLL is the token-weighted mean over its tokens, with a bootstrap interval
     over the documents of the bucket (:func:`posheads.eval.intervals.bootstrap_nll`); the plain perplexity
     is the first bucket (within the original context), the long-context-sensitive one the last bucket
     (tokens that see at least its start of context);
   * the HDA curve of every head at distances up to ``L`` on sampled query rows, summarised over the
     Positional Heads of the variant as HDA extension (largest log2 distance bin with HDA >= tau) and HDA
     area (octaves), with a bootstrap interval over the heads of the set;
   * **multi-key passkey, teacher-forced**: right after BOS, the passkey task sentence (Mohtashami & Jaggi
     2023) and ``K`` key sentences, one per (length, trial), each with its own label word ("The pass key
     for the apple door is 51234. Remember it."); the questions for the keys of length ``l`` are inserted
     into the text so that the last answer ends at token ``l``: each key is retrieved over about ``l``
     tokens (the key at depth ~0 of an ``l``-token context). The answers are in the input (teacher
     forcing): a key counts as retrieved when every answer token is the argmax prediction; its
     log-probability is recorded too. Each value occurs once before its question, so no answer can be
     copied from an earlier answer. The inserted tokens are not scored for the NLL.

Every result is written to ``<output.dir>/<method>_x<factor>/results.json`` with its protocol (model,
scaling, window documents and spans, probe documents, variants, seeds); a finished point is skipped when the
command is run again (resume). ``python -m posheads.lit.compare_methods`` reads these files.

LongRoPE needs searched per-pair factors; without a search, :func:`longrope_factors` derives them by a
documented rule (``critical_split``: pairs below the critical pair ``i_c`` -- those that complete a period
within the pre-training context -- keep their frequency, pairs ``>= i_c`` are interpolated by the factor;
short factors all 1, so sequences within the original context are unchanged).

Command::

    python -m posheads.eval.study2 --config configs/study2/training_free_cpu.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from posheads.data import CorpusConfig, TokenizedDocument, load_token_documents
from posheads.data.retrieval import NEEDLE_KEYS, PASSKEY_FILLER, PASSKEY_TASK, derive_seed
from posheads.eval.intervals import bootstrap_nll, percentile_interval, wilson_interval
from posheads.heads import HeadsConfig, RowPlan, attention_hooks, sample_query_rows
from posheads.heads.identify import analyze, collector_for_config, identify_positional_heads
from posheads.models import ModelConfig
from posheads.rope import RopeScaling, scaling_of

__all__ = [
    "LONGROPE_RULES",
    "IdentifySpec",
    "PasskeySpec",
    "Point",
    "Study2Config",
    "WindowSpec",
    "assemble_window",
    "bucket_sums",
    "longrope_factors",
    "main",
    "measure_window",
    "run_study",
    "score_keys",
    "window_documents",
]

LONGROPE_RULES = ("critical_split",)
#: Methods a training-free point may use (``dynamic`` grows its base with the input; also allowed).
POINT_METHODS = ("as_loaded", "none", "linear", "pi", "ntk", "dynamic", "yarn", "llama3", "longrope")


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


def _pos_int(option: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option}={value!r} must be an int >= {minimum}")
    return value


@dataclass
class Point:
    """One scaling: ``method`` (a :mod:`posheads.rope` method; ``none`` = the unscaled baseline;
    ``as_loaded`` = the RoPE the checkpoint was saved with, e.g. a fine-tuned run's) and ``factor``."""

    method: str
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in POINT_METHODS:
            raise ValueError(f"points: method={self.method!r} is not one of {list(POINT_METHODS)}")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)):
            raise ValueError(f"points: factor={self.factor!r} must be a number")
        self.factor = float(self.factor)
        if self.method in ("none", "as_loaded"):
            if self.factor != 1.0:
                raise ValueError(f"points: method={self.method!r} takes no factor, got factor={self.factor}")
        elif not self.factor > 1.0:
            raise ValueError(f"points: {self.method} factor={self.factor} must be > 1")

    @property
    def name(self) -> str:
        return self.method if self.method in ("none", "as_loaded") else f"{self.method}_x{self.factor:g}"


@dataclass
class WindowSpec:
    """Evaluation windows of held-out text.

    Attributes:
        num_windows: windows (each one forward per point); documents are not reused across windows.
        min_doc_tokens, max_doc_tokens: documents taken into windows (moderate sizes, so that every position
            bucket holds several documents for the bootstrap).
        skip_documents: skip this many qualifying documents first (in corpus order).
        buckets: position-bucket edges ``[0, b1, ..., L]`` (the last edge is the window length).
    """

    num_windows: int = 1
    min_doc_tokens: int = 1000
    max_doc_tokens: int = 4000
    skip_documents: int = 0
    buckets: list[int] = field(default_factory=lambda: [0, 8192, 12288, 16384])

    def __post_init__(self) -> None:
        _pos_int("windows.num_windows", self.num_windows)
        _pos_int("windows.min_doc_tokens", self.min_doc_tokens, 2)
        _pos_int("windows.max_doc_tokens", self.max_doc_tokens, 2)
        _pos_int("windows.skip_documents", self.skip_documents, 0)
        if self.max_doc_tokens < self.min_doc_tokens:
            raise ValueError(
                f"windows.max_doc_tokens={self.max_doc_tokens} is below windows.min_doc_tokens={self.min_doc_tokens}"
            )
        b = self.buckets
        if (
            not isinstance(b, (list, tuple))
            or len(b) < 2
            or b[0] != 0
            or any(isinstance(x, bool) or not isinstance(x, int) for x in b)
            or any(y <= x for x, y in zip(b, b[1:]))
        ):
            raise ValueError(
                f"windows.buckets={b!r} must be increasing ints starting at 0 (the last = length)"
            )
        self.buckets = list(b)

    @property
    def length(self) -> int:
        return self.buckets[-1]


@dataclass
class IdentifySpec:
    """Positional-Head identification on the unscaled model.

    Attributes:
        length: tokens per probe sequence; num_sequences: probe sequences (documents >= length tokens,
            disjoint from the evaluation windows' documents).
        analysis: the identification's :class:`~posheads.heads.HeadsConfig`.
        variants: ``{name: overrides of analysis}`` -- one identification and one HDA measurement per
            variant (e.g. ``{"sinks_in": {}, "sinks_out": {"sink_keys": 1}}`` where the analysis supports it).
    """

    length: int = 2048
    num_sequences: int = 2
    analysis: HeadsConfig = field(default_factory=HeadsConfig)
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"all_keys": {}})

    def __post_init__(self) -> None:
        _pos_int("identify.length", self.length, 2)
        _pos_int("identify.num_sequences", self.num_sequences)
        if isinstance(self.analysis, dict):
            self.analysis = HeadsConfig(**self.analysis)
        if not isinstance(self.variants, dict) or not self.variants:
            raise ValueError(
                f"identify.variants={self.variants!r} must be a non-empty mapping name -> overrides"
            )
        for name, over in self.variants.items():
            if not isinstance(over, dict):
                raise ValueError(f"identify.variants.{name}={over!r} must be a mapping of analysis options")
            self.variant_config(name)  # validates

    def variant_config(self, name: str, **extra: Any) -> HeadsConfig:
        base = self.analysis.to_dict()
        base.update(self.variants[name])
        base.update(extra)
        try:
            return HeadsConfig(**base)
        except TypeError as err:
            raise ValueError(f"identify.variants.{name}: {err}") from None


@dataclass
class PasskeySpec:
    """Multi-key teacher-forced passkey inside the evaluation windows (see the module docstring).

    Attributes:
        lengths: query lengths (each key is retrieved over about that many tokens); the largest must not
            exceed the window length.
        keys_per_length: keys (trials) per length and window (0 = no passkey).
        seed: base seed (window ``w`` uses ``derive_seed("study2-passkey", seed, w)``).
        num_digits: digits of a key.
    """

    lengths: list[int] = field(default_factory=lambda: [8192, 12288, 16384])
    keys_per_length: int = 2
    seed: int = 0
    num_digits: int = 5

    def __post_init__(self) -> None:
        if not isinstance(self.lengths, (list, tuple)) or not self.lengths:
            raise ValueError(f"passkey.lengths={self.lengths!r} must be a non-empty list")
        for v in self.lengths:
            _pos_int("passkey.lengths", v, 2)
        if len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"passkey.lengths={self.lengths!r} has duplicates")
        self.lengths = sorted(self.lengths)
        _pos_int("passkey.keys_per_length", self.keys_per_length, 0)
        _pos_int("passkey.seed", self.seed, 0)
        _pos_int("passkey.num_digits", self.num_digits)
        if self.keys_per_length * len(self.lengths) > len(NEEDLE_KEYS):
            raise ValueError(
                f"passkey: {self.keys_per_length} keys x {len(self.lengths)} lengths exceed the "
                f"{len(NEEDLE_KEYS)} label words"
            )


@dataclass
class Study2Config:
    """``python -m posheads.eval.study2``: every option is validated before the model loads.

    Attributes:
        model: the model (``smollm2``, ``tiny``, a run's ``final`` directory ...). Its RoPE must be unscaled
            (the points apply the scalings from the pre-trained RoPE).
        original_context: the pre-training context ``L0`` (``null`` = the config's).
        points: the scalings; ``longrope`` points get factors from ``longrope_rule``.
        longrope_rule: how LongRoPE per-pair factors are derived (:func:`longrope_factors`).
        corpus: documents for the windows and the identification probes.
        windows, identify, passkey: see their classes.
        hda_rows: query rows per window for the HDA measurement; hda_keys_per_bin: keys per distance bin.
        n_boot: bootstrap resamples; seed: the bootstrap seed.
        threads: torch CPU threads (``null`` = torch's default). token_cache: tokenised-corpus cache.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        output_dir: where ``<point>/results.json`` and ``identification.json`` go.
        identification_file: reuse this ``identification.json`` (e.g. the base model's, to measure fine-tuned
            runs on the same heads) instead of identifying on the loaded model.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    original_context: int | None = None
    points: list[Point] = field(default_factory=lambda: [Point("none")])
    longrope_rule: str = "critical_split"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    windows: WindowSpec = field(default_factory=WindowSpec)
    identify: IdentifySpec = field(default_factory=IdentifySpec)
    passkey: PasskeySpec = field(default_factory=PasskeySpec)
    hda_rows: int = 32
    hda_keys_per_bin: int | None = 8
    n_boot: int = 2000
    seed: int = 0
    threads: int | None = None
    token_cache: str | None = None
    device: str = "auto"
    output_dir: str = "runs/study2/training_free"
    identification_file: str | None = None

    def __post_init__(self) -> None:
        for name, cls in (
            ("model", ModelConfig),
            ("corpus", CorpusConfig),
            ("windows", WindowSpec),
            ("identify", IdentifySpec),
            ("passkey", PasskeySpec),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if not isinstance(self.points, (list, tuple)) or not self.points:
            raise ValueError(f"points={self.points!r} must be a non-empty list of {{method, factor}}")
        self.points = [Point(**p) if isinstance(p, dict) else p for p in self.points]
        names = [p.name for p in self.points]
        if len(set(names)) != len(names):
            raise ValueError(f"points has duplicates: {names}")
        if self.original_context is not None:
            _pos_int("original_context", self.original_context, 2)
        if self.longrope_rule not in LONGROPE_RULES:
            raise ValueError(f"longrope_rule={self.longrope_rule!r} is not one of {list(LONGROPE_RULES)}")
        _pos_int("hda_rows", self.hda_rows)
        if self.hda_keys_per_bin is not None:
            _pos_int("hda_keys_per_bin", self.hda_keys_per_bin, 2)
        _pos_int("n_boot", self.n_boot)
        _pos_int("seed", self.seed, 0)
        if self.threads is not None:
            _pos_int("threads", self.threads)
        if not self.output_dir:
            raise ValueError("output_dir='' must name a directory")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r} is not 'auto', 'cpu' or 'cuda[:N]'")
        if self.passkey.keys_per_length and self.passkey.lengths[-1] > self.windows.length:
            raise ValueError(
                f"passkey.lengths={self.passkey.lengths} go beyond the window length {self.windows.length} "
                "(windows.buckets[-1])"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["identify"]["analysis"] = self.identify.analysis.to_dict()
        return out


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Study2Config:
    """A :class:`Study2Config` from a YAML file (top-level keys overridden by ``overrides``)."""
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping")
    data.update(overrides or {})
    try:
        return Study2Config(**data)
    except TypeError as err:
        raise ValueError(f"{path}: {err}") from None


# --------------------------------------------------------------------------------------------------------
# Scalings
# --------------------------------------------------------------------------------------------------------


def longrope_factors(rule: str, num_pairs: int, i_c: int, factor: float) -> tuple[list[float], list[float]]:
    """``(short_factor, long_factor)`` per RoPE pair by a documented rule (no search).

    ``critical_split``: ``long_factor[i] = 1`` for ``i < i_c`` (pairs that complete a period within the
    pre-training context keep their frequency) and ``factor`` for ``i >= i_c`` (the pairs that never
    completed a period are interpolated, as PI does for all pairs); ``short_factor`` is all 1 (inputs within
    the original context run the pre-trained RoPE).
    """
    if rule not in LONGROPE_RULES:
        raise ValueError(f"longrope_rule={rule!r} is not one of {list(LONGROPE_RULES)}")
    if not 0 <= i_c <= num_pairs:
        raise ValueError(f"i_c={i_c} must be in 0..{num_pairs}")
    short = [1.0] * num_pairs
    long = [1.0 if i < i_c else float(factor) for i in range(num_pairs)]
    return short, long


def scaling_for(point: Point, num_pairs: int, i_c: int, rule: str, original_context: int) -> RopeScaling:
    """The :class:`RopeScaling` of a point (LongRoPE factors from ``rule``)."""
    if point.method == "none":
        return RopeScaling(method="none")
    kwargs: dict[str, Any] = {"original_max_position_embeddings": original_context}
    if point.method == "longrope":
        kwargs["short_factor"], kwargs["long_factor"] = longrope_factors(rule, num_pairs, i_c, point.factor)
    return RopeScaling(method=point.method, factor=point.factor, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Windows of held-out text
# --------------------------------------------------------------------------------------------------------


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _filler(sentences: list[list[int]], n: int) -> list[int]:
    """``n`` tokens of repeated filler sentences, the first one cut at its front (ends on a sentence end)."""
    if n <= 0:
        return []
    pieces: list[int] = []
    k = 0
    while len(pieces) < n:
        pieces = sentences[(-1 - k) % len(sentences)] + pieces
        k += 1
    return pieces[len(pieces) - n :]


def window_documents(
    docs: Sequence[TokenizedDocument],
    *,
    min_doc_tokens: int,
    max_doc_tokens: int,
    exclude: set[str] | None = None,
    skip: int = 0,
) -> list[TokenizedDocument]:
    """The documents windows are made of: ``min_doc_tokens <= n_tokens <= max_doc_tokens``, not in
    ``exclude`` (the identification probes), in corpus order, after skipping ``skip`` of them."""
    exclude = exclude or set()
    return [d for d in docs if min_doc_tokens <= d.n_tokens <= max_doc_tokens and d.name not in exclude][
        skip:
    ]


def assemble_window(
    tokenizer: Any,
    length: int,
    documents: Iterator[TokenizedDocument] | None,
    query_lengths: Sequence[int] = (),
    keys_per_length: int = 0,
    seed: int = 0,
    num_digits: int = 5,
    separator: Sequence[int] = (),
) -> dict[str, Any]:
    """A window of exactly ``length`` tokens, optionally with a multi-key passkey in it.

    Layout: ``[BOS]``, then -- with keys -- the passkey task sentence and ``K = keys_per_length x
    len(query_lengths)`` key sentences ("The pass key for the <label> door is <digits>. Remember it.",
    seeded labels, values and order), then text: whole ``documents`` joined by ``separator`` (each one's own
    BOS dropped; one is cut where a question block goes and continues after it), or the standard passkey
    filler when ``documents`` is ``None``. For each query length ``l`` the questions and answers of its keys
    ("What is the pass key for the <label> door? The pass key for the <label> door is <digits>") end exactly
    at token ``l``. Each key's value occurs once before its question.

    Returns ``{"ids": LongTensor [length], "spans": [(document, start, end)] (text tokens only), "keys":
    [{label, answer, length, key_start, answer_start, answer_len}], "inserted": [(start, end)]}``.
    Raises ``ValueError`` when the documents run out or a question block does not fit.
    """
    rng = random.Random(seed)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = [] if bos is None else [int(bos)]
    keys: list[dict[str, Any]] = []
    inserted: list[tuple[int, int]] = []
    qls = sorted(int(q) for q in query_lengths) if keys_per_length else []
    if qls:
        labels = rng.sample(list(NEEDLE_KEYS), keys_per_length * len(qls))
        for i, ql in enumerate(qls):
            for j in range(keys_per_length):
                value = str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))
                keys.append({"label": labels[i * keys_per_length + j], "answer": value, "length": ql})
        order = list(range(len(keys)))
        rng.shuffle(order)  # key sentences in a seeded order, unrelated to the query length
        start = len(ids)
        ids += _enc(tokenizer, PASSKEY_TASK)
        for k in order:
            keys[k]["key_start"] = len(ids)
            ids += _enc(
                tokenizer,
                f" The pass key for the {keys[k]['label']} door is {keys[k]['answer']}. Remember it.",
            )
        ids += _enc(tokenizer, "\n\n") if documents is not None else []
        inserted.append((start, len(ids)))
    sentences = [_enc(tokenizer, " " + s) for s in PASSKEY_FILLER]
    spans: list[tuple[str, int, int]] = []
    pending: tuple[str, list[int]] | None = None  # the rest of a document cut by a question block

    def fill(n: int) -> None:
        """Append ``n`` text tokens."""
        nonlocal pending
        if documents is None:
            ids.extend(_filler(sentences, n))
            return
        while n > 0:
            if pending is None:
                doc = next(documents, None)
                if doc is None:
                    raise ValueError(
                        f"windows: the documents ran out while filling a window of {length} tokens"
                    )
                body = doc.ids.tolist()
                if bos is not None and body and body[0] == bos:
                    body = body[1:]
                if spans and separator:
                    sep = list(separator)[:n]
                    ids.extend(sep)
                    n -= len(sep)
                    if n == 0:
                        pending = (doc.name, body)
                        return
                pending = (doc.name, body)
            name, body = pending
            take = body[:n]
            spans.append((name, len(ids), len(ids) + len(take)))
            ids.extend(take)
            n -= len(take)
            pending = (name, body[len(take) :]) if len(take) < len(body) else None

    for ql in qls:
        block: list[int] = []
        mine = [k for k in keys if k["length"] == ql]
        offsets = []
        for key in mine:
            q = _enc(
                tokenizer,
                f"\nWhat is the pass key for the {key['label']} door? The pass key for the {key['label']} door is",
            )
            a = _enc(tokenizer, " " + key["answer"])
            offsets.append((len(block) + len(q), len(a)))
            block += q + a
        gap = ql - len(ids) - len(block)
        if gap < 0:
            raise ValueError(
                f"passkey: query length {ql} is too short for the task, {len(keys)} key sentences and the "
                f"questions before it ({ql - gap} tokens)"
            )
        fill(gap)
        base = len(ids)
        for key, (off, width) in zip(mine, offsets):
            key["answer_start"], key["answer_len"] = base + off, width
        ids += block
        inserted.append((base, len(ids)))
    if len(ids) > length:
        raise ValueError(f"passkey: the window needs {len(ids)} tokens, more than length={length}")
    fill(length - len(ids))
    return {"ids": torch.tensor(ids, dtype=torch.long), "spans": spans, "keys": keys, "inserted": inserted}


def bucket_sums(
    token_nll: torch.Tensor, spans: Sequence[tuple[str, int, int]], buckets: Sequence[int]
) -> list[dict[str, Any]]:
    """Per bucket ``[lo, hi)`` of *predicted-token* positions: ``[{"lo", "hi", "documents": [name],
    "nll_sums": [...], "tokens": [...]}]``, one entry per document (its spans in the bucket pooled).
    ``token_nll[t]`` is the NLL of token ``t + 1`` given tokens ``0..t`` (length ``L - 1``); only tokens in a
    document span are counted (BOS, separators and inserted passkey text are not scored)."""
    nll = token_nll.double().cpu()
    out = []
    for lo, hi in zip(buckets, buckets[1:]):
        per: dict[str, list[float]] = {}
        for name, s, e in spans:
            a, b = max(s, lo, 1), min(e, hi)  # predicted positions in [a, b)
            if b > a:
                acc = per.setdefault(name, [0.0, 0.0])
                acc[0] += float(nll[a - 1 : b - 1].sum())
                acc[1] += b - a
        out.append(
            {
                "lo": lo,
                "hi": hi,
                "documents": list(per),
                "nll_sums": [v[0] for v in per.values()],
                "tokens": [int(v[1]) for v in per.values()],
            }
        )
    return out


def score_keys(
    keys: Sequence[dict[str, Any]], ids: torch.Tensor, token_nll: torch.Tensor, argmax: torch.Tensor
) -> list[dict[str, Any]]:
    """Teacher-forced passkey: one row per key -- ``correct`` (every answer token is the argmax prediction),
    ``logprob`` (summed over the answer tokens), ``distance`` (answer start - key sentence start)."""
    rows = []
    for k in keys:
        s, n = k["answer_start"], k["answer_len"]
        pred = argmax[s - 1 : s - 1 + n]
        rows.append(
            {
                "length": k["length"],
                "label": k["label"],
                "answer": k["answer"],
                "distance": s - k["key_start"],
                "correct": bool(torch.equal(pred.cpu(), ids[s : s + n].cpu())),
                "logprob": -float(token_nll[s - 1 : s - 1 + n].sum()),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------------------
# One forward
# --------------------------------------------------------------------------------------------------------


def _base_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    wrapped: Any = model  # a causal LM, or a peft wrapper around one
    base: Any = wrapped.get_base_model() if callable(getattr(wrapped, "get_base_model", None)) else wrapped
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(base).__name__}: needs a decoder and an output embedding (a causal LM)")
    return decoder, head


class _Fanout:
    """One attention hook that calls several (one statistics collector per analysis variant)."""

    def __init__(self, hooks: Sequence[Callable[..., Any]]):
        self.hooks = list(hooks)

    def __call__(self, module: nn.Module, call: Any) -> None:
        for h in self.hooks:
            h(module, call)


@torch.no_grad()
def measure_window(
    model: nn.Module,
    ids: torch.Tensor,
    collectors: Sequence[Any] = (),
    rows_seed: int = 0,
    chunk: int = 1024,
) -> dict[str, torch.Tensor]:
    """One forward of ``ids [L]`` with ``collectors`` installed (each gets the same seeded query rows).

    Returns ``{"token_nll": [L-1] float64, "argmax": [L-1] long}``: the NLL of token ``t+1`` given tokens
    ``0..t`` and the model's argmax prediction for it; the log-softmax is taken in chunks of positions."""
    decoder, head = _base_and_head(model)
    device = next(model.parameters()).device
    x = ids.view(1, -1).to(device)
    length = x.shape[1]
    for c in collectors:
        rows = sample_query_rows(torch.ones(1, length, dtype=torch.bool), c.rows_per_sequence, [rows_seed])
        c.plan = RowPlan(rows, seed=rows_seed)
    was_training = model.training
    model.eval()
    try:
        if collectors:
            with attention_hooks(model, _Fanout(collectors)):
                hidden = decoder(input_ids=x, use_cache=False).last_hidden_state[0]  # [L, D]
        else:
            hidden = decoder(input_ids=x, use_cache=False).last_hidden_state[0]
    finally:
        model.train(was_training)
    targets = x[0, 1:]
    nll = torch.empty(length - 1, dtype=torch.float64)
    top = torch.empty(length - 1, dtype=torch.long)
    for s in range(0, length - 1, chunk):
        e = min(s + chunk, length - 1)
        lp = torch.log_softmax(head(hidden[s:e]).float(), dim=-1)  # [e-s, V]
        nll[s:e] = -lp.gather(-1, targets[s:e, None]).squeeze(-1).double().cpu()
        top[s:e] = lp.argmax(-1).cpu()
    return {"token_nll": nll, "argmax": top}


# --------------------------------------------------------------------------------------------------------
# Summaries with intervals
# --------------------------------------------------------------------------------------------------------


def _bootstrap_mean(values: Sequence[float], n_boot: int, seed: int) -> dict[str, Any]:
    arr = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    rng = np.random.default_rng(seed)
    boot = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    lo, hi = percentile_interval(boot)
    return {"mean": float(arr.mean()), "lo": lo, "hi": hi, "n": int(arr.size)}


def hda_summary(analysis: Any, heads: Sequence[tuple[int, int]], n_boot: int, seed: int) -> dict[str, Any]:
    """HDA of a head set in one analysis: the set-mean curve, the mean extension (bin index and tokens) and
    area with bootstrap intervals over the heads (``n`` = heads)."""
    ext_bin = [float(analysis.hda_extension_bin[layer, h]) for layer, h in heads]
    ext_tok = [float(analysis.hda_extension_distance[layer, h]) for layer, h in heads]
    area = [float(analysis.hda_area[layer, h]) for layer, h in heads]
    curve = []
    for b in range(analysis.hda.shape[-1]):
        vals = [float(analysis.hda[layer, h, b]) for layer, h in heads]
        finite = [v for v in vals if math.isfinite(v)]
        curve.append(float(np.mean(finite)) if finite else None)
    return {
        "heads": [list(x) for x in heads],
        "extension_bin": _bootstrap_mean(ext_bin, n_boot, seed),
        "extension_tokens": _bootstrap_mean(ext_tok, n_boot, seed),
        "area": _bootstrap_mean(area, n_boot, seed),
        "curve": curve,
        "bin_edges": [list(e) for e in analysis.bin_edges()],
        "i_c": analysis.i_c,
        "tau": analysis.config.tau,
        "rows": float(analysis.stats.rows),
    }


def perplexity_summary(
    windows_buckets: list[list[dict[str, Any]]], n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Per bucket (pooled over windows): token-weighted NLL / PPL with a bootstrap over the bucket's documents."""
    out = []
    for b in range(len(windows_buckets[0])):
        names, sums, toks = [], [], []
        for wb in windows_buckets:
            names += wb[b]["documents"]
            sums += wb[b]["nll_sums"]
            toks += wb[b]["tokens"]
        res = bootstrap_nll({"nll": sums}, toks, n_boot=n_boot, seed=seed)["conditions"]["nll"]
        start, end = windows_buckets[0][b]["lo"], windows_buckets[0][b]["hi"]
        out.append(
            {
                "bucket": f"{start}-{end}",
                "start": start,
                "end": end,
                **res,
                "tokens": int(sum(toks)),
                "documents": len(names),
                "document_names": names,
            }
        )
    return out


def passkey_summary(rows: list[dict[str, Any]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Per query length: exact-match accuracy with a Wilson interval and mean answer log-prob (bootstrap)."""
    out = []
    for ql in sorted({r["length"] for r in rows}):
        mine = [r for r in rows if r["length"] == ql]
        k = sum(r["correct"] for r in mine)
        lo, hi = wilson_interval(k, len(mine))
        lp = _bootstrap_mean([r["logprob"] for r in mine], n_boot, seed)
        out.append(
            {
                "length": ql,
                "correct": k,
                "trials": len(mine),
                "accuracy": k / len(mine),
                "lo": lo,
                "hi": hi,
                "logprob": lp,
                "mean_distance": float(np.mean([r["distance"] for r in mine])),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False, default=str), encoding="utf-8")
    os.replace(tmp, path)


def run_study(
    cfg: Study2Config, only: Sequence[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Identify once, then measure every point (skipping points whose ``results.json`` exists)."""
    from posheads.heads.hda import critical_pair_for
    from posheads.models.loading import load_model, load_tokenizer
    from posheads.rope import original_context_length, rope_head_dim

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(torch.device(device)).eval()  # type: ignore[arg-type]
    l0 = cfg.original_context or original_context_length(model.config)
    num_pairs = rope_head_dim(model.config) // 2
    i_c = critical_pair_for(model.config, cfg.identify.analysis.critical, l0)
    if not isinstance(i_c, int):
        raise ValueError(
            f"study2: {model.config.model_type} has one critical pair per layer type ({i_c}); the HDA summary of "
            "this study assumes one i_c for the model"
        )
    docs = load_token_documents(cfg.corpus, tokenizer, cache_dir=cfg.token_cache, progress=False)
    length = cfg.windows.length

    # --- identification probes (the first documents long enough that are not window material) and windows
    probe_docs = [
        d
        for d in docs
        if d.n_tokens >= cfg.identify.length
        and not (cfg.windows.min_doc_tokens <= d.n_tokens <= cfg.windows.max_doc_tokens)
    ][: cfg.identify.num_sequences]
    if len(probe_docs) < cfg.identify.num_sequences:
        raise ValueError(
            f"identify: only {len(probe_docs)} documents have >= {cfg.identify.length} tokens outside the window "
            f"size range; need identify.num_sequences={cfg.identify.num_sequences}"
        )
    probe_names = {d.name for d in probe_docs}
    pool = window_documents(
        docs,
        min_doc_tokens=cfg.windows.min_doc_tokens,
        max_doc_tokens=cfg.windows.max_doc_tokens,
        exclude=probe_names,
        skip=cfg.windows.skip_documents,
    )
    stream = iter(pool)
    pk = cfg.passkey
    windows = [
        assemble_window(
            tokenizer,
            length,
            stream,
            pk.lengths,
            pk.keys_per_length,
            derive_seed("study2-passkey", pk.seed, w),
            pk.num_digits,
            separator=_enc(tokenizer, "\n\n"),
        )
        for w in range(cfg.windows.num_windows)
    ]
    window_names = {n for w in windows for n, _, _ in w["spans"]}
    if window_names & probe_names:  # pragma: no cover - excluded by construction
        raise AssertionError("identification probes overlap the evaluation windows")

    # --- identification on the unscaled model, one per variant
    ident_path = Path(cfg.identification_file) if cfg.identification_file else out / "identification.json"
    if ident_path.is_file():
        ident = json.loads(ident_path.read_text())
        missing = set(cfg.identify.variants) - set(ident["variants"])
        if missing:
            raise ValueError(f"{ident_path} has no identification for the variants {sorted(missing)}")
        overlap = set(ident["probe_documents"]) & window_names
        if overlap:
            raise ValueError(
                f"{ident_path}: its probe documents {sorted(overlap)} are in the evaluation windows"
            )
        log(f"identification: reusing {ident_path}")
    elif cfg.identification_file:
        raise FileNotFoundError(f"identification_file={cfg.identification_file!r} does not exist")
    else:
        t0 = time.perf_counter()
        probes = torch.stack([d.ids[: cfg.identify.length] for d in probe_docs])
        ident = {"probe_documents": sorted(probe_names), "length": cfg.identify.length, "variants": {}}
        for name in cfg.identify.variants:
            hc = cfg.identify.variant_config(name)
            an = identify_positional_heads(model, probes, hc, progress=False)
            ident["variants"][name] = {
                "config": hc.to_dict(),
                "positional_heads": [list(x) for x in an.positional_heads()],
                "per_layer_counts": an.per_layer_counts(),
                "i_c": an.i_c,
                "hda_at_probe_length": an.set_hda(),
            }
            log(f"identification [{name}]: {len(an.positional_heads())} Positional Heads, i_c={an.i_c}")
        ident["seconds"] = time.perf_counter() - t0
        _write_json(ident_path, ident)

    # --- points
    summaries: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for point in cfg.points:
        if only and point.name not in only:
            continue
        res_path = out / point.name / "results.json"
        if res_path.is_file():
            log(f"{point.name}: done before ({res_path})")
            summaries[point.name] = json.loads(res_path.read_text())
            continue
        try:
            result = _measure_point(
                cfg, point, model, windows, ident, num_pairs, i_c, l0, length, probe_names
            )
        except (
            Exception
        ) as err:  # one failing scaling must not lose the others: recorded, then re-raised at the end
            failures[point.name] = f"{type(err).__name__}: {err}"
            log(f"{point.name}: FAILED {failures[point.name]}")
            continue
        _write_json(res_path, result)
        summaries[point.name] = result
        ppl = result["perplexity"][-1]
        h0 = next(iter(result["hda"].values()))
        log(
            f"{point.name}: PPL[{ppl['bucket']}]={ppl['ppl']:.2f} [{ppl['ppl_lo']:.2f}, {ppl['ppl_hi']:.2f}] "
            f"(n={ppl['documents']} docs), HDA ext={h0['extension_bin']['mean']}, area={h0['area']['mean']:.3f}, "
            f"{result['seconds']['total']:.0f}s"
        )
    log(f"study2: {time.perf_counter() - started:.0f}s")
    if failures:
        raise RuntimeError(f"study2: {len(failures)} point(s) failed: {failures}")
    return summaries


def _measure_point(
    cfg: Study2Config,
    point: Point,
    model: nn.Module,
    windows: list[dict[str, Any]],
    ident: dict[str, Any],
    num_pairs: int,
    i_c: int,
    l0: int,
    length: int,
    probe_names: set[str],
) -> dict[str, Any]:
    """Apply one scaling and measure it on every window (one forward each)."""
    from posheads.rope import apply_rope_scaling_to_model

    t0 = time.perf_counter()
    if point.method == "as_loaded":
        scaling = scaling_of(model.config)
    else:
        scaling = scaling_for(point, num_pairs, i_c, cfg.longrope_rule, l0)
        apply_rope_scaling_to_model(model, scaling)
    variants = {}
    for name in cfg.identify.variants:
        hc = cfg.identify.variant_config(
            name, rows_per_sequence=cfg.hda_rows, keys_per_bin=cfg.hda_keys_per_bin, num_bins=None
        )
        variants[name] = (hc, collector_for_config(model, hc, length))
    buckets, pk_rows = [], []
    for w_i, w in enumerate(windows):
        res = measure_window(
            model, w["ids"], [c for _, c in variants.values()], rows_seed=cfg.seed * 1_000_003 + w_i
        )
        buckets.append(bucket_sums(res["token_nll"], w["spans"], cfg.windows.buckets))
        pk_rows += [
            {"window": w_i, **r} for r in score_keys(w["keys"], w["ids"], res["token_nll"], res["argmax"])
        ]
    hda = {}
    for name, (hc, col) in variants.items():
        an = analyze(col.stats, hc, i_c)
        heads = [tuple(x) for x in ident["variants"][name]["positional_heads"]]
        hda[name] = hda_summary(an, heads, cfg.n_boot, cfg.seed)
    result = {
        "protocol": {
            "study": "2b training-free",
            "model": cfg.model.name_or_path,
            "point": point.name,
            "method": scaling.method,
            "factor": scaling.factor if scaling.method != "none" else 1.0,
            "rope_scaling": scaling.to_dict(),
            "longrope_rule": cfg.longrope_rule if point.method == "longrope" else None,
            "original_context": l0,
            "window_length": length,
            "buckets": cfg.windows.buckets,
            "windows": [
                {"spans": [list(s) for s in w["spans"]], "inserted": [list(x) for x in w["inserted"]]}
                for w in windows
            ],
            "window_assembly": "[BOS] passkey task + key sentences, then doc_1 '\\n\\n' doc_2 ... (each "
            "document's own BOS dropped; question blocks inserted so that they end at each passkey length; "
            "only document tokens are scored for the NLL)",
            "probe_documents": sorted(probe_names),
            "identification": "unscaled model, per variant (identification.json)",
            "hda": {
                "rows_per_window": cfg.hda_rows,
                "keys_per_bin": cfg.hda_keys_per_bin,
                "i_c": i_c,
                "measured_on": "the evaluation windows (same forward as the NLL)",
            },
            "passkey": {
                **asdict(cfg.passkey),
                "protocol": "multi-key, teacher-forced, in the evaluation windows: key sentences after BOS, "
                "questions + answers ending at each length; correct = every answer token is the argmax",
            },
            "corpus": asdict(cfg.corpus),
            "seed": cfg.seed,
            "n_boot": cfg.n_boot,
            "threads": torch.get_num_threads(),
        },
        "hda": hda,
        "perplexity": perplexity_summary(buckets, cfg.n_boot, cfg.seed),
        "perplexity_raw": buckets,
        "passkey": passkey_summary(pk_rows, cfg.n_boot, cfg.seed) if pk_rows else [],
        "passkey_trials": pk_rows,
        "seconds": {"total": time.perf_counter() - t0, "forwards": len(windows)},
    }
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description="Study 2b (training-free): HDA of the Positional Heads vs extrapolation"
    )
    ap.add_argument("--config", required=True, help="YAML file (see configs/study2/)")
    ap.add_argument("--output_dir", default=None, help="override output_dir")
    ap.add_argument(
        "--model", default=None, help="override model.name_or_path (e.g. a fine-tuned run's final/)"
    )
    ap.add_argument("--only", nargs="*", default=None, help="measure only these points (e.g. none yarn_x2)")
    args = ap.parse_args(argv)
    over: dict[str, Any] = {}
    if args.output_dir:
        over["output_dir"] = args.output_dir
    cfg = load_config(args.config, over)
    if args.model:
        cfg.model = ModelConfig(**{**asdict(cfg.model), "name_or_path": args.model})
    return run_study(cfg, only=args.only)


if __name__ == "__main__":
    main()
