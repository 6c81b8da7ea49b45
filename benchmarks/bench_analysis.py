"""Cost of the per-pair statistics pass against a plain forward pass (SmolLM2-135M, CPU or GPU).

Measures, at each length, the wall time of a plain forward and of a forward with the
:class:`posheads.heads.PairStatsCollector` installed (time inside the hook reported separately), and the peak
memory of the statistics work as the length grows. Prints ratios; the target is a statistics pass costing well
under 0.25x one plain forward at L = 2048 with 64 rows.

    HF_HUB_OFFLINE=1 python benchmarks/bench_analysis.py --lengths 2048 8192 --rows 64
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import torch

from posheads.heads.capture import AttentionCall, attention_hooks
from posheads.heads.stats import (
    PairStatsCollector,
    RowPlan,
    collector_for_model,
    num_bins_for,
    sample_query_rows,
)


def _tokens(tokenizer, length: int, n: int) -> torch.Tensor:
    """``n`` sequences of ``length`` real tokens (stdlib documents), random tokens if the corpus is missing."""
    try:
        from posheads.data import CorpusConfig, load_token_documents, select_min_length

        docs = select_min_length(load_token_documents(CorpusConfig(kind="stdlib"), tokenizer), length)
        return torch.stack([d.ids[:length] for d in docs[:n]])
    except Exception as err:  # pragma: no cover - fallback for a stripped Python
        print(f"(stdlib corpus unavailable: {err}; using random tokens)")
        return torch.randint(0, tokenizer.vocab_size, (n, length))


def bench_model(lengths: list[int], rows: int, keys_per_bin: int | None, repeats: int) -> None:
    from posheads.models import ModelConfig, load_model, load_tokenizer

    cfg = ModelConfig()
    model = load_model(cfg)
    tokenizer = load_tokenizer(cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    print(f"device={device} threads={torch.get_num_threads()} rows={rows} keys_per_bin={keys_per_bin}")
    for length in lengths:
        ids = _tokens(tokenizer, length, 1).to(device)
        collector = collector_for_model(
            model, num_bins_for(length), rows_per_sequence=rows, keys_per_bin=keys_per_bin
        )
        plain, hooked, inside = [], [], []
        with torch.no_grad():
            model(ids[:, :128])  # warm-up
            for r in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                model.model(ids)  # the decoder stack (the statistics never need the LM head)
                _sync(device)
                plain.append(time.perf_counter() - t0)
                collector.plan = RowPlan(
                    sample_query_rows(torch.ones_like(ids, dtype=torch.bool), rows, r), seed=r
                )
                before = collector.seconds
                with attention_hooks(model, collector):
                    _sync(device)
                    t0 = time.perf_counter()
                    model.model(ids)
                    _sync(device)
                hooked.append(time.perf_counter() - t0)
                inside.append(collector.seconds - before)
        p, h, i = min(plain), min(hooked), min(inside)
        print(
            f"L={length}: plain forward {p:.2f}s | forward+stats {h:.2f}s | stats inside hook {i:.2f}s | "
            f"ratio stats/forward = {i / p:.3f} (extra wall {(h - p) / p:+.3f})"
        )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_memory(lengths: list[int], rows: int, keys_per_bin: int | None) -> None:
    """Peak memory of the statistics work for one SmolLM2-shaped layer (synthetic q/k), CPU, via tracemalloc."""
    heads, kv_heads, head_dim = 9, 3, 64
    print("peak memory of one layer's statistics (SmolLM2 shape, CPU, tracemalloc):")
    previous = None
    for length in lengths:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, heads, length, head_dim, generator=gen)
        k = torch.randn(1, kv_heads, length, head_dim, generator=gen)
        call = AttentionCall(0, q, k, None, head_dim**-0.5)
        collector = PairStatsCollector(1, heads, head_dim, num_bins_for(length), keys_per_bin=keys_per_bin)
        collector.plan = RowPlan(sample_query_rows(torch.ones(1, length, dtype=torch.bool), rows, 0), seed=0)
        tracemalloc.start()
        collector(None, call)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        line = f"  L={length}: peak {peak / 2**20:.1f} MiB (q/k inputs {2 * q.numel() * 4 / 2**20:.1f} MiB)"
        if previous is not None:
            line += f", x{peak / previous[1]:.2f} for x{length / previous[0]:.1f} length"
        print(line)
        previous = (length, peak)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--keys-per-bin", type=int, default=16, help="0 = all keys (exact)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-model", action="store_true", help="only the memory measurement")
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    args = parser.parse_args()
    kpb = args.keys_per_bin or None
    bench_memory(args.memory_lengths, args.rows, kpb)
    if not args.skip_model:
        bench_model(args.lengths, args.rows, kpb, args.repeats)


if __name__ == "__main__":
    main()
