"""Evaluate a model or checkpoint (heads, perplexity, passkey, needle, ablations):
``python evaluate.py --config configs/eval/smollm2_positional_ablation.yaml``."""

from posheads.eval.cli import main

if __name__ == "__main__":
    main()
