"""Identification of Positional Heads: one statistics pass, scores, null, selection and HDA, in one call.

``identify_positional_heads(model, sequences, cfg)`` is pure (no CLI parsing, no logging framework): it runs
the model over the probe set with a :class:`~posheads.heads.stats.PairStatsCollector` installed, then derives
everything from the accumulated :class:`~posheads.heads.stats.PairStats` with :func:`analyze` -- which other
code (a training callback merging statistics across processes) can call on its own sums.

Attention sinks (``HeadsConfig.sink_keys = k``): every statistic leaves out the keys at positions ``n < k``;
the same pass keeps their sums on the side, so :meth:`HeadAnalysis.with_sinks` is the complete analysis with
every key (``sink_keys = 0``: its own selection, null and HDA), and the table carries both scores and each
head's attention share on the first keys.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from posheads.heads.capture import attention_hooks, attention_modules
from posheads.heads.config import HeadsConfig
from posheads.heads.hda import critical_pair_for, hda_area, hda_curves, hda_extension, set_average
from posheads.heads.scores import (
    head_set,
    jaccard,
    per_layer_counts,
    positional_scores,
    select_heads,
    zscores,
)
from posheads.heads.stats import (
    PairStats,
    PairStatsCollector,
    RowPlan,
    all_reduce,
    bin_edges,
    collector_for_model,
    num_bins_for,
    sample_query_rows,
)

__all__ = ["HeadAnalysis", "analyze", "collector_for_config", "identify_positional_heads"]

# score variants reported next to the configured one in the per-head table
_EXTRA_SCORES = ("pearson", "spearman_weighted", "soft_pearson_weighted", "per_pair_weighted")


@dataclass
class HeadAnalysis:
    """Result of a Positional-Head identification (every tensor is ``[num_layers, num_heads, ...]``, CPU).

    Attributes:
        config: the configuration used.
        stats: the accumulated per-pair sums (merge two analyses' stats to pool probe sets).
        i_c: the critical pair (one per layer when the layer types have different RoPE, Gemma 3).
        scores, null, excess, z: the configured score, its permuted-position null, ``score - null``, and the
            z-score over all heads of the ranking value (``config.rank_by``: the score or the excess).
        positional: boolean mask of the Positional Heads.
        hda: HDA curves ``[NL, H, NB]``; ``hda_extension_bin`` / ``hda_extension_distance`` and ``hda_area`` /
            ``hda_mean`` their summaries.
        extra_scores: other score variants (and their nulls) for the table.
        meta: provenance (model, lengths, number of sequences, ...).
        sink_share, sink_share_se: ``[NL, H]`` mean attention share of the first ``stats.sink_positions``
            keys (``max(sink_keys, 1)``) over the sampled query rows, and its standard error.
        sink_stats: the sums over the sink pairs (``None`` when ``config.sink_keys == 0``).
        null_geometry: ``[NL, H]`` the configured score on the RoPE-geometry null's statistics (key content
            shuffled over positions and re-rotated; ``None`` when not computed); ``geometry_stats`` its sums.
        with_sinks_analysis: the analysis of ``stats + sink_stats`` with ``sink_keys = 0`` (``None`` when
            ``config.sink_keys == 0`` -- then this analysis already has every key -- or the sink sums are
            missing); see :meth:`with_sinks`.
    """

    config: HeadsConfig
    stats: PairStats
    i_c: int | list[int]
    scores: torch.Tensor
    null: torch.Tensor
    excess: torch.Tensor
    z: torch.Tensor
    positional: torch.Tensor
    hda: torch.Tensor
    hda_extension_bin: torch.Tensor
    hda_extension_distance: torch.Tensor
    hda_area: torch.Tensor
    hda_mean: torch.Tensor
    extra_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    sink_share: torch.Tensor | None = None
    sink_share_se: torch.Tensor | None = None
    sink_stats: PairStats | None = None
    with_sinks_analysis: HeadAnalysis | None = None
    null_geometry: torch.Tensor | None = None
    geometry_stats: PairStats | None = None

    def __post_init__(self) -> None:
        if self.sink_share is None or self.sink_share_se is None:
            self.sink_share, self.sink_share_se = self.stats.sink_share()

    def with_sinks(self) -> HeadAnalysis:
        """The analysis over every key, sinks included (``sink_keys = 0``); ``self`` when it already is."""
        if self.config.sink_keys == 0:
            return self
        if self.with_sinks_analysis is None:
            raise ValueError(
                f"heads.sink_keys={self.config.sink_keys}: the sink sums are missing, so the analysis with "
                "sinks cannot be derived (pass sink_stats to analyze)"
            )
        return self.with_sinks_analysis

    @property
    def scores_with_sinks(self) -> torch.Tensor:
        """The configured score over every key (NaN when the sink sums are missing)."""
        if self.config.sink_keys == 0:
            return self.scores
        if self.with_sinks_analysis is None:
            return torch.full_like(self.scores, float("nan"))
        return self.with_sinks_analysis.scores

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    @property
    def ranking(self) -> torch.Tensor:
        """What heads are ranked and selected on: ``scores`` or ``excess`` (``config.rank_by``)."""
        return self.excess if self.config.rank_by == "excess" else self.scores

    def positional_heads(self) -> list[tuple[int, int]]:
        return head_set(self.positional)

    def per_layer_counts(self) -> list[int]:
        return per_layer_counts(self.positional)

    def bin_edges(self) -> list[tuple[int, int]]:
        return bin_edges(self.stats.num_bins)

    def set_hda(self, mask: torch.Tensor | None = None) -> dict[str, Any]:
        """HDA curve and summaries averaged over a head set (default: the Positional Heads)."""
        mask = self.positional if mask is None else mask
        return {
            "curve": _floats(set_average(self.hda, mask)),
            "extension_bin": _float(set_average(self.hda_extension_bin.double(), mask)),
            "extension_distance": _float(set_average(self.hda_extension_distance.double(), mask)),
            "area": _float(set_average(self.hda_area, mask)),
            "mean": _float(set_average(self.hda_mean, mask)),
        }

    def table(self) -> list[dict[str, Any]]:
        """One row per head: layer, head, score, null, excess, z, positional, rank (1 = best by
        ``config.rank_by``), HDA summaries, the sink columns (``sink_share``, ``sink_share_se``,
        ``score_with_sinks``, ``positional_with_sinks``, ``rank_with_sinks``), extras."""
        full = self.with_sinks_analysis if self.config.sink_keys else self
        rank_full = None if full is None else _ranks(full.ranking)
        rank = _ranks(self.ranking)
        geo = self.null_geometry
        assert self.sink_share is not None and self.sink_share_se is not None
        rows = []
        for layer in range(self.num_layers):
            for head in range(self.num_heads):
                row: dict[str, Any] = {
                    "layer": layer,
                    "head": head,
                    "score": _float(self.scores[layer, head]),
                    "null": _float(self.null[layer, head]),
                    "excess": _float(self.excess[layer, head]),
                    "z": _float(self.z[layer, head]),
                    "positional": bool(self.positional[layer, head]),
                    "rank": int(rank[layer * self.num_heads + head]) + 1,
                    "hda_extension_bin": int(self.hda_extension_bin[layer, head]),
                    "hda_extension_distance": int(self.hda_extension_distance[layer, head]),
                    "hda_area": _float(self.hda_area[layer, head]),
                    "hda_mean": _float(self.hda_mean[layer, head]),
                    "null_geometry": None if geo is None else _float(geo[layer, head]),
                    "excess_geometry": None
                    if geo is None
                    else _float(self.scores[layer, head] - geo[layer, head]),
                    "sink_share": _float(self.sink_share[layer, head]),
                    "sink_share_se": _float(self.sink_share_se[layer, head]),
                    "score_with_sinks": None if full is None else _float(full.scores[layer, head]),
                    "positional_with_sinks": None if full is None else bool(full.positional[layer, head]),
                    "rank_with_sinks": None
                    if rank_full is None
                    else int(rank_full[layer * self.num_heads + head]) + 1,
                }
                for name, values in self.extra_scores.items():
                    row[name] = _float(values[layer, head])
                rows.append(row)
        return rows

    def summary(self) -> dict[str, Any]:
        """Score distribution, null statistics, selected heads, per-layer counts and set-averaged HDA."""
        finite = self.scores[torch.isfinite(self.scores)]
        null = self.null[torch.isfinite(self.null)]
        others = ~self.positional
        out = {
            "score": self.config.score,
            "i_c": self.i_c,
            "num_heads": self.scores.numel(),
            "score_min": _float(finite.min()) if finite.numel() else None,
            "score_median": _float(finite.median()) if finite.numel() else None,
            "score_max": _float(finite.max()) if finite.numel() else None,
            "null_mean": _float(null.mean()) if null.numel() else None,
            "null_sd": _float(null.std()) if null.numel() > 1 else None,
            "positional_heads": [list(x) for x in self.positional_heads()],
            "per_layer_counts": self.per_layer_counts(),
            "hda_positional": self.set_hda(self.positional),
            "hda_other": self.set_hda(others),
            "bin_edges": [list(e) for e in self.bin_edges()],
            "null_geometry": self.geometry_summary(),
            "sink_keys": self.config.sink_keys,
            "sinks": self.sink_summary(),
            "meta": self.meta,
            "config": self.config.to_dict(),
        }
        return out

    def geometry_summary(self) -> dict[str, Any] | None:
        """The RoPE-geometry null against the score: medians over heads, means over the Positional Heads
        and the others, and how many Positional Heads score above their geometry null (``None`` if off)."""
        geo = self.null_geometry
        if geo is None:
            return None
        excess = self.scores - geo
        pos = self.positional
        return {
            "median": _float(geo.nanmedian()),
            "positional_mean": _float(set_average(geo, pos)),
            "other_mean": _float(set_average(geo, ~pos)),
            "excess_median": _float(excess.nanmedian()),
            "excess_positional_mean": _float(set_average(excess, pos)),
            "excess_other_mean": _float(set_average(excess, ~pos)),
            "positional_above": int((excess[pos] > 0).sum()),
            "positional_count": int(pos.sum()),
        }

    def sink_summary(self) -> dict[str, Any]:
        """Sink share (median over heads, mean over the Positional Heads and over the others, rows behind
        each head's share) and, with ``sink_keys > 0``, the analysis with every key beside this one: its score
        median, Positional set, per-layer counts and the overlap of the two sets."""
        assert self.sink_share is not None
        share = self.sink_share
        out: dict[str, Any] = {
            "keys": self.stats.sink_positions,
            "rows": float(self.stats.rows),
            "share_median": _float(share.nanmedian()),
            "share_positional_mean": _float(set_average(share, self.positional)),
            "share_other_mean": _float(set_average(share, ~self.positional)),
        }
        full = self.with_sinks_analysis if self.config.sink_keys else None
        if full is not None:
            finite = full.scores[torch.isfinite(full.scores)]
            mine, theirs = set(self.positional_heads()), set(full.positional_heads())
            out["with_sinks"] = {
                "score_median": _float(finite.median()) if finite.numel() else None,
                "null_mean": _float(full.null.nanmean()),
                "positional_heads": [list(x) for x in full.positional_heads()],
                "per_layer_counts": full.per_layer_counts(),
                "shared_positional_heads": len(mine & theirs),
                "jaccard": jaccard(self.positional, full.positional),
                "sink_share_positional_mean": _float(set_average(share, full.positional)),
            }
        return out

    def save(self, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``heads.csv``, ``analysis.json``, ``stats.pt`` and (optionally) the PNG plots to ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"csv": out / "heads.csv", "json": out / "analysis.json", "stats": out / "stats.pt"}
        rows = self.table()
        from posheads.atomic import atomic_open, atomic_write_text

        # atomic: an interrupted or failed write leaves the previous file, never a cut-off table
        with atomic_open(paths["csv"], "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        payload = self.summary()
        payload["heads"] = rows
        payload["hda_curves"] = [
            [_floats(self.hda[layer, head]) for head in range(self.num_heads)]
            for layer in range(self.num_layers)
        ]
        atomic_write_text(paths["json"], json.dumps(payload, indent=1, allow_nan=False, default=str))
        saved = {"stats": self.stats.state_dict(), "config": self.config.to_dict(), "meta": self.meta}
        if self.sink_stats is not None:
            saved["sink_stats"] = self.sink_stats.state_dict()
        if self.geometry_stats is not None:
            saved["geometry_stats"] = self.geometry_stats.state_dict()
        with atomic_open(paths["stats"], "wb") as fh:
            torch.save(saved, fh)
        if plots:
            from posheads.heads.plots import save_all_plots

            paths.update(save_all_plots(self, out))
        return paths


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """0-based rank of every head (flattened) by ``values``, descending, NaN last."""
    order = torch.argsort(torch.nan_to_num(values, nan=float("-inf")).flatten(), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return rank


def _float(x: Any) -> float | None:
    value = float(x)
    return None if math.isnan(value) or math.isinf(value) else value


def _floats(t: torch.Tensor) -> list[float | None]:
    return [_float(x) for x in t.flatten().tolist()]


def analyze(
    stats: PairStats,
    cfg: HeadsConfig,
    i_c: int | list[int],
    meta: dict[str, Any] | None = None,
    *,
    sink_stats: PairStats | None = None,
    geometry_stats: PairStats | None = None,
) -> HeadAnalysis:
    """Scores, null, z, selection and HDA from accumulated sums (pure).

    ``stats`` are the sums without the sink pairs (``cfg.sink_keys``); ``sink_stats`` the sink pairs' sums
    (from the same pass), from which the analysis with every key (:meth:`HeadAnalysis.with_sinks`) is derived;
    ``geometry_stats`` the RoPE-geometry null's sums (same keys as ``stats``).
    """
    import dataclasses

    stats = stats.to("cpu")
    full = None
    if cfg.sink_keys and sink_stats is not None:
        full = analyze(stats + sink_stats.to("cpu"), dataclasses.replace(cfg, sink_keys=0), i_c, meta)
    kwargs: dict[str, Any] = {"i_c": i_c, "per_pair_distance": cfg.per_pair_distance}
    scores = positional_scores(stats, cfg.score, **kwargs)
    null = positional_scores(stats, cfg.score, null=True, **kwargs)
    excess = scores - null
    null_geometry = None
    if geometry_stats is not None:
        geometry_stats = geometry_stats.to("cpu")
        null_geometry = positional_scores(geometry_stats, cfg.score, **kwargs)
    ranking = excess if cfg.rank_by == "excess" else scores
    z = zscores(ranking)
    positional = select_heads(
        ranking, z, top_fraction=cfg.top_fraction, z_threshold=cfg.z_threshold, combine=cfg.combine
    )
    curves = hda_curves(stats, i_c, cfg.hda_variant)
    ext_bin, ext_distance = hda_extension(curves, cfg.tau)
    area, mean = hda_area(curves)
    extra: dict[str, torch.Tensor] = {}
    for name in _EXTRA_SCORES:
        ics = [i_c] if isinstance(i_c, int) else list(i_c)
        if name == cfg.score or (
            name.startswith("per_pair") and not all(0 < c < stats.num_pairs for c in ics)
        ):
            continue
        extra[name] = positional_scores(stats, name, **kwargs)
        extra[name + "_null"] = positional_scores(stats, name, null=True, **kwargs)
    return HeadAnalysis(
        config=cfg,
        stats=stats,
        i_c=i_c,
        scores=scores,
        null=null,
        excess=excess,
        z=z,
        positional=positional,
        hda=curves,
        hda_extension_bin=ext_bin,
        hda_extension_distance=ext_distance,
        hda_area=area,
        hda_mean=mean,
        extra_scores=extra,
        meta=dict(meta or {}),
        sink_stats=None if sink_stats is None else sink_stats.to("cpu"),
        with_sinks_analysis=full,
        null_geometry=null_geometry,
        geometry_stats=geometry_stats,
    )


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (the statistics never need logits)."""
    get_base: Any = getattr(model, "get_base_model", None)
    base: Any = get_base() if callable(get_base) else model
    get_decoder = getattr(base, "get_decoder", None)
    if callable(get_decoder):
        decoder = get_decoder()
        if isinstance(decoder, nn.Module):
            return decoder
    return base


@torch.no_grad()
def collector_for_config(
    model: nn.Module, cfg: HeadsConfig, length: int, device: torch.device | None = None
) -> PairStatsCollector:
    """The statistics collector that ``cfg`` describes, shaped after ``model``, for sequences of ``length``."""
    return collector_for_model(
        model,
        cfg.num_bins or num_bins_for(length),
        seq_len=length,
        rows_per_sequence=cfg.rows_per_sequence,
        keys_per_bin=cfg.keys_per_bin,
        temperature=cfg.temperature,
        layout=cfg.layout,
        chunk_elements=cfg.chunk_elements,
        seed=cfg.seed,
        device=device if device is not None else next(model.parameters()).device,
        sink_keys=cfg.sink_keys,
        geometry_null=cfg.geometry_null,
    )


def identify_positional_heads(
    model: nn.Module,
    sequences: torch.Tensor,
    cfg: HeadsConfig | None = None,
    progress: bool = True,
    attention_mask: torch.Tensor | None = None,
    shard: tuple[int, int] = (0, 1),
) -> HeadAnalysis:
    """Identify the Positional Heads of ``model`` on a probe set.

    Args:
        model: a Transformers RoPE decoder (possibly peft-wrapped), any attention implementation.
        sequences: ``LongTensor [N, L]`` token ids.
        cfg: analysis options (defaults: 64 rows per sequence, attention-weighted Pearson score, top 10 %).
        progress: show a progress bar.
        attention_mask: optional ``[N, L]`` padding mask (1 = token).
        shard: ``(rank, world)``: this process runs the batches ``rank, rank + world, ...`` and the statistics
            are summed over the processes (:func:`posheads.heads.stats.all_reduce`; every rank must call with
            the same sequences); ``(0, 1)`` = everything here.

    Query rows are sampled per sequence with seed ``cfg.seed * 1_000_003 + index`` (so a sequence gets the same
    rows whatever the batching); the null permutation and key sampling are seeded per batch.
    """
    cfg = cfg or HeadsConfig()
    if sequences.dim() != 2:
        raise ValueError(f"sequences must be [N, L], got shape {tuple(sequences.shape)}")
    if attention_mask is not None and attention_mask.shape != sequences.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, sequences {tuple(sequences.shape)}"
        )
    from posheads.rope.layout import model_rope

    modules = attention_modules(model)
    first = next(iter(modules.values()))
    rope = model_rope(model)  # derived from the config and verified on the model (position-shift check)
    head_dim = rope.head_dim
    n_seq, length = sequences.shape
    cfg.validate_for(max(modules) + 1, int(first.config.num_attention_heads), 2 * rope.num_pairs, length)
    device = next(model.parameters()).device
    collector = collector_for_config(model, cfg, length, device)
    decoder = _decoder(model)
    was_training = model.training
    model.eval()
    rank, world = shard
    starts = range(rank * cfg.batch_size, n_seq, world * cfg.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="positional heads", unit="batch")
    try:
        with attention_hooks(model, collector):
            for start in starts:
                ids = sequences[start : start + cfg.batch_size].to(device)
                am = (
                    None
                    if attention_mask is None
                    else attention_mask[start : start + cfg.batch_size].to(device)
                )
                valid = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
                seeds = [cfg.seed * 1_000_003 + start + j for j in range(ids.shape[0])]
                host_valid = (
                    valid.cpu()
                )  # the plan is prepared on the host before the forward (sync-free pass)
                collector.plan = RowPlan(
                    sample_query_rows(host_valid, cfg.rows_per_sequence, seeds),
                    seed=seeds[0],
                    valid=host_valid,
                )
                decoder(input_ids=ids, attention_mask=am)
    finally:
        model.train(was_training)
    if world > 1:
        all_reduce(collector.stats)
        for extra in (collector.sink_stats, collector.geometry_stats):
            if extra is not None:
                all_reduce(extra)
    config = first.config
    i_c = critical_pair_for(config, cfg.critical, cfg.original_context)
    meta = {
        "model": str(getattr(config, "_name_or_path", "") or type(model).__name__),
        "num_sequences": n_seq,
        "sequence_length": length,
        "num_layers": max(modules) + 1,
        "num_heads": int(config.num_attention_heads),
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        "head_dim": head_dim,
        "rope": rope.summary(),
        "rope_parameters": dict(getattr(config, "rope_parameters", {}) or {}),
        "attn_implementation": str(config._attn_implementation),
        "rows_accumulated": float(collector.stats.rows),
        "stats_seconds": collector.seconds,
    }
    return analyze(
        collector.stats,
        cfg,
        i_c,
        meta,
        sink_stats=collector.sink_stats,
        geometry_stats=collector.geometry_stats,
    )
