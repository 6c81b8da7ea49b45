"""Ablation conditions and running one input under several of them, batched or one at a time.

A :class:`Condition` names what is ablated (nothing, a set of heads, or RoPE pairs inside a set of heads).
A :class:`ConditionRunner` evaluates a function of the model under a *group* of conditions in one batched
forward -- batch row ``r`` runs under ``group[r]`` -- by entering the context manager ``apply(model, group)``
(built in :mod:`posheads.eval.sweep` on the per-row ablation masks of :mod:`posheads.heads`). Groups are
sized by ``max_rows`` and ``max_batch_tokens``; when a batched forward runs out of memory the group is split
in halves (down to one condition per forward, i.e. sequential evaluation) and the smaller size is kept.

This module imports neither the heads module nor any model code: evaluation functions
(:mod:`posheads.eval.perplexity`, :mod:`posheads.eval.retrieval`) depend only on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["NONE", "Condition", "ConditionRunner", "is_out_of_memory", "no_ablation"]

#: Kinds of condition: nothing ablated; whole heads ablated; RoPE pairs ablated inside heads.
CONDITION_KINDS = ("none", "heads", "dims")
DIM_SIDES = ("high", "low")
ABLATION_MODES = ("zero", "mean")


@dataclass(frozen=True)
class Condition:
    """One ablation condition.

    Attributes:
        name: unique label used in results (``"none"``, ``"positional"``, ``"random@1"``, ``"lowest"``,
            ``"heads"``, ``"dims_high"``, ``"dims_low"``).
        kind: ``"none"`` | ``"heads"`` (the heads' outputs are ablated) | ``"dims"`` (RoPE pairs are removed
            from the heads' attention logits).
        heads: ``(layer, head)`` pairs the condition acts on (empty for ``"none"``).
        family: the condition family (``"random"`` for every random seed) -- plots draw a band over a family.
        seed: the sampling seed of a random control.
        side: for ``"dims"``: ``"high"`` removes pairs at or above ``i_c``, ``"low"`` pairs below it.
        ablation: for ``"heads"``: ``"zero"`` or ``"mean"`` (the head's output replaced by its mean over the
            identification probes); ``None`` = the runner's default mode.
        pairs: for ``"dims"``: the RoPE pairs removed (``()`` = every pair of ``side``, decided by the
            runner's ``i_c``).
        target: for ``"dims"``: the head family the pairs are removed in (``positional``, ``random``,
            ``lowest``).
    """

    name: str
    kind: str = "none"
    heads: tuple[tuple[int, int], ...] = ()
    family: str = ""
    seed: int | None = None
    side: str | None = None
    ablation: str | None = None
    pairs: tuple[int, ...] = ()
    target: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CONDITION_KINDS:
            raise ValueError(
                f"condition {self.name!r}: kind={self.kind!r} is not one of {list(CONDITION_KINDS)}"
            )
        if self.kind == "dims" and self.side not in DIM_SIDES:
            raise ValueError(f"condition {self.name!r}: side={self.side!r} is not one of {list(DIM_SIDES)}")
        if self.ablation is not None and self.ablation not in ABLATION_MODES:
            raise ValueError(
                f"condition {self.name!r}: ablation={self.ablation!r} is not one of {list(ABLATION_MODES)}"
            )
        object.__setattr__(self, "heads", tuple(sorted({(int(a), int(b)) for a, b in self.heads})))
        object.__setattr__(self, "pairs", tuple(sorted({int(p) for p in self.pairs})))
        if not self.family:
            object.__setattr__(self, "family", self.name)

    @property
    def first_layer(self) -> int | None:
        """The first layer the condition changes (``None`` when it changes nothing)."""
        return None if self.is_noop else min(layer for layer, _ in self.heads)

    @property
    def is_noop(self) -> bool:
        """True when the condition changes nothing (no ablation, or an empty head set)."""
        return self.kind == "none" or not self.heads

    @property
    def per_layer(self) -> dict[int, int]:
        """``{layer: number of heads}`` the condition acts on."""
        out: dict[int, int] = {}
        for layer, _ in self.heads:
            out[layer] = out.get(layer, 0) + 1
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "family": self.family,
            "seed": self.seed,
            "side": self.side,
            "n_heads": len(self.heads),
            "heads": [list(h) for h in self.heads],
            "per_layer": {str(k): v for k, v in sorted(self.per_layer.items())},
        }
        if self.kind == "heads":
            out["ablation"] = self.ablation
        if self.kind == "dims":
            out["target"] = self.target
            out["pairs"] = list(self.pairs)
            out["n_pairs"] = len(self.pairs)
        return out


NONE = Condition("none")


def no_ablation(model: Any, group: Sequence[Condition]) -> contextlib.AbstractContextManager[None]:
    """The ``apply`` of a runner that only evaluates no-op conditions."""
    active = [c.name for c in group if not c.is_noop]
    if active:
        raise ValueError(
            f"conditions {active} ablate heads but the runner was built without an ablation function"
        )
    return contextlib.nullcontext()


def is_out_of_memory(err: BaseException) -> bool:
    """True for CUDA out-of-memory errors and CPU allocation failures."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


ApplyFn = Callable[[Any, Sequence[Condition]], contextlib.AbstractContextManager[Any]]
PrefixFn = Callable[[Any, int], contextlib.AbstractContextManager[Any]]


@dataclass
class ConditionRunner:
    """Runs functions of a model under groups of conditions (one batch row per condition).

    Attributes:
        model: the model.
        conditions: every condition of the sweep, in order (names must be unique).
        apply: ``apply(model, group)`` -> context manager under which batch row ``r`` runs ``group[r]``.
        max_rows: most conditions per forward (1 = sequential).
        max_batch_tokens: most ``rows x sequence length`` per forward (``None``: no limit).
        prefix: ``prefix(model, first_layer)`` -> context manager under which a forward whose rows are one
            sequence runs layers ``< first_layer`` once and broadcasts them to the rows
            (:func:`posheads.heads.ablation.shared_prefix`); ``None`` = every row runs every layer.
        num_layers: the model's layer count (the shared prefix of a group of no-op conditions); needed with
            ``prefix``.
    """

    model: Any
    conditions: Sequence[Condition]
    apply: ApplyFn = no_ablation
    max_rows: int = 1
    max_batch_tokens: int | None = None
    prefix: PrefixFn | None = None
    num_layers: int | None = None
    _fallbacks: int = field(default=0, init=False)
    #: layers computed once per forward thanks to the shared prefix, summed over forwards (for reports).
    shared_layer_rows: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.conditions]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"condition names must be unique, {dup} occur more than once")
        if not names:
            raise ValueError("a ConditionRunner needs at least one condition")
        if self.max_rows < 1:
            raise ValueError(f"max_rows={self.max_rows!r} must be >= 1")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens={self.max_batch_tokens!r} must be >= 1 or None")
        if self.prefix is not None and (self.num_layers is None or self.num_layers < 1):
            raise ValueError("a ConditionRunner with a shared prefix needs num_layers >= 1")

    def rows_for(self, length: int) -> int:
        """Conditions per forward at sequence length ``length``."""
        rows = self.max_rows
        if self.max_batch_tokens is not None:
            rows = min(rows, max(1, self.max_batch_tokens // max(1, length)))
        return max(1, rows)

    def first_layer(self, group: Sequence[Condition]) -> int:
        """The layers a group of conditions shares: the first layer any of them changes (``num_layers`` when
        none changes anything)."""
        assert self.num_layers is not None
        return min((c.first_layer for c in group if c.first_layer is not None), default=self.num_layers)

    def groups(self, length: int, conditions: Sequence[Condition] | None = None) -> list[list[Condition]]:
        """``conditions`` (default: all) cut into groups of at most :meth:`rows_for` conditions.

        Without a shared prefix: consecutive chunks, in order. With one: the conditions are sorted by the first
        layer they change, latest first (stable), and cut into the consecutive groups that minimise the layer
        work ``sum over groups of f + rows * (num_layers - f)`` (``f``: the group's shared prefix, its least
        first layer) -- a condition that changes an early layer gets its own forward rather than cutting
        the prefix of the others (dynamic programming over the cut points; ties: fewer groups)."""
        conds = list(self.conditions if conditions is None else conditions)
        size = self.rows_for(length)
        if self.prefix is None:
            return [conds[i : i + size] for i in range(0, len(conds), size)]
        assert self.num_layers is not None
        n_layers = self.num_layers
        first = [n_layers if c.first_layer is None else c.first_layer for c in conds]
        order = sorted(range(len(conds)), key=lambda i: -first[i])
        conds = [conds[i] for i in order]
        f = [first[i] for i in order]
        best: list[tuple[int, int, int]] = [(0, 0, 0)]  # (work, groups, start of the last group) per prefix
        for end in range(1, len(conds) + 1):
            options = []
            for start in range(max(0, end - size), end):
                fmin = f[end - 1]
                work = fmin + (end - start) * (n_layers - fmin)
                options.append((best[start][0] + work, best[start][1] + 1, start))
            best.append(min(options))
        cuts: list[tuple[int, int]] = []
        end = len(conds)
        while end:
            start = best[end][2]
            cuts.append((start, end))
            end = start
        return [conds[a:b] for a, b in reversed(cuts)]

    def layer_work(self, groups: Sequence[Sequence[Condition]]) -> int:
        """Layer-rows the groups cost with the shared prefix (``num_layers * conditions`` without it)."""
        assert self.num_layers is not None
        total = 0
        for g in groups:
            fmin = self.first_layer(g) if len(g) > 1 else 0
            total += fmin + len(g) * (self.num_layers - fmin)
        return total

    def call(self, group: Sequence[Condition], fn: Callable[[int], Any], broadcast: bool = True) -> list[Any]:
        """``fn(n_rows)`` under ``apply(model, chunk)`` for consecutive chunks of ``group`` of at most
        ``max_rows`` conditions; returns one result per condition of ``group``, in order.

        With ``broadcast`` (and a runner built with ``prefix``), ``fn``'s forwards must feed one sequence to
        every row: the layers before the chunk's first changed layer run once (``prefix``). Pass
        ``broadcast=False`` for functions whose rows diverge (greedy decoding).

        ``fn`` returns a sequence (or tensor) whose first dimension is ``n_rows``. On out-of-memory the chunk
        size is halved (down to one condition per forward, i.e. sequential evaluation) and kept lowered for
        the rest of the sweep.
        """
        group = list(group)
        out: list[Any] = []
        i = 0
        while i < len(group):
            chunk = group[i : i + self.max_rows]
            try:
                with contextlib.ExitStack() as stack:
                    if broadcast and self.prefix is not None and len(chunk) > 1:
                        first = self.first_layer(chunk)
                        stack.enter_context(self.prefix(self.model, first))
                        self.shared_layer_rows += first * (len(chunk) - 1)
                    stack.enter_context(self.apply(self.model, chunk))
                    res = fn(len(chunk))
            except (RuntimeError, torch.OutOfMemoryError) as err:
                if not is_out_of_memory(err) or len(chunk) == 1:
                    raise
                self.max_rows = math.ceil(len(chunk) / 2)
                self._fallbacks += 1
                log.warning(
                    "out of memory with %d conditions per forward; retrying with %d",
                    len(chunk),
                    self.max_rows,
                )
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            if len(res) != len(chunk):
                raise ValueError(f"fn returned {len(res)} rows for a group of {len(chunk)} conditions")
            out.extend(res)
            i += len(chunk)
        return out

    def __iter__(self) -> Iterator[Condition]:
        return iter(self.conditions)
