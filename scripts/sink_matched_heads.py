"""Heads matched to a Positional set by layer and attention-sink share, none of them a Positional Head.

For each layer, the set's count of heads is taken from the other heads of that layer with the largest
``sink_share`` (the share of attention on key 0); a layer's shortfall comes from the nearest layers (the
lower one first). The control for "the heads matter because they park attention on the sink".

    python scripts/sink_matched_heads.py configs/eval/heads/smollm2_sinkaware_heads.csv positional_with_sinks
"""

from __future__ import annotations

import csv
import sys
from collections import Counter


def main(table: str, column: str) -> None:
    with open(table, encoding="utf-8") as fh:
        rows = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    positional = {(int(r["layer"]), int(r["head"])) for r in rows for c in ("positional", "positional_with_sinks")
                  if r.get(c) == "True"}  # fmt: skip
    wanted = Counter(int(r["layer"]) for r in rows if r[column] == "True")
    pool: dict[int, list[tuple[float, int]]] = {}
    for r in rows:
        key = (int(r["layer"]), int(r["head"]))
        if key not in positional:
            pool.setdefault(key[0], []).append((float(r["sink_share"]), key[1]))
    for cands in pool.values():
        cands.sort(reverse=True)
    layers = sorted(pool)
    chosen: list[tuple[int, int]] = []
    for layer, k in sorted(wanted.items()):
        for other in sorted(layers, key=lambda x: (abs(x - layer), x)):
            while k and pool[other]:
                chosen.append((other, pool[other].pop(0)[1]))
                k -= 1
            if not k:
                break
    share = {(int(r["layer"]), int(r["head"])): float(r["sink_share"]) for r in rows}
    print(f"# {len(chosen)} heads; mean sink share {sum(share[h] for h in chosen) / len(chosen):.3f}")
    print("[" + ", ".join(f"[{a}, {b}]" for a, b in sorted(chosen)) + "]")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
