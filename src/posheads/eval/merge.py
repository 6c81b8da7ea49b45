"""Merge the ``results.json`` of evaluation runs that split one sweep across processes, recompute the
document-bootstrap intervals on the merged rows, and write the small artifacts a reader needs to check the
numbers (``results.json``, ``summary.txt``, ``perplexity.png``; the identification's ``heads.csv`` and
``analysis.json`` with ``--heads``).

The runs must evaluate the same documents with the same model and protocol (they differ only in
``sweep.conditions``); a condition present in several runs (``none``) must carry the same heads and the
same numbers in each -- checked, so that a merge never mixes two different measurements::

    python -m posheads.eval.merge runs/eval/study1_a runs/eval/study1_b --heads runs/eval/study1_heads \\
        --out docs/artifacts/study1_cpu
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from posheads.eval.perplexity import perplexity_intervals
from posheads.eval.plots import plot_perplexity, summary_tables
from posheads.eval.results import load_results

__all__ = ["main", "merge_results"]

#: Protocol keys allowed to differ between the merged runs.
VARYING = {"conditions", "started", "elapsed_s", "timings_s", "config", "length_warnings", "versions"}


def _same_rows(a: dict[str, Any], b: dict[str, Any], rel: float) -> bool:
    if {w["document"] for w in a.get("per_window", [])} != {w["document"] for w in b.get("per_window", [])}:
        return False
    return math.isclose(float(a["nll"]), float(b["nll"]), rel_tol=rel, abs_tol=rel)


def merge_results(
    runs: Sequence[dict[str, Any]], *, n_boot: int | None = None, seed: int | None = None, rel: float = 1e-6
) -> dict[str, Any]:
    """One results dict from runs of one sweep split by conditions.

    Raises ``ValueError`` when the runs' protocols differ (other than the conditions and times), when a
    condition shared by two runs acts on different heads, or when a shared (condition, length) row differs
    (relative tolerance ``rel`` on the NLL, same documents). ``perplexity_intervals`` is recomputed on the
    merged rows (``n_boot`` / ``seed``: default those of the first run's ``perplexity`` settings)."""
    if not runs:
        raise ValueError("merge_results needs at least one run")
    first = runs[0]
    proto0 = {k: v for k, v in first["protocol"].items() if k not in VARYING}
    conditions: dict[str, dict[str, Any]] = {}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for i, run in enumerate(runs):
        proto = {k: v for k, v in run["protocol"].items() if k not in VARYING}
        diff = sorted(k for k in set(proto) | set(proto0) if proto.get(k) != proto0.get(k))
        if diff:
            raise ValueError(f"run {i} differs from run 0 in protocol keys {diff}: not one sweep")
        for c in run.get("conditions", []):
            old = conditions.get(c["name"])
            if old is not None and old != c:
                raise ValueError(f"condition {c['name']!r} differs between the runs (heads or settings)")
            conditions[c["name"]] = c
        for r in run.get("perplexity", []):
            key = (r["condition"], int(r["length"]))
            if key in rows and not _same_rows(rows[key], r, rel):
                raise ValueError(
                    f"row {key} differs between the runs: NLL {rows[key]['nll']} vs {r['nll']} (documents or numbers)"
                )
            rows.setdefault(key, r)
    settings = first["protocol"].get("perplexity") or {}
    merged: dict[str, Any] = {
        "protocol": {**first["protocol"], "conditions": list(conditions), "merged_from": len(runs)},
        "heads": next((r["heads"] for r in runs if r.get("heads")), []),
        "heads_summary": next((r["heads_summary"] for r in runs if r.get("heads_summary")), {}),
        "conditions": list(conditions.values()),
        "perplexity": list(rows.values()),
        "passkey": [],
        "needle": [],
        "status": "merged: " + ", ".join(str(r.get("status")) for r in runs),
    }
    merged["perplexity_intervals"] = perplexity_intervals(
        merged,
        n_boot=int(n_boot if n_boot is not None else settings.get("n_boot", 2000)),
        seed=int(seed if seed is not None else settings.get("bootstrap_seed", 0)),
        level=float(settings.get("level", 0.95)),
    )
    return merged


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or results.json files) of one split sweep")
    ap.add_argument(
        "--heads", default=None, help="run directory of the identification (heads.csv, analysis.json)"
    )
    ap.add_argument(
        "--out", required=True, help="directory for the merged results.json, summary.txt, perplexity.png"
    )
    args = ap.parse_args(argv)
    merged = merge_results([load_results(p) for p in args.runs])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.heads:
        heads_dir = Path(args.heads)
        for name in ("heads.csv", "analysis.json"):
            if (heads_dir / name).is_file():
                shutil.copyfile(heads_dir / name, out / name)
        identification = load_results(heads_dir)
        merged["heads"] = merged["heads"] or identification.get("heads", [])
        merged["heads_summary"] = merged["heads_summary"] or identification.get("heads_summary", {})
    (out / "results.json").write_text(json.dumps(merged, indent=1, allow_nan=False), encoding="utf-8")
    text = summary_tables(merged)
    (out / "summary.txt").write_text(text + "\n", encoding="utf-8")
    plot_perplexity(merged, out / "perplexity.png")
    print(text)
    print(f"\nwrote {out}/results.json, summary.txt, perplexity.png")
    return merged


if __name__ == "__main__":
    main()
