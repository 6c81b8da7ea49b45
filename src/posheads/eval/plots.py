"""Plots and the printed summary of a ``results.json`` (matplotlib, Agg backend; no display needed).

* ``perplexity.png`` -- two panels against length: perplexity, and the NLL difference from ``none``
  (nats/token), one line per condition family with its document-bootstrap interval
  (``results["perplexity_intervals"]``, :func:`posheads.eval.perplexity.perplexity_intervals`) as error
  bars; a family with several members (the random controls, one per seed) is drawn as the mean over its
  members with the interval of that mean as a band. Results without intervals fall back to a min-max
  band over the members.
* ``passkey.png`` / ``needle.png`` -- one length x depth accuracy heat-map per condition (the random
  family also gets a panel with the mean over seeds).

:func:`summary_tables` formats the same numbers as text tables: perplexity with intervals and document
counts, the NLL differences from ``none`` and the Positional - control contrasts with intervals, and
retrieval accuracy with Wilson intervals and trial counts.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from posheads.eval.intervals import wilson_interval
from posheads.plotting import pyplot

__all__ = [
    "condition_families",
    "plot_perplexity",
    "plot_results",
    "plot_retrieval",
    "summary_tables",
]


def condition_families(results: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{family: [condition names]}`` in first-seen order (from ``results["conditions"]``; a condition not
    listed there is its own family)."""
    families: dict[str, list[str]] = {}
    listed = {c["name"]: c.get("family", c["name"]) for c in results.get("conditions", [])}
    names: list[str] = [c["name"] for c in results.get("conditions", [])]
    for section in ("perplexity", "passkey", "needle"):
        for row in results.get(section, []):
            if row["condition"] not in names:
                names.append(row["condition"])
    for name in names:
        families.setdefault(listed.get(name, name), []).append(name)
    return families


def _interval_series(
    results: Mapping[str, Any], family: str, members: Sequence[str], delta: bool
) -> dict[int, tuple[float, float, float]]:
    """``{length: (value, lo, hi)}`` of a family from ``perplexity_intervals``: PPL (``delta=False``) or the
    NLL difference from ``none``; a multi-member family uses the interval of its members' mean."""
    out: dict[int, tuple[float, float, float]] = {}
    for length, at in ((results.get("perplexity_intervals") or {}).get("lengths") or {}).items():
        conds, contrasts = at.get("conditions", {}), at.get("contrasts", {})
        if len(members) == 1:
            m = members[0]
            if delta:
                k = contrasts.get(f"{m} - none")
                if k is not None:
                    out[int(length)] = (k["value"], k["lo"], k["hi"])
                elif m == "none" and m in conds:
                    out[int(length)] = (0.0, 0.0, 0.0)
            elif m in conds:
                c = conds[m]
                out[int(length)] = (c["ppl"], c["ppl_lo"], c["ppl_hi"])
        else:
            if not all(m in conds for m in members):
                continue
            k = contrasts.get(f"mean({family}) - none" if delta else f"mean({family})")
            if k is None:
                continue
            if delta:
                out[int(length)] = (k["value"], k["lo"], k["hi"])
            else:
                out[int(length)] = (math.exp(k["value"]), math.exp(k["lo"]), math.exp(k["hi"]))
    return out


def plot_perplexity(results: Mapping[str, Any], path: str | os.PathLike) -> Path | None:
    """PPL and NLL - NLL(none) against length per condition family, with document-bootstrap intervals."""
    rows = results.get("perplexity", [])
    if not rows:
        return None
    plt = pyplot()
    ppl: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r.get("ppl") is not None:
            ppl[r["condition"]][int(r["length"])] = float(r["ppl"])
    has_iv = bool((results.get("perplexity_intervals") or {}).get("lengths"))
    fig, axes = plt.subplots(1, 2 if has_iv else 1, figsize=(13 if has_iv else 7, 5), squeeze=False)
    level = (results.get("perplexity_intervals") or {}).get("level", 0.95)
    families = [(f, [m for m in ms if m in ppl]) for f, ms in condition_families(results).items()]
    families = [(f, ms) for f, ms in families if ms]
    cmap = plt.get_cmap("tab20")
    for index, (family, members) in enumerate(families):
        # one colour and marker per family, the same in both panels (tab20 x 3 markers: 60 families)
        style: dict[str, Any] = {"color": cmap(index % 20), "marker": "osD"[(index // 20) % 3]}
        for ax, delta in zip(axes[0], (False, True)):
            label = family if len(members) == 1 else f"{family} (mean of {len(members)})"
            series = _interval_series(results, family, members, delta) if has_iv else {}
            if series:
                xs = sorted(series)
                ys = [series[x][0] for x in xs]
                lo = [series[x][0] - series[x][1] for x in xs]
                hi = [series[x][2] - series[x][0] for x in xs]
                if len(members) == 1:
                    ax.errorbar(xs, ys, yerr=[lo, hi], ms=3, capsize=3, label=label, **style)
                else:
                    (line,) = ax.plot(xs, ys, ms=3, label=label + ", band: its interval", **style)
                    ax.fill_between(
                        xs,
                        [series[x][1] for x in xs],
                        [series[x][2] for x in xs],
                        color=line.get_color(),
                        alpha=0.2,
                    )
                continue
            if delta:
                continue
            lengths = sorted(set().union(*(ppl[m] for m in members)))
            if len(members) == 1:
                ax.plot(lengths, [ppl[members[0]].get(L, math.nan) for L in lengths], label=family, **style)
                continue
            per_len = [[ppl[m][L] for m in members if L in ppl[m]] for L in lengths]
            mean = [sum(v) / len(v) if v else math.nan for v in per_len]
            (line,) = ax.plot(lengths, mean, label=f"{label}, band min-max", **style)
            ax.fill_between(
                lengths,
                [min(v) for v in per_len],
                [max(v) for v in per_len],
                color=line.get_color(),
                alpha=0.2,
            )
    all_lengths = sorted({int(r["length"]) for r in rows})
    proto = results.get("protocol", {})
    docs = sorted({(int(r["length"]), int(r.get("documents", 0))) for r in rows})
    n_docs = ", ".join(f"{L}: {n}" for L, n in dict(docs).items())
    for ax, delta in zip(axes[0], (False, True)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_lengths, [str(L) for L in all_lengths])
        ax.minorticks_off()
        ax.set_xlabel(f"window length (tokens); documents per length {n_docs}")
        ax.grid(True, which="both", alpha=0.3)
        if delta:
            ax.axhline(0.0, color="k", lw=0.8)
            ax.set_ylabel("NLL - NLL(none) (nats/token)")
            ax.set_title(f"Difference from no ablation, {level:.0%} document-bootstrap intervals", fontsize=9)
        else:
            ax.set_yscale("log")
            ax.set_ylabel("perplexity")
            suffix = f", {level:.0%} document-bootstrap intervals" if has_iv else ""
            ax.set_title(f"Perplexity by length -- {proto.get('model', '')}{suffix}", fontsize=9)
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _grid(
    rows: Sequence[Mapping[str, Any]], names: Sequence[str]
) -> tuple[list[int], list[float], list[list[float]]]:
    """Mean accuracy over ``names`` per (depth, length): ``(lengths, depths, [depth][length])``."""
    cells: dict[tuple[float, int], list[float]] = defaultdict(list)
    for r in rows:
        if r["condition"] in names:
            cells[(float(r["depth"]), int(r["length"]))].append(float(r["accuracy"]))
    lengths = sorted({k[1] for k in cells})
    depths = sorted({k[0] for k in cells})
    grid = [
        [sum(cells[(d, L)]) / len(cells[(d, L)]) if cells.get((d, L)) else math.nan for L in lengths]
        for d in depths
    ]
    return lengths, depths, grid


def plot_retrieval(results: Mapping[str, Any], task: str, path: str | os.PathLike) -> Path | None:
    """Length x depth accuracy heat-maps, one panel per condition (plus the mean of multi-member families)."""
    rows = results.get(task, [])
    if not rows:
        return None
    plt = pyplot()
    panels: list[tuple[str, list[str]]] = []
    present = {r["condition"] for r in rows}
    for family, members in condition_families(results).items():
        members = [m for m in members if m in present]
        panels.extend((m, [m]) for m in members)
        if len(members) > 1:
            panels.append((f"{family} (mean of {len(members)})", members))
    n = len(panels)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.2 * cols + 1.0, 2.6 * nrows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (title, members) in zip(axes.flat, panels):
        lengths, depths, grid = _grid(rows, members)
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel("depth", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="accuracy")
    fig.suptitle(f"{task} accuracy (length x depth)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _axis(rows: Sequence[Mapping[str, Any]]) -> str:
    return "difficulty" if any(r.get("depth") is None for r in rows) else "depth"


def plot_suite(results: Mapping[str, Any], task: str, path: str | os.PathLike) -> Path | None:
    """Length x depth (or x difficulty) heat-maps of one suite task's teacher-forced accuracy, one panel per
    condition (families with several members pooled: correct and trials summed); each cell shows the accuracy,
    its Wilson interval and ``n``."""
    from posheads.eval.intervals import wilson_interval

    rows = [r for r in results.get("retrieval", []) if r["task"] == task]
    if not rows:
        return None
    plt = pyplot()
    axis = _axis(rows)
    present = {r["condition"] for r in rows}
    panels: list[tuple[str, list[str]]] = []
    for family, members in condition_families(results).items():
        members = [m for m in members if m in present]
        if len(members) > 1:
            panels.append((f"{family} (pooled {len(members)})", members))
        elif members:
            panels.append((members[0], members))
    n = len(panels)
    cols = min(4, n)
    nrows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(3.4 * cols + 1.0, 2.8 * nrows + 0.6), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (title, members) in zip(axes.flat, panels):
        cells: dict[tuple[Any, int], list[int]] = defaultdict(lambda: [0, 0])
        for r in rows:
            if r["condition"] in members:
                c = cells[(r[axis], int(r["length"]))]
                c[0] += int(r["correct"])
                c[1] += int(r["trials"])
        lengths = sorted({k[1] for k in cells})
        levels = sorted({k[0] for k in cells})
        grid = [
            [cells[(v, L)][0] / cells[(v, L)][1] if (v, L) in cells else math.nan for L in lengths]
            for v in levels
        ]
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_yticks(range(len(levels)), [f"{v:g}" for v in levels], fontsize=7)
        for i, v in enumerate(levels):
            for j, L in enumerate(lengths):
                if (v, L) in cells:
                    k, t = cells[(v, L)]
                    lo, hi = wilson_interval(k, t)
                    ax.text(
                        j, i, f"{k / t:.2f}\n[{lo:.2f},{hi:.2f}]\nn={t}", ha="center", va="center", fontsize=6
                    )
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("length", fontsize=7)
        ax.set_ylabel(axis, fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="exact match (teacher forced)")
    fig.suptitle(f"{task}: accuracy (length x {axis}), 95% Wilson intervals", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_results(results: Mapping[str, Any], output_dir: str | os.PathLike) -> list[Path]:
    """Every plot that the results support, written into ``output_dir``; returns the paths written."""
    out = Path(output_dir)
    written = [plot_perplexity(results, out / "perplexity.png")]
    for task in ("passkey", "needle"):
        written.append(plot_retrieval(results, task, out / f"{task}.png"))
    for task in sorted({r["task"] for r in results.get("retrieval", [])}):
        written.append(plot_suite(results, task, out / f"retrieval_{task}.png"))
    summary = results.get("retrieval_summary") or {}
    if summary.get("cells"):
        from posheads.eval.retrieval_summary import plot_summary

        written += plot_summary(summary, out)
    return [p for p in written if p is not None]


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(
            str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in body)])


def summary_tables(results: Mapping[str, Any]) -> str:
    """Text tables: perplexity (condition x length) and retrieval accuracy (condition x length, mean over
    depths, with the trial count)."""
    parts: list[str] = []
    heads = results.get("heads_summary") or {}
    if heads.get("positional_heads") is not None:
        pos = heads["positional_heads"]
        counts = heads.get("per_layer_counts") or []
        layers = ", ".join(f"L{i}:{c}" for i, c in enumerate(counts) if c)
        parts.append(
            f"Positional Heads ({len(pos)}; score {heads.get('score')}, i_c = {heads.get('i_c')}): "
            + " ".join(f"{a}.{b}" for a, b in pos)
            + (f"\nper layer: {layers}" if layers else "")
        )
    order = [m for members in condition_families(results).values() for m in members]
    ppl_rows = results.get("perplexity", [])
    intervals = (results.get("perplexity_intervals") or {}).get("lengths") or {}
    if ppl_rows:
        lengths = sorted({int(r["length"]) for r in ppl_rows})
        cell = {(r["condition"], int(r["length"])): r for r in ppl_rows}

        def ppl_cell(name: str, L: int) -> str:
            if (name, L) not in cell:
                return "-"
            c = (intervals.get(str(L)) or {}).get("conditions", {}).get(name)
            if c is None:
                return f"{cell[(name, L)]['ppl']:.3f}"
            return f"{c['ppl']:.3f} [{c['ppl_lo']:.3f}, {c['ppl_hi']:.3f}]"

        body = [
            [name] + [ppl_cell(name, L) for L in lengths]
            for name in order
            if any((name, L) in cell for L in lengths)
        ]

        def per_length(key: str) -> list[str]:
            out = []
            for L in lengths:
                values = sorted({int(r[key]) for r in ppl_rows if int(r["length"]) == L})
                out.append("/".join(str(v) for v in values))
            return out

        level = (results.get("perplexity_intervals") or {}).get("level", 0.95)
        title = "Perplexity" + (f" [{level:.0%} document-bootstrap interval]" if intervals else "")
        parts.append(
            title
            + "\n"
            + _table(
                ["condition"] + [str(L) for L in lengths],
                body + [["tokens", *per_length("tokens")], ["documents", *per_length("documents")]],
            )
        )
        if intervals:
            names: list[str] = []
            for at in intervals.values():
                for k in at.get("contrasts", {}):
                    if k not in names and not (k.startswith("mean(") and " - " not in k):
                        names.append(k)

            def k_cell(name: str, L: int) -> str:
                k = (intervals.get(str(L)) or {}).get("contrasts", {}).get(name)
                return "-" if k is None else f"{k['value']:+.4f} [{k['lo']:+.4f}, {k['hi']:+.4f}]"

            deltas = [n for n in names if n.endswith(" - none")]
            others = [n for n in names if not n.endswith(" - none")]
            for heading, chosen in (
                ("NLL difference from none, nats/token", deltas),
                ("Positional - control and dims_high - dims_low, nats/token (paired)", others),
            ):
                if chosen:
                    body = [[n] + [k_cell(n, L) for L in lengths] for n in chosen]
                    parts.append(
                        f"{heading} [{level:.0%} interval]\n"
                        + _table(["contrast"] + [str(L) for L in lengths], body)
                    )
    for task in ("passkey", "needle"):
        rows = results.get(task, [])
        if not rows:
            continue
        lengths = sorted({int(r["length"]) for r in rows})
        acc: dict[tuple[str, int], list[Any]] = defaultdict(list)
        for r in rows:
            acc[(r["condition"], int(r["length"]))].append(r)
        body = []
        for name in order:
            if not any((name, L) in acc for L in lengths):
                continue
            cells = []
            for L in lengths:
                rs = acc.get((name, L), [])
                trials = sum(r["trials"] for r in rs)
                correct = sum(r.get("correct", r["accuracy"] * r["trials"]) for r in rs)
                if trials:
                    lo, hi = wilson_interval(int(round(correct)), int(trials))
                    cells.append(f"{correct / trials:.2f} [{lo:.2f}, {hi:.2f}] ({trials})")
                else:
                    cells.append("-")
            body.append([name, *cells])
        parts.append(
            f"{task} accuracy (mean over depths [95% Wilson interval]; trials)\n"
            + _table(["condition"] + [str(L) for L in lengths], body)
        )
    lc = results.get("perplexity_lc", [])
    if lc:
        body = [
            [r["condition"], str(r["length"]), f"{r['ppl']:.3f}",
             "-" if r.get("ppl_lc") is None else f"{r['ppl_lc']:.3f}", str(r["tokens_lc"]),
             str(r["tokens"]), f"{r['fraction']:.3f}"]
            for r in sorted(lc, key=lambda r: (r["length"], order.index(r["condition"]) if r["condition"] in order else 99))
        ]  # fmt: skip
        r0 = lc[0]
        parts.append(
            f"Long-context-sensitive perplexity (gain over a {r0['short']}-token context > {r0['threshold']:g} nats, "
            "tokens chosen on the unablated model)\n"
            + _table(["condition", "length", "PPL", "PPL lc", "lc tokens", "tokens", "fraction"], body)
        )
    suite = results.get("retrieval", [])
    if suite:
        parts.append(suite_table(suite, order))
    return "\n\n".join(parts)


def suite_table(rows: Sequence[Mapping[str, Any]], order: Sequence[str] = ()) -> str:
    """Retrieval suite per task x condition x length, pooled over depths / difficulties: accuracy with its
    Wilson interval and n, item accuracy, mean answer log-probability per token."""
    from posheads.eval.intervals import wilson_interval

    agg: dict[tuple[str, str, int], list[float]] = defaultdict(lambda: [0, 0, 0, 0, 0.0, 0])
    for r in rows:
        a = agg[(r["task"], r["condition"], int(r["length"]))]
        a[0] += int(r["correct"])
        a[1] += int(r["trials"])
        a[2] += int(r.get("items_correct", 0))
        a[3] += int(r.get("items", 0))
        a[4] += float(r["token_logprob"]) * int(r["trials"])
        a[5] += int(r["trials"])
    names = list(order) + sorted({r["condition"] for r in rows} - set(order))
    body = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for name in names:
            for L in sorted({int(r["length"]) for r in rows}):
                if (task, name, L) not in agg:
                    continue
                k, n, ik, iN, lp, m = agg[(task, name, L)]
                lo, hi = wilson_interval(int(k), int(n))
                body.append(
                    [task, name, str(L), f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]", str(int(n)),
                     f"{ik / iN:.3f}" if iN else "-", f"{lp / m:.3f}"]
                )  # fmt: skip
    return "Retrieval suite (teacher forced; pooled over depths / difficulties; 95% Wilson)\n" + _table(
        ["task", "condition", "length", "accuracy [95% CI]", "n", "item acc", "logp/token"], body
    )
