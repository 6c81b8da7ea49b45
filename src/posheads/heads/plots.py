"""PNG plots of a :class:`~posheads.heads.identify.HeadAnalysis` (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from posheads.plotting import pyplot

if TYPE_CHECKING:
    from posheads.heads.identify import HeadAnalysis

__all__ = [
    "plot_hda_curves",
    "plot_pair_profile",
    "plot_score_heatmap",
    "plot_sink_heatmap",
    "save_all_plots",
]


def _bin_labels(analysis: HeadAnalysis) -> list[str]:
    return ["0" if lo == 0 else f"{lo}" for lo, _ in analysis.bin_edges()]


def _head_heatmap(
    analysis: HeadAnalysis,
    values: Any,
    path: str | Path,
    title: str,
    *,
    cmap: str,
    edge: str,
    fontsize: int,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Layer x head heat-map of ``values`` with the Positional Heads outlined in ``edge``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * analysis.num_heads, 1.0 + 0.28 * analysis.num_layers))
    im = ax.imshow(values, aspect="auto", cmap=cmap, origin="lower", vmin=vmin, vmax=vmax)
    for layer, head in analysis.positional_heads():
        ax.add_patch(
            plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=edge, linewidth=1.5)
        )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=fontsize)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_score_heatmap(analysis: HeadAnalysis, path: str | Path) -> Path:
    """Layer x head heat-map of the ranking value (score, or ``score - null``); Positional Heads outlined."""
    what = "score - null" if analysis.config.rank_by == "excess" else "score"
    title = f"{analysis.config.score}: {what}, sink_keys={analysis.config.sink_keys} (red: Positional Heads)"
    return _head_heatmap(
        analysis, analysis.ranking.numpy(), path, title, cmap="viridis", edge="red", fontsize=9
    )


def plot_sink_heatmap(analysis: HeadAnalysis, path: str | Path) -> Path:
    """Layer x head heat-map of the attention share on the first key(s) (the sink share); Positional Heads
    outlined."""
    assert analysis.sink_share is not None
    keys = analysis.stats.sink_positions
    first = "key 0" if keys == 1 else f"keys 0..{keys - 1}"
    title = (
        f"attention share on {first} ({int(float(analysis.stats.rows))} query rows; "
        f"sink_keys={analysis.config.sink_keys}; cyan: Positional Heads)"
    )
    return _head_heatmap(
        analysis,
        analysis.sink_share.numpy(),
        path,
        title,
        cmap="magma",
        edge="cyan",
        fontsize=8,
        vmin=0.0,
        vmax=1.0,
    )


def plot_hda_curves(analysis: HeadAnalysis, path: str | Path) -> Path:
    """HDA against distance bin: every Positional Head, and the mean (with quartile band) of the others."""
    plt = pyplot()
    curves = analysis.hda.numpy()
    nb = curves.shape[-1]
    x = list(range(nb))
    fig, ax = plt.subplots(figsize=(7, 4))
    mask = analysis.positional.numpy()
    others = curves[~mask]
    if others.size:
        o = torch.from_numpy(others)
        q = torch.nanquantile(o, torch.tensor([0.25, 0.5, 0.75], dtype=o.dtype), dim=0).numpy()
        ax.fill_between(x, q[0], q[2], color="grey", alpha=0.25, label="other heads (IQR)")
        ax.plot(x, q[1], color="grey", linestyle="--", label="other heads (median)")
    for layer, head in analysis.positional_heads():
        ax.plot(x, curves[layer, head], alpha=0.8, linewidth=1, label=f"L{layer}H{head}")
    ax.axhline(analysis.config.tau, color="black", linewidth=0.6, linestyle=":")
    ax.set_xticks(x)
    ax.set_xticklabels(_bin_labels(analysis), rotation=45, fontsize=7)
    ax.set_xlabel("distance (bin start, tokens)")
    ax.set_ylabel(f"HDA ({analysis.config.hda_variant}, i >= i_c = {analysis.i_c})")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pair_profile(analysis: HeadAnalysis, path: str | Path, head: tuple[int, int] | None = None) -> Path:
    """Per-pair contribution profile of one head by distance: attention-weighted mean ``g_i`` and the share of
    attention whose dominant pair is ``i``, pairs x distance bins."""
    plt = pyplot()
    if head is None:
        head = analysis.config.profile_head
    if head is None:
        flat = torch.nan_to_num(analysis.ranking, nan=float("-inf")).flatten()
        idx = int(flat.argmax())
        head = (idx // analysis.num_heads, idx % analysis.num_heads)
    layer, h = head
    if not (0 <= layer < analysis.num_layers and 0 <= h < analysis.num_heads):
        raise ValueError(
            f"profile head {head} out of range [{analysis.num_layers} layers, {analysis.num_heads} heads]"
        )
    st = analysis.stats
    mass = st.moments[1, layer, h, :, 0, 0].clamp(min=1e-30)  # [NB]
    mean_g = (st.g[1, layer, h] / mass.unsqueeze(-1)).T.numpy()  # [P, NB]
    dom_share = (st.dom[1, layer, h] / mass.unsqueeze(-1)).T.numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, data, title, cmap in (
        (axes[0], mean_g, "attention-weighted mean g_i", "coolwarm"),
        (axes[1], dom_share, "share of attention with D = i", "magma"),
    ):
        if cmap == "coolwarm":
            lim = float(abs(data).max()) or 1.0
            im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=-lim, vmax=lim)
        else:
            im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=0, vmax=1)
        i_c = analysis.i_c[layer] if isinstance(analysis.i_c, list) else analysis.i_c  # per layer (Gemma 3)
        ax.axhline(i_c - 0.5, color="white" if cmap == "magma" else "black", linewidth=1, linestyle="--")
        ax.set_xticks(range(data.shape[1]))
        ax.set_xticklabels(_bin_labels(analysis), rotation=45, fontsize=7)
        ax.set_xlabel("distance (bin start, tokens)")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax)
    axes[0].set_ylabel("RoPE pair i (low -> high dimension)")
    layer_i_c = analysis.i_c[layer] if isinstance(analysis.i_c, list) else analysis.i_c
    fig.suptitle(f"layer {layer} head {h} (i_c = {layer_i_c}, dashed)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_all_plots(analysis: HeadAnalysis, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    return {
        "heatmap": plot_score_heatmap(analysis, out / "scores_heatmap.png"),
        "sink_heatmap": plot_sink_heatmap(analysis, out / "sink_share_heatmap.png"),
        "hda": plot_hda_curves(analysis, out / "hda_curves.png"),
        "profile": plot_pair_profile(analysis, out / "pair_profile.png"),
    }
