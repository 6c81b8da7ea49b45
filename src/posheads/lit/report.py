"""Perplexity before and after fine-tuning, at every validation length, printed with its protocol.

Rows (each over the data module's validation windows, the same text at every length --
:func:`posheads.lit.datamodule.build_validation_sets`):

* ``pre-trained, RoPE unscaled`` -- the loaded model with its RoPE scaling removed (only when a scaling is set):
  what the model does beyond its context without any method;
* ``before fine-tuning`` -- the loaded model with the RoPE scaling applied, before the first step (training-free
  extension);
* ``after fine-tuning`` -- the trained model.

The table is printed on rank 0, written to ``<run>/report.json`` and logged as ``report/nll_<L>_<row>`` /
``report/ppl_<L>_<row>`` (``row`` = unscaled | before | after).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from posheads.atomic import atomic_write_text
from posheads.lit.metrics import NLLSum
from posheads.rope import RopeScaling, apply_rope_scaling_to_model

log = logging.getLogger(__name__)

__all__ = ["PerplexityReport", "format_report", "rope_removed"]


@contextlib.contextmanager
def rope_removed(model: Any, scaling: RopeScaling, original_length: int) -> Iterator[None]:
    """Temporarily evaluate ``model`` with its pre-trained RoPE (scaling ``none``), then re-apply ``scaling``."""
    apply_rope_scaling_to_model(
        model, RopeScaling(method="none", original_max_position_embeddings=original_length)
    )
    try:
        yield
    finally:
        apply_rope_scaling_to_model(model, scaling)


def _row(key: str, label: str, results: dict[int, NLLSum]) -> dict[str, Any]:
    return {
        "key": key,
        "label": label,
        "results": {
            str(n): {"nll": r.nll, "ppl": r.ppl, "tokens": r.n_tokens, "windows": r.n_windows}
            for n, r in sorted(results.items())
        },
    }


def format_report(rows: list[dict[str, Any]], protocol: dict[str, Any]) -> str:
    """The report as text: a table of perplexity (and NLL in nats) per length, then the protocol lines."""
    lengths = sorted({int(n) for row in rows for n in row["results"]})
    label_width = max([len(r["label"]) for r in rows] + [10])
    header = (
        " " * label_width
        + "".join(f"  {'PPL@' + str(n):>10}" for n in lengths)
        + "".join(f"  {'NLL@' + str(n):>9}" for n in lengths)
    )
    lines = [header]
    for row in rows:
        cells = "".join(
            f"  {row['results'][str(n)]['ppl']:>10.3f}" if str(n) in row["results"] else f"  {'-':>10}"
            for n in lengths
        )
        cells += "".join(
            f"  {row['results'][str(n)]['nll']:>9.4f}" if str(n) in row["results"] else f"  {'-':>9}"
            for n in lengths
        )
        lines.append(f"{row['label']:<{label_width}}{cells}")
    lines.append("protocol:")
    for key, value in protocol.items():
        if isinstance(value, dict):
            value = "; ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)


class PerplexityReport(Callback):
    """Evaluate before the first step (unless resuming) and after the last, then print and save the report.

    Args:
        run_dir: where ``report.json`` goes.
        before: evaluate before fine-tuning.
        unscaled_baseline: also evaluate with the RoPE scaling removed (not under sharded strategies).
        seed: the run's seed, recorded in the protocol.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        before: bool = True,
        unscaled_baseline: bool = True,
        seed: int | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.before = before
        self.unscaled_baseline = unscaled_baseline
        self.seed = seed
        self.rows: list[dict[str, Any]] = []
        self.text: str | None = None
        self.resumed = False

    def _scaling(self, pl_module: LightningModule) -> RopeScaling | None:
        rope = getattr(pl_module, "rope", None)
        return rope if rope is not None and rope.method != "none" else None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module: Any = pl_module
        self.rows = []
        self.resumed = trainer.ckpt_path is not None
        if not self.before or self.resumed:
            return
        scaling = self._scaling(module)
        if scaling is not None and self.unscaled_baseline:
            if module._sharded():
                rank_zero_warn("report.unscaled_baseline is skipped under a sharded strategy")
            else:
                with rope_removed(module.model, scaling, module.original_length):
                    self.rows.append(
                        _row("unscaled", "pre-trained, RoPE unscaled", module.validation_perplexity())
                    )
        label = f"before fine-tuning ({scaling.method} x{scaling.factor:g})" if scaling else "before training"
        before = module.validation_perplexity()
        self.rows.append(_row("before", label, before))
        if trainer.global_rank == 0:  # the starting point of the validation curves
            metrics = {
                f"val/{k}_{n}": v for n, r in before.items() for k, v in (("nll", r.nll), ("ppl", r.ppl))
            }
            target = getattr(pl_module, "target_length", None)
            if target in before:
                metrics.update({"val/nll": before[target].nll, "val/ppl": before[target].ppl})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"[report] before: { {r['key']: {n: round(v['ppl'], 3) for n, v in r['results'].items()} for r in self.rows} }"
        )

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module: Any = pl_module
        scaling = self._scaling(module)
        what = (
            "fine-tuning"
            if scaling is not None or module.target_length > module.original_length
            else "training"
        )
        label = f"after {what} ({trainer.global_step} steps)"
        self.rows.append(_row("after", label, module.validation_perplexity()))
        if trainer.global_rank != 0:
            return
        protocol = self.protocol(trainer, pl_module)
        self.text = format_report(self.rows, protocol)
        print("\n" + "=" * 30 + " perplexity report " + "=" * 30 + "\n" + self.text + "\n", flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            self.run_dir / "report.json",
            json.dumps({"rows": self.rows, "protocol": protocol}, indent=2, default=str) + "\n",
        )
        metrics = {}
        for row in self.rows:
            for n, r in row["results"].items():
                metrics[f"report/nll_{n}_{row['key']}"] = r["nll"]
                metrics[f"report/ppl_{n}_{row['key']}"] = r["ppl"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    def protocol(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        module: Any = pl_module
        described = module.describe()
        datamodule = cast(Any, trainer).datamodule
        data = datamodule.protocol() if datamodule is not None and hasattr(datamodule, "protocol") else {}
        out: dict[str, Any] = {"model": described.pop("model"), **described}
        val = data.pop("validation", {})
        out["data"] = data
        if val:
            first = next(iter(val.values()))
            out["evaluation"] = (
                f"disjoint windows over the same {first['windows'] * int(next(iter(val)))} tokens of "
                f"{first['documents']} held-out documents at every length: "
                + ", ".join(f"{v['windows']} x {n}" for n, v in val.items())
                + "; every token but the first of a window scored; NLL in nats per token, PPL = exp(NLL)"
            )
        loss = trainer.callback_metrics.get("train/loss")
        seq = int(getattr(pl_module, "target_length", 0))
        world = trainer.world_size
        planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        steps = f"{trainer.global_step}"
        if planned is not None and trainer.global_step < planned:
            steps += f" of {planned} (stopped early: trainer.max_time or another stop)"
        out["training"] = {
            "steps": steps,
            "tokens": getattr(pl_module, "_tokens_seen", None),
            "batch": f"{trainer.accumulate_grad_batches} x {world} x {getattr(datamodule, 'batch_size', '?')} x {seq} tokens",
            "lr": getattr(getattr(pl_module, "optim", None), "lr", None),
            "last train/loss": None if loss is None else round(float(loss), 4),
            "resumed": self.resumed,
        }
        out["seed"] = self.seed
        out["precision"] = trainer.precision
        if any(math.isnan(r["results"][n]["nll"]) for r in self.rows for n in r["results"]):
            out["warning"] = "some perplexities are NaN (no scored tokens)"
        return out
