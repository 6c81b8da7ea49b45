"""The ``heads`` task and the per-row ablation of a group of conditions, on top of :mod:`posheads.heads`.

* :func:`identify` runs :func:`posheads.heads.identify_positional_heads` on the probe sequences, writes its
  table and plots into the run directory (``heads.csv``, ``analysis.json``, ``stats.pt``,
  ``scores_heatmap.png``, ``hda_curves.png``, ``pair_profile.png``) and returns the per-head table used by the
  sweep (and, for mean ablation, the heads' mean outputs on the same probes).
* :func:`ablation_apply` returns the ``apply(model, group)`` of a :class:`~posheads.eval.conditions.ConditionRunner`:
  batch row ``r`` is ablated as ``group[r]`` says. Head conditions share one per-row ``[B, layers, heads]``
  mask (:func:`posheads.heads.ablate_heads`); dimension conditions get one per-row mask per side
  (:func:`posheads.heads.ablate_dimensions`). Rows of no-op conditions are untouched, and a group with
  nothing to ablate installs no hook at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posheads.eval.conditions import Condition
from posheads.eval.distributed import SINGLE, Ranks

__all__ = ["Identification", "ablation_apply", "condition_masks", "identify"]


@dataclass
class Identification:
    """Outcome of the ``heads`` task.

    Attributes:
        table: one row per head (``layer, head, score, null, excess, z, positional, rank, hda_*`` ...).
        analysis: the :class:`posheads.heads.HeadAnalysis`.
        means: ``[layers, heads, head_dim]`` mean head outputs on the probes (mean ablation), else ``None``.
        files: the files written into the run directory.
    """

    table: list[dict[str, Any]]
    analysis: Any
    means: torch.Tensor | None
    files: dict[str, Path]


def identify(
    model: Any,
    probes: torch.Tensor,
    settings: Any,
    out_dir: str | Path,
    progress: bool = True,
    need_means: bool = False,
    ranks: Ranks = SINGLE,
) -> Identification:
    """Identify the Positional Heads on ``probes`` (``[N, L]``) with ``settings.analysis``; save the table
    and plots under ``out_dir``.

    ``ranks``: the probe batches are split over the evaluation processes and the statistics summed
    (:mod:`posheads.eval.distributed`); every rank gets the analysis, rank 0 writes the files. The mean head
    outputs (mean ablation) are computed whole on every rank (one forward per probe), so every rank ablates
    with the same means."""
    from posheads.heads import head_means, identify_positional_heads

    analysis = identify_positional_heads(
        model, probes, settings.analysis, progress=progress, shard=(ranks.rank, ranks.world)
    )
    files = analysis.save(out_dir, plots=getattr(settings, "plots", True)) if ranks.is_main else {}
    means = head_means(model, probes, batch_size=settings.analysis.batch_size) if need_means else None
    return Identification(analysis.table(), analysis, means, files)


def condition_masks(
    group: Sequence[Condition], num_layers: int, num_heads: int, default_mode: str = "zero"
) -> dict[Any, torch.Tensor]:
    """Per-row boolean ``[B, layers, heads]`` masks of a group, row ``r`` = ``group[r]``: ``("heads", mode)``
    for whole-head ablation in that mode (a condition's own ``ablation``, else ``default_mode``),
    ``("dims", side, pairs)`` for dimension ablation of those pairs (``pairs = ()``: every pair of the
    side)."""
    masks: dict[Any, torch.Tensor] = {}
    for row, cond in enumerate(group):
        if cond.is_noop:
            continue
        if cond.kind == "heads":
            key: tuple[Any, ...] = ("heads", cond.ablation or default_mode)
        else:
            key = ("dims", cond.side, cond.pairs)
        if key not in masks:
            masks[key] = torch.zeros(len(group), num_layers, num_heads, dtype=torch.bool)
        for layer, head in cond.heads:
            masks[key][row, layer, head] = True
    return masks


def ablation_apply(mode: str, i_c: int | list[int] | None, means: torch.Tensor | None, layout: str = "auto"):
    """``apply(model, group)`` for a :class:`~posheads.eval.conditions.ConditionRunner`.

    Args:
        mode: ``"zero"`` or ``"mean"``: the head ablation of conditions that carry no ``ablation`` of their own.
        i_c: the critical pair of the dimension conditions (``None`` when there are none).
        means: mean head outputs, needed when a condition uses ``ablation="mean"``.
        layout: RoPE pair layout (``"auto"``: the model's verified RoPE description).
    """
    from posheads.eval.sweep import ModelShape
    from posheads.heads import ablate_dimensions, ablate_heads

    @contextlib.contextmanager
    def apply(model: Any, group: Sequence[Condition]) -> Iterator[None]:
        shape = ModelShape.from_config(model.config)
        masks = condition_masks(group, shape.num_layers, shape.num_heads, mode)
        with contextlib.ExitStack() as stack:
            for key, mask in masks.items():
                if key[0] == "heads":
                    stack.enter_context(ablate_heads(model, mask, mode=key[1], means=means))
                else:
                    _, side, pairs = key
                    if i_c is None and not pairs:
                        raise ValueError(f"dimension conditions (side {side!r}) need a critical pair i_c")
                    stack.enter_context(
                        ablate_dimensions(
                            model, mask, i_c or 0, side=side, layout=layout, pairs=list(pairs) or None
                        )
                    )
            yield

    return apply
