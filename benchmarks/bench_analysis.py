"""Cost of the per-pair statistics pass against a plain forward pass (SmolLM2-135M shape, CPU or CUDA).

For each length it times, on one real sequence, (a) a plain forward of the full model (with the LM head), (b)
the decoder stack alone (what the statistics pass runs), and (c) the decoder with a
:class:`posheads.heads.PairStatsCollector` installed; the collector's own time (inside the hook) is the cost of
the statistics. It then measures the peak memory of one layer's statistics as the length grows (CPU: torch
profiler memory timeline; CUDA: ``max_memory_allocated``). Target: at L = 2048 with 64 rows the statistics
cost well under 0.25x one plain forward.

    HF_HUB_OFFLINE=1 python benchmarks/bench_analysis.py --lengths 2048 8192 --rows 64

Without the offline SmolLM2 weights it falls back to a randomly initialised model of the same shape (the
cost does not depend on the weights' values); the output says which.
"""

from __future__ import annotations

import argparse
import time

import torch

from posheads.heads.capture import AttentionCall, attention_hooks
from posheads.heads.stats import (
    PairStatsCollector,
    RowPlan,
    collector_for_model,
    num_bins_for,
    sample_query_rows,
)
from posheads.profiling import peak_cpu_memory

SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    "tie_word_embeddings": True,
}


def load(device: str):
    """SmolLM2 (offline weights) and real stdlib tokens, else a random model of the same shape and random ids."""
    try:
        from posheads.data import CorpusConfig, load_token_documents
        from posheads.models import ModelConfig, load_model, load_tokenizer

        cfg = ModelConfig()
        model, tokenizer = load_model(cfg), load_tokenizer(cfg)
        docs = sorted(load_token_documents(CorpusConfig(kind="stdlib"), tokenizer), key=lambda d: -d.n_tokens)
        ids = docs[0].ids
        label = f"SmolLM2-135M-Instruct, stdlib document {docs[0].name!r}"
    except Exception as err:  # no offline weights here: same shape, random values
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_SHAPE, attn_implementation="sdpa")).eval()
        ids = torch.randint(0, SMOLLM2_SHAPE["vocab_size"], (40_000,))
        label = f"random-weight model of SmolLM2's shape ({type(err).__name__}: {err})"
    return model.to(device).eval(), ids, label


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(device: str, fn, *args) -> float:
    _sync(device)
    start = time.perf_counter()
    fn(*args)
    _sync(device)
    return time.perf_counter() - start


@torch.no_grad()
def bench_speed(
    model, tokens: torch.Tensor, device: str, lengths: list[int], rows: int, kpb: int | None, repeats: int
) -> None:
    decoder = model.get_decoder()
    for length in lengths:
        if tokens.numel() < length:
            tokens = tokens.repeat(length // tokens.numel() + 1)
        ids = tokens[:length].view(1, -1).to(device)
        collector = collector_for_model(
            model, num_bins_for(length), rows_per_sequence=rows, keys_per_bin=kpb, device=torch.device(device)
        )
        valid = torch.ones(1, length, dtype=torch.bool)
        full, plain, hooked, inside = [], [], [], []
        decoder(ids[:, :256])  # warm-up
        for r in range(repeats):
            full.append(_timed(device, model, ids))
            plain.append(_timed(device, decoder, ids))
            # the plan (prepared on the host: the sync-free pass) is made inside the timed call
            plan = (sample_query_rows(valid, rows, r), r, valid)
            before = collector.seconds

            hooked.append(_timed(device, _hooked_forward, model, decoder, collector, ids, plan))
            inside.append(collector.seconds - before)
        f, p, h, i = min(full), min(plain), min(hooked), min(inside)
        if device == "cuda":  # the hook's own clock does not wait for the GPU: use the wall difference
            i = h - p
        print(
            f"  L={length}: forward {f:.3f}s (decoder only {p:.3f}s) | decoder+stats {h:.3f}s | stats {i:.3f}s"
            f" -> stats / forward = {i / f:.3f}, stats / decoder = {i / p:.3f}"
        )


def _hooked_forward(model, decoder, collector, ids, plan) -> None:
    rows, seed, valid = plan
    collector.plan = RowPlan(rows, seed=seed, valid=valid)
    with attention_hooks(model, collector):
        decoder(ids)


def bench_memory(device: str, lengths: list[int], rows: int, kpb: int | None) -> None:
    """Peak memory of one SmolLM2-shaped layer's statistics (synthetic q~/k~) as the length grows."""
    heads, kv_heads, head_dim = 9, 3, 64
    previous = None
    for length in lengths:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, length, head_dim, generator=gen).to(device)
        k = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(device)
        call = AttentionCall(0, q, k, None, head_dim**-0.5)
        collector = PairStatsCollector(
            1, heads, head_dim, num_bins_for(length), keys_per_bin=kpb, device=device
        )
        valid = torch.ones(1, length, dtype=torch.bool)
        collector.plan = RowPlan(sample_query_rows(valid, rows, 0), seed=0, valid=valid)
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            collector(None, call)  # type: ignore[arg-type]
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            peak = peak_cpu_memory(collector, None, call)
        line = f"  L={length}: peak {peak / 2**20:.1f} MiB (the layer's q~/k~ themselves: {2 * q.numel() * 4 / 2**20:.1f} MiB)"
        if previous is not None:
            line += f"; x{peak / previous[1]:.2f} for x{length / previous[0]:.0f} length"
        print(line)
        previous = (length, peak)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--keys-per-bin", type=int, default=8, help="0 = all keys (exact)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kpb = args.keys_per_bin or None
    print(f"device={args.device} threads={torch.get_num_threads()} rows={args.rows} keys_per_bin={kpb}")
    print("peak memory of one layer's statistics (SmolLM2 shape):")
    bench_memory(args.device, args.memory_lengths, args.rows, kpb)
    if not args.skip_speed:
        model, tokens, label = load(args.device)
        print(f"speed ({label}):")
        bench_speed(model, tokens, args.device, args.lengths, args.rows, kpb, args.repeats)


if __name__ == "__main__":
    main()
