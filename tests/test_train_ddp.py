"""DDP on CPU (gloo), two processes, through the CLI: both ranks end with identical weights.

Runs tests/scripts/ddp_train.py as a subprocess (in-process DDP inside pytest hangs on gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posheads.models import ModelConfig, TinySpec, load_model

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"
sys.path.insert(0, str(SCRIPT.parent))
from train_helpers import TINY_SPEC  # noqa: E402


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [6, 6]
    assert ranks[0]["tokens_seen"] == 6 * 2 * 2 * 64  # steps x ranks x batch x length
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # each rank reads its own shard
    initial = load_model(ModelConfig(name_or_path="tiny", tiny=TinySpec(**TINY_SPEC))).state_dict()
    changed = 0
    for key, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][key]), f"{key} differs between the ranks"
        changed += not torch.equal(value, initial[key])
    assert changed > 0.9 * len(initial)  # it trained
    run_dir = tmp_path / "ddp"
    assert (run_dir / "final" / "model.safetensors").is_file() and (run_dir / "report.json").is_file()
    assert "perplexity report" in proc.stdout  # printed once, by rank 0
    assert proc.stdout.count("perplexity report") == 1
