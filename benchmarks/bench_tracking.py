"""Cost of Positional-Head tracking during fine-tuning (:class:`posheads.callbacks.PositionalHeadTracker`).

Three measurements (``--what``, default ``quickstart pass``):

* ``quickstart`` -- the tracker's overhead at its configured cadence as a fraction of the training wall time, on
  ``configs/quickstart.yaml`` (tiny Llama pre-trained at 128 tokens, YaRN to 512; target <= 5 %). The training
  wall time runs from ``on_train_start`` to ``on_train_end`` (every callback included); the tracker's time is the
  sum of its evaluations' own wall times (probe pass, perplexity, analysis, images, timeline), which run inside
  the training loop. ``--baseline`` also trains the same number of steps without the tracker and compares.
  Needs the pre-trained model of ``configs/train/pretrain_tiny.yaml`` (``--pretrained``).
* ``pass`` -- the statistics pass against one plain forward on SmolLM2-135M at 2048 and 8192 tokens (targets
  <= 0.25x and <= 0.10x): :func:`bench_analysis.bench_model`, the analysis benchmark itself.
* ``tracker-pass`` -- the tracker's own probe pass (:func:`posheads.callbacks.run_probe_pass`: the full model
  with ``logits_to_keep=1`` and the collector installed) against a plain forward of the same sequences, on
  SmolLM2 (or ``--random-weights``: a randomly initialised model of SmolLM2's shape, where the weights cannot
  be had, e.g. a GPU machine without the GGUF file; the cost depends on the shape, not on the weights).

    HF_HUB_OFFLINE=1 python benchmarks/bench_tracking.py --what quickstart --pretrained runs/pretrain_tiny/final
    HF_HUB_OFFLINE=1 python benchmarks/bench_tracking.py --what pass --lengths 2048 8192
    python benchmarks/bench_tracking.py --what tracker-pass --random-weights --lengths 2048 8192
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


# ------------------------------------------------------------------------------------------- quickstart


def _clock_callbacks() -> tuple[Any, Any]:
    from lightning.pytorch import Callback

    class Start(Callback):
        t = 0.0

        def on_train_start(self, trainer, pl_module):
            self.t = time.perf_counter()

    class End(Callback):
        t = 0.0

        def on_train_end(self, trainer, pl_module):
            self.t = time.perf_counter()

    return Start(), End()


def _train(config: Path, args: list[str]) -> dict[str, Any]:
    from posheads.callbacks import PositionalHeadTracker
    from posheads.lit.cli import PosheadsCLI

    sys.argv = ["train.py"]
    cli = PosheadsCLI(args=["--config", str(config), *args])
    start, end = _clock_callbacks()
    cli.trainer.callbacks.insert(0, start)  # before the tracker's start evaluation
    cli.trainer.callbacks.append(end)  # after the tracker's end evaluation
    cli.fit()
    tracker = next((c for c in cli.trainer.callbacks if isinstance(c, PositionalHeadTracker)), None)
    out = {"steps": int(cli.trainer.global_step), "train_seconds": end.t - start.t, "tracker": None}
    if tracker is not None:
        timeline = tracker.timeline
        evals = timeline["evaluations"]
        out["tracker"] = {
            "every_n_steps": tracker.every_n_steps,
            "evaluations": len(evals),
            "seconds": timeline["overhead_seconds"],
            "seconds_per_evaluation": [round(e["seconds"], 3) for e in evals],
            "timeline": str(Path(cli.trainer.default_root_dir) / "tracking" / "timeline.json"),
            "efficiency": timeline["efficiency"],
            "rows": [
                {
                    "step": e["step"],
                    "heads": e["positional_heads"],
                    "jaccard_step0": round(e["jaccard_step0"], 3),
                    "extension_bin": e["tracked_set"]["extension_bin"],
                    "extension_distance": e["tracked_set"]["extension_distance"],
                    "area": e["tracked_set"]["area"],
                    "curve": e["tracked_set"]["curve"],
                    "ppl": (e["ppl"] or {}).get("ppl"),
                }
                for e in evals
            ],
        }
    return out


def bench_quickstart(
    pretrained: str, output_dir: str, max_steps: int | None, max_time: str | None, baseline: bool
) -> dict[str, Any]:
    import yaml

    if not Path(pretrained).is_dir():
        raise SystemExit(
            f"--pretrained {pretrained!r} is not a directory: run `python train.py --config "
            "configs/train/pretrain_tiny.yaml` first (it writes runs/pretrain_tiny/final)"
        )
    config = ROOT / "configs" / "quickstart.yaml"
    common = [
        "--model.lm.name_or_path",
        pretrained,
        "--run.output_dir",
        output_dir,
        "--report.enabled",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_train_steps",
        "0",
    ]
    if max_steps is not None:
        common += ["--trainer.max_steps", str(max_steps), "--model.optim.total_steps", str(max_steps)]
    if max_time is not None:
        common += ["--trainer.max_time", max_time]
    tracked = _train(config, [*common, "--run.name", "bench_tracked"])
    result: dict[str, Any] = {"tracked": tracked}
    t = tracked["tracker"]
    if t is None:
        raise SystemExit("configs/quickstart.yaml has no PositionalHeadTracker in trainer.callbacks")
    fraction = t["seconds"] / tracked["train_seconds"]
    print(
        f"quickstart: {tracked['steps']} steps in {tracked['train_seconds']:.1f} s of training; tracker every "
        f"{t['every_n_steps']} steps: {t['evaluations']} evaluations, {t['seconds']:.1f} s "
        f"({t['seconds_per_evaluation']}) = {100 * fraction:.2f} % of the training wall time (target <= 5 %)"
    )
    result["overhead_fraction"] = fraction
    if baseline:
        data = yaml.safe_load(config.read_text())
        data["trainer"]["callbacks"] = [
            c
            for c in data["trainer"].get("callbacks") or []
            if "PositionalHeadTracker" not in str(c.get("class_path"))
        ]
        plain_config = Path(output_dir) / "quickstart_without_tracker.yaml"
        plain_config.parent.mkdir(parents=True, exist_ok=True)
        plain_config.write_text(yaml.safe_dump(data, sort_keys=False))
        steps = [
            "--trainer.max_steps",
            str(tracked["steps"]),
            "--model.optim.total_steps",
            str(tracked["steps"]),
            "--trainer.max_time",
            "null",
        ]
        plain = _train(plain_config, [*common, *steps, "--run.name", "bench_plain"])
        result["plain"] = plain
        extra = tracked["train_seconds"] / plain["train_seconds"] - 1
        print(
            f"without the tracker: {plain['steps']} steps in {plain['train_seconds']:.1f} s -> the tracked run took "
            f"{100 * extra:+.2f} % wall time (noisy on a shared CPU; the tracker's own time above is the measurement)"
        )
        result["wall_time_increase"] = extra
    print("HDA timeline (tracked set):")
    for r in t["rows"]:
        print(
            f"  step {r['step']:>4}: heads {r['heads']} J0={r['jaccard_step0']:.2f} extension bin "
            f"{r['extension_bin']} (<= {r['extension_distance']} tokens) area {r['area']:.3f} ppl "
            f"{r['ppl'] if r['ppl'] is None else round(r['ppl'], 3)}"
        )
    sp = t["efficiency"]["spearman_extension_ppl"]
    print(f"Spearman(HDA extension, ppl) = {sp['rho']} (p = {sp['p_value']}, n = {sp['n']})")
    return result


# ------------------------------------------------------------------------------------------- passes


def smollm2_shaped(random_weights: bool, device: str, dtype: torch.dtype):
    """SmolLM2-135M (offline GGUF) or a randomly initialised Llama of the same shape."""
    if not random_weights:
        from posheads.models import ModelConfig, load_model

        return load_model(ModelConfig()).to(device=device, dtype=dtype).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_tracker_pass(
    lengths: list[int], rows: int, keys_per_bin: int | None, repeats: int, random_weights: bool, dtype: str
) -> list[dict[str, Any]]:
    from posheads.callbacks import ProbeSet, run_probe_pass
    from posheads.heads import HeadsConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = smollm2_shaped(random_weights, device, torch_dtype)
    cfg = HeadsConfig(rows_per_sequence=rows, keys_per_bin=keys_per_bin)
    print(
        f"tracker pass: device={device} dtype={dtype} threads={torch.get_num_threads()} rows={rows} "
        f"keys_per_bin={keys_per_bin} weights={'random' if random_weights else 'SmolLM2'}"
    )

    def forward(ids, want_logits):
        out = model(input_ids=ids, use_cache=False, logits_to_keep=0 if want_logits else 1)
        return out.logits if want_logits else None

    results = []
    gen = torch.Generator().manual_seed(0)
    for length in lengths:
        ids = torch.randint(0, 49152, (1, length), generator=gen)
        probe = ProbeSet(ids, ["random"])
        plain, tracked = [], []
        with torch.no_grad():
            forward(ids[:, :128].to(device), False)  # warm-up
            run_probe_pass(model, forward, ProbeSet(ids[:, :256], ["w"]), cfg)
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                forward(ids.to(device), False)
                _sync(device)
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                run_probe_pass(model, forward, probe, cfg, device=device)
                _sync(device)
                tracked.append(time.perf_counter() - t0)
        p, t = min(plain), min(tracked)
        row = {"length": length, "plain_s": p, "pass_s": t, "stats_over_forward": (t - p) / p}
        results.append(row)
        print(
            f"  L={length}: plain forward {p:.3f} s | tracker probe pass {t:.3f} s | statistics = {(t - p) / p:.3f}x a forward"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--what", nargs="+", default=["quickstart", "pass"], choices=["quickstart", "pass", "tracker-pass"]
    )
    parser.add_argument("--pretrained", default="runs/pretrain_tiny/final")
    parser.add_argument(
        "--output-dir", default=None, help="run directory parent (default: a temporary directory)"
    )
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--max-time", default=None, help='e.g. "00:00:03:30" (default: the config\'s)')
    parser.add_argument("--baseline", action="store_true", help="also train without the tracker and compare")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--keys-per-bin", type=int, default=16, help="0 = all keys (exact)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    results: dict[str, Any] = {}
    if "quickstart" in args.what:
        out = args.output_dir or tempfile.mkdtemp(prefix="bench_tracking_")
        results["quickstart"] = bench_quickstart(
            args.pretrained, out, args.max_steps, args.max_time, args.baseline
        )
    kpb = args.keys_per_bin or None
    if "pass" in args.what:
        from bench_analysis import bench_model

        bench_model(args.lengths, args.rows, kpb, args.repeats)
    if "tracker-pass" in args.what:
        results["tracker_pass"] = bench_tracker_pass(
            args.lengths, args.rows, kpb, args.repeats, args.random_weights, args.dtype
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
