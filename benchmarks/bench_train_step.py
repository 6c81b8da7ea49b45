"""Throughput of the LightningModule's training step against a plain PyTorch loop, same model, same data.

    python benchmarks/bench_train_step.py [--steps 30] [--warmup 5] [--seq-len 512] [--batch-size 4] [--repeats 2]

Both sides train the same tiny Llama (built from the same seed) with YaRN x4 at ``--seq-len`` tokens on the same
packed stdlib rows in the same order (the data module's), with the same AdamW groups (fused), warm-up + cosine
schedule and gradient clipping at 1.0. The plain loop is what Lightning automates: forward with labels,
backward, clip, optimizer step, scheduler step, zero grad. The Lightning side is ``Trainer.fit`` of
:class:`posheads.lit.LengthExtensionModule` with logging of ``train/loss``, ``train/tokens``, ``lr``,
``train/grad_norm`` on (as in real runs) but no logger / checkpoint / progress bar. The first ``--warmup`` steps
of each are not timed; the two alternate ``--repeats`` times and the best of each is reported (CPU timings on
a shared machine are noisy). Prints tokens/s of each and the ratio Lightning / plain.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from posheads.data import CorpusConfig  # noqa: E402
from posheads.lit import LengthExtensionDataModule, LengthExtensionModule, OptimConfig  # noqa: E402
from posheads.lit.optim import build_optimizer, build_scheduler  # noqa: E402
from posheads.models import ModelConfig, TinySpec, load_model, tiny_tokenizer  # noqa: E402
from posheads.rope import RopeScaling  # noqa: E402


def make_configs(seq_len: int) -> tuple[ModelConfig, RopeScaling, OptimConfig]:
    spec = TinySpec(
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=seq_len // 4,
    )
    return (
        ModelConfig(name_or_path="tiny", tiny=spec),
        RopeScaling(method="yarn", factor=4.0),
        OptimConfig(lr=1e-3, warmup_steps=2),
    )


def data(seq_len: int, batch_size: int) -> LengthExtensionDataModule:
    dm = LengthExtensionDataModule(
        corpus=CorpusConfig(kind="stdlib", max_documents=40),
        seq_len=seq_len,
        batch_size=batch_size,
        tokenizer=None,
        cache_dir="",
    )
    dm._tokenizer = tiny_tokenizer()
    dm.setup("fit")
    return dm


def plain_loop(seq_len: int, batch_size: int, warmup: int, steps: int) -> float:
    lm, rope, optim = make_configs(seq_len)
    model = load_model(lm, rope=rope).train()
    optimizer = build_optimizer(model.named_parameters(), optim)
    scheduler = build_scheduler(optimizer, optim, total_steps=warmup + steps)
    loader = data(seq_len, batch_size).train_dataloader()
    it = iter(loader)
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        input_ids = next(it)["input_ids"]  # [B, L]
        loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return steps * batch_size * seq_len / elapsed


class _Timer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def lightning_loop(seq_len: int, batch_size: int, warmup: int, steps: int) -> float:
    lm, rope, optim = make_configs(seq_len)
    module = LengthExtensionModule(
        seq_len, lm=lm, rope=rope, optim=OptimConfig(**{**optim.__dict__, "total_steps": warmup + steps})
    )
    timer = _Timer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        use_distributed_sampler=False,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=data(seq_len, batch_size))
    return steps * batch_size * seq_len / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating measurements of each; the best is kept"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (1 is robust on a shared 2-core CPU)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    plain, lit = [], []
    for r in range(args.repeats):
        torch.manual_seed(r)
        plain.append(plain_loop(args.seq_len, args.batch_size, args.warmup, args.steps))
        lit.append(lightning_loop(args.seq_len, args.batch_size, args.warmup, args.steps))
        print(f"repeat {r}: plain {plain[-1]:.0f} tok/s, lightning {lit[-1]:.0f} tok/s", flush=True)
    best_plain, best_lit = max(plain), max(lit)
    print(
        f"\ntrain-step throughput, tiny Llama (4 layers, 4 heads x 32, {sum(p.numel() for p in load_model(make_configs(args.seq_len)[0]).parameters()) / 1e6:.2f}M params), "
        f"YaRN x4, {args.batch_size} x {args.seq_len} tokens/step, {args.steps} timed steps after {args.warmup}, "
        f"{args.threads} thread(s), {torch.__version__}, best of {args.repeats}:"
    )
    print(f"  plain PyTorch loop : {best_plain:10.0f} tokens/s")
    print(f"  LightningModule    : {best_lit:10.0f} tokens/s")
    print(f"  ratio lightning / plain = {best_lit / best_plain:.3f}")


if __name__ == "__main__":
    main()
