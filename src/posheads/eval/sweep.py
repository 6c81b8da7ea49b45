"""Ablation sweeps: which heads each condition ablates, and how a group of conditions is applied per row.

Conditions (DESIGN.md §2, "Ablation operators"), named in configs as

=================  ====================================================================================
``none``           nothing ablated (must reproduce the unablated numbers exactly)
``positional``     the Positional Heads (identified in the same run, or read from a previous run's table)
``random``         controls: for every seed, the same number of heads *per layer* as the Positional set,
                   drawn uniformly among the layer's other heads (``random@<seed>`` in results)
``lowest``         control: the same number of heads, ranked lowest overall (by the table's ``rank``: the
                   quantity heads are selected on, ``heads.rank_by``)
``heads``          a user-given head list (``sweep.user_heads``)
``dims_high``      inside the Positional Heads, RoPE pairs ``i >= i_c`` removed from the attention logits
``dims_low``       inside the Positional Heads, RoPE pairs ``i < i_c`` removed
=================  ====================================================================================

``i_c`` is the critical pair (Liu et al. 2023, "Scaling Laws of RoPE-based Extrapolation", arXiv 2310.05209):
by default the first pair whose wavelength exceeds the pre-training context, see
:func:`posheads.rope.critical_pair`; ``"quarter"`` takes ``d/4`` (the upper half of the pairs) and an
integer is used as is.

Head ablation zeroes (or mean-replaces) a head's slice of the input to ``o_proj``; dimension ablation drops
pairs from ``q~ . k~``; both are per batch row, so a group of conditions runs in one forward with row ``r``
under condition ``r`` (:func:`ablation_apply`, built on :mod:`posheads.heads.ablation`).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posheads.data.retrieval import derive_seed
from posheads.eval.conditions import NONE, Condition

__all__ = [
    "CONDITION_NAMES",
    "HEAD_ROW_KEYS",
    "NEEDS_POSITIONAL",
    "ModelShape",
    "build_conditions",
    "lowest_heads",
    "parse_head",
    "positional_heads",
    "random_matched_heads",
    "read_head_table",
    "resolve_critical_pair",
    "validate_heads",
]

CONDITION_NAMES = ("none", "positional", "random", "lowest", "heads", "dims_high", "dims_low")
#: Conditions that need the Positional-Head set (identification in this run or a previous run's table).
NEEDS_POSITIONAL = frozenset({"positional", "random", "lowest", "dims_high", "dims_low"})
HEAD_ROW_KEYS = ("layer", "head", "score", "z", "positional")


@dataclass(frozen=True)
class ModelShape:
    """What the sweep needs to know about a model: attention layers, heads per layer, head width, and the
    longest input its (scaled) RoPE was configured for."""

    num_layers: int
    num_heads: int
    head_dim: int
    max_length: int | None = None
    rope_theta: float | None = None
    original_context: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        text = getattr(config, "get_text_config", lambda: config)()
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        theta = original = None
        try:
            from posheads.rope import base_rope_theta, original_context_length

            theta, original = base_rope_theta(text), original_context_length(text)
        except (ValueError, AttributeError, KeyError):
            pass
        return cls(
            int(text.num_hidden_layers),
            heads,
            int(head_dim),
            getattr(text, "max_position_embeddings", None),
            theta,
            original,
        )

    @property
    def num_pairs(self) -> int:
        return self.head_dim // 2


def parse_head(value: Any, option: str = "sweep.user_heads") -> tuple[int, int]:
    """A head given as ``[layer, head]``, ``(layer, head)``, ``"layer.head"`` / ``"layer:head"`` or
    ``{"layer": l, "head": h}``."""
    if isinstance(value, Mapping) and "layer" in value and "head" in value:
        value = (value["layer"], value["head"])
    if isinstance(value, str):
        for sep in (".", ":", ","):
            if sep in value:
                value = value.split(sep)
                break
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            layer, head = (int(v) for v in value)
        except (TypeError, ValueError):
            pass
        else:
            return layer, head
    raise ValueError(f"{option} entry {value!r} is not a head: use [layer, head] or 'layer.head'")


def validate_heads(
    heads: Iterable[Any], shape: ModelShape, option: str = "sweep.user_heads"
) -> list[tuple[int, int]]:
    """Parse and range-check heads against the model; errors name the option and the offending value."""
    out: list[tuple[int, int]] = []
    for value in heads:
        layer, head = parse_head(value, option)
        if not 0 <= layer < shape.num_layers:
            raise ValueError(
                f"{option} entry {value!r}: layer {layer} is out of range, the model has {shape.num_layers} "
                f"layers (0..{shape.num_layers - 1})"
            )
        if not 0 <= head < shape.num_heads:
            raise ValueError(
                f"{option} entry {value!r}: head {head} is out of range, the model has {shape.num_heads} "
                f"attention heads per layer (0..{shape.num_heads - 1})"
            )
        out.append((layer, head))
    if len(set(out)) != len(out):
        dup = sorted({h for h in out if out.count(h) > 1})
        raise ValueError(f"{option} lists heads {dup} more than once")
    return out


def resolve_critical_pair(value: int | str, shape: ModelShape, auto_rule: int | str = "critical") -> int:
    """``i_c`` from ``sweep.critical_pair``: ``"auto"`` (the identification's rule ``auto_rule``, i.e.
    ``heads.analysis.critical``), ``"critical"`` (Liu et al.'s critical dimension for the model's
    pre-trained RoPE), ``"quarter"`` (``d/4``), or a pair index in ``[0, d/2]``."""
    if value == "auto":
        value = auto_rule
    if isinstance(value, str) and value not in ("critical", "quarter"):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"sweep.critical_pair={value!r} is not 'auto', 'critical', 'quarter' or an integer"
            ) from None
    if value == "quarter":
        return shape.head_dim // 4
    if value == "critical":
        if shape.rope_theta is None or shape.original_context is None:
            raise ValueError(
                "sweep.critical_pair='critical' needs the model's rope_theta and pre-training context"
            )
        from posheads.rope import critical_pair

        return critical_pair(shape.head_dim, shape.rope_theta, shape.original_context)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= shape.num_pairs:
        raise ValueError(
            f"sweep.critical_pair={value!r} must be in [0, {shape.num_pairs}] (head_dim/2 pairs)"
        )
    return value


# --------------------------------------------------------------------------------------------------------
# Head tables
# --------------------------------------------------------------------------------------------------------


def _head_row(raw: Mapping[str, Any]) -> dict[str, Any]:
    missing = [k for k in ("layer", "head", "score") if k not in raw]
    if missing:
        raise ValueError(f"head table row {dict(raw)!r} lacks {missing}")
    positional = raw.get("positional", False)
    if isinstance(positional, str):
        positional = positional.strip().lower() in ("1", "true", "yes")

    def number(key: str) -> float | None:
        v = raw.get(key)
        return None if v in (None, "", "None", "nan") else float(v)

    row = {
        "layer": int(raw["layer"]),
        "head": int(raw["head"]),
        "score": number("score"),
        "z": number("z"),
        "positional": bool(positional),
    }
    if "excess" in raw:
        row["excess"] = number("excess")
    if raw.get("rank") not in (None, ""):
        row["rank"] = int(raw["rank"])
    return row


def read_head_table(path: str | Path) -> list[dict[str, Any]]:
    """A previous run's head table: a ``results.json`` (its ``heads`` key), a run directory holding one, a
    JSON list of rows, or a CSV with columns ``layer, head, score, z, positional``."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(
            f"heads.from_results={str(path)!r}: no such file (or run directory with results.json)"
        )
    rows: Any
    if p.suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        with p.open(encoding="utf-8") as fh:
            data = json.load(fh)
        rows = data.get("heads") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"heads.from_results={str(path)!r} holds no head table (no rows under 'heads')")
    return [_head_row(r) for r in rows]


def positional_heads(table: Sequence[Mapping[str, Any]]) -> list[tuple[int, int]]:
    """The heads marked ``positional`` in a head table, sorted."""
    return sorted((int(r["layer"]), int(r["head"])) for r in table if r["positional"])


def random_matched_heads(
    positional: Sequence[tuple[int, int]], shape: ModelShape, seed: int
) -> list[tuple[int, int]]:
    """Random control heads: in every layer, as many heads as the Positional set has there, drawn uniformly
    (seeded, independent of iteration order) among the layer's non-positional heads -- or among all its
    heads when too few non-positional ones remain."""
    per_layer: dict[int, int] = {}
    for layer, _ in positional:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    chosen = set(positional)
    out: list[tuple[int, int]] = []
    for layer in sorted(per_layer):
        rng = random.Random(derive_seed("random-heads", seed, layer))
        pool = [h for h in range(shape.num_heads) if (layer, h) not in chosen]
        if len(pool) < per_layer[layer]:
            pool = list(range(shape.num_heads))
        out.extend((layer, h) for h in sorted(rng.sample(pool, per_layer[layer])))
    return out


def lowest_heads(table: Sequence[Mapping[str, Any]], count: int) -> list[tuple[int, int]]:
    """The ``count`` heads ranked lowest by the quantity the Positional Heads were selected on: the table's
    ``rank`` column (1 = best; written by the identification, whatever ``heads.rank_by`` was) when every row
    has one, else the ``score`` (missing scores rank last; ties broken by layer, head)."""
    if all("rank" in r for r in table):
        ranked = sorted(table, key=lambda r: (-int(r["rank"]), int(r["layer"]), int(r["head"])))
    else:

        def score(r: Mapping[str, Any]) -> float:
            return float("inf") if r.get("score") is None else float(r["score"])

        ranked = sorted(table, key=lambda r: (score(r), int(r["layer"]), int(r["head"])))
    return sorted((int(r["layer"]), int(r["head"])) for r in ranked[:count])


def build_conditions(
    names: Sequence[str],
    *,
    table: Sequence[Mapping[str, Any]] | None = None,
    shape: ModelShape,
    random_seeds: Sequence[int] = (0, 1, 2),
    user_heads: Sequence[Any] = (),
) -> list[Condition]:
    """The :class:`Condition` list of a sweep, in the order of ``names`` (``random`` expands to one condition
    per seed)."""
    unknown = [n for n in names if n not in CONDITION_NAMES]
    if unknown:
        raise ValueError(f"sweep.conditions: {unknown} not in {list(CONDITION_NAMES)}")
    needs = sorted(NEEDS_POSITIONAL.intersection(names))
    if needs and not table:
        raise ValueError(
            f"sweep.conditions {needs} need a Positional-Head table: add 'heads' to tasks or set heads.from_results"
        )
    pos = positional_heads(table) if table else []
    if needs and not pos:
        raise ValueError(f"sweep.conditions {needs}: the head table marks no head as positional")
    out: list[Condition] = []
    for name in names:
        if name == "none":
            out.append(NONE)
        elif name == "positional":
            out.append(Condition("positional", "heads", tuple(pos)))
        elif name == "random":
            if not random_seeds:
                raise ValueError("sweep.random_seeds=[] is empty but sweep.conditions has 'random'")
            for seed in random_seeds:
                heads = random_matched_heads(pos, shape, seed)
                out.append(
                    Condition(f"random@{seed}", "heads", tuple(heads), family="random", seed=int(seed))
                )
        elif name == "lowest":
            assert table is not None
            out.append(Condition("lowest", "heads", tuple(lowest_heads(table, len(pos)))))
        elif name == "heads":
            heads = validate_heads(user_heads, shape)
            if not heads:
                raise ValueError("sweep.conditions has 'heads' but sweep.user_heads=[] is empty")
            out.append(Condition("heads", "heads", tuple(heads)))
        elif name in ("dims_high", "dims_low"):
            out.append(Condition(name, "dims", tuple(pos), side=name.split("_")[1]))
    return out
