"""Ablation operators: nothing is bit-identical, zero/mean head ablation, per-row masks, dimension ablation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import (
    ablate,
    ablate_dimensions,
    ablate_heads,
    attention_modules,
    capture_qk,
    head_mask,
    head_means,
    pair_contributions,
)


def tiny(attn: str = "sdpa", seed: int = 0):
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def o_proj_inputs(model, ids, **kwargs):
    """The input of every layer's o_proj (recorded by a pre-hook registered after any ablation hook)."""
    seen = {}
    handles = [
        m.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0].detach().clone())
        )
        for i, m in attention_modules(model).items()
    ]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out, seen


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ablating_nothing_is_bit_identical(attn):
    model = tiny(attn)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        reference = model(ids).logits
        with (
            ablate_heads(model, []) as m1,
            ablate_dimensions(model, torch.zeros(3, 4, dtype=torch.bool), i_c=4) as m2,
        ):
            assert m1 is None and m2 is None
            out = model(ids).logits
        with ablate(model, heads=None, dimension_heads=torch.zeros(2, 3, 4, dtype=torch.bool), i_c=4):
            out2 = model(ids).logits
    assert torch.equal(reference, out) and torch.equal(reference, out2)
    assert model.config._attn_implementation == attn


def test_zero_ablation_changes_only_downstream():
    model = tiny()
    ids = torch.randint(0, 97, (1, 16))
    ref, ref_in = o_proj_inputs(model, ids)
    with ablate_heads(model, [(1, 2)]):
        out, ab_in = o_proj_inputs(model, ids)
    d = 16
    # layers before the head: untouched, bit for bit (hidden_states[i] is the input of layer i)
    for i in range(2):
        assert torch.equal(ref.hidden_states[i], out.hidden_states[i])
    assert torch.equal(ref_in[0], ab_in[0])
    # the ablated slice is zero, the other heads of the layer are unchanged
    assert bool((ab_in[1][..., 2 * d : 3 * d] == 0).all())
    assert torch.equal(ab_in[1][..., : 2 * d], ref_in[1][..., : 2 * d])
    assert torch.equal(ab_in[1][..., 3 * d :], ref_in[1][..., 3 * d :])
    # downstream of the head: changed
    assert not torch.equal(ref.hidden_states[2], out.hidden_states[2])
    assert not torch.allclose(ref.logits, out.logits)


def test_per_row_masks_run_conditions_in_one_batch():
    model = tiny()
    ids = torch.randint(0, 97, (1, 16)).repeat(3, 1)
    mask = torch.zeros(3, 3, 4, dtype=torch.bool)
    mask[1, 1, 2] = True  # row 1: head (1, 2)
    mask[2, 0, 0] = True  # row 2: head (0, 0)
    with torch.no_grad():
        plain = model(ids[:1]).logits
        with ablate_heads(model, mask):
            batched = model(ids).logits
        with ablate_heads(model, [(1, 2)]):
            single1 = model(ids[:1]).logits
        with ablate_heads(model, [(0, 0)]):
            single2 = model(ids[:1]).logits
    assert torch.equal(batched[0], plain[0])
    torch.testing.assert_close(batched[1], single1[0])
    torch.testing.assert_close(batched[2], single2[0])
    with pytest.raises(ValueError, match="batch 3"), torch.no_grad(), ablate_heads(model, mask):
        model(ids[:2])


def test_mean_ablation_uses_the_reference_mean():
    model = tiny()
    reference = torch.randint(0, 97, (3, 12))
    means = head_means(model, reference, batch_size=2)
    # direct mean of the o_proj inputs over every reference token
    _, inputs = o_proj_inputs(model, reference)
    direct = torch.stack([inputs[i].reshape(-1, 4, 16).double().mean(0) for i in range(3)]).float()
    torch.testing.assert_close(means, direct, rtol=1e-5, atol=1e-6)
    ids = torch.randint(0, 97, (2, 10))
    with ablate_heads(model, [(2, 1), (0, 3)], mode="mean", means=means):
        _, ab_in = o_proj_inputs(model, ids)
    assert torch.equal(ab_in[2][..., 16:32], means[2, 1].expand(2, 10, 16))
    assert torch.equal(ab_in[0][..., 48:64], means[0, 3].expand(2, 10, 16))
    with pytest.raises(ValueError, match="needs means"), ablate_heads(model, [(0, 0)], mode="mean"):
        pass
    # padding positions are excluded from the mean
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :4] = 0
    masked = head_means(model, reference[:2], attention_mask=am, batch_size=2)
    assert not torch.allclose(masked, head_means(model, reference[:2], batch_size=2))


def test_dimension_ablation_removes_the_pairs_from_the_logits():
    model = tiny()
    ids = torch.randint(0, 97, (2, 14))
    i_c = 5
    with torch.no_grad(), capture_qk(model) as plain:
        model(ids)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, 1, 3] = True  # row 1, layer 1, head 3
    with (
        torch.no_grad(),
        ablate_dimensions(model, mask, i_c=i_c, side="high"),
        capture_qk(model, layers=[0, 1]) as rec,
    ):
        model(ids)
    q0, q1 = plain.queries[1], rec.queries[1]
    k = rec.keys[1].repeat_interleave(2, dim=1)
    # the ablated head's logits are the sum of the kept pairs only
    g = pair_contributions(plain.queries[1][1, 3].unsqueeze(1), k[1, 3].unsqueeze(0))  # [L, L, P]
    logits = torch.einsum("md,nd->mn", q1[1, 3], k[1, 3])
    torch.testing.assert_close(logits, g[..., :i_c].sum(-1), rtol=1e-5, atol=1e-5)
    # nothing else changed: the other row, the other heads, the keys
    assert torch.equal(q1[0], q0[0])
    assert torch.equal(q1[1, :3], q0[1, :3])
    assert torch.equal(rec.keys[0], plain.keys[0]) and torch.equal(rec.queries[0], plain.queries[0])
    # "low" removes the other side
    with (
        torch.no_grad(),
        ablate_dimensions(model, [(1, 3)], i_c=i_c, side="low"),
        capture_qk(model, layers=[1]) as low,
    ):
        model(ids)
    torch.testing.assert_close(
        torch.einsum("md,nd->mn", low.queries[1][1, 3], k[1, 3]), g[..., i_c:].sum(-1), rtol=1e-5, atol=1e-5
    )


def test_head_mask_errors_name_the_value():
    with pytest.raises(ValueError, match=r"head \(3, 0\): layer 3 out of range 0..2"):
        head_mask([(3, 0)], 3, 4)
    with pytest.raises(ValueError, match=r"head \(0, 9\): head 9 out of range 0..3"):
        head_mask([(0, 9)], 3, 4)
    with pytest.raises(ValueError, match="shape"):
        head_mask(torch.zeros(3, 5, dtype=torch.bool), 3, 4)
    model = tiny()
    with pytest.raises(ValueError, match="mode='drop'"), ablate_heads(model, [(0, 0)], mode="drop"):
        pass
    with (
        pytest.raises(ValueError, match="side='middle'"),
        ablate_dimensions(model, [(0, 0)], 4, side="middle"),
    ):
        pass
