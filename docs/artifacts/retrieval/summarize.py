"""Tables of docs/results.md "Retrieval" from a run's trials.jsonl (teacher-forced suite records).

    python docs/artifacts/retrieval/summarize.py RUN_DIR > docs/artifacts/retrieval/tables.md

Per task and condition: exact-match accuracy with its 95 % Wilson interval and n, mean answer log-probability,
and the paired difference of the answer log-probability from condition ``none`` on the same prompts with a
95 % percentile-bootstrap interval over prompts (2000 resamples, seed 0). Cells need not be complete: every
trial record counts (a cell cut off by the end of the run contributes the prompts it finished).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from posheads.eval.intervals import bootstrap_indices, percentile_interval, wilson_interval


def main(run: str) -> None:
    recs = [json.loads(x) for x in (Path(run) / "trials.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "difficulty" in r]  # suite records only
    by: dict[tuple[str, str], dict[tuple, dict]] = defaultdict(dict)
    for r in recs:
        by[(r["task"], r["condition"])][(r["length"], r["depth"], r["difficulty"], r["seed"])] = r
    tasks = list(dict.fromkeys(r["task"] for r in recs))
    conds = list(dict.fromkeys(r["condition"] for r in recs))
    print(
        "| task | condition | n | exact match [95% Wilson] | mean log p(answer) | Δ log p vs none [95% bootstrap] |"
    )
    print("|---|---|---:|---|---:|---|")
    for task in tasks:
        base = by[(task, "none")]
        for cond in conds:
            cell = by.get((task, cond), {})
            if not cell:
                continue
            n = len(cell)
            k = sum(r["correct"] for r in cell.values())
            lo, hi = wilson_interval(k, n)
            lp = np.mean([r["logprob"] for r in cell.values()])
            keys = sorted(set(cell) & set(base))
            if cond == "none" or len(keys) < 2:
                delta = "—"
            else:
                d = np.array([cell[x]["logprob"] - base[x]["logprob"] for x in keys])
                idx = bootstrap_indices(len(d), 2000, 0)
                blo, bhi = percentile_interval(d[idx].mean(axis=1))
                delta = f"{d.mean():+.2f} [{blo:+.2f}, {bhi:+.2f}] (n={len(d)})"
            print(
                f"| {task} | {cond} | {n} | {k}/{n} = {k / n:.2f} [{lo:.2f}, {hi:.2f}] | {lp:.2f} | {delta} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
