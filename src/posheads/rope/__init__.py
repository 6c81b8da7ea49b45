"""RoPE scaling methods (a registry), applied to Transformers models through ``config.rope_parameters``.

Methods: ``none``, ``linear``/``pi`` (Chen et al. 2023), ``ntk`` (bloc97 2023), ``dynamic`` (emozilla 2023),
``yarn`` (Peng et al. 2023), ``llama3`` (Dubey et al. 2024), ``longrope`` (Ding et al. 2024). See
:mod:`posheads.rope.scaling` for the fields and :mod:`posheads.rope.reference` for the closed forms.

Typical use::

    scaling = RopeScaling(method="yarn", factor=4.0)
    config = apply_rope_scaling(AutoConfig.from_pretrained(name), scaling)   # before building the model
    model = apply_rope_scaling_to_model(model, scaling)                        # or on a loaded model
    inv_freq, attention_factor = model_inverse_frequencies(model, seq_len=32768)
"""

from . import reference
from .layout import LayerRope, ModelRope, describe_rope, model_rope, verify_rope
from .model import apply_rope_scaling_to_model, model_inverse_frequencies, rotary_embedding_modules
from .scaling import (
    PROVENANCE_ATTRIBUTE,
    SCALING_METHODS,
    RopeBase,
    RopeScaling,
    ScalingMethod,
    apply_rope_scaling,
    base_rope_theta,
    critical_pair,
    original_context_length,
    register_scaling_method,
    rope_base,
    rope_config,
    rope_head_dim,
    rope_parameters_for,
    scaling_of,
)

__all__ = [
    "LayerRope",
    "ModelRope",
    "describe_rope",
    "model_rope",
    "verify_rope",
    "PROVENANCE_ATTRIBUTE",
    "SCALING_METHODS",
    "RopeBase",
    "RopeScaling",
    "ScalingMethod",
    "apply_rope_scaling",
    "apply_rope_scaling_to_model",
    "base_rope_theta",
    "critical_pair",
    "model_inverse_frequencies",
    "original_context_length",
    "reference",
    "register_scaling_method",
    "rope_base",
    "rope_config",
    "rope_head_dim",
    "rope_parameters_for",
    "rotary_embedding_modules",
    "scaling_of",
]
