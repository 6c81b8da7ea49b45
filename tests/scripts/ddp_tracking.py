"""Two-process DDP (CPU, gloo) training through the CLI with the Positional-Head tracker; run by
tests/test_tracking_ddp.py as a subprocess (in-process DDP inside pytest hangs on gloo).

    python tests/scripts/ddp_tracking.py OUT_DIR [DEVICES]

Trains the tiny run of ``train_helpers.tiny_config`` for 2 steps on ``DEVICES`` (default 2) processes with a
:class:`~posheads.callbacks.PositionalHeadTracker` (5 probe sequences, so that the ranks get unequal shards and
one rank runs a padding forward; ``save_stats``), and writes ``OUT_DIR/rank<r>.json`` with what each rank saw.
Lightning's launcher re-runs this script for rank 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import tiny_config, write_config  # noqa: E402

from posheads.lit.cli import PosheadsCLI  # noqa: E402

TRACKER = {
    "class_path": "posheads.callbacks.PositionalHeadTracker",
    "init_args": {
        "every_n_steps": 100,  # evaluations at the start (step 0) and the end (step 2)
        "num_sequences": 5,
        "heads": {"rows_per_sequence": 16, "keys_per_bin": 4, "seed": 3},
        "ppl": "module",
        "save_stats": True,
        "plots": False,
    },
}


def run(out: Path, devices: int) -> PosheadsCLI:
    overrides = {
        "trainer.devices": devices,
        "trainer.accelerator": "cpu",
        "trainer.callbacks": [TRACKER],
        "data.val_windows": 6,
        "data.batch_size": 2,
    }
    if devices > 1:
        overrides["trainer.strategy"] = "ddp"
    config = tiny_config(out, f"track{devices}", steps=2, **overrides)
    path = write_config(out / f"track{devices}.yaml", config)
    cli = PosheadsCLI(args=["--config", str(path)])
    cli.fit()
    return cli


def main(out: Path, devices: int) -> None:
    cli = run(out, devices)
    trainer = cli.trainer
    tracker = next(c for c in trainer.callbacks if type(c).__name__ == "PositionalHeadTracker")
    info = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "steps": [e["step"] for e in tracker.timeline["evaluations"]],
        "forwards_per_rank": [e["forwards_per_rank"] for e in tracker.timeline["evaluations"]],
        "tracked_heads": tracker.timeline["tracked_heads"],
        "probe_names": tracker.probe.names,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
