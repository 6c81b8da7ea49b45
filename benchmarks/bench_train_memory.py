"""Peak memory of one training step with the chunked loss against the plain loss (full logits), side by side.

    python benchmarks/bench_train_memory.py [--model smollm2] [--seq-len 8192] [--chunk 1024] \
        [--no-checkpointing] [--lora] [--threads 1]

One forward + backward of :meth:`posheads.lit.LengthExtensionModule.training_loss` on one sequence of
``--seq-len`` tokens (batch 1, float32, full fine-tuning unless ``--lora``, gradient checkpointing on unless
``--no-checkpointing``), once with ``loss_chunk_size=--chunk`` and once with ``loss_chunk_size=None`` (the
Hugging Face loss on the full ``[L, vocab]`` logits), the same model and the same tokens (seeded random ids).
Memory is the peak of PyTorch's CPU allocations during the step relative to its start
(:func:`posheads.profiling.peak_cpu_memory`, the torch profiler's allocation events); it includes the
parameters' gradients, not the weights or an optimizer state (the same on both sides). Prints both peaks, the
ratio plain / chunked, the two losses and the largest relative gradient difference.

Runs on CPU (a few minutes with one thread at 8192 tokens for SmolLM2-135M).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from posheads.lit import LengthExtensionModule  # noqa: E402
from posheads.models import LoraSettings, ModelConfig  # noqa: E402
from posheads.profiling import peak_cpu_memory  # noqa: E402


def step(
    module: LengthExtensionModule, ids: torch.Tensor
) -> tuple[float, dict[str, torch.Tensor], float, int]:
    """(loss, gradients, seconds, peak bytes) of one forward + backward."""
    module.model.zero_grad(set_to_none=True)
    out: dict[str, float] = {}

    def run() -> None:
        loss = module.training_loss(ids, ids)
        loss.backward()
        out["loss"] = float(loss.detach())

    start = time.perf_counter()
    peak = peak_cpu_memory(run)
    seconds = time.perf_counter() - start
    grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
    module.model.zero_grad(set_to_none=True)
    return out["loss"], grads, seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="model.lm.name_or_path")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of the chunked side")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--lora", action="store_true", help="LoRA r=8 on q,k,v,o instead of full fine-tuning")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lora = LoraSettings(r=8, alpha=16, dropout=0.0) if args.lora else None
    lm = ModelConfig(
        name_or_path=args.model, dtype="float32", gradient_checkpointing=not args.no_checkpointing, lora=lora
    )
    module = LengthExtensionModule(args.seq_len, lm=lm, loss_chunk_size=args.chunk, chunked_loss_from=0)
    module.model.train()
    vocab = module.model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, args.seq_len), generator=torch.Generator().manual_seed(args.seed))
    assert module.uses_chunked_loss(ids), "the model's head does not support the chunked loss"

    loss_c, grads_c, sec_c, peak_c = step(module, ids)
    print(f"chunked: {peak_c / 2**30:.2f} GiB peak, {sec_c:.0f} s, loss {loss_c:.5f}", flush=True)
    grads_c = {n: g.clone() for n, g in grads_c.items()}
    module.loss_chunk_size = None  # the plain Hugging Face loss on the same module and tokens
    assert not module.uses_chunked_loss(ids)
    loss_p, grads_p, sec_p, peak_p = step(module, ids)
    print(f"plain:   {peak_p / 2**30:.2f} GiB peak, {sec_p:.0f} s, loss {loss_p:.5f}", flush=True)
    worst = max(
        float((grads_c[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in grads_p.items()
    )

    logits_gib = args.seq_len * vocab * 4 / 2**30
    print(
        f"\none training step (forward + backward), {lm.describe()}, {'LoRA r=8' if lora else 'full fine-tuning'}, "
        f"1 x {args.seq_len} tokens (random ids, seed {args.seed}), float32, gradient checkpointing "
        f"{'off' if args.no_checkpointing else 'on'}, vocab {vocab} (full fp32 logits {logits_gib:.2f} GiB), "
        f"{args.threads} thread(s), torch {torch.__version__}, CPU:"
    )
    print(f"  plain loss (full logits)    : {peak_p / 2**30:7.2f} GiB peak  {sec_p:6.0f} s")
    print(f"  chunked loss (chunk {args.chunk:5d})  : {peak_c / 2**30:7.2f} GiB peak  {sec_c:6.0f} s")
    print(
        f"  peak ratio plain / chunked = {peak_p / peak_c:.2f}x ; time ratio chunked / plain = {sec_c / sec_p:.2f}"
    )
    print(f"  losses {loss_p:.6f} vs {loss_c:.6f}; largest relative gradient difference {worst:.2e}")


if __name__ == "__main__":
    main()
