"""Corpora, tokenising, splitting, packing and windowing (posheads.data)."""

from __future__ import annotations

import json
import random
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from posheads.data import (
    ConcatCorpus,
    CorpusConfig,
    CorpusUnavailableError,
    Document,
    HFDatasetCorpus,
    LocalFilesCorpus,
    PydocTopicsCorpus,
    StdlibCorpus,
    TokenizedDocument,
    Window,
    build_corpus,
    corpus_stats,
    load_token_documents,
    pack_sequences,
    select_min_length,
    split_by_document,
    tokenize_documents,
    tokenizer_fingerprint,
    window_corpus,
    window_document,
    window_tensors,
)
from posheads.data import packing as packing_module
from posheads.models import tiny_tokenizer

BOS, EOS = 256, 257  # tiny_tokenizer: ids 0-255 are bytes


def tdoc(name: str, n: int, offset: int = 0) -> TokenizedDocument:
    return TokenizedDocument(name, torch.arange(offset, offset + n, dtype=torch.long))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def stdlib_tiny(tok):
    """The top-level stdlib modules tokenised byte by byte (~4.7 M tokens, ~3 s)."""
    return tokenize_documents(StdlibCorpus(), tok, progress=False)


# ------------------------------------------------------------------------------------------- corpora


def test_stdlib_corpus_top_level_is_sorted_deterministic_and_real():
    corpus = StdlibCorpus()
    docs = list(corpus.documents())
    again = list(corpus)
    assert [d.name for d in docs] == [d.name for d in again]
    assert [d.text for d in docs] == [d.text for d in again]
    names = [d.name for d in docs]
    assert 150 <= len(docs) <= 200  # 168 on CPython 3.11
    files = [n.removeprefix("stdlib/") for n in names]
    assert all(n.startswith("stdlib/") for n in names)
    assert files == sorted(files) and all("/" not in f and f.endswith(".py") for f in files)
    assert {"argparse.py", "typing.py", "inspect.py"} <= set(files)
    root = Path(sysconfig.get_paths()["stdlib"])
    by_name = dict(zip(files, docs))
    assert by_name["argparse.py"].text == (root / "argparse.py").read_text(encoding="utf-8")
    assert len(set(names)) == len(names)


def test_stdlib_subpackages_follow_packages_and_skip_tests(tmp_path):
    root = tmp_path / "lib"
    for rel, text in {
        "b.py": "b = 1\n",
        "a.py": "a = 1\n",
        "pkg/__init__.py": "",
        "pkg/z.py": "z = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/m.py": "m = 1\n",
        "pkg/test/__init__.py": "",
        "pkg/test/test_m.py": "t = 1\n",
        "pkg/data/notapackage.py": "x = 1\n",  # no __init__.py: not a package
        "test/__init__.py": "",
        "test/test_a.py": "t = 1\n",
        "site-packages/third_party.py": "x = 1\n",
        "pydoc_data/__init__.py": "",
        "pydoc_data/topics.py": "topics = {}\n",
        "alpha/__init__.py": "",
        "alpha/mod.py": "y = 1\n",
    }.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    # PEP 263 coding cookie: the file is latin-1, the text must decode to "é"
    (root / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ns = 'é'\n".encode("latin-1"))

    top = [d.name for d in StdlibCorpus(root=str(root)).documents()]
    assert top == ["stdlib/a.py", "stdlib/b.py", "stdlib/latin.py"]
    sub = [d.name for d in StdlibCorpus(subpackages=True, root=str(root)).documents()]
    assert sub == top + [
        "stdlib/alpha/__init__.py",
        "stdlib/alpha/mod.py",
        "stdlib/pkg/__init__.py",
        "stdlib/pkg/sub/__init__.py",
        "stdlib/pkg/sub/m.py",
        "stdlib/pkg/z.py",
    ]
    with_tests = [
        d.name for d in StdlibCorpus(subpackages=True, include_tests=True, root=str(root)).documents()
    ]
    assert set(with_tests) - set(sub) == {
        "stdlib/pkg/test/__init__.py",
        "stdlib/pkg/test/test_m.py",
        "stdlib/test/__init__.py",
        "stdlib/test/test_a.py",
    }
    latin = next(d for d in StdlibCorpus(root=str(root)).documents() if d.name == "stdlib/latin.py")
    assert "s = 'é'" in latin.text
    with pytest.raises(FileNotFoundError, match="nowhere"):
        StdlibCorpus(root=str(tmp_path / "nowhere"))


def test_real_stdlib_subpackages():
    names = [d.name for d in StdlibCorpus(subpackages=True).documents()]
    assert len(names) > 400 and len(set(names)) == len(names)
    assert "stdlib/email/parser.py" in names and "stdlib/json/decoder.py" in names
    assert not any(
        n.startswith(("stdlib/site-packages/", "stdlib/test/", "stdlib/pydoc_data/")) for n in names
    )
    assert not any("/test/" in n or "/tests/" in n for n in names)
    top = [d.name for d in StdlibCorpus().documents()]
    assert names[: len(top)] == top


def test_pydoc_topics_corpus():
    from pydoc_data.topics import topics

    docs = list(PydocTopicsCorpus().documents())
    assert [d.name for d in docs] == [f"pydoc/{k}" for k in sorted(topics)]
    assert docs[0].text == topics[sorted(topics)[0]]
    assert sum(len(d.text) for d in docs) > 100_000


def test_local_files_txt_jsonl_directory_and_missing(tmp_path):
    (tmp_path / "one.txt").write_text("first document\n", encoding="utf-8")
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"text": "row one", "id": 1}) + "\n\n" + json.dumps({"text": "row two"}) + "\n",
        encoding="utf-8",
    )
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "b.md").write_text("# B\n", encoding="utf-8")
    (tree / "a.py").write_text("x = 1\n", encoding="utf-8")
    (tree / "sub" / "c.txt").write_text("c", encoding="utf-8")
    (tree / "sub" / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    (tree / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    (tree / ".hidden.txt").write_text("hidden", encoding="utf-8")

    files = [str(tmp_path / "one.txt"), str(tmp_path / "rows.jsonl")]
    docs = list(LocalFilesCorpus(files).documents())
    assert [(d.name, d.text) for d in docs] == [
        (files[0], "first document\n"),
        (f"{files[1]}:1", "row one"),
        (f"{files[1]}:3", "row two"),  # line numbers are the file's; the blank line is skipped
    ]

    txt_only = list(LocalFilesCorpus([str(tree)], pattern="*.txt").documents())
    assert [d.name for d in txt_only] == [f"{tree}/sub/c.txt"]
    everything = LocalFilesCorpus([str(tree)], text_field="body")
    docs = list(everything.documents())  # blob.bin skipped (binary), .hidden.txt skipped
    assert [d.name for d in docs] == [
        f"{tree}/a.py",
        f"{tree}/b.md",
        f"{tree}/sub/c.txt",
        f"{tree}/sub/d.jsonl:1",
    ]
    assert [d.text for d in docs] == ["x = 1\n", "# B\n", "c", "x"]
    assert [d.name for d in everything.documents()] == [d.name for d in docs]  # deterministic

    missing = str(tmp_path / "no_such_file.txt")
    with pytest.raises(FileNotFoundError, match="no_such_file.txt"):
        LocalFilesCorpus([str(tmp_path / "one.txt"), missing])
    with pytest.raises(ValueError, match="text_field='text'"):
        list(LocalFilesCorpus([str(tree / "sub" / "d.jsonl")]).documents())
    with pytest.raises(ValueError, match="not UTF-8"):
        list(LocalFilesCorpus([str(tree / "blob.bin")]).documents())

    via_config = build_corpus(CorpusConfig(kind="files", paths=files, max_documents=2))
    assert [d.text for d in via_config.documents()] == ["first document\n", "row one"]


def test_hf_dataset_offline_gives_clear_error(tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    corpus = HFDatasetCorpus("posheads-test/no-such-dataset", split="validation", cache_dir=str(tmp_path))
    with pytest.raises(CorpusUnavailableError) as info:
        list(corpus.documents())
    message = str(info.value)
    assert "posheads-test/no-such-dataset" in message and "split='validation'" in message
    assert "offline" in message and "kind='files'" in message
    via_config = build_corpus(CorpusConfig(kind="hf", name="posheads-test/no-such-dataset"))
    with pytest.raises(CorpusUnavailableError, match="no-such-dataset"):
        list(via_config.documents())


def test_hf_dataset_loads_local_json_through_datasets(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"content": f"text {i}"}) + "\n" for i in range(5)), encoding="utf-8")
    corpus = HFDatasetCorpus(
        "json", data_files=str(data), text_field="content", max_documents=3, cache_dir=str(tmp_path / "c")
    )
    docs = list(corpus.documents())
    assert [d.text for d in docs] == ["text 0", "text 1", "text 2"]
    assert [d.name for d in docs] == ["hf:json/train/0", "hf:json/train/1", "hf:json/train/2"]
    assert [d.name for d in corpus.documents()] == [d.name for d in docs]
    with pytest.raises(ValueError, match="text_field='text'.*content"):
        list(HFDatasetCorpus("json", data_files=str(data), cache_dir=str(tmp_path / "c")).documents())


def test_corpus_config_validation_names_option_and_value():
    with pytest.raises(ValueError, match="corpus.kind='wiki'"):
        CorpusConfig(kind="wiki")
    with pytest.raises(ValueError, match=r"corpus.paths=\[\]"):
        CorpusConfig(kind="files")
    with pytest.raises(ValueError, match="corpus.name=None"):
        CorpusConfig(kind="hf")
    with pytest.raises(ValueError, match="corpus.max_documents=0"):
        CorpusConfig(max_documents=0)
    with pytest.raises(ValueError, match="corpus.subpackages='yes'"):
        CorpusConfig(subpackages="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="corpus.text_field=''"):
        CorpusConfig(text_field="")
    assert CorpusConfig(kind="files", paths="a.txt").paths == ["a.txt"]
    with pytest.raises(ValueError, match=r"corpus.paths=\['/nonexistent/Lib'\]: corpus.kind='stdlib'"):
        CorpusConfig(kind="stdlib", paths=["/nonexistent/Lib"])


def test_stdlib_corpus_from_another_root_gives_the_same_documents(tmp_path):
    """``corpus.paths`` points the stdlib kinds at a copy of a standard library (another Python's, say)."""
    own = build_corpus(CorpusConfig(max_documents=3))
    files = StdlibCorpus().files()[:3]
    for f in files:
        (tmp_path / f.name).write_bytes(f.read_bytes())
    copied = build_corpus(CorpusConfig(paths=[str(tmp_path)]))
    assert isinstance(copied, StdlibCorpus) and copied.root == tmp_path
    assert [(d.name, d.text) for d in copied.documents()] == [(d.name, d.text) for d in own.documents()]
    combined = build_corpus(CorpusConfig(kind="stdlib+pydoc", paths=[str(tmp_path)]))
    first_topic = next(iter(PydocTopicsCorpus().documents())).name
    assert [d.name for d in combined.documents()][:4] == [d.name for d in own.documents()] + [first_topic]


def test_build_corpus_kinds():
    assert isinstance(build_corpus(CorpusConfig()), StdlibCorpus)
    combined = build_corpus(CorpusConfig(kind="stdlib+pydoc"))
    names = [d.name for d in combined.documents()]
    n_std = sum(1 for _ in StdlibCorpus().documents())
    assert all(n.startswith("stdlib/") for n in names[:n_std]) and all(
        n.startswith("pydoc/") for n in names[n_std:]
    )
    limited = build_corpus(CorpusConfig(kind="pydoc", max_documents=4))
    assert [d.name for d in limited.documents()] == [d.name for d in PydocTopicsCorpus().documents()][:4]
    twice = ConcatCorpus([PydocTopicsCorpus(), PydocTopicsCorpus()])
    with pytest.raises(ValueError, match="occurs twice"):
        list(twice.documents())


# ------------------------------------------------------------------------------------------ tokenising


def test_tokenize_documents_byte_tokenizer(tok):
    docs = [Document("a", "héllo"), Document("b", ""), Document("c", "x" * 50)]
    out = tokenize_documents(docs, tok)
    assert [d.name for d in out] == ["a", "b", "c"]
    assert out[0].ids.dtype == torch.long and out[0].ids.tolist() == [BOS, *"héllo".encode()]
    assert out[1].ids.tolist() == [BOS]
    no_bos = tokenize_documents(docs, tok, add_bos=False, batch_size=1)
    assert no_bos[0].ids.tolist() == list("héllo".encode()) and no_bos[1].n_tokens == 0
    capped = tokenize_documents(docs, tok, max_tokens=4)
    assert [d.n_tokens for d in capped] == [4, 1, 4] and capped[2].ids.tolist() == [BOS, 120, 120, 120]
    with pytest.raises(ValueError, match="max_tokens=0"):
        tokenize_documents(docs, tok, max_tokens=0)


def test_stdlib_with_tiny_tokenizer(stdlib_tiny):
    texts = {d.name: d.text for d in StdlibCorpus().documents()}
    assert [d.name for d in stdlib_tiny] == list(texts)
    for d in stdlib_tiny[:20]:
        assert d.ids[0].item() == BOS and d.n_tokens == len(texts[d.name].encode("utf-8")) + 1
        assert bytes(d.ids[1:].tolist()).decode("utf-8") == texts[d.name]
    stats = corpus_stats(stdlib_tiny, thresholds=(8192, 1 << 40))
    assert stats["n_documents"] == len(texts)
    assert stats["n_tokens"] == sum(len(t.encode("utf-8")) + 1 for t in texts.values())
    assert stats["documents_at_least"][1 << 40] == 0
    long = select_min_length(stdlib_tiny, 8192)
    assert len(long) == stats["documents_at_least"][8192] and all(d.n_tokens >= 8192 for d in long)
    # windows over real documents: every window exactly 8192 tokens, scored regions tile each document
    for d in long[:5]:
        wins = window_document(d, 8192, stride=4096)
        assert all(w.length == 8192 for w in wins) and wins[-1].end == d.n_tokens
        assert sum(w.n_scored for w in wins) == d.n_tokens - 1
    packed = pack_sequences(long[:3], 4096, eos_id=EOS)
    stream = torch.cat([long[0].ids, torch.tensor([EOS]), long[1].ids, torch.tensor([EOS]), long[2].ids])
    assert packed.shape == (stream.numel() // 4096, 4096)
    assert torch.equal(packed.reshape(-1), stream[: packed.numel()])


def test_select_min_length():
    docs = [tdoc("a", 5), tdoc("b", 12), tdoc("c", 8)]
    assert [d.name for d in select_min_length(docs, 8)] == ["b", "c"]
    assert [d.name for d in select_min_length(docs, 0)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"min_tokens=13.*'b'.*12 tokens"):
        select_min_length(docs, 13)
    with pytest.raises(ValueError, match="no documents"):
        select_min_length([], 1)


def test_load_token_documents_with_cache(tmp_path, tok, monkeypatch):
    (tmp_path / "docs").mkdir()
    for i, n in enumerate([10, 300, 40, 2000]):
        (tmp_path / "docs" / f"f{i}.txt").write_text("y" * n, encoding="utf-8")
    cfg = CorpusConfig(kind="files", paths=[str(tmp_path / "docs")])
    cache = tmp_path / "cache"
    first = load_token_documents(cfg, tok, cache_dir=str(cache))
    assert [d.n_tokens for d in first] == [11, 301, 41, 2001]
    assert len(list(cache.glob("*.pt"))) == 1

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(packing_module, "tokenize_documents", no_tokenizing)
    again = load_token_documents(cfg, tok, min_tokens=100, cache_dir=str(cache))
    assert [d.name for d in again] == [first[1].name, first[3].name]
    assert all(
        torch.equal(a.ids, b.ids) and a.ids.dtype == torch.long for a, b in zip(again, [first[1], first[3]])
    )
    # changed content -> different key -> tokenised again
    (tmp_path / "docs" / "f0.txt").write_text("z" * 7, encoding="utf-8")
    with pytest.raises(AssertionError, match="cache should have been used"):
        load_token_documents(cfg, tok, cache_dir=str(cache))
    monkeypatch.undo()
    changed = load_token_documents(cfg, tok, cache_dir=str(cache), add_bos=False)
    assert changed[0].ids.tolist() == [ord("z")] * 7
    assert len(list(cache.glob("*.pt"))) == 2
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(tiny_tokenizer())


# ------------------------------------------------------------------------------------------- splitting


def test_split_by_document_deterministic_disjoint_and_order_independent():
    docs = [tdoc(f"doc{i:03d}", 3) for i in range(200)]
    train, val = split_by_document(docs, val_fraction=0.1, seed=0)
    assert len(val) == 20 and len(train) == 180
    tnames, vnames = {d.name for d in train}, {d.name for d in val}
    assert not tnames & vnames and tnames | vnames == {d.name for d in docs}
    assert [d.name for d in train] == [d.name for d in docs if d.name in tnames]  # input order kept
    again = split_by_document(docs, val_fraction=0.1, seed=0)
    assert [d.name for d in again[1]] == [d.name for d in val]
    shuffled = docs[:]
    random.Random(7).shuffle(shuffled)
    _, val_shuffled = split_by_document(shuffled, val_fraction=0.1, seed=0)
    assert {d.name for d in val_shuffled} == vnames
    _, val_other_seed = split_by_document(docs, val_fraction=0.1, seed=1)
    assert {d.name for d in val_other_seed} != vnames
    # Documents (not only tokenised ones) split the same way: only names matter
    _, val_docs = split_by_document([Document(d.name, "") for d in docs], val_fraction=0.1, seed=0)
    assert {d.name for d in val_docs} == vnames


def test_split_by_document_edge_cases():
    three = [tdoc(n, 2) for n in "abc"]
    assert [len(p) for p in split_by_document(three, val_fraction=0.01)] == [2, 1]  # at least one
    assert [len(p) for p in split_by_document(three, val_fraction=0.99)] == [1, 2]  # at least one train
    assert [len(p) for p in split_by_document(three, val_fraction=0.0)] == [3, 0]
    assert [len(p) for p in split_by_document(three, val_fraction=1.0)] == [0, 3]
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        split_by_document(three, val_fraction=1.5)
    with pytest.raises(ValueError, match="'a' occurs more than once"):
        split_by_document([tdoc("a", 1), tdoc("a", 2)])


# --------------------------------------------------------------------------------------------- packing


def test_pack_sequences_shapes_and_content():
    docs = [tdoc("a", 5, 0), tdoc("b", 3, 100), tdoc("c", 6, 200)]
    packed = pack_sequences(docs, seq_len=4, eos_id=-1)
    stream = [0, 1, 2, 3, 4, -1, 100, 101, 102, -1, 200, 201, 202, 203, 204, 205]
    assert packed.dtype == torch.long and packed.shape == (4, 4)
    assert packed.reshape(-1).tolist() == stream
    packed5 = pack_sequences(docs, seq_len=5, eos_id=-1)
    assert packed5.shape == (3, 5) and packed5.reshape(-1).tolist() == stream[:15]
    padded = pack_sequences(docs, seq_len=5, eos_id=-1, drop_last=False, pad_id=-7)
    assert padded.shape == (4, 5) and padded.reshape(-1).tolist() == stream + [-7] * 4
    assert pack_sequences(docs, seq_len=5, eos_id=-1, drop_last=False)[-1].tolist() == [205, -1, -1, -1, -1]
    no_eos = pack_sequences(docs, seq_len=7, eos_id=None)
    assert no_eos.reshape(-1).tolist() == [s for s in stream if s != -1]
    assert pack_sequences([d.ids for d in docs], seq_len=4, eos_id=-1).equal(packed)  # plain tensors too
    with pytest.raises(ValueError, match="seq_len=100"):
        pack_sequences(docs, seq_len=100, eos_id=-1)
    with pytest.raises(ValueError, match="pad_id"):
        pack_sequences(docs, seq_len=5, eos_id=None, drop_last=False)


# ------------------------------------------------------------------------------------------- windowing


def _scored_counts(windows: list[Window]) -> Counter:
    """How often each absolute token index is scored (the region [score_from, end), minus position start)."""
    counts: Counter = Counter()
    for w in windows:
        counts.update(range(max(w.score_from, w.start + 1), w.end))
    return counts


def _region_counts(windows: list[Window]) -> Counter:
    counts: Counter = Counter()
    for w in windows:
        counts.update(range(w.score_from, w.end))
    return counts


@pytest.mark.parametrize("n", [8, 9, 31, 64, 100])
@pytest.mark.parametrize("length", [1, 4, 8])
def test_disjoint_windows_tile_the_document(n, length):
    doc = tdoc("d", n)
    wins = window_document(doc, length)
    n_full = n // length
    assert len(wins) == n_full
    assert all(w.length == length and w.score_from == w.start for w in wins)
    assert [w.start for w in wins] == [k * length for k in range(n_full)]
    assert _region_counts(wins) == Counter(range(n_full * length))  # each token once in a scored region
    assert sum(w.n_scored for w in wins) == n_full * (length - 1)


@pytest.mark.parametrize("n", [8, 9, 31, 64, 100])
@pytest.mark.parametrize(("length", "stride"), [(8, 1), (8, 3), (8, 4), (8, 7), (8, 8), (5, 2), (1, 1)])
def test_strided_windows_score_every_token_exactly_once(n, length, stride):
    doc = tdoc("d", n)
    wins = window_document(doc, length, stride=stride)
    assert all(w.length == length and w.start <= w.score_from < w.end for w in wins)
    assert wins[0].start == 0 and wins[0].score_from == 0 and wins[-1].end == n
    assert _region_counts(wins) == Counter(range(n))
    if stride < length:
        # every token except the document's first is scored exactly once, with >= length - stride context
        assert _scored_counts(wins) == Counter(range(1, n))
        assert all(w.score_from - w.start >= length - stride for w in wins[1:])
    assert sum(w.n_scored for w in wins) == sum(_scored_counts(wins).values())


def test_strided_windows_match_hf_perplexity_guide():
    """Reference loop of the HF guide, with the last window shifted to keep its length."""
    n, length, stride = 50, 16, 6
    wins = window_document(tdoc("d", n), length, stride=stride)
    expected, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        start = end - length
        expected.append((start, end, max(prev_end, start)))
        prev_end = end
        if end == n:
            break
    assert [(w.start, w.end, w.score_from) for w in wins] == expected


def test_window_limits_and_errors():
    doc = tdoc("d", 40)
    assert window_document(tdoc("short", 7), 8) == [] and window_document(tdoc("short", 7), 8, stride=2) == []
    assert len(window_document(doc, 8, max_windows=2)) == 2
    assert window_document(doc, 8, stride=2, max_windows=3) == window_document(doc, 8, stride=2)[:3]
    assert window_document(doc, 40) == [Window("d", 0, 40, 0)]
    with pytest.raises(ValueError, match="stride=9"):
        window_document(doc, 8, stride=9)
    with pytest.raises(ValueError, match="stride=0"):
        window_document(doc, 8, stride=0)
    with pytest.raises(ValueError, match="length=0"):
        window_document(doc, 0)
    docs = [tdoc("a", 20), tdoc("b", 5), tdoc("c", 16)]
    assert [(w.doc, w.start) for w in window_corpus(docs, 8)] == [("a", 0), ("a", 8), ("c", 0), ("c", 8)]
    assert len(window_corpus(docs, 8, max_windows_per_doc=1)) == 2
    assert len(window_corpus(docs, 8, max_windows=3)) == 3


def test_window_tensors_labels():
    doc = tdoc("d", 20, offset=10)
    w = window_document(doc, 8, stride=3)[1]  # start 3, end 11, score_from 8
    assert (w.start, w.end, w.score_from) == (3, 11, 8)
    input_ids, labels = window_tensors(doc, w)
    assert input_ids.tolist() == list(range(13, 21))
    assert labels.tolist() == [-100] * 5 + [18, 19, 20]
    with pytest.raises(ValueError, match="does not belong"):
        window_tensors(tdoc("other", 20), w)


# ------------------------------------------------------------------------------------ SmolLM2 (slow)


@pytest.fixture(scope="module")
def smol_tok():
    from posheads.models import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def stdlib_smol(smol_tok, tmp_path_factory):
    return load_token_documents(CorpusConfig(), smol_tok, cache_dir=str(tmp_path_factory.mktemp("tokcache")))


@pytest.mark.slow
def test_stdlib_corpus_with_smollm2_matches_design(stdlib_smol, smol_tok):
    """The stdlib corpus: 168 top-level modules, ~1.2 M tokens, 48 files >= 8k tokens, 20 >= 16k (CPython 3.11)."""
    stats = corpus_stats(stdlib_smol, thresholds=(8192, 16384))
    assert 150 <= stats["n_documents"] <= 200
    assert 1_000_000 <= stats["n_tokens"] <= 1_500_000
    assert 35 <= stats["documents_at_least"][8192] <= 65
    assert 12 <= stats["documents_at_least"][16384] <= 30
    bos = smol_tok.bos_token_id
    assert bos is not None and all(d.ids[0].item() == bos for d in stdlib_smol)
    small = min(stdlib_smol, key=lambda d: d.n_tokens if d.n_tokens > 50 else 1 << 30)
    text = next(doc.text for doc in StdlibCorpus().documents() if doc.name == small.name)
    assert smol_tok.decode(small.ids[1:].tolist()) == text
    # 8k-token windows of the long documents, split by document
    long = select_min_length(stdlib_smol, 8192)
    train, val = split_by_document(long, val_fraction=0.1, seed=0)
    assert len(val) == round(0.1 * len(long)) and not {d.name for d in train} & {d.name for d in val}
    wins = window_corpus(val, 8192, stride=4096)
    assert len(wins) >= len(val) and all(w.length == 8192 for w in wins)


@pytest.mark.slow
def test_pydoc_and_cache_with_smollm2(stdlib_smol, smol_tok, tmp_path):
    pydoc = load_token_documents(CorpusConfig(kind="pydoc"), smol_tok)
    assert 80_000 <= corpus_stats(pydoc)["n_tokens"] <= 150_000
    cache = tmp_path / "c"
    load_token_documents(CorpusConfig(), smol_tok, cache_dir=str(cache))
    cached = load_token_documents(CorpusConfig(), smol_tok, min_tokens=16384, cache_dir=str(cache))
    assert [d.name for d in cached] == [d.name for d in stdlib_smol if d.n_tokens >= 16384]
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(cached, select_min_length(stdlib_smol, 16384)))
    with pytest.raises(ValueError, match=r"min_tokens=10000000.*longest"):
        select_min_length(stdlib_smol, 10_000_000)
