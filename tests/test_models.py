"""Model loading: tiny models, the byte tokenizer, offline errors, LoRA, the real SmolLM2 (slow)."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest
import torch

from posheads.models import (
    LoraSettings,
    ModelConfig,
    ModelLoadError,
    decoder_layers,
    load_model,
    load_tokenizer,
    tiny_llama,
    tiny_tokenizer,
)


def test_tiny_tokenizer_is_lossless_bytes():
    tok = tiny_tokenizer()
    text = "def f(x):\n\treturn x  # héllo → wörld"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_tiny_llama_is_seeded_and_shaped():
    a, b = tiny_llama(), tiny_llama()
    c = tiny_llama(seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    cfg = a.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert len(decoder_layers(a)) == 2
    logits = a(torch.randint(0, 256, (2, 10))).logits
    assert logits.shape == (2, 10, 259)


def test_load_model_tiny_with_options():
    cfg = ModelConfig(name_or_path="tiny", dtype="bfloat16", attn_implementation="eager")
    model = load_model(cfg)
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert load_tokenizer(cfg).bos_token_id == 256


def test_lora_only_adapters_train():
    model = load_model(
        ModelConfig(name_or_path="tiny", lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("q_proj" in n for n in trainable) and not any("k_proj" in n for n in trainable)


def test_gradient_checkpointing_with_lora_backprops():
    cfg = ModelConfig(name_or_path="tiny", gradient_checkpointing=True, lora=LoraSettings(r=2))
    model = load_model(cfg).train()
    ids = torch.randint(0, 256, (1, 12))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"dtype": "float64"}, "model.dtype='float64'"),
        ({"attn_implementation": "magic"}, "model.attn_implementation='magic'"),
        ({"lora": {"r": 0}}, "model.lora.r=0"),
        ({"tiny": {"num_heads": 3, "num_kv_heads": 2}}, "model.tiny.num_heads=3"),
        ({"name_or_path": ""}, "model.name_or_path"),
    ],
)
def test_config_validation_names_option(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        ModelConfig(**kwargs)


def test_lora_unknown_target_is_named():
    with pytest.raises(ValueError, match="w_nope"):
        load_model(ModelConfig(name_or_path="tiny", lora=LoraSettings(target_modules=["w_nope"])))


def test_offline_hub_id_error_names_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="some-org/does-not-exist-7b.*--local-dir"):
        load_model(ModelConfig(name_or_path="some-org/does-not-exist-7b"))
    with pytest.raises(ModelLoadError, match="model.name_or_path='some-org/does-not-exist-7b'"):
        load_tokenizer(ModelConfig(name_or_path="some-org/does-not-exist-7b"))


def test_missing_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "nothing.gguf")))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_model(ModelConfig(name_or_path=str(tmp_path / "no_such_dir")))
    with pytest.raises(FileNotFoundError, match="model.gguf_file='x.gguf'"):
        load_model(ModelConfig(name_or_path=str(tmp_path), gguf_file="x.gguf"))


def test_local_directory_roundtrip(tmp_path):
    model, tok = tiny_llama(num_layers=1), tiny_tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path))
    loaded, tok2 = load_model(cfg), load_tokenizer(cfg)
    ids = torch.tensor([tok2("hello")["input_ids"]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits)


@pytest.mark.slow
def test_smollm2_offline_perplexity(smollm2):
    """The offline SmolLM2-135M has sane perplexity (< 30) on 1k tokens of standard-library code."""
    model, tok = smollm2
    assert (
        model.config.num_hidden_layers,
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
    ) == (30, 9, 3)
    assert model.config.rope_parameters["rope_theta"] == pytest.approx(1e5)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:1024]])
    assert ids.shape[1] == 1024
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert math.exp(loss) < 30, f"SmolLM2 perplexity {math.exp(loss):.1f} on argparse.py"
