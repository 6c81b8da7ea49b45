"""Study 2b: training-free measurement (``posheads.eval.study2``) and the method comparison
(``posheads.lit.compare_methods``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posheads.data import TokenizedDocument
from posheads.eval.study2 import (
    Point,
    Study2Config,
    _enc,
    assemble_window,
    bucket_sums,
    load_config,
    longrope_factors,
    main,
    measure_window,
    score_keys,
    window_documents,
)
from posheads.heads import HeadsConfig, identify_positional_heads
from posheads.heads.identify import analyze, collector_for_config
from posheads.lit import compare_methods as cm
from posheads.models.loading import tiny_llama, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
STUDY2 = ROOT / "configs" / "study2"
MEASURE_CONFIGS = sorted(p for p in STUDY2.glob("*.yaml") if not p.name.startswith("finetune"))


# --------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MEASURE_CONFIGS, ids=lambda p: p.name)
def test_shipped_measurement_configs_load(path):
    cfg = load_config(path)
    assert cfg.points and cfg.windows.length >= max(cfg.passkey.lengths)
    for name in cfg.identify.variants:
        assert isinstance(cfg.identify.variant_config(name), HeadsConfig)


def test_smollm2_config_is_the_study():
    cfg = load_config(STUDY2 / "smollm2_training_free_cpu.yaml")
    scaled = {(p.method, p.factor) for p in cfg.points if p.method != "none"}
    assert len(scaled) >= 8 and {m for m, _ in scaled} >= {"linear", "ntk", "yarn", "llama3", "longrope"}
    assert {f for _, f in scaled} == {2.0, 4.0} and cfg.windows.buckets == [0, 8192, 12288, 16384]
    assert cfg.passkey.lengths == [8192, 12288, 16384]


@pytest.mark.parametrize(
    "over, message",
    [
        ({"points": [{"method": "rotary", "factor": 2}]}, "points: method='rotary'"),
        ({"points": [{"method": "yarn", "factor": 1}]}, "yarn factor=1.0 must be > 1"),
        ({"points": [{"method": "none", "factor": 2}]}, "method='none' takes no factor"),
        ({"points": [{"method": "yarn", "factor": 2}, {"method": "yarn", "factor": 2.0}]}, "duplicates"),
        ({"windows": {"buckets": [0, 512, 256]}}, "windows.buckets"),
        ({"passkey": {"lengths": [4096]}, "windows": {"buckets": [0, 1024]}}, "go beyond the window length"),
        ({"hda_rows": 0}, "hda_rows=0"),
        ({"longrope_rule": "search"}, "longrope_rule='search'"),
        ({"identify": {"variants": {"x": {"score": "nope"}}}}, "heads.score='nope'"),
    ],
)
def test_bad_options_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        Study2Config(**over)


def test_longrope_critical_split_rule():
    short, long = longrope_factors("critical_split", 8, 5, 4.0)
    assert short == [1.0] * 8 and long == [1.0] * 5 + [4.0] * 3
    with pytest.raises(ValueError, match="i_c=9"):
        longrope_factors("critical_split", 8, 9, 2.0)


# --------------------------------------------------------------------------------------------------------
# windows and passkey
# --------------------------------------------------------------------------------------------------------


def _docs(tok, n=12, size=180):
    text = "def f(x):\n    return x + {i}  # some code line\n"
    out = []
    for i in range(n):
        body = "".join(text.format(i=i * 100 + j) for j in range(size // 40 + 1))
        ids = [tok.bos_token_id] + _enc(tok, body)[:size]
        out.append(TokenizedDocument(f"doc{i}", torch.tensor(ids)))
    return out


def test_window_layout_keys_questions_and_spans():
    tok = tiny_tokenizer()
    docs = _docs(tok)
    w = assemble_window(tok, 1024, iter(docs), [600, 800, 1024], 1, seed=3, separator=_enc(tok, "\n\n"))
    ids = w["ids"]
    assert ids.shape == (1024,) and int(ids[0]) == tok.bos_token_id
    text = tok.decode(ids.tolist())
    for k in w["keys"]:
        s, n = k["answer_start"], k["answer_len"]
        assert s + n <= k["length"] and (s + n == k["length"] or k is not w["keys"][-1])
        assert tok.decode(ids[s : s + n].tolist()) == " " + k["answer"]
        before = tok.decode(ids[:s].tolist())
        assert before.count(k["answer"]) == 1  # the key sentence only: nothing to copy from
        assert f"The pass key for the {k['label']} door is {k['answer']}" in before
        assert text.count(f"What is the pass key for the {k['label']} door?") == 1
    # the last answer of every length ends exactly there
    for ql in (600, 800, 1024):
        assert max(k["answer_start"] + k["answer_len"] for k in w["keys"] if k["length"] == ql) == ql
    # document spans: the documents' own tokens, in order, never inside an inserted block
    covered = torch.zeros(1024, dtype=torch.bool)
    for _name, s, e in w["spans"]:
        assert not covered[s:e].any()
        covered[s:e] = True
    for s, e in w["inserted"]:
        assert not covered[s:e].any()
    rebuilt: dict[str, list[int]] = {}
    for name, s, e in w["spans"]:
        rebuilt.setdefault(name, []).extend(ids[s:e].tolist())
    by_name = {d.name: d.ids[1:].tolist() for d in docs}
    for name, toks in rebuilt.items():
        assert by_name[name][: len(toks)] == toks  # a prefix of the document (the last one is cut)
    assert len(rebuilt) >= 3


def test_window_without_keys_is_plain_text_and_runs_out_loudly():
    tok = tiny_tokenizer()
    docs = _docs(tok, n=3)
    w = assemble_window(tok, 300, iter(docs), separator=_enc(tok, "\n\n"))
    assert w["keys"] == [] and w["inserted"] == [] and w["spans"][0][1] == 1
    with pytest.raises(ValueError, match="documents ran out"):
        assemble_window(tok, 5000, iter(docs), separator=_enc(tok, "\n\n"))
    with pytest.raises(ValueError, match="query length 50 is too short"):
        assemble_window(tok, 1024, iter(docs), [50, 1024], 1, separator=_enc(tok, "\n\n"))


def test_window_documents_exclude_probes_and_sizes():
    tok = tiny_tokenizer()
    docs = _docs(tok, n=4) + [TokenizedDocument("big", torch.arange(5000))]
    pool = window_documents(docs, min_doc_tokens=10, max_doc_tokens=1000, exclude={"doc1"}, skip=1)
    assert [d.name for d in pool] == ["doc2", "doc3"]


def test_bucket_sums_by_hand():
    nll = torch.arange(1, 12, dtype=torch.float64)  # token_nll[t] = NLL of token t+1, L = 12
    spans = [("a", 1, 5), ("b", 6, 9), ("a", 10, 12)]  # token 5 and 9 are separators / inserted
    out = bucket_sums(nll, spans, [0, 4, 12])
    # bucket 0: predicted tokens 1..3 of "a" -> nll[0..2] = 1+2+3
    assert out[0]["documents"] == ["a"] and out[0]["nll_sums"] == [6.0] and out[0]["tokens"] == [3]
    # bucket 1: "a" token 4 (nll[3]=4) and tokens 10, 11 (nll[9]+nll[10] = 10+11); "b" tokens 6..8 (6+7+8)
    assert out[1]["documents"] == ["a", "b"]
    assert out[1]["nll_sums"] == [25.0, 21.0] and out[1]["tokens"] == [3, 3]


def test_score_keys_exact_match_and_near_miss():
    ids = torch.tensor([0, 5, 6, 7, 1, 2, 3])
    keys = [{"length": 7, "label": "x", "answer": "123", "key_start": 1, "answer_start": 4, "answer_len": 3}]
    nll = torch.full((6,), 0.5, dtype=torch.float64)
    good = torch.tensor([9, 9, 9, 1, 2, 3])  # argmax[t] predicts token t+1
    near = torch.tensor([9, 9, 9, 1, 2, 4])
    assert score_keys(keys, ids, nll, good)[0]["correct"] is True
    row = score_keys(keys, ids, nll, near)[0]
    assert row["correct"] is False and row["logprob"] == pytest.approx(-1.5) and row["distance"] == 3


# --------------------------------------------------------------------------------------------------------
# one forward: NLL and statistics
# --------------------------------------------------------------------------------------------------------


def test_measure_window_matches_the_model_and_the_identification():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    ids = torch.randint(3, 250, (200,))
    cfg = HeadsConfig(rows_per_sequence=12, keys_per_bin=4, top_fraction=0.25, critical="quarter")
    col_a = collector_for_config(model, cfg, 200)
    col_b = collector_for_config(model, cfg, 200)
    res = measure_window(model, ids, [col_a, col_b], rows_seed=0, chunk=64)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1].double()
    ref = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")
    assert torch.allclose(res["token_nll"], ref, atol=1e-5)
    assert torch.equal(res["argmax"], logits.argmax(-1))
    # both collectors saw the same forward; and equal the identification pass on the same rows
    ref_an = identify_positional_heads(model, ids[None], cfg, progress=False)
    for col in (col_a, col_b):
        an = analyze(col.stats, cfg, ref_an.i_c)
        assert torch.allclose(an.hda, ref_an.hda, equal_nan=True)
        assert torch.allclose(an.scores, ref_an.scores, equal_nan=True)


# --------------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------------


def _result(path: Path, method: str, factor: float, ext: float, area: float, nll: float, variants=("v",)):
    hda = {
        v: {
            "extension_bin": {"mean": ext, "lo": ext - 0.5, "hi": ext + 0.5, "n": 5},
            "area": {"mean": area, "lo": area - 0.1, "hi": area + 0.1, "n": 5},
            "bin_edges": [[0, 1], [1, 2], [2, 4]],
            "curve": [0.1, 0.2, 0.3],
        }
        for v in variants
    }
    ppl = [
        {
            "bucket": "0-4",
            "nll": 2.0,
            "lo": 1.9,
            "hi": 2.1,
            "ppl": math.exp(2.0),
            "ppl_lo": 6.7,
            "ppl_hi": 8.2,
            "documents": 3,
        },
        {
            "bucket": "4-8",
            "nll": nll,
            "lo": nll - 0.1,
            "hi": nll + 0.1,
            "ppl": math.exp(nll),
            "ppl_lo": math.exp(nll - 0.1),
            "ppl_hi": math.exp(nll + 0.1),
            "documents": 3,
        },
    ]
    pk = [
        {
            "length": 8,
            "correct": 1,
            "trials": 2,
            "lo": 0.09,
            "hi": 0.9,
            "logprob": {"mean": -3.0, "lo": -4.0, "hi": -2.0, "n": 2},
        }
    ]
    res = {
        "protocol": {"point": path.name, "method": method, "factor": factor},
        "hda": hda,
        "perplexity": ppl,
        "passkey": pk,
        "seconds": {"total": 1.0},
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(res))
    return path


def _grid(tmp_path, within, runs=3):
    """4 methods x ``runs`` runs; the methods are separated (higher HDA <-> lower NLL); inside a method the
    NLL follows ``within(i)`` for the i-th run (HDA increasing with i)."""
    root = tmp_path / "study"
    for m_i, m in enumerate(["a", "b", "c", "d"]):
        for i in range(runs):
            _result(root / f"{m}_{i}", m, 2.0 + i, 10.0 * m_i + i, 10.0 * m_i + i, 5.0 - m_i + within(i))
    _result(root / "none", "none", 1.0, 3.0, 3.0, 9.0)
    return root


def test_separated_methods_with_no_within_association_are_not_significant_within(tmp_path):
    # NLL ranks 2, 4, 1, 3 against HDA ranks 1, 2, 3, 4 inside every method: Spearman exactly 0 within
    root = _grid(tmp_path, lambda i: [0.01, 0.03, 0.0, 0.02][i], runs=4)
    result = cm.compare(cm.collect_runs([root]))
    c = result["correlations"]["training-free"]["v"]["extension_bin"]
    assert c["n"] == 16 and c["n_methods"] == 4  # the baseline is left out
    assert c["pooled_spearman"] < -0.9  # the scatter looks like a strong correlation ...
    assert c["labels"]["statistic"] == pytest.approx(-1.0)  # ... carried by the methods' separation
    assert c["within"]["statistic"] == pytest.approx(0.0, abs=1e-12)
    assert c["within"]["p_value"] > 0.5  # nothing beyond it
    assert all(s["n"] == 4 and s["rho"] == pytest.approx(0.0, abs=1e-12) for s in c["within_method"].values())


def test_a_within_method_association_is_detected(tmp_path):
    root = _grid(tmp_path, lambda i: -0.1 * i)  # within each method: more HDA, lower NLL
    c = cm.compare(cm.collect_runs([root]))["correlations"]["training-free"]["v"]["extension_bin"]
    assert c["within"]["statistic"] == pytest.approx(-1.0) and c["within"]["p_value"] < 0.05
    assert all(s["rho"] == pytest.approx(-1.0) for s in c["within_method"].values())


def test_compare_reads_finetuned_runs_and_writes_outputs(tmp_path, capsys):
    root = _grid(tmp_path, lambda i: 0.0)
    run = tmp_path / "ft_yarn_s1"
    _result(run / "study2" / "as_loaded", "yarn", 2.0, 7.0, 7.0, 3.0)
    (run / "tracking").mkdir()
    (run / "report.json").write_text(
        json.dumps(
            {
                "protocol": {"seed": 1, "finetuning": "lora(r=16, alpha=32)"},
                "rows": [{"key": "after", "results": {"8192": {"ppl": 9.0}, "16384": {"ppl": 11.0}}}],
            }
        )
    )
    (run / "tracking" / "timeline.json").write_text(
        json.dumps(
            {
                "evaluations": [
                    {"step": 0, "tracked_set": {"area": 1.0}},
                    {"step": 50, "tracked_set": {"area": 1.4}},
                ]
            }
        )
    )
    out = tmp_path / "cmp"
    result = cm.main([str(root), str(run), "--out", str(out)])
    ft = next(r for r in result["runs"] if r["setting"] != "training-free")
    assert ft["setting"] == "fine-tuned (lora)" and ft["seed"] == 1 and ft["tracking_area_final"] == 1.4
    assert ft["report_ppl_after"]["16384"] == 11.0 and ft["run"] == "ft_yarn_s1/as_loaded"
    assert set(result["correlations"]) == {"training-free", "fine-tuned (lora)"}
    assert result["correlations"]["fine-tuned (lora)"]["v"]["area"]["n"] == 1
    printed = capsys.readouterr().out
    assert "label-permutation p =" in printed and "| a_0 |" in printed
    assert (out / "compare.png").stat().st_size > 0 and (out / "table.csv").read_text().count(
        "\n"
    ) == 1 + 13 + 1
    with pytest.raises(FileNotFoundError, match="neither a Study 2b results.json"):
        cm.collect_runs([tmp_path / "nothing"])


# --------------------------------------------------------------------------------------------------------
# end to end on the tiny model
# --------------------------------------------------------------------------------------------------------


def test_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "study"
    summaries = main(["--config", str(STUDY2 / "ci_tiny_training_free.yaml"), "--output_dir", str(out)])
    cfg = load_config(STUDY2 / "ci_tiny_training_free.yaml")
    assert set(summaries) == {p.name for p in cfg.points}
    res = json.loads((out / "yarn_x2" / "results.json").read_text())
    proto = res["protocol"]
    assert proto["rope_scaling"]["method"] == "yarn" and proto["factor"] == 2.0
    window_docs = {s[0] for w in proto["windows"] for s in w["spans"]}
    assert window_docs and not window_docs & set(proto["probe_documents"])
    assert [b["bucket"] for b in res["perplexity"]] == ["0-2304", "2304-3456", "3456-4608"]
    assert all(b["documents"] >= 1 and b["ppl_lo"] <= b["ppl"] <= b["ppl_hi"] for b in res["perplexity"])
    assert [p["length"] for p in res["passkey"]] == [2304, 3456, 4608]
    for v in cfg.identify.variants:
        h = res["hda"][v]
        assert h["area"]["n"] == len(h["heads"]) > 0 and len(h["curve"]) == len(h["bin_edges"])
    lr = json.loads((out / "longrope_x2" / "results.json").read_text())["protocol"]["rope_scaling"]
    i_c = 4  # critical: quarter of head_dim 16
    assert lr["long_factor"] == [1.0] * i_c + [2.0] * (8 - i_c)
    # a second run resumes (nothing recomputed) and the comparison reads the output
    again = main(["--config", str(STUDY2 / "ci_tiny_training_free.yaml"), "--output_dir", str(out)])
    assert again["yarn_x2"]["seconds"] == res["seconds"]
    capsys.readouterr()
    result = cm.main([str(out), "--out", str(tmp_path / "cmp")])
    assert len(result["runs"]) == len(cfg.points)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0


def test_point_names():
    assert Point("yarn", 2).name == "yarn_x2" and Point("none").name == "none"
    assert Point("as_loaded").name == "as_loaded"


def test_a_failing_point_does_not_lose_the_others(tmp_path, monkeypatch):
    import posheads.eval.study2 as s2

    real = s2._measure_point

    def flaky(cfg, point, *args, **kwargs):
        if point.name == "ntk_x2":
            raise RuntimeError("boom")
        return real(cfg, point, *args, **kwargs)

    monkeypatch.setattr(s2, "_measure_point", flaky)
    cfg = load_config(STUDY2 / "ci_tiny_training_free.yaml", {"output_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"1 point\(s\) failed: \{'ntk_x2': 'RuntimeError: boom'\}"):
        s2.run_study(cfg, only=["none", "ntk_x2", "yarn_x2"], log=lambda _: None)
    assert (tmp_path / "yarn_x2" / "results.json").is_file() and not (tmp_path / "ntk_x2").exists()
