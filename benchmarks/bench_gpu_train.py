"""Training throughput on a CUDA device: the LightningModule's step against a plain PyTorch loop, SmolLM2-135M,
bf16-mixed, SDPA, gradient checkpointing on / off, LoRA and full fine-tuning, at 2k / 8k / 16k tokens.

    python benchmarks/bench_gpu_train.py [--lengths 2048 8192 16384] [--steps 10] [--warmup 3] \
        [--weights auto|smollm2|random] [--json out.json]

Skips (exit 0, printing why) without CUDA. For each (length, checkpointing, LoRA/full) both sides train the
same model (same seed, float32 master weights, ``torch.autocast(bfloat16)``) on the same random token ids
(one sequence of ``L`` tokens per step), with the same AdamW groups (unfused, as Lightning's mixed precision
needs), warm-up + cosine schedule, gradient clipping at 1.0 and the same loss
(:meth:`posheads.lit.LengthExtensionModule.training_loss`: the chunked loss from 4096 tokens). The plain loop
is what Lightning automates: autocast forward + loss, backward, clip, optimizer step, scheduler step, zero
grad. The Lightning side is ``Trainer.fit(precision="bf16-mixed")`` of the module with its logging
(``train/loss``, ``lr``, ``train/grad_norm``, ``train/tokens``) but no logger, checkpoint or progress bar.
``--warmup`` steps untimed, then ``--steps`` timed between ``cuda.synchronize()`` calls.

Reported per row: tokens/s of each side, the ratio Lightning / plain (target >= 0.95), and MFU = model FLOPs
per second / the device's peak dense bf16 FLOP/s (989 TFLOP/s for H100 / H200 SXM, 312 for A100; else
``--peak-tflops``). Model FLOPs per step (``T`` tokens, ``P`` parameters in matmuls incl. the LM head,
``A = layers x 2 x T x L x heads x head_dim`` the causal attention's forward FLOPs): full fine-tuning
``6 P T + 3 A``; LoRA ``4 P T + 2 P_lora T + 3 A`` (frozen weights get no weight gradient). Recomputation by
gradient checkpointing is not counted (model FLOPs, not hardware FLOPs).

``--what tracker``: the overhead of :class:`posheads.callbacks.PositionalHeadTracker` in a GPU fine-tuning run
like ``configs/train/smollm2_yarn_16k_lora.yaml`` (LoRA r=8, bf16-mixed, gradient checkpointing, 1 x
``--tracker-length`` tokens per micro-batch, 4 accumulated, ``--tracker-steps`` optimizer steps), tracked every
``--tracker-every`` steps (4 probe sequences, 64 rows, 16 keys per bin, probe perplexity) against the same run
without the tracker: wall time of ``fit`` (from ``on_train_start`` to ``on_train_end``) with / without - 1
(target <= 5 %), and the tracker's own evaluation seconds.

``--weights auto`` uses the offline SmolLM2 when it loads, else a randomly initialised Llama of SmolLM2's
shape (the device machine may lack the GGUF file; throughput does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEVICE = "cuda"  # --device cpu: a smoke run of the code paths on the CPU (with --weights tiny)


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _accelerator() -> str:
    return "gpu" if DEVICE == "cuda" else "cpu"


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)):
        if key in name:
            return tflops * 1e12
    return None


def build_model(weights: str, checkpointing: bool, lora: bool) -> tuple[Any, str]:
    """SmolLM2 (or a random model of its shape), with gradient checkpointing and LoRA as ``load_model`` applies
    them."""
    from posheads.models import LoraSettings, ModelConfig, load_model
    from posheads.models.loading import apply_lora

    settings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=LORA_TARGETS) if lora else None
    if weights == "tiny":
        cfg = ModelConfig(name_or_path="tiny", gradient_checkpointing=checkpointing, lora=settings)
        return load_model(cfg), "tiny Llama (smoke run)"
    if weights in ("auto", "smollm2"):
        try:
            cfg = ModelConfig(dtype="float32", gradient_checkpointing=checkpointing, lora=settings)
            return load_model(cfg), "SmolLM2-135M-Instruct"
        except Exception as err:
            if weights == "smollm2":
                raise
            reason = f"{type(err).__name__}"
    else:
        reason = "--weights random"
    from bench_analysis import SMOLLM2_SHAPE
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="sdpa"))
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if settings is not None:
        model = apply_lora(model, settings, input_grads=checkpointing)
    return model, f"random-weight Llama of SmolLM2's shape ({reason})"


def model_flops(model: Any, tokens: int, length: int, lora: bool) -> float:
    from posheads.models import base_model

    hf = base_model(model)
    cfg = hf.config
    linear = [m for m in hf.modules() if isinstance(m, torch.nn.Linear)]
    p_all = sum(m.weight.numel() for m in linear)
    p_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = cfg.num_hidden_layers * 2 * tokens * length * cfg.num_attention_heads * head_dim
    if lora:
        return 4 * (p_all - p_lora) * tokens + 6 * p_lora * tokens + 3 * attn
    return 6 * p_all * tokens + 3 * attn


def random_batches(length: int, n: int, vocab: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(n)]


def plain_loop(args: Any, length: int, checkpointing: bool, lora: bool) -> dict[str, Any]:
    from posheads.lit import LengthExtensionModule, OptimConfig
    from posheads.lit.optim import build_optimizer, build_scheduler

    model, label = build_model(args.weights, checkpointing, lora)
    module = LengthExtensionModule(length, optim=OptimConfig(lr=1e-5, fused=False))
    module.model = model  # the same loss code path (training_loss) without a Trainer
    model.to(DEVICE).train()
    optim = OptimConfig(lr=1e-5, warmup_steps=2, fused=False)
    optimizer = build_optimizer(model.named_parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=args.warmup + args.steps)
    vocab = model.get_input_embeddings().weight.shape[0]
    batches = [b.to(DEVICE) for b in random_batches(length, args.warmup + args.steps, vocab, args.seed)]
    start = 0.0
    for step, ids in enumerate(batches):
        if step == args.warmup:
            _sync()
            start = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = module.training_loss(ids, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    _sync()
    seconds = time.perf_counter() - start
    flops = model_flops(model, length, length, lora)
    del model, optimizer, module
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {
        "tokens_per_s": args.steps * length / seconds,
        "step_s": seconds / args.steps,
        "flops": flops,
        "label": label,
    }


def lightning_loop(args: Any, length: int, checkpointing: bool, lora: bool) -> dict[str, Any]:
    import lightning as L

    from posheads.lit import LengthExtensionModule, OptimConfig

    class Timer(L.Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == args.warmup:
                _sync()
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync()
            self.end = time.perf_counter()

    model, _ = build_model(args.weights, checkpointing, lora)
    total = args.warmup + args.steps
    module = LengthExtensionModule(length, optim=OptimConfig(lr=1e-5, warmup_steps=2, total_steps=total))
    module.model = model.train()  # configure_model keeps an assigned model
    vocab = model.get_input_embeddings().weight.shape[0]
    data = [{"input_ids": b[0]} for b in random_batches(length, total, vocab, args.seed)]
    loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)
    timer = Timer()
    trainer = L.Trainer(
        accelerator=_accelerator(),
        devices=1,
        precision="bf16-mixed",
        max_steps=total,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.end - timer.start
    del module, model, trainer
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": args.steps * length / seconds, "step_s": seconds / args.steps}


def tracker_overhead(args: Any) -> dict[str, Any]:
    import tempfile

    import lightning as L

    from posheads.callbacks import PositionalHeadTracker
    from posheads.heads import HeadsConfig
    from posheads.lit import LengthExtensionModule, OptimConfig

    length, steps, accumulate = args.tracker_length, args.tracker_steps, 4

    class Wall(L.Callback):
        start = end = 0.0

        def on_train_start(self, trainer, pl_module):
            _sync()
            self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync()
            self.end = time.perf_counter()

    def fit(tracked: bool) -> tuple[float, float, int]:
        model, label = build_model(args.weights, True, True)
        module = LengthExtensionModule(length, optim=OptimConfig(lr=1e-4, warmup_steps=2, total_steps=steps))
        module.model = model.train()
        vocab = model.get_input_embeddings().weight.shape[0]
        data = [{"input_ids": b[0]} for b in random_batches(length, steps * accumulate, vocab, args.seed)]
        loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=False)
        wall = Wall()
        callbacks: list[Any] = [wall]
        tracker = None
        with tempfile.TemporaryDirectory() as tmp:
            if tracked:
                tracker = PositionalHeadTracker(
                    every_n_steps=args.tracker_every,
                    num_sequences=4,
                    ppl="probe",
                    plots=True,
                    output_dir=tmp,
                    heads=HeadsConfig(rows_per_sequence=64, keys_per_bin=16, original_context=8192),
                )
                probe = torch.stack(random_batches(length, 4, vocab, args.seed + 1)).squeeze(1)  # [4, L]
                tracker.set_probe(probe)
                callbacks.append(tracker)
            trainer = L.Trainer(
                accelerator=_accelerator(),
                devices=1,
                precision="bf16-mixed",
                max_steps=steps,
                accumulate_grad_batches=accumulate,
                gradient_clip_val=1.0,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                limit_val_batches=0,
                num_sanity_val_steps=0,
                default_root_dir=tmp,
                callbacks=callbacks,
            )
            trainer.fit(module, train_dataloaders=loader)
            evaluations = len(tracker._evaluations) if tracker is not None else 0
            own = sum(e["seconds"] for e in tracker._evaluations) if tracker is not None else 0.0
        del module, model, trainer
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        return wall.end - wall.start, own, evaluations

    base, _, _ = fit(False)
    with_tracker, own, evaluations = fit(True)
    row = {
        "length": length,
        "optimizer_steps": steps,
        "accumulate": accumulate,
        "every_n_steps": args.tracker_every,
        "evaluations": evaluations,
        "fit_s_without": base,
        "fit_s_with": with_tracker,
        "overhead": with_tracker / base - 1.0,
        "tracker_own_s": own,
        "tracker_own_fraction": own / with_tracker,
    }
    print(
        f"tracker overhead, LoRA r=8 bf16-mixed ckpt, 1 x {length} tokens x {accumulate} accumulated, {steps} steps, "
        f"tracked every {args.tracker_every} ({evaluations} evaluations, 4 x {length}-token probes, 64 rows, 16 keys "
        f"per bin): fit {base:.1f} s without, {with_tracker:.1f} s with -> overhead {row['overhead'] * 100:.2f} % "
        f"(tracker's own time {own:.1f} s = {row['tracker_own_fraction'] * 100:.2f} %), {DEVICE}"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--weights", default="auto", choices=["auto", "smollm2", "random", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke run only")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of the device"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--what", default="throughput", choices=["throughput", "tracker"])
    parser.add_argument("--tracker-length", type=int, default=16384)
    parser.add_argument("--tracker-steps", type=int, default=50)
    parser.add_argument("--tracker-every", type=int, default=25)
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_train: skipped, no CUDA device (torch.cuda.is_available() is False)")
        return
    if args.what == "tracker":
        row = tracker_overhead(args)
        if args.json:
            Path(args.json).write_text(json.dumps(row, indent=1))
        return
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke run)"
    peak = peak_flops(name, args.peak_tflops)
    rows = []
    for length in args.lengths:
        for checkpointing in (False, True):
            for lora in (False, True):
                plain = plain_loop(args, length, checkpointing, lora)
                lit = lightning_loop(args, length, checkpointing, lora)
                row = {
                    "length": length,
                    "checkpointing": checkpointing,
                    "finetuning": "lora r=8 (q,k,v,o)" if lora else "full",
                    "plain_tokens_per_s": plain["tokens_per_s"],
                    "lightning_tokens_per_s": lit["tokens_per_s"],
                    "ratio": lit["tokens_per_s"] / plain["tokens_per_s"],
                    "model_flops_per_step": plain["flops"],
                    "mfu_plain": None if peak is None else plain["flops"] / plain["step_s"] / peak,
                    "mfu_lightning": None if peak is None else plain["flops"] / lit["step_s"] / peak,
                }
                rows.append(row)
                mfu = "" if peak is None else f"  MFU {row['mfu_plain']:.3f} / {row['mfu_lightning']:.3f}"
                print(
                    f"L={length:6d} ckpt={'on ' if checkpointing else 'off'} {row['finetuning']:20s} "
                    f"plain {row['plain_tokens_per_s']:9.0f} tok/s  lightning {row['lightning_tokens_per_s']:9.0f} "
                    f"tok/s  ratio {row['ratio']:.3f}{mfu}",
                    flush=True,
                )
    protocol = (
        f"{plain['label']}, bf16-mixed (fp32 master weights), SDPA, 1 sequence/step, random ids (seed {args.seed}), "
        f"AdamW unfused + clip 1.0, {args.steps} timed steps after {args.warmup}, {name}, torch {torch.__version__}, "
        f"peak {'unknown' if peak is None else f'{peak / 1e12:.0f}'} TFLOP/s"
    )
    print("\n" + protocol)
    print(
        "| L | checkpointing | fine-tuning | plain tok/s | Lightning tok/s | Lightning / plain | MFU plain | MFU Lightning |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mp = "-" if r["mfu_plain"] is None else f"{r['mfu_plain']:.3f}"
        ml = "-" if r["mfu_lightning"] is None else f"{r['mfu_lightning']:.3f}"
        print(
            f"| {r['length']} | {'on' if r['checkpointing'] else 'off'} | {r['finetuning']} | "
            f"{r['plain_tokens_per_s']:.0f} | {r['lightning_tokens_per_s']:.0f} | {r['ratio']:.3f} | {mp} | {ml} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
