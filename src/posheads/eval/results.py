"""One results format for every evaluation run: ``<output_dir>/results.json``.

Keys (all always present):

* ``protocol`` -- how the numbers were made: model, dtype, attention implementation, RoPE scaling, corpus,
  lengths, stride, seeds, conditions, package versions, start time.
* ``heads`` -- the per-head table of the identification, ``[{layer, head, score, z, positional, ...}]``
  (empty when identification did not run in this run).
* ``heads_summary`` -- the identification's summary (``i_c``, score distribution, null, Positional Heads,
  per-layer counts, set-averaged HDA); ``{}`` when it did not run.
* ``conditions`` -- what each ablation condition ablates (``[{name, kind, family, seed, side, n_heads, heads}]``).
* ``perplexity`` -- ``[{condition, length, nll, ppl, tokens, documents, windows}]``.
* ``passkey`` / ``needle`` -- ``[{condition, length, depth, accuracy, trials, correct}]``.
* ``perplexity_lc`` -- long-context-sensitive perplexity: ``[{condition, length, nll_lc, ppl_lc, tokens_lc, nll,
  ppl, tokens, fraction, windows, documents, short, threshold}]`` (:mod:`posheads.eval.longctx`).
* ``retrieval`` -- the teacher-forced suite: ``[{task, condition, length, depth, difficulty, trials, correct,
  accuracy, accuracy_ci, logprob, logprob_ci, token_logprob, mean_rank, items, items_correct, item_accuracy,
  item_accuracy_ci, scoring}]`` (:func:`posheads.eval.retrieval.suite_row`).
* ``status`` -- ``"running"`` until the run ends, then ``"complete"`` or ``"failed"`` (with ``failure``: the
  error's type and message).

Rows are appended as they finish and the file is rewritten atomically (temporary file + ``fsync`` +
``os.replace``, :mod:`posheads.atomic`, with the user's normal file permissions), so an interrupted run or a
full disk leaves a valid file holding every finished row. With ``resume=True`` an existing file is read back
and :meth:`ResultsFile.has` tells which rows need not be computed again. Trial-level retrieval records go to
``trials.jsonl`` next to it (appended line by line, one record per trial: on resume the records of cells that
were not finished -- they are computed again -- are dropped, and a record already there is not written twice).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from posheads.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger("posheads.eval")

__all__ = ["ROW_KEYS", "SECTIONS", "ResultsFile", "load_results", "package_versions"]

SECTIONS = ("perplexity", "perplexity_lc", "passkey", "needle", "retrieval")
#: Keys that identify a row of each section (a resumed run skips rows whose key exists).
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "perplexity": ("condition", "length"),
    "passkey": ("condition", "length", "depth"),
    "needle": ("condition", "length", "depth"),
    "retrieval": ("task", "condition", "length", "depth", "difficulty"),
    "perplexity_lc": ("condition", "length"),
}


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that determine the numbers."""
    out = {"python": platform.python_version()}
    for name in ("posheads", "torch", "transformers", "tokenizers", "peft", "numpy"):
        try:
            module = __import__(name)
            out[name] = str(getattr(module, "__version__", "?"))
        except ImportError:  # pragma: no cover - optional
            continue
    return out


def _jsonable(x: Any) -> Any:
    """Plain JSON values: NaN/inf become ``None``; tuples become lists; numpy/torch scalars become numbers."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 0) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _row_key(section: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(round(row[k], 6) if isinstance(row[k], float) else row[k] for k in ROW_KEYS[section])


class ResultsFile:
    """``results.json`` of one run directory, rewritten atomically after every change."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        protocol: Mapping[str, Any],
        resume: bool = False,
        writer: bool = True,
    ):
        """``writer=False``: keep the data in memory only, never touch the directory (the ranks > 0 of a
        multi-process evaluation; rank 0 writes)."""
        self.dir = Path(output_dir)
        self.writer = writer
        if writer:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "results.json"
        self.trials_path = self.dir / "trials.jsonl"
        self.data: dict[str, Any] = {
            "protocol": _jsonable(dict(protocol)),
            "heads": [],
            "heads_summary": {},
            "conditions": [],
            "perplexity": [],
            "passkey": [],
            "needle": [],
            "retrieval": [],
            "perplexity_lc": [],
            "status": "running",
        }
        self._trial_keys: set[tuple[Any, ...]] = set()
        if not writer:
            return
        if resume and self.path.is_file():
            old = load_results(self.path)
            for key in ("heads", "heads_summary", "conditions", *SECTIONS):
                if key in old:
                    self.data[key] = old[key]
            self._prune_trials()
        else:
            self._keep_previous()
        self.write()

    @staticmethod
    def _trial_key(record: Mapping[str, Any]) -> tuple[Any, ...]:
        depth = record.get("depth")
        return (
            record.get("section"),
            record.get("task"),
            record.get("condition"),
            record.get("length"),
            round(depth, 6) if isinstance(depth, float) else depth,
            record.get("difficulty"),
            record.get("seed"),
        )

    def _prune_trials(self) -> None:
        """Resume: keep the trial records of finished cells (their rows are in results.json and are not
        computed again; records that name no cell are kept too), drop those of unfinished cells (computed
        again), duplicates and a last line cut off by the interruption."""
        if not self.trials_path.is_file():
            return
        kept: list[str] = []
        dropped = 0
        for line in self.trials_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by the interruption
                dropped += 1
                continue
            task = record.get("task")
            key = self._trial_key(record)
            if record.get("section") == "retrieval":  # the teacher-forced suite: its own section and cells
                done = self.has(
                    "retrieval",
                    task=task,
                    condition=record.get("condition"),
                    length=record.get("length"),
                    depth=record.get("depth"),
                    difficulty=record.get("difficulty"),
                )
            else:
                done = task not in SECTIONS or self.has(
                    task,
                    condition=record.get("condition"),
                    length=record.get("length"),
                    depth=record.get("depth"),
                )
            if not done or key in self._trial_keys:
                dropped += 1
                continue
            self._trial_keys.add(key)
            kept.append(json.dumps(record) + "\n")
        if dropped:
            atomic_write_text(self.trials_path, "".join(kept))
            log.info("%s: dropped %d records of unfinished cells (computed again)", self.trials_path, dropped)

    def _keep_previous(self) -> None:
        """A new run in a directory that holds an earlier one: the earlier ``results.json`` / ``trials.jsonl``
        are renamed ``*.replaced-<their time>.*`` (never overwritten); the log says where they went."""
        for path in (self.path, self.trials_path):
            if path.exists():
                stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
                kept = path.with_name(f"{path.stem}.replaced-{stamp}{path.suffix}")
                n = 1
                while kept.exists():
                    n += 1
                    kept = path.with_name(f"{path.stem}.replaced-{stamp}-{n}{path.suffix}")
                path.rename(kept)
                log.warning("%s held an earlier run (output.resume=false): kept it as %s", path, kept.name)

    # ---- reading
    def has(self, section: str, **key: Any) -> bool:
        """Whether a row with these key values (see :data:`ROW_KEYS`) is already recorded."""
        want = _row_key(section, key)
        return any(_row_key(section, r) == want for r in self.data[section])

    def rows(self, section: str) -> list[dict[str, Any]]:
        return list(self.data[section])

    # ---- writing
    def set(self, key: str, value: Any) -> None:
        self.data[key] = _jsonable(value)
        self.write()

    def append(self, section: str, row: Mapping[str, Any]) -> None:
        """Add (or replace, same key) one row and rewrite the file."""
        if section not in SECTIONS:
            raise ValueError(f"section={section!r} is not one of {list(SECTIONS)}")
        row = _jsonable(dict(row))
        key = _row_key(section, row)
        self.data[section] = [r for r in self.data[section] if _row_key(section, r) != key] + [row]
        self.write()

    def extend(self, section: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.append(section, row)

    def trial(self, record: Mapping[str, Any]) -> None:
        """Append one trial record to ``trials.jsonl`` (once: a record of the same task, condition, length,
        depth and seed is not written again; ``writer=False``: nothing)."""
        if not self.writer:
            return
        record = _jsonable(dict(record))
        key = self._trial_key(record)
        if key in self._trial_keys:
            return
        with self.trials_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self._trial_keys.add(key)

    def write(self) -> None:
        """Rewrite ``results.json`` atomically (a failed write leaves the previous file); ``writer=False``:
        nothing."""
        if not self.writer:
            return
        atomic_write_json(self.path, self.data, indent=1, allow_nan=False)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``results.json`` (a file or a run directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"no results.json at {str(path)!r}")
    with p.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or "protocol" not in data:
        raise ValueError(f"{p} is not a posheads results.json (no 'protocol' key)")
    return data
