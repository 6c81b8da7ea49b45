"""Prompt generators for retrieval evaluations: passkey retrieval and needle-in-a-haystack.

Both are *pure and seeded*: the same arguments (tokenizer included) give the same token ids, the same
answer and the same insertion point, on any machine. They only call ``tokenizer(text,
add_special_tokens=False)``; prompts are built at the token level so that a prompt has *exactly* the
requested number of tokens.

* **Passkey retrieval** (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context
  Length for Transformers", arXiv 2305.16300; the protocol used by Position Interpolation, YaRN and
  LongLoRA): a task sentence, the filler "The grass is green. The sky is blue. The sun is yellow. Here we
  go. There and back again." repeated, the sentence "The pass key is N. Remember it. N is the pass key."
  at a chosen depth of the filler, and the question "What is the pass key? The pass key is". The answer is
  a random ``num_digits``-digit number (no leading zero).
* **Needle in a haystack** (Kamradt 2023, "Needle In A Haystack - pressure testing LLMs"; the
  number-valued needle of RULER, Hsieh et al. 2024, arXiv 2404.06654): a needle sentence
  "The special magic number for KEY is: VALUE." inserted at a depth into *real* text -- a contiguous
  span of the tokenised corpus -- followed by the question. The key is a word drawn from
  :data:`NEEDLE_KEYS`, the value a random ``num_digits``-digit number, scored by exact match.

Layout of a prompt (token level)::

    [BOS] prefix | haystack[:cut] | needle | haystack[cut:] | question

``haystack`` is truncated so that the whole prompt has exactly ``length`` tokens. ``cut`` is
``round(depth * len(haystack))`` moved to the nearest sentence boundary (passkey: between two filler
sentences; needle: after a token that ends a line or a sentence, searched within
:data:`SNAP_WINDOW` tokens), and the depth actually used is recorded (:attr:`RetrievalPrompt.actual_depth`).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "NEEDLE_KEYS",
    "PASSKEY_FILLER",
    "PASSKEY_QUESTION",
    "PASSKEY_TASK",
    "RetrievalPrompt",
    "answer_matches",
    "derive_seed",
    "haystack_pool",
    "haystack_span",
    "needle_prompt",
    "passkey_prompt",
    "prompt_overhead",
    "snap_cut",
]

PASSKEY_TASK = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
#: The filler sentences, repeated in this order.
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_KEY = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE_PREFIX = "Read the following text and remember the special magic number it contains."
NEEDLE_TEMPLATE = "The special magic number for {key} is: {value}."
NEEDLE_QUESTION = "What is the special magic number for {key} mentioned in the provided text? The special magic number for {key} mentioned in the provided text is:"
#: Keys of the needle (common, single-token-ish English words; one is drawn per trial).
NEEDLE_KEYS = (
    "apple", "river", "lantern", "violin", "harbor", "meadow", "falcon", "copper", "garden", "pepper",
    "silver", "thunder", "willow", "compass", "canyon", "marble", "orchid", "pebble", "saddle", "tunnel",
)  # fmt: skip
#: How far (tokens) the insertion point may move to reach a sentence / line boundary in real text.
SNAP_WINDOW = 48


@dataclass(frozen=True)
class RetrievalPrompt:
    """One retrieval prompt.

    Attributes:
        input_ids: int64 ``[length]`` -- the whole prompt, BOS first when the tokenizer has one.
        answer: the expected answer string (the digits).
        length: ``len(input_ids)``, equal to the requested length.
        depth: the requested depth in ``[0, 1]``.
        actual_depth: where the key/needle starts, as a fraction of the haystack.
        key_start: index in ``input_ids`` of the first key/needle token.
        seed: the seed this prompt was derived from.
    """

    input_ids: torch.Tensor
    answer: str
    length: int
    depth: float
    actual_depth: float
    key_start: int
    seed: int


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from any printable parts (``hash()`` is salted per process and unusable here)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any, add_bos: bool) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    return [] if bos is None else [int(bos)]


def _random_number(rng: random.Random, num_digits: int) -> str:
    if num_digits < 1:
        raise ValueError(f"num_digits={num_digits!r} must be >= 1")
    return str(rng.randint(10 ** (num_digits - 1), 10**num_digits - 1))


def _check_depth(depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")


def _assemble(
    head: list[int], haystack: list[int], cut: int, needle: list[int], tail: list[int]
) -> tuple[torch.Tensor, int]:
    ids = head + haystack[:cut] + needle + haystack[cut:] + tail
    return torch.tensor(ids, dtype=torch.long), len(head) + cut  # [length], key start


def prompt_overhead(tokenizer: Any, kind: str = "passkey", num_digits: int = 5, add_bos: bool = True) -> int:
    """Tokens a prompt of ``kind`` ("passkey" | "needle") spends outside the haystack (upper estimate):
    a length must exceed it. Measured with the longest key of each kind and ``num_digits`` nines."""
    value = "9" * num_digits
    if kind == "passkey":
        pieces = [PASSKEY_TASK, " " + PASSKEY_KEY.format(key=value), "\n" + PASSKEY_QUESTION]
    elif kind == "needle":
        key = max(NEEDLE_KEYS, key=lambda k: len(_encode(tokenizer, k)))
        pieces = [
            NEEDLE_PREFIX + "\n",
            "\n" + NEEDLE_TEMPLATE.format(key=key, value=value) + "\n",
            "\n" + NEEDLE_QUESTION.format(key=key),
        ]
    else:
        raise ValueError(f"kind={kind!r} is not one of ['passkey', 'needle']")
    return len(_bos(tokenizer, add_bos)) + sum(len(_encode(tokenizer, p)) for p in pieces)


# --------------------------------------------------------------------------------------------------------
# Passkey
# --------------------------------------------------------------------------------------------------------


def passkey_prompt(
    tokenizer: Any,
    length: int,
    depth: float,
    seed: int,
    num_digits: int = 5,
    add_bos: bool = True,
) -> RetrievalPrompt:
    """A passkey-retrieval prompt of exactly ``length`` tokens with the key at ``depth`` of the filler.

    The passkey is drawn from ``random.Random(seed)``. The filler is the repeated
    :data:`PASSKEY_FILLER` sentences (each encoded with a leading space), cut at the *front* so that the
    total is exact; the key sentence goes between two filler sentences, at the boundary nearest to
    ``depth`` of the filler.
    """
    _check_depth(depth)
    rng = random.Random(seed)
    key = _random_number(rng, num_digits)
    head = _bos(tokenizer, add_bos) + _encode(tokenizer, PASSKEY_TASK)
    needle = _encode(tokenizer, " " + PASSKEY_KEY.format(key=key))
    tail = _encode(tokenizer, "\n" + PASSKEY_QUESTION)
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 1:
        raise ValueError(
            f"passkey length={length} is too short: the task, key and question alone take "
            f"{length - budget} tokens"
        )
    sentences = [_encode(tokenizer, " " + s) for s in PASSKEY_FILLER]
    # Whole sentences from the end backwards until the budget is filled, then cut the first one.
    pieces: list[list[int]] = []
    total, k = 0, 0
    while total < budget:
        s = sentences[(-1 - k) % len(sentences)]
        pieces.append(s)
        total += len(s)
        k += 1
    pieces.reverse()
    excess = total - budget
    pieces[0] = pieces[0][excess:]
    boundaries = [0]  # token offsets between sentences, in the filler
    for p in pieces:
        boundaries.append(boundaries[-1] + len(p))
    haystack = [t for p in pieces for t in p]  # [budget]
    target = depth * len(haystack)
    cut = min(boundaries, key=lambda b: (abs(b - target), b))
    ids, key_start = _assemble(head, haystack, cut, needle, tail)
    assert ids.numel() == length
    return RetrievalPrompt(ids, key, length, float(depth), cut / len(haystack), key_start, seed)


# --------------------------------------------------------------------------------------------------------
# Needle in a haystack
# --------------------------------------------------------------------------------------------------------


def haystack_pool(documents: Sequence[Any], tokenizer: Any, separator: str = "\n\n") -> torch.Tensor:
    """One token stream from tokenised documents (objects with ``.ids``, or 1-D tensors): special tokens
    (BOS/EOS/PAD) removed, ``separator`` tokens between documents. Returns int64 ``[n]``."""
    special = {getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")} - {None}
    sep = torch.tensor(_encode(tokenizer, separator), dtype=torch.long)
    pieces: list[torch.Tensor] = []
    for i, doc in enumerate(documents):
        ids = (doc.ids if hasattr(doc, "ids") else doc).reshape(-1).long()
        if special:
            ids = ids[~torch.isin(ids, torch.tensor(sorted(special), dtype=torch.long))]
        if i and sep.numel():
            pieces.append(sep)
        pieces.append(ids)
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)  # [n]


_BOUNDARY = re.compile(r"(\n|[.!?:;]\s*)$")


def haystack_span(pool: torch.Tensor, budget: int, rng: random.Random, what: str) -> list[int]:
    """``budget`` consecutive tokens of ``pool`` from an offset drawn with ``rng``; ``what`` names the prompt in
    the error raised when the pool is too small."""
    pool = pool.reshape(-1)
    if pool.numel() < budget:
        raise ValueError(
            f"{what} needs a haystack of {budget} tokens but the corpus pool has only {pool.numel()}: use a "
            "shorter length or a larger corpus"
        )
    start = rng.randrange(pool.numel() - budget + 1)
    return pool[start : start + budget].tolist()


def snap_cut(tokenizer: Any, haystack: Sequence[int], depth: float) -> int:
    """Where an insert at ``depth`` (fraction of ``haystack``) goes: after the sentence / line boundary nearest
    to it within :data:`SNAP_WINDOW` tokens (ties to the earlier one), else exactly at ``depth``."""
    budget = len(haystack)
    target = round(depth * budget)
    lo, hi = max(0, target - SNAP_WINDOW), min(budget, target + SNAP_WINDOW)
    ends = _boundary_tokens(tokenizer, haystack[max(0, lo - 1) : hi])
    candidates = [c for c in range(lo, hi + 1) if c in (0, budget) or haystack[c - 1] in ends]
    return min(candidates, key=lambda c: (abs(c - target), c)) if candidates else target


def _boundary_tokens(tokenizer: Any, ids: Sequence[int]) -> set[int]:
    """The ids among ``ids`` whose text ends a line or a sentence."""
    out = set()
    for t in set(int(i) for i in ids):
        text = tokenizer.decode([t])
        if _BOUNDARY.search(text):
            out.add(t)
    return out


def needle_prompt(
    tokenizer: Any,
    pool: torch.Tensor,
    length: int,
    depth: float,
    seed: int,
    num_digits: int = 7,
    add_bos: bool = True,
) -> RetrievalPrompt:
    """A needle-in-a-haystack prompt of exactly ``length`` tokens.

    The haystack is the span of ``pool`` (see :func:`haystack_pool`) starting at an offset drawn from
    ``random.Random(seed)``; the needle key from :data:`NEEDLE_KEYS` and its value (``num_digits`` digits)
    from the same generator. The needle goes after the sentence/line boundary nearest to ``depth`` of the
    haystack (within :data:`SNAP_WINDOW` tokens; else exactly at ``depth``).
    """
    _check_depth(depth)
    rng = random.Random(seed)
    key = NEEDLE_KEYS[rng.randrange(len(NEEDLE_KEYS))]
    value = _random_number(rng, num_digits)
    head = _bos(tokenizer, add_bos) + _encode(tokenizer, NEEDLE_PREFIX + "\n")
    needle = _encode(tokenizer, "\n" + NEEDLE_TEMPLATE.format(key=key, value=value) + "\n")
    tail = _encode(tokenizer, "\n" + NEEDLE_QUESTION.format(key=key))
    budget = length - len(head) - len(needle) - len(tail)
    if budget < 1:
        raise ValueError(
            f"needle length={length} is too short: the instructions, needle and question alone take "
            f"{length - budget} tokens"
        )
    haystack = haystack_span(pool, budget, rng, f"needle length={length}")
    cut = snap_cut(tokenizer, haystack, depth)
    ids, key_start = _assemble(head, haystack, cut, needle, tail)
    assert ids.numel() == length
    return RetrievalPrompt(ids, value, length, float(depth), cut / budget, key_start, seed)


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"\d+")


def answer_matches(generated: str, answer: str) -> bool:
    """Exact match: the first run of digits in the generated text equals ``answer``."""
    found = _NUMBER.search(generated)
    return found is not None and found.group(0) == answer
