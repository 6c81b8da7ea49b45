"""Every Hugging Face RoPE family posheads claims: correct under every check, or refused up front.

Tiny random models (2 layers, hidden 64, 4 heads) are built in-process from the Transformers config classes.
Per family: the RoPE description matches a hand-written truth read off the modeling files and passes the
position-shift check, while a wrong layout / rotary width fails it; ``sum_i g_i + content = q . k``; the
statistics pass's attention probabilities equal the model's own eager attention weights (scaling, soft-cap,
sliding windows); head ablation equals zeroing the output projection's input columns; dimension ablation
zeroes exactly the declared components of the removed pairs; an empty ablation is bit-identical; RoPE scaling
matches its closed form (or is refused with the reason); one training step; one tracker evaluation (probe
pass + analysis). The README table "Supported architectures" summarises this file.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from posheads.callbacks import ProbeSet
from posheads.callbacks.probe import run_probe_pass
from posheads.heads import HeadsConfig, ablate, ablate_dimensions, ablate_heads, attention_hooks, capture_qk
from posheads.heads.capture import content_contribution, output_projection, pair_contributions
from posheads.heads.hda import critical_pair_for
from posheads.heads.identify import analyze
from posheads.heads.stats import RowPlan, collector_for_model, num_bins_for
from posheads.lit.module import check_eager_training
from posheads.rope import (
    SCALING_METHODS,
    RopeScaling,
    apply_rope_scaling,
    apply_rope_scaling_to_model,
    model_inverse_frequencies,
    rope_base,
)
from posheads.rope.layout import describe_rope, model_rope, verify_rope

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,  # large enough logits that soft-capping and attention patterns matter
)
_MLA = dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12)
_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1)

# family -> (config overrides, truth: (layout, rotary_dim, offset, head_dim), thetas by layer type or None)
FAMILIES: dict[str, tuple[dict, tuple[str, int, int, int]]] = {
    "llama": ({"head_dim": 16}, ("half", 16, 0, 16)),
    "mistral": ({}, ("half", 16, 0, 16)),
    "qwen2": ({}, ("half", 16, 0, 16)),
    "qwen3": ({"head_dim": 16}, ("half", 16, 0, 16)),
    "olmo2": ({}, ("half", 16, 0, 16)),
    "granite": ({"attention_multiplier": 0.3}, ("half", 16, 0, 16)),
    "phi3": ({"partial_rotary_factor": 0.5}, ("half", 8, 0, 16)),
    "stablelm": ({"partial_rotary_factor": 0.25}, ("half", 4, 0, 16)),
    "glm": ({"head_dim": 16, "partial_rotary_factor": 0.5}, ("interleaved", 8, 0, 16)),
    "gpt_neox": ({"rotary_pct": 0.25}, ("half", 4, 0, 16)),
    "persimmon": ({"partial_rotary_factor": 0.5}, ("half", 8, 0, 16)),
    "gptj": (
        {"rotary_dim": 8, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
        ("interleaved", 8, 0, 16),
    ),
    "cohere": ({}, ("interleaved", 16, 0, 16)),
    "gemma2": (
        {"head_dim": 16, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0, "sliding_window": 6},
        ("half", 16, 0, 16),
    ),
    "gemma3_text": (
        {"head_dim": 16, "sliding_window": 6, "layer_types": ["sliding_attention", "full_attention"]},
        ("half", 16, 0, 16),
    ),
    "deepseek_v2": (
        {**_MLA, **_MOE, "num_key_value_heads": 4, "n_shared_experts": 1},
        ("interleaved", 8, 8, 16),
    ),
    "deepseek_v3": (
        {**_MLA, **_MOE, "num_key_value_heads": 4, "n_shared_experts": 1, "n_group": 1, "topk_group": 1},
        ("half", 8, 8, 16),
    ),
    "minicpm3": ({**_MLA, "num_key_value_heads": 4}, ("half", 8, 8, 16)),
    "phi": ({"partial_rotary_factor": 0.5}, ("half", 8, 0, 16)),
    "nemotron": ({"partial_rotary_factor": 0.5, "head_dim": 16}, ("half", 8, 0, 16)),
    "starcoder2": ({}, ("half", 16, 0, 16)),
    "mixtral": ({"num_local_experts": 2, "num_experts_per_tok": 1}, ("half", 16, 0, 16)),
    "gemma": ({"head_dim": 16}, ("half", 16, 0, 16)),
    "olmo": ({}, ("half", 16, 0, 16)),
    "helium": ({"head_dim": 16}, ("interleaved", 16, 0, 16)),
    "glm4": ({"head_dim": 16, "partial_rotary_factor": 0.5}, ("interleaved", 8, 0, 16)),
}

# family -> (config overrides, the feature the refusal must name)
REFUSED: dict[str, tuple[dict, str]] = {
    "falcon": ({}, "attention interface"),
    "gpt_oss": ({"head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1}, "attention sinks"),
    "llama4_text": ({}, "layers without RoPE"),
    "cohere2": (
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6},
        "layers without RoPE",
    ),
    "smollm3": ({"no_rope_layers": [1, 0]}, "layers without RoPE"),
    # found by the position-shift check, not by a table: its full-attention layers do not rotate
    "exaone4": (
        {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 6},
        "applies no RoPE",
    ),
}

NAMES = sorted(FAMILIES)
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def build(
    name: str, attn: str = "eager", fresh: bool = False, overrides: dict | None = None
) -> torch.nn.Module:
    key = (name, attn)
    if key in _MODELS and not fresh and overrides is None:
        return _MODELS[key]
    extra = FAMILIES[name][0] if name in FAMILIES else REFUSED[name][0]
    cfg = CONFIG_MAPPING[name](**{**COMMON, **extra, **(overrides or {})})
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model = model.float().eval()
    if not fresh and overrides is None:
        _MODELS[key] = model
    return model


def tokens(batch: int = 2, length: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed)
    )


def decoder(model):
    return model.get_decoder()


# ----------------------------------------------------------------------------------------- description


@pytest.mark.parametrize("name", NAMES)
def test_description_is_the_truth_and_passes_the_shift_check(name):
    model = build(name)
    rope = model_rope(model)
    layout, rotary, offset, head_dim = FAMILIES[name][1]
    assert rope.verified and rope.max_error < 1e-4
    for layer in rope.layers:
        assert (layer.layout, layer.rotary_dim, layer.offset, layer.head_dim) == (
            layout,
            rotary,
            offset,
            head_dim,
        )
    if name == "gemma3_text":  # per-layer-type theta
        assert [la.rope_theta for la in rope.layers] == [10000.0, 1_000_000.0]
    if name == "gemma2":
        assert {la.softcap for la in rope.layers} == {5.0}


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_layout_or_width_fails_the_shift_check(name):
    model = build(name)
    rope = describe_rope(model)
    other = "interleaved" if rope[0].layout == "half" else "half"
    wrong_layout = replace(rope, layers=tuple(replace(la, layout=other) for la in rope.layers))
    with pytest.raises(ValueError, match=rf"model_type='{rope.model_type}'.*fails the position-shift check"):
        verify_rope(model, wrong_layout)
    full = rope[0].head_dim
    if rope[0].rotary_dim < full:  # partial rotary / MLA: declaring the whole head rotary must fail
        wide = []
        for la in rope.layers:
            inv = tuple(1.0 / la.rope_theta ** (2 * i / full) for i in range(full // 2))
            wide.append(replace(la, rotary_dim=full, offset=0, inv_freq=inv))
        with pytest.raises(ValueError, match="fails the position-shift check"):
            verify_rope(model, replace(rope, layers=tuple(wide)))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_families_name_the_feature(name):
    feature = REFUSED[name][1]
    with pytest.raises(ValueError, match=rf"model_type='{name}'.*{feature}"):
        model_rope(build(name, fresh=True))


# --------------------------------------------------------------------------- identity and probabilities


class _Calls:
    def __init__(self):
        self.calls = {}

    def __call__(self, module, call):
        self.calls[call.layer_idx] = call


@pytest.mark.parametrize("name", NAMES)
def test_identity_and_probabilities_match_the_models_eager_attention(name):
    model = build(name)
    rope = model_rope(model)
    ids = tokens()
    rec = _Calls()
    with torch.no_grad(), attention_hooks(model, rec):
        out = decoder(model)(input_ids=ids, output_attentions=True)
    length = ids.shape[1]
    collector = collector_for_model(model, num_bins_for(length), keys_per_bin=None)
    rows = torch.arange(length).repeat(ids.shape[0], 1)
    for layer, call in rec.calls.items():
        q, k = call.query.double(), call.key.double()
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        # identity: sum_i g_i + content = q . k for every (query, key)
        g = pair_contributions(q.unsqueeze(3), k.unsqueeze(2), rope[layer])  # [B, H, L, L, P]
        c = content_contribution(q.unsqueeze(3), k.unsqueeze(2), rope[layer])
        torch.testing.assert_close(g.sum(-1) + c, q @ k.transpose(-1, -2), rtol=1e-10, atol=1e-10)
        assert g.shape[-1] == rope.num_pairs
        # the statistics pass's probabilities a(m, m - delta) against the model's own eager weights
        prepared = collector._prepare_rows(
            call, RowPlan(rows=rows, seed=0), collector._to_pairs(call.key, layer)
        )
        eager = out.attentions[layer].double()  # [B, H, L, L]
        b_idx, pos = prepared.batch, prepared.pos
        delta = torch.arange(prepared.a_delta.shape[-1])
        key_pos = (pos[:, None] - delta[None, :]).clamp(min=0)  # [N, Lmax]
        expect = eager[b_idx[:, None], :, pos[:, None], key_pos].permute(2, 0, 1)  # [H, N, Lmax]
        expect = expect * prepared.valid_delta
        torch.testing.assert_close(prepared.a_delta.double(), expect, rtol=1e-4, atol=1e-5)
        if rope[layer].softcap is not None:  # without the soft-cap the probabilities would differ
            raw = torch.softmax(
                (q @ k.transpose(-1, -2) * call.scaling).masked_fill(
                    ~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")
                ),
                -1,
            )
            assert (raw - eager).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ ablation


@pytest.mark.parametrize("name", NAMES)
def test_head_ablation_equals_zeroing_the_output_projection_columns(name):
    model = build(name)
    ids = tokens()
    with torch.no_grad(), ablate_heads(model, [(1, 2)]):
        ablated = model(input_ids=ids).logits
    reference = copy.deepcopy(model)
    attn = {
        int(m.layer_idx): m
        for m in reference.modules()
        if output_projection(m) is not None and hasattr(m, "layer_idx")
    }
    proj = output_projection(attn[1])
    width = proj.in_features // reference.config.num_attention_heads
    with torch.no_grad():
        proj.weight[:, 2 * width : 3 * width] = 0
        expect = reference(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(ablated, expect, rtol=1e-5, atol=1e-5)
    assert (plain - ablated).abs().max() > 1e-6  # the head mattered


@pytest.mark.parametrize("name", NAMES)
def test_dimension_ablation_removes_exactly_the_declared_pairs(name):
    model = build(name)
    rope = model_rope(model)
    ids = tokens()
    i_c = rope.num_pairs // 2
    with torch.no_grad(), capture_qk(model, layers=[0]) as before:
        plain = model(input_ids=ids).logits
    with (
        torch.no_grad(),
        ablate_dimensions(model, [(0, 1)], i_c, side="high"),
        capture_qk(model, layers=[0]) as after,
    ):
        ablated = model(input_ids=ids).logits
    q0, q1 = before.queries[0], after.queries[0]
    a, b = rope[0].pair_components()
    removed = torch.cat([a[i_c:], b[i_c:]])
    expect = q0.clone()
    expect[:, 1, :, removed] = 0
    assert torch.equal(q1, expect)  # exactly those components of exactly that head, nothing else
    k = before.keys[0].repeat_interleave(q0.shape[1] // before.keys[0].shape[1], dim=1)
    g0 = pair_contributions(q0[:, 1].unsqueeze(2), k[:, 1].unsqueeze(1), rope[0])
    g1 = pair_contributions(q1[:, 1].unsqueeze(2), k[:, 1].unsqueeze(1), rope[0])
    assert torch.equal(g1[..., i_c:], torch.zeros_like(g1[..., i_c:]))
    torch.testing.assert_close(g1[..., :i_c], g0[..., :i_c], rtol=0, atol=0)
    c0 = content_contribution(q0[:, 1].unsqueeze(2), k[:, 1].unsqueeze(1), rope[0])
    c1 = content_contribution(q1[:, 1].unsqueeze(2), k[:, 1].unsqueeze(1), rope[0])
    assert torch.equal(c0, c1)  # pass-through components are never removed
    assert (plain - ablated).abs().max() > 1e-7
    with torch.no_grad(), ablate(model, heads=[], dimension_heads=[], i_c=i_c):
        empty = model(input_ids=ids).logits
    assert torch.equal(empty, plain)  # an empty ablation installs nothing: bit-identical


# ------------------------------------------------------------------------------------------------- scaling

_NESTED = {"gemma3_text"}


@pytest.mark.parametrize("name", NAMES)
def test_rope_scaling_matches_its_closed_form_or_is_refused(name):
    model = build(name, fresh=True)
    scaling = RopeScaling(method="yarn", factor=2.0)
    if name == "phi3":  # Phi-3's config accepts only LongRoPE (its checkpoints' scaling)
        pairs = FAMILIES[name][1][1] // 2
        factors = dict(short_factor=[1.0 + 0.1 * i for i in range(pairs)], long_factor=[2.0] * pairs)
        scaling = RopeScaling(method="longrope", factor=2.0, **factors)
    if name == "gptj":
        with pytest.raises(ValueError, match="model_type='gptj'.*no rotary position embedding"):
            apply_rope_scaling_to_model(model, scaling)
        return
    if name in _NESTED:
        with pytest.raises(ValueError, match="per-layer-type rope_parameters"):
            apply_rope_scaling_to_model(model, scaling)
        return
    base = rope_base(model.config, scaling)
    apply_rope_scaling_to_model(model, scaling)
    inv, attention = model_inverse_frequencies(model)
    ref_inv, ref_attention = SCALING_METHODS[scaling.method].reference(scaling, base, None)
    ref_inv = ref_inv.double()
    assert inv.numel() == model_rope(model).num_pairs  # the rotary pairs, not the whole head
    torch.testing.assert_close(inv.double(), ref_inv, rtol=1e-5, atol=0)
    assert attention == pytest.approx(ref_attention, rel=1e-6)
    rope = model_rope(model)  # re-verified on the scaled model
    assert rope.verified
    torch.testing.assert_close(
        torch.tensor(rope[0].inv_freq, dtype=torch.float64), ref_inv, rtol=1e-5, atol=0
    )


@pytest.mark.parametrize("prior", ["llama3", "yarn", "linear"])
def test_scaling_a_scaled_checkpoint_composes_or_is_refused(prior):
    params = {
        "llama3": {
            "rope_type": "llama3",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        "linear": {"rope_type": "linear", "factor": 4.0},
    }[prior]
    cfg = CONFIG_MAPPING["llama"](
        **{**COMMON, "head_dim": 16, "rope_parameters": {"rope_theta": 10000.0, **params}}
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    inv_before, att_before = model_inverse_frequencies(model)
    with pytest.raises(
        ValueError, match=rf"already carries rope_type='{prior}'.*rope.method='yarn' cannot be composed"
    ):
        apply_rope_scaling(copy.deepcopy(model.config), RopeScaling(method="yarn", factor=2.0))
    apply_rope_scaling_to_model(model, RopeScaling(method="none"))  # keeps the checkpoint's scaling
    torch.testing.assert_close(model_inverse_frequencies(model)[0], inv_before)
    apply_rope_scaling_to_model(model, RopeScaling(method="linear", factor=2.0))
    inv, att = model_inverse_frequencies(model)
    torch.testing.assert_close(inv, inv_before / 2.0, rtol=1e-6, atol=0)  # every frequency divided by 2
    assert att == pytest.approx(att_before, rel=1e-6)
    assert model.config.max_position_embeddings == 2 * 256
    apply_rope_scaling_to_model(
        model, RopeScaling(method="linear", factor=3.0)
    )  # composes with the checkpoint
    torch.testing.assert_close(model_inverse_frequencies(model)[0], inv_before / 3.0, rtol=1e-6, atol=0)
    assert model_rope(model).verified


# ------------------------------------------------------------------------------------ training and tracker


@pytest.mark.parametrize("name", NAMES)
def test_one_training_step(name):
    supports_sdpa = getattr(type(build(name)), "_supports_sdpa", True)
    model = build(name, attn="sdpa" if supports_sdpa else "eager", fresh=True)
    if supports_sdpa:
        with pytest.raises(ValueError, match="supports SDPA"):
            check_eager_training(model, 128)
    else:  # Gemma 2: Transformers refuses SDPA; eager is accepted with a memory warning at the length
        with pytest.warns(UserWarning, match=r"eager attention.*GiB"):
            check_eager_training(model, 128)
    model.train()
    ids = tokens(2, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert math.isfinite(float(loss))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_one_tracker_evaluation(name):
    model = build(name)
    rope = model_rope(model)
    ids = tokens(3, 24, seed=1)
    cfg = HeadsConfig(rows_per_sequence=6, keys_per_bin=4, seed=1, top_fraction=0.25)

    def forward(x, want_logits):
        out = model(input_ids=x, use_cache=False)
        return out.logits if want_logits else None

    result = run_probe_pass(model, forward, ProbeSet(ids, ["a", "b", "c"], cfg.seed), cfg, compute_nll=True)
    i_c = critical_pair_for(model, "quarter")
    analysis = analyze(result.stats, cfg, i_c)
    assert result.stats.num_pairs == rope.num_pairs
    assert torch.isfinite(analysis.scores).any() and math.isfinite(result.ppl)
    assert analysis.hda.shape[:2] == (2, 4) and int(analysis.positional.sum()) >= 1
    share = result.stats.content_share()
    if rope.content_dim:  # pass-through components carry their own share, never a pair
        assert float(torch.nan_to_num(share).max()) > 0
    else:
        assert float(torch.nan_to_num(share).abs().max()) == 0
    if name == "gemma3_text":  # per-layer-type theta -> one i_c per layer
        crit = critical_pair_for(model, "critical", original_context=64)
        assert isinstance(crit, list) and crit[0] != crit[1]
        analyze(result.stats, cfg, crit)


@pytest.mark.parametrize("name", ["qwen2", "phi", "deepseek_v3"])
def test_critical_pair_uses_the_rotary_width_and_the_pretrained_theta(name):
    """``i_c`` counts rotary pairs only (partial rotary, MLA) and survives an NTK base change (layer_types
    present but one flat RoPE: the recorded pre-trained theta is used)."""
    from posheads.rope import critical_pair

    model = build(name, fresh=True)
    rope = model_rope(model)
    expect = critical_pair(rope[0].rotary_dim, rope[0].rope_theta, 64)
    assert critical_pair_for(model, "critical", original_context=64) == expect
    apply_rope_scaling_to_model(model, RopeScaling(method="ntk", factor=4.0))
    assert model.config.rope_parameters["rope_theta"] > rope[0].rope_theta  # the base really changed
    assert critical_pair_for(model, "critical", original_context=64) == expect


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_multimodal_rope_is_refused_from_the_config(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = CONFIG_MAPPING[name]()
    with pytest.raises(ValueError, match=r"model_type='.*' is not supported: multimodal RoPE"):
        describe_rope(config)


def test_training_module_refuses_sdpa_with_the_reason_and_accepts_eager_for_gemma2(tmp_path):
    """Through the LightningModule: Gemma 2 saved to a directory, loaded as a user would."""
    from posheads.lit.module import LengthExtensionModule
    from posheads.models import ModelConfig

    build("gemma2", fresh=True).save_pretrained(tmp_path / "gemma2")
    lm = dict(name_or_path=str(tmp_path / "gemma2"), dtype="float32")
    with pytest.raises(ValueError, match=r"Transformers refuses SDPA.*attn_implementation='eager'"):
        LengthExtensionModule(128, lm=ModelConfig(**lm, attn_implementation="sdpa")).configure_model()
    module = LengthExtensionModule(128, lm=ModelConfig(**lm, attn_implementation="eager"))
    with pytest.warns(UserWarning, match=r"model_type='gemma2' trains with eager attention.*GiB"):
        module.configure_model()
    ids = tokens(2, 16)
    loss = module.model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert math.isfinite(float(loss))


def test_sweep_shape_counts_rotary_pairs_and_refuses_a_sweep_wide_critical_pair_for_gemma3():
    from posheads.eval.sweep import ModelShape, resolve_critical_pair

    assert ModelShape.from_config(build("phi3").config).num_pairs == 4  # 8 rotary of 16
    assert ModelShape.from_config(build("deepseek_v3").config).num_pairs == 4  # MLA rope part
    shape = ModelShape.from_config(build("gemma3_text").config)
    with pytest.raises(ValueError, match="per-layer-type RoPE"):
        resolve_critical_pair("critical", shape)


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_description_at_the_analysed_length_has_the_models_own_frequencies(method):
    """Length-dependent scalings: the collector's description (used by the RoPE-geometry null) carries the
    frequencies the model rotates with at the analysed length, not those of the original context."""
    from posheads.rope.layout import rope_at_length

    model = build("llama", fresh=True)
    extra = {}
    if method == "longrope":
        extra = dict(short_factor=[1.0] * 8, long_factor=[1.0 + 0.5 * i for i in range(8)])
    apply_rope_scaling_to_model(
        model, RopeScaling(method=method, factor=4.0, original_max_position_embeddings=64, **extra)
    )
    rope = model_rope(model)
    for length in (32, 200):
        at = rope_at_length(model, rope, length)
        inv, _ = model_inverse_frequencies(model, length)
        torch.testing.assert_close(
            torch.tensor(at[0].inv_freq, dtype=torch.float64), inv.double(), rtol=1e-5, atol=0
        )
    assert rope_at_length(model, rope, 200)[0].inv_freq != rope[0].inv_freq  # the long length differs
    collector = collector_for_model(model, num_bins_for(200), seq_len=200)
    assert collector.layout[0].inv_freq == rope_at_length(model, rope, 200)[0].inv_freq


@pytest.mark.parametrize("name", NAMES)
def test_the_shift_check_in_bfloat16_passes_the_truth_and_catches_a_wrong_layout_or_width(name):
    """Checkpoints are usually bf16: the model's own rotation is then off by a few % at large positions
    (Cohere: ~6 %), a wrong layout or rotary width by order 1."""
    model = build(name, fresh=True).to(torch.bfloat16)
    rope = verify_rope(model)
    assert rope.max_error < 0.1
    other = "interleaved" if rope[0].layout == "half" else "half"
    with pytest.raises(ValueError, match="fails the position-shift check"):
        verify_rope(model, replace(rope, layers=tuple(replace(la, layout=other) for la in rope.layers)))
    full = rope[0].head_dim
    if rope[0].rotary_dim < full:
        wide = [
            replace(
                la,
                rotary_dim=full,
                offset=0,
                inv_freq=tuple(la.rope_theta ** (-2 * i / full) for i in range(full // 2)),
            )
            for la in rope.layers
        ]
        with pytest.raises(ValueError, match="fails the position-shift check"):
            verify_rope(model, replace(rope, layers=tuple(wide)))
