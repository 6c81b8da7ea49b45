"""PNG of a tracking timeline: HDA extension per tracked head and for the set average against optimizer steps,
with the long-length perplexity on a second axis. The per-evaluation images (score heat-map, HDA against
distance) are :mod:`posheads.heads.plots`' own."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from posheads.plotting import pyplot

__all__ = ["plot_timeline"]


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def plot_timeline(timeline: dict[str, Any], path: str | Path) -> Path:
    """Two panels against optimizer step: (top) HDA extension bin of every tracked head (thin) and their mean
    (thick), perplexity on the right axis; (bottom) HDA area of every tracked head (thin) and their mean (thick),
    and on the right axis the Jaccard overlap of the current Positional Heads with those of step 0 and the
    tracked set's mean attention share on the first key(s) (the sink share, not part of the statistics when
    ``sink_keys > 0``)."""
    plt = pyplot()
    evals = timeline.get("evaluations", [])
    steps = [e["step"] for e in evals]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name in timeline.get("tracked_heads", []):
        values = [_nan(e["heads"].get(name, {}).get("hda_extension_bin")) for e in evals]
        ax.plot(steps, values, linewidth=0.8, alpha=0.6, marker=".", label=name)
    mean = [_nan(e["tracked_set"]["extension_bin"]) for e in evals]
    ax.plot(steps, mean, color="black", linewidth=2.2, marker="o", label="tracked set (mean)")
    ax.set_ylabel("HDA extension (distance bin)")
    ax.set_title(f"Positional-Head HDA during fine-tuning (tau = {timeline.get('tau')})", fontsize=10)
    ppl = [_nan((e.get("ppl") or {}).get("ppl")) for e in evals]
    if any(math.isfinite(v) for v in ppl):
        axp = ax.twinx()
        axp.plot(steps, ppl, color="tab:red", linestyle="--", marker="x", label="perplexity")
        axp.set_ylabel(f"perplexity @ {timeline.get('probe', {}).get('length')} tokens", color="tab:red")
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) > 12:  # keep the legend readable for large sets
        handles, labels = handles[-1:], labels[-1:]
    ax.legend(handles, labels, fontsize=6, ncol=3, loc="best")
    for name in timeline.get("tracked_heads", []):
        values = [_nan(e["heads"].get(name, {}).get("hda_area")) for e in evals]
        ax2.plot(steps, values, linewidth=0.8, alpha=0.6, marker=".")
    area = [_nan(e["tracked_set"]["area"]) for e in evals]
    ax2.plot(steps, area, color="black", linewidth=2.2, marker="o", label="HDA area (tracked set mean)")
    ax2.set_ylabel("HDA area (octaves)")
    axj = ax2.twinx()
    axj.plot(
        steps,
        [_nan(e.get("jaccard_step0")) for e in evals],
        color="tab:green",
        marker="s",
        label="Jaccard vs step 0",
    )
    sink = [_nan(e["tracked_set"].get("sink_share")) for e in evals]
    if any(math.isfinite(v) for v in sink):
        keys = evals[-1].get("sink_keys") if evals else None
        axj.plot(
            steps, sink, color="tab:purple", marker="^", label=f"sink share (tracked set, sink_keys={keys})"
        )
        axj.legend(fontsize=6, loc="lower right")
    axj.set_ylim(-0.02, 1.02)
    axj.set_ylabel("Jaccard vs step 0 / sink share", color="tab:green")
    ax2.set_xlabel("optimizer step")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
