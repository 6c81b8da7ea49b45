"""The chunked training loss (posheads.lit.loss): same value and gradients as Hugging Face's own loss, without
the full [tokens, vocab] logits, and on by default in the LightningModule for long batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posheads.lit.loss import (
    IGNORE_INDEX,
    ChunkedLinearCrossEntropy,
    chunked_causal_lm_loss,
    chunked_loss_supported,
    shifted_targets,
)
from posheads.lit.module import LengthExtensionModule
from posheads.models import LoraSettings, ModelConfig, TinySpec, load_model
from posheads.profiling import peak_cpu_memory

SPEC = TinySpec(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64)


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 37), generator=g)  # [2, 37]
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX  # ignored positions inside a row
    labels[1, -4:] = IGNORE_INDEX  # right padding
    return ids, labels


def _loss_and_grads(model, fn) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_same(ref, got, rtol=1e-5, atol=1e-6):
    (loss_ref, g_ref), (loss_got, g_got) = ref, got
    assert loss_got == pytest.approx(loss_ref, rel=1e-6)
    assert g_ref.keys() == g_got.keys() and g_ref
    for name, g in g_ref.items():
        torch.testing.assert_close(g_got[name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("chunk", [1, 10, 37, 1000])
def test_chunked_loss_equals_hf_loss_and_gradients(chunk):
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SPEC)).train()
    assert chunked_loss_supported(model)
    ids, labels = _batch(model.config.vocab_size)
    ref = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, use_cache=False).loss)
    got = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, ids, labels, chunk))
    _assert_same(ref, got)
    assert "lm_head.weight" in got[1] and "model.embed_tokens.weight" in got[1]


def test_chunked_loss_with_tied_embeddings_sums_both_uses():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).train()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = _batch(300, seed=1)
    ref = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, use_cache=False).loss)
    got = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, ids, labels, 16))
    _assert_same(ref, got)


def test_chunked_loss_with_lora_trains_the_same_adapters():
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SPEC, lora=lora)).train()
    for name, p in model.named_parameters():  # LoRA B starts at 0: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert chunked_loss_supported(model)
    ids, labels = _batch(model.get_base_model().config.vocab_size, seed=2)
    ref = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, use_cache=False).loss)
    got = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, ids, labels, 8))
    _assert_same(ref, got)
    assert all("lora_" in n for n in got[1])  # the frozen lm_head gets no gradient
    assert any("lora_A" in n for n in got[1])


def test_chunked_loss_under_bf16_autocast_matches_hf_loss():
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SPEC)).train()
    ids, labels = _batch(model.config.vocab_size, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels, use_cache=False).loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _loss_and_grads(model, lambda: chunked_causal_lm_loss(model, ids, labels, 9))
    assert got[0] == pytest.approx(ref[0], rel=1e-3)
    for name, g in ref[1].items():  # bf16 matmuls: a few bf16 ulps of the gradient scale
        torch.testing.assert_close(got[1][name], g, rtol=0.05, atol=0.02 * float(g.abs().max()), msg=name)


def test_chunked_loss_without_grad_is_the_plain_value():
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SPEC)).eval()
    ids, labels = _batch(model.config.vocab_size, seed=4)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels, use_cache=False).loss
        got = chunked_causal_lm_loss(model, ids, labels, 5)
    assert not got.requires_grad
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_shifted_targets_and_bad_chunk_size():
    labels = torch.tensor([[1, 2, 3], [4, IGNORE_INDEX, 6]])
    assert shifted_targets(labels).tolist() == [[2, 3, IGNORE_INDEX], [IGNORE_INDEX, 6, IGNORE_INDEX]]
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SPEC))
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_causal_lm_loss(model, labels, labels, 0)


def test_chunked_cross_entropy_never_holds_full_logits():
    """Peak memory of loss + backward: the plain F.cross_entropy path holds [N, V] float32 logits, their
    log-softmax and gradient; the chunked one a few [chunk, V] blocks plus dL/dh and dL/dW."""
    torch.manual_seed(0)
    n, d, v, chunk = 2048, 16, 4096, 128
    hidden = torch.randn(n, d, requires_grad=True)
    weight = torch.randn(v, d, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    full = n * v * 4  # bytes of the float32 logits

    def plain():
        F.cross_entropy(hidden @ weight.t(), targets).backward()

    def chunked():
        ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk, torch.float32).backward()

    peak_plain = peak_cpu_memory(plain)
    g_plain = (hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    peak_chunked = peak_cpu_memory(chunked)
    assert peak_plain >= 2 * full
    assert peak_chunked < full / 4
    torch.testing.assert_close(hidden.grad, g_plain[0], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(weight.grad, g_plain[1], rtol=1e-5, atol=1e-8)


def test_module_uses_chunked_loss_from_the_threshold_with_equal_gradients():
    module = LengthExtensionModule(64, lm=ModelConfig(name_or_path="tiny", tiny=SPEC), chunked_loss_from=64)
    ids = torch.randint(0, module.model.config.vocab_size, (2, 40))
    assert module.uses_chunked_loss(ids)  # 80 tokens >= 64
    assert not module.uses_chunked_loss(ids[:1])  # 40 tokens
    plain = LengthExtensionModule(64, lm=ModelConfig(name_or_path="tiny", tiny=SPEC), loss_chunk_size=None)
    plain.model.load_state_dict(module.model.state_dict())
    assert not plain.uses_chunked_loss(ids)
    ref = _loss_and_grads(plain.model, lambda: plain.training_loss(ids, ids))
    got = _loss_and_grads(module.model, lambda: module.training_loss(ids, ids))
    _assert_same(ref, got)
    assert (
        LengthExtensionModule(64).chunked_loss_from == 4096
        and LengthExtensionModule(64).loss_chunk_size == 1024
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"loss_chunk_size": 0}, "model.loss_chunk_size=0"),
        ({"loss_chunk_size": True}, "model.loss_chunk_size=True"),
        ({"chunked_loss_from": -1}, "model.chunked_loss_from=-1"),
        ({"chunked_loss_from": 1.5}, "model.chunked_loss_from=1.5"),
    ],
)
def test_module_validates_loss_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        LengthExtensionModule(64, lm=ModelConfig(name_or_path="tiny"), **kwargs)
