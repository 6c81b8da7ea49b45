"""``python -m posheads.heads``: identify the Positional Heads of a model on long documents.

Example (offline SmolLM2, 8 stdlib documents of 2048 tokens)::

    HF_HUB_OFFLINE=1 python -m posheads.heads --length 2048 --documents 8 --out runs/heads-smollm2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from posheads.heads.config import HeadsConfig
from posheads.heads.identify import identify_positional_heads
from posheads.heads.scores import SCORE_VARIANTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m posheads.heads", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", default="smollm2", help="smollm2 (offline default), tiny, a directory or a hub id"
    )
    p.add_argument(
        "--corpus", default="stdlib", help="corpus kind for posheads.data.CorpusConfig (default stdlib)"
    )
    p.add_argument("--length", type=int, default=2048, help="tokens per probe sequence")
    p.add_argument("--documents", type=int, default=8, help="number of probe documents (one window each)")
    p.add_argument("--out", required=True, help="output directory (heads.csv, analysis.json, stats.pt, PNGs)")
    p.add_argument("--rows", type=int, default=64, help="query rows per sequence")
    p.add_argument("--keys-per-bin", type=int, default=8, help="keys per (head, row, bin); 0 = all keys")
    p.add_argument("--score", default="pearson_weighted", choices=SCORE_VARIANTS)
    p.add_argument("--top-fraction", type=float, default=0.10)
    p.add_argument("--z-threshold", type=float, default=None)
    p.add_argument("--critical", default="critical", help="critical | quarter | a pair index")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sink-keys",
        type=int,
        default=HeadsConfig.sink_keys,
        help="leave the keys at positions n < k out of every statistic (default %(default)s; 0 = every key)",
    )
    p.add_argument(
        "--no-geometry-null",
        action="store_true",
        help="skip the RoPE-geometry null (key content shuffled over positions; doubles the statistics pass)",
    )
    p.add_argument("--no-plots", action="store_true")
    return p


def load_sequences(tokenizer, corpus: str, length: int, documents: int) -> tuple[torch.Tensor, list[str]]:
    """The first ``length`` tokens of the first ``documents`` corpus documents with at least ``length`` tokens."""
    from posheads.data import CorpusConfig, load_token_documents, select_min_length

    docs = select_min_length(load_token_documents(CorpusConfig(kind=corpus), tokenizer), length)
    if len(docs) < documents:
        raise ValueError(
            f"--documents={documents}: only {len(docs)} {corpus} documents have >= {length} tokens"
        )
    docs = docs[:documents]
    return torch.stack([d.ids[:length] for d in docs]), [d.name for d in docs]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from posheads.models import ModelConfig, load_model, load_tokenizer

    cfg = HeadsConfig(
        rows_per_sequence=args.rows,
        keys_per_bin=args.keys_per_bin or None,
        score=args.score,
        top_fraction=args.top_fraction,
        z_threshold=args.z_threshold,
        critical=args.critical,
        tau=args.tau,
        batch_size=args.batch_size,
        seed=args.seed,
        sink_keys=args.sink_keys,
        geometry_null=not args.no_geometry_null,
    )
    model_cfg = ModelConfig(name_or_path=args.model)
    model = load_model(model_cfg)
    tokenizer = load_tokenizer(model_cfg)
    sequences, names = load_sequences(tokenizer, args.corpus, args.length, args.documents)
    started = time.perf_counter()
    analysis = identify_positional_heads(model, sequences, cfg)
    analysis.meta.update(
        {"model": model_cfg.describe(), "documents": names, "seconds": time.perf_counter() - started}
    )
    paths = analysis.save(args.out, plots=not args.no_plots)
    summary = analysis.summary()
    keys = (
        "score",
        "i_c",
        "score_min",
        "score_median",
        "score_max",
        "null_mean",
        "null_sd",
        "positional_heads",
        "per_layer_counts",
    )
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    print(
        json.dumps({"hda_positional": summary["hda_positional"], "hda_other": summary["hda_other"]}, indent=1)
    )
    print(json.dumps({"sinks": summary["sinks"], "null_geometry": summary["null_geometry"]}, indent=1))
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
