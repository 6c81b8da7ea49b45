"""Identification end to end: a planted Positional Head is found, outputs are written, options validated."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import HeadsConfig, identify_positional_heads, jaccard
from posheads.heads.__main__ import main as cli_main

PLANTED = (1, 1)
HEAD_DIM = 16
PAIRS = HEAD_DIM // 2
# pair -> amplitude |q_i| |k_i| of the planted head (all other pairs 0). With theta_i = 1e4^(-i/8):
# pair 3 (theta 0.032) wins at short distance, pair 5 (theta 0.0032) from ~15 tokens, pair 7 (theta 3e-4)
# from ~150 tokens: the head reads ever lower-frequency pairs as distance grows.
AMPLITUDES = {3: 1.0, 5: 0.9, 7: 0.8}


def planted_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny GQA Llama whose head (1, 1) has content-independent q and k (through the projection biases)
    built so that its dominant RoPE pair moves to low frequencies as distance grows; the other heads are
    random."""
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_bias=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    layer, head = PLANTED
    attn = model.model.layers[layer].self_attn
    kv = head // (cfg.num_attention_heads // cfg.num_key_value_heads)
    vec = torch.zeros(HEAD_DIM)
    for i, amp in AMPLITUDES.items():
        vec[i] = math.sqrt(amp)  # rotate-half: pair i = components (i, i + d/2); phase 0
    scale = 2.0  # logits up to (sum A) * scale^2 / sqrt(d): attention reaches far but still prefers near keys
    with torch.no_grad():
        for proj, idx in ((attn.q_proj, head), (attn.k_proj, kv)):
            rows = slice(idx * HEAD_DIM, (idx + 1) * HEAD_DIM)
            proj.weight[rows] = 0.0
            proj.bias.zero_()
            proj.bias[rows] = vec * scale
    return model


@pytest.fixture(scope="module")
def planted_analysis():
    model = planted_model()
    gen = torch.Generator().manual_seed(0)
    sequences = torch.randint(0, 97, (3, 256), generator=gen)
    cfg = HeadsConfig(rows_per_sequence=48, keys_per_bin=None, critical="critical", batch_size=2, seed=1)
    return identify_positional_heads(model, sequences, cfg, progress=False)


def test_planted_head_is_found_and_null_is_near_zero(planted_analysis):
    a = planted_analysis
    layer, head = PLANTED
    assert a.positional[layer, head], a.table()
    assert a.i_c == 4  # 2 pi 1e4^(2i/16) > 256 first at i = 4
    order = torch.argsort(torch.nan_to_num(a.excess, nan=-9).flatten(), descending=True)
    assert int(order[0]) == layer * 4 + head  # the top head
    assert float(a.scores[layer, head]) > 0.5
    assert abs(float(a.null[layer, head])) < 0.05
    assert float(a.z[layer, head]) > 2.0
    # HDA of the planted head: nothing below 8 tokens, everything from 16 to 127 tokens (pair 3 realigns
    # near its period, 2 pi / 0.0316 = 199 tokens, so the last bin is mixed but still >= tau)
    curve = a.hda[layer, head]
    assert bool((curve[:4] < 0.05).all()) and bool((curve[5:8] > 0.95).all()) and float(curve[8]) > 0.5
    assert int(a.hda_extension_bin[layer, head]) == a.stats.num_bins - 1
    assert a.per_layer_counts() == [0, 1]  # top 10 % of 8 heads = 1 head
    assert a.positional_heads() == [PLANTED]


def test_rank_by_score_or_excess(planted_analysis):
    """Selection, rank and z follow ``rank_by``: the score (default) or ``score - null``."""
    import dataclasses

    from posheads.heads.identify import analyze

    a = planted_analysis
    assert a.config.rank_by == "score" and torch.equal(a.ranking, a.scores)
    cfg = dataclasses.replace(a.config, rank_by="excess", top_fraction=0.5)
    b = analyze(a.stats, cfg, a.i_c)
    assert torch.equal(b.ranking, b.excess) and torch.equal(b.scores, a.scores)
    for analysis in (b, analyze(a.stats, dataclasses.replace(cfg, rank_by="score"), a.i_c)):
        value = torch.nan_to_num(analysis.ranking, nan=-9).flatten()
        top = set(torch.argsort(value, descending=True)[:4].tolist())
        assert {layer * 4 + h for layer, h in analysis.positional_heads()} == top
        ranks = {(r["layer"], r["head"]): r["rank"] for r in analysis.table()}
        assert [ranks[divmod(int(i), 4)] for i in torch.argsort(value, descending=True)] == list(range(1, 9))
        assert int(torch.nan_to_num(analysis.z, nan=-9).flatten().argmax()) == int(value.argmax())


def test_sampled_keys_agree_with_exact(planted_analysis):
    model = planted_model()
    sequences = torch.randint(0, 97, (3, 256), generator=torch.Generator().manual_seed(0))
    cfg = HeadsConfig(rows_per_sequence=48, keys_per_bin=8, batch_size=3, seed=1)
    sampled = identify_positional_heads(model, sequences, cfg, progress=False)
    layer, head = PLANTED
    assert sampled.positional_heads() == planted_analysis.positional_heads()
    assert jaccard(sampled.positional, planted_analysis.positional) == 1.0
    assert float(sampled.scores[layer, head]) == pytest.approx(
        float(planted_analysis.scores[layer, head]), abs=0.05
    )


def test_table_summary_and_files(planted_analysis, tmp_path):
    a = planted_analysis
    rows = a.table()
    assert len(rows) == 8 and {
        "layer",
        "head",
        "score",
        "null",
        "z",
        "positional",
        "hda_extension_bin",
        "hda_area",
    } <= set(rows[0])
    assert sum(r["positional"] for r in rows) == 1 and min(r["rank"] for r in rows) == 1
    paths = a.save(tmp_path)
    for key in ("csv", "json", "stats", "heatmap", "hda", "profile"):
        assert paths[key].is_file() and paths[key].stat().st_size > 0
    payload = json.loads(paths["json"].read_text())
    assert payload["positional_heads"] == [list(PLANTED)]
    assert payload["per_layer_counts"] == [0, 1]
    assert payload["hda_positional"]["extension_bin"] == a.stats.num_bins - 1
    assert paths["heatmap"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths["csv"].read_text().splitlines()[0].startswith("layer,head,score,null")


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="heads.score='cosine'"):
        HeadsConfig(score="cosine")
    with pytest.raises(ValueError, match="heads.rows_per_sequence=0"):
        HeadsConfig(rows_per_sequence=0)
    with pytest.raises(ValueError, match="heads.keys_per_bin=1"):
        HeadsConfig(keys_per_bin=1)
    with pytest.raises(ValueError, match="heads.top_fraction=1.5"):
        HeadsConfig(top_fraction=1.5)
    with pytest.raises(ValueError, match="heads.critical='middle'"):
        HeadsConfig(critical="middle")
    with pytest.raises(ValueError, match="heads.tau=2"):
        HeadsConfig(tau=2)
    with pytest.raises(ValueError, match="selection rule"):
        HeadsConfig(top_fraction=None, z_threshold=None)
    assert HeadsConfig(critical="12").critical == 12
    cfg = HeadsConfig(profile_head=(5, 0))
    with pytest.raises(ValueError, match=r"heads.profile_head=\(5, 0\): layer 5 out of range 0..1"):
        identify_positional_heads(planted_model(), torch.zeros(1, 8, dtype=torch.long), cfg, progress=False)
    cfg = HeadsConfig(profile_head=(0, 7))
    with pytest.raises(ValueError, match="head 7 out of range 0..3"):
        cfg.validate_for(2, 4, 16)


def test_cli_on_the_tiny_model(tmp_path, capsys):
    cli_main(
        [
            "--model",
            "tiny",
            "--length",
            "128",
            "--documents",
            "2",
            "--rows",
            "8",
            "--out",
            str(tmp_path),
            "--no-plots",
        ]
    )
    printed = capsys.readouterr().out
    assert '"positional_heads"' in printed
    assert (tmp_path / "heads.csv").is_file() and (tmp_path / "analysis.json").is_file()


@pytest.mark.slow
def test_smollm2_identification(tmp_path):
    """SmolLM2-135M on stdlib documents: a sane score distribution and a 10 % head set."""
    from posheads.heads.__main__ import load_sequences
    from posheads.models import ModelConfig, load_model, load_tokenizer

    model_cfg = ModelConfig()
    model = load_model(model_cfg)
    sequences, _ = load_sequences(load_tokenizer(model_cfg), "stdlib", 1024, 2)
    a = identify_positional_heads(model, sequences, HeadsConfig(rows_per_sequence=32), progress=False)
    assert a.i_c == 20 and a.scores.shape == (30, 9)
    assert len(a.positional_heads()) == 27
    assert torch.isfinite(a.scores).all() and torch.isfinite(a.null).all()
    # two sequences only: each head's null is noisy (attention sinks make few keys carry most weight), but it
    # is centred on 0 and far below the scores
    assert abs(float(a.null.mean())) < 0.05 and float(a.null.abs().mean()) < 0.5 * float(
        a.scores.abs().mean()
    )
