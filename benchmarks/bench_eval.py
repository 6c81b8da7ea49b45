"""Evaluation benchmarks; prints ratios.

1. Perplexity: :func:`posheads.eval.perplexity.evaluate_perplexity` against a plain Hugging Face loop
   (``model(input_ids, labels=labels).loss`` per window) over the same windows -- same numbers, time ratio.
2. Ablation conditions: the same conditions evaluated one forward per condition (sequential), in one batched
   forward per window (each row its own ablation mask), and batched with the shared prefix (the layers before
   the group's first ablated layer run once, :func:`posheads.heads.ablation.shared_prefix`) -- same numbers,
   time ratios against sequential, and the layer work the grouping predicts.

Usage::

    python benchmarks/bench_eval.py                    # tiny model (seconds)
    python benchmarks/bench_eval.py --model smollm2 --length 1024 --windows 2 --conditions 4
    python benchmarks/bench_eval.py --model smollm2 --length 8192 --windows 4 --conditions 11   # GPU
    python benchmarks/bench_eval.py --model smollm2 --length 2048 --windows 1 --repeat 1 --threads 1 \
        --conditions 8 --condition-names none,positional,random,lowest --skip-ppl --modes sequential,shared \
        --heads configs/eval/heads/smollm2_study1_heads.csv          # the shared-prefix measurement

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
    ap.add_argument("--heads", default=None, help="a head table (CSV / results.json) for the conditions")
    ap.add_argument(
        "--condition-names",
        default="none,positional,random,lowest,dims_high,dims_low",
        help="conditions (random expands to as many seeds as --conditions leaves room for)",
    )
    ap.add_argument(
        "--modes", default="sequential,batched,shared", help="subset of sequential,batched,shared"
    )
    ap.add_argument("--skip-ppl", action="store_true", help="skip the plain-loop comparison")
    ap.add_argument("--skip-conditions", action="store_true", help="skip the conditions comparison")
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

    if not args.skip_ppl:
        t_plain, ref = timed(lambda: plain_loop(model, pairs), args.repeat)
        t_ours, rows = timed(
            lambda: evaluate_perplexity(
                model, docs, args.length, stride=args.stride, max_windows=args.windows, progress=False
            ),
            args.repeat,
        )
        print(
            f"[ppl] plain HF loop {t_plain:.3f}s  evaluate_perplexity {t_ours:.3f}s  "
            f"ratio {t_ours / t_plain:.2f}x  |nll diff| {abs(rows[0].nll - ref):.2e}"
        )

    if not args.skip_conditions:
        conditions_benchmark(args, model, docs)


def conditions_benchmark(args, model, docs) -> None:
    """The same conditions three ways over the same windows: one forward per condition (sequential), all in
    one batched forward, and batched with the shared prefix (layers before the group's first ablated layer run
    once). Prints times, ratios against sequential, the layer work the grouping predicts and the largest NLL
    difference from sequential."""
    from posheads.eval.identify import ablation_apply
    from posheads.eval.sweep import read_head_table
    from posheads.heads.ablation import shared_prefix

    shape = ModelShape.from_config(model.config)
    if args.heads:
        table = read_head_table(args.heads)
    else:
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
    names = [n.strip() for n in args.condition_names.split(",")]
    n_random = max(1, args.conditions - (len(names) - 1)) if "random" in names else 0
    conds = build_conditions(
        names, table=table, shape=shape, random_seeds=list(range(n_random)), i_c=shape.head_dim // 4
    )
    conds = conds[: args.conditions]
    apply = ablation_apply("zero", shape.head_dim // 4, None)
    modes = {
        "sequential": dict(max_rows=1),
        "batched": dict(max_rows=len(conds)),
        "shared": dict(max_rows=len(conds), prefix=shared_prefix, num_layers=shape.num_layers),
    }
    results = {}
    for mode in args.modes.split(","):
        runner = ConditionRunner(model, conds, apply, max_batch_tokens=None, **modes[mode])
        t, out = timed(
            lambda runner=runner: evaluate_perplexity(
                model, docs, args.length, max_windows=args.windows, runner=runner, progress=False
            ),
            args.repeat,
        )
        results[mode] = (t, {r.condition: r for r in out}, runner)
        print(f"    {mode:10s} {t:8.2f}s", flush=True)
    t_seq, seq, _ = results["sequential"]
    firsts = ", ".join(f"{c.name}:{c.first_layer}" for c in conds)
    print(f"[conditions x{len(conds)}] first ablated layer per condition: {firsts}")
    for mode, (t, out, runner) in results.items():
        if mode == "sequential":
            continue
        diff = max(abs(out[c].nll - seq[c].nll) for c in seq)
        extra = ""
        if mode == "shared":
            groups = runner.groups(args.length)
            work = runner.layer_work(groups)
            full = shape.num_layers * len(conds)
            extra = (
                f"  groups {[[c.name for c in g] for g in groups]}  layer work {work}/{full} "
                f"(predicted speed-up {full / work:.2f}x)"
            )
        print(
            f"[conditions x{len(conds)}] {mode}: {t:.2f}s, speed-up over sequential {t_seq / t:.2f}x, "
            f"max |nll diff| {diff:.2e}{extra}"
        )
    for c in seq.values():
        print(f"    {c.condition:12s} ppl {c.ppl:10.3f}")


if __name__ == "__main__":
    main()
