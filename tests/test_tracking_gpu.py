"""The tracker on a CUDA device (skipped without one): it leaves the trained weights alone (CUDA RNG restored,
dropout on), and under FSDP its probe forward goes through the strategy's wrapper and gives the statistics of
the plain single-device pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from posheads.callbacks import PositionalHeadTracker  # noqa: E402
from posheads.heads import HeadsConfig  # noqa: E402
from test_tracking import HEADS, TinyLM, _data  # noqa: E402

pytestmark = pytest.mark.gpu


def _fit_gpu(tmp_path: Path, callbacks, strategy="auto", steps: int = 4, precision="32-true"):
    L.seed_everything(0, verbose=False)
    module = TinyLM()
    loader = torch.utils.data.DataLoader(_data(), batch_size=2, shuffle=True)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="gpu",
        devices=1,
        strategy=strategy,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        deterministic="warn",  # the statistics use bincount, which has no deterministic CUDA kernel
    )
    trainer.fit(module, loader)
    return {k: v.detach().float().cpu().clone() for k, v in module.model.state_dict().items()}


def _tracker(tmp_path: Path, **kwargs) -> PositionalHeadTracker:
    tracker = PositionalHeadTracker(
        every_n_steps=2,
        ppl="probe",
        output_dir=str(tmp_path / "tracking"),
        heads=HeadsConfig(**HEADS),
        save_stats=True,
        **kwargs,
    )
    tracker.set_probe(_data(3, 48))
    return tracker


def test_gpu_tracker_does_not_change_the_trained_weights(tmp_path):
    plain = _fit_gpu(tmp_path / "plain", [])
    tracker = _tracker(tmp_path / "tracked", plots=False)
    tracked = _fit_gpu(tmp_path / "tracked", [tracker])
    assert [e["step"] for e in tracker.timeline["evaluations"]] == [0, 2, 4]
    # CUDA attention backward may add in a different order from run to run: tolerate rounding, not a different
    # dropout stream or a lost train mode (those change the weights by orders of magnitude more)
    for name, value in plain.items():
        torch.testing.assert_close(tracked[name], value, rtol=1e-5, atol=1e-6, msg=f"{name} changed")


def test_gpu_fsdp_probe_pass_equals_single_device(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    single = _tracker(tmp_path / "single", plots=True)
    _fit_gpu(tmp_path / "single", [single], steps=2)
    fsdp = _tracker(tmp_path / "fsdp", plots=True)
    strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, sharding_strategy="FULL_SHARD")
    _fit_gpu(tmp_path / "fsdp", [fsdp], strategy=strategy, steps=2)
    a = torch.load(tmp_path / "single" / "tracking" / "stats_step000000.pt", weights_only=True)
    b = torch.load(tmp_path / "fsdp" / "tracking" / "stats_step000000.pt", weights_only=True)
    for name in a:
        torch.testing.assert_close(
            b[name], a[name], rtol=1e-4, atol=1e-4, msg=f"PairStats.{name} differs under FSDP"
        )
    ta = json.loads((tmp_path / "single" / "tracking" / "timeline.json").read_text())
    tb = json.loads((tmp_path / "fsdp" / "tracking" / "timeline.json").read_text())
    assert ta["tracked_heads"] == tb["tracked_heads"]
    assert tb["evaluations"][0]["ppl"]["ppl"] == pytest.approx(ta["evaluations"][0]["ppl"]["ppl"], rel=1e-4)
    assert (tmp_path / "fsdp" / "tracking" / "timeline.png").is_file()
