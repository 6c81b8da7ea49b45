"""Two-process DDP training on CPU (gloo) through the CLI; run by tests/test_train_ddp.py as a subprocess.

    python tests/scripts/ddp_train.py OUT_DIR

Lightning's launcher re-runs this script for rank 1. Each rank writes ``OUT_DIR/rank<r>.pt`` (its final weights,
the first training batch it saw, its step and token counts). In-process DDP inside pytest hangs on gloo, hence
a script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import tiny_config, write_config  # noqa: E402

from posheads.lit.cli import PosheadsCLI  # noqa: E402


class FirstBatch(Callback):
    def __init__(self) -> None:
        self.batch: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.batch is None:
            self.batch = batch["input_ids"].detach().cpu().clone()


def main(out: Path) -> None:
    steps = 6
    config = tiny_config(
        out,
        "ddp",
        steps=steps,
        **{
            "trainer.strategy": "ddp",
            "trainer.devices": 2,
            "trainer.accelerator": "cpu",
            "data.batch_size": 2,
            "report.enabled": True,
            "report.unscaled_baseline": False,
        },
    )
    path = write_config(out / "ddp.yaml", config)
    cli = PosheadsCLI(args=["--config", str(path)])
    first = FirstBatch()
    cli.trainer.callbacks.append(first)
    cli.fit()
    rank = cli.trainer.global_rank
    torch.save(
        {
            "state_dict": {k: v.detach().cpu().clone() for k, v in cli.model.model.state_dict().items()},
            "first_batch": first.batch,
            "global_step": cli.trainer.global_step,
            "world_size": cli.trainer.world_size,
            "tokens_seen": cli.model._tokens_seen,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
