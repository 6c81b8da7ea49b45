"""Compare finished fine-tuning runs: HDA of the tracked Positional Heads against long-length perplexity
*across* runs (the paper's claim is about runs: those that extend the high-dimensional attention allocation
further extrapolate better), with Spearman's rho, its p-value and ``n`` = the number of runs.

Reads each run directory's ``report.json`` (perplexity before / after, protocol) and
``tracking/timeline.json`` (written by :class:`posheads.callbacks.PositionalHeadTracker`)::

    python -m posheads.lit.compare runs/quickstart runs/quickstart_pi runs/study2_* --out runs/study2

prints one row per run and the cross-run correlations, and writes ``compare.json`` and ``compare.png``
(final HDA area and HDA in the longest bin against PPL at the target length, one point per run, coloured by
scaling method) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from posheads.callbacks.efficiency import spearman
from posheads.plotting import pyplot

__all__ = ["compare_runs", "grouped_correlation", "main", "run_summary"]


def _load(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} (is {path.parent} a finished run directory?)")
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """One run: scaling, seed, steps, tracked heads, HDA of the tracked set (longest bin, area) at the first
    and last evaluation, probe PPL, and the report's PPL at the original / target length after training."""
    run = Path(run_dir)
    report = _load(run / "report.json", "report.json")
    timeline = _load(run / "tracking" / "timeline.json", "tracking/timeline.json")
    evals = timeline.get("evaluations") or []
    if not evals:
        raise ValueError(f"{run}/tracking/timeline.json holds no evaluations")
    first, last = evals[0], evals[-1]
    proto = report.get("protocol", {})
    after = next((r for r in report.get("rows", []) if r.get("key") == "after"), None)
    if after is None:
        raise ValueError(f"{run}/report.json has no 'after' row (did the run finish?)")
    lengths = sorted(after["results"], key=int)
    edges = timeline["bin_edges"]
    return {
        "run": run.name,
        "scaling": proto.get("rope_scaling"),
        "seed": proto.get("seed"),
        "train_order": (proto.get("data") or {}).get("train_order"),
        "steps": int(last["step"]),
        "tracked_heads": timeline.get("tracked_heads"),
        "longest_bin": f"{edges[-1][0]}-{edges[-1][1]}",
        "hda_longest_first": first["tracked_set"]["curve"][-1],
        "hda_longest_final": last["tracked_set"]["curve"][-1],
        "area_first": first["tracked_set"]["area"],
        "area_final": last["tracked_set"]["area"],
        "probe_ppl_first": (first.get("ppl") or {}).get("ppl"),
        "probe_ppl_final": (last.get("ppl") or {}).get("ppl"),
        "original_length": int(lengths[0]),
        "target_length": int(lengths[-1]),
        "ppl_original_after": after["results"][lengths[0]]["ppl"],
        "ppl_target_after": after["results"][lengths[-1]]["ppl"],
    }


def _method(scaling: Any) -> str:
    """The scaling method of a run (the grouping of the permutation tests)."""
    if isinstance(scaling, dict):
        return str(scaling.get("method") or scaling.get("rope_type") or scaling)
    return str(scaling).split()[0] if scaling else "none"


def grouped_correlation(x: list[float], y: list[float], methods: list[str], seed: int = 0) -> dict[str, Any]:
    """Permutation tests that keep the method grouping (:mod:`posheads.eval.intervals`): ``within`` (``y``
    permuted inside each method; statistic: the pooled within-method Spearman correlation), ``labels`` (the
    Spearman correlation of the method means, method labels permuted), and the correlation inside every
    method with its ``n``. Separated methods alone cannot make ``within`` significant."""
    from posheads.eval.intervals import grouped_permutation_test, within_group_correlations

    pairs = [(a, b, m) for a, b, m in zip(x, y, methods, strict=True) if a is not None and b is not None]
    xs, ys, ms = [p[0] for p in pairs], [p[1] for p in pairs], [p[2] for p in pairs]
    return {
        "within": grouped_permutation_test(xs, ys, ms, mode="within", seed=seed),
        "labels": grouped_permutation_test(xs, ys, ms, mode="labels", seed=seed),
        "within_method": within_group_correlations(xs, ys, ms),
    }


def compare_runs(run_dirs: list[str | Path]) -> dict[str, Any]:
    """Summaries of the runs, the across-run Spearman correlations with the PPL at the target length, and the
    same correlations tested with the scaling-method grouping kept (``grouped``): the pooled correlation
    across runs of several methods is mostly what the methods' separation produces."""
    rows = [run_summary(r) for r in run_dirs]
    ppl = [r["ppl_target_after"] for r in rows]
    methods = [_method(r["scaling"]) for r in rows]
    xs = {
        "area_final": [r["area_final"] for r in rows],
        "hda_longest_final": [r["hda_longest_final"] for r in rows],
        "area_change": [r["area_final"] - r["area_first"] for r in rows],
    }
    correlations = {f"{key}~ppl_target_after": spearman(x, ppl) for key, x in xs.items()}
    grouped = {f"{key}~ppl_target_after": grouped_correlation(x, ppl, methods) for key, x in xs.items()}
    return {"runs": rows, "spearman_across_runs": correlations, "grouped_by_method": grouped}


def plot_comparison(result: dict[str, Any], path: str | Path) -> Path:
    """Two scatter panels (final HDA area / final HDA in the longest bin vs target-length PPL), one point per
    run, coloured by scaling method."""
    plt = pyplot()
    rows = result["runs"]
    methods = sorted({str(r["scaling"]) for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in (
        (axes[0], "area_final", "HDA area of the tracked heads (final)"),
        (axes[1], "hda_longest_final", f"HDA in the {rows[0]['longest_bin']}-token bin (final)"),
    ):
        for m in methods:
            pts = [r for r in rows if str(r["scaling"]) == m]
            ax.scatter([r[key] for r in pts], [r["ppl_target_after"] for r in pts], color=colours[m], label=m)
        rho = result["spearman_across_runs"][f"{key}~ppl_target_after"]
        text = "n/a" if rho["rho"] is None else f"{rho['rho']:+.2f} (p={rho['p_value']:.2f})"
        ax.set_title(f"Spearman {text}, n={rho['n']} runs", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel(f"PPL@{rows[0]['target_length']} after fine-tuning")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "runs", nargs="+", help="run directories (each with report.json and tracking/timeline.json)"
    )
    ap.add_argument("--out", default=None, help="directory for compare.json and compare.png")
    args = ap.parse_args(argv)
    result = compare_runs(args.runs)
    cols = [
        "run",
        "scaling",
        "seed",
        "steps",
        "hda_longest_first",
        "hda_longest_final",
        "area_first",
        "area_final",
        "probe_ppl_final",
        "ppl_original_after",
        "ppl_target_after",
    ]
    print(" | ".join(cols))
    for r in result["runs"]:
        print(" | ".join(_fmt(r[c]) for c in cols))
    for name, s in result["spearman_across_runs"].items():
        rho = "n/a" if s["rho"] is None else f"{s['rho']:+.3f} (p = {s['p_value']:.3f})"
        print(f"Spearman across runs {name}: {rho}, n = {s['n']}")
        g = result["grouped_by_method"][name]
        w, lab = g["within"], g["labels"]
        if w["p_value"] is not None:
            print(
                f"  keeping the method grouping: within-method rho {w['statistic']:+.3f} "
                f"(permutation p = {w['p_value']:.3f}, {w['n_groups']} methods)"
            )
        if lab["p_value"] is not None:
            print(f"  method means: rho {lab['statistic']:+.3f} (label permutation p = {lab['p_value']:.3f})")
        for m, c in g["within_method"].items():
            rho_m = "n/a" if c["rho"] is None else f"{c['rho']:+.3f}"
            print(f"  within {m}: rho {rho_m}, n = {c['n']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        plot_comparison(result, out / "compare.png")
        print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return result


if __name__ == "__main__":
    main()
