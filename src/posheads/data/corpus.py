"""Document sources: where the text for training and long-input evaluation comes from.

A *document* is one named piece of text (one source file, one help topic, one line of a JSONL file, one
row of a dataset). Every source yields its documents in a deterministic order, so that tokenising,
splitting and packing are reproducible run to run.

Sources:

* :class:`StdlibCorpus` -- the CPython standard library's own source (``sysconfig.get_paths()["stdlib"]``),
  one document per ``.py`` file. It exists on every Python installation, which makes it the embedded
  default corpus: the 168 top-level modules of CPython 3.11 hold about 1.2 M SmolLM2 tokens, 48 files have
  at least 8k tokens and 20 at least 16k -- real long documents for perplexity at 8k-32k.
* :class:`PydocTopicsCorpus` -- the English help topics of ``pydoc_data.topics`` (~110k SmolLM2 tokens).
* :class:`LocalFilesCorpus` -- text files, directories of them, and JSONL files.
* :class:`HFDatasetCorpus` -- any ``datasets.load_dataset`` name (hub id, packaged builder such as
  ``"json"`` with ``data_files``, or a local directory). Offline and not cached, it fails with a
  :class:`CorpusUnavailableError` that names the dataset and says how to use local files instead.

:class:`CorpusConfig` is the typed, validated description used by configs and the CLI;
:func:`build_corpus` turns it into a source.
"""

from __future__ import annotations

import fnmatch
import itertools
import json
import logging
import os
import sysconfig
import tokenize
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "CORPUS_KINDS",
    "ConcatCorpus",
    "CorpusConfig",
    "CorpusUnavailableError",
    "Document",
    "DocumentSource",
    "HFDatasetCorpus",
    "LimitedCorpus",
    "LocalFilesCorpus",
    "PydocTopicsCorpus",
    "StdlibCorpus",
    "build_corpus",
]


class CorpusUnavailableError(RuntimeError):
    """A corpus cannot be loaded here (typically: a ``datasets`` name while offline and not cached)."""


@dataclass(frozen=True)
class Document:
    """One named text. ``name`` is unique within a corpus and is what train/validation splits hash."""

    name: str
    text: str


class DocumentSource(ABC):
    """A deterministic, re-iterable stream of :class:`Document`.

    Subclasses set ``name`` (a short label recorded with every result) and implement :meth:`documents`,
    which must yield the same documents in the same order every time it is called.
    """

    name: str

    @abstractmethod
    def documents(self) -> Iterator[Document]:
        """Yield the documents in a deterministic order."""

    def __iter__(self) -> Iterator[Document]:
        return self.documents()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# --------------------------------------------------------------------------------------------------------
# CPython standard library
# --------------------------------------------------------------------------------------------------------

#: Directory names treated as test suites inside the standard library (skipped unless ``include_tests``).
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
#: Packages never read by :class:`StdlibCorpus`: ``pydoc_data`` is prose, served by :class:`PydocTopicsCorpus`
#: (including it here would count the same text twice in ``kind="stdlib+pydoc"``).
STDLIB_EXCLUDED_PACKAGES = frozenset({"pydoc_data"})


def _read_python_source(path: Path) -> str:
    """Read a ``.py`` file honouring its PEP 263 coding cookie / BOM; fall back to UTF-8 with replacement."""
    try:
        with tokenize.open(path) as fh:
            return fh.read()
    except (SyntaxError, UnicodeDecodeError, LookupError):
        # A few files (mostly test data) declare a bad or unknown encoding on purpose.
        return path.read_bytes().decode("utf-8", errors="replace")


class StdlibCorpus(DocumentSource):
    """The CPython standard library's source files, one document per ``.py`` file.

    Order: the top-level modules sorted by file name, then (with ``subpackages=True``) the files of every
    package below the root -- a directory with an ``__init__.py``, reached through packages only -- sorted
    by relative path. ``site-packages``, ``lib-dynload`` and ``config-*`` are never packages, so installed
    third-party code is never read. Test suites (directories named ``test``, ``tests`` or ``idle_test``)
    are skipped unless ``include_tests=True``; ``pydoc_data`` is always skipped (see
    :class:`PydocTopicsCorpus`).

    Document names are ``"stdlib/<relative posix path>"``, e.g. ``"stdlib/email/parser.py"``.

    Args:
        subpackages: also read the files of sub-packages (``email/``, ``asyncio/``, ...).
        include_tests: with ``subpackages``, also read the test-suite packages.
        root: the directory to read; defaults to ``sysconfig.get_paths()["stdlib"]``.
    """

    def __init__(self, subpackages: bool = False, include_tests: bool = False, root: str | None = None):
        self.subpackages = bool(subpackages)
        self.include_tests = bool(include_tests)
        self.root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise FileNotFoundError(f"StdlibCorpus root={str(self.root)!r} is not a directory")
        self.name = (
            "stdlib" + ("+subpackages" if self.subpackages else "") + ("+tests" if self.include_tests else "")
        )

    def files(self) -> list[Path]:
        """The files read, in document order."""
        top = sorted((p for p in self.root.glob("*.py") if p.is_file()), key=lambda p: p.name)
        if not self.subpackages:
            return top
        sub: list[Path] = []
        for entry in sorted(self.root.iterdir(), key=lambda p: p.name):
            if (
                entry.is_dir()
                and self._is_wanted_package(entry)
                and entry.name not in STDLIB_EXCLUDED_PACKAGES
            ):
                sub.extend(self._package_files(entry))
        sub.sort(key=lambda p: p.relative_to(self.root).as_posix())
        return top + sub

    def _is_wanted_package(self, directory: Path) -> bool:
        if not (directory / "__init__.py").is_file():
            return False
        return self.include_tests or directory.name not in STDLIB_TEST_DIRS

    def _package_files(self, package: Path) -> list[Path]:
        out = [p for p in package.glob("*.py") if p.is_file()]
        for child in package.iterdir():
            if child.is_dir() and self._is_wanted_package(child):
                out.extend(self._package_files(child))
        return out

    def documents(self) -> Iterator[Document]:
        for path in self.files():
            yield Document(f"stdlib/{path.relative_to(self.root).as_posix()}", _read_python_source(path))


class PydocTopicsCorpus(DocumentSource):
    """The help topics of ``pydoc_data.topics`` (the text behind ``help("assert")``), sorted by key.

    English prose about the language, shipped with every CPython; names are ``"pydoc/<topic>"``.
    """

    name = "pydoc"

    def documents(self) -> Iterator[Document]:
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield Document(f"pydoc/{key}", topics[key])


# --------------------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------------------

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class LocalFilesCorpus(DocumentSource):
    """Documents from local files.

    Each entry of ``paths`` is

    * a ``.jsonl`` / ``.ndjson`` file: one document per non-blank line, its text in ``text_field``;
      names ``"<path>:<line number>"`` (1-based);
    * any other file: one document holding the whole file, read as UTF-8; name ``"<path>"``;
    * a directory: every file below it whose name matches ``pattern`` (``fnmatch``, e.g. ``"*.py"``),
      recursively, sorted by relative path, hidden files and directories and ``__pycache__`` skipped;
      each file handled as
      above. Files that are not UTF-8 text (binary files) are skipped with a warning.

    Entries keep the order given. A missing path raises :class:`FileNotFoundError` naming it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], text_field: str = "text", pattern: str = "*"):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        if not self.paths:
            raise ValueError("LocalFilesCorpus paths=[] is empty: give at least one file or directory")
        self.text_field = text_field
        self.pattern = pattern
        for p in self.paths:
            if not os.path.exists(p):
                raise FileNotFoundError(f"LocalFilesCorpus: path {p!r} does not exist")
        self.name = "files"

    def files(self) -> list[tuple[Path, str, bool]]:
        """``(path, display name, named explicitly)`` for every file read, in document order."""
        out: list[tuple[Path, str, bool]] = []
        for p in self.paths:
            path = Path(p)
            if not path.exists():
                raise FileNotFoundError(f"LocalFilesCorpus: path {p!r} does not exist")
            if path.is_dir():
                found = []
                for dirpath, dirnames, filenames in os.walk(path):
                    dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
                    for fname in filenames:
                        if not fname.startswith(".") and fnmatch.fnmatch(fname, self.pattern):
                            found.append(Path(dirpath) / fname)
                found.sort(key=lambda f: f.relative_to(path).as_posix())
                out.extend((f, f"{p.rstrip('/')}/{f.relative_to(path).as_posix()}", False) for f in found)
            else:
                out.append((path, p, True))
        return out

    def documents(self) -> Iterator[Document]:
        for path, display, explicit in self.files():
            if path.suffix.lower() in JSONL_SUFFIXES:
                yield from self._jsonl_documents(path, display)
                continue
            data = path.read_bytes()
            try:
                if b"\x00" in data[:8192]:
                    raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte: binary file")
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as err:
                if explicit:
                    raise ValueError(f"LocalFilesCorpus: file {display!r} is not UTF-8 text ({err})") from err
                log.warning("LocalFilesCorpus: skipping %s (not UTF-8 text)", display)
                continue
            if not text.strip():  # an empty file is not a document (it would count without a token)
                log.warning("LocalFilesCorpus: skipping %s (empty)", display)
                continue
            yield Document(display, text)

    def _jsonl_documents(self, path: Path, display: str) -> Iterator[Document]:
        with path.open(encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"LocalFilesCorpus: {display}:{lineno} is not valid JSON ({err})"
                    ) from err
                if not isinstance(record, dict) or self.text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise ValueError(
                        f"LocalFilesCorpus: {display}:{lineno} has no text_field={self.text_field!r} (found {keys})"
                    )
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise ValueError(
                        f"LocalFilesCorpus: {display}:{lineno} field {self.text_field!r} is "
                        f"{type(text).__name__}, not a string"
                    )
                if not text.strip():
                    log.warning(
                        "LocalFilesCorpus: skipping %s:%d (empty %r)", display, lineno, self.text_field
                    )
                    continue
                yield Document(f"{display}:{lineno}", text)


# --------------------------------------------------------------------------------------------------------
# Hugging Face datasets
# --------------------------------------------------------------------------------------------------------


class HFDatasetCorpus(DocumentSource):
    """Documents from ``datasets.load_dataset(name, config_name, split=split, ...)``, one per row.

    ``name`` is anything ``load_dataset`` accepts: a hub id (``"wikitext"``, ``"emozilla/pg19-test"``),
    a packaged builder with ``data_files`` (``"json"``, ``"text"``, ``"parquet"``), or a local directory.
    The dataset is loaded lazily, on the first :meth:`documents` call, and kept.

    When it cannot be loaded -- no network (``HF_DATASETS_OFFLINE=1``) and not in the local cache, an
    unknown name, ... -- a :class:`CorpusUnavailableError` names the dataset, gives the original error and
    tells how to use local files or the embedded corpora instead.

    Document names are ``"hf:<name>[:<config>]/<split>/<row index>"``.
    """

    def __init__(
        self,
        name: str,
        config_name: str | None = None,
        split: str = "train",
        text_field: str = "text",
        max_documents: int | None = None,
        streaming: bool = False,
        data_files: str | Sequence[str] | None = None,
        cache_dir: str | None = None,
    ):
        if not name:
            raise ValueError(f"HFDatasetCorpus name={name!r} must be a non-empty dataset name or path")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"HFDatasetCorpus max_documents={max_documents!r} must be >= 1 or None")
        self.dataset_name = name
        self.config_name = config_name
        self.split = split
        self.text_field = text_field
        self.max_documents = max_documents
        self.streaming = bool(streaming)
        self.data_files = (
            [str(f) for f in data_files] if isinstance(data_files, (list, tuple)) else data_files
        )
        self.cache_dir = cache_dir
        self.name = f"hf:{name}" + (f":{config_name}" if config_name else "") + f"/{split}"
        self._dataset: Any = None

    def _unavailable_message(self, err: BaseException) -> str:
        try:
            from datasets import config as ds_config

            offline = "on" if ds_config.HF_HUB_OFFLINE else "off"
        except ImportError:  # pragma: no cover - datasets is a declared dependency
            offline = "unknown"
        return (
            f"Could not load the dataset {self.dataset_name!r} (config_name={self.config_name!r}, "
            f"split={self.split!r}) with datasets.load_dataset: {type(err).__name__}: {err}. "
            f"This machine may be offline (datasets offline mode is {offline}) and the dataset not in "
            f"the local cache. To use it, download it where there is network, or save its text locally and use "
            f"CorpusConfig(kind='files', paths=['data.jsonl'], text_field={self.text_field!r}) "
            f"(.jsonl one document per line, .txt/.md/.py one document per file, directories recursively); "
            f"or use the embedded corpora kind='stdlib', 'pydoc' or 'stdlib+pydoc'."
        )

    def load(self) -> Any:
        """Load (once) and return the ``datasets.Dataset`` / ``IterableDataset``."""
        if self._dataset is not None:
            return self._dataset
        try:
            import datasets
        except ImportError as err:  # pragma: no cover - datasets is a declared dependency
            raise CorpusUnavailableError(f"{self._unavailable_message(err)} (pip install datasets)") from err
        kwargs: dict[str, Any] = {"split": self.split, "streaming": self.streaming}
        if self.data_files is not None:
            kwargs["data_files"] = self.data_files
        if self.cache_dir is not None:
            kwargs["cache_dir"] = self.cache_dir
        try:
            ds = datasets.load_dataset(self.dataset_name, self.config_name, **kwargs)
        except Exception as err:  # network, offline, not found, bad config: all reported the same way
            raise CorpusUnavailableError(self._unavailable_message(err)) from err
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise ValueError(
                f"HFDatasetCorpus text_field={self.text_field!r} is not a column of {self.dataset_name!r} "
                f"(columns: {list(columns)})"
            )
        self._dataset = ds
        return ds

    def documents(self) -> Iterator[Document]:
        ds = self.load()
        rows: Iterable[dict] = ds if self.max_documents is None else itertools.islice(ds, self.max_documents)
        for i, row in enumerate(rows):
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise ValueError(
                    f"HFDatasetCorpus {self.dataset_name!r} row {i}: text_field={self.text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            yield Document(f"{self.name}/{i}", text)


# --------------------------------------------------------------------------------------------------------
# Combinators
# --------------------------------------------------------------------------------------------------------


class ConcatCorpus(DocumentSource):
    """The documents of several sources, one source after the other. Names must be unique across them."""

    def __init__(self, sources: Sequence[DocumentSource]):
        if not sources:
            raise ValueError("ConcatCorpus needs at least one source")
        self.sources = list(sources)
        self.name = "+".join(s.name for s in self.sources)

    def documents(self) -> Iterator[Document]:
        seen: set[str] = set()
        for source in self.sources:
            for doc in source.documents():
                if doc.name in seen:
                    raise ValueError(f"ConcatCorpus {self.name!r}: document name {doc.name!r} occurs twice")
                seen.add(doc.name)
                yield doc


class LimitedCorpus(DocumentSource):
    """The first ``max_documents`` documents of a source."""

    def __init__(self, source: DocumentSource, max_documents: int):
        if max_documents < 1:
            raise ValueError(f"LimitedCorpus max_documents={max_documents!r} must be >= 1")
        self.source = source
        self.max_documents = max_documents
        self.name = f"{source.name}[:{max_documents}]"

    def documents(self) -> Iterator[Document]:
        return itertools.islice(self.source.documents(), self.max_documents)


# --------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------

#: ``CorpusConfig.kind`` values.
CORPUS_KINDS = ("stdlib", "pydoc", "stdlib+pydoc", "files", "hf")


@dataclass
class CorpusConfig:
    """Which documents to read. Validated on construction; errors name the option and its value.

    Attributes:
        kind: ``"stdlib"`` (CPython standard library source, the default), ``"pydoc"`` (help topics),
            ``"stdlib+pydoc"`` (both), ``"files"`` (local files, see :class:`LocalFilesCorpus`) or ``"hf"``
            (a ``datasets`` name, see :class:`HFDatasetCorpus`).
        paths: files / directories for ``kind="files"``; for ``kind="hf"`` they are passed as ``data_files``;
            for the stdlib kinds at most one directory, read instead of the running interpreter's standard
            library (e.g. a copy of CPython 3.11's ``Lib/`` to reproduce numbers measured with 3.11 elsewhere).
        name: the ``datasets`` name for ``kind="hf"``.
        config_name, split, streaming: ``datasets.load_dataset`` arguments for ``kind="hf"``.
        text_field: the text column (``hf``) or JSONL key (``files``).
        pattern: file-name pattern for directories in ``kind="files"``.
        subpackages, include_tests: for the stdlib kinds (see :class:`StdlibCorpus`).
        max_documents: keep only the first N documents (any kind).
    """

    kind: str = "stdlib"
    paths: list[str] = field(default_factory=list)
    name: str | None = None
    config_name: str | None = None
    split: str = "train"
    text_field: str = "text"
    pattern: str = "*"
    subpackages: bool = False
    include_tests: bool = False
    streaming: bool = False
    max_documents: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in CORPUS_KINDS:
            raise ValueError(f"corpus.kind={self.kind!r} is not one of {list(CORPUS_KINDS)}")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [str(self.paths)]
        if not isinstance(self.paths, (list, tuple)) or not all(
            isinstance(p, (str, os.PathLike)) for p in self.paths
        ):
            raise ValueError(f"corpus.paths={self.paths!r} must be a list of file or directory paths")
        self.paths = [str(p) for p in self.paths]
        if self.kind == "files" and not self.paths:
            raise ValueError(
                "corpus.paths=[] is empty but corpus.kind='files' needs at least one file or directory"
            )
        if (
            self.kind in ("stdlib", "stdlib+pydoc")
            and self.paths
            and (len(self.paths) > 1 or not Path(self.paths[0]).is_dir())
        ):
            raise ValueError(
                f"corpus.paths={self.paths!r}: corpus.kind={self.kind!r} takes at most one path, an existing "
                "directory holding a standard library's .py files (default: the running interpreter's)"
            )
        if self.kind == "hf" and not self.name:
            raise ValueError(
                f"corpus.name={self.name!r}: corpus.kind='hf' needs a datasets name (e.g. 'wikitext')"
            )
        for opt in ("split", "text_field", "pattern"):
            value = getattr(self, opt)
            if not isinstance(value, str) or not value:
                raise ValueError(f"corpus.{opt}={value!r} must be a non-empty string")
        for opt in ("subpackages", "include_tests", "streaming"):
            value = getattr(self, opt)
            if not isinstance(value, bool):
                raise ValueError(f"corpus.{opt}={value!r} must be a bool")
        if self.max_documents is not None and (
            isinstance(self.max_documents, bool)
            or not isinstance(self.max_documents, int)
            or self.max_documents < 1
        ):
            raise ValueError(
                f"corpus.max_documents={self.max_documents!r} must be a positive integer or None"
            )


def build_corpus(cfg: CorpusConfig) -> DocumentSource:
    """The :class:`DocumentSource` described by ``cfg``."""
    source: DocumentSource
    if cfg.kind in ("stdlib", "stdlib+pydoc"):
        root = cfg.paths[0] if cfg.paths else None
        source = StdlibCorpus(subpackages=cfg.subpackages, include_tests=cfg.include_tests, root=root)
        if cfg.kind == "stdlib+pydoc":
            source = ConcatCorpus([source, PydocTopicsCorpus()])
    elif cfg.kind == "pydoc":
        source = PydocTopicsCorpus()
    elif cfg.kind == "files":
        source = LocalFilesCorpus(cfg.paths, text_field=cfg.text_field, pattern=cfg.pattern)
    elif cfg.kind == "hf":
        assert cfg.name is not None  # validated
        return HFDatasetCorpus(
            cfg.name,
            config_name=cfg.config_name,
            split=cfg.split,
            text_field=cfg.text_field,
            max_documents=cfg.max_documents,
            streaming=cfg.streaming,
            data_files=cfg.paths or None,
        )
    else:  # pragma: no cover - validated in CorpusConfig
        raise ValueError(f"corpus.kind={cfg.kind!r} is not one of {list(CORPUS_KINDS)}")
    if cfg.max_documents is not None:
        source = LimitedCorpus(source, cfg.max_documents)
    return source
