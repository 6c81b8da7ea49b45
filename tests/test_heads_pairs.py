"""Pair ``i`` <-> frequency ``theta_i``: a position-shift check of every pair's contribution.

``sum_i g_i = q~ . k~`` holds for *any* grouping of the components into pairs, so it cannot tell whether
``pair_contributions`` groups the two components that one RoPE rotation acts on. A shift of positions can:

* shifting query and key by a common offset ``s`` leaves every ``g_i`` unchanged (the rotation of pair ``i``
  cancels in the pair's dot product) -- for a wrong grouping the two components of a "pair" belong to
  different rotations and ``g_i`` changes;
* shifting only the key by ``s`` rotates pair ``i``'s complex contribution ``z_i = (q_a + j q_b) conj(k_a + j k_b)``
  (``g_i = Re z_i``) by ``-theta_i s``: ``g_i' = Re(z_i e^{-j theta_i s})`` with ``theta_i`` the model's own RoPE
  frequencies (its rotary embedding's ``inv_freq``, from Transformers' init), checked against the closed form
  ``base^(-2i/d)``.

Layer 0 is used: its q/k content depends on the tokens only, so runs at shifted positions see the same content.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import capture_qk, pair_contributions
from posheads.heads.capture import to_half_layout

HEAD_DIM = 16
THETA = 10000.0
SHIFT = 37


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": THETA},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def layer0_qk(model: LlamaForCausalLM, ids: torch.Tensor, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Post-RoPE q ``[H, L, d]`` and k ``[H, L, d]`` (GQA expanded) of layer 0 at positions ``offset + 0..L-1``."""
    positions = torch.arange(ids.shape[1]).unsqueeze(0) + offset
    with torch.no_grad(), capture_qk(model) as rec:
        model(ids, position_ids=positions)
    q, k = rec.queries[0][0].double(), rec.keys[0][0].double()
    return q, k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)


def pair_imaginary(q: torch.Tensor, k: torch.Tensor, layout: str) -> torch.Tensor:
    """``Im z_i = q_b k_a - q_a k_b`` with the same grouping ``(a_i, b_i)`` as ``pair_contributions``."""
    q, k = to_half_layout(q, layout), to_half_layout(k, layout)
    half = q.shape[-1] // 2
    return q[..., half:] * k[..., :half] - q[..., :half] * k[..., half:]


def shift_errors(layout: str, inv_freq: torch.Tensor) -> tuple[float, float]:
    """Largest relative violation of (common-shift invariance, key-shift rotation by ``theta_i s``)."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 24), generator=torch.Generator().manual_seed(1))
    q0, k0 = layer0_qk(model, ids, 0)
    q1, k1 = layer0_qk(model, ids, SHIFT)

    def g(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:  # every (head, query, key, pair)
        return pair_contributions(q.unsqueeze(2), k.unsqueeze(1), layout)

    base = g(q0, k0)
    scale = float(base.abs().max())
    common = float((g(q1, k1) - base).abs().max()) / scale
    imag = pair_imaginary(q0.unsqueeze(2), k0.unsqueeze(1), layout)
    angle = SHIFT * inv_freq.double()
    expected = base * angle.cos() + imag * angle.sin()  # Re(z e^{-j theta s})
    key_only = float((g(q0, k1) - expected).abs().max()) / scale
    return common, key_only


def model_inv_freq() -> torch.Tensor:
    return tiny_llama().model.rotary_emb.inv_freq.double()


def test_model_frequencies_are_the_closed_form():
    closed = THETA ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(model_inv_freq(), closed, rtol=1e-6, atol=0)


def test_each_pair_rotates_with_its_own_frequency():
    common, key_only = shift_errors("half", model_inv_freq())
    assert common < 1e-5, common
    assert key_only < 1e-5, key_only


def test_the_check_fails_on_a_wrong_pairing_or_frequency():
    """The same check rejects the interleaved grouping ``(2i, 2i+1)`` on this rotate-half model, and the right
    grouping with the frequencies assigned to the wrong pairs."""
    common, key_only = shift_errors("interleaved", model_inv_freq())
    assert common > 0.05 and key_only > 0.05, (common, key_only)
    _, reversed_freq = shift_errors("half", model_inv_freq().flip(0))
    assert reversed_freq > 0.05, reversed_freq
