"""Tokenising documents, selecting long ones, splitting them, and cutting them into fixed-length inputs.

Two ways to turn tokenised documents into model inputs:

* **Packing** (training): :func:`pack_sequences` concatenates documents, an EOS token between them, and
  cuts the stream into rows of ``seq_len`` tokens.
* **Windowing** (long-input evaluation, docs/definitions.md "perplexity protocol"): :func:`window_document`
  cuts *one* document into windows of exactly ``length`` tokens, either disjoint or sliding with a stride.
  The sliding protocol is the one of the YaRN evaluation (Peng et al. 2023, "YaRN: Efficient Context Window
  Extension of Large Language Models", arXiv 2309.00071) and the Hugging Face perplexity guide
  ("Perplexity of fixed-length models"): every window scores only the tokens the previous window did not,
  so each token is scored once, with up to ``length - stride`` tokens of context before it.

Splits are by document (:func:`split_by_document`), so no validation text is ever seen in training, and
are a function of the document names and the seed only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from posheads.data.corpus import CorpusConfig, Document, DocumentSource, build_corpus

log = logging.getLogger(__name__)

__all__ = [
    "TokenizedDocument",
    "Window",
    "corpus_stats",
    "load_token_documents",
    "pack_sequences",
    "select_min_length",
    "split_by_document",
    "tokenize_documents",
    "tokenizer_fingerprint",
    "window_corpus",
    "window_document",
    "window_tensors",
]

#: Show a progress bar when tokenising at least this many documents (``progress=None``).
PROGRESS_MIN_DOCUMENTS = 100
#: Bumped when the on-disk token cache layout changes.
_CACHE_FORMAT = 1


@dataclass
class TokenizedDocument:
    """A document as token ids. ``ids``: int64 ``[n_tokens]`` (BOS first when tokenised with ``add_bos``)."""

    name: str
    ids: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 1:
            raise ValueError(
                f"TokenizedDocument {self.name!r}: ids must be 1-D, got shape {tuple(self.ids.shape)}"
            )

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def __len__(self) -> int:
        return self.n_tokens


# --------------------------------------------------------------------------------------------------------
# Tokenising
# --------------------------------------------------------------------------------------------------------


def tokenize_documents(
    docs: Iterable[Document] | DocumentSource,
    tokenizer: Any,
    add_bos: bool = True,
    max_tokens: int | None = None,
    progress: bool | None = None,
    batch_size: int = 64,
) -> list[TokenizedDocument]:
    """Tokenise documents with a Hugging Face tokenizer, in their order.

    Each text is encoded with ``tokenizer(texts, add_special_tokens=False)["input_ids"]`` (batched, which
    lets fast tokenizers use their threads); when ``add_bos`` and the tokenizer has a ``bos_token_id``,
    that id is prepended -- the way the model saw documents in pre-training. ``max_tokens`` truncates
    every document to its first ``max_tokens`` ids (BOS included). ``progress=None`` shows a tqdm bar for
    at least :data:`PROGRESS_MIN_DOCUMENTS` documents.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be >= 1 or None")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    documents = list(docs.documents() if isinstance(docs, DocumentSource) else docs)
    bos = getattr(tokenizer, "bos_token_id", None) if add_bos else None
    show = len(documents) >= PROGRESS_MIN_DOCUMENTS if progress is None else progress
    out: list[TokenizedDocument] = []
    with tqdm(total=len(documents), desc="tokenising", unit="doc", disable=not show) as bar:
        for i in range(0, len(documents), batch_size):
            batch = documents[i : i + batch_size]
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
            for doc, ids in zip(batch, encoded, strict=True):
                if bos is not None:
                    ids = [bos, *ids]
                if max_tokens is not None:
                    ids = ids[:max_tokens]
                out.append(TokenizedDocument(doc.name, torch.tensor(ids, dtype=torch.long)))  # [n_tokens]
            bar.update(len(batch))
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable hash of what the tokenizer computes (its full serialised state, or its vocabulary).

    Used to key the token cache: two tokenizers with the same fingerprint give the same ids.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        for token, idx in sorted(tokenizer.get_vocab().items()):
            h.update(f"{token}\x00{idx}\x01".encode())
    h.update(f"bos={getattr(tokenizer, 'bos_token_id', None)}".encode())
    return h.hexdigest()


def _corpus_digest(documents: Sequence[Document]) -> str:
    h = hashlib.sha256()
    for d in documents:
        h.update(d.name.encode("utf-8", "surrogatepass") + b"\x00")
        h.update(d.text.encode("utf-8", "surrogatepass") + b"\x01")
    return h.hexdigest()


def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label)[:60]


def load_token_documents(
    cfg: CorpusConfig,
    tokenizer: Any,
    min_tokens: int = 0,
    cache_dir: str | os.PathLike | None = None,
    add_bos: bool = True,
    progress: bool | None = None,
) -> list[TokenizedDocument]:
    """Build the corpus of ``cfg``, tokenise it, and keep the documents with at least ``min_tokens`` tokens.

    With ``cache_dir``, the token ids are stored in ``<cache_dir>/<corpus>-<key>.pt`` and reused: the key
    hashes the documents' names and texts (so a different Python's stdlib, or edited files, miss the
    cache), :func:`tokenizer_fingerprint` and ``add_bos``. The whole corpus is cached, before selection.
    Reading the stdlib takes well under a second; tokenising its 1.2 M SmolLM2 tokens takes several.
    """
    if min_tokens < 0:
        raise ValueError(f"min_tokens={min_tokens!r} must be >= 0")
    source = build_corpus(cfg)
    documents = list(source.documents())
    tokenized: list[TokenizedDocument] | None = None
    path = None
    if cache_dir is not None:
        key = hashlib.sha256(
            f"{_CACHE_FORMAT}|{_corpus_digest(documents)}|{tokenizer_fingerprint(tokenizer)}|{add_bos}".encode()
        ).hexdigest()[:24]
        tok_label = os.path.basename(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__))
        path = os.path.join(os.fspath(cache_dir), f"{_safe(source.name)}-{_safe(tok_label)}-{key}.pt")
        tokenized = _load_cache(path, documents)
    if tokenized is None:
        tokenized = tokenize_documents(documents, tokenizer, add_bos=add_bos, progress=progress)
        if path is not None:
            _save_cache(path, tokenized)
    return select_min_length(tokenized, min_tokens) if min_tokens > 0 else tokenized


def _save_cache(path: str, docs: Sequence[TokenizedDocument]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    lengths = torch.tensor([d.n_tokens for d in docs], dtype=torch.long)  # [n_docs]
    flat = torch.cat([d.ids for d in docs]) if docs else torch.zeros(0, dtype=torch.long)  # [total]
    payload = {"format": _CACHE_FORMAT, "names": [d.name for d in docs], "lengths": lengths, "ids": flat}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    log.info("cached %d tokenised documents in %s", len(docs), path)


def _load_cache(path: str, documents: Sequence[Document]) -> list[TokenizedDocument] | None:
    if not os.path.exists(path):
        return None
    try:
        payload = torch.load(path, weights_only=True)
        names, lengths, flat = payload["names"], payload["lengths"], payload["ids"]
        if payload["format"] != _CACHE_FORMAT or names != [d.name for d in documents]:
            raise ValueError("cache content does not match the corpus")
        pieces = torch.split(flat.long(), lengths.tolist())  # n_docs x [n_tokens_i]
    except Exception as err:  # a truncated or foreign file: recompute rather than fail
        log.warning("ignoring unreadable token cache %s (%s)", path, err)
        return None
    log.info("loaded %d tokenised documents from %s", len(names), path)
    return [TokenizedDocument(n, p.clone()) for n, p in zip(names, pieces, strict=True)]


# --------------------------------------------------------------------------------------------------------
# Selecting and splitting
# --------------------------------------------------------------------------------------------------------


def select_min_length(docs: Sequence[TokenizedDocument], min_tokens: int) -> list[TokenizedDocument]:
    """The documents with at least ``min_tokens`` tokens, in their order.

    Raises ``ValueError`` naming ``min_tokens`` and the longest document when none qualifies.
    """
    if min_tokens < 0:
        raise ValueError(f"min_tokens={min_tokens!r} must be >= 0")
    kept = [d for d in docs if d.n_tokens >= min_tokens]
    if not kept:
        if not docs:
            raise ValueError(f"no documents to select from (min_tokens={min_tokens})")
        longest = max(docs, key=lambda d: d.n_tokens)
        raise ValueError(
            f"no document has at least min_tokens={min_tokens} tokens: the longest of {len(docs)} documents, "
            f"{longest.name!r}, has {longest.n_tokens} tokens. Use a shorter length or a corpus of longer "
            f"documents."
        )
    return kept


def corpus_stats(
    docs: Sequence[TokenizedDocument], thresholds: Sequence[int] = (2048, 4096, 8192, 16384, 32768)
) -> dict[str, Any]:
    """Token counts of a tokenised corpus: documents, tokens, longest, median, and documents >= each threshold."""
    lengths = sorted(d.n_tokens for d in docs)
    return {
        "n_documents": len(lengths),
        "n_tokens": sum(lengths),
        "max_tokens": lengths[-1] if lengths else 0,
        "median_tokens": lengths[len(lengths) // 2] if lengths else 0,
        "documents_at_least": {int(t): sum(n >= t for n in lengths) for t in thresholds},
    }


_Named = TypeVar("_Named", Document, TokenizedDocument)


def _split_rank(name: str, seed: int) -> int:
    """A stable 64-bit hash of (seed, name) -- ``hash()`` is salted per process and unusable here."""
    return int.from_bytes(
        hashlib.sha256(f"{seed}\x00{name}".encode("utf-8", "surrogatepass")).digest()[:8], "big"
    )


def split_by_document(
    docs: Sequence[_Named], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[_Named], list[_Named]]:
    """Split documents into ``(train, validation)``, whole documents to one side.

    The documents are ranked by a SHA-256 hash of ``(seed, name)`` and the first
    ``round(val_fraction * n)`` go to validation (at least one and at most ``n - 1`` when
    ``0 < val_fraction < 1`` and ``n >= 2``). Membership therefore depends only on the set of names and
    the seed -- not on the input order, the process or the Python version. Each part keeps the input order.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1]")
    names = [d.name for d in docs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"split_by_document: document name {dup!r} occurs more than once")
    n = len(docs)
    k = round(val_fraction * n)
    if 0.0 < val_fraction < 1.0 and n >= 2:
        k = min(max(k, 1), n - 1)
    ranked = sorted(names, key=lambda name: (_split_rank(name, seed), name))
    val_names = set(ranked[:k])
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return train, val


# --------------------------------------------------------------------------------------------------------
# Packing (training)
# --------------------------------------------------------------------------------------------------------


def _ids_of(doc: TokenizedDocument | torch.Tensor) -> torch.Tensor:
    ids = doc.ids if isinstance(doc, TokenizedDocument) else doc
    return ids.reshape(-1).long()


def pack_sequences(
    docs: Sequence[TokenizedDocument | torch.Tensor],
    seq_len: int,
    eos_id: int | None,
    drop_last: bool = True,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Concatenate documents, ``eos_id`` between consecutive ones (none if ``None``), and cut into rows.

    Returns int64 ``[N, seq_len]``: row ``r`` is tokens ``[r * seq_len, (r + 1) * seq_len)`` of the stream.
    ``drop_last=True`` drops the final partial row; ``drop_last=False`` keeps it, padded on the right with
    ``pad_id`` (default ``eos_id``). Raises ``ValueError`` when no row can be formed.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be >= 1")
    pieces: list[torch.Tensor] = []
    for i, doc in enumerate(docs):
        if i > 0 and eos_id is not None:
            pieces.append(torch.tensor([eos_id], dtype=torch.long))
        pieces.append(_ids_of(doc))
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)  # [total]
    total = stream.numel()
    n_full = total // seq_len
    rest = total - n_full * seq_len
    if drop_last or rest == 0:
        if n_full == 0:
            raise ValueError(
                f"pack_sequences: {len(docs)} documents hold {total} tokens, fewer than seq_len={seq_len}: "
                f"no full sequence (use drop_last=False, a shorter seq_len or more documents)"
            )
        return stream[: n_full * seq_len].reshape(n_full, seq_len).clone()  # [N, seq_len]
    fill = pad_id if pad_id is not None else eos_id
    if fill is None:
        raise ValueError("pack_sequences: drop_last=False needs pad_id or eos_id to pad the last row")
    padded = torch.full(((n_full + 1) * seq_len,), fill, dtype=torch.long)  # [(N+1) * seq_len]
    padded[:total] = stream
    return padded.reshape(n_full + 1, seq_len)  # [N + 1, seq_len]


# --------------------------------------------------------------------------------------------------------
# Windowing (long-input evaluation)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` of document ``doc`` are fed to the model; the loss is taken on the tokens
    with absolute index ``>= score_from`` -- except position ``start`` itself, which has no preceding
    token inside the window to be predicted from.

    The *scored regions* ``[score_from, end)`` of a document's windows are disjoint and, for sliding
    windows, cover the whole document.
    """

    doc: str
    start: int
    end: int
    score_from: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.score_from <= self.end or self.start == self.end:
            raise ValueError(f"invalid Window {self}: need 0 <= start <= score_from <= end and start < end")

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def score_offset(self) -> int:
        """Index inside the window of the first scored-region token (``score_from - start``)."""
        return self.score_from - self.start

    @property
    def n_scored(self) -> int:
        """Number of tokens whose prediction is scored: ``end - max(score_from, start + 1)``."""
        return self.end - max(self.score_from, self.start + 1)


def window_document(
    doc: TokenizedDocument, length: int, stride: int | None = None, max_windows: int | None = None
) -> list[Window]:
    """Cut one document into windows of exactly ``length`` tokens.

    * ``stride=None`` -- disjoint windows ``[k*length, (k+1)*length)``, each scoring its own tokens
      (``score_from = start``); the tail shorter than ``length`` is not used.
    * ``stride=s`` (``1 <= s <= length``) -- sliding windows starting at ``0, s, 2s, ...`` as in the YaRN
      evaluation and the Hugging Face perplexity guide; each window scores only the tokens the previous one
      did not (``score_from = previous end``), so all but the first window see at least ``length - s``
      tokens of context for every scored token. When the last regular window ends before the document
      does, one more window ``[n - length, n)`` scores the rest, so every token is scored exactly once.

    A document shorter than ``length`` gives no window. ``max_windows`` keeps the first windows only.
    """
    if length < 1:
        raise ValueError(f"length={length!r} must be >= 1")
    if stride is not None and not 1 <= stride <= length:
        raise ValueError(f"stride={stride!r} must be in [1, length={length}] or None (disjoint windows)")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows={max_windows!r} must be >= 1 or None")
    n = doc.n_tokens
    if n < length:
        return []
    if stride is None:
        windows = [Window(doc.name, s, s + length, s) for s in range(0, n - length + 1, length)]
    else:
        starts = list(range(0, n - length + 1, stride))
        if starts[-1] + length < n:
            starts.append(n - length)
        windows, prev_end = [], 0
        for s in starts:
            windows.append(Window(doc.name, s, s + length, max(prev_end, s)))
            prev_end = s + length
    return windows if max_windows is None else windows[:max_windows]


def window_corpus(
    docs: Sequence[TokenizedDocument],
    length: int,
    stride: int | None = None,
    max_windows_per_doc: int | None = None,
    max_windows: int | None = None,
) -> list[Window]:
    """:func:`window_document` over documents in order, optionally capped per document and in total."""
    out: list[Window] = []
    for doc in docs:
        out.extend(window_document(doc, length, stride=stride, max_windows=max_windows_per_doc))
        if max_windows is not None and len(out) >= max_windows:
            return out[:max_windows]
    return out


def window_tensors(
    doc: TokenizedDocument, window: Window, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` for one window, both int64 ``[length]``, in the Hugging Face convention.

    ``labels`` equals ``input_ids`` on the scored region and ``ignore_index`` before it; the model's loss
    shifts labels by one, which drops position ``start``.
    """
    if window.doc != doc.name or window.end > doc.n_tokens:
        raise ValueError(f"window {window} does not belong to document {doc.name!r} ({doc.n_tokens} tokens)")
    input_ids = doc.ids[window.start : window.end].clone()  # [length]
    labels = input_ids.clone()  # [length]
    labels[: window.score_offset] = ignore_index
    return input_ids, labels
