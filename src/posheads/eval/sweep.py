"""Ablation sweeps: which heads each condition ablates, and how a group of conditions is applied per row.

Conditions (``docs/definitions.md``, "Ablation operators"), named in configs as

===========================  =========================================================================
``none``                     nothing ablated (must reproduce the unablated numbers exactly)
``positional``               the Positional Heads (identified in the same run, or read from a previous
                             run's table)
``random``                   controls, one per seed of ``sweep.random_seeds`` (``random@<seed>`` in
                             results; ``random@3`` names one seed): the same number of heads *per layer*
                             as the Positional set, drawn uniformly among the layer's **non-positional**
                             heads. A layer with fewer non-positional heads than it needs takes the
                             shortfall from the nearest layers (distance 1, then 2, ...; both layers at a
                             distance form one pool, drawn from at random with the seed). A control never
                             contains a Positional Head; ``per_layer`` in results records the counts used.
``lowest``                   control, layer-matched: in every layer the lowest-ranked non-positional heads
                             (by the table's ``rank``, else its ``score``), as many as the Positional set
                             has there; shortfalls from the nearest layers as for ``random`` (lowest rank
                             first)
``lowest_global``            the same number of heads, ranked lowest overall (not layer-matched)
``heads``                    a user-given head list (``sweep.user_heads``)
``dims_high`` / ``dims_low`` inside the Positional Heads, RoPE pairs above / below ``i_c`` removed from the
                             attention logits; ``dims_high[random]`` (every seed), ``dims_high[random@0]``,
                             ``dims_high[lowest]`` do the same inside a control set. With
                             ``sweep.dims_pairs: equal`` (default) both sides remove the same number
                             ``n = min(P - i_c, i_c)`` of pairs, the ``n`` nearest to ``i_c`` on their side
                             (``high``: ``i_c .. i_c+n-1``, ``low``: ``i_c-n .. i_c-1``); ``all`` removes
                             every pair ``>= i_c`` / ``< i_c``
===========================  =========================================================================

``positional_allkeys``, ``random_allkeys`` (``random_allkeys@<seed>``) and ``lowest_allkeys`` are the same
three conditions for the Positional set identified over *every* key, attention sinks included (the table's
``positional_with_sinks`` / ``rank_with_sinks`` columns, written when ``heads.analysis.sink_keys > 0``), so
one sweep compares both sink variants on the same documents. Every control excludes the Positional Heads of
*both* variants when the table has both.

Every head condition can carry its ablation mode: ``positional:mean``, ``random:zero``, ``random@0:mean``
(default ``sweep.ablation``), so zero and mean ablation are reported side by side in one sweep.

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
    "CONTROLS",
    "control_family",
    "own_controls",
    "ConditionSpec",
    "dims_pairs",
    "parse_condition",
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

#: The clean controls of each Positional set (condition families): a set is compared with these.
CONTROLS: dict[str, tuple[str, ...]] = {
    "positional": ("random", "lowest"),
    "positional_allkeys": ("random_allkeys", "lowest_allkeys"),
}


def control_family(condition: str) -> str:
    """``random@2`` -> ``random``; ``random@0:mean`` -> ``random:mean``; other names unchanged."""
    base, _, mode = condition.partition(":")
    base = base.split("@", 1)[0]
    return f"{base}:{mode}" if mode else base


def own_controls(condition: str, names: Iterable[str]) -> dict[str, list[str]]:
    """The members of ``names`` that control ``condition`` when it is a Positional set, by family:
    ``positional`` -> ``{"random": ["random@0", ...], "lowest": [...]}``; a set with a mode
    (``positional:mean``) takes the controls with the same mode. Empty for any other condition."""
    base, _, mode = condition.partition(":")
    if base not in CONTROLS:
        return {}
    out: dict[str, list[str]] = {}
    for fam in CONTROLS[base]:
        fam = f"{fam}:{mode}" if mode else fam
        members = [n for n in names if control_family(n) == fam]
        if members:
            out[fam] = members
    return out


CONDITION_NAMES = (
    "none",
    "positional",
    "random",
    "lowest",
    "lowest_global",
    "heads",
    "dims_high",
    "dims_low",
    "positional_allkeys",
    "random_allkeys",
    "lowest_allkeys",
)
#: Conditions on the Positional set identified over every key (sinks included).
ALLKEYS = frozenset({"positional_allkeys", "random_allkeys", "lowest_allkeys"})
#: Conditions that need the Positional-Head set (identification in this run or a previous run's table).
NEEDS_POSITIONAL = frozenset(
    {"positional", "random", "lowest", "lowest_global", "dims_high", "dims_low"} | ALLKEYS
)
#: Head families a dimension condition can act on (``dims_high[<family>]``).
DIMS_FAMILIES = ("positional", "random", "lowest")
DIMS_PAIR_RULES = ("equal", "all")
ABLATION_MODES = ("zero", "mean")
HEAD_ROW_KEYS = ("layer", "head", "score", "z", "positional")


@dataclass(frozen=True)
class ModelShape:
    """What the sweep needs to know about a model: attention layers, heads per layer, rotary width (``head_dim``:
    twice the RoPE pairs; pass-through components excluded), and the longest input its (scaled) RoPE was
    configured for."""

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
        try:  # the rotary width: RoPE pairs only (partial rotary, MLA), never pass-through components
            from posheads.rope.layout import describe_rope

            rope = describe_rope(text)
            head_dim = 2 * rope.num_pairs
            if len({layer.rope_theta for layer in rope.layers}) > 1:
                theta = None  # per-layer-type theta (Gemma 3): one i_c per layer, not a sweep-wide one
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
                "sweep.critical_pair='critical' needs one rope_theta and the pre-training context of the model "
                "(per-layer-type RoPE such as Gemma 3 has one i_c per layer: give sweep.critical_pair as an int)"
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
    if raw.get("positional_with_sinks") not in (None, ""):
        pws = raw["positional_with_sinks"]
        row["positional_with_sinks"] = (
            pws.strip().lower() in ("1", "true", "yes") if isinstance(pws, str) else bool(pws)
        )
    if raw.get("rank_with_sinks") not in (None, ""):
        row["rank_with_sinks"] = int(raw["rank_with_sinks"])
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
            rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    else:
        with p.open(encoding="utf-8") as fh:
            data = json.load(fh)
        rows = data.get("heads") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"heads.from_results={str(path)!r} holds no head table (no rows under 'heads')")
    return [_head_row(r) for r in rows]


def positional_heads(table: Sequence[Mapping[str, Any]], column: str = "positional") -> list[tuple[int, int]]:
    """The heads marked in ``column`` (``positional``, or ``positional_with_sinks``) of a head table, sorted."""
    return sorted((int(r["layer"]), int(r["head"])) for r in table if r.get(column))


def _per_layer(heads: Sequence[tuple[int, int]]) -> dict[int, int]:
    out: dict[int, int] = {}
    for layer, _ in heads:
        out[layer] = out.get(layer, 0) + 1
    return out


def _matched_draw(
    positional: Sequence[tuple[int, int]],
    shape: ModelShape,
    pick: Any,
    exclude: Iterable[tuple[int, int]] = (),
) -> list[tuple[int, int]]:
    """Per-layer matched control heads that never include a Positional Head.

    Every layer first takes ``min(needed, available)`` heads from its own non-positional heads, chosen by
    ``pick(candidates, k, layer)`` (candidates sorted); then every layer's shortfall is taken from the
    heads still free in the nearest layers -- distance 1 (both neighbours pooled), then 2, ... -- again by
    ``pick`` (``layer`` is the layer whose shortfall is filled). Raises ``ValueError`` when the model has
    too few non-positional heads."""
    need = _per_layer(positional)
    excluded = set(positional) | set(exclude)
    free = {
        layer: [h for h in range(shape.num_heads) if (layer, h) not in excluded]
        for layer in range(shape.num_layers)
    }
    if sum(len(v) for v in free.values()) < len(positional):
        raise ValueError(
            f"a control matched to {len(positional)} Positional Heads needs as many non-positional heads; "
            f"the model has {sum(len(v) for v in free.values())}"
        )
    chosen: list[tuple[int, int]] = []
    shortfall: dict[int, int] = {}
    for layer in sorted(need):
        k = min(need[layer], len(free[layer]))
        got = pick([(layer, h) for h in free[layer]], k, layer) if k else []
        chosen.extend(got)
        free[layer] = [h for h in free[layer] if (layer, h) not in set(got)]
        if need[layer] > k:
            shortfall[layer] = need[layer] - k
    for layer in sorted(shortfall):
        missing = shortfall[layer]
        for dist in range(1, shape.num_layers):
            if not missing:
                break
            near = [n for n in (layer - dist, layer + dist) if 0 <= n < shape.num_layers]
            pool = sorted((n, h) for n in near for h in free[n])
            if not pool:
                continue
            got = pick(pool, min(missing, len(pool)), layer)
            chosen.extend(got)
            for n, h in got:
                free[n].remove(h)
            missing -= len(got)
    return sorted(chosen)


def random_matched_heads(
    positional: Sequence[tuple[int, int]],
    shape: ModelShape,
    seed: int,
    exclude: Iterable[tuple[int, int]] = (),
) -> list[tuple[int, int]]:
    """Random control heads: in every layer, as many heads as the Positional set has there, drawn uniformly
    (seeded, independent of iteration order) among the layer's non-positional heads; a layer's shortfall
    (too few non-positional heads) is drawn from the nearest layers' remaining non-positional heads
    (both layers at one distance pooled; the draw among them is seeded). Never returns a Positional Head,
    nor a head of ``exclude`` (e.g. the Positional Heads of the other sink variant)."""

    def pick(candidates: list[tuple[int, int]], k: int, layer: int) -> list[tuple[int, int]]:
        rng = random.Random(derive_seed("random-heads", seed, layer, len(candidates)))
        return rng.sample(candidates, k)

    return _matched_draw(positional, shape, pick, exclude)


def _rank_key(
    table: Sequence[Mapping[str, Any]], rank: str = "rank"
) -> dict[tuple[int, int], tuple[float, int, int]]:
    """Sort key per head, lowest-ranked first: by the table's ``rank`` column (descending) when every row has
    one, else by ``score`` (ascending; missing scores last: never taken for lowest), ties by layer, head."""
    if all(rank in r for r in table):
        return {
            (int(r["layer"]), int(r["head"])): (-float(r[rank]), int(r["layer"]), int(r["head"]))
            for r in table
        }

    def score(r: Mapping[str, Any]) -> float:
        return float("inf") if r.get("score") is None else float(r["score"])

    return {(int(r["layer"]), int(r["head"])): (score(r), int(r["layer"]), int(r["head"])) for r in table}


def lowest_matched_heads(
    table: Sequence[Mapping[str, Any]],
    positional: Sequence[tuple[int, int]],
    shape: ModelShape,
    exclude: Iterable[tuple[int, int]] = (),
    rank: str = "rank",
) -> list[tuple[int, int]]:
    """Layer-matched lowest control: in every layer, the lowest-ranked non-positional heads, as many as the
    Positional set has there; shortfalls from the nearest layers (lowest-ranked first). Heads missing from
    the table rank above every listed one (never picked before them)."""
    key = _rank_key(table, rank)
    top = (float("inf"), 0, 0)

    def pick(candidates: list[tuple[int, int]], k: int, layer: int) -> list[tuple[int, int]]:
        return sorted(candidates, key=lambda h: key.get(h, top))[:k]

    return _matched_draw(positional, shape, pick, exclude)


def lowest_heads(
    table: Sequence[Mapping[str, Any]], count: int, exclude: Iterable[tuple[int, int]] = ()
) -> list[tuple[int, int]]:
    """The ``count`` heads ranked lowest overall by the quantity the Positional Heads were selected on: the
    table's ``rank`` column (1 = best; written by the identification, whatever ``heads.rank_by`` was) when
    every row has one, else the ``score`` (missing scores rank last; ties broken by layer, head). Not
    layer-matched: the ``lowest_global`` condition (``lowest`` is :func:`lowest_matched_heads`). Heads in
    ``exclude`` (the Positional Heads) are never taken."""
    key = _rank_key(table)
    skip = set(exclude)
    ranked = sorted((h for h in key if h not in skip), key=lambda h: key[h])
    return sorted(ranked[:count])


def dims_pairs(side: str, i_c: int, num_pairs: int, rule: str = "equal") -> tuple[int, ...]:
    """The RoPE pairs a dimension condition removes.

    ``rule="all"``: every pair ``>= i_c`` (``high``) or ``< i_c`` (``low``). ``rule="equal"``: both sides
    remove ``n = min(num_pairs - i_c, i_c)`` pairs, the ``n`` nearest to ``i_c`` on their side (``high``:
    ``i_c .. i_c+n-1``; ``low``: ``i_c-n .. i_c-1``), so high and low remove the same number of pairs."""
    if side not in ("high", "low"):
        raise ValueError(f"side={side!r} is not 'high' or 'low'")
    if rule not in DIMS_PAIR_RULES:
        raise ValueError(f"sweep.dims_pairs={rule!r} is not one of {list(DIMS_PAIR_RULES)}")
    if not 0 <= i_c <= num_pairs:
        raise ValueError(f"i_c={i_c} must be in [0, {num_pairs}]")
    if rule == "all":
        return tuple(range(i_c, num_pairs)) if side == "high" else tuple(range(i_c))
    n = min(num_pairs - i_c, i_c)
    return tuple(range(i_c, i_c + n)) if side == "high" else tuple(range(i_c - n, i_c))


@dataclass(frozen=True)
class ConditionSpec:
    """One ``sweep.conditions`` entry, parsed: ``base`` (a :data:`CONDITION_NAMES` entry), ``seed`` (one
    random seed, ``random@3`` / ``dims_high[random@3]``), ``target`` (the head family of a dims condition),
    ``mode`` (``zero`` / ``mean`` for head conditions; ``None`` = ``sweep.ablation``)."""

    entry: str
    base: str
    seed: int | None = None
    target: str | None = None
    mode: str | None = None


def parse_condition(entry: Any, option: str = "sweep.conditions") -> ConditionSpec:
    """Parse ``name[:mode]``, ``random@<seed>[:mode]``, ``dims_high[<family>]`` / ``dims_low[<family>]``
    (family ``positional``, ``random``, ``random@<seed>``, ``lowest``)."""
    if not isinstance(entry, str) or not entry:
        raise ValueError(f"{option}: {entry!r} is not a condition name")
    text, mode = entry, None
    if ":" in text:
        text, mode = text.rsplit(":", 1)
        if mode not in ABLATION_MODES:
            raise ValueError(
                f"{option}: {entry!r}: ablation mode {mode!r} is not one of {list(ABLATION_MODES)}"
            )
    target = None
    if text.endswith("]") and "[" in text:
        text, target = text[:-1].split("[", 1)
    base, seed = text, None
    fam = target if target is not None else text

    def split_seed(name: str) -> tuple[str, int | None]:
        if "@" not in name:
            return name, None
        head, _, s = name.partition("@")
        try:
            return head, int(s)
        except ValueError:
            raise ValueError(f"{option}: {entry!r}: seed {s!r} is not an integer") from None

    if target is not None:
        fam, seed = split_seed(target)
        if base not in ("dims_high", "dims_low"):
            raise ValueError(f"{option}: {entry!r}: only dims_high / dims_low take a [family]")
        if fam not in DIMS_FAMILIES:
            raise ValueError(f"{option}: {entry!r}: family {fam!r} is not one of {list(DIMS_FAMILIES)}")
        if seed is not None and fam != "random":
            raise ValueError(f"{option}: {entry!r}: only the random family takes a seed")
        target = fam
    else:
        base, seed = split_seed(text)
        if seed is not None and base not in ("random", "random_allkeys"):
            raise ValueError(f"{option}: {entry!r}: only random takes a seed (random@<seed>)")
    if base not in CONDITION_NAMES:
        raise ValueError(f"{option}: unknown condition {entry!r}; known: {list(CONDITION_NAMES)}")
    if mode is not None and (base in ("none", "dims_high", "dims_low")):
        raise ValueError(f"{option}: {entry!r}: {base} takes no ablation mode (only head conditions do)")
    if base in ("dims_high", "dims_low") and target is None:
        target = "positional"
    return ConditionSpec(entry, base, seed, target, mode)


def build_conditions(
    names: Sequence[str],
    *,
    table: Sequence[Mapping[str, Any]] | None = None,
    shape: ModelShape,
    random_seeds: Sequence[int] = (0, 1, 2),
    user_heads: Sequence[Any] = (),
    ablation: str = "zero",
    i_c: int | None = None,
    dims_rule: str = "equal",
) -> list[Condition]:
    """The :class:`Condition` list of a sweep, in the order of ``names`` (``random`` expands to one condition
    per seed; ``dims_high[random]`` likewise). Every control is checked to share no head with the Positional
    set. ``i_c`` is needed by dims conditions; ``ablation`` is the mode of head conditions without one."""
    specs = [parse_condition(n) for n in names]
    needs = sorted({sp.entry for sp in specs if sp.base in NEEDS_POSITIONAL})
    if needs and not table:
        raise ValueError(
            f"sweep.conditions {needs} need a Positional-Head table: add 'heads' to tasks or set heads.from_results"
        )
    pos = positional_heads(table) if table else []
    if needs and not pos:
        raise ValueError(f"sweep.conditions {needs}: the head table marks no head as positional")
    has_all = bool(table) and all("positional_with_sinks" in r for r in table)  # type: ignore[union-attr]
    pos_all = positional_heads(table, "positional_with_sinks") if table and has_all else []
    wants_all = sorted({sp.entry for sp in specs if sp.base in ALLKEYS})
    if wants_all and not pos_all:
        raise ValueError(
            f"sweep.conditions {wants_all} need the Positional set identified over every key (the table's "
            "positional_with_sinks column, written when heads.analysis.sink_keys > 0)"
        )
    # every control avoids the Positional Heads of both sink variants when the table has both
    avoid = set(pos) | set(pos_all)
    if any(sp.base in ("dims_high", "dims_low") for sp in specs) and i_c is None:
        raise ValueError("sweep.conditions with dims_high / dims_low need the critical pair i_c")
    cache: dict[Any, list[tuple[int, int]]] = {}

    def family_heads(fam: str, seed: int | None = None) -> list[tuple[int, int]]:
        key = (fam, seed)
        if key not in cache:
            if fam == "positional":
                cache[key] = list(pos)
            elif fam == "positional_allkeys":
                cache[key] = list(pos_all)
            elif fam == "random":
                assert seed is not None
                cache[key] = random_matched_heads(pos, shape, seed, exclude=avoid)
            elif fam == "random_allkeys":
                assert seed is not None
                cache[key] = random_matched_heads(pos_all, shape, seed, exclude=avoid)
            elif fam == "lowest":
                assert table is not None
                cache[key] = lowest_matched_heads(table, pos, shape, exclude=avoid)
            elif fam == "lowest_allkeys":
                assert table is not None
                cache[key] = lowest_matched_heads(
                    table, pos_all, shape, exclude=avoid, rank="rank_with_sinks"
                )
            elif fam == "lowest_global":
                assert table is not None
                cache[key] = lowest_heads(table, len(pos), exclude=avoid)
            if not fam.startswith("positional") and set(cache[key]) & avoid:
                raise AssertionError(f"control {fam} shares heads {sorted(set(cache[key]) & avoid)}")
        return cache[key]

    def seeds_of(sp: ConditionSpec) -> list[int]:
        if sp.seed is not None:
            return [sp.seed]
        if not random_seeds:
            raise ValueError(f"sweep.random_seeds=[] is empty but sweep.conditions has {sp.entry!r}")
        return [int(s) for s in random_seeds]

    out: list[Condition] = []
    for sp in specs:
        mode = sp.mode or ablation
        suffix = "" if sp.mode is None else f":{sp.mode}"
        if sp.base == "none":
            out.append(NONE)
        elif sp.base in ("positional", "lowest", "lowest_global", "positional_allkeys", "lowest_allkeys"):
            heads = family_heads(sp.base)
            out.append(
                Condition(sp.base + suffix, "heads", tuple(heads), family=sp.base + suffix, ablation=mode)
            )
        elif sp.base in ("random", "random_allkeys"):
            for seed in seeds_of(sp):
                out.append(
                    Condition(
                        f"{sp.base}@{seed}{suffix}",
                        "heads",
                        tuple(family_heads(sp.base, seed)),
                        family=sp.base + suffix,
                        seed=seed,
                        ablation=mode,
                    )
                )
        elif sp.base == "heads":
            heads = validate_heads(user_heads, shape)
            if not heads:
                raise ValueError("sweep.conditions has 'heads' but sweep.user_heads=[] is empty")
            out.append(Condition("heads" + suffix, "heads", tuple(heads), ablation=mode))
        else:  # dims_high / dims_low
            assert i_c is not None and sp.target is not None
            side = sp.base.split("_")[1]
            pairs = dims_pairs(side, i_c, shape.num_pairs, dims_rule)
            if sp.target == "random":
                for seed in seeds_of(sp):
                    out.append(
                        Condition(
                            f"{sp.base}[random@{seed}]",
                            "dims",
                            tuple(family_heads("random", seed)),
                            family=f"{sp.base}[random]",
                            seed=seed,
                            side=side,
                            pairs=pairs,
                            target="random",
                        )
                    )
            else:
                name = sp.base if sp.target == "positional" else f"{sp.base}[{sp.target}]"
                out.append(
                    Condition(
                        name,
                        "dims",
                        tuple(family_heads(sp.target)),
                        side=side,
                        pairs=pairs,
                        target=sp.target,
                    )
                )
    names_out = [c.name for c in out]
    dup = sorted({n for n in names_out if names_out.count(n) > 1})
    if dup:
        raise ValueError(f"sweep.conditions: conditions {dup} occur more than once")
    return out
