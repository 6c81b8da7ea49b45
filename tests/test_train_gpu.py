"""The training step on a CUDA device (skipped without one): bf16-mixed with and without LoRA and gradient
checkpointing (SDPA, the chunked loss), the chunked loss's gradients on CUDA, and FSDP on one device (decoder
layers wrapped, a checkpoint saved and loaded back exactly)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from train_helpers import TINY_SPEC  # noqa: E402

from posheads.data import CorpusConfig  # noqa: E402
from posheads.lit import LengthExtensionDataModule, LengthExtensionModule, OptimConfig  # noqa: E402
from posheads.lit.loss import chunked_causal_lm_loss  # noqa: E402
from posheads.models import LoraSettings, ModelConfig, TinySpec, load_model  # noqa: E402
from posheads.rope import RopeScaling  # noqa: E402

pytestmark = pytest.mark.gpu

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _module(lora: bool, checkpointing: bool) -> LengthExtensionModule:
    return LengthExtensionModule(
        64,
        lm=ModelConfig(
            name_or_path="tiny",
            tiny=TinySpec(**TINY_SPEC),
            lora=LORA if lora else None,
            gradient_checkpointing=checkpointing,
        ),
        rope=RopeScaling(method="yarn", factor=2.0),
        optim=OptimConfig(lr=3e-3, total_steps=4),
        loss_chunk_size=48,
        chunked_loss_from=0,  # the chunked loss, as at long lengths
    )


def _data() -> LengthExtensionDataModule:
    return LengthExtensionDataModule(
        CorpusConfig(kind="pydoc", max_documents=20), batch_size=2, val_windows=2, cache_dir=""
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_bf16_mixed_training_step_on_cuda(tmp_path, lora, checkpointing):
    module = _module(lora, checkpointing)
    assert module.model.is_gradient_checkpointing == checkpointing
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=4,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        val_check_interval=4,
        default_root_dir=tmp_path,
    )
    before = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=_data())
    assert trainer.global_step == 4
    assert next(module.model.parameters()).device.type == "cuda"
    assert module.model.config._attn_implementation == "sdpa"
    changed = [
        n
        for n, p in module.named_parameters()
        if p.requires_grad and not torch.equal(before[n].cpu(), p.cpu())
    ]
    assert len(changed) == len(before)  # every trainable tensor moved (LoRA: only the adapters are trainable)
    if lora:
        assert all("lora_" in n for n in before)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(trainer.callback_metrics["val/ppl_64"]))
    assert math.isfinite(float(trainer.callback_metrics["train/grad_norm"]))


def test_chunked_loss_gradients_on_cuda_under_bf16_autocast():
    model = load_model(ModelConfig(name_or_path="tiny", tiny=TinySpec(**TINY_SPEC))).cuda().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 96), generator=g).cuda()
    labels = ids.clone()
    labels[1, -10:] = -100

    def grads(fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn()
        loss.backward()
        return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters()}

    ref_loss, ref = grads(lambda: model(input_ids=ids, labels=labels, use_cache=False).loss)
    got_loss, got = grads(lambda: chunked_causal_lm_loss(model, ids, labels, 40))
    assert got_loss == pytest.approx(ref_loss, rel=2e-3)
    for name, g_ref in ref.items():
        scale = float(g_ref.abs().max())
        torch.testing.assert_close(got[name], g_ref, rtol=0.05, atol=0.02 * scale + 1e-8, msg=name)


def test_fsdp_one_device_wraps_decoder_layers_and_checkpoints_round_trip(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def trainer(steps: int, callbacks=()) -> L.Trainer:
        return L.Trainer(
            accelerator="gpu",
            devices=1,
            strategy=FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full"),
            precision="bf16-mixed",
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
        )

    L.seed_everything(0, verbose=False)
    module = _module(lora=False, checkpointing=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    first = trainer(2, [ckpt])
    first.fit(module, datamodule=_data())
    wrapped = [m for m in first.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
    layers = [m for m in wrapped if isinstance(m.module, LlamaDecoderLayer)]
    assert len(layers) == TINY_SPEC["num_layers"]  # one FSDP unit per decoder layer (+ the root)
    assert len(wrapped) == TINY_SPEC["num_layers"] + 1
    last = tmp_path / "ckpt" / "last.ckpt"
    assert last.is_file()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    weights = {k: v.float() for k, v in saved["state_dict"].items()}
    assert saved["global_step"] == 2 and weights

    # a fresh module resumed from the checkpoint starts from exactly those weights and trains on
    L.seed_everything(0, verbose=False)
    again = _module(lora=False, checkpointing=True)
    loaded: dict[str, torch.Tensor] = {}

    class Grab(L.Callback):
        def on_train_start(self, trainer, pl_module):
            with FullyShardedDataParallel.summon_full_params(trainer.strategy.model, writeback=False):
                loaded.update(
                    {k: v.detach().float().cpu().clone() for k, v in pl_module.state_dict().items()}
                )

    second = trainer(3, [Grab()])
    second.fit(again, datamodule=_data(), ckpt_path=str(last))
    assert second.global_step == 3
    common = sorted(set(weights) & set(loaded))
    assert len(common) == len(weights)
    for key in common:
        torch.testing.assert_close(loaded[key], weights[key], rtol=0, atol=0, msg=key)
