"""The LightningModule of a length-extension run: a Hugging Face causal LM with a RoPE scaling, trained at the
target length, validated at the original and the target length.

What it does
------------
* ``configure_model`` loads the model with :func:`posheads.models.load_model` (hub id, local directory, GGUF,
  the offline SmolLM2, or the tiny test Llama), applies the RoPE scaling (:mod:`posheads.rope`: PI, NTK,
  dynamic NTK, YaRN, Llama-3, LongRoPE), optionally wraps it with LoRA (``lm.lora``) and enables gradient
  checkpointing (``lm.gradient_checkpointing``). Attention runs through SDPA (or flash attention); ``eager``
  materialises the ``L x L`` attention matrix of every layer at the target length, so it is refused for
  models that support SDPA and accepted, with a warning that gives the memory it needs at the target length
  (:func:`eager_attention_bytes`), only for models Transformers refuses SDPA for (Gemma 2: SDPA cannot
  soft-cap attention logits). Loading such a model with SDPA fails with a message saying so.
* ``training_step``: next-token cross-entropy on packed sequences of ``target_length`` tokens. From
  ``chunked_loss_from`` tokens per batch (default 4096) the loss is computed ``loss_chunk_size`` positions at a
  time from the final hidden states (:func:`posheads.lit.loss.chunked_causal_lm_loss`), never holding the
  ``[tokens, vocab]`` float32 logits (6.4 GB for SmolLM2 at 32k tokens); loss and gradients equal the plain
  loss's. Models whose output head is not a plain linear layer (adapter on ``lm_head``, logit soft-capping)
  use the plain loss.
* ``configure_optimizers``: AdamW with warm-up and a cosine / linear / constant schedule
  (:class:`~posheads.lit.config.OptimConfig`); accumulation, clipping and mixed precision are Trainer options
  (``trainer.accumulate_grad_batches``, ``trainer.gradient_clip_val``, ``trainer.precision: bf16-mixed``).
* Validation: NLL and perplexity at every evaluation length (torchmetrics, summed over ranks).

Logged keys
-----------
``train/loss`` (mean next-token NLL of the step's batch), ``train/tokens`` (tokens trained on, all ranks),
``train/tokens_per_sec`` (wall-clock, all ranks, between consecutive batches), ``train/grad_norm`` (global L2
norm before clipping; not under FSDP), ``lr`` (the learning rate of the step);
``val/nll_<L>`` and ``val/ppl_<L>`` for every validation length ``L``, and ``val/nll`` / ``val/ppl`` at the
target length.

For callbacks (e.g. Positional-Head tracking)
--------------------------------------------
``module.model`` (the Transformers model, possibly peft-wrapped; :func:`posheads.models.base_model` unwraps it),
``module.tokenizer``, ``module.target_length``, ``module.original_length``, ``module.eval_lengths``,
``module.rope`` (the :class:`~posheads.rope.RopeScaling` applied, or ``None``), and
:meth:`LengthExtensionModule.evaluate_windows` / :meth:`LengthExtensionModule.validation_perplexity`, which compute
perplexity from any hook on every rank (all ranks must call them together).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from posheads.errors import ConfigError
from posheads.lit.config import OptimConfig
from posheads.lit.loss import chunked_causal_lm_loss, chunked_loss_supported
from posheads.lit.metrics import IGNORE_INDEX, NLLSum, TokenNLL, causal_nll_sum
from posheads.lit.optim import build_optimizer, build_scheduler
from posheads.models import ModelConfig, load_model, load_tokenizer
from posheads.rope import RopeScaling, original_context_length

log = logging.getLogger(__name__)

__all__ = ["LengthExtensionModule"]


def _as(cls: type, value: Any) -> Any:
    """Accept a dataclass or its dict form (``load_from_checkpoint`` passes the saved dicts back)."""
    return cls(**value) if isinstance(value, dict) else value


def eager_attention_bytes(model: Any, length: int, batch_size: int = 1) -> int:
    """Bytes of attention weights that eager attention keeps for the backward pass of one forward:
    ``layers x heads x L^2 x batch`` in the model's dtype, twice (pre- and post-softmax tensors)."""
    config = model.config
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    param = next(model.parameters())
    layers, heads = int(text.num_hidden_layers), int(text.num_attention_heads)
    return 2 * layers * heads * length * length * batch_size * param.element_size()


def check_eager_training(model: Any, length: int) -> None:
    """Eager attention for training: refused when the model supports SDPA (it would materialise the
    ``L x L`` weights for nothing); accepted with a memory warning when Transformers refuses SDPA for it."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    mt = getattr(base.config, "model_type", type(base).__name__)
    if getattr(type(base), "_supports_sdpa", True):
        raise ValueError(
            f"model.lm.attn_implementation='eager' materialises the L x L attention matrix at the target length "
            f"and model_type={mt!r} supports SDPA: train with 'sdpa' (default) or 'flash_attention_2'"
        )
    gib = eager_attention_bytes(base, length) / 2**30
    rank_zero_warn(
        f"model_type={mt!r} trains with eager attention (Transformers refuses SDPA for it): at "
        f"model.target_length={length} its attention weights take about {gib:.2f} GiB per sequence of the batch "
        "for the backward pass (2 x layers x heads x L^2 x dtype bytes), on top of the activations"
    )


class LengthExtensionModule(L.LightningModule):
    """Fine-tune a RoPE causal LM for a longer context (full or LoRA).

    Args:
        target_length: the context length to train at (tokens per training sequence; the data module's
            ``seq_len`` defaults to it).
        lm: which model to load and how (``posheads.models.ModelConfig``): ``name_or_path`` (hub id, local
            directory, ``.gguf``, ``smollm2``, ``tiny``), ``dtype``, ``attn_implementation`` (sdpa |
            flash_attention_2 | ...; never eager), ``lora`` (null = full fine-tuning),
            ``gradient_checkpointing``, ``tiny`` (shape of the tiny test model).
        rope: the RoPE scaling to apply (``posheads.rope.RopeScaling``: ``method`` none | linear/pi | ntk |
            dynamic | yarn | llama3 | longrope, ``factor``, ``original_max_position_embeddings``, ...);
            ``null`` keeps the model's own RoPE.
        original_length: the pre-trained context length ``L0`` used for validation; ``null`` = read from the
            model config (:func:`posheads.rope.original_context_length`).
        optim: AdamW and learning-rate schedule (:class:`~posheads.lit.config.OptimConfig`).
        extra_eval_lengths: validate at these lengths too (besides the original and the target length).
        log_grad_norm: log ``train/grad_norm`` (global gradient norm before clipping).
        loss_chunk_size: positions per block of the chunked training loss; ``null`` = always the plain loss
            (full logits).
        chunked_loss_from: use the chunked loss when a training batch has at least this many tokens
            (``batch_size x target_length``; 0 = always). Below it the plain loss is used (its full logits are
            small there).
    """

    def __init__(
        self,
        target_length: int,
        lm: ModelConfig = ModelConfig(),  # noqa: B008 - a frozen default, never mutated
        rope: RopeScaling | None = None,
        original_length: int | None = None,
        optim: OptimConfig = OptimConfig(),  # noqa: B008
        extra_eval_lengths: list[int] | None = None,
        log_grad_norm: bool = True,
        loss_chunk_size: int | None = 1024,
        chunked_loss_from: int = 4096,
    ):
        super().__init__()
        self.lm: ModelConfig = _as(ModelConfig, lm) or ModelConfig()
        self.rope: RopeScaling | None = _as(RopeScaling, rope)
        self.optim: OptimConfig = _as(OptimConfig, optim) or OptimConfig()
        for name, value in (("target_length", target_length), ("original_length", original_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ValueError(f"model.{name}={value!r} must be an int >= 2")
        self.target_length = int(target_length)
        self._original_length = original_length
        self.extra_eval_lengths = sorted({int(n) for n in extra_eval_lengths or []})
        if any(n < 2 for n in self.extra_eval_lengths):
            raise ValueError(f"model.extra_eval_lengths={extra_eval_lengths!r} must be lengths >= 2")
        self.log_grad_norm = log_grad_norm
        if loss_chunk_size is not None and (
            isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1
        ):
            raise ValueError(f"model.loss_chunk_size={loss_chunk_size!r} must be an int >= 1 or null")
        if (
            isinstance(chunked_loss_from, bool)
            or not isinstance(chunked_loss_from, int)
            or chunked_loss_from < 0
        ):
            raise ValueError(f"model.chunked_loss_from={chunked_loss_from!r} must be an int >= 0")
        self.loss_chunk_size = loss_chunk_size
        self.chunked_loss_from = chunked_loss_from
        self._chunked_supported: bool | None = None
        # LoRA checkpoints hold only the adapters: the frozen base weights come from lm.name_or_path again
        self.strict_loading = self.lm.lora is None

        self.save_hyperparameters(
            {
                "target_length": self.target_length,
                "lm": dataclasses.asdict(self.lm),
                "rope": None if self.rope is None else self.rope.to_dict(),
                "original_length": original_length,
                "optim": dataclasses.asdict(self.optim),
                "extra_eval_lengths": self.extra_eval_lengths,
                "log_grad_norm": log_grad_norm,
                "loss_chunk_size": loss_chunk_size,
                "chunked_loss_from": chunked_loss_from,
            }
        )
        self.val_nll = nn.ModuleDict()  # str(length) -> TokenNLL, created on first use
        self._tokenizer: Any = None
        self._tokens_seen = 0
        self._last_batch_end: float | None = None

    # ------------------------------------------------------------------------------------ the model

    def configure_model(self) -> None:
        """Load the model (once): ``load_model(lm, rope=rope)``; Lightning calls this inside the strategy's
        initialisation context, and :attr:`model` calls it on first access outside a Trainer."""
        if self._modules.get("model") is not None:
            return
        try:
            model = load_model(self.lm, rope=self.rope)
        except ValueError as err:
            if "scaled_dot_product_attention" not in str(err):
                raise
            raise ValueError(
                f"model.lm.attn_implementation={self.lm.attn_implementation!r}: Transformers refuses SDPA for "
                f"model {self.lm.name_or_path!r} (e.g. Gemma 2: SDPA cannot soft-cap attention logits); set "
                "model.lm.attn_implementation='eager' (it holds every layer's L x L attention weights for the "
                "backward pass: a memory warning gives the size at model.target_length) or 'flash_attention_2'"
            ) from None
        impl = getattr(model.config, "_attn_implementation", None)
        if impl == "eager":
            check_eager_training(model, self.target_length)
        model.train()  # load_model returns eval mode; Lightning switches modes for validation itself
        # registered as the submodule "model" (state_dict keys "model.<hf keys>") by nn.Module.__setattr__
        self.model = model  # type: ignore[misc]
        self._check_lengths()

    @property
    def model(self) -> Any:
        """The Transformers causal LM (peft ``PeftModel`` for LoRA runs), loaded on first access."""
        if self._modules.get("model") is None:
            self.configure_model()
        return self._modules["model"]

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (``posheads.models.load_tokenizer(lm)``)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.lm)
        return self._tokenizer

    @property
    def is_lora(self) -> bool:
        return self.lm.lora is not None

    @property
    def original_length(self) -> int:
        """The pre-trained context ``L0`` (``original_length`` or the model config's)."""
        if self._original_length is not None:
            return int(self._original_length)
        return int(original_context_length(self.model.config))

    @property
    def eval_lengths(self) -> list[int]:
        """Validation lengths: the original and the target length, plus ``extra_eval_lengths``."""
        return sorted({self.original_length, self.target_length, *self.extra_eval_lengths})

    def _check_lengths(self) -> None:
        config = self.model.config
        l0 = self.original_length
        if self.rope is None or self.rope.method == "none":
            if self.target_length > l0:
                rank_zero_warn(
                    f"model.target_length={self.target_length} exceeds the pre-trained context {l0} and no RoPE "
                    "scaling is set (model.rope): fine-tuning with the unscaled RoPE"
                )
            return
        scaled = int(getattr(config, "max_position_embeddings", 0) or 0)
        if self.rope.method != "dynamic" and scaled and self.target_length > scaled:
            rank_zero_warn(
                f"model.target_length={self.target_length} exceeds the scaled context {scaled} of "
                f"model.rope (method={self.rope.method!r}, factor={self.rope.factor}): raise rope.factor"
            )

    def describe(self) -> dict[str, Any]:
        """Model and scaling, for result protocols."""
        rope = "none (model's own RoPE)"
        if self.rope is not None and self.rope.method != "none":
            rope = f"{self.rope.method} x{self.rope.factor:g}"
        return {
            "model": self.lm.describe(),
            "finetuning": f"lora(r={self.lm.lora.r}, alpha={self.lm.lora.alpha:g})"
            if self.lm.lora
            else "full",
            "rope_scaling": rope,
            "original_length": self.original_length,
            "target_length": self.target_length,
            "dtype": self.lm.dtype,
            "attn_implementation": self.lm.attn_implementation,
        }

    # ------------------------------------------------------------------------------------ forward / loss

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """The causal LM's output for ``input_ids`` ``[B, L]`` (with ``.loss`` when ``labels`` are given)."""
        return self.model(input_ids=input_ids, labels=labels, use_cache=False)

    def nll_sum(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL over the tokens where ``labels != -100``, and their count."""
        logits = self(input_ids).logits  # [B, L, V]
        return causal_nll_sum(logits, labels)

    def uses_chunked_loss(self, input_ids: torch.Tensor) -> bool:
        """Whether :meth:`training_loss` computes the loss of this ``[B, L]`` batch in chunks."""
        if self.loss_chunk_size is None or input_ids.numel() < self.chunked_loss_from:
            return False
        if self._chunked_supported is None:
            self._chunked_supported = chunked_loss_supported(self.model)
            if not self._chunked_supported:
                rank_zero_warn(
                    f"model {self.lm.name_or_path!r}: the output head is not a plain linear layer (or the logits "
                    "are soft-capped / scaled); training with the plain loss (full logits)"
                )
        return self._chunked_supported

    def training_loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token NLL over the positions with ``labels != -100`` (the Hugging Face loss), chunked
        from ``chunked_loss_from`` tokens per batch (same value and gradients, no full logits)."""
        if self.uses_chunked_loss(input_ids):
            return chunked_causal_lm_loss(self.model, input_ids, labels, int(self.loss_chunk_size))  # type: ignore[arg-type]
        return self(input_ids, labels=labels).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        input_ids = batch["input_ids"]  # [B, target_length]
        loss = self.training_loss(input_ids, input_ids)  # mean over B * (L - 1) predictions
        # counted here, not in on_train_batch_end: checkpoint callbacks run before the module's batch-end hook
        self._tokens_seen += input_ids.numel() * self.trainer.world_size
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/tokens", float(self._tokens_seen), on_step=True, on_epoch=False)
        optimizers = self.trainer.optimizers
        if optimizers:  # the learning rate this step uses (both weight-decay groups share it)
            self.log("lr", float(optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False)
        return loss

    def on_train_start(self) -> None:
        self._last_batch_end = None

    def on_train_batch_end(self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        tokens = batch["input_ids"].numel() * self.trainer.world_size
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.log(
                "train/tokens_per_sec",
                tokens / max(now - self._last_batch_end, 1e-9),
                on_step=True,
                on_epoch=False,
            )
        self._last_batch_end = now

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.log_grad_norm or self._sharded():
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            self.log(
                "train/grad_norm",
                torch.nn.utils.get_total_norm(grads, norm_type=2.0),
                on_step=True,
                on_epoch=False,
            )

    def _sharded(self) -> bool:
        trainer = self._trainer
        return trainer is not None and type(trainer.strategy).__name__ in (
            "FSDPStrategy",
            "ModelParallelStrategy",
            "DeepSpeedStrategy",
        )

    # ------------------------------------------------------------------------------------ validation

    def _metric(self, length: int) -> TokenNLL:
        key = str(int(length))
        if key not in self.val_nll:
            self.val_nll[key] = TokenNLL().to(self.device)
        return self.val_nll[key]  # type: ignore[return-value]

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        input_ids = batch["input_ids"]  # [B, L]
        scored = batch["scored"].bool()  # [B]; False for padding windows (equal batch counts on all ranks)
        labels = input_ids.masked_fill(~scored[:, None], IGNORE_INDEX)  # [B, L]
        nll, n = self.nll_sum(input_ids, labels)
        self._metric(input_ids.shape[1]).update(nll, n, scored.sum())

    def on_validation_epoch_end(self) -> None:
        target = str(self.target_length)
        for key in sorted(self.val_nll.keys(), key=int):
            metric: TokenNLL = self.val_nll[key]  # type: ignore[assignment]
            if not metric.update_called:
                continue
            nll = metric.compute()  # summed over ranks
            self.log(f"val/nll_{key}", nll.float(), sync_dist=False)
            self.log(f"val/ppl_{key}", nll.exp().float(), sync_dist=False)
            if key == target:
                self.log("val/nll", nll.float(), sync_dist=False)
                self.log("val/ppl", nll.exp().float(), sync_dist=False, prog_bar=True)
            metric.reset()

    # ------------------------------------------------------------------------------------ evaluation API

    def _call(self, method: str, *args: Any) -> Any:
        """Call ``self.<method>(*args)`` through the strategy's wrapped model (DDP / FSDP), as Lightning's loops
        do, so that sharded parameters are gathered; directly when not attached to a Trainer."""
        trainer = self._trainer
        if trainer is not None:
            strategy = trainer.strategy
            wrapped = strategy.model
            if wrapped is not None and wrapped is not self:
                return strategy._forward_redirection(wrapped, self, method, *args)
        return getattr(self, method)(*args)

    @torch.no_grad()
    def evaluate_windows(self, input_ids: torch.Tensor, batch_size: int = 1) -> NLLSum:
        """Summed NLL of ``input_ids`` ``[N, L]`` (every token after the first of each window scored).

        Under a distributed strategy every rank must call it with the same windows: each scores its share and
        the sums are reduced, so every rank returns the totals. Mixed-precision autocast is applied as in
        validation; the module's train / eval modes are restored afterwards.
        """
        from posheads.lit.datamodule import ShardedWindows

        trainer = self._trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shard = ShardedWindows(input_ids, rank, world)
        modes = {m: m.training for m in self.modules()}
        self.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # nll_sum, tokens, windows
        try:
            for start in range(0, len(shard), batch_size):
                items = [shard[i] for i in range(start, min(start + batch_size, len(shard)))]
                ids = torch.stack([it["input_ids"] for it in items]).to(self.device)  # [b, L]
                scored = torch.tensor([it["scored"] for it in items], device=self.device)  # [b]
                labels = ids.masked_fill(~scored[:, None], IGNORE_INDEX)  # [b, L]
                context = (
                    trainer.strategy.precision_plugin.val_step_context()
                    if trainer is not None
                    else contextlib.nullcontext()
                )
                with context:  # autocast as in validation (a fresh context manager per batch)
                    nll, n = self._call("nll_sum", ids, labels)
                totals += torch.stack([nll.double(), n.double(), scored.sum().double()])
        finally:
            for m, training in modes.items():
                m.train(training)
        if trainer is not None and world > 1:
            totals = trainer.strategy.reduce(totals, reduce_op="sum")
        return NLLSum(float(totals[0]), int(totals[1]), int(totals[2]))

    def validation_perplexity(
        self, lengths: list[int] | None = None, batch_size: int | None = None
    ) -> dict[int, NLLSum]:
        """NLL / perplexity on the data module's validation windows (all lengths, or ``lengths``), callable from
        any hook during fitting (all ranks together)."""
        datamodule: Any = cast(Any, self.trainer).datamodule
        sets = datamodule.validation_sets()
        out = {}
        for length in sorted(sets if lengths is None else lengths):
            if length not in sets:
                raise ValueError(
                    f"length {length} has no validation set; validation lengths are {sorted(sets)}"
                )
            bs = batch_size or datamodule._val_batch(length)
            out[length] = self.evaluate_windows(sets[length].input_ids, batch_size=bs)
        return out

    # ------------------------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        optim = self.optim
        if optim.fused is None and "mixed" in str(self.trainer.precision):
            # Lightning's mixed-precision plugin refuses gradient clipping with a fused optimizer
            optim = dataclasses.replace(optim, fused=False)
        optimizer = build_optimizer(self.named_parameters(), optim)
        total = self.optim.total_steps
        if total is None:
            estimate = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimate) or estimate < 1:
                raise ConfigError(
                    "model.optim.total_steps",
                    None,
                    f"is unset and the trainer's step estimate is {estimate}: the schedule needs a length",
                    hint="set trainer.max_steps >= 1 (or model.optim.total_steps)",
                )
            total = int(estimate)
        scheduler = build_scheduler(optimizer, self.optim, total)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    # ------------------------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["posheads"] = {"tokens_seen": int(self._tokens_seen), "lora": self.is_lora}
        state = checkpoint.get("state_dict")
        if self.is_lora and isinstance(state, dict):
            trainable = {name for name, p in self.named_parameters() if p.requires_grad}
            if trainable & state.keys():
                checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._tokens_seen = int(checkpoint.get("posheads", {}).get("tokens_seen", 0))
