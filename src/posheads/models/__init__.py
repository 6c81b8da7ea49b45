"""Model loading: hub ids, local directories, GGUF, the offline SmolLM2 default, tiny test models, LoRA."""

from posheads.models.loading import (
    SMOLLM2,
    TINY,
    TINY_VOCAB_SIZE,
    LoraSettings,
    ModelConfig,
    ModelLoadError,
    TinySpec,
    apply_lora,
    base_model,
    cache_root,
    decoder_layers,
    load_model,
    load_tokenizer,
    smollm2_package_dir,
    tiny_llama,
    tiny_tokenizer,
)

__all__ = [
    "SMOLLM2",
    "TINY",
    "TINY_VOCAB_SIZE",
    "LoraSettings",
    "ModelConfig",
    "ModelLoadError",
    "TinySpec",
    "apply_lora",
    "base_model",
    "cache_root",
    "decoder_layers",
    "load_model",
    "load_tokenizer",
    "smollm2_package_dir",
    "tiny_llama",
    "tiny_tokenizer",
]
