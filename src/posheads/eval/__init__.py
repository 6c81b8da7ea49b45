"""Evaluation: long-input perplexity, passkey and needle retrieval, Positional-Head ablation sweeps, one
results format (docs/definitions.md: head and dimension ablation, perplexity protocol, passkey / needle).

``python evaluate.py --config configs/eval/<file>.yaml`` runs :func:`posheads.eval.cli.main`. The pieces:

* :mod:`~posheads.eval.perplexity` -- windows by length, NLL / PPL of scored tokens (:func:`evaluate_perplexity`);
* :mod:`~posheads.eval.retrieval` -- greedy decoding and exact-match accuracy (:func:`evaluate_retrieval`);
  prompts come from :mod:`posheads.data.retrieval`;
* :mod:`~posheads.eval.conditions` -- ablation conditions and batched / sequential evaluation under them;
* :mod:`~posheads.eval.sweep` -- which heads each condition ablates (Positional Heads, random controls matched
  per layer, lowest-scoring heads, user lists, dimension ablations);
* :mod:`~posheads.eval.identify` -- the ``heads`` task and per-row ablation masks on :mod:`posheads.heads`;
* :mod:`~posheads.eval.results` / :mod:`~posheads.eval.plots` -- ``results.json``, PNG plots, summary tables;
* :mod:`~posheads.eval.config` / :mod:`~posheads.eval.cli` -- typed configuration and the command line.
"""

from posheads.eval.conditions import NONE, Condition, ConditionRunner, no_ablation
from posheads.eval.perplexity import PerplexityRow, evaluate_perplexity, perplexity_windows, window_nll_sums
from posheads.eval.results import ResultsFile, load_results
from posheads.eval.retrieval import RetrievalRow, evaluate_retrieval, greedy_decode
from posheads.eval.sweep import (
    CONDITION_NAMES,
    ModelShape,
    build_conditions,
    lowest_heads,
    random_matched_heads,
    read_head_table,
    validate_heads,
)

__all__ = [
    "CONDITION_NAMES",
    "NONE",
    "Condition",
    "ConditionRunner",
    "ModelShape",
    "PerplexityRow",
    "ResultsFile",
    "RetrievalRow",
    "build_conditions",
    "evaluate_perplexity",
    "evaluate_retrieval",
    "greedy_decode",
    "load_results",
    "lowest_heads",
    "no_ablation",
    "perplexity_windows",
    "random_matched_heads",
    "read_head_table",
    "validate_heads",
    "window_nll_sums",
]
