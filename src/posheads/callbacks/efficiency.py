"""Extrapolation-efficiency summary of one run (docs/definitions.md, "HDA extension, area" / "efficiency";
the claim of Hong et al., arXiv 2410.08703, that runs which extend the high-dimensional attention
allocation further extrapolate better).

Pure functions over the evaluated steps of a run: the Spearman correlation between the Positional Heads' HDA
extension and the long-length perplexity across those steps (with its ``n`` and two-sided p-value), and the
perplexity curve's efficiency numbers (steps to come within 5 % of the final value, area under the curve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["efficiency_report", "spearman", "steps_to_within", "trapezoid_area"]


def _finite_pairs(x: Sequence[float | None], y: Sequence[float | None]) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for a, b in zip(x, y, strict=True):
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            continue
        xs.append(float(a))
        ys.append(float(b))
    return xs, ys


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, Any]:
    """Spearman's rank correlation of the finite pairs of ``x`` and ``y`` (mid-ranks for ties).

    Returns ``{"rho", "p_value", "n"}``; ``rho`` and ``p_value`` are ``None`` when fewer than 3 pairs remain or
    either side is constant (the correlation is undefined).
    """
    xs, ys = _finite_pairs(x, y)
    n = len(xs)
    out: dict[str, Any] = {"rho": None, "p_value": None, "n": n}
    if n < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return out
    from scipy.stats import spearmanr

    res = spearmanr(xs, ys)
    rho, p = float(res.statistic), float(res.pvalue)
    out["rho"] = rho if math.isfinite(rho) else None
    out["p_value"] = p if math.isfinite(p) else None
    return out


def steps_to_within(steps: Sequence[int], values: Sequence[float | None], rel: float = 0.05) -> int | None:
    """The first step from which ``values`` stays within ``rel`` (relative) of the final value, or ``None``."""
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)]
    if not pairs:
        return None
    final = pairs[-1][1]
    first = pairs[-1][0]
    for s, v in reversed(pairs):
        if abs(v - final) > rel * abs(final):
            break
        first = s
    return int(first)


def trapezoid_area(steps: Sequence[int], values: Sequence[float | None]) -> float | None:
    """Area under ``values`` against ``steps`` (trapezoid rule over the finite points), ``None`` with < 2 points."""
    pairs = [
        (float(s), float(v)) for s, v in zip(steps, values, strict=True) if v is not None and math.isfinite(v)
    ]
    if len(pairs) < 2:
        return None
    return sum((s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(pairs, pairs[1:]))


def efficiency_report(
    steps: Sequence[int],
    extension: Sequence[float | None],
    ppl: Sequence[float | None],
    area: Sequence[float | None] | None = None,
) -> dict[str, Any]:
    """The efficiency section of the timeline.

    Args:
        steps: optimizer steps of the evaluations.
        extension: HDA extension (set average) at each step.
        ppl: long-length perplexity at each step (``None`` where not measured).
        area: HDA area (set average) at each step, optional.

    Returns ``spearman_extension_ppl`` (``rho``, ``p_value``, ``n``), ``spearman_area_ppl`` (when ``area`` is
    given), and for the perplexity and the extension curves: first / final value, steps to come within 5 % of the
    final value, area under the curve.
    """
    out: dict[str, Any] = {
        "n_evaluations": len(steps),
        "spearman_extension_ppl": spearman(extension, ppl),
    }
    if area is not None:
        out["spearman_area_ppl"] = spearman(area, ppl)
    for name, values in (("ppl", ppl), ("extension", extension)):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        out[name] = {
            "first": finite[0] if finite else None,
            "final": finite[-1] if finite else None,
            "steps_to_within_5pct": steps_to_within(steps, values, 0.05),
            "auc": trapezoid_area(steps, values),
        }
    return out
