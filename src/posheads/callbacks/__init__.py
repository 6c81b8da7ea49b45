"""Lightning callbacks: live Positional-Head tracking during fine-tuning (:class:`PositionalHeadTracker`)."""

from posheads.callbacks.efficiency import efficiency_report, spearman
from posheads.callbacks.probe import ProbePassResult, ProbeSet, run_probe_pass, select_probe, shard_batches
from posheads.callbacks.tracking import PPL_MODES, PositionalHeadTracker, head_name

__all__ = [
    "PPL_MODES",
    "PositionalHeadTracker",
    "ProbePassResult",
    "ProbeSet",
    "efficiency_report",
    "head_name",
    "run_probe_pass",
    "select_probe",
    "shard_batches",
    "spearman",
]
