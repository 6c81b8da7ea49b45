"""q/k capture through Transformers' attention interface: exactness, GQA, YaRN, padding, LoRA, scoping."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from posheads.heads import attention_hooks, attention_modules, capture_qk, pair_contributions
from posheads.heads.capture import SUPPORTED_IMPLEMENTATIONS, WRAPPED_PREFIX, to_half_layout

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "yarn": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "rope_theta": 10000.0,
    },
    "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
}


def tiny(attn: str = "sdpa", rope: str = "default", kv_heads: int = 2, layers: int = 2, seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=128,
        rope_parameters=dict(ROPES[rope]),
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def test_wrappers_registered_at_import():
    for base in SUPPORTED_IMPLEMENTATIONS:
        assert WRAPPED_PREFIX + base in AttentionInterface._global_mapping
    for base in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        assert WRAPPED_PREFIX + base in AttentionMaskInterface._global_mapping


@pytest.mark.subprocess
def test_registration_visible_in_fresh_process():
    code = (
        "import posheads.heads\n"
        "from transformers import AttentionInterface\n"
        "assert 'posheads+sdpa' in AttentionInterface._global_mapping\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("rope", ["default", "yarn"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sum_of_pair_contributions_is_the_models_logit(rope: str, kv_heads: int):
    """sum_i g_i = q~ . k~ = the eager pre-softmax logit x sqrt(d): compared through the model's own eager
    attention probabilities (log a = logit - logsumexp), to float precision."""
    model = tiny("eager", rope=rope, kv_heads=kv_heads)
    ids = torch.randint(0, 97, (2, 24))
    with torch.no_grad(), capture_qk(model) as rec:
        out = model(ids, output_attentions=True)
    assert model.config._attn_implementation == "eager"
    for layer, probs in enumerate(out.attentions):  # [B, H, L, L]
        q, k = rec.queries[layer], rec.keys[layer]
        groups = q.shape[1] // k.shape[1]
        k_full = k.repeat_interleave(groups, dim=1)  # query head h reads key head h // groups
        g = pair_contributions(q.unsqueeze(3), k_full.unsqueeze(2))  # [B, H, L, L, d/2]
        assert g.shape[-1] == 8
        dot = torch.einsum("bhmd,bhnd->bhmn", q, k_full)
        torch.testing.assert_close(g.sum(-1), dot, rtol=1e-5, atol=1e-5)
        logits = g.sum(-1) * rec.scalings[layer]
        causal = torch.ones(24, 24, dtype=torch.bool).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        expected = torch.log_softmax(logits, dim=-1)
        observed = torch.log(probs)
        torch.testing.assert_close(observed[..., causal], expected[..., causal], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("rope", ["default", "yarn", "linear"])
def test_captured_qk_equal_an_independent_rotation(rope: str):
    """The captured q~, k~ equal q_proj/k_proj of the layer input rotated with the model's own cos/sin
    (YaRN's attention factor included) -- and are the same under sdpa and eager."""
    model = tiny("sdpa", rope=rope)
    ids = torch.randint(0, 97, (1, 20))
    inputs: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}

    def grab(layer):
        def hook(module, args, kwargs):
            inputs[layer] = (kwargs["hidden_states"], kwargs["position_embeddings"])

        return hook

    modules = attention_modules(model)
    handles = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in modules.items()]
    try:
        with torch.no_grad(), capture_qk(model) as rec:
            model(ids)
    finally:
        for h in handles:
            h.remove()
    for layer, module in modules.items():
        hidden, (cos, sin) = inputs[layer]
        q = module.q_proj(hidden).view(1, 20, -1, 16).transpose(1, 2)
        k = module.k_proj(hidden).view(1, 20, -1, 16).transpose(1, 2)
        q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
        torch.testing.assert_close(rec.queries[layer], q_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(rec.keys[layer], k_ref, rtol=0, atol=1e-6)
    if rope == "yarn":
        assert model.model.rotary_emb.attention_scaling > 1.0  # the factor is inside cos/sin
    model.config._attn_implementation = "eager"
    with torch.no_grad(), capture_qk(model) as rec_eager:
        model(ids)
    for layer in modules:
        torch.testing.assert_close(rec_eager.queries[layer], rec.queries[layer], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hooks_leave_attention_unchanged_and_restore_config(attn: str):
    model = tiny(attn)
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        reference = model(ids).logits
        with capture_qk(model) as rec:
            assert model.config._attn_implementation == WRAPPED_PREFIX + attn
            hooked = model(ids).logits
    assert torch.equal(reference, hooked)
    assert model.config._attn_implementation == attn
    assert set(rec.queries) == {0, 1}


def test_config_restored_on_exception_and_nesting():
    model = tiny("sdpa")

    def boom(module, call):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), attention_hooks(model, boom):
        model(torch.randint(0, 97, (1, 8)))
    assert model.config._attn_implementation == "sdpa"
    seen: list[int] = []
    with (
        capture_qk(model, layers=[1]) as outer,
        attention_hooks(model, lambda m, c: seen.append(c.layer_idx)),
    ):
        assert model.config._attn_implementation == WRAPPED_PREFIX + "sdpa"
        model(torch.randint(0, 97, (1, 8)))
    assert model.config._attn_implementation == "sdpa"
    assert seen == [0, 1] and set(outer.queries) == {1}
    model(torch.randint(0, 97, (1, 8)))  # no hook left behind
    assert seen == [0, 1]


def test_unknown_layer_is_an_error_naming_it():
    model = tiny("sdpa")
    with (
        pytest.raises(ValueError, match=r"layers=\[5\]"),
        attention_hooks(model, lambda m, c: None, layers=[5]),
    ):
        pass


def test_padding_mask_reaches_the_hook():
    """With AttentionMaskInterface registered, a padded batch brings its mask (not None) to the hook."""
    model = tiny("sdpa")
    ids = torch.randint(0, 97, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :4] = 0  # left padding
    with torch.no_grad(), capture_qk(model) as rec:
        out = model(ids, attention_mask=am).logits
    mask = rec.masks[0]
    assert mask is not None and mask.dtype == torch.bool
    assert (
        not bool(mask[1, 0, 6, :4].any())
        and bool(mask[1, 0, 6, 4:7].all())
        and not bool(mask[1, 0, 6, 7:].any())
    )
    with torch.no_grad():
        reference = model(ids, attention_mask=am).logits
    assert torch.equal(out, reference)


def test_capture_through_peft_lora():
    peft = pytest.importorskip("peft")
    model = tiny("sdpa")
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad(), capture_qk(model) as plain:
        model(ids)
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    with torch.no_grad(), capture_qk(lora) as wrapped:
        lora(input_ids=ids)
    assert lora.get_base_model().config._attn_implementation == "sdpa"
    for layer in plain.queries:  # LoRA B starts at zero: identical projections
        torch.testing.assert_close(wrapped.queries[layer], plain.queries[layer])


def test_interleaved_layout_maps_pairs():
    x = torch.arange(8.0).view(1, 8)
    assert to_half_layout(x, "interleaved").tolist() == [[0, 2, 4, 6, 1, 3, 5, 7]]
    q, k = torch.randn(3, 8), torch.randn(3, 8)
    g = pair_contributions(q, k, layout="interleaved")
    torch.testing.assert_close(g[:, 1], q[:, 2] * k[:, 2] + q[:, 3] * k[:, 3])
    with pytest.raises(ValueError, match="layout='bad'"):
        to_half_layout(x, "bad")


def test_allowed_rows_from_4d_2d_and_implicit_masks():
    """The statistics read causal + padding masks as sdpa/eager (4D, bool or additive) or flash (2D) build them."""
    from posheads.heads import AttentionCall

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    pad = torch.ones(2, 6, dtype=torch.long)
    pad[1, :2] = 0
    full = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    full[1, :, :, :2] = False
    additive = torch.zeros(2, 1, 6, 6).masked_fill(~full, torch.finfo(torch.float32).min)
    batch, pos = torch.tensor([0, 1, 1]), torch.tensor([3, 1, 5])
    expected = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    for mask in (pad, full, additive):
        call = AttentionCall(0, q, k, mask, 0.3)
        assert torch.equal(call.allowed_rows(batch, pos), expected)
        assert call.query_valid().tolist() == [[True] * 6, [False, False] + [True] * 4]
    implicit = AttentionCall(0, q, k, None, 0.3)
    assert torch.equal(implicit.allowed_rows(batch, pos), torch.arange(6)[None] <= pos[:, None])
