"""The tracker under two-process DDP (CPU, gloo) equals the single-process tracker on the same probe set.

The DDP run is tests/scripts/ddp_tracking.py launched as a subprocess (in-process DDP inside pytest hangs on
gloo); the single-process reference runs the same script's ``run`` in this process. Only the step-0 evaluation
is compared: after one step the DDP model has seen a global batch twice as large.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_tracking.py"
sys.path.insert(0, str(SCRIPT.parent))


@pytest.mark.subprocess
@pytest.mark.slow
def test_ddp_tracking_equals_single_process(tmp_path, monkeypatch):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(ddp_dir), "2"], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    ranks = [json.loads((ddp_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [[0, 2], [0, 2]]
    # 5 probe sequences, batch 1: ranks run 3 forwards each (rank 1: 2 sequences + 1 padding forward)
    assert [r["forwards_per_rank"] for r in ranks] == [[3, 3], [3, 3]]
    assert (
        ranks[0]["tracked_heads"] == ranks[1]["tracked_heads"]
        and ranks[0]["probe_names"] == ranks[1]["probe_names"]
    )
    output = proc.stdout + proc.stderr
    assert (
        output.count("[tracking] efficiency") == 1 and output.count("[tracking] step 0:") == 1
    )  # rank 0 only

    import ddp_tracking

    monkeypatch.setattr(sys, "argv", ["train.py"])
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks (OMP_NUM_THREADS=1): the same float32 kernels, bit for bit
    try:
        ddp_tracking.run(single_dir, 1)
    finally:
        torch.set_num_threads(threads)

    ddp_run, single_run = ddp_dir / "track2" / "tracking", single_dir / "track1" / "tracking"
    ddp_stats = torch.load(ddp_run / "stats_step000000.pt", weights_only=True)
    single_stats = torch.load(single_run / "stats_step000000.pt", weights_only=True)
    assert float(single_stats["rows"]) == 5 * 16  # every probe sequence counted once
    for name, value in single_stats.items():
        torch.testing.assert_close(
            ddp_stats[name], value, rtol=1e-9, atol=1e-9, msg=f"PairStats.{name} differs"
        )

    ddp_tl = json.loads((ddp_run / "timeline.json").read_text())
    single_tl = json.loads((single_run / "timeline.json").read_text())
    assert ddp_tl["probe"] == single_tl["probe"] and ddp_tl["tracked_heads"] == single_tl["tracked_heads"]
    d0, s0 = ddp_tl["evaluations"][0], single_tl["evaluations"][0]
    assert d0["step"] == s0["step"] == 0
    assert d0["positional_heads"] == s0["positional_heads"] and d0["heads"].keys() == s0["heads"].keys()
    for key in ("scores", "score_excess"):
        torch.testing.assert_close(torch.tensor(d0[key]), torch.tensor(s0[key]), rtol=1e-9, atol=1e-12)
    for name, head in s0["heads"].items():
        assert d0["heads"][name]["hda_extension_bin"] == head["hda_extension_bin"]
        torch.testing.assert_close(
            torch.tensor(d0["heads"][name]["hda"]), torch.tensor(head["hda"]), rtol=1e-9, atol=1e-12
        )
    # the module's validation perplexity is summed over the ranks' shards of the same windows
    assert d0["ppl"]["tokens"] == s0["ppl"]["tokens"] and d0["ppl"]["nll"] == pytest.approx(
        s0["ppl"]["nll"], rel=1e-5
    )
