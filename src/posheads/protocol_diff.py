"""What changed between the protocol a run directory was made with and the one a resumed run asks for.

Both command lines (``train.py``, ``evaluate.py``) refuse to resume a run under another protocol unless asked
to; this is the comparison they share. Pure Python, no Lightning or W&B.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["describe_changes", "flatten", "protocol_changes"]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (an empty mapping is a value of its own)."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def protocol_changes(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    *,
    defaults: Mapping[str, Any] | None = None,
    free: Iterable[str] = (),
) -> dict[str, dict[str, Any]]:
    """``{option: {"before", "after"}}`` for every dotted option that differs between two nested configs,
    skipping options under any of ``free`` (they may change on resume) and options the earlier run did not
    have that are now at their default (``defaults``, nested like the configs): added since, not changed."""
    a, b = flatten(before), flatten(after)
    flat_defaults = flatten(defaults or {})
    free = tuple(free)
    missing = object()
    changes: dict[str, dict[str, Any]] = {}
    for key in sorted(set(a) | set(b)):
        if any(key == f or key.startswith(f + ".") for f in free):
            continue
        old, new = a.get(key, missing), b.get(key, missing)
        if old is missing and new == flat_defaults.get(key, missing):
            continue
        if old != new:
            changes[key] = {
                "before": None if old is missing else old,
                "after": None if new is missing else new,
            }
    return changes


def describe_changes(changes: Mapping[str, Mapping[str, Any]], limit: int = 6) -> str:
    """``opt (old -> new), ...`` for the first ``limit`` changes, then how many more."""
    listed = ", ".join(f"{k} ({v['before']!r} -> {v['after']!r})" for k, v in list(changes.items())[:limit])
    more = f" and {len(changes) - limit} more" if len(changes) > limit else ""
    return listed + more
