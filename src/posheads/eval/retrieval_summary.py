"""Summary of a retrieval-suite run: cells pooled over depths / difficulties, and the contrasts a reader needs.

A run's ``trials.jsonl`` holds one teacher-forced record per (prompt, condition)
(:func:`posheads.eval.retrieval.evaluate_suite`). This module reads them and reports, per ``(task, length)``:

* **cells** -- per condition, pooled over the depths (or cwe difficulties) of the task: prompts ``n``,
  haystacks ``k``, exact-match accuracy, mean answer log-probability, and both minus condition ``none`` on the
  same prompts;
* **contrasts** -- for each Positional set in the run (``positional``: attention-sink key excluded;
  ``positional_allkeys``: every key), the set minus ``none`` and the set minus the mean of its own clean
  controls (``random@*`` for ``positional``, ``random_allkeys@*`` for ``positional_allkeys``; ``lowest`` /
  ``lowest_allkeys`` likewise when run; a set ablated with a mode, ``positional:mean``, against the controls
  with the same mode, ``random@*:mean``), per prompt, and each control seed on its own (seeds differ a lot);
* **pooled** -- the same contrasts averaged over tasks (each task weighs the same) per length.

Intervals are percentile bootstraps over **haystacks**, not prompts: the depths of a trial share their
haystack span (:func:`posheads.data.tasks.suite_prompts`), so the prompts of one trial are resampled together
(a cluster bootstrap; with one prompt per trial it is the ordinary bootstrap). Pooled intervals resample
within each task (stratified). A prompt counts only where every condition compared has its record (a run cut
off mid-cell contributes the prompts it finished). Accuracy also carries its Wilson interval over prompts,
which ignores the clustering and is given for reference only.

No Lightning or W&B::

    python -m posheads.eval.retrieval_summary RUN_DIR [--out DIR]   # summary.json, tables.md, two PNGs
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from posheads.data.retrieval import derive_seed
from posheads.eval.intervals import (
    DEFAULT_BOOT,
    DEFAULT_LEVEL,
    bootstrap_indices,
    percentile_interval,
    wilson_interval,
)
from posheads.eval.sweep import CONTROLS, own_controls

__all__ = [
    "attach_trials",
    "load_suite_records",
    "main",
    "summarize",
    "summarize_run",
    "summary_tables",
]

#: Per prompt: the answer's log-probability (nats, summed over its tokens), exact match (0/1) and the
#: log-probability per answer token (comparable across tasks whose answers differ in length).
METRICS = ("logprob", "correct", "token_logprob")


def load_suite_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The teacher-forced suite records of ``run_dir/trials.jsonl`` (greedy passkey / needle records and a
    last line cut off by an interruption are skipped)."""
    path = Path(run_dir) / "trials.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("section") == "retrieval" or ("difficulty" in rec and "logprob" in rec):
            out.append(rec)
    return out


def attach_trials(records: Sequence[dict[str, Any]], seed: int, trials: int) -> list[dict[str, Any]]:
    """Each record with its ``trial`` index: the depths of one trial share a haystack, so ``(task, length,
    trial)`` is the resampling unit. Records written before the index was recorded get it back from their
    seed (the prompt's ``derive_seed(task, seed, length, level, trial)`` or, for needle, the haystack's
    ``derive_seed("haystack", task, seed, length, trial)``; :func:`posheads.data.tasks.suite_prompts`).
    Raises when a seed matches no trial of the protocol."""
    cache: dict[tuple[Any, ...], dict[int, int]] = {}
    out = []
    for rec in records:
        if int(rec.get("trial", -1)) >= 0:
            out.append(dict(rec))
            continue
        level = rec["depth"] if rec.get("depth") is not None else rec.get("difficulty")
        key = (rec["task"], rec["length"], level)
        if key not in cache:
            task, length = rec["task"], rec["length"]
            cache[key] = {derive_seed(task, seed, length, level, t): t for t in range(trials)}
            cache[key].update({derive_seed("haystack", task, seed, length, t): t for t in range(trials)})
        t = cache[key].get(int(rec["seed"]))
        if t is None:
            raise ValueError(
                f"trial record of {rec['task']} L={rec['length']} level={level} has seed {rec['seed']}, which is "
                f"no trial of retrieval.seed={seed}, retrieval.trials={trials}"
            )
        out.append(dict(rec, trial=t))
    return out


def _prompt_key(rec: Mapping[str, Any]) -> tuple[Any, ...]:
    return (rec.get("depth"), rec.get("difficulty"), rec["trial"])


class _Cell:
    """The records of one (task, length): per condition, per prompt, the two metrics; the haystack of each."""

    def __init__(self, recs: Sequence[Mapping[str, Any]]):
        self.values: dict[str, dict[tuple[Any, ...], tuple[float, float, float]]] = defaultdict(dict)
        for r in recs:
            n_tokens = max(1, len(r.get("ranks") or ()))
            lp = float(r["logprob"])
            self.values[r["condition"]][_prompt_key(r)] = (lp, float(bool(r["correct"])), lp / n_tokens)
        self.conditions = list(self.values)

    def paired(self, conditions: Sequence[str]) -> tuple[list[tuple[Any, ...]], dict[str, np.ndarray]]:
        """Prompts every one of ``conditions`` has, and ``{condition: [n, 3]}`` (:data:`METRICS`)."""
        keys = sorted(set.intersection(*(set(self.values[c]) for c in conditions)), key=repr)
        return keys, {c: np.asarray([self.values[c][k] for k in keys], dtype=np.float64) for c in conditions}


def _cluster_boot(values: np.ndarray, clusters: Sequence[Any], n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap means of ``values`` (``[n, m]``) resampling whole clusters: ``[n_boot, m]``."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
    g = np.asarray([ids[c] for c in clusters])
    sums = np.zeros((len(ids), values.shape[1]))
    np.add.at(sums, g, values)
    counts = np.bincount(g, minlength=len(ids)).astype(np.float64)
    if len(ids) < 2:  # one haystack: nothing to resample (no interval rather than a zero-width one)
        return np.full((n_boot, values.shape[1]), np.nan)
    idx = bootstrap_indices(len(ids), n_boot, seed)  # [B, k]
    return sums[idx].sum(axis=1) / counts[idx].sum(axis=1)[:, None]


def _interval(point: float, boot: np.ndarray, level: float) -> dict[str, Any]:
    if boot.size < 2 or not np.isfinite(boot).all():
        return {"value": point, "lo": None, "hi": None}
    lo, hi = percentile_interval(boot, level)
    return {"value": point, "lo": lo, "hi": hi}


def _diff_stats(
    a: np.ndarray, b: np.ndarray, clusters: Sequence[Any], n_boot: int, seed: int, level: float
) -> tuple[dict[str, Any], np.ndarray]:
    """Paired mean of ``a - b`` (``[n, 3]``: :data:`METRICS`) with its cluster-bootstrap interval."""
    d = a - b
    boot = _cluster_boot(d, clusters, n_boot, seed)
    point = d.mean(axis=0)
    return (
        {m: _interval(float(point[i]), boot[:, i], level) for i, m in enumerate(METRICS)},
        boot,
    )


def summarize(
    records: Sequence[dict[str, Any]],
    *,
    n_boot: int = DEFAULT_BOOT,
    seed: int = 0,
    level: float = DEFAULT_LEVEL,
) -> dict[str, Any]:
    """Cells, contrasts and pooled contrasts (see the module doc) from records that carry ``trial``
    (:func:`attach_trials`)."""
    by: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by[(r["task"], int(r["length"]))].append(r)
    tasks = list(dict.fromkeys(r["task"] for r in records))
    cells_out: list[dict[str, Any]] = []
    contrasts_out: list[dict[str, Any]] = []
    boots: dict[tuple[int, str, str], dict[str, np.ndarray]] = defaultdict(dict)  # (length, set, vs) -> task
    for (task, length), recs in sorted(by.items(), key=lambda kv: (kv[0][1], tasks.index(kv[0][0]))):
        cell = _Cell(recs)
        # each (task, length) its own resampling stream (tasks are independent; one stream for all conditions
        # of a cell, so paired differences and the pooled average see the same resamples)
        cell_seed = derive_seed("retrieval_summary", seed, task, length) % (2**32)
        for cond in cell.conditions:
            with_none = [cond, "none"] if cond != "none" and "none" in cell.values else [cond]
            keys, vals = cell.paired(with_none)
            if not keys:
                continue
            clusters = [k[2] for k in keys]
            v = vals[cond]
            boot = _cluster_boot(v, clusters, n_boot, cell_seed)
            correct = int(v[:, 1].sum())
            wlo, whi = wilson_interval(correct, len(keys), level)
            row: dict[str, Any] = {
                "task": task,
                "length": length,
                "condition": cond,
                "prompts": len(keys),
                "haystacks": len(set(clusters)),
                "correct": correct,
                "accuracy": _interval(float(v[:, 1].mean()), boot[:, 1], level),
                "accuracy_wilson": [wlo, whi],
                "logprob": _interval(float(v[:, 0].mean()), boot[:, 0], level),
                "token_logprob": _interval(float(v[:, 2].mean()), boot[:, 2], level),
            }
            if len(with_none) == 2:
                diff, _ = _diff_stats(v, vals["none"], clusters, n_boot, cell_seed, level)
                row["minus_none"] = diff
            cells_out.append(row)
        for pos in cell.conditions:
            if pos.partition(":")[0] not in CONTROLS:  # not a Positional set
                continue
            versus: dict[str, list[str]] = {"none": ["none"]} if "none" in cell.values else {}
            versus.update(own_controls(pos, cell.conditions))
            for vs, members in versus.items():
                keys, vals = cell.paired([pos, *members])
                if not keys:
                    continue
                clusters = [k[2] for k in keys]
                ctrl = np.mean([vals[c] for c in members], axis=0)  # [n, 3]
                diff, boot = _diff_stats(vals[pos], ctrl, clusters, n_boot, cell_seed, level)
                per_seed = {
                    c: _diff_stats(vals[pos], vals[c], clusters, n_boot, cell_seed, level)[0] for c in members
                }
                contrasts_out.append(
                    {
                        "task": task,
                        "length": length,
                        "set": pos,
                        "versus": vs,
                        "controls": members,
                        "prompts": len(keys),
                        "haystacks": len(set(clusters)),
                        **diff,
                        "per_control": per_seed if len(members) > 1 else {},
                        "below_every_control_logprob": all(
                            per_seed[c]["logprob"]["value"] < 0 for c in members
                        ),
                    }
                )
                boots[(length, pos, vs)][task] = boot
    pooled = []
    for (length, pos, vs), per_task in boots.items():
        stacked = np.stack(list(per_task.values()))  # [T, B, 3]: the tasks' bootstrap means, independent
        point = [c for c in contrasts_out if (c["length"], c["set"], c["versus"]) == (length, pos, vs)]
        mean = {m: float(np.mean([c[m]["value"] for c in point])) for m in METRICS}
        pooled.append(
            {
                "length": length,
                "set": pos,
                "versus": vs,
                "tasks": list(per_task),
                "prompts": sum(c["prompts"] for c in point),
                **{
                    m: _interval(mean[m], stacked[:, :, i].mean(axis=0), level) for i, m in enumerate(METRICS)
                },
            }
        )
    return {
        "cells": cells_out,
        "contrasts": contrasts_out,
        "pooled": pooled,
        "n_boot": n_boot,
        "seed": seed,
        "level": level,
        "method": "percentile bootstrap over haystacks (the depths of a trial resampled together); pooled: "
        "stratified by task, tasks weighted equally; differences paired on the same prompts",
    }


def summarize_run(
    run_dir: str | Path, *, long_context: bool = True, lengths: Sequence[int] | None = None, **kw: Any
) -> dict[str, Any]:
    """:func:`summarize` of a run directory (its ``results.json`` protocol gives the suite's seed and trials);
    with ``long_context``, also the intervals of its long-context-sensitive perplexity
    (:func:`posheads.eval.longctx.long_context_intervals`; evaluate.py stores those on their own).
    ``lengths``: only the suite records of these lengths (e.g. leave out a length a stopped run had begun)."""
    from posheads.eval.longctx import long_context_intervals
    from posheads.eval.results import load_results

    data = load_results(run_dir)
    proto = data["protocol"]
    suite = proto.get("retrieval") or {}
    records = [r for r in load_suite_records(run_dir) if lengths is None or int(r["length"]) in lengths]
    out: dict[str, Any] = {"cells": [], "contrasts": [], "pooled": []}
    if records:
        out = summarize(attach_trials(records, int(suite.get("seed", 0)), int(suite.get("trials", 0))), **kw)
    if long_context and data.get("perplexity_lc"):
        lc_kw = {k: v for k, v in kw.items() if k in ("n_boot", "seed", "level")}
        out["perplexity_lc"] = long_context_intervals(data["perplexity_lc"], **lc_kw)
    out["protocol"] = {
        k: proto.get(k)
        for k in ("model", "name_or_path", "dtype", "scaling", "identification", "probes", "conditions")
    }
    out["protocol"]["retrieval"] = suite
    out["protocol"]["templates"] = proto.get("retrieval_templates")
    return out


def _fmt(iv: Mapping[str, Any], digits: int = 2, sign: bool = False) -> str:
    spec = f"{'+' if sign else ''}.{digits}f"
    if iv.get("lo") is None:
        return format(iv["value"], spec)
    return f"{iv['value']:{spec}} [{iv['lo']:{spec}}, {iv['hi']:{spec}}]"


def summary_tables(summary: Mapping[str, Any]) -> str:
    """Markdown: the cells table, the contrasts table and the pooled contrasts."""
    lines = [
        "Cells (pooled over depths / difficulties; 95 % bootstrap over haystacks; Δ = minus `none`, same prompts)",
        "",
        "| task | length | condition | n (haystacks) | exact match | Wilson | log p(answer) | Δ exact match | Δ log p |",
        "|---|---:|---|---:|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        d = c.get("minus_none")
        w = c["accuracy_wilson"]
        lines.append(
            f"| {c['task']} | {c['length']} | {c['condition']} | {c['prompts']} ({c['haystacks']}) | "
            f"{_fmt(c['accuracy'])} | [{w[0]:.2f}, {w[1]:.2f}] | {_fmt(c['logprob'])} | "
            f"{_fmt(d['correct'], sign=True) if d else '—'} | {_fmt(d['logprob'], sign=True) if d else '—'} |"
        )
    lines += [
        "",
        "Contrasts: Positional set minus `none` / minus the mean of its clean controls (per prompt)",
        "",
        "| task | length | set | versus | n | Δ exact match | Δ log p | Δ log p per token | Δ log p per control seed |",
        "|---|---:|---|---|---:|---|---|---|---|",
    ]
    for c in summary["contrasts"]:
        seeds = ", ".join(f"{k}: {v['logprob']['value']:+.2f}" for k, v in c["per_control"].items())
        lines.append(
            f"| {c['task']} | {c['length']} | {c['set']} | {c['versus']} | {c['prompts']} | "
            f"{_fmt(c['correct'], sign=True)} | {_fmt(c['logprob'], sign=True)} | "
            f"{_fmt(c['token_logprob'], sign=True)} | {seeds or '—'} |"
        )
    for lc in summary.get("perplexity_lc", []):
        lines += [
            "",
            f"Long-context-sensitive NLL at {lc['length']} ({lc['lc']['tokens']} of {lc['plain']['tokens']} tokens, "
            f"{lc['n_documents']} documents; paired document bootstrap), plain NLL beside it",
            "",
            "| condition | LC NLL | LC − none | LC − own controls | plain NLL | plain − none | plain − own controls |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, c in lc["lc"]["conditions"].items():
            p = lc["plain"]["conditions"][name]
            cells = []
            for x in (c, p):
                nll = {"value": x["nll"], "lo": x["lo"], "hi": x["hi"]}
                ctrl = [v for k, v in x.items() if k.startswith("minus_") and k != "minus_none"]
                cells += [
                    _fmt(nll),
                    _fmt(x["minus_none"], sign=True) if "minus_none" in x else "—",
                    "; ".join(_fmt(v, sign=True) for v in ctrl) or "—",
                ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Pooled over tasks (each task weighs the same; bootstrap stratified by task)",
        "",
        "| length | set | versus | tasks | n | Δ exact match | Δ log p | Δ log p per token |",
        "|---:|---|---|---:|---:|---|---|---|",
    ]
    for p in summary["pooled"]:
        lines.append(
            f"| {p['length']} | {p['set']} | {p['versus']} | {len(p['tasks'])} | {p['prompts']} | "
            f"{_fmt(p['correct'], sign=True)} | {_fmt(p['logprob'], sign=True)} | "
            f"{_fmt(p['token_logprob'], sign=True)} |"
        )
    return "\n".join(lines) + "\n"


def plot_summary(summary: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """``retrieval_accuracy.png`` (task @ length x condition exact match, annotated) and
    ``retrieval_contrasts.png`` (Δ log p of each set vs ``none`` and vs its controls, with intervals)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    paths = []
    cells = summary["cells"]
    if cells:
        rows = list(dict.fromkeys(f"{c['task']} @{c['length']}" for c in cells))
        conds = list(dict.fromkeys(c["condition"] for c in cells))
        grid = np.full((len(rows), len(conds)), np.nan)
        for c in cells:
            grid[rows.index(f"{c['task']} @{c['length']}"), conds.index(c["condition"])] = c["accuracy"][
                "value"
            ]
        fig, ax = plt.subplots(figsize=(1.1 * len(conds) + 2.5, 0.45 * len(rows) + 1.8))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(rows)):
            for j in range(len(conds)):
                if math.isfinite(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 0.6 else "black")  # fmt: skip
        ax.set_xticks(range(len(conds)), conds, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=8)
        n = min(c["prompts"] for c in cells)
        ax.set_title(f"teacher-forced exact match (>= {n} prompts per cell)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        paths.append(out / "retrieval_accuracy.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    cons = summary["contrasts"]
    if cons:
        labels = [f"{c['task']} @{c['length']}" for c in cons]
        ylabels = list(dict.fromkeys(labels))
        series = list(dict.fromkeys((c["set"], c["versus"]) for c in cons))
        fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(ylabels) + 1.8))
        for s_i, (pos, vs) in enumerate(series):
            off = (s_i - (len(series) - 1) / 2) * 0.8 / max(1, len(series))
            mine = [(c, lab) for c, lab in zip(cons, labels) if (c["set"], c["versus"]) == (pos, vs)]
            ys = [ylabels.index(lab) + off for _, lab in mine]
            ivs = [c["logprob"] for c, _ in mine]
            xs = [iv["value"] for iv in ivs]
            err = [[x - (iv["lo"] if iv["lo"] is not None else x) for x, iv in zip(xs, ivs)],
                   [(iv["hi"] if iv["hi"] is not None else x) - x for x, iv in zip(xs, ivs)]]  # fmt: skip
            ax.errorbar(xs, ys, xerr=err, fmt="o", ms=3, color=f"C{s_i}", label=f"{pos} − {vs}")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("Δ log p(answer), nats (95 % bootstrap over haystacks)")
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / "retrieval_contrasts.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Summary of a retrieval-suite run (cells, contrasts, pooled).")
    ap.add_argument("run_dir", help="an evaluation run directory (results.json + trials.jsonl)")
    ap.add_argument(
        "--out", default=None, help="where to write summary.json, tables.md, PNGs (default: run_dir)"
    )
    ap.add_argument("--n-boot", type=int, default=DEFAULT_BOOT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", type=int, nargs="*", default=None, help="only these suite lengths")
    args = ap.parse_args(argv)
    out = Path(args.out or args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize_run(args.run_dir, n_boot=args.n_boot, seed=args.seed, lengths=args.lengths)
    if args.lengths is not None:
        summary["lengths"] = args.lengths
    from posheads.atomic import atomic_write_json, atomic_write_text

    atomic_write_json(out / "summary.json", summary, indent=1)
    tables = summary_tables(summary)
    atomic_write_text(out / "tables.md", tables)
    paths = plot_summary(summary, out)
    print(tables)
    print(f"written: {out / 'summary.json'}, {out / 'tables.md'}, {[p.name for p in paths]}")


if __name__ == "__main__":
    main()
