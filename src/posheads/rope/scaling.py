"""RoPE scaling methods as a registry, and how they are written into a Transformers config.

A scaling method turns the RoPE of a pre-trained model (base ``rope_theta``, rotary dimension ``d``,
pre-training context ``L0`` = ``original_max_position_embeddings``) into the ``config.rope_parameters`` dict
that Transformers 5 reads when it builds the rotary-embedding module (``ROPE_INIT_FUNCTIONS``). Registered:

=============  ==============================  ==========================================================
``method``     Transformers ``rope_type``      source
=============  ==============================  ==========================================================
``none``       ``default``                     Su et al. 2021, RoFormer (unscaled RoPE)
``linear``     ``linear``                      Chen et al. 2023, Position Interpolation (alias ``pi``)
``ntk``        ``default`` with a new base     bloc97 2023, NTK-aware scaling: ``b' = b s^(d/(d-2))``
``dynamic``    ``dynamic``                     emozilla 2023, dynamic NTK (grows with the sequence length)
``yarn``       ``yarn``                        Peng et al. 2023, YaRN (NTK-by-parts + attention factor)
``llama3``     ``llama3``                      Dubey et al. 2024, Llama 3.1 frequency-band scaling
``longrope``   ``longrope``                    Ding et al. 2024, LongRoPE (searched per-pair factors)
=============  ==============================  ==========================================================

Every method's closed form lives in :mod:`posheads.rope.reference` and is attached to its registry entry.

Lengths. ``L0`` defaults to what the config says the model was pre-trained on
(:func:`original_context_length`); the new ``config.max_position_embeddings`` defaults to
``round(factor * L0)``. Dynamic NTK is the exception: Transformers reads ``config.max_position_embeddings``
as the length beyond which it starts growing the base, so for it that field stays ``L0``.

Provenance. :func:`apply_rope_scaling` also records the scaling and the unscaled ``rope_theta`` / ``L0`` on
the config (attribute ``posheads_rope_scaling``, saved with ``config.json``), so that applying another
scaling later starts again from the pre-trained RoPE instead of compounding (the NTK base change rewrites
``rope_theta``; PI rewrites ``max_position_embeddings``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import reference as ref

__all__ = [
    "PROVENANCE_ATTRIBUTE",
    "SCALING_METHODS",
    "RopeBase",
    "RopeScaling",
    "ScalingMethod",
    "apply_rope_scaling",
    "base_rope_theta",
    "critical_pair",
    "original_context_length",
    "register_scaling_method",
    "rope_base",
    "rope_config",
    "rope_head_dim",
    "rope_parameters_for",
    "scaling_of",
]

PROVENANCE_ATTRIBUTE = "posheads_rope_scaling"
"""Config attribute under which :func:`apply_rope_scaling` records the scaling and the pre-trained RoPE."""

# rope_parameters keys that describe the model rather than the scaling: carried over unchanged.
_CARRIED_KEYS = ("partial_rotary_factor", "mrope_section", "mrope_interleaved")


# --------------------------------------------------------------------------------------------------------
# The unscaled RoPE of a model
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeBase:
    """What a scaling method needs to know about the model's pre-trained RoPE.

    Attributes:
        rotary_dim: rotated dimensions per head (``head_dim * partial_rotary_factor``); pairs ``0..rotary_dim/2-1``.
        rope_theta: the pre-trained base ``b`` (before any NTK base change).
        original_max_position_embeddings: the pre-training context ``L0``.
        max_position_embeddings: the new maximum length (``round(factor * L0)`` unless given).
    """

    rotary_dim: int
    rope_theta: float
    original_max_position_embeddings: int
    max_position_embeddings: int


def _model_type(config: Any) -> str:
    return str(getattr(config, "model_type", None) or type(config).__name__)


def rope_config(config: Any) -> Any:
    """The (sub-)config that holds the RoPE parameters: ``config`` itself, or its text config for
    composite (e.g. vision-language) models. Raises ``ValueError`` naming the model type if there is no RoPE."""
    if getattr(config, "rope_parameters", None):
        return _check_flat(config)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            text_config = get_text_config(decoder=True)
        except (TypeError, ValueError):
            text_config = None
        if (
            text_config is not None
            and text_config is not config
            and getattr(text_config, "rope_parameters", None)
        ):
            return _check_flat(text_config)
    raise ValueError(
        f"model_type={_model_type(config)!r} ({type(config).__name__}) has no rotary position embedding "
        "(no `rope_parameters` in its config): RoPE scaling does not apply to it"
    )


def _check_flat(config: Any) -> Any:
    rp = config.rope_parameters
    nested = config.nested_rope_parameter_keys(rp) if hasattr(config, "nested_rope_parameter_keys") else []
    if nested:
        raise ValueError(
            f"model_type={_model_type(config)!r} has per-layer-type rope_parameters (keys {sorted(nested)}); "
            "posheads.rope supports one RoPE shared by all layers"
        )
    return config


def _provenance(config: Any) -> Mapping[str, Any] | None:
    value = getattr(config, PROVENANCE_ATTRIBUTE, None)
    return value if isinstance(value, Mapping) else None


def rope_head_dim(config: Any) -> int:
    """Rotary dimension of one attention head: ``head_dim * partial_rotary_factor`` (= ``head_dim`` for Llama,
    Mistral, Qwen, SmolLM). The model has ``rope_head_dim(config) // 2`` RoPE frequency pairs."""
    cfg = rope_config(config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    partial = cfg.rope_parameters.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None))
    return int(head_dim * (1.0 if partial is None else partial))


def base_rope_theta(config: Any) -> float:
    """The pre-trained RoPE base ``rope_theta``, before any base change made by :func:`apply_rope_scaling`."""
    cfg = rope_config(config)
    prov = _provenance(cfg)
    if prov is not None:
        return float(prov["base_rope_theta"])
    theta = cfg.rope_parameters.get("rope_theta", getattr(cfg, "default_theta", None))
    if theta is None:
        raise ValueError(f"model_type={_model_type(cfg)!r}: rope_parameters has no 'rope_theta'")
    return float(theta)


def original_context_length(config: Any) -> int:
    """The pre-training context ``L0``: recorded by :func:`apply_rope_scaling` if it scaled this config, else
    ``rope_parameters['original_max_position_embeddings']`` (Transformers' field for YaRN / Llama-3 /
    LongRoPE checkpoints), else ``config.max_position_embeddings``. A hub checkpoint already fine-tuned with
    linear or dynamic scaling does not record ``L0``; pass ``RopeScaling.original_max_position_embeddings``."""
    cfg = rope_config(config)
    prov = _provenance(cfg)
    if prov is not None:
        return int(prov["original_max_position_embeddings"])
    original = cfg.rope_parameters.get("original_max_position_embeddings")
    if original is None:
        original = getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings
    return int(original)


def critical_pair(head_dim: int, rope_theta: float, original_context: int) -> int:
    """Index of the first RoPE pair whose wavelength ``2 pi / theta_i = 2 pi b^(2i/d)`` exceeds the original
    context: the "critical dimension" of Liu et al. 2023, "Scaling Laws of RoPE-based Extrapolation"
    (arXiv 2310.05209), expressed as a pair index. Pairs ``>= i_c`` never complete a period during
    pre-training. Returns ``head_dim // 2`` if no pair does.

    Closed form: the smallest integer ``i > (d/2) ln(L0 / 2 pi) / ln(b)``, i.e. Liu et al.'s
    ``ceil((d/2) log_b(L0 / 2 pi))`` except exactly at equality.
    """
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim={head_dim!r} must be an even int >= 2")
    if not rope_theta > 1.0:
        raise ValueError(f"rope_theta={rope_theta!r} must be > 1")
    if not original_context > 0:
        raise ValueError(f"original_context={original_context!r} must be > 0")
    pairs = head_dim // 2
    bound = (head_dim / 2) * math.log(original_context / (2 * math.pi)) / math.log(rope_theta)
    i_c = max(0, math.floor(bound) + 1)

    # guard the floor against rounding in the logs: step to the exact first pair by direct comparison
    def exceeds(i: int) -> bool:
        return 2 * math.pi * rope_theta ** (2 * i / head_dim) > original_context

    while i_c > 0 and exceeds(i_c - 1):
        i_c -= 1
    while i_c < pairs and not exceeds(i_c):
        i_c += 1
    return min(i_c, pairs)


# --------------------------------------------------------------------------------------------------------
# The scaling configuration
# --------------------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass
class RopeScaling:
    """A RoPE scaling method and its parameters (validated on construction; errors name ``rope.<field>``).

    Attributes:
        method: a key of :data:`SCALING_METHODS`: ``none`` | ``linear`` (alias ``pi``) | ``ntk`` | ``dynamic``
            | ``yarn`` | ``llama3`` | ``longrope``; aliases are resolved to the canonical name.
        factor: the scale ``s >= 1`` (new length / original length). ``none`` requires 1. At ``s = 1``
            ``linear``, ``ntk``, ``yarn`` (without an ``attention_factor``) and ``llama3`` are the identity
            and are written as unscaled RoPE, so a factor-1 run is bit-identical to the unscaled model.
        original_max_position_embeddings: the pre-training context ``L0``; ``None`` takes it from the config
            (:func:`original_context_length`).
        max_position_embeddings: the new maximum length written to the config; ``None`` means
            ``round(factor * L0)``. Must be ``>= L0``. Not written for ``dynamic`` (see module docstring).
        attention_factor: YaRN / LongRoPE only: overrides the factor multiplying ``cos`` and ``sin``
            (default YaRN ``0.1 ln s + 1``, LongRoPE ``sqrt(1 + ln s / ln L0)``).
        beta_fast, beta_slow: YaRN only: the ramp runs from pairs that rotate ``beta_fast`` times within
            ``L0`` (kept as is) to pairs that rotate ``beta_slow`` times (interpolated by ``s``); Peng et al.'s
            ``beta`` and ``alpha`` (32 and 1 for Llama).
        low_freq_factor, high_freq_factor: Llama-3 only: pairs with wavelength ``> L0 / low_freq_factor``
            are interpolated by ``s``, those with wavelength ``< L0 / high_freq_factor`` kept, a smooth
            blend in between (Meta uses 1 and 4).
        short_factor, long_factor: LongRoPE only (required for it): per-pair rescale factors, length
            ``rotary_dim / 2``, used for sequences within / beyond ``L0`` (found by LongRoPE's search).
    """

    method: str = "none"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: list[float] | None = None
    long_factor: list[float] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ValueError(
                f"rope.method={self.method!r} must be a string, one of {sorted(SCALING_METHODS)}"
            )
        key = self.method.strip().lower()
        if key not in SCALING_METHODS:
            raise ValueError(f"rope.method={self.method!r} is not one of {sorted(SCALING_METHODS)}")
        spec = SCALING_METHODS[key]
        self.method = spec.name

        self.factor = self._positive_float("factor", self.factor)
        if self.factor < 1.0:
            raise ValueError(
                f"rope.factor={self.factor!r} must be >= 1 (a scaling method extends the context)"
            )
        if not spec.uses_factor and self.factor != 1.0:
            raise ValueError(f"rope.factor={self.factor!r} must be 1 for rope.method={self.method!r}")

        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"rope.{name}={value!r} must be a positive int or None")
        if (
            self.original_max_position_embeddings is not None
            and self.max_position_embeddings is not None
            and self.max_position_embeddings < self.original_max_position_embeddings
        ):
            raise ValueError(
                f"rope.max_position_embeddings={self.max_position_embeddings!r} must be >= "
                f"rope.original_max_position_embeddings={self.original_max_position_embeddings!r}"
            )

        if self.attention_factor is not None:
            if not spec.uses_attention_factor:
                raise ValueError(
                    f"rope.attention_factor={self.attention_factor!r} is not used by rope.method={self.method!r} "
                    f"(only by {sorted(n for n, s in SCALING_METHODS.items() if s.uses_attention_factor)})"
                )
            self.attention_factor = self._positive_float("attention_factor", self.attention_factor)

        self.beta_fast = self._positive_float("beta_fast", self.beta_fast)
        self.beta_slow = self._positive_float("beta_slow", self.beta_slow)
        if self.beta_fast <= self.beta_slow:
            raise ValueError(f"rope.beta_fast={self.beta_fast!r} must be > rope.beta_slow={self.beta_slow!r}")
        self.low_freq_factor = self._positive_float("low_freq_factor", self.low_freq_factor)
        self.high_freq_factor = self._positive_float("high_freq_factor", self.high_freq_factor)
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope.high_freq_factor={self.high_freq_factor!r} must be > "
                f"rope.low_freq_factor={self.low_freq_factor!r}"
            )

        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if spec.uses_factor_lists:
                if value is None:
                    raise ValueError(
                        f"rope.{name}=None: rope.method={self.method!r} requires a list of rotary_dim/2 floats"
                    )
                setattr(self, name, self._factor_list(name, value))
            elif value is not None:
                raise ValueError(
                    f"rope.{name} is only used by rope.method='longrope', got it for {self.method!r}"
                )

    @staticmethod
    def _positive_float(name: str, value: Any) -> float:
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"rope.{name}={value!r} must be a finite number > 0")
        return float(value)

    @staticmethod
    def _factor_list(name: str, value: Any) -> list[float]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            raise ValueError(f"rope.{name}={value!r} must be a non-empty list of numbers")
        out = []
        for x in value:
            if not _is_number(x) or not math.isfinite(x) or x <= 0:
                raise ValueError(f"rope.{name} contains {x!r}: every entry must be a finite number > 0")
            out.append(float(x))
        return out

    @property
    def spec(self) -> ScalingMethod:
        """The registry entry of :attr:`method`."""
        return SCALING_METHODS[self.method]

    @classmethod
    def for_target_length(cls, method: str, original: int, target: int, **kwargs: Any) -> RopeScaling:
        """The scaling that extends a model pre-trained on ``original`` tokens to ``target`` tokens:
        ``factor = target / original``. Targets within ``original`` need no scaling and get factor 1
        (``method='none'`` then stays ``none``). Extra keyword arguments are passed through."""
        if not isinstance(original, int) or isinstance(original, bool) or original < 1:
            raise ValueError(f"rope.original_max_position_embeddings={original!r} must be a positive int")
        if not isinstance(target, int) or isinstance(target, bool) or target < 1:
            raise ValueError(f"target={target!r} must be a positive int")
        factor = max(target / original, 1.0)
        if isinstance(method, str) and method.strip().lower() == "none":
            factor = 1.0
        return cls(
            method=method,
            factor=factor,
            original_max_position_embeddings=original,
            max_position_embeddings=max(target, original),
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of all fields (the inverse of ``RopeScaling(**d)``)."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------

RopeParametersBuilder = Callable[[RopeScaling, RopeBase], dict[str, Any]]
ReferenceFrequencies = Callable[[RopeScaling, RopeBase, "int | None"], tuple[torch.Tensor, float]]


@dataclass(frozen=True)
class ScalingMethod:
    """One registered RoPE scaling method.

    Attributes:
        name: canonical name (the ``rope.method`` value).
        rope_parameters: ``(scaling, base) -> dict`` building Transformers' ``rope_parameters`` (``rope_type``,
            ``rope_theta`` and the method's keys) from the pre-trained RoPE ``base``.
        reference: ``(scaling, base, seq_len) -> (inv_freq float64 [rotary_dim/2], attention_factor)``, the
            method's closed form from its paper (see :mod:`posheads.rope.reference`), for tests and analysis.
        source: the paper or post the method comes from.
        uses_factor: whether ``factor`` means anything (``False`` only for ``none``).
        identity_at_factor_one: at ``factor == 1`` (and no ``attention_factor``) the method is the identity
            and is written as unscaled RoPE.
        uses_attention_factor: whether ``attention_factor`` may be set.
        uses_factor_lists: whether ``short_factor`` / ``long_factor`` are required.
        keeps_original_max_length: ``config.max_position_embeddings`` stays ``L0`` (dynamic NTK).
    """

    name: str
    rope_parameters: RopeParametersBuilder
    reference: ReferenceFrequencies | None = None
    source: str = ""
    uses_factor: bool = True
    identity_at_factor_one: bool = False
    uses_attention_factor: bool = False
    uses_factor_lists: bool = False
    keeps_original_max_length: bool = False
    aliases: tuple[str, ...] = field(default=())


SCALING_METHODS: dict[str, ScalingMethod] = {}
"""Registered methods by canonical name and alias (an alias maps to the same :class:`ScalingMethod`)."""


def register_scaling_method(method: ScalingMethod, *, overwrite: bool = False) -> ScalingMethod:
    """Register ``method`` under its name and aliases; refuses to replace an entry unless ``overwrite``."""
    if not isinstance(method, ScalingMethod):
        raise TypeError(f"register_scaling_method expects a ScalingMethod, got {type(method).__name__}")
    names = [method.name, *method.aliases]
    for name in names:
        if not isinstance(name, str) or not name or name != name.strip().lower():
            raise ValueError(f"rope.method={name!r}: registered names must be non-empty lower-case strings")
        if name in SCALING_METHODS and not overwrite:
            raise ValueError(
                f"rope.method={name!r} is already registered (pass overwrite=True to replace it)"
            )
    for name in names:
        SCALING_METHODS[name] = method
    return method


def _default_parameters(theta: float) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": theta}


def _none_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    return _default_parameters(b.rope_theta)


def _none_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return ref.rope_inv_freq(b.rotary_dim, b.rope_theta), 1.0


def _linear_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    return {"rope_type": "linear", "rope_theta": b.rope_theta, "factor": s.factor}


def _linear_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return ref.linear_inv_freq(b.rotary_dim, b.rope_theta, s.factor), 1.0


def _ntk_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    if b.rotary_dim <= 2:
        raise ValueError(f"rope.method='ntk' needs a rotary dimension > 2, got {b.rotary_dim}")
    return _default_parameters(ref.ntk_base(b.rotary_dim, b.rope_theta, s.factor))


def _ntk_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    return ref.ntk_inv_freq(b.rotary_dim, b.rope_theta, s.factor), 1.0


def _dynamic_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    return {"rope_type": "dynamic", "rope_theta": b.rope_theta, "factor": s.factor}


def _dynamic_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = ref.dynamic_ntk_inv_freq(
        b.rotary_dim, b.rope_theta, s.factor, b.original_max_position_embeddings, seq_len
    )
    return inv_freq, 1.0


def _yarn_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    params: dict[str, Any] = {
        "rope_type": "yarn",
        "rope_theta": b.rope_theta,
        "factor": s.factor,
        "original_max_position_embeddings": b.original_max_position_embeddings,
        "beta_fast": s.beta_fast,
        "beta_slow": s.beta_slow,
    }
    if s.attention_factor is not None:
        params["attention_factor"] = s.attention_factor
    return params


def _yarn_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = ref.yarn_inv_freq(
        b.rotary_dim, b.rope_theta, s.factor, b.original_max_position_embeddings, s.beta_fast, s.beta_slow
    )
    attn = s.attention_factor if s.attention_factor is not None else ref.yarn_attention_factor(s.factor)
    return inv_freq, attn


def _llama3_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    return {
        "rope_type": "llama3",
        "rope_theta": b.rope_theta,
        "factor": s.factor,
        "original_max_position_embeddings": b.original_max_position_embeddings,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
    }


def _llama3_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    inv_freq = ref.llama3_inv_freq(
        b.rotary_dim,
        b.rope_theta,
        s.factor,
        b.original_max_position_embeddings,
        s.low_freq_factor,
        s.high_freq_factor,
    )
    return inv_freq, 1.0


def _longrope_params(s: RopeScaling, b: RopeBase) -> dict[str, Any]:
    pairs = b.rotary_dim // 2
    for name in ("short_factor", "long_factor"):
        values = getattr(s, name)
        if values is None or len(values) != pairs:
            raise ValueError(
                f"rope.{name} has {None if values is None else len(values)} entries; the model has "
                f"rotary_dim/2 = {pairs} RoPE pairs"
            )
    params: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": b.rope_theta,
        "factor": s.factor,
        "original_max_position_embeddings": b.original_max_position_embeddings,
        "short_factor": list(s.short_factor or []),
        "long_factor": list(s.long_factor or []),
    }
    if s.attention_factor is not None:
        params["attention_factor"] = s.attention_factor
    return params


def _longrope_ref(s: RopeScaling, b: RopeBase, seq_len: int | None) -> tuple[torch.Tensor, float]:
    long = seq_len is not None and seq_len > b.original_max_position_embeddings
    factors = s.long_factor if long else s.short_factor
    inv_freq = ref.longrope_inv_freq(b.rotary_dim, b.rope_theta, factors or [])
    attn = s.attention_factor
    if attn is None:
        attn = ref.longrope_attention_factor(s.factor, b.original_max_position_embeddings)
    return inv_freq, attn


for _method in (
    ScalingMethod(
        "none", _none_params, _none_ref, "Su et al. 2021, RoFormer (arXiv 2104.09864)", uses_factor=False
    ),
    ScalingMethod(
        "linear",
        _linear_params,
        _linear_ref,
        "Chen et al. 2023, Position Interpolation (arXiv 2306.15595); kaiokendev 2023",
        identity_at_factor_one=True,
        aliases=("pi",),
    ),
    ScalingMethod(
        "ntk",
        _ntk_params,
        _ntk_ref,
        "bloc97 2023, NTK-aware scaled RoPE (reddit r/LocalLLaMA); YaRN paper Sec. 3.1",
        identity_at_factor_one=True,
    ),
    ScalingMethod(
        "dynamic",
        _dynamic_params,
        _dynamic_ref,
        "emozilla 2023, dynamically scaled NTK RoPE (reddit r/LocalLLaMA); YaRN paper Sec. 3.3",
        keeps_original_max_length=True,
    ),
    ScalingMethod(
        "yarn",
        _yarn_params,
        _yarn_ref,
        "Peng et al. 2023, YaRN (arXiv 2309.00071)",
        identity_at_factor_one=True,
        uses_attention_factor=True,
    ),
    ScalingMethod(
        "llama3",
        _llama3_params,
        _llama3_ref,
        "Dubey et al. 2024, The Llama 3 Herd of Models (arXiv 2407.21783); Meta's apply_scaling",
        identity_at_factor_one=True,
    ),
    ScalingMethod(
        "longrope",
        _longrope_params,
        _longrope_ref,
        "Ding et al. 2024, LongRoPE (arXiv 2402.13753); attention factor as in Phi-3",
        uses_attention_factor=True,
        uses_factor_lists=True,
    ),
):
    register_scaling_method(_method)
del _method


# --------------------------------------------------------------------------------------------------------
# Writing a scaling into a config
# --------------------------------------------------------------------------------------------------------


def rope_base(config: Any, scaling: RopeScaling) -> RopeBase:
    """The pre-trained RoPE of ``config`` and the lengths ``scaling`` resolves to on it."""
    cfg = rope_config(config)
    original = scaling.original_max_position_embeddings or original_context_length(cfg)
    new_max = scaling.max_position_embeddings
    if new_max is None:
        new_max = max(round(scaling.factor * original), original)
    if new_max < original:
        raise ValueError(
            f"rope.max_position_embeddings={new_max!r} must be >= the original context {original} "
            f"(rope.original_max_position_embeddings)"
        )
    return RopeBase(
        rotary_dim=rope_head_dim(cfg),
        rope_theta=base_rope_theta(cfg),
        original_max_position_embeddings=int(original),
        max_position_embeddings=int(new_max),
    )


def rope_parameters_for(config: Any, scaling: RopeScaling) -> dict[str, Any]:
    """The ``rope_parameters`` dict that makes a model built from ``config`` use ``scaling`` (pure: the config
    is not modified). Model-describing keys (``partial_rotary_factor``, ``mrope_section``) are carried over."""
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling, got {type(scaling).__name__}")
    cfg = rope_config(config)
    base = rope_base(cfg, scaling)
    spec = scaling.spec
    if spec.identity_at_factor_one and scaling.factor == 1.0 and scaling.attention_factor in (None, 1.0):
        params = _default_parameters(base.rope_theta)
    else:
        params = spec.rope_parameters(scaling, base)
    for key in _CARRIED_KEYS:
        if key in cfg.rope_parameters and key not in params:
            params[key] = cfg.rope_parameters[key]
    return params


def apply_rope_scaling(config: Any, scaling: RopeScaling) -> Any:
    """Write ``scaling`` into ``config`` (mutated and returned): sets ``rope_parameters``,
    ``max_position_embeddings`` (``L0`` for dynamic NTK) and the provenance record, then runs Transformers'
    own ``validate_rope``. Call it before building or loading the model; for a loaded model use
    :func:`posheads.rope.apply_rope_scaling_to_model`.

    A checkpoint whose config already carries a scaling posheads did not write (e.g. Llama 3.1's ``llama3``,
    a YaRN or PI checkpoint) is never silently replaced: ``none`` keeps it, ``linear`` composes with it
    exactly (every frequency of the checkpoint divided by ``factor``, its attention factor kept: written as
    ``linear`` with the product of the factors on a ``linear`` checkpoint, else as ``longrope`` with equal
    short and long per-pair factors), and every other combination is refused with the reason (their closed
    forms are defined on unscaled frequencies, or the checkpoint's scaling depends on the sequence length).
    The checkpoint's own RoPE is recorded in the provenance, so applying another scaling later composes with
    it again instead of with the composite."""
    cfg = rope_config(config)
    if "head_dim" in vars(cfg) and cfg.head_dim is None:
        # Mixtral-style configs carry head_dim=None, which Transformers' scaled-RoPE init functions read as is
        cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
    checkpoint = _checkpoint_scaling(cfg)
    if checkpoint is not None:
        return _compose(config, cfg, scaling, *checkpoint)
    base = rope_base(cfg, scaling)
    params = rope_parameters_for(cfg, scaling)
    max_len = (
        base.original_max_position_embeddings
        if scaling.spec.keeps_original_max_length
        else base.max_position_embeddings
    )

    cfg.rope_parameters = params
    cfg.max_position_embeddings = int(max_len)
    if getattr(cfg, "original_max_position_embeddings", None) is not None:
        # Phi-3 style configs keep L0 outside rope_parameters and Transformers gives that copy priority
        cfg.original_max_position_embeddings = base.original_max_position_embeddings
    setattr(
        cfg,
        PROVENANCE_ATTRIBUTE,
        {
            "scaling": dataclasses.replace(
                scaling,
                original_max_position_embeddings=base.original_max_position_embeddings,
                max_position_embeddings=base.max_position_embeddings,
            ).to_dict(),
            "base_rope_theta": base.rope_theta,
            "original_max_position_embeddings": base.original_max_position_embeddings,
            "target_max_position_embeddings": base.max_position_embeddings,
        },
    )
    if hasattr(cfg, "validate_rope"):
        cfg.validate_rope()
    return config


def _checkpoint_scaling(cfg: Any) -> tuple[dict[str, Any], int] | None:
    """``(rope_parameters, max_position_embeddings)`` of a scaling the checkpoint itself carries, else ``None``."""
    prov = _provenance(cfg)
    if prov is not None:
        saved = prov.get("checkpoint_rope_parameters")
        return None if saved is None else (dict(saved), int(prov["checkpoint_max_position_embeddings"]))
    rp = dict(cfg.rope_parameters)
    if rp.get("rope_type", rp.get("type", "default")) == "default":
        return None
    return rp, int(cfg.max_position_embeddings)


def _compose(config: Any, cfg: Any, scaling: RopeScaling, prior: dict[str, Any], prior_max: int) -> Any:
    """Apply ``scaling`` on top of the checkpoint's own scaling ``prior`` (see :func:`apply_rope_scaling`)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    prior_type = str(prior.get("rope_type", prior.get("type")))
    l0 = int(prior.get("original_max_position_embeddings") or prior_max)
    theta = float(prior["rope_theta"])
    what = f"model_type={_model_type(cfg)!r} already carries rope_type={prior_type!r} scaling"
    if scaling.method == "none":
        params, new_max = dict(prior), prior_max
    elif scaling.method != "linear":
        raise ValueError(
            f"{what} (factor {prior.get('factor')}, context {prior_max}): rope.method={scaling.method!r} cannot be "
            "composed with it (its closed form is defined on unscaled frequencies); use rope.method='linear' "
            "(composes exactly: every frequency of the checkpoint divided by the factor) or 'none'"
        )
    elif prior_type in ("dynamic",) or (
        prior_type == "longrope" and list(prior.get("short_factor", [])) != list(prior.get("long_factor", []))
    ):
        raise ValueError(
            f"{what}, which changes with the sequence length: rope.method='linear' cannot be composed with it"
        )
    elif scaling.factor == 1.0:
        params, new_max = dict(prior), prior_max
    elif prior_type == "linear":
        params = dict(prior, factor=float(prior["factor"]) * scaling.factor)
        new_max = max(round(scaling.factor * prior_max), prior_max)
    else:
        probe = copy.deepcopy(cfg)
        probe.rope_parameters = dict(prior)
        probe.max_position_embeddings = prior_max
        inv, attention = ROPE_INIT_FUNCTIONS[prior_type](probe, None, seq_len=None)
        dim = inv.numel() * 2
        unscaled = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        factors = (unscaled / inv.double() * scaling.factor).tolist()
        new_max = max(round(scaling.factor * prior_max), prior_max)
        params = {
            "rope_type": "longrope",
            "rope_theta": theta,
            "original_max_position_embeddings": new_max,  # never switch to long_factor (they are equal)
            "short_factor": factors,
            "long_factor": factors,
            "attention_factor": float(attention),
        }
        for key in _CARRIED_KEYS:
            if key in prior:
                params[key] = prior[key]
    if scaling.max_position_embeddings is not None:
        new_max = max(new_max, int(scaling.max_position_embeddings))
    cfg.rope_parameters = params
    cfg.max_position_embeddings = int(new_max)
    setattr(
        cfg,
        PROVENANCE_ATTRIBUTE,
        {
            "scaling": dataclasses.replace(
                scaling, original_max_position_embeddings=l0, max_position_embeddings=int(new_max)
            ).to_dict(),
            "base_rope_theta": theta,
            "original_max_position_embeddings": l0,
            "target_max_position_embeddings": int(new_max),
            "checkpoint_rope_parameters": dict(prior),
            "checkpoint_max_position_embeddings": int(prior_max),
        },
    )
    if hasattr(cfg, "validate_rope"):
        cfg.validate_rope()
    return config


_ROPE_TYPE_TO_METHOD = {
    "linear": "linear",
    "dynamic": "dynamic",
    "yarn": "yarn",
    "llama3": "llama3",
    "longrope": "longrope",
}


def scaling_of(config: Any) -> RopeScaling:
    """The scaling a config carries: the one recorded by :func:`apply_rope_scaling`, or else the one read
    back from Transformers' ``rope_parameters`` (a hub checkpoint with YaRN / Llama-3 / ... scaling). A
    ``default`` rope_type reads as ``none`` (an NTK base change made elsewhere is indistinguishable from a
    pre-trained base). Raises for rope types posheads does not know."""
    cfg = rope_config(config)
    prov = _provenance(cfg)
    if prov is not None:
        return RopeScaling(**prov["scaling"])
    rp = cfg.rope_parameters
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type == "default":
        return RopeScaling(method="none")
    if rope_type not in _ROPE_TYPE_TO_METHOD:
        raise ValueError(f"rope_parameters['rope_type']={rope_type!r} has no posheads scaling method")
    original = rp.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = rp.get("factor") or cfg.max_position_embeddings / original
    kwargs: dict[str, Any] = {"method": _ROPE_TYPE_TO_METHOD[rope_type], "factor": float(factor)}
    if rope_type in ("yarn", "llama3", "longrope"):
        kwargs["original_max_position_embeddings"] = int(original)
        kwargs["max_position_embeddings"] = int(cfg.max_position_embeddings)
    for key in (
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "low_freq_factor",
        "high_freq_factor",
        "short_factor",
        "long_factor",
    ):
        if rp.get(key) is not None:
            kwargs[key] = rp[key]
    return RopeScaling(**kwargs)
