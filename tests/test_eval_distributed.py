"""evaluate.py over two processes (torchrun, gloo on CPU) writes the results.json of one process: the same
perplexity, long-context perplexity, passkey, needle and retrieval-suite rows bit for bit, the same trial records, the same conditions, and the same head
table up to float64 summation order; only rank 0 writes and prints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posheads.eval.distributed import SINGLE, Ranks, init_from_env

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "eval" / "ci_tiny.yaml"


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _evaluate(launcher: list[str], out: Path) -> subprocess.CompletedProcess:
    args = [
        str(ROOT / "evaluate.py"),
        "--config",
        str(CONFIG),
        "--output.dir",
        str(out),
        "--output.plots",
        "false",
    ]
    proc = subprocess.run(
        [*launcher, *args], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_processes_write_the_single_process_results(tmp_path):
    two = _evaluate(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        tmp_path / "two",
    )
    _evaluate([sys.executable], tmp_path / "one")
    one_res = json.loads((tmp_path / "one" / "results.json").read_text())
    two_res = json.loads((tmp_path / "two" / "results.json").read_text())

    assert one_res["status"] == two_res["status"] == "complete"
    assert two_res["protocol"]["processes"] == 2 and one_res["protocol"]["processes"] == 1
    assert one_res["conditions"] == two_res["conditions"]
    for section in ("perplexity", "perplexity_lc", "passkey", "needle", "retrieval"):
        assert one_res[section], section
        assert two_res[section] == one_res[section], (
            section
        )  # bit for bit: the same per-item numbers, same order
    assert two_res["perplexity_lc_intervals"] == one_res["perplexity_lc_intervals"]
    assert (
        two_res["retrieval_summary"] == one_res["retrieval_summary"] and one_res["retrieval_summary"]["cells"]
    )
    one_trials = (tmp_path / "one" / "trials.jsonl").read_text().splitlines()
    assert (tmp_path / "two" / "trials.jsonl").read_text().splitlines() == one_trials and one_trials

    # identification: statistics summed over the two ranks' probe batches (float64 order only)
    assert len(one_res["heads"]) == len(two_res["heads"]) == 16
    for a, b in zip(one_res["heads"], two_res["heads"]):
        assert (a["layer"], a["head"], a["positional"]) == (b["layer"], b["head"], b["positional"])
        for key, value in a.items():
            if isinstance(value, float):
                assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
            else:
                assert b[key] == value, key
    # only rank 0 writes files and prints the summary
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir()
    )
    assert two.stdout.count("results: ") == 1


def test_ranks_map_keeps_order_and_splits_items():
    assert list(SINGLE.map(lambda x: x * x, [1, 2, 3])) == [1, 4, 9]
    assert list(Ranks(1, 3).mine(8)) == [1, 4, 7]
    with pytest.raises(ValueError, match="rank=2"):
        Ranks(2, 2)


def test_init_from_env_without_a_launcher_is_single(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks, device = init_from_env("cpu")
    assert ranks == SINGLE and device == torch.device("cpu")
    ranks, device = init_from_env("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
