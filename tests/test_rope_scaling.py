"""RoPE scaling registry: frequencies against the papers' closed forms and Transformers' init functions,
effect on a tiny Llama's logits, in-place application to a loaded model, validation, critical pair."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from posheads.rope import (
    SCALING_METHODS,
    RopeScaling,
    ScalingMethod,
    apply_rope_scaling,
    apply_rope_scaling_to_model,
    base_rope_theta,
    critical_pair,
    model_inverse_frequencies,
    original_context_length,
    register_scaling_method,
    rope_head_dim,
    rope_parameters_for,
    rotary_embedding_modules,
    scaling_of,
)
from posheads.rope import reference as ref

THETA = 10_000.0
ORIG = 64  # original context of the tiny model
DIM = 16  # head_dim of the tiny model -> 8 pairs
LONG = 96  # a sequence longer than ORIG
SHORT_F = [1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0]
LONG_F = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=DIM,
        max_position_embeddings=ORIG,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
    )


def smol_like_config() -> LlamaConfig:
    """SmolLM2-135M's RoPE numbers (head_dim 64, theta 1e5, 8k context); only used as a config."""
    return LlamaConfig(
        vocab_size=16,
        hidden_size=576,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
    )


CONFIGS = {"tiny": (tiny_config, DIM, THETA, ORIG), "smol": (smol_like_config, 64, 100_000.0, 8192)}


def longrope_lists(pairs: int) -> tuple[list[float], list[float]]:
    if pairs == len(SHORT_F):
        return SHORT_F, LONG_F
    return torch.linspace(1.0, 1.5, pairs).tolist(), torch.linspace(1.0, 6.0, pairs).tolist()


def make_scaling(method: str, factor: float, pairs: int = DIM // 2, **kw) -> RopeScaling:
    if method == "longrope":
        short, long = longrope_lists(pairs)
        kw = {"short_factor": short, "long_factor": long, **kw}
    return RopeScaling(method=method, factor=factor, **kw)


def closed_form(method: str, s: float, dim: int, theta: float, l0: int, seq_len: int | None):
    """Expected (inv_freq float64, attention factor) from the papers' formulas with explicit numbers."""
    if method == "none":
        return ref.rope_inv_freq(dim, theta), 1.0
    if method in ("linear", "pi"):
        return ref.linear_inv_freq(dim, theta, s), 1.0
    if method == "ntk":
        return ref.ntk_inv_freq(dim, theta, s), 1.0
    if method == "dynamic":
        return ref.dynamic_ntk_inv_freq(dim, theta, s, l0, seq_len), 1.0
    if method == "yarn":
        return ref.yarn_inv_freq(dim, theta, s, l0), 0.1 * math.log(s) + 1.0
    if method == "llama3":
        return ref.llama3_inv_freq(dim, theta, s, l0, 1.0, 4.0), 1.0
    if method == "longrope":
        short, long = longrope_lists(dim // 2)
        factors = long if seq_len is not None and seq_len > l0 else short
        return ref.longrope_inv_freq(dim, theta, factors), math.sqrt(1 + math.log(s) / math.log(l0))
    raise AssertionError(method)


# ---------------------------------------------------------------------------------------------- frequencies


@pytest.mark.parametrize("which", ["tiny", "smol"])
@pytest.mark.parametrize("method", ["none", "linear", "pi", "ntk", "dynamic", "yarn", "llama3", "longrope"])
def test_inverse_frequencies_match_closed_forms(which, method):
    make_config, dim, theta, l0 = CONFIGS[which]
    s = 1.0 if method == "none" else 4.0
    config = apply_rope_scaling(make_config(), make_scaling(method, s, dim // 2))
    for seq_len in (None, l0 // 2, l0, 3 * l0 + 5):
        inv_freq, attention = model_inverse_frequencies(config, seq_len)
        expected, expected_attention = closed_form(method, s, dim, theta, l0, seq_len)
        assert inv_freq.shape == (dim // 2,) and inv_freq.dtype == torch.float32
        torch.testing.assert_close(inv_freq.double(), expected, rtol=2e-6, atol=0)
        assert attention == pytest.approx(expected_attention, rel=1e-12)


def test_closed_form_properties():
    """Sanity of the references themselves: NTK keeps the highest frequency and interpolates the lowest by
    exactly s; dynamic NTK is unscaled at L0 and lowers the frequencies monotonically as L grows; Llama-3
    keeps the highest and divides the lowest by s."""
    base = ref.rope_inv_freq(DIM, THETA)
    ntk = ref.ntk_inv_freq(DIM, THETA, 4.0)
    assert ntk[0] == 1.0 and base[0] == 1.0
    torch.testing.assert_close(ntk[-1], base[-1] / 4.0, rtol=1e-12, atol=0)
    assert torch.all(ntk[1:] < base[1:]) and torch.all(ntk > base / 4.0 - 1e-15)
    lows = [ref.dynamic_ntk_inv_freq(DIM, THETA, 2.0, ORIG, n)[-1].item() for n in (ORIG, 2 * ORIG, 4 * ORIG)]
    assert lows[0] == base[-1].item() and lows[0] > lows[1] > lows[2]
    # Llama-3: highest pair kept, lowest divided by s
    l3 = ref.llama3_inv_freq(DIM, THETA, 8.0, ORIG)
    assert l3[0] == base[0] and l3[-1] == base[-1] / 8.0


@pytest.mark.parametrize("factor", [2.0, 8.0])
@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_yarn_released_ramp_agrees_with_paper_ramp(which, factor):
    """Peng et al. write the ramp linear in r = L0/lambda (Eqs. 17-20); their code (and Transformers) ramps
    linearly in the pair index over [floor, ceil] of the same boundaries. Wherever the paper's ramp is
    saturated the two must coincide; in between both lie in [theta/s, theta]."""
    _, dim, theta, l0 = CONFIGS[which]
    base = ref.rope_inv_freq(dim, theta)
    code = ref.yarn_inv_freq(dim, theta, factor, l0)
    paper = ref.yarn_inv_freq_paper(dim, theta, factor, l0)
    r = l0 * base / (2 * math.pi)
    saturated = (r >= 32.0) | (r <= 1.0)
    assert saturated.any() and (~saturated).any()
    torch.testing.assert_close(code[saturated], paper[saturated], rtol=1e-12, atol=0)
    for freqs in (code, paper):
        assert torch.all(freqs <= base * (1 + 1e-12)) and torch.all(freqs >= base / factor * (1 - 1e-12))
    torch.testing.assert_close(code[r >= 32.0], base[r >= 32.0], rtol=0, atol=0)
    torch.testing.assert_close(code[r <= 1.0], base[r <= 1.0] / factor, rtol=1e-15, atol=0)


def _transformers_config(rope_parameters: dict, max_len: int) -> LlamaConfig:
    config = tiny_config()
    config.rope_parameters = rope_parameters
    config.max_position_embeddings = max_len
    return config


TRANSFORMERS_CASES = {
    "linear": ({"rope_type": "linear", "rope_theta": THETA, "factor": 4.0}, 4 * ORIG),
    "dynamic": ({"rope_type": "dynamic", "rope_theta": THETA, "factor": 4.0}, ORIG),
    "yarn": (
        {"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0, "original_max_position_embeddings": ORIG},
        4 * ORIG,
    ),
    "llama3": (
        {
            "rope_type": "llama3",
            "rope_theta": THETA,
            "factor": 4.0,
            "original_max_position_embeddings": ORIG,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
        4 * ORIG,
    ),
    "longrope": (
        {
            "rope_type": "longrope",
            "rope_theta": THETA,
            "factor": 4.0,
            "original_max_position_embeddings": ORIG,
            "short_factor": SHORT_F,
            "long_factor": LONG_F,
        },
        4 * ORIG,
    ),
}


@pytest.mark.parametrize("method", sorted(TRANSFORMERS_CASES))
def test_matches_transformers_init_functions(method):
    """Our rope_parameters reproduce what Transformers computes from a hand-written rope_parameters dict."""
    params, max_len = TRANSFORMERS_CASES[method]
    config = apply_rope_scaling(tiny_config(), make_scaling(method, 4.0))
    assert config.max_position_embeddings == max_len
    for seq_len in (None, 3 * ORIG):
        # the model only passes a length to dynamic NTK when it outgrows max_position_embeddings, as a tensor
        length = torch.tensor(seq_len) if method == "dynamic" and seq_len is not None else seq_len
        expected, expected_attention = ROPE_INIT_FUNCTIONS[params["rope_type"]](
            _transformers_config(copy.deepcopy(params), max_len), None, seq_len=length
        )
        inv_freq, attention = model_inverse_frequencies(config, seq_len)
        assert torch.equal(inv_freq, expected), (method, seq_len)
        assert attention == expected_attention
    # the module Transformers builds from our config holds the same buffer
    assert torch.equal(LlamaRotaryEmbedding(config).inv_freq, model_inverse_frequencies(config)[0])


@pytest.mark.parametrize("method,theta", [("none", THETA), ("ntk", THETA * 4.0 ** (DIM / (DIM - 2)))])
def test_default_rope_type_methods_match_transformers(method, theta):
    config = apply_rope_scaling(tiny_config(), make_scaling(method, 1.0 if method == "none" else 4.0))
    assert config.rope_parameters["rope_type"] == "default"
    assert config.rope_parameters["rope_theta"] == pytest.approx(theta, rel=1e-14)
    expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(
        _transformers_config({"rope_type": "default", "rope_theta": theta}, ORIG)
    )
    assert torch.equal(model_inverse_frequencies(config)[0], expected)
    assert torch.equal(LlamaRotaryEmbedding(config).inv_freq, expected)


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (1, LONG), generator=torch.Generator().manual_seed(1))


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def build_scaled(base: LlamaForCausalLM, scaling: RopeScaling) -> LlamaForCausalLM:
    model = LlamaForCausalLM(apply_rope_scaling(tiny_config(), scaling)).eval()
    model.load_state_dict(base.state_dict())
    return model


def test_unscaled_methods_are_bit_identical(base_model, tokens):
    reference_logits = logits(base_model, tokens)
    for method in ("none", "linear", "ntk", "yarn", "llama3"):
        scaled = build_scaled(base_model, make_scaling(method, 1.0))
        assert torch.equal(logits(scaled, tokens), reference_logits), method
    # dynamic NTK only acts beyond the original context
    for factor in (1.0, 4.0):
        scaled = build_scaled(base_model, make_scaling("dynamic", factor))
        assert torch.equal(logits(scaled, tokens[:, :ORIG]), reference_logits[:, :ORIG])


@pytest.mark.parametrize("head_dim,theta,l0", [(16, THETA, ORIG), (128, 5e5, 8192), (96, 1e6, 4096)])
def test_factor_one_is_exactly_unscaled_rope(head_dim, theta, l0):
    """At factor 1 Transformers' YaRN / Llama-3 blends ``x (1-w) + x w`` and can be off by an ulp
    (e.g. YaRN at head_dim 128, Llama-3 at head_dim 96); factor 1 must be exactly the unscaled RoPE."""
    config = LlamaConfig(
        vocab_size=8,
        hidden_size=2 * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=l0,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    unscaled, _ = model_inverse_frequencies(config)
    for method in ("none", "linear", "ntk", "yarn", "llama3"):
        scaled = apply_rope_scaling(copy.deepcopy(config), make_scaling(method, 1.0))
        assert scaled.max_position_embeddings == l0
        inv_freq, attention = model_inverse_frequencies(scaled)
        assert torch.equal(inv_freq, unscaled) and attention == 1.0, method


@pytest.mark.parametrize("method", ["linear", "ntk", "dynamic", "yarn", "llama3", "longrope"])
def test_scaled_logits_differ(base_model, tokens, method):
    scaled = build_scaled(base_model, make_scaling(method, 4.0))
    diff = (logits(scaled, tokens) - logits(base_model, tokens)).abs().amax().item()
    assert diff > 1e-3, (method, diff)


def test_yarn_attention_factor_reaches_cos_sin_and_logits(base_model, tokens):
    factor = 4.0
    model = build_scaled(base_model, make_scaling("yarn", factor))
    rotary = rotary_embedding_modules(model)[0][1]
    expected = 0.1 * math.log(factor) + 1.0
    assert rotary.attention_scaling == pytest.approx(expected)
    cos, sin = rotary(torch.zeros(1), torch.arange(LONG)[None])  # [1, L, head_dim] each
    torch.testing.assert_close(cos**2 + sin**2, torch.full_like(cos, expected**2), rtol=1e-5, atol=0)
    # same frequencies without the attention factor give different logits
    plain = build_scaled(base_model, make_scaling("yarn", factor, attention_factor=1.0))
    assert torch.equal(model_inverse_frequencies(plain)[0], model_inverse_frequencies(model)[0])
    assert model_inverse_frequencies(plain)[1] == 1.0
    assert not torch.allclose(logits(plain, tokens), logits(model, tokens), atol=1e-4)


@pytest.mark.parametrize("method", ["none", "linear", "ntk", "dynamic", "yarn", "llama3", "longrope"])
def test_apply_to_model_equals_scaled_config(base_model, tokens, method):
    scaling = make_scaling(method, 1.0 if method == "none" else 4.0)
    model = copy.deepcopy(base_model)
    rotary_before = rotary_embedding_modules(model)[0][1]
    assert apply_rope_scaling_to_model(model, scaling) is model
    assert rotary_embedding_modules(model)[0][1] is rotary_before  # rebuilt in place
    fresh = build_scaled(base_model, scaling)
    assert model.config.rope_parameters == fresh.config.rope_parameters
    assert model.config.max_position_embeddings == fresh.config.max_position_embeddings
    for n in (ORIG, LONG):
        assert torch.equal(logits(model, tokens[:, :n]), logits(fresh, tokens[:, :n])), (method, n)
        a, b = model_inverse_frequencies(model, n), model_inverse_frequencies(fresh, n)
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
        assert torch.equal(a[0], model_inverse_frequencies(fresh.config, n)[0])


def test_apply_to_model_resets_caches_and_does_not_compound(base_model, tokens):
    model = copy.deepcopy(base_model)
    apply_rope_scaling_to_model(model, make_scaling("dynamic", 4.0))
    logits(model, tokens)  # dynamic NTK grows its cached frequencies
    apply_rope_scaling_to_model(model, make_scaling("longrope", 4.0))
    logits(model, tokens)  # LongRoPE caches long_inv_freq
    other_long = [f * 1.5 for f in LONG_F]
    apply_rope_scaling_to_model(model, make_scaling("longrope", 4.0, long_factor=other_long))
    torch.testing.assert_close(
        model_inverse_frequencies(model, LONG)[0].double(),
        ref.longrope_inv_freq(DIM, THETA, other_long),
        rtol=2e-6,
        atol=0,
    )
    # NTK twice = NTK once (the base change starts from the pre-trained theta), then back to linear
    apply_rope_scaling_to_model(model, make_scaling("ntk", 4.0))
    apply_rope_scaling_to_model(model, make_scaling("ntk", 4.0))
    assert base_rope_theta(model.config) == THETA and original_context_length(model.config) == ORIG
    assert torch.equal(
        logits(model, tokens), logits(build_scaled(base_model, make_scaling("ntk", 4.0)), tokens)
    )
    apply_rope_scaling_to_model(model, make_scaling("linear", 2.0))
    assert model.config.max_position_embeddings == 2 * ORIG
    assert torch.equal(
        logits(model, tokens), logits(build_scaled(base_model, make_scaling("linear", 2.0)), tokens)
    )


def test_apply_to_model_keeps_float32_buffers_in_half_precision_model(base_model, tokens):
    model = copy.deepcopy(base_model).to(torch.bfloat16)
    apply_rope_scaling_to_model(model, make_scaling("yarn", 4.0))
    rotary = rotary_embedding_modules(model)[0][1]
    assert rotary.inv_freq.dtype == torch.float32 and rotary.original_inv_freq.dtype == torch.float32
    assert rotary.inv_freq.device == model.lm_head.weight.device
    assert torch.equal(rotary.inv_freq, model_inverse_frequencies(model.config)[0])
    # the buffers stay out of the state dict (non-persistent), as in a freshly built model
    assert not any("inv_freq" in key for key in model.state_dict())


def test_apply_to_peft_wrapped_model(base_model, tokens):
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(
        copy.deepcopy(base_model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    apply_rope_scaling_to_model(wrapped, make_scaling("yarn", 4.0))
    fresh = build_scaled(base_model, make_scaling("yarn", 4.0))
    torch.testing.assert_close(logits(wrapped, tokens), logits(fresh, tokens), rtol=0, atol=1e-6)
    assert model_inverse_frequencies(wrapped)[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_partial_rotary_model():
    """GPT-NeoX rotates a fraction of each head: frequencies cover rotary_dim, partial factor is carried."""
    config = GPTNeoXConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=ORIG,
        rope_parameters={"rope_type": "default", "rope_theta": THETA, "partial_rotary_factor": 0.5},
    )
    assert rope_head_dim(config) == 8
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config).eval()
    apply_rope_scaling_to_model(model, make_scaling("linear", 2.0))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    inv_freq, _ = model_inverse_frequencies(model)
    torch.testing.assert_close(inv_freq.double(), ref.linear_inv_freq(8, THETA, 2.0), rtol=2e-6, atol=0)
    with pytest.raises(ValueError, match=r"rope.short_factor has 8 entries.*4 RoPE pairs"):
        apply_rope_scaling(config, make_scaling("longrope", 2.0))


# ---------------------------------------------------------------------------------------------- config handling


def test_lengths_and_provenance():
    config = apply_rope_scaling(tiny_config(), make_scaling("yarn", 3.0))
    assert config.max_position_embeddings == 3 * ORIG
    assert config.rope_parameters["original_max_position_embeddings"] == ORIG
    config = apply_rope_scaling(
        tiny_config(),
        make_scaling("yarn", 2.0, original_max_position_embeddings=32, max_position_embeddings=100),
    )
    assert (config.max_position_embeddings, config.rope_parameters["original_max_position_embeddings"]) == (
        100,
        32,
    )
    dyn = apply_rope_scaling(tiny_config(), make_scaling("dynamic", 4.0))
    assert dyn.max_position_embeddings == ORIG  # Transformers grows beyond max_position_embeddings
    assert original_context_length(dyn) == ORIG
    # re-scaling starts from the recorded original context, not the scaled max length
    lin = apply_rope_scaling(
        apply_rope_scaling(tiny_config(), make_scaling("linear", 4.0)), make_scaling("yarn", 2.0)
    )
    assert (
        lin.rope_parameters["original_max_position_embeddings"] == ORIG
        and lin.max_position_embeddings == 2 * ORIG
    )
    # the record survives serialisation and reads back as the same scaling
    reloaded = LlamaConfig.from_dict(lin.to_dict())
    assert (
        scaling_of(reloaded)
        == scaling_of(lin)
        == make_scaling("yarn", 2.0, original_max_position_embeddings=ORIG, max_position_embeddings=2 * ORIG)
    )
    assert torch.equal(model_inverse_frequencies(reloaded)[0], model_inverse_frequencies(lin)[0])
    # a hub-style config scaled by someone else reads back from rope_parameters
    hub = _transformers_config(copy.deepcopy(TRANSFORMERS_CASES["yarn"][0]), 4 * ORIG)
    assert scaling_of(hub) == RopeScaling(
        "yarn", 4.0, original_max_position_embeddings=ORIG, max_position_embeddings=4 * ORIG
    )
    assert scaling_of(tiny_config()) == RopeScaling()


def test_rope_parameters_for_is_pure():
    config = tiny_config()
    before = copy.deepcopy(config.to_dict())
    params = rope_parameters_for(config, make_scaling("llama3", 8.0))
    assert params["rope_type"] == "llama3" and params["factor"] == 8.0
    assert config.to_dict() == before


def test_for_target_length():
    s = RopeScaling.for_target_length("yarn", 64, 256, beta_fast=16.0)
    assert (
        s.method,
        s.factor,
        s.original_max_position_embeddings,
        s.max_position_embeddings,
        s.beta_fast,
    ) == ("yarn", 4.0, 64, 256, 16.0)
    assert RopeScaling.for_target_length("pi", 64, 32).factor == 1.0
    assert RopeScaling.for_target_length("none", 64, 256).max_position_embeddings == 256
    assert RopeScaling("PI", 2.0).method == "linear"


def test_registry_accepts_new_methods():
    def toy_linear(s, b):  # a toy method: PI under another name
        return {"rope_type": "linear", "rope_theta": b.rope_theta, "factor": s.factor}

    method = ScalingMethod("toy", toy_linear, None, "test", aliases=("toy-alias",))
    register_scaling_method(method)
    try:
        with pytest.raises(ValueError, match="rope.method='toy' is already registered"):
            register_scaling_method(method)
        config = apply_rope_scaling(tiny_config(), RopeScaling("toy-alias", 2.0))
        torch.testing.assert_close(
            model_inverse_frequencies(config)[0].double(),
            ref.linear_inv_freq(DIM, THETA, 2.0),
            rtol=2e-6,
            atol=0,
        )
    finally:
        SCALING_METHODS.pop("toy")
        SCALING_METHODS.pop("toy-alias")
    for name, spec in SCALING_METHODS.items():
        assert spec.reference is not None and spec.source, name


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "foo"}, r"rope.method='foo' is not one of"),
        ({"method": 3}, r"rope.method=3"),
        ({"method": "linear", "factor": 0.5}, r"rope.factor=0.5 must be >= 1"),
        ({"method": "linear", "factor": float("nan")}, r"rope.factor=nan"),
        ({"method": "linear", "factor": "2"}, r"rope.factor='2'"),
        ({"method": "none", "factor": 2.0}, r"rope.factor=2.0 must be 1 for rope.method='none'"),
        ({"method": "longrope", "factor": 2.0, "long_factor": LONG_F}, r"rope.short_factor=None.*requires"),
        ({"method": "longrope", "factor": 2.0, "short_factor": SHORT_F}, r"rope.long_factor=None.*requires"),
        (
            {"method": "longrope", "short_factor": SHORT_F, "long_factor": [1.0, -2.0]},
            r"rope.long_factor contains -2.0",
        ),
        (
            {"method": "yarn", "short_factor": SHORT_F},
            r"rope.short_factor is only used by rope.method='longrope'",
        ),
        (
            {"method": "linear", "factor": 2.0, "attention_factor": 1.2},
            r"rope.attention_factor=1.2 is not used",
        ),
        ({"method": "yarn", "factor": 2.0, "attention_factor": 0.0}, r"rope.attention_factor=0.0"),
        (
            {"method": "yarn", "beta_fast": 1.0, "beta_slow": 2.0},
            r"rope.beta_fast=1.0 must be > rope.beta_slow=2.0",
        ),
        ({"method": "llama3", "low_freq_factor": 4.0, "high_freq_factor": 1.0}, r"rope.high_freq_factor=1.0"),
        (
            {"method": "yarn", "original_max_position_embeddings": 0},
            r"rope.original_max_position_embeddings=0",
        ),
        ({"method": "yarn", "max_position_embeddings": 2.5}, r"rope.max_position_embeddings=2.5"),
        (
            {"method": "yarn", "original_max_position_embeddings": 64, "max_position_embeddings": 32},
            r"rope.max_position_embeddings=32 must be >= rope.original_max_position_embeddings=64",
        ),
    ],
)
def test_invalid_scaling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeScaling(**kwargs)


def test_invalid_against_model():
    with pytest.raises(
        ValueError, match=r"rope.max_position_embeddings=32 must be >= the original context 64"
    ):
        apply_rope_scaling(tiny_config(), RopeScaling("linear", 2.0, max_position_embeddings=32))
    with pytest.raises(ValueError, match=r"rope.short_factor has 3 entries.*8 RoPE pairs"):
        apply_rope_scaling(
            tiny_config(), RopeScaling("longrope", 2.0, short_factor=[1.0] * 3, long_factor=LONG_F)
        )
    with pytest.raises(TypeError, match="RopeScaling"):
        rope_parameters_for(tiny_config(), {"method": "yarn"})
    gpt2 = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=32)
    for call in (
        lambda: apply_rope_scaling(gpt2, RopeScaling("yarn", 2.0)),
        lambda: rope_parameters_for(gpt2, RopeScaling()),
        lambda: model_inverse_frequencies(gpt2),
        lambda: rope_head_dim(gpt2),
        lambda: apply_rope_scaling_to_model(GPT2LMHeadModel(gpt2), RopeScaling("yarn", 2.0)),
        lambda: model_inverse_frequencies(GPT2LMHeadModel(gpt2)),
    ):
        with pytest.raises(ValueError, match=r"model_type='gpt2'.*no rotary position embedding"):
            call()
    with pytest.raises(ValueError, match=r"seq_len=0"):
        model_inverse_frequencies(tiny_config(), 0)


# ---------------------------------------------------------------------------------------------- critical pair


def brute_force_critical_pair(head_dim: int, theta: float, ctx: float) -> int:
    for i in range(head_dim // 2):
        if 2 * math.pi / theta ** (-2 * i / head_dim) > ctx:
            return i
    return head_dim // 2


def test_critical_pair_smollm2():
    # wavelength of pair 19 is 2 pi 1e5^(38/64) ~ 5847 < 8192 < pair 20's ~ 8378
    assert critical_pair(64, 1e5, 8192) == 20
    assert 2 * math.pi * 1e5 ** (38 / 64) < 8192 < 2 * math.pi * 1e5 ** (40 / 64)


def test_critical_pair_brute_force():
    for head_dim in (2, 4, 8, 16, 64, 128):
        for theta in (10.0, 500.0, 1e4, 1e5, 5e5, 1e6):
            for ctx in (1, 5, 6, 7, 64, 100, 2048, 4096, 8192, 32768, 10**9):
                assert critical_pair(head_dim, theta, ctx) == brute_force_critical_pair(
                    head_dim, theta, ctx
                ), (head_dim, theta, ctx)
    # tiny model: wavelengths 6.3, 19.9, 62.8, 198.7, ... ; exactly at a wavelength "exceeds" is strict
    assert critical_pair(DIM, THETA, ORIG) == 3
    assert critical_pair(DIM, THETA, 2 * math.pi * THETA ** (4 / DIM)) == 3
    assert critical_pair(DIM, THETA, 1) == 0
    assert critical_pair(DIM, THETA, 10**12) == DIM // 2
    for bad in ((15, THETA, ORIG), (0, THETA, ORIG), (DIM, 1.0, ORIG), (DIM, THETA, 0)):
        with pytest.raises(ValueError):
            critical_pair(*bad)
