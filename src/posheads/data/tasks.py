"""A long-context retrieval task suite (in the spirit of RULER, Hsieh et al. 2024, arXiv 2404.06654), scored by
teacher forcing.

Every generator is *pure and seeded*: the same tokenizer, pool, length, depth/difficulty and seed give the same
token ids, answer and insertion points on any machine. A prompt has *exactly* ``length`` tokens; its answer is a
separate token sequence (:attr:`TaskPrompt.answer_ids`, the canonical tokenization of :attr:`TaskPrompt.answer`,
always starting with a space: the templates end right before it). Scoring reads one forward over
``prompt + answer`` (:mod:`posheads.eval.retrieval`).

Tasks (templates pinned in :data:`TEMPLATES`, recorded in every run's protocol):

* ``passkey`` -- the passkey of Mohtashami & Jaggi 2023 (repeated filler), :func:`posheads.data.retrieval.passkey_prompt`.
* ``needle`` -- one numeric needle in corpus text, :func:`posheads.data.retrieval.needle_prompt`.
* ``multikey`` -- ``1 + distractors`` needles with distinct keys; one (the target, at ``depth``) is asked.
* ``multivalue`` -- ``values`` needles with the *same* key (the first at ``depth``); every value is asked, in
  order of appearance.
* ``multiquery`` -- ``queries`` needles with distinct keys (the first asked one at ``depth``); all are asked in a
  random order and answered in that order: several answers scored in one forward.
* ``vartrack`` -- variable tracking: ``VAR A = 12345.`` then ``hops`` assignments ``VAR B = VAR A.`` ...; the
  first at ``depth``, the others after it; every variable holding the value is asked, in chain order.
* ``cwe`` -- common-word extraction (aggregation): a numbered list of words in which ``k`` words are frequent
  (distinct counts); the ``k`` most frequent are asked, most frequent first. The axis is the difficulty ``k``
  (no depth). The list replaces the haystack (the corpus is not used).

Layout of the needle-style tasks (token level)::

    [BOS] instruction | haystack with the inserts | question

The haystack is a contiguous span of the corpus pool starting at an offset drawn from the *trial's* seed -- the
same for every depth of a trial (paired depths) -- and is truncated so that the prompt is exact. Every insert
goes after the sentence / line boundary nearest to its target depth (within
:data:`posheads.data.retrieval.SNAP_WINDOW` tokens).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from posheads.data.retrieval import (
    NEEDLE_KEYS,
    NEEDLE_PREFIX,
    NEEDLE_QUESTION,
    NEEDLE_TEMPLATE,
    PASSKEY_KEY,
    PASSKEY_QUESTION,
    PASSKEY_TASK,
    _bos,
    _encode,
    _random_number,
    derive_seed,
    haystack_span,
    needle_prompt,
    passkey_prompt,
    snap_cut,
)

__all__ = [
    "CWE_WORDS",
    "SUITE_TASKS",
    "TEMPLATES",
    "TaskPrompt",
    "TaskSpec",
    "make_prompt",
    "suite_prompts",
]

SUITE_TASKS = ("passkey", "needle", "multikey", "multivalue", "multiquery", "vartrack", "cwe")
#: Tasks whose second axis is a difficulty level rather than a depth.
DIFFICULTY_TASKS = frozenset({"cwe"})

MULTI_PREFIX = "Read the following text and remember the special magic numbers it contains."
MULTIVALUE_QUESTION = (
    "What are all the special magic numbers for {key} mentioned in the provided text, in order of "
    "appearance? The special magic numbers for {key} mentioned in the provided text are:"
)
MULTIQUERY_QUESTION = (
    "What are the special magic numbers for {keys} mentioned in the provided text? The special magic "
    "numbers for {keys} mentioned in the provided text are:"
)
VARTRACK_PREFIX = "Memorize and track the chain of variable assignments hidden in the following text."
VARTRACK_FIRST = "VAR {name} = {value}."
VARTRACK_HOP = "VAR {name} = VAR {previous}."
VARTRACK_QUESTION = (
    "Question: Find all variables that are assigned the value {value} in the text above. Answer: "
    "According to the chain of variable assignments in the text above, {count} variables are assigned "
    "the value {value}, they are:"
)
CWE_PREFIX = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
    "ones that appear most often."
)
CWE_ENTRY = "\n{index}. {word}"
CWE_QUESTION = (
    "Question: What are the {k} most common words in the above list? Answer: The top {k} words that "
    "appear most often in the list are:"
)
#: Every template of the suite: recorded in the protocol of a run. Inserts are wrapped in ``insert_wrap``;
#: questions are preceded by ``question_sep``; answers start with ``answer_prefix`` and join items with
#: ``answer_sep`` (vartrack: a space).
TEMPLATES: dict[str, Any] = {
    "bos": "the tokenizer's bos_token when it has one",
    "insert_wrap": "\\n{insert}\\n",
    "question_sep": "\\n",
    "answer_prefix": " ",
    "answer_sep": ", ",
    "passkey": {"instruction": PASSKEY_TASK, "insert": PASSKEY_KEY, "question": PASSKEY_QUESTION},
    "needle": {"instruction": NEEDLE_PREFIX, "insert": NEEDLE_TEMPLATE, "question": NEEDLE_QUESTION},
    "multikey": {"instruction": MULTI_PREFIX, "insert": NEEDLE_TEMPLATE, "question": NEEDLE_QUESTION},
    "multivalue": {"instruction": MULTI_PREFIX, "insert": NEEDLE_TEMPLATE, "question": MULTIVALUE_QUESTION},
    "multiquery": {"instruction": MULTI_PREFIX, "insert": NEEDLE_TEMPLATE, "question": MULTIQUERY_QUESTION},
    "vartrack": {
        "instruction": VARTRACK_PREFIX,
        "insert": [VARTRACK_FIRST, VARTRACK_HOP],
        "question": VARTRACK_QUESTION,
        "answer_sep": " ",
    },
    "cwe": {"instruction": CWE_PREFIX, "entry": CWE_ENTRY, "question": CWE_QUESTION},
}

#: Words of the common-word-extraction lists (plain English nouns; pinned).
CWE_WORDS = (
    "anchor", "badge", "basket", "beacon", "blanket", "bottle", "bridge", "bucket", "button", "cabin",
    "camera", "candle", "carpet", "castle", "chair", "cherry", "circle", "cloud", "coffee", "collar",
    "cookie", "cotton", "crayon", "desert", "dragon", "drawer", "engine", "feather", "fence", "forest",
    "fountain", "glove", "hammer", "helmet", "island", "jacket", "jungle", "kettle", "kitten", "ladder",
    "lemon", "letter", "library", "lizard", "magnet", "mirror", "monkey", "napkin", "needle", "notebook",
    "ocean", "onion", "orange", "packet", "paddle", "panda", "parrot", "pencil", "piano", "pillow",
    "planet", "pocket", "potato", "puzzle", "rabbit", "ribbon", "rocket", "saucer", "scarf", "shadow",
    "shovel", "sponge", "spoon", "statue", "sugar", "sweater", "table", "teapot", "ticket", "tiger",
    "tomato", "towel", "tractor", "trumpet", "turtle", "umbrella", "valley", "wagon", "wallet", "window",
)  # fmt: skip
#: Five capital letters per variable name.
_VAR_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class TaskSpec:
    """Per-task options of the suite (the defaults are the protocol unless a config says otherwise).

    Attributes:
        num_digits: digits of every magic number / passkey / variable value.
        distractors: multikey: needles with other keys besides the target.
        values: multivalue: values of the one key.
        queries: multiquery: needles, every one asked.
        hops: vartrack: assignments after the first (the chain has ``hops + 1`` variables).
        common_share: cwe: fraction of the list's entries taken by the ``k`` common words.
    """

    num_digits: int = 5
    distractors: int = 3
    values: int = 3
    queries: int = 3
    hops: int = 3
    common_share: float = 0.3

    def __post_init__(self) -> None:
        for name in ("num_digits", "values", "queries", "hops"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"retrieval.task.{name}={getattr(self, name)!r} must be >= 1")
        if int(self.distractors) < 0:
            raise ValueError(f"retrieval.task.distractors={self.distractors!r} must be >= 0")
        if not 0.0 < float(self.common_share) < 1.0:
            raise ValueError(f"retrieval.task.common_share={self.common_share!r} must be in (0, 1)")


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt of the suite.

    Attributes:
        task: the task name.
        input_ids: int64 ``[length]``, BOS first when the tokenizer has one.
        answer_ids: int64 ``[A]``: the canonical answer continuation (scored by teacher forcing).
        answer: the answer text (``answer_ids`` decoded; starts with a space).
        items: ``(start, end)`` spans of ``answer_ids`` holding each answer item (a value, a variable, a
            word), for per-item scoring; separators between items are outside every span.
        length: ``len(input_ids)``.
        depth: the requested depth of the (first / target) insert; ``None`` for difficulty tasks.
        difficulty: ``k`` for cwe, ``None`` otherwise.
        actual_depth: where that insert starts, as a fraction of the haystack (``None`` for cwe).
        key_start: index in ``input_ids`` of that insert's first token (``-1`` for cwe).
        seed: the trial's seed.
        trial: the trial index within its cell (:func:`suite_prompts`; the depths of a trial share the
            haystack); ``-1`` for a prompt made on its own.
    """

    task: str
    input_ids: torch.Tensor
    answer_ids: torch.Tensor
    answer: str
    items: tuple[tuple[int, int], ...]
    length: int
    depth: float | None
    difficulty: int | None
    actual_depth: float | None
    key_start: int
    seed: int
    trial: int = -1

    @property
    def cell(self) -> tuple[int, float | None, int | None]:
        return self.length, self.depth, self.difficulty


def _answer(tokenizer: Any, items: Sequence[str], sep: str = ", ") -> tuple[torch.Tensor, str, tuple]:
    """Answer ids built item by item so that every item's token span is known (``" " + items joined by sep``)."""
    ids: list[int] = []
    spans = []
    for i, item in enumerate(items):
        prefix = " " if i == 0 else sep
        lead = _encode(tokenizer, prefix + item)
        core = prefix.rstrip()  # "," of ", ": the item's span starts after it (the space belongs to the item)
        sep_only = _encode(tokenizer, core) if core else []
        skip = len(sep_only) if sep_only and lead[: len(sep_only)] == sep_only else 0
        start = len(ids) + skip
        ids.extend(lead)
        spans.append((start, len(ids)))
    t = torch.tensor(ids, dtype=torch.long)
    return t, tokenizer.decode(ids), tuple(spans)


def _distinct_numbers(rng: random.Random, n: int, num_digits: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = _random_number(rng, num_digits)
        if v not in out:
            out.append(v)
    return out


def _place(
    tokenizer: Any,
    pool: torch.Tensor,
    length: int,
    seed_haystack: int,
    head: list[int],
    inserts: Sequence[list[int]],
    depths: Sequence[float],
    tail: list[int],
    task: str,
) -> tuple[torch.Tensor, list[int], list[float]]:
    """Insert ``inserts`` at ``depths`` (fractions of the haystack) into a corpus span; exact ``length``.
    Returns the ids and, per insert (in the given order), its start index and actual depth."""
    budget = length - len(head) - sum(len(x) for x in inserts) - len(tail)
    if budget < 1:
        raise ValueError(
            f"{task} length={length} is too short: the instructions, inserts and question alone take "
            f"{length - budget} tokens"
        )
    haystack = haystack_span(pool, budget, random.Random(seed_haystack), f"{task} length={length}")
    cuts = [snap_cut(tokenizer, haystack, d) for d in depths]
    order = sorted(range(len(inserts)), key=lambda i: (cuts[i], i))  # stable: equal cuts keep given order
    ids = list(head)
    starts = [0] * len(inserts)
    prev = 0
    for i in order:
        ids.extend(haystack[prev : cuts[i]])
        prev = cuts[i]
        starts[i] = len(ids)
        ids.extend(inserts[i])
    ids.extend(haystack[prev:])
    ids.extend(tail)
    assert len(ids) == length, (len(ids), length)
    return torch.tensor(ids, dtype=torch.long), starts, [c / budget for c in cuts]


def _wrap(tokenizer: Any, text: str) -> list[int]:
    return _encode(tokenizer, "\n" + text + "\n")


def _other_depths(rng: random.Random, n: int, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    return [rng.uniform(lo, hi) for _ in range(n)]


def _keys(rng: random.Random, n: int) -> list[str]:
    if n > len(NEEDLE_KEYS):
        raise ValueError(f"at most {len(NEEDLE_KEYS)} distinct needle keys, {n} requested")
    return rng.sample(list(NEEDLE_KEYS), n)


def _join_keys(keys: Sequence[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + " and " + keys[-1]


def make_prompt(
    task: str,
    tokenizer: Any,
    pool: torch.Tensor | None,
    length: int,
    level: float | int | None,
    seed: int,
    haystack_seed: int | None = None,
    spec: TaskSpec | None = None,
    add_bos: bool = True,
) -> TaskPrompt:
    """One prompt of ``task`` with exactly ``length`` tokens.

    Args:
        level: the depth in ``[0, 1]`` (every task but cwe) or the difficulty ``k`` (cwe).
        seed: seeds the keys, values and the other inserts' depths.
        haystack_seed: seeds the haystack span (default ``seed``); pass the same for every depth of a trial.
    """
    spec = spec or TaskSpec()
    if task not in SUITE_TASKS:
        raise ValueError(f"retrieval task {task!r} is not one of {list(SUITE_TASKS)}")
    hseed = seed if haystack_seed is None else haystack_seed
    rng = random.Random(seed)
    if task in DIFFICULTY_TASKS:
        return _cwe(tokenizer, length, int(level), seed, rng, spec, add_bos)  # type: ignore[arg-type]
    depth = float(level)  # type: ignore[arg-type]
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r} must be in [0, 1]")
    head = _bos(tokenizer, add_bos)
    if task == "passkey":
        p = passkey_prompt(tokenizer, length, depth, seed, num_digits=spec.num_digits, add_bos=add_bos)
        ans, text, items = _answer(tokenizer, [p.answer])
        return TaskPrompt(
            task, p.input_ids, ans, text, items, length, depth, None, p.actual_depth, p.key_start, seed
        )
    if pool is None:
        raise ValueError(f"task {task!r} needs a haystack pool")
    if task == "needle":
        # the needle generator draws its own span from the seed; the trial's haystack seed is used as that seed
        # of the span and the value (so depths of a trial share the haystack)
        p = needle_prompt(tokenizer, pool, length, depth, hseed, num_digits=spec.num_digits, add_bos=add_bos)
        ans, text, items = _answer(tokenizer, [p.answer])
        return TaskPrompt(
            task, p.input_ids, ans, text, items, length, depth, None, p.actual_depth, p.key_start, hseed
        )
    if task == "multikey":
        keys = _keys(rng, 1 + spec.distractors)
        values = _distinct_numbers(rng, len(keys), spec.num_digits)
        inserts = [_wrap(tokenizer, NEEDLE_TEMPLATE.format(key=k, value=v)) for k, v in zip(keys, values)]
        depths = [depth, *_other_depths(rng, spec.distractors)]
        head += _encode(tokenizer, MULTI_PREFIX + "\n")
        tail = _encode(tokenizer, "\n" + NEEDLE_QUESTION.format(key=keys[0]))
        answer_items = [values[0]]
        sep = ", "
    elif task == "multivalue":
        key = _keys(rng, 1)[0]
        values = _distinct_numbers(rng, spec.values, spec.num_digits)
        inserts = [_wrap(tokenizer, NEEDLE_TEMPLATE.format(key=key, value=v)) for v in values]
        depths = [depth, *_other_depths(rng, spec.values - 1)]
        head += _encode(tokenizer, MULTI_PREFIX + "\n")
        tail = _encode(tokenizer, "\n" + MULTIVALUE_QUESTION.format(key=key))
        answer_items = None  # in order of appearance, known after placement
        sep = ", "
    elif task == "multiquery":
        keys = _keys(rng, spec.queries)
        values = _distinct_numbers(rng, len(keys), spec.num_digits)
        inserts = [_wrap(tokenizer, NEEDLE_TEMPLATE.format(key=k, value=v)) for k, v in zip(keys, values)]
        depths = [depth, *_other_depths(rng, spec.queries - 1)]
        order = list(range(len(keys)))
        rng.shuffle(order)
        asked = [keys[i] for i in order]
        head += _encode(tokenizer, MULTI_PREFIX + "\n")
        tail = _encode(tokenizer, "\n" + MULTIQUERY_QUESTION.format(keys=_join_keys(asked)))
        answer_items = [values[i] for i in order]
        sep = ", "
    elif task == "vartrack":
        value = _random_number(rng, spec.num_digits)
        names: list[str] = []
        while len(names) < spec.hops + 1:
            n = "".join(rng.choice(_VAR_LETTERS) for _ in range(5))
            if n not in names:
                names.append(n)
        texts = [VARTRACK_FIRST.format(name=names[0], value=value)] + [
            VARTRACK_HOP.format(name=names[i], previous=names[i - 1]) for i in range(1, len(names))
        ]
        inserts = [_wrap(tokenizer, t) for t in texts]
        # the first at depth, the others after it (sorted, so that the chain reads in order)
        depths = [depth, *sorted(_other_depths(rng, spec.hops, depth, 1.0))]
        head += _encode(tokenizer, VARTRACK_PREFIX + "\n")
        tail = _encode(tokenizer, "\n" + VARTRACK_QUESTION.format(value=value, count=len(names)))
        answer_items = names
        sep = " "
    else:  # pragma: no cover - SUITE_TASKS is exhaustive
        raise AssertionError(task)
    ids, starts, actual = _place(tokenizer, pool, length, hseed, head, inserts, depths, tail, task)
    if task == "multivalue":
        answer_items = [values[i] for i in sorted(range(len(values)), key=lambda i: (starts[i], i))]
    if task == "vartrack" and starts != sorted(starts):
        raise AssertionError("vartrack chain out of order")  # equal cuts keep the given order
    assert answer_items is not None
    ans, text, items = _answer(tokenizer, answer_items, sep)
    return TaskPrompt(task, ids, ans, text, items, length, depth, None, actual[0], starts[0], seed)


def _cwe(
    tokenizer: Any, length: int, k: int, seed: int, rng: random.Random, spec: TaskSpec, add_bos: bool
) -> TaskPrompt:
    if not 1 <= k <= 5:
        raise ValueError(f"cwe difficulty k={k!r} must be in 1..5")
    words = list(CWE_WORDS)
    rng.shuffle(words)
    common, rare = words[:k], words[k:]
    head = _bos(tokenizer, add_bos) + _encode(tokenizer, CWE_PREFIX)
    tail = _encode(tokenizer, "\n" + CWE_QUESTION.format(k=k))
    budget = length - len(head) - len(tail)
    # entries cost ~ the same for every word; estimate the number of entries from the mean entry length
    mean_entry = sum(len(_encode(tokenizer, CWE_ENTRY.format(index=100, word=w))) for w in words) / len(words)
    n_entries = int(budget / mean_entry)
    weights = [2 * k - i for i in range(k)]  # k common words, strictly decreasing counts
    counts = [max(1, round(spec.common_share * n_entries * w / sum(weights))) for w in weights]
    for i in range(1, k):  # strictly decreasing
        counts[i] = min(counts[i], counts[i - 1] - 1)
    rare_cap = max(1, counts[-1] // 3)  # every rare word stays well below the least common one
    if counts[-1] < 3:
        raise ValueError(f"cwe length={length} is too short for k={k} common words")
    bag = [w for w, c in zip(common, counts) for _ in range(c)]
    rng.shuffle(bag)
    # interleave the common words with rare ones, then fill the rest with rare words (each at most rare_cap times)
    rare_count: dict[str, int] = dict.fromkeys(rare, 0)
    entries: list[str] = []
    positions = (
        sorted(rng.sample(range(n_entries), len(bag))) if len(bag) <= n_entries else list(range(len(bag)))
    )
    it = iter(bag)
    pos_set = set(positions)
    ids: list[int] = list(head)
    i = 0
    while True:
        if i in pos_set:
            word = next(it)
        else:
            avail = [w for w in rare if rare_count[w] < rare_cap]
            if not avail:
                raise ValueError(f"cwe length={length}: not enough distinct rare words to fill the list")
            word = rng.choice(avail)
        entry = _encode(tokenizer, CWE_ENTRY.format(index=i + 1, word=word))
        if len(ids) + len(entry) > len(head) + budget:
            if i <= max(positions, default=-1):
                raise ValueError(f"cwe length={length}: the common words do not fit; use a longer length")
            break
        ids.extend(entry)
        entries.append(word)
        if word in rare_count:
            rare_count[word] += 1
        i += 1
    pad = len(head) + budget - len(ids)
    # fill the last tokens with newlines (a blank line before the question): exact length, no partial word
    nl = _encode(tokenizer, "\n")
    while pad > 0:
        ids.extend(nl[:pad])
        pad -= len(nl[:pad])
    ids.extend(tail)
    assert len(ids) == length, (len(ids), length)
    freq = {w: entries.count(w) for w in set(entries)}
    top = sorted(freq, key=lambda w: -freq[w])[:k]
    assert top == common and len({freq[w] for w in top}) == k, "cwe counts not strictly decreasing"
    ans, text, items = _answer(tokenizer, common)
    return TaskPrompt(
        "cwe", torch.tensor(ids, dtype=torch.long), ans, text, items, length, None, k, None, -1, seed
    )


def suite_prompts(
    tokenizer: Any,
    pool: torch.Tensor | None,
    task: str,
    lengths: Sequence[int],
    levels: Sequence[Any],
    trials: int,
    seed: int = 0,
    spec: TaskSpec | None = None,
) -> list[TaskPrompt]:
    """Every prompt of ``task``: ``lengths x levels x trials``. The seed of a prompt is
    ``derive_seed(task, seed, length, level, trial)``; its haystack seed ``derive_seed(task, seed, length,
    trial)`` -- the same span for every depth of a trial."""
    out = []
    for length in lengths:
        for level in levels:
            for trial in range(trials):
                s = derive_seed(task, seed, length, level, trial)
                h = derive_seed("haystack", task, seed, length, trial)
                p = make_prompt(task, tokenizer, pool, length, level, s, h, spec)
                out.append(dataclasses.replace(p, trial=trial))
    return out
