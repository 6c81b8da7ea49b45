"""Next-token cross-entropy of a causal LM without the full ``[tokens, vocab]`` logits (no Lightning import).

The plain loss (``model(input_ids, labels=labels).loss``) materialises the logits of every position in float32
and, for the backward, their log-softmax and its gradient: at 32768 tokens and SmolLM2's 49152-token
vocabulary that is 6.4 GB per copy. :func:`chunked_causal_lm_loss` instead runs the decoder to its final hidden
states ``h`` ``[N, D]`` and computes the loss ``chunk_size`` positions at a time through
:class:`ChunkedLinearCrossEntropy`, an autograd function that, in the same pass over the chunks, also
computes the gradients of the (scalar) loss with respect to ``h`` and the output-embedding weight ``W``:

    logits_c = h_c W^T   (float32),   p_c = softmax(logits_c),   g_c = (p_c - onehot(y_c)) * valid_c / n,
    loss = sum_c sum_t valid (logsumexp(logits_c) - logits_c[y]) / n,
    dL/dh_c = g_c W,   dL/dW = sum_c g_c^T h_c,

with ``n`` the number of scored positions (labels ``!= -100``, the Hugging Face convention: position ``t`` is
scored against ``labels[t + 1]``). The backward only multiplies these by the incoming gradient, so nothing is
recomputed and the FLOPs equal the plain loss's; the largest loss-side tensors held at once are a few
``[chunk_size, vocab]`` float32 blocks, plus ``dL/dh`` ``[N, D]`` and ``dL/dW`` ``[V, D]`` (the size of the
weight's own gradient; not computed when ``W`` is frozen, as under LoRA).

Mixed precision: under autocast the two matmuls run in the autocast dtype (as ``lm_head`` would) and the
softmax in float32, as the plain path does.

:func:`chunked_loss_supported` says when the model's output head is a plain bias-free ``nn.Linear`` with no
logit soft-capping or scaling (Llama, Mistral, Qwen2, SmolLM, ...); otherwise callers fall back to the plain
loss.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "IGNORE_INDEX",
    "ChunkedLinearCrossEntropy",
    "chunked_causal_lm_loss",
    "chunked_loss_supported",
    "shifted_targets",
]

IGNORE_INDEX = -100


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` labels -> ``[B, L]`` targets: position ``t`` predicts ``labels[t + 1]``; the last position
    of every row is :data:`IGNORE_INDEX`."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


def _chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The loss and, where asked, its gradients w.r.t. ``hidden`` and ``weight`` (see the module docstring)."""
    n_valid = (targets != IGNORE_INDEX).sum()  # [] (a tensor: no host sync)
    inv_n = 1.0 / n_valid.to(torch.float32)  # inf when nothing is scored -> nan loss, as the plain loss
    w = weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    for start in range(0, hidden.shape[0], chunk_size):
        h = hidden[start : start + chunk_size].to(dtype)  # [c, D]
        y = targets[start : start + chunk_size]  # [c]
        valid = y != IGNORE_INDEX  # [c]
        y_safe = y.clamp_min(0)  # [c]
        logits = (h @ w.t()).float()  # [c, V]
        lse = torch.logsumexp(logits, dim=-1)  # [c]
        target_logit = logits.gather(1, y_safe[:, None]).squeeze(1)  # [c]
        total = total + ((lse - target_logit) * valid).sum()
        if need_h or need_w:
            probs = logits.sub_(lse[:, None]).exp_()  # [c, V] softmax, in place of the logits
            probs.scatter_add_(1, y_safe[:, None], -valid[:, None].to(probs.dtype))
            probs.mul_((valid.to(probs.dtype) * inv_n)[:, None])  # dL/dlogits
            g = probs.to(dtype)  # [c, V]
            if grad_h is not None:
                grad_h[start : start + chunk_size] = (g @ w).to(hidden.dtype)  # [c, D]
            if grad_w is not None:
                grad_w += (g.t() @ h).float()  # [V, D]
            del probs, g
        del logits
    return total * inv_n, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``mean over valid t of CE(hidden[t] @ weight.T, targets[t])`` with gradients computed chunk by chunk in
    the forward (see the module docstring). ``hidden`` ``[N, D]``, ``weight`` ``[V, D]``, ``targets`` ``[N]``
    (:data:`IGNORE_INDEX` = not scored), ``chunk_size`` positions per block, ``dtype`` of the two matmuls."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        need_h, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        loss, grad_h, grad_w = _chunked_cross_entropy(
            hidden, weight, targets, chunk_size, dtype, need_h, need_w
        )
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0),
            grad_w if grad_w is not None else torch.empty(0),
        )
        ctx.has = (need_h, need_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        need_h, need_w = ctx.has
        return (
            grad_h * grad_out.to(grad_h.dtype) if need_h else None,
            grad_w * grad_out.to(grad_w.dtype) if need_w else None,
            None,
            None,
            None,
        )


def _hf_model(model: nn.Module) -> Any:
    """The Transformers model (typed ``Any``: its ``get_decoder`` / ``get_output_embeddings`` are duck-typed)."""
    get_base = getattr(model, "get_base_model", None)  # peft: LoRA layers are injected in place
    return get_base() if callable(get_base) else model


def chunked_loss_supported(model: nn.Module) -> bool:
    """Whether :func:`chunked_causal_lm_loss` computes the same loss as the model's own forward: a decoder
    (``get_decoder()``), a bias-free ``nn.Linear`` output head (not wrapped by an adapter) and no logit
    soft-capping or scaling in the config."""
    hf = _hf_model(model)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return False
    if not callable(getattr(hf, "get_decoder", None)) or hf.get_decoder() is None:
        return False
    config = getattr(hf, "config", None)
    if getattr(config, "final_logit_softcapping", None) is not None:
        return False
    return all(getattr(config, name, None) in (None, 1, 1.0) for name in ("logit_scale", "logits_scaling"))


def chunked_causal_lm_loss(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Mean next-token NLL of ``model`` (a Transformers causal LM, possibly peft-wrapped) on ``input_ids``
    ``[B, L]`` against ``labels`` ``[B, L]`` (:data:`IGNORE_INDEX` = not scored), equal to
    ``model(input_ids, labels=labels).loss`` with its gradients, computed ``chunk_size`` positions at a time
    (requires :func:`chunked_loss_supported`)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
    hf = _hf_model(model)
    hidden = hf.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state  # [B, L, D]
    weight = hf.get_output_embeddings().weight  # [V, D]
    flat = hidden.reshape(-1, hidden.shape[-1])  # [B * L, D]
    targets = shifted_targets(labels).reshape(-1)  # [B * L]
    dtype = _compute_dtype(flat.device, flat.dtype)
    if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
        with torch.autocast(flat.device.type, enabled=False):
            return ChunkedLinearCrossEntropy.apply(flat, weight, targets, chunk_size, dtype)
    with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
        return _chunked_cross_entropy(flat, weight, targets, chunk_size, dtype, False, False)[0]
