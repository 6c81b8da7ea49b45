"""Study 2b comparison: HDA extension of the Positional Heads against extrapolation, per scaling method.

Reads Study 2b measurements (``results.json`` written by :mod:`posheads.eval.study2`) of

* the **training-free** setting: a study output directory (one ``<point>/results.json`` per scaling), a
  point directory, or a ``results.json`` file;
* the **fine-tuned** setting: a training run directory (``report.json``, ``tracking/timeline.json``) holding
  ``study2/<point>/results.json`` -- the same measurement run on its ``final/`` model (``python -m
  posheads.eval.study2 --config configs/study2/measure_finetuned.yaml --model runs/<run>/final
  --output_dir runs/<run>/study2``); its seed, fine-tuning mode and the tracker's HDA timeline come from the
  run's own files.

Reports one row per run (method, factor, setting, seed): per analysis variant (e.g. sinks in / out) the HDA
extension (mean over the Positional Heads of the largest log2 distance bin with HDA >= tau) and HDA area with
bootstrap intervals over the heads; perplexity per position bucket with bootstrap intervals over documents;
teacher-forced passkey per query length with Wilson intervals. Then, per setting and variant, the
correlation of HDA extension / area with the long-bucket NLL across runs (the unscaled baseline excluded):

* ``pooled``: Spearman over all runs (what a scatter plot shows; it mixes method separation and anything else);
* ``labels``: Spearman of the method means, permuting which method's PPL goes with which method's HDA
  (n = methods): does the method that extends HDA further extrapolate better?
* ``within``: the stratified within-method test (values centred on their method's mean, PPL permuted
  inside methods only): is there an association beyond the separation of the methods?
* within-method Spearman with its ``n`` (``None`` below 3 runs).

Tests from :func:`posheads.eval.intervals.grouped_permutation_test`. The plot: HDA extension vs long-bucket
PPL, one point per run, coloured by method (one panel per variant).

    python -m posheads.lit.compare_methods runs/study2/smollm2_training_free --out docs/artifacts/study2b
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

from posheads.eval.intervals import correlation, grouped_permutation_test, within_group_correlations
from posheads.plotting import pyplot

__all__ = ["collect_runs", "compare", "main", "plot", "read_result"]

#: What HDA summary is correlated with the long-bucket NLL.
HDA_KEYS = ("extension_bin", "area")


def _load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def read_result(path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row from a Study 2b ``results.json``."""
    res = _load(path)
    proto = res.get("protocol") or {}
    if "hda" not in res or "perplexity" not in res:
        raise ValueError(f"{path}: not a Study 2b results.json (no 'hda' / 'perplexity')")
    row: dict[str, Any] = {
        "run": proto.get("point", path.parent.name),
        "path": str(path),
        "method": proto.get("method"),
        "factor": proto.get("factor"),
        "setting": "training-free",
        "seed": None,
        "hda": res["hda"],
        "perplexity": res["perplexity"],
        "passkey": res.get("passkey") or [],
        "seconds": (res.get("seconds") or {}).get("total"),
    }
    row.update(extra or {})
    return row


def _finetuned_extra(run: Path) -> dict[str, Any]:
    report = _load(run / "report.json") if (run / "report.json").is_file() else {}
    proto = report.get("protocol") or {}
    extra: dict[str, Any] = {"seed": proto.get("seed"), "finetune_run": run.name}
    described = str(
        proto.get("finetuning") or ""
    )  # "full" or "lora(r=16, alpha=32)" (LightningModule.describe)
    mode = "lora" if described.startswith("lora") else "full" if described == "full" else None
    extra["setting"] = f"fine-tuned ({mode})" if mode else "fine-tuned"
    extra["training"] = proto.get("training")
    after = next((r for r in report.get("rows", []) if r.get("key") == "after"), None)
    if after is not None:
        extra["report_ppl_after"] = {k: v.get("ppl") for k, v in after["results"].items()}
    timeline = run / "tracking" / "timeline.json"
    if timeline.is_file():
        evals = _load(timeline).get("evaluations") or []
        if evals:
            extra["tracking_area_first"] = evals[0]["tracked_set"]["area"]
            extra["tracking_area_final"] = evals[-1]["tracked_set"]["area"]
            extra["tracking_steps"] = int(evals[-1]["step"])
    return extra


def collect_runs(paths: list[str | Path]) -> list[dict[str, Any]]:
    """Rows from files and directories (see the module docstring); raises naming a path with nothing in it."""
    rows: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if p.is_file():
            rows.append(read_result(p))
        elif (p / "results.json").is_file():
            rows.append(read_result(p / "results.json"))
        elif (p / "study2").is_dir():
            extra = _finetuned_extra(p)
            found = sorted((p / "study2").glob("*/results.json"))
            if not found:
                raise FileNotFoundError(
                    f"{p}/study2 holds no <point>/results.json (measure the run's final model)"
                )
            for f in found:
                r = read_result(f, extra)
                r["run"] = f"{p.name}/{r['run']}"
                rows.append(r)
        elif p.is_dir() and sorted(p.glob("*/results.json")):
            rows.extend(read_result(f) for f in sorted(p.glob("*/results.json")))
        else:
            raise FileNotFoundError(
                f"{p}: neither a Study 2b results.json, a directory of <point>/results.json, nor a run with study2/"
            )
    if not rows:
        raise ValueError("no runs")
    return rows


def _long_bucket(row: dict[str, Any]) -> dict[str, Any]:
    return row["perplexity"][-1]


def _correlations(rows: list[dict[str, Any]], variant: str, key: str, seed: int) -> dict[str, Any]:
    x = [r["hda"][variant][key]["mean"] for r in rows]
    y = [_long_bucket(r)["nll"] for r in rows]
    groups = [r["method"] for r in rows]
    ok = [i for i in range(len(rows)) if x[i] is not None and y[i] is not None]
    x, y, groups = [x[i] for i in ok], [y[i] for i in ok], [groups[i] for i in ok]
    out: dict[str, Any] = {
        "x": f"hda.{variant}.{key}",
        "y": "long-bucket NLL",
        "n": len(x),
        "n_methods": len(set(groups)),
    }
    if len(x) < 3:
        out["note"] = "fewer than 3 runs: no correlation"
        return out
    rho = correlation(x, y, "spearman")
    out["pooled_spearman"] = None if rho != rho else rho
    out["labels"] = grouped_permutation_test(x, y, groups, mode="labels", seed=seed)
    out["within"] = grouped_permutation_test(x, y, groups, mode="within", seed=seed)
    out["within_method"] = within_group_correlations(x, y, groups)
    return out


def compare(rows: list[dict[str, Any]], include_baseline: bool = False, seed: int = 0) -> dict[str, Any]:
    """Correlations per setting and variant (runs with method ``none`` are left out unless
    ``include_baseline``)."""
    result: dict[str, Any] = {"runs": rows, "correlations": {}}
    for setting in sorted({r["setting"] for r in rows}):
        mine = [r for r in rows if r["setting"] == setting and (include_baseline or r["method"] != "none")]
        if not mine:
            continue
        variants = sorted(set.intersection(*(set(r["hda"]) for r in mine)))
        result["correlations"][setting] = {
            v: {k: _correlations(mine, v, k, seed) for k in HDA_KEYS} for v in variants
        }
    result["baseline_included"] = include_baseline
    return result


def _fmt_ci(d: dict[str, Any] | None, key: str = "mean", digits: int = 2) -> str:
    if not d or d.get(key) is None:
        return "n/a"
    return f"{d[key]:.{digits}f} [{d['lo']:.{digits}f}, {d['hi']:.{digits}f}]"


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (one per run) for CSV / markdown."""
    out = []
    for r in result["runs"]:
        flat: dict[str, Any] = {
            "run": r["run"],
            "setting": r["setting"],
            "method": r["method"],
            "factor": r["factor"],
            "seed": r["seed"],
        }
        for v, h in sorted(r["hda"].items()):
            flat[f"hda_ext_bin[{v}]"] = _fmt_ci(h["extension_bin"])
            flat[f"hda_area[{v}]"] = _fmt_ci(h["area"])
            flat[f"n_heads[{v}]"] = h["area"]["n"]
        for b in r["perplexity"]:
            flat[f"ppl[{b['bucket']}]"] = f"{b['ppl']:.2f} [{b['ppl_lo']:.2f}, {b['ppl_hi']:.2f}]"
            flat[f"n_docs[{b['bucket']}]"] = b["documents"]
        for pk in r["passkey"]:
            flat[f"passkey@{pk['length']}"] = (
                f"{pk['correct']}/{pk['trials']} [{pk['lo']:.2f}, {pk['hi']:.2f}]"
            )
            flat[f"passkey_logprob@{pk['length']}"] = _fmt_ci(pk["logprob"])
        out.append(flat)
    return out


def compact_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One short row per run for a report: HDA extension / area per variant (n = heads), PPL per bucket
    (n = documents), passkey correct/trials per length and mean answer log-prob at the longest length."""
    out = []
    for r in result["runs"]:
        row: dict[str, Any] = {"run": r["run"], "setting": r["setting"]}
        for v, h in sorted(r["hda"].items()):
            row[f"HDA ext. [{v}] (n={h['area']['n']})"] = _fmt_ci(h["extension_bin"], digits=1)
            row[f"HDA area [{v}]"] = _fmt_ci(h["area"], digits=2)
        for b in r["perplexity"]:
            row[f"PPL {b['bucket']} (n docs)"] = (
                f"{b['ppl']:.1f} [{b['ppl_lo']:.1f}, {b['ppl_hi']:.1f}] ({b['documents']})"
            )
        if r["passkey"]:
            row["passkey " + "/".join(str(p["length"]) for p in r["passkey"])] = " · ".join(
                f"{p['correct']}/{p['trials']}" for p in r["passkey"]
            )
            last = r["passkey"][-1]
            row[f"answer log-prob @{last['length']}"] = _fmt_ci(last["logprob"], digits=1)
        out.append(row)
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def correlation_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    for setting, per_v in result["correlations"].items():
        for v, per_k in per_v.items():
            for c in per_k.values():
                if "pooled_spearman" not in c:
                    lines.append(f"[{setting}] {c['x']} ~ {c['y']}: n = {c['n']} ({c.get('note')})")
                    continue
                lab, wit = c["labels"], c["within"]

                def f(v: Any) -> str:
                    return "n/a" if v is None else f"{v:+.3f}"

                def pv(v: Any) -> str:
                    return "n/a" if v is None else f"{v:.3f}"

                wm = ", ".join(
                    f"{m}: {f(s['rho'])} (n={s['n']})" for m, s in sorted(c["within_method"].items())
                )
                lines.append(
                    f"[{setting}] {c['x']} ~ {c['y']}: pooled Spearman {f(c['pooled_spearman'])} (n = {c['n']} runs); "
                    f"method means {f(lab['statistic'])}, label-permutation p = {pv(lab['p_value'])} "
                    f"(n = {lab['n_groups']} methods, {lab['n_permutations']} permutations); "
                    f"within-method (stratified) {f(wit['statistic'])}, p = {pv(wit['p_value'])}; "
                    f"within each method: {wm}"
                )
    return lines


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """HDA extension (top row) and HDA area (bottom row) vs long-bucket PPL, one point per run (error bars: the
    intervals), coloured by method, marker by setting; one column per sink variant; each panel titled with its
    correlation test."""
    plt = pyplot()
    rows = result["runs"]
    variants = sorted({v for r in rows for v in r["hda"]})
    methods = sorted({str(r["method"]) for r in rows})
    colours = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    markers = {s: m for s, m in zip(sorted({r["setting"] for r in rows}), "os^Dv")}
    fig, axes = plt.subplots(len(HDA_KEYS), len(variants), figsize=(5.2 * len(variants), 3.9 * len(HDA_KEYS)),
                             squeeze=False)  # fmt: skip
    edges = next(r["hda"][v]["bin_edges"] for r in rows for v in r["hda"])
    xlabels = {
        "extension_bin": f"HDA extension (log2 bin; {len(edges) - 1} = {edges[-1][0]}-{edges[-1][1]})",
        "area": "HDA area (sum over bins)",
    }
    for row_axes, key in zip(axes, HDA_KEYS):
        for ax, v in zip(row_axes, variants):
            seen = set()
            for r in rows:
                h = r["hda"].get(v)
                if h is None or h[key]["mean"] is None:
                    continue
                b = _long_bucket(r)
                x, e = h[key]["mean"], h[key]
                label = f"{r['method']} ({r['setting']})"
                ax.errorbar(
                    [x],
                    [b["ppl"]],
                    xerr=[[x - e["lo"]], [e["hi"] - x]],
                    yerr=[[b["ppl"] - b["ppl_lo"]], [b["ppl_hi"] - b["ppl"]]],
                    fmt=markers[r["setting"]],
                    color=colours[str(r["method"])],
                    capsize=2,
                    label=None if label in seen else label,
                )
                if r.get("factor"):
                    ax.annotate(
                        f"x{r['factor']:g}",
                        (x, b["ppl"]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
                seen.add(label)
            ax.set_yscale("log")
            ax.set_xlabel(f"{xlabels[key]} [{v}]", fontsize=8)
            ax.set_ylabel(f"PPL, tokens {rows[0]['perplexity'][-1]['bucket']}", fontsize=8)
            texts = []
            for setting, per_v in result["correlations"].items():
                cc = per_v.get(v, {}).get(key, {})
                if "pooled_spearman" in cc:
                    within = cc["within"]["p_value"]
                    texts.append(
                        f"{setting}: rho={cc['pooled_spearman']:+.2f} (n={cc['n']}), "
                        f"methods p={cc['labels']['p_value']:.2f}, "
                        f"within p={within if within is not None else float('nan'):.2f}"
                    )
            ax.set_title("\n".join(texts) or v, fontsize=7)
            ax.legend(fontsize=6)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "paths", nargs="+", help="study outputs, results.json files, or fine-tuned run directories"
    )
    ap.add_argument(
        "--out", default=None, help="directory for compare.json, table.csv, table.md and compare.png"
    )
    ap.add_argument(
        "--include_baseline", action="store_true", help="keep the unscaled runs in the correlations"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of Monte Carlo permutations (when not exact)")
    args = ap.parse_args(argv)
    result = compare(collect_runs(args.paths), include_baseline=args.include_baseline, seed=args.seed)
    rows = table_rows(result)
    md = markdown(compact_rows(result))
    print(md)
    for line in correlation_lines(result):
        print(line)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
        with (out / "table.csv").open("w", newline="", encoding="utf-8") as fh:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(fh, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        (out / "table.md").write_text(
            md + "\n\n" + "\n".join(correlation_lines(result)) + "\n", encoding="utf-8"
        )
        plot(result, out / "compare.png")
        print(f"wrote {out}/compare.json, table.csv, table.md, compare.png")
    return result


if __name__ == "__main__":
    main()
