"""The training / validation data of a length-extension run, as a LightningDataModule.

Pipeline (all deterministic, a function of the corpus, the tokenizer and the seeds):

1. :func:`posheads.data.load_token_documents` reads the corpus (``CorpusConfig``: the CPython stdlib offline,
   local files, or a ``datasets`` name) and tokenises it (cached under ``$POSHEADS_CACHE/tokens``).
2. :func:`posheads.data.split_by_document` splits whole documents into train / validation by a hash of
   ``(split_seed, name)``: no validation text is ever trained on.
3. Training: the train documents (optionally only those with ``>= min_doc_tokens`` tokens) are packed with
   :func:`posheads.data.pack_sequences` into rows of exactly ``seq_len`` tokens -- the *target* length -- an
   EOS token between documents. Rows are visited in a seeded per-epoch permutation, sharded over ranks by a
   :class:`ResumableSampler`; the loader's position is saved in every checkpoint and restored on resume.
4. Validation: one set per length (by default the model's original and target lengths), built by
   :func:`build_validation_sets`: disjoint windows of the longest length from validation documents that have
   at least that many tokens, each cut into consecutive windows of every shorter length. Every length thus
   scores the same text, so perplexities across lengths differ only by how much context each token sees.

What the module needs from the LightningModule it is trained with (when not given explicitly): its
``tokenizer``, ``target_length`` (= ``seq_len``) and ``eval_lengths`` (= ``val_lengths``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from posheads.data import (
    CorpusConfig,
    TokenizedDocument,
    load_token_documents,
    pack_sequences,
    select_min_length,
    split_by_document,
    window_corpus,
    window_document,
)
from posheads.models import ModelConfig, cache_root, load_tokenizer

log = logging.getLogger(__name__)

__all__ = [
    "LengthExtensionDataModule",
    "ResumableDataLoader",
    "ResumableSampler",
    "ShardedWindows",
    "TokenRows",
    "ValidationSet",
    "build_validation_sets",
]


# --------------------------------------------------------------------------------------------------------
# Validation windows
# --------------------------------------------------------------------------------------------------------


@dataclass
class ValidationSet:
    """Windows of one length for validation perplexity.

    Attributes:
        length: tokens per window.
        input_ids: int64 ``[n_windows, length]``.
        documents: names of the documents the windows come from.
        window_docs: the document of each window (``len == n_windows``).
    """

    length: int
    input_ids: torch.Tensor
    documents: list[str]
    window_docs: list[str] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored_tokens(self) -> int:
        """Tokens whose prediction is scored: all but the first of each window."""
        return self.n_windows * (self.length - 1)

    def protocol(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "windows": self.n_windows,
            "scored_tokens": self.n_scored_tokens,
            "documents": len(self.documents),
        }


def build_validation_sets(
    docs: Sequence[TokenizedDocument], lengths: Sequence[int], max_windows: int | None
) -> dict[int, ValidationSet]:
    """Validation windows for every length in ``lengths`` over the same text.

    The documents with at least ``max(lengths)`` tokens are cut into disjoint windows of ``max(lengths)``
    (:func:`~posheads.data.window_corpus`, at most ``max_windows`` of them, spread over the documents: at most
    ``ceil(max_windows / documents)`` from each, taken from its start, documents in order); each of those
    spans is cut into consecutive disjoint windows of every shorter length (a tail shorter than the length is
    dropped when the length does not divide the longest one). Raises ``ValueError`` naming the length when
    no validation document is long enough.
    """
    lengths = sorted({int(n) for n in lengths})
    if not lengths or lengths[0] < 2:
        raise ValueError(f"data.val_lengths={lengths!r} must be lengths >= 2")
    longest = lengths[-1]
    eligible = select_min_length(docs, longest)
    per_doc = None if max_windows is None else math.ceil(max_windows / len(eligible))
    spans = window_corpus(eligible, longest, max_windows_per_doc=per_doc, max_windows=max_windows)
    by_name = {d.name: d for d in eligible}
    names = sorted({w.doc for w in spans})
    out: dict[int, ValidationSet] = {}
    for length in lengths:
        rows: list[torch.Tensor] = []
        owners: list[str] = []
        for w in spans:
            piece = TokenizedDocument(w.doc, by_name[w.doc].ids[w.start : w.end])  # [longest]
            for sub in window_document(piece, length):
                rows.append(piece.ids[sub.start : sub.end])  # [length]
                owners.append(w.doc)
        out[length] = ValidationSet(length, torch.stack(rows), names, owners)  # [n_windows, length]
    return out


class ShardedWindows(Dataset):
    """This rank's share of a :class:`ValidationSet`: windows ``rank, rank + world, ...``, padded by repeating a
    window (marked ``scored=False``) so that every rank runs the same number of batches -- FSDP needs every
    rank in every forward."""

    def __init__(self, input_ids: torch.Tensor, rank: int = 0, world_size: int = 1):
        n = int(input_ids.shape[0])
        if n == 0:
            raise ValueError("ShardedWindows: no windows")
        per_rank = math.ceil(n / world_size)
        own = list(range(rank, n, world_size))
        self.input_ids = input_ids
        self.index = own + [own[-1] if own else 0] * (per_rank - len(own))
        self.scored = [True] * len(own) + [False] * (per_rank - len(own))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[self.index[i]], "scored": self.scored[i]}


# --------------------------------------------------------------------------------------------------------
# Training rows, resumable order
# --------------------------------------------------------------------------------------------------------


class TokenRows(Dataset):
    """Rows of a ``[N, seq_len]`` token tensor as ``{"input_ids": row}``."""

    def __init__(self, rows: torch.Tensor):
        if rows.dim() != 2:
            raise ValueError(f"TokenRows expects [N, seq_len], got shape {tuple(rows.shape)}")
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i]}


class ResumableSampler(Sampler[int]):
    """Row indices in a seeded per-epoch order, sharded over ranks, able to start in the middle of an epoch.

    Epoch ``e`` visits ``perm = randperm(n, seed + e)`` (or ``0..n-1`` without shuffling), truncated to a
    multiple of ``world_size``; rank ``r`` takes ``perm[r::world_size]``. :meth:`skip` makes the next
    iteration start after the first ``k`` of this rank's indices.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ResumableSampler: rank={rank} world_size={world_size} is not a valid rank")
        if n < world_size:
            raise ValueError(f"ResumableSampler: {n} rows cannot be shared by {world_size} ranks")
        self.n, self.shuffle, self.seed, self.rank, self.world_size = n, shuffle, seed, rank, world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip(self, k: int) -> None:
        self._skip = int(k)

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        usable = (self.n // self.world_size) * self.world_size
        return perm[:usable][self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(self.indices()[skip:])

    def __len__(self) -> int:
        return self.n // self.world_size


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position survives a checkpoint.

    Lightning saves ``state_dict()`` of stateful training loaders into every checkpoint and calls
    ``load_state_dict()`` before iterating again on resume (``fit_loop`` / ``CombinedLoader``). The state
    is the epoch and the number of batches already yielded in it; a sized loader is not prefetched by
    Lightning, so that count equals the batches trained on. On resume the sampler skips those batches, so the
    run continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, dataset: Dataset, batch_size: int, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)
        self._yielded = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches) to skip at the next iteration

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # a generator: the body runs at the first next(), after Lightning has called sampler.set_epoch()
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        start = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            if epoch == sampler.epoch and 0 < batches < len(self):
                start = batches
        sampler.skip(start * self.batch_size)  # type: ignore[operator]
        self._yielded = start
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        return {
            "epoch": sampler.epoch,
            "batches_yielded": self._yielded,
            "num_rows": sampler.n,
            "batch_size": int(self.batch_size or 0),
            "world_size": sampler.world_size,
            "seed": sampler.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        current = {
            "num_rows": sampler.n,
            "batch_size": self.batch_size,
            "world_size": sampler.world_size,
            "seed": sampler.seed,
        }
        changed = {k: (state.get(k), v) for k, v in current.items() if state.get(k) != v}
        if changed:
            log.warning(
                "the training data changed since the checkpoint (%s as (checkpoint, now)); the data position "
                "cannot be restored, the epoch restarts from its first batch",
                changed,
            )
            return
        sampler.set_epoch(int(state["epoch"]))
        self._resume = (int(state["epoch"]), int(state["batches_yielded"]))


# --------------------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------------------


class LengthExtensionDataModule(L.LightningDataModule):
    """Packed training sequences of the target length and per-length validation windows.

    Args:
        corpus: which documents (``posheads.data.CorpusConfig``): ``kind`` stdlib (offline default) | pydoc |
            stdlib+pydoc | files | hf, with ``paths`` / ``name`` / ``split`` / ``text_field`` ...
        seq_len: training sequence length; ``None`` = the LightningModule's ``target_length``.
        batch_size: training sequences per device per step.
        val_batch_size: validation windows per device per batch; ``None`` = ``batch_size`` at the target length,
            scaled up for shorter lengths so that each batch holds about as many tokens.
        val_fraction: fraction of the documents held out for validation (whole documents).
        split_seed: seed of the train / validation split.
        shuffle: visit the training rows in a seeded random order (else in corpus order).
        shuffle_seed: seed of the training order (epoch ``e`` uses ``shuffle_seed + e``); ``None`` = the run's
            ``seed_everything`` (so ``--seed_everything 1`` gives another order; 0 when no seed was set).
        min_doc_tokens: train only on documents with at least this many tokens (e.g. the target length, so that
            every sequence is one long document rather than several short ones packed together).
        val_lengths: lengths to validate at; ``None`` = the LightningModule's ``eval_lengths`` (original and
            target length).
        val_windows: how many windows of the longest validation length to score (``None``: all);
            shorter lengths score the same text in more, shorter windows.
        tokenizer: the tokenizer's model config; ``None`` = the LightningModule's ``tokenizer``.
        cache_dir: token cache directory; ``None`` = ``$POSHEADS_CACHE/tokens``; ``""`` disables the cache.
        add_bos: start every document with the BOS token (as in pre-training).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        corpus: CorpusConfig = CorpusConfig(),  # noqa: B008 - never mutated
        seq_len: int | None = None,
        batch_size: int = 1,
        val_batch_size: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        shuffle: bool = True,
        shuffle_seed: int | None = None,
        min_doc_tokens: int = 0,
        val_lengths: list[int] | None = None,
        val_windows: int | None = 16,
        tokenizer: ModelConfig | None = None,
        cache_dir: str | None = None,
        add_bos: bool = True,
        num_workers: int = 0,
    ):
        super().__init__()
        if isinstance(corpus, dict):
            corpus = CorpusConfig(**corpus)
        if isinstance(tokenizer, dict):
            tokenizer = ModelConfig(**tokenizer)
        self.corpus = corpus or CorpusConfig()
        for name, value, low in (
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("val_windows", val_windows, 1),
            ("shuffle_seed", shuffle_seed, 0),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"data.{name}={value!r} must be an int >= {low}")
        for name, value in (
            ("min_doc_tokens", min_doc_tokens),
            ("num_workers", num_workers),
            ("split_seed", split_seed),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"data.{name}={value!r} must be an int >= 0")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction!r} must be in (0, 1)")
        if val_lengths is not None and (not val_lengths or any(int(n) < 2 for n in val_lengths)):
            raise ValueError(
                f"data.val_lengths={val_lengths!r} must be a non-empty list of lengths >= 2 or null"
            )
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.min_doc_tokens = min_doc_tokens
        self.val_lengths = sorted({int(n) for n in val_lengths}) if val_lengths is not None else None
        self.val_windows = val_windows
        self.tokenizer_config = tokenizer
        self.cache_dir = cache_dir
        self.add_bos = add_bos
        self.num_workers = num_workers

        self._tokenizer: Any = None
        self.train_docs: list[TokenizedDocument] | None = None
        self.val_docs: list[TokenizedDocument] | None = None
        self.train_rows: torch.Tensor | None = None  # [N, seq_len]
        self.val_sets: dict[int, ValidationSet] | None = None

    # ------------------------------------------------------------------------------------ resolution

    def _module_attr(self, name: str, option: str) -> Any:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        if module is None or not hasattr(module, name):
            raise ValueError(
                f"data.{option} is not set and there is no LightningModule with `{name}` to take it from"
            )
        return getattr(module, name)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            if self.tokenizer_config is not None:
                self._tokenizer = load_tokenizer(self.tokenizer_config)
            else:
                self._tokenizer = self._module_attr("tokenizer", "tokenizer")
        return self._tokenizer

    def resolved_seq_len(self) -> int:
        return int(
            self.seq_len if self.seq_len is not None else self._module_attr("target_length", "seq_len")
        )

    def resolved_val_lengths(self) -> list[int]:
        if self.val_lengths is not None:
            return list(self.val_lengths)
        return sorted({int(n) for n in self._module_attr("eval_lengths", "val_lengths")})

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        if trainer._accelerator_connector.use_distributed_sampler and trainer.world_size > 1:
            raise ValueError(
                "trainer.use_distributed_sampler=true: LengthExtensionDataModule shards the data over ranks itself "
                "(so that the data position can be resumed); set trainer.use_distributed_sampler=false"
            )
        return trainer.global_rank, trainer.world_size

    # ------------------------------------------------------------------------------------ data

    def _cache(self) -> str | None:
        if self.cache_dir == "":
            return None
        return self.cache_dir if self.cache_dir is not None else str(Path(cache_root()) / "tokens")

    def load_documents(self) -> tuple[list[TokenizedDocument], list[TokenizedDocument]]:
        """Tokenise the corpus and split it: ``(train documents, validation documents)``."""
        if self.train_docs is None or self.val_docs is None:
            docs = load_token_documents(
                self.corpus, self.tokenizer, cache_dir=self._cache(), add_bos=self.add_bos
            )
            if len(docs) < 2:
                raise ValueError(
                    f"data.corpus has {len(docs)} document(s): need at least 2 to split train / validation"
                )
            self.train_docs, self.val_docs = split_by_document(docs, self.val_fraction, self.split_seed)
        return self.train_docs, self.val_docs

    def setup(self, stage: str | None = None) -> None:
        train_docs, _ = self.load_documents()
        if stage in (None, "fit") and self.train_rows is None:
            docs = select_min_length(train_docs, self.min_doc_tokens) if self.min_doc_tokens else train_docs
            eos = getattr(self.tokenizer, "eos_token_id", None)
            self.train_rows = pack_sequences(docs, self.resolved_seq_len(), eos_id=eos)  # [N, seq_len]
            log.info(
                "training data: %d rows of %d tokens from %d documents", *self.train_rows.shape, len(docs)
            )

    def validation_sets(self) -> dict[int, ValidationSet]:
        """The validation windows per length (built on first use)."""
        if self.val_sets is None:
            _, val_docs = self.load_documents()
            self.val_sets = build_validation_sets(val_docs, self.resolved_val_lengths(), self.val_windows)
        return self.val_sets

    # ------------------------------------------------------------------------------------ loaders

    def resolved_shuffle_seed(self) -> int:
        """``shuffle_seed``, or the global seed Lightning's ``seed_everything`` exported (0 if none)."""
        if self.shuffle_seed is not None:
            return self.shuffle_seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_rows is None:
            self.setup("fit")
        assert self.train_rows is not None
        rank, world = self._rank_world()
        sampler = ResumableSampler(
            len(self.train_rows), self.shuffle, self.resolved_shuffle_seed(), rank, world
        )
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} exceeds the {len(sampler)} training rows per rank "
                f"({len(self.train_rows)} rows of {self.train_rows.shape[1]} tokens): use a smaller batch or more data"
            )
        return ResumableDataLoader(
            TokenRows(self.train_rows),
            self.batch_size,
            sampler,
            num_workers=self.num_workers,
            pin_memory=False,
        )

    def _val_batch(self, length: int) -> int:
        if self.val_batch_size is not None:
            return self.val_batch_size
        return max(1, self.batch_size * self.resolved_seq_len() // length)

    def val_dataloader(self) -> list[DataLoader]:
        rank, world = self._rank_world()
        return [
            DataLoader(
                ShardedWindows(vs.input_ids, rank, world), batch_size=self._val_batch(length), shuffle=False
            )
            for length, vs in sorted(self.validation_sets().items())
        ]

    def protocol(self) -> dict[str, Any]:
        """What the data is, for result records."""
        train_docs, val_docs = self.load_documents()
        out: dict[str, Any] = {
            "corpus": self.corpus.kind if self.corpus.kind != "hf" else f"hf:{self.corpus.name}",
            "split": f"by document, val_fraction={self.val_fraction}, split_seed={self.split_seed}",
            "train_documents": len(train_docs),
            "val_documents": len(val_docs),
            "min_doc_tokens": self.min_doc_tokens,
            "train_order": f"shuffle_seed={self.resolved_shuffle_seed()}" if self.shuffle else "corpus order",
        }
        if self.train_rows is not None:
            out["train_rows"] = int(self.train_rows.shape[0])
            out["seq_len"] = int(self.train_rows.shape[1])
        if self.val_sets is not None:
            out["validation"] = {str(n): vs.protocol() for n, vs in sorted(self.val_sets.items())}
        return out
