"""Live tracking of the Positional Heads while a model is fine-tuned for a longer context.

Hong et al. (arXiv 2410.08703) report that length-extrapolation training extends the Positional Heads'
high-dimensional attention allocation (HDA) to longer distances, and that runs which extend it further
extrapolate better. :class:`PositionalHeadTracker` watches exactly that during a run: at the start, every
``every_n_steps`` optimizer steps and at the end it runs the :mod:`posheads.heads` statistics pass over a fixed
probe set at the target length (no gradients, training untouched), derives scores, the Positional-Head set and
the HDA curves with :func:`posheads.heads.analyze`, and logs / plots / records them. At the end it correlates
the HDA extension with the long-length perplexity across the evaluated steps.

The callback only observes (in the manner of Lightning's ``DeviceStatsMonitor``); every number comes from
:mod:`posheads.heads` (statistics, scores, selection, HDA, Jaccard, plots) and the probe pass of
:mod:`posheads.callbacks.probe`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, cast

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from posheads.atomic import atomic_write_text
from posheads.callbacks.efficiency import efficiency_report
from posheads.callbacks.probe import ProbePassResult, ProbeSet, run_probe_pass, select_probe
from posheads.heads import (
    HeadAnalysis,
    HeadsConfig,
    analyze,
    attention_modules,
    bin_edges,
    critical_pair_for,
    jaccard,
    set_average,
)

log = logging.getLogger(__name__)

__all__ = ["PPL_MODES", "PositionalHeadTracker", "head_name"]

#: Where the long-length perplexity logged at each evaluation comes from (see the class docstring).
PPL_MODES = ("auto", "module", "probe", "none")
#: Strategies whose parameters are sharded: the probe forward goes through the strategy's wrapped model.
_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
TIMELINE_FILE = "timeline.json"
_PROBE_METHOD = "_posheads_probe_forward"


def head_name(layer: int, head: int) -> str:
    """``"L{layer}H{head}"``, the name of a head in logged keys, the timeline and the plots."""
    return f"L{layer}H{head}"


def _num(x: Any) -> float | None:
    """A JSON-safe float (``None`` for NaN / inf / missing)."""
    if x is None:
        return None
    value = float(x)
    return value if math.isfinite(value) else None


class PositionalHeadTracker(Callback):
    r"""Track the Positional Heads' HDA during fine-tuning (start, every ``every_n_steps`` optimizer steps, end).

    **What an evaluation does.** In eval mode, without gradients, under the Trainer's precision context, each
    rank runs its shard of the probe set (``num_sequences`` sequences of ``length`` tokens, chosen once with
    ``heads.seed`` from the data module's validation windows) through the model with the
    :class:`~posheads.heads.PairStatsCollector` installed; the sums are added over ranks and every rank derives
    the same :class:`~posheads.heads.HeadAnalysis`. The train / eval flag of every submodule and the RNG
    states (torch, CUDA, NumPy, Python) are restored afterwards and the pass's memory is released, so the
    trained weights are exactly those of a run without the callback. Rank zero logs, plots and writes the
    timeline.

    **The head sets.** The *tracked set* is fixed for the whole run: the heads of ``head_table`` when given,
    else the Positional Heads identified at the first evaluation (step 0, on the starting model; kept across
    resumes). The *current set* is re-identified at every evaluation; its Jaccard overlap with the set identified
    at step 0 measures how stable the Positional Heads are under fine-tuning.

    **Perplexity** (``ppl``): ``module`` = the LightningModule's ``validation_perplexity([length])`` (the data
    module's validation windows at that length); ``probe`` = the probe sequences' own perplexity, taken from
    the same forward passes as the statistics (free); ``none``; ``auto`` = ``module`` when the module has
    ``validation_perplexity`` and the data module has validation windows of ``length`` tokens, else ``probe``.

    **Logged keys** (to every logger, at Lightning's step counter ``_batches_that_stepped`` so that they align
    with ``train/*`` and ``val/*``; ``<b>`` is a two-digit distance bin: bin 0 is ``delta = 0``, bin ``b >= 1``
    holds ``2^(b-1) <= delta < 2^b``; ``<head>`` is ``L<layer>H<head>``):

    - ``tracking/set/hda_bin<b>`` -- HDA in bin ``b`` averaged over the tracked set.
    - ``tracking/set/hda_extension_bin`` -- mean over the tracked set of each head's HDA extension (the largest
      bin with ``HDA >= heads.tau``; -1 when none).
    - ``tracking/set/hda_extension_distance`` -- the same as the largest distance (tokens) of that bin.
    - ``tracking/set/hda_area`` -- mean HDA area (sum of HDA over the bins >= 1 that hold data, in octaves).
    - ``tracking/set/score`` / ``tracking/set/score_excess`` -- mean positional score (``heads.score``) and
      score minus its permuted-position null.
    - ``tracking/current_set/...`` -- the same keys averaged over the current (re-identified) set.
    - ``tracking/head/<head>/hda_bin<b>``, ``.../hda_extension_bin``, ``.../hda_extension_distance``,
      ``.../hda_area``, ``.../score``, ``.../score_excess``, ``.../z`` -- per tracked head (the per-bin keys only
      with ``log_head_bins``).
    - ``tracking/num_positional_heads`` -- size of the current set.
    - ``tracking/jaccard_step0`` -- Jaccard overlap of the current set with the set identified at step 0.
    - ``tracking/jaccard_table`` -- overlap with ``head_table``'s heads (only when a table is given).
    - ``tracking/val_nll`` / ``tracking/val_ppl`` -- long-length NLL and perplexity (see ``ppl``).
    - ``tracking/optimizer_step`` -- optimizer steps taken when the evaluation ran (the timeline's ``step``).
    - ``tracking/seconds`` -- wall time of the evaluation (probe pass, perplexity, analysis, files).
    - ``tracking/efficiency/spearman_extension_ppl``, ``.../spearman_p_value``, ``.../spearman_n`` -- at the end
      of training: Spearman correlation across the evaluated steps between ``set/hda_extension_bin`` and the
      perplexity, its two-sided p-value and the number of steps used (``None``, not logged, when fewer than 3
      steps or a constant series, e.g. an extension already at the longest bin from the start);
      ``tracking/efficiency/spearman_area_ppl`` the same for ``set/hda_area``.

    With W&B, the per-evaluation images are logged as ``tracking/score_heatmap`` and ``tracking/hda_vs_distance``
    (W&B draws the line charts of the scalar keys itself), and at the end the timeline plot as
    ``tracking/timeline_plot`` and a ``tracking/timeline`` table (one row per evaluation).

    **Files** (always, rank zero, in ``output_dir``, default ``<trainer.default_root_dir>/tracking``):
    ``timeline.json`` (rewritten after every evaluation; the configuration, the probe set, the bins, every
    evaluation -- all heads' scores, the tracked and current heads' HDA curves and summaries, set averages,
    Jaccard, perplexity -- and at the end the ``efficiency`` section), ``score_heatmap_step<N>.png`` and
    ``hda_step<N>.png`` per evaluation (:mod:`posheads.heads.plots`; the HDA image shows the tracked set),
    ``timeline.png`` at the end (extension per tracked head and set mean, perplexity, area, Jaccard), and with ``save_stats`` the raw sums ``stats_step<N>.pt``.

    Args:
        every_n_steps: evaluate every this many optimizer steps (also at the start and the end of training).
        num_sequences: probe sequences (a seeded choice among the candidate windows; all when fewer).
        length: tokens per probe sequence; ``None`` = the LightningModule's ``target_length``.
        heads: analysis options (:class:`~posheads.heads.HeadsConfig`: rows per sequence, keys per bin, score,
            selection rule, critical pair, HDA variant, ``tau``, probe ``batch_size``, ``seed`` ...).
        head_table: track these heads instead of the step-0 Positional Heads: a head table as written by the
            evaluation (``results.json`` or its run directory, a JSON list, or a CSV with ``layer, head, ...,
            positional``; the rows marked positional are used).
        ppl: ``auto`` | ``module`` | ``probe`` | ``none`` (see above).
        plots: write the PNG images (and log them to W&B).
        log_head_bins: log every tracked head's HDA per bin (many keys for large models; the timeline always
            has them).
        output_dir: where the files go; ``None`` = ``<trainer.default_root_dir>/tracking``.
        save_stats: also save every evaluation's raw :class:`~posheads.heads.PairStats` sums.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_sequences: int = 4,
        length: int | None = None,
        heads: HeadsConfig | None = None,
        head_table: str | None = None,
        ppl: str = "auto",
        plots: bool = True,
        log_head_bins: bool = True,
        output_dir: str | None = None,
        save_stats: bool = False,
    ) -> None:
        for name, value in (
            ("every_n_steps", every_n_steps),
            ("num_sequences", num_sequences),
            ("length", length),
        ):
            if value is None and name == "length":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (2 if name == "length" else 1)
            ):
                raise ValueError(
                    f"tracking.{name}={value!r} must be an int >= {2 if name == 'length' else 1}"
                )
        if ppl not in PPL_MODES:
            raise ValueError(f"tracking.ppl={ppl!r} is not one of {list(PPL_MODES)}")
        if isinstance(heads, dict):
            heads = HeadsConfig(**heads)
        self.every_n_steps = every_n_steps
        self.num_sequences = num_sequences
        self.length = length
        self.heads = heads or HeadsConfig()
        self.head_table = head_table
        self.ppl = ppl
        self.plots = plots
        self.log_head_bins = log_head_bins
        self.output_dir = output_dir
        self.save_stats = save_stats

        self.probe: ProbeSet | None = None
        self.last_analysis: HeadAnalysis | None = None
        self._ppl_mode: str | None = None
        self._i_c: int | list[int] | None = None
        self._table_heads: list[tuple[int, int]] | None = None
        self._tracked: list[tuple[int, int]] | None = None
        self._step0: list[tuple[int, int]] | None = None
        self._evaluations: list[dict[str, Any]] = []
        self._efficiency: dict[str, Any] | None = None
        self._dir: Path | None = None
        self._restored_probe_names: list[str] | None = None

    # ------------------------------------------------------------------------------------------- public

    @property
    def timeline(self) -> dict[str, Any]:
        """The timeline as written to ``timeline.json``."""
        return {
            "format": "posheads.tracking/1",
            "every_n_steps": self.every_n_steps,
            "ppl_source": self._ppl_mode,
            "heads_config": self.heads.to_dict(),
            "tau": self.heads.tau,
            "i_c": self._i_c,
            "probe": self.probe.describe() if self.probe is not None else None,
            "bin_edges": self._bin_edges(),
            "head_table": self.head_table,
            "tracked_heads": [head_name(*h) for h in self._tracked or []],
            "step0_heads": [head_name(*h) for h in self._step0 or []],
            "evaluations": self._evaluations,
            "efficiency": self._efficiency,
            "overhead_seconds": sum(e["seconds"] for e in self._evaluations),
        }

    def set_probe(self, input_ids: torch.Tensor, names: list[str] | None = None) -> None:
        """Use these sequences (``[N, L]``) as the probe set instead of the data module's windows."""
        names = names if names is not None else [f"sequence{i}" for i in range(int(input_ids.shape[0]))]
        self.probe = ProbeSet(input_ids.long().cpu(), list(names), self.heads.seed, "given")

    # ------------------------------------------------------------------------------------------- hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not hasattr(pl_module, "model"):
            raise ValueError(
                f"PositionalHeadTracker needs a LightningModule with a `model` attribute (the Transformers model); "
                f"{type(pl_module).__name__} has none"
            )
        self._dir = Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "tracking"
        if self.head_table is not None and self._table_heads is None:
            from posheads.eval.sweep import positional_heads, read_head_table

            heads = positional_heads(read_head_table(self.head_table))
            if not heads:
                raise ValueError(f"tracking.head_table={self.head_table!r} marks no head as positional")
            self._table_heads = heads

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._prepare(trainer, pl_module)
        if not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module, "start")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and not self._evaluated(step):
            self._evaluate(trainer, pl_module, "periodic")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe is None:  # training ended before it started
            return
        if not self._evaluated(trainer.global_step):
            self._evaluate(trainer, pl_module, "end")
        self._finish(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "tracked": [list(h) for h in self._tracked] if self._tracked is not None else None,
            "step0": [list(h) for h in self._step0] if self._step0 is not None else None,
            "evaluations": self._evaluations,
            "probe_names": self.probe.names if self.probe is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tracked, step0 = state_dict.get("tracked"), state_dict.get("step0")
        self._tracked = [tuple(h) for h in tracked] if tracked is not None else None  # type: ignore[misc]
        self._step0 = [tuple(h) for h in step0] if step0 is not None else None  # type: ignore[misc]
        self._evaluations = list(state_dict.get("evaluations") or [])
        self._restored_probe_names = state_dict.get("probe_names")

    # ------------------------------------------------------------------------------------------- setup

    def _evaluated(self, step: int) -> bool:
        return any(e["step"] == step for e in self._evaluations)

    def _bin_edges(self) -> list[list[int]] | None:
        if self.last_analysis is not None:
            return [list(e) for e in self.last_analysis.bin_edges()]
        if self.probe is None:
            return None
        from posheads.heads import num_bins_for

        return [list(e) for e in bin_edges(self.heads.num_bins or num_bins_for(self.probe.length))]

    def _prepare(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Choose the probe set and the perplexity source; resolve ``i_c`` and check the head table."""
        if self._dir is None:  # setup() not called (e.g. the hooks driven by hand)
            self._dir = (
                Path(self.output_dir) if self.output_dir else Path(trainer.default_root_dir) / "tracking"
            )
        length = self.length if self.length is not None else getattr(pl_module, "target_length", None)
        if self.probe is None:
            if length is None:
                raise ValueError(
                    "tracking.length is not set and the LightningModule has no `target_length`: set tracking.length"
                )
            self.probe = self._probe_from_datamodule(trainer, int(length))
        restored = self._restored_probe_names
        if restored is not None and restored != self.probe.names:
            rank_zero_warn(
                "PositionalHeadTracker: the probe set differs from the one in the checkpoint (the data changed); "
                "the timeline continues on the new probe set"
            )
        self._ppl_mode = self._resolve_ppl_mode(trainer, pl_module)
        model: Any = pl_module.model
        modules = attention_modules(model)
        first: Any = next(iter(modules.values()))
        cfg = first.config
        num_layers, num_heads = max(modules) + 1, int(cfg.num_attention_heads)
        from posheads.rope.layout import model_rope

        rope = model_rope(model)  # derived from the config and verified on the model (all ranks run it)
        self.heads.validate_for(num_layers, num_heads, 2 * rope.num_pairs)
        original = self.heads.original_context
        if original is None and hasattr(pl_module, "original_length"):
            original = int(cast(Any, pl_module).original_length)
        self._i_c = critical_pair_for(cfg, self.heads.critical, original)
        for layer, head in self._table_heads or []:
            if not (0 <= layer < num_layers and 0 <= head < num_heads):
                raise ValueError(
                    f"tracking.head_table={self.head_table!r}: head ({layer}, {head}) is outside the model "
                    f"({num_layers} layers x {num_heads} heads)"
                )

    def _probe_from_datamodule(self, trainer: Trainer, length: int) -> ProbeSet:
        dm = getattr(trainer, "datamodule", None)
        seed = self.heads.seed
        sets = dm.validation_sets() if dm is not None and hasattr(dm, "validation_sets") else {}
        if length in sets:
            vs = sets[length]
            names = (
                list(vs.window_docs)
                if len(vs.window_docs) == vs.n_windows
                else [f"window{i}" for i in range(vs.n_windows)]
            )
            probe = select_probe(
                vs.input_ids, names, self.num_sequences, seed, f"validation windows of {length} tokens"
            )
        elif dm is not None and hasattr(dm, "load_documents"):
            from posheads.data import select_min_length, window_corpus

            _, val_docs = dm.load_documents()
            by_name = {d.name: d for d in val_docs}
            windows = window_corpus(select_min_length(val_docs, length), length)
            ids = torch.stack([by_name[w.doc].ids[w.start : w.end] for w in windows])  # [M, length]
            probe = select_probe(
                ids,
                [w.doc for w in windows],
                self.num_sequences,
                seed,
                f"validation documents, windows of {length} tokens",
            )
        else:
            raise ValueError(
                "PositionalHeadTracker has no probe set: the data module has neither `validation_sets()` nor "
                "`load_documents()`; call tracker.set_probe(input_ids) before fitting"
            )
        if len(probe) < self.num_sequences:
            rank_zero_warn(
                f"tracking.num_sequences={self.num_sequences} but only {len(probe)} windows of {length} tokens are "
                "available; the probe set uses all of them"
            )
        return probe

    def _resolve_ppl_mode(self, trainer: Trainer, pl_module: LightningModule) -> str:
        has_module = callable(getattr(pl_module, "validation_perplexity", None))
        dm = getattr(trainer, "datamodule", None)
        has_windows = False
        if dm is not None and hasattr(dm, "validation_sets") and self.probe is not None:
            with contextlib.suppress(Exception):
                has_windows = self.probe.length in dm.validation_sets()
        if self.ppl == "module" and not (has_module and has_windows):
            raise ValueError(
                f"tracking.ppl='module' needs a LightningModule with validation_perplexity() and validation windows of "
                f"{self.probe.length if self.probe else '?'} tokens in the data module; use ppl='probe'"
            )
        if self.ppl == "auto":
            return "module" if has_module and has_windows else "probe"
        return self.ppl

    # ------------------------------------------------------------------------------------------- evaluation

    def _forward_fn(self, trainer: Trainer, pl_module: LightningModule):
        """``forward(ids, want_logits)`` for the probe pass.

        Unsharded strategies (single device, DDP): the Transformers model is called directly (no gradient sync is
        involved without a backward pass), with ``logits_to_keep=1`` when no logits are needed. Sharded strategies
        (FSDP, DeepSpeed, ModelParallel): the call is routed through the strategy's wrapped module, as Lightning's
        own loops do, so that the root's sharded parameters are gathered; every rank runs the same number of
        forwards (padding forwards included, see :func:`~posheads.callbacks.probe.shard_batches`).
        """
        strategy = trainer.strategy
        wrapped: Any = strategy.model
        model: Any = pl_module.model
        redirect = (
            type(strategy).__name__ in _SHARDED_STRATEGIES
            and wrapped is not None
            and wrapped is not pl_module
        )
        try:
            params = inspect.signature(model.forward).parameters
            keep_ok = "logits_to_keep" in params
        except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
            keep_ok = False

        def call(ids: torch.Tensor, want_logits: bool) -> torch.Tensor | None:
            kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
            if not want_logits and keep_ok:
                kwargs["logits_to_keep"] = 1
            out = model(**kwargs)
            return out.logits if want_logits else None

        def forward(ids: torch.Tensor, want_logits: bool) -> torch.Tensor | None:
            if not redirect:
                return call(ids, want_logits)
            # Lightning's _ForwardRedirection calls `pl_module.<name>(*args)` inside the wrapper's forward
            pl_module.__dict__[_PROBE_METHOD] = lambda x: call(x, want_logits)
            try:
                out: Any = strategy._forward_redirection(wrapped, pl_module, _PROBE_METHOD, ids)
                return out
            finally:
                pl_module.__dict__.pop(_PROBE_METHOD, None)

        return forward

    def _run_pass(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[ProbePassResult, dict[str, Any] | None]:
        """The probe pass (+ perplexity) with the module's modes and the RNG states restored afterwards."""
        assert self.probe is not None
        modes = {m: m.training for m in pl_module.modules()}
        rng = _collect_rng_states(include_cuda=torch.cuda.is_available() and torch.cuda.is_initialized())
        device = pl_module.device
        try:
            pl_module.eval()
            context = trainer.strategy.precision_plugin.val_step_context()
            with context, torch.no_grad():
                result = run_probe_pass(
                    cast(Any, pl_module).model,
                    self._forward_fn(trainer, pl_module),
                    self.probe,
                    self.heads,
                    rank=trainer.global_rank,
                    world_size=trainer.world_size,
                    compute_nll=self._ppl_mode == "probe",
                    device=device,
                )
            ppl: dict[str, Any] | None = None
            if self._ppl_mode == "probe":
                ppl = {
                    "source": "probe",
                    "nll": _num(result.nll),
                    "ppl": _num(result.ppl),
                    "tokens": result.tokens,
                }
            elif self._ppl_mode == "module":
                nll = cast(Any, pl_module).validation_perplexity([self.probe.length])[self.probe.length]
                ppl = {
                    "source": "module",
                    "nll": _num(nll.nll),
                    "ppl": _num(nll.ppl),
                    "tokens": int(nll.n_tokens),
                }
        finally:
            for m, training in modes.items():
                m.train(training)
            _set_rng_states(rng)
            # the pass's tensors are freed with their last reference (no gc.collect(): it costs ~0.5 s with a
            # Transformers stack loaded); hand the cached blocks back so training finds its memory as it left it
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return result, ppl

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, kind: str) -> None:
        started = time.perf_counter()
        step = int(trainer.global_step)
        result, ppl = self._run_pass(trainer, pl_module)
        assert self._i_c is not None and self.probe is not None
        analysis = analyze(
            result.stats,
            self.heads,
            self._i_c,
            {"step": step, "probe": self.probe.describe()},
            sink_stats=result.sink_stats,
            geometry_stats=result.geometry_stats,
        )
        current = analysis.positional_heads()
        if self._step0 is None:
            self._step0 = current
        if self._tracked is None:
            self._tracked = list(self._table_heads) if self._table_heads is not None else list(current)
        record = self._record(analysis, step, kind, trainer, ppl)
        record["forwards_per_rank"] = result.forwards
        self.last_analysis = analysis
        if trainer.is_global_zero:
            self._write_files(trainer, analysis, step)
        record["seconds"] = time.perf_counter() - started
        self._evaluations.append(record)
        if trainer.is_global_zero:
            self._write_timeline()
            self._log(trainer, record)
            tracked = record["tracked_set"]
            rank_zero_info(
                f"[tracking] step {step}: {len(current)} Positional Heads (Jaccard vs step 0 = "
                f"{record['jaccard_step0']:.2f}); tracked set HDA extension bin {_fmt(tracked['extension_bin'])}, "
                f"area {_fmt(tracked['area'])}; ppl {_fmt((ppl or {}).get('ppl'))} ({record['seconds']:.1f} s)"
            )

    def _record(
        self, analysis: HeadAnalysis, step: int, kind: str, trainer: Trainer, ppl: dict[str, Any] | None
    ) -> dict[str, Any]:
        assert self._tracked is not None and self._step0 is not None
        current = analysis.positional_heads()
        tracked_mask = _mask(self._tracked, analysis.scores.shape)
        assert analysis.sink_share is not None
        sink_share, with_sinks, geometry = (
            analysis.sink_share,
            analysis.scores_with_sinks,
            analysis.null_geometry,
        )
        record: dict[str, Any] = {
            "step": step,
            "kind": kind,
            "epoch": int(trainer.current_epoch),
            "logger_step": int(trainer.fit_loop.epoch_loop._batches_that_stepped),
            "positional_heads": [head_name(*h) for h in current],
            "num_positional_heads": len(current),
            "per_layer_counts": analysis.per_layer_counts(),
            "jaccard_step0": jaccard(current, self._step0),
            "tracked_set": self._set_summary(analysis, tracked_mask),
            "current_set": self._set_summary(analysis, analysis.positional),
            "heads": {},
            "scores": [[_num(v) for v in row] for row in analysis.scores.tolist()],
            "score_excess": [[_num(v) for v in row] for row in analysis.excess.tolist()],
            "sink_keys": analysis.config.sink_keys,
            "sink_share": [[_num(v) for v in row] for row in sink_share.tolist()],
            "ppl": ppl,
        }
        if self._table_heads is not None:
            record["jaccard_table"] = jaccard(current, self._table_heads)
        for layer, head in sorted(set(self._tracked) | set(current)):
            record["heads"][head_name(layer, head)] = {
                "hda": [_num(v) for v in analysis.hda[layer, head].tolist()],
                "hda_extension_bin": int(analysis.hda_extension_bin[layer, head]),
                "hda_extension_distance": int(analysis.hda_extension_distance[layer, head]),
                "hda_area": _num(analysis.hda_area[layer, head]),
                "score": _num(analysis.scores[layer, head]),
                "score_excess": _num(analysis.excess[layer, head]),
                "z": _num(analysis.z[layer, head]),
                "sink_share": _num(sink_share[layer, head]),
                "score_with_sinks": _num(with_sinks[layer, head]),
                "null_geometry": None if geometry is None else _num(geometry[layer, head]),
                "tracked": (layer, head) in self._tracked,
                "positional": bool(analysis.positional[layer, head]),
            }
        return record

    @staticmethod
    def _set_summary(analysis: HeadAnalysis, mask: torch.Tensor) -> dict[str, Any]:
        out = analysis.set_hda(mask)  # curve, extension_bin, extension_distance, area, mean
        out["score"] = _num(set_average(analysis.scores, mask))
        out["score_excess"] = _num(set_average(analysis.excess, mask))
        assert analysis.sink_share is not None
        out["sink_share"] = _num(set_average(analysis.sink_share, mask))
        out["score_with_sinks"] = _num(set_average(analysis.scores_with_sinks, mask))
        geometry = analysis.null_geometry
        out["null_geometry"] = None if geometry is None else _num(set_average(geometry, mask))
        out["num_heads"] = int(mask.sum())
        return out

    # ------------------------------------------------------------------------------------------- output

    def _metrics(self, record: dict[str, Any]) -> dict[str, float]:
        metrics: dict[str, float] = {}

        def put(key: str, value: Any) -> None:
            v = _num(value)
            if v is not None:
                metrics[key] = v

        for prefix, summary in (
            ("tracking/set", record["tracked_set"]),
            ("tracking/current_set", record["current_set"]),
        ):
            for b, v in enumerate(summary["curve"]):
                put(f"{prefix}/hda_bin{b:02d}", v)
            put(f"{prefix}/hda_extension_bin", summary["extension_bin"])
            put(f"{prefix}/hda_extension_distance", summary["extension_distance"])
            put(f"{prefix}/hda_area", summary["area"])
            put(f"{prefix}/score", summary["score"])
            put(f"{prefix}/score_excess", summary["score_excess"])
            put(f"{prefix}/sink_share", summary["sink_share"])
            put(f"{prefix}/score_with_sinks", summary["score_with_sinks"])
            put(f"{prefix}/null_geometry", summary["null_geometry"])
        for name, h in record["heads"].items():
            if not h["tracked"]:
                continue
            prefix = f"tracking/head/{name}"
            if self.log_head_bins:
                for b, v in enumerate(h["hda"]):
                    put(f"{prefix}/hda_bin{b:02d}", v)
            for key in (
                "hda_extension_bin",
                "hda_extension_distance",
                "hda_area",
                "score",
                "score_excess",
                "z",
                "sink_share",
            ):
                put(f"{prefix}/{key}", h[key])
        put("tracking/num_positional_heads", record["num_positional_heads"])
        put("tracking/jaccard_step0", record["jaccard_step0"])
        if "jaccard_table" in record:
            put("tracking/jaccard_table", record["jaccard_table"])
        if record["ppl"] is not None:
            put("tracking/val_nll", record["ppl"]["nll"])
            put("tracking/val_ppl", record["ppl"]["ppl"])
        put("tracking/optimizer_step", record["step"])
        put("tracking/seconds", record["seconds"])
        return metrics

    def _log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        metrics = self._metrics(record)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["logger_step"])
        wandb_loggers = _wandb_loggers(trainer)
        if not wandb_loggers or not self.plots or self._dir is None:
            return
        step = record["step"]
        images = {
            "tracking/score_heatmap": self._dir / f"score_heatmap_step{step:06d}.png",
            "tracking/hda_vs_distance": self._dir / f"hda_step{step:06d}.png",
        }
        for logger in wandb_loggers:
            for key, path in images.items():
                if path.is_file():
                    logger.log_image(
                        key=key, images=[str(path)], step=record["logger_step"], caption=[f"step {step}"]
                    )

    def _write_files(self, trainer: Trainer, analysis: HeadAnalysis, step: int) -> None:
        assert self._dir is not None and self._tracked is not None
        self._dir.mkdir(parents=True, exist_ok=True)
        if self.save_stats:
            torch.save(analysis.stats.state_dict(), self._dir / f"stats_step{step:06d}.pt")
        if not self.plots:
            return
        from posheads.heads.plots import plot_hda_curves, plot_score_heatmap

        plot_score_heatmap(analysis, self._dir / f"score_heatmap_step{step:06d}.png")
        tracked_view = dataclasses.replace(analysis, positional=_mask(self._tracked, analysis.scores.shape))
        plot_hda_curves(tracked_view, self._dir / f"hda_step{step:06d}.png")

    def _write_timeline(self, plot: bool = False) -> None:
        if self._dir is None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        timeline = self.timeline
        atomic_write_text(self._dir / TIMELINE_FILE, json.dumps(timeline, indent=1, allow_nan=False))
        if plot and self.plots and self._evaluations:
            from posheads.callbacks.plots import plot_timeline

            plot_timeline(timeline, self._dir / "timeline.png")

    def _finish(self, trainer: Trainer) -> None:
        """The efficiency report: Spearman(HDA extension, perplexity) across the evaluated steps."""
        evals = self._evaluations
        steps = [e["step"] for e in evals]
        extension = [e["tracked_set"]["extension_bin"] for e in evals]
        area = [e["tracked_set"]["area"] for e in evals]
        ppl = [(e["ppl"] or {}).get("ppl") for e in evals]
        self._efficiency = efficiency_report(steps, extension, ppl, area)
        self._efficiency["extension_measure"] = "tracked set mean of hda_extension_bin"
        self._efficiency["ppl_source"] = self._ppl_mode
        if not trainer.is_global_zero:
            return
        self._write_timeline(plot=True)
        sp = self._efficiency["spearman_extension_ppl"]
        metrics = {
            "tracking/efficiency/spearman_extension_ppl": sp["rho"],
            "tracking/efficiency/spearman_p_value": sp["p_value"],
            "tracking/efficiency/spearman_n": sp["n"],
            "tracking/efficiency/spearman_area_ppl": self._efficiency["spearman_area_ppl"]["rho"],
        }
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        for logger in _wandb_loggers(trainer):
            columns = [
                "step",
                "hda_extension_bin",
                "hda_area",
                "jaccard_step0",
                "num_positional_heads",
                "ppl",
            ]
            data = [
                [
                    e["step"],
                    e["tracked_set"]["extension_bin"],
                    e["tracked_set"]["area"],
                    e["jaccard_step0"],
                    e["num_positional_heads"],
                    (e["ppl"] or {}).get("ppl"),
                ]
                for e in evals
            ]
            logger.log_table(key="tracking/timeline", columns=columns, data=data, step=step)
            if self.plots and self._dir is not None and (self._dir / "timeline.png").is_file():
                logger.log_image(
                    key="tracking/timeline_plot", images=[str(self._dir / "timeline.png")], step=step
                )
        sa = self._efficiency["spearman_area_ppl"]
        rank_zero_info(
            f"[tracking] efficiency: Spearman(HDA extension, perplexity) = {_rho(sp)}, Spearman(HDA area, perplexity) "
            f"= {_rho(sa)} over n = {sp['n']} evaluated steps; timeline: {self._dir / TIMELINE_FILE if self._dir else '-'}"
        )


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _rho(sp: dict[str, Any]) -> str:
    return "undefined" if sp["rho"] is None else f"{sp['rho']:+.3f} (p = {_fmt(sp['p_value'])})"


def _mask(heads: list[tuple[int, int]], shape: torch.Size) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, head in heads:
        mask[layer, head] = True
    return mask


def _wandb_loggers(trainer: Trainer) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
