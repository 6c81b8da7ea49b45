"""Evaluation benchmarks; prints ratios.

1. Perplexity: :func:`posheads.eval.perplexity.evaluate_perplexity` against a plain Hugging Face loop
   (``model(input_ids, labels=labels).loss`` per window) over the same windows -- same numbers, time ratio.
2. Ablation conditions: the same conditions evaluated in one batched forward per window (each row its own
   ablation mask) against one forward per condition -- same numbers, time ratio.

Usage::

    python benchmarks/bench_eval.py                    # tiny model (seconds)
    python benchmarks/bench_eval.py --model smollm2 --length 1024 --windows 2 --conditions 4
    python benchmarks/bench_eval.py --model smollm2 --length 8192 --windows 4 --conditions 11   # GPU

On CPU a batched forward costs about as much as the sequential forwards it replaces (the work is the same
and the CPU is already busy); on a GPU it saves the per-forward overheads and fills the device.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from posheads.data import CorpusConfig, load_token_documents
from posheads.eval.conditions import ConditionRunner
from posheads.eval.perplexity import evaluate_perplexity, perplexity_windows
from posheads.eval.sweep import ModelShape, build_conditions
from posheads.models import ModelConfig, TinySpec, load_model, load_tokenizer


def plain_loop(model, pairs):
    total, count = 0.0, 0
    for doc, w in pairs:
        ids = doc.ids[w.start : w.end][None].to(model.device)
        labels = ids.clone()
        labels[:, : w.score_offset] = -100
        n = int((labels[:, 1:] != -100).sum())
        with torch.inference_mode():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * n
        count += n
    return total / count


def timed(fn, repeat):
    best, out = math.inf, None
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--conditions", type=int, default=4, help="conditions in the batched-vs-sequential part")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda when available)")
    ap.add_argument(
        "--stride", type=int, default=None, help="sliding-window stride (default: disjoint windows)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = ModelConfig(
        name_or_path=args.model,
        tiny=TinySpec(num_layers=4, num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=4096),
    )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model, tok = load_model(cfg).to(device), load_tokenizer(cfg)
    docs = load_token_documents(CorpusConfig(kind="pydoc"), tok, progress=False)
    pairs = perplexity_windows(docs, args.length, stride=args.stride, max_windows=args.windows)
    print(
        f"model={cfg.describe()} length={args.length} windows={len(pairs)} device={device} "
        f"threads={torch.get_num_threads()}"
    )

    t_plain, ref = timed(lambda: plain_loop(model, pairs), args.repeat)
    t_ours, rows = timed(
        lambda: evaluate_perplexity(
            model, docs, args.length, stride=args.stride, max_windows=args.windows, progress=False
        ),
        args.repeat,
    )
    print(
        f"[ppl] plain HF loop {t_plain:.3f}s  evaluate_perplexity {t_ours:.3f}s  ratio {t_ours / t_plain:.2f}x  "
        f"|nll diff| {abs(rows[0].nll - ref):.2e}"
    )

    from posheads.eval.identify import ablation_apply

    shape = ModelShape.from_config(model.config)
    table = [
        {
            "layer": layer,
            "head": h,
            "score": float((layer * 7 + h * 3) % 11),
            "z": None,
            "positional": (layer + h) % 5 == 0,
        }
        for layer in range(shape.num_layers)
        for h in range(shape.num_heads)
    ]
    names = ["none", "positional", "random", "lowest", "dims_high", "dims_low"]
    conds = build_conditions(
        names,
        table=table,
        shape=shape,
        random_seeds=list(range(max(1, args.conditions - 5))),
        i_c=shape.head_dim // 4,
    )
    conds = conds[: args.conditions] if args.conditions <= len(conds) else conds
    apply = ablation_apply("zero", shape.head_dim // 4, None)
    results = {}
    for rows_per_forward in (1, len(conds)):
        runner = ConditionRunner(model, conds, apply, max_rows=rows_per_forward, max_batch_tokens=None)
        t, out = timed(
            lambda runner=runner: evaluate_perplexity(
                model, docs, args.length, max_windows=args.windows, runner=runner, progress=False
            ),
            args.repeat,
        )
        results[rows_per_forward] = (t, out)
    (t_seq, seq), (t_bat, bat) = results[1], results[len(conds)]
    diff = max(abs(a.nll - b.nll) for a, b in zip(seq, bat))
    print(
        f"[conditions x{len(conds)}] sequential {t_seq:.3f}s  batched {t_bat:.3f}s  ratio {t_bat / t_seq:.2f}x  "
        f"max |nll diff| {diff:.2e}"
    )
    for a in seq:
        print(f"    {a.condition:12s} ppl {a.ppl:10.3f}")


if __name__ == "__main__":
    main()
