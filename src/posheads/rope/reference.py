"""Closed-form RoPE frequencies of every scaling method, written from the papers (pure torch/math).

These functions never touch a Transformers config or model: they are the independent reference that the
frequencies a model actually computes (through ``config.rope_parameters`` and Transformers'
``ROPE_INIT_FUNCTIONS``) are tested against. Everything is computed in float64.

Notation (shared with docs/definitions.md): ``dim`` is the rotary dimension of one head (``head_dim`` for
full-rotary models), pair ``i = 0 .. dim/2 - 1`` has inverse frequency ``theta_i = b^(-2i/dim)`` with base
``b = rope_theta`` and wavelength ``lambda_i = 2*pi / theta_i``; ``s`` is the scaling factor; ``L0`` the
original (pre-training) context length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "dynamic_ntk_inv_freq",
    "linear_inv_freq",
    "llama3_inv_freq",
    "longrope_attention_factor",
    "longrope_inv_freq",
    "ntk_base",
    "ntk_inv_freq",
    "rope_inv_freq",
    "yarn_attention_factor",
    "yarn_correction_range",
    "yarn_inv_freq",
    "yarn_inv_freq_paper",
]


def rope_inv_freq(dim: int, rope_theta: float) -> torch.Tensor:
    """Unscaled RoPE, Su et al. 2021 ("RoFormer"): ``theta_i = b^(-2i/dim)``. Returns ``[dim/2]`` float64."""
    i = torch.arange(dim // 2, dtype=torch.float64)  # [dim/2]
    return rope_theta ** (-2.0 * i / dim)


def linear_inv_freq(dim: int, rope_theta: float, factor: float) -> torch.Tensor:
    """Position Interpolation, Chen et al. 2023 (arXiv 2306.15595; kaiokendev): positions ``m -> m/s``,
    equivalently ``theta_i -> theta_i / s`` for every pair."""
    return rope_inv_freq(dim, rope_theta) / factor


def ntk_base(dim: int, rope_theta: float, factor: float) -> float:
    """NTK-aware base change (bloc97 2023; YaRN paper Sec. 3.1): ``b' = b * s^(dim/(dim-2))``, chosen so that
    the lowest frequency is interpolated by exactly ``s`` while the highest is left unchanged."""
    return rope_theta * factor ** (dim / (dim - 2))


def ntk_inv_freq(dim: int, rope_theta: float, factor: float) -> torch.Tensor:
    """Static NTK-aware scaling: unscaled RoPE with the base ``b'`` of :func:`ntk_base`."""
    return rope_inv_freq(dim, ntk_base(dim, rope_theta, factor))


def dynamic_ntk_inv_freq(
    dim: int, rope_theta: float, factor: float, original_max_position_embeddings: int, seq_len: int | None
) -> torch.Tensor:
    """Dynamic NTK scaling (emozilla 2023; YaRN paper Sec. 3.3), in the form Transformers implements:
    for a sequence of length ``L > L0`` the base becomes ``b * (s*L/L0 - (s-1))^(dim/(dim-2))``; for
    ``L <= L0`` (or no length) RoPE is unchanged."""
    length = (
        original_max_position_embeddings
        if seq_len is None
        else max(seq_len, original_max_position_embeddings)
    )
    alpha = factor * length / original_max_position_embeddings - (factor - 1.0)
    return rope_inv_freq(dim, rope_theta * alpha ** (dim / (dim - 2)))


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention temperature, Peng et al. 2023 (arXiv 2309.00071) Eq. 22: ``sqrt(1/t) = 0.1 ln(s) + 1``.
    Both ``cos`` and ``sin`` are multiplied by it, so every attention logit is multiplied by ``1/t``."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def yarn_correction_range(
    dim: int, rope_theta: float, original_max_position_embeddings: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """Pair-index range of YaRN's ramp (reference code of Peng et al., used by Transformers): the pair index
    at which a wavelength fits ``beta`` times into ``L0`` is ``dim * ln(L0 / (2 pi beta)) / (2 ln b)``; the
    range is ``[floor(at beta_fast), ceil(at beta_slow)]`` clipped to ``[0, dim-1]``."""

    def pair_at(rotations: float) -> float:
        return (
            dim
            * math.log(original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope_theta))
        )

    low = math.floor(pair_at(beta_fast))
    high = math.ceil(pair_at(beta_slow))
    return max(low, 0), min(high, dim - 1)


def yarn_inv_freq(
    dim: int,
    rope_theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """YaRN "NTK-by-parts" frequencies as released by Peng et al. (and as Transformers computes them): a
    ramp that is linear in the pair index ``j`` between the correction range ``[low, high]``
    (:func:`yarn_correction_range`); ``ramp = 0`` keeps ``theta_j`` (high frequencies, many rotations
    within ``L0``), ``ramp = 1`` interpolates ``theta_j / s`` (low frequencies)."""
    theta = rope_inv_freq(dim, rope_theta)  # [dim/2]
    low, high = yarn_correction_range(dim, rope_theta, original_max_position_embeddings, beta_fast, beta_slow)
    width = high - low if high != low else 0.001  # as in the released code: no zero-width ramp
    j = torch.arange(dim // 2, dtype=torch.float64)
    ramp = ((j - low) / width).clamp(0.0, 1.0)  # [dim/2]
    return ramp * theta / factor + (1.0 - ramp) * theta


def yarn_inv_freq_paper(
    dim: int,
    rope_theta: float,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> torch.Tensor:
    """YaRN frequencies exactly as the paper writes them (Peng et al. 2023, Eqs. 17-20):
    ``r_i = L0 / lambda_i``; ``gamma(r) = 0`` if ``r < alpha``, ``1`` if ``r > beta``, else
    ``(r - alpha)/(beta - alpha)``; ``h(theta_i) = (1 - gamma) theta_i / s + gamma theta_i`` with
    ``alpha = beta_slow``, ``beta = beta_fast``. The paper's ramp is linear in ``r``, the released code's
    (:func:`yarn_inv_freq`) linear in the pair index; both agree wherever either ramp is 0 or 1."""
    theta = rope_inv_freq(dim, rope_theta)  # [dim/2]
    r = original_max_position_embeddings * theta / (2 * math.pi)  # rotations of each pair within L0
    gamma = ((r - beta_slow) / (beta_fast - beta_slow)).clamp(0.0, 1.0)
    return (1.0 - gamma) * theta / factor + gamma * theta


def llama3_inv_freq(
    dim: int,
    rope_theta: float,
    factor: float,
    original_max_position_embeddings: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> torch.Tensor:
    """Llama 3.1 scaling (Dubey et al. 2024, "The Llama 3 Herd of Models"; Meta's ``apply_scaling``):
    pairs with ``lambda < L0/high_freq_factor`` are kept, pairs with ``lambda > L0/low_freq_factor`` are
    divided by ``s``, and in between ``theta' = (1 - w) theta / s + w theta`` with
    ``w = (L0/lambda - low_freq_factor) / (high_freq_factor - low_freq_factor)``."""
    theta = rope_inv_freq(dim, rope_theta)  # [dim/2]
    wavelength = 2 * math.pi / theta
    out = torch.empty_like(theta)
    for i, (t, lam) in enumerate(zip(theta.tolist(), wavelength.tolist())):
        if lam < original_max_position_embeddings / high_freq_factor:
            out[i] = t
        elif lam > original_max_position_embeddings / low_freq_factor:
            out[i] = t / factor
        else:
            w = (original_max_position_embeddings / lam - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            out[i] = (1 - w) * t / factor + w * t
    return out


def longrope_inv_freq(
    dim: int,
    rope_theta: float,
    rescale_factors: Sequence[float],
) -> torch.Tensor:
    """LongRoPE, Ding et al. 2024 (arXiv 2402.13753): a searched, non-uniform rescale factor per pair,
    ``theta_i' = theta_i / lambda_i``; the model uses the short factors for sequences within ``L0`` and the
    long factors beyond."""
    lam = torch.tensor(list(rescale_factors), dtype=torch.float64)  # [dim/2]
    return rope_inv_freq(dim, rope_theta) / lam


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """LongRoPE attention scaling as in Phi-3 / Microsoft's LongRoPE code:
    ``sqrt(1 + ln(s) / ln(L0))`` for ``s > 1``, else 1."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings))
