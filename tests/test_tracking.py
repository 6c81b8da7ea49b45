"""The Positional-Head tracking callback: it only observes (same weights with and without it, and the check can
fail), its probe pass equals :func:`posheads.heads.identify_positional_heads` and shards add up to the whole,
the timeline / images / logged keys are written through the CLI, the efficiency statistics, resume state and
option validation. DDP: tests/test_tracking_ddp.py."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback

from posheads.callbacks import (
    PositionalHeadTracker,
    ProbeSet,
    efficiency_report,
    run_probe_pass,
    select_probe,
    shard_batches,
    spearman,
)
from posheads.callbacks.efficiency import steps_to_within, trapezoid_area
from posheads.heads import HeadsConfig, attention_modules, identify_positional_heads
from posheads.models import tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_helpers import tiny_config, write_config  # noqa: E402

SPEC = {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
HEADS = {"rows_per_sequence": 12, "keys_per_bin": 4, "seed": 1}


# ------------------------------------------------------------------------------------ a minimal run


class TinyLM(L.LightningModule):
    """A tiny Llama with attention dropout, so that the trained weights depend on the RNG and on the train mode."""

    def __init__(self, length: int = 48):
        super().__init__()
        self.model = tiny_llama(**SPEC)
        for module in attention_modules(self.model).values():
            module.attention_dropout = 0.2  # sdpa dropout in training
        self.target_length = length

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch, use_cache=False).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def on_train_start(self):
        self.model.train()


def _data(n: int = 12, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(5))


def _fit(tmp_path: Path, callbacks: list[Callback], steps: int = 4) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    module = TinyLM()
    loader = torch.utils.data.DataLoader(_data(), batch_size=2, shuffle=True)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _tracker(tmp_path: Path, **kwargs) -> PositionalHeadTracker:
    kwargs.setdefault("heads", HeadsConfig(**HEADS))
    tracker = PositionalHeadTracker(
        every_n_steps=2, ppl="probe", output_dir=str(tmp_path / "tracking"), **kwargs
    )
    tracker.set_probe(_data(3, 48))
    return tracker


class _ConsumesRng(Callback):
    """A bad observer: draws from the global RNG after every batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.rand(1)


class _LeavesEvalMode(Callback):
    """A bad observer: leaves the model in eval mode (no dropout) after step 2."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            pl_module.eval()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tracker_does_not_change_the_trained_weights(tmp_path):
    plain = _fit(tmp_path / "plain", [])
    tracker = _tracker(tmp_path / "tracked")
    tracked = _fit(tmp_path / "tracked", [tracker])
    assert [e["step"] for e in tracker.timeline["evaluations"]] == [0, 2, 4]
    assert _same(plain, tracked), "the tracking callback changed the trained weights"
    # what it wrote: the timeline (as held in memory), an image pair per evaluation, the timeline plot
    out = tmp_path / "tracked" / "tracking"
    assert json.loads((out / "timeline.json").read_text()) == json.loads(json.dumps(tracker.timeline))
    for step in (0, 2, 4):
        for stem in ("score_heatmap", "hda"):
            assert (out / f"{stem}_step{step:06d}.png").stat().st_size > 1000
    assert (out / "timeline.png").stat().st_size > 1000
    assert tracker.timeline["efficiency"]["n_evaluations"] == 3
    # the comparison is sensitive to exactly what the callback must protect: the RNG stream and the train mode
    assert not _same(plain, _fit(tmp_path / "rng", [_ConsumesRng()]))
    assert not _same(plain, _fit(tmp_path / "eval", [_LeavesEvalMode()]))


# ------------------------------------------------------------------------------------ the probe pass


def _forward(model):
    def forward(ids, want_logits):
        out = model(input_ids=ids, use_cache=False)
        return out.logits if want_logits else None

    return forward


def test_probe_pass_equals_identify_and_shards_add_up():
    model = tiny_llama(**SPEC)
    ids = _data(5, 40)
    cfg = HeadsConfig(**HEADS)
    probe = ProbeSet(ids, [f"s{i}" for i in range(5)], cfg.seed)
    whole = run_probe_pass(model, _forward(model), probe, cfg, compute_nll=True)
    reference = identify_positional_heads(model, ids, cfg, progress=False)
    for name, value in reference.stats.tensors().items():
        torch.testing.assert_close(whole.stats.tensors()[name], value, rtol=1e-12, atol=1e-12)
    # the sink pairs (sink_keys) and the geometry null are collected and reduced like the statistics
    assert cfg.sink_keys == 1 and whole.sink_stats is not None and whole.geometry_stats is not None
    for part, ref in (
        (whole.sink_stats, reference.sink_stats),
        (whole.geometry_stats, reference.geometry_stats),
    ):
        assert ref is not None and float(part.moments.abs().sum()) > 0
        for name, value in ref.tensors().items():
            torch.testing.assert_close(part.tensors()[name], value, rtol=1e-12, atol=1e-12)
    assert float(whole.stats.rows) == 5 * 12 and whole.forwards == 5

    # two "ranks" with reduce=False merge to the whole (rank 1 runs a padding forward that adds nothing)
    parts = [
        run_probe_pass(
            model, _forward(model), probe, cfg, rank=r, world_size=2, compute_nll=True, reduce=False
        )
        for r in (0, 1)
    ]
    assert [p.forwards for p in parts] == [3, 3]
    merged = parts[0].stats.clone().merge(parts[1].stats)
    for name, value in whole.stats.tensors().items():
        torch.testing.assert_close(merged.tensors()[name], value, rtol=1e-10, atol=1e-10)
    assert parts[0].tokens + parts[1].tokens == whole.tokens == 5 * 39
    assert parts[0].nll_sum + parts[1].nll_sum == pytest.approx(whole.nll_sum, rel=1e-12)

    # the probe's NLL is the model's own loss on those sequences
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert whole.nll == pytest.approx(float(loss), rel=1e-5)


def test_shard_batches_and_probe_selection():
    assert shard_batches(5, 2, 0, 2) == ([[0, 1], [4]], 2)
    assert shard_batches(5, 2, 1, 2) == ([[2, 3]], 2)  # one padding forward
    assert shard_batches(3, 1, 2, 4) == ([[2]], 1) and shard_batches(3, 1, 3, 4) == ([], 1)
    with pytest.raises(ValueError, match="rank=2"):
        shard_batches(3, 1, 2, 2)
    cands = torch.arange(40).view(10, 4)
    a = select_probe(cands, [f"d{i}" for i in range(10)], 3, seed=7)
    b = select_probe(cands, [f"d{i}" for i in range(10)], 3, seed=7)
    assert torch.equal(a.input_ids, b.input_ids) and a.names == b.names and len(a) == 3
    assert a.names == sorted(a.names, key=lambda n: int(n[1:]))  # original order kept
    assert len(select_probe(cands, [str(i) for i in range(10)], 30, seed=0)) == 10


# ------------------------------------------------------------------------------------ through the CLI


def _cli(monkeypatch, tmp_path: Path, name: str, tracker: dict, **overrides):
    from posheads.lit.cli import PosheadsCLI

    monkeypatch.setattr(sys, "argv", ["train.py"])
    config = tiny_config(tmp_path, name, steps=6, **{"trainer.callbacks": [tracker], **overrides})
    cli = PosheadsCLI(args=["--config", str(write_config(tmp_path / f"{name}.yaml", config))])
    cli.fit()
    return cli


@pytest.mark.slow  # W&B offline start-up and the CLI's data pipeline: ~20-30 s on 2 busy cores
def test_cli_run_writes_timeline_images_and_logged_keys(monkeypatch, tmp_path):
    tracker = {
        "class_path": "posheads.callbacks.PositionalHeadTracker",
        "init_args": {"every_n_steps": 3, "num_sequences": 2, "heads": HEADS},
    }
    cli = _cli(
        monkeypatch, tmp_path, "run", tracker, **{"wandb.project": "posheads-test", "wandb.mode": "offline"}
    )
    run_dir = tmp_path / "run"
    out = run_dir / "tracking"
    timeline = json.loads((out / "timeline.json").read_text())
    evals = timeline["evaluations"]
    assert [e["step"] for e in evals] == [0, 3, 6] and [e["kind"] for e in evals] == [
        "start",
        "periodic",
        "periodic",
    ]
    assert timeline["ppl_source"] == "module" and all(e["ppl"]["tokens"] > 0 for e in evals)
    assert timeline["probe"]["sequences"] == 2 and timeline["probe"]["length"] == 64
    assert len(timeline["bin_edges"]) == 7  # distances 0..63: bins 0, 1, 2-3, ..., 32-63
    tracked = timeline["tracked_heads"]
    assert (
        tracked == timeline["step0_heads"] == evals[0]["positional_heads"] and len(tracked) == 1
    )  # 10 % of 8
    for e in evals:
        assert set(tracked) <= set(e["heads"]) and len(e["scores"]) == 2 and len(e["scores"][0]) == 4
        assert len(e["tracked_set"]["curve"]) == 7 and 0.0 <= e["jaccard_step0"] <= 1.0
        h = e["heads"][tracked[0]]
        assert e["tracked_set"]["extension_bin"] == h["hda_extension_bin"]  # a set of one head
        assert e["tracked_set"]["area"] == pytest.approx(sum(v for v in h["hda"][1:] if v is not None))
        # the sink share: per head, and the set's mean (a set of one head); sinks are outside the statistics
        layer, head = (int(x) for x in tracked[0][1:].split("H"))  # "L{layer}H{head}"
        assert h["sink_share"] == e["sink_share"][layer][head]
        assert e["sink_keys"] == 1 and e["tracked_set"]["sink_share"] == h["sink_share"]
        assert 0.0 < h["sink_share"] < 1.0 and h["score_with_sinks"] is not None
        assert e["tracked_set"]["null_geometry"] == h["null_geometry"] is not None
    assert evals[0]["jaccard_step0"] == 1.0
    eff = timeline["efficiency"]
    assert eff["spearman_extension_ppl"]["n"] == 3 and eff["ppl"]["first"] == evals[0]["ppl"]["ppl"]
    # the module's own validation at the end agrees with the tracker's last perplexity (same windows, same model)
    last_val = float(cli.trainer.callback_metrics["val/ppl"])
    assert evals[-1]["ppl"]["ppl"] == pytest.approx(last_val, rel=1e-4)
    for step in (0, 3, 6):
        for stem in ("score_heatmap", "hda"):
            assert (out / f"{stem}_step{step:06d}.png").stat().st_size > 1000
    assert (out / "timeline.png").stat().st_size > 1000

    with open(run_dir / "csv" / "version_0" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    keys = set(rows[0])
    name = tracked[0]
    for key in (
        "tracking/set/hda_bin06",
        "tracking/set/hda_extension_bin",
        "tracking/set/hda_area",
        "tracking/set/score",
        "tracking/set/sink_share",
        "tracking/set/score_with_sinks",
        "tracking/set/null_geometry",
        f"tracking/head/{name}/sink_share",
        "tracking/current_set/hda_extension_distance",
        f"tracking/head/{name}/hda_bin03",
        f"tracking/head/{name}/score",
        "tracking/jaccard_step0",
        "tracking/val_ppl",
        "tracking/num_positional_heads",
        "tracking/seconds",
    ):
        assert key in keys, key
    logged = [r for r in rows if r.get("tracking/optimizer_step")]
    assert [float(r["tracking/optimizer_step"]) for r in logged] == [0.0, 3.0, 6.0]
    media = list((run_dir / "wandb").glob("offline-run-*/files/media/images/tracking/*.png"))
    assert {p.name.split("_")[0] for p in media} >= {"score", "hda"}, media


def test_head_table_and_resume_state(monkeypatch, tmp_path):
    table = tmp_path / "heads.csv"
    table.write_text("layer,head,score,z,positional\n1,2,0.5,2.0,true\n0,0,0.1,0.1,false\n1,3,0.4,1.5,1\n")
    tracker = {
        "class_path": "posheads.callbacks.PositionalHeadTracker",
        "init_args": {
            "every_n_steps": 6,
            "num_sequences": 1,
            "heads": HEADS,
            "head_table": str(table),
            "ppl": "probe",
            "plots": False,
        },
    }
    cli = _cli(monkeypatch, tmp_path, "table", tracker)
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, PositionalHeadTracker))
    timeline = cb.timeline
    assert timeline["tracked_heads"] == ["L1H2", "L1H3"] and [e["step"] for e in timeline["evaluations"]] == [
        0,
        6,
    ]
    assert all("jaccard_table" in e and e["ppl"]["source"] == "probe" for e in timeline["evaluations"])
    assert not (tmp_path / "table" / "tracking" / "timeline.png").exists()

    # the state travels in checkpoints: a restored tracker keeps the timeline and the tracked set
    restored = PositionalHeadTracker(head_table=str(table))
    restored.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    assert restored._tracked == [(1, 2), (1, 3)] and restored._evaluated(6) and not restored._evaluated(3)
    assert restored.state_dict()["evaluations"] == timeline["evaluations"]


# ------------------------------------------------------------------------------------ efficiency


def test_efficiency_statistics():
    from scipy.stats import spearmanr

    ext, ppl = [1, 2, 2, 4, 5], [30.0, 20.0, 21.0, 11.4, 11.0]
    sp = spearman(ext, ppl)
    ref = spearmanr(ext, ppl)
    assert (
        sp["n"] == 5
        and sp["rho"] == pytest.approx(ref.statistic)
        and sp["p_value"] == pytest.approx(ref.pvalue)
    )
    assert sp["rho"] < -0.9
    assert spearman([1, 2], [3, 4]) == {"rho": None, "p_value": None, "n": 2}
    assert spearman([1, 1, 1], [3, 4, 5])["rho"] is None  # constant side: undefined
    assert spearman([1, None, 3, 4], [1, 2, float("nan"), 3])["n"] == 2
    assert steps_to_within([0, 10, 20, 30], [100.0, 50.0, 41.0, 40.0]) == 20
    assert steps_to_within([0, 10], [None, None]) is None
    assert trapezoid_area([0, 10, 20], [1.0, 3.0, 3.0]) == pytest.approx(50.0)
    report = efficiency_report([0, 10, 20, 30, 40], ext, ppl, area=[0.5, 1, 1, 2, 3])
    assert report["spearman_extension_ppl"]["rho"] == pytest.approx(ref.statistic)
    assert report["ppl"]["final"] == 11.0 and report["ppl"]["steps_to_within_5pct"] == 30
    assert report["n_evaluations"] == 5 and "spearman_area_ppl" in report


def test_option_validation():
    with pytest.raises(ValueError, match="tracking.every_n_steps=0"):
        PositionalHeadTracker(every_n_steps=0)
    with pytest.raises(ValueError, match="tracking.ppl='bad'"):
        PositionalHeadTracker(ppl="bad")
    with pytest.raises(ValueError, match="tracking.length=1"):
        PositionalHeadTracker(length=1)
    with pytest.raises(ValueError, match="heads.tau"):
        PositionalHeadTracker(heads={"tau": 2.0})
    assert PositionalHeadTracker(heads={"rows_per_sequence": 8}).heads.rows_per_sequence == 8
