"""Pieces of the training layer, without a Trainer: schedule, optimiser groups, resumable data order,
validation windows, the NLL metric, LoRA merging and export, W&B mode resolution, config validation."""

from __future__ import annotations

import math

import pytest
import torch

from posheads.data import TokenizedDocument
from posheads.lit.config import CheckpointConfig, ExportConfig, OptimConfig, RunConfig, WandbConfig
from posheads.lit.datamodule import (
    LengthExtensionDataModule,
    ResumableDataLoader,
    ResumableSampler,
    ShardedWindows,
    TokenRows,
    build_validation_sets,
)
from posheads.lit.export import export_pretrained, lora_layers, merge_lora_state_dict
from posheads.lit.loggers import resolve_wandb_mode, wandb_environment
from posheads.lit.metrics import IGNORE_INDEX, TokenNLL, causal_nll_sum
from posheads.lit.module import LengthExtensionModule
from posheads.lit.optim import LRSchedule, build_optimizer, decays
from posheads.models import LoraSettings, ModelConfig, TinySpec, load_model
from posheads.rope import RopeScaling

SMALL = TinySpec(
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=32
)

# ----------------------------------------------------------------------------------------- schedule


def test_lr_schedule_warmup_cosine_linear_constant():
    cos = LRSchedule(warmup_steps=4, total_steps=14, schedule="cosine", min_lr_ratio=0.1)
    assert [cos(t) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cos(4) == pytest.approx(1.0)
    assert cos(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))  # half-way: 0.55
    assert cos(14) == pytest.approx(0.1) and cos(100) == pytest.approx(0.1)
    lin = LRSchedule(warmup_steps=0, total_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert [lin(t) for t in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert LRSchedule(2, 10, "constant")(7) == 1.0


def test_lr_scheduler_state_roundtrips_through_weights_only_load(tmp_path):
    from posheads.lit.optim import build_scheduler

    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, warmup_steps=2, total_steps=10), total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)  # plain numbers only
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1.0)
    sched2 = build_scheduler(opt2, OptimConfig(lr=1.0, warmup_steps=5, total_steps=99), total_steps=99)
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[0] == sched.lr_lambdas[0]
    assert sched2.last_epoch == 3


def test_weight_decay_groups_by_name():
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SMALL))
    names = {n: decays(n) for n, _ in model.named_parameters()}
    assert names["model.layers.0.self_attn.q_proj.weight"] and names["lm_head.weight"]
    assert not names["model.layers.0.input_layernorm.weight"] and not names["model.norm.weight"]
    opt = build_optimizer(model.named_parameters(), OptimConfig(lr=1e-3, weight_decay=0.1))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize(
    ("cls", "kwargs", "needle"),
    [
        (OptimConfig, {"lr": 0.0}, "optim.lr=0.0"),
        (OptimConfig, {"schedule": "step"}, "optim.schedule='step'"),
        (OptimConfig, {"betas": (0.9, 1.5)}, "optim.betas"),
        (OptimConfig, {"min_lr_ratio": 2.0}, "optim.min_lr_ratio=2.0"),
        (RunConfig, {"name": "a/b"}, "run.name='a/b'"),
        (WandbConfig, {"mode": "cloud"}, "wandb.mode='cloud'"),
        (CheckpointConfig, {"mode": "best"}, "checkpoint.mode='best'"),
        (ExportConfig, {"dtype": "int8"}, "export.dtype='int8'"),
    ],
)
def test_config_errors_name_the_option(cls, kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cls(**kwargs)


def test_module_refuses_eager_attention_and_bad_lengths():
    # eager is refused for a model that supports SDPA (the tiny Llama), when the model is loaded
    with pytest.raises(ValueError, match="attn_implementation='eager'.*supports SDPA"):
        LengthExtensionModule(
            64, lm=ModelConfig(name_or_path="tiny", attn_implementation="eager")
        ).configure_model()
    with pytest.raises(ValueError, match="model.target_length=1"):
        LengthExtensionModule(1, lm=ModelConfig(name_or_path="tiny"))


def test_module_lengths_come_from_the_model_config():
    module = LengthExtensionModule(
        96, lm=ModelConfig(name_or_path="tiny", tiny=SMALL), rope=RopeScaling(method="yarn", factor=3.0)
    )
    assert module.original_length == 32  # L0 recorded by the scaling, not the scaled max_position_embeddings
    assert module.model.config.max_position_embeddings == 96
    assert module.eval_lengths == [32, 96]
    assert module.model.config.rope_parameters["rope_type"] == "yarn"


# ----------------------------------------------------------------------------------------- data order


def test_resumable_sampler_shards_and_skips():
    full = ResumableSampler(10, shuffle=True, seed=3)
    order = list(full)
    assert sorted(order) == list(range(10)) and order == list(ResumableSampler(10, True, 3))
    full.set_epoch(1)
    assert list(full) != order  # a new permutation per epoch
    ranks = [ResumableSampler(10, True, 3, rank=r, world_size=3) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert all(len(s) == 3 for s in shares) and len(set(sum(shares, []))) == 9  # disjoint, 10 // 3 each
    s = ResumableSampler(10, True, 3)
    s.skip(4)
    assert list(s) == order[4:] and list(s) == order  # skipping applies once


def test_resumable_loader_restores_the_position():
    rows = torch.arange(40).reshape(20, 2)  # [20, 2]
    make = lambda: ResumableDataLoader(TokenRows(rows), 3, ResumableSampler(20, True, 0))  # noqa: E731
    reference = [b["input_ids"] for b in make()]
    loader = make()
    it = iter(loader)
    seen = [next(it)["input_ids"] for _ in range(2)]
    state = loader.state_dict()
    assert state["batches_yielded"] == 2 and state["epoch"] == 0
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(reference) - 2
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, reference))
    assert len([b for b in resumed]) == len(reference)  # the next epoch starts from its first batch


def test_resumable_loader_ignores_a_state_for_different_data(caplog):
    loader = ResumableDataLoader(TokenRows(torch.zeros(20, 2, dtype=torch.long)), 2, ResumableSampler(20))
    loader.load_state_dict(
        {"epoch": 0, "batches_yielded": 3, "num_rows": 21, "batch_size": 2, "world_size": 1, "seed": 0}
    )
    assert len(list(loader)) == 10
    assert "cannot be restored" in caplog.text


# ----------------------------------------------------------------------------------------- validation windows


def test_training_order_follows_seed_everything_unless_shuffle_seed_is_set(monkeypatch):
    """``data.shuffle_seed: null`` takes the run's ``seed_everything``, so seeds of one config differ in order."""
    import lightning as L

    def order(seed_everything: int, **kwargs) -> list[int]:
        L.seed_everything(seed_everything, verbose=False)
        dm = LengthExtensionDataModule(**kwargs)
        dm.train_rows = torch.zeros(64, 8, dtype=torch.long)
        return list(iter(dm.train_dataloader().sampler))

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert order(0) == list(ResumableSampler(64, True, 0))
    assert order(1) == list(ResumableSampler(64, True, 1)) != order(0)
    assert order(1, shuffle_seed=0) == order(0) == order(5, shuffle_seed=0)
    with pytest.raises(ValueError, match="data.shuffle_seed=-1"):
        LengthExtensionDataModule(shuffle_seed=-1)


def _docs(*lengths: int) -> list[TokenizedDocument]:
    return [TokenizedDocument(f"d{i}", torch.arange(n) + 1000 * i) for i, n in enumerate(lengths)]


def test_validation_sets_score_the_same_text_at_every_length():
    docs = _docs(300, 50, 130, 128)
    sets = build_validation_sets(docs, [32, 128, 64], max_windows=3)
    assert build_validation_sets(docs, [128], max_windows=4)[128].window_docs == ["d0", "d0", "d2", "d3"]
    assert sorted(sets) == [32, 64, 128]
    assert sets[128].n_windows == 3 and sets[64].n_windows == 6 and sets[32].n_windows == 12
    for length in (32, 64):  # the short windows tile the long ones exactly
        assert torch.equal(sets[length].input_ids.reshape(-1), sets[128].input_ids.reshape(-1))
    assert sets[128].documents == ["d0", "d2", "d3"]  # d1 is too short; one window from each of the others
    assert sets[32].n_scored_tokens == 12 * 31
    with pytest.raises(ValueError, match="min_tokens=1000"):
        build_validation_sets(docs, [1000], None)


def test_sharded_windows_pad_ranks_to_equal_counts():
    ids = torch.arange(5).reshape(5, 1).expand(5, 4)  # [5, 4]
    shards = [ShardedWindows(ids, r, 2) for r in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    scored = [s[i]["input_ids"][0].item() for s in shards for i in range(3) if s[i]["scored"]]
    assert sorted(scored) == [0, 1, 2, 3, 4]
    assert [s[i]["scored"] for s in shards for i in range(3)].count(False) == 1


# ----------------------------------------------------------------------------------------- metric


def test_token_nll_matches_the_models_own_loss():
    model = load_model(ModelConfig(name_or_path="tiny", tiny=SMALL))
    ids = torch.randint(0, 256, (3, 20))  # [3, 20]
    labels = ids.clone()
    labels[1] = IGNORE_INDEX  # one window not scored
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        nll, n = causal_nll_sum(out.logits, labels)
    assert int(n) == 2 * 19
    assert float(nll / n) == pytest.approx(float(out.loss), rel=1e-5)
    metric = TokenNLL()
    metric.update(nll[None][0] * 0.5, n // 2)
    metric.update(nll * 0.5, n - n // 2)
    assert float(metric.compute()) == pytest.approx(float(nll / n), rel=1e-6)


# ----------------------------------------------------------------------------------------- LoRA merge and export


def _trained_lora_model():
    lora = LoraSettings(r=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    model = load_model(
        ModelConfig(name_or_path="tiny", tiny=SMALL, lora=lora), rope=RopeScaling(method="linear", factor=2.0)
    )
    with torch.no_grad():  # LoRA B starts at zero: give the adapters a non-trivial value
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_merge_lora_state_dict_matches_peft_merge():
    import copy

    model = _trained_lora_model()
    layers = lora_layers(model)
    assert len(layers) == 2 * 3 and all(s == pytest.approx(2.0) for _, s, _ in layers.values())
    merged = merge_lora_state_dict(model.state_dict(), layers)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key], rtol=1e-6, atol=1e-6)


def test_export_lora_model_loads_as_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    module = LengthExtensionModule(
        64,
        lm=ModelConfig(name_or_path="tiny", tiny=SMALL, lora=LoraSettings(r=4)),
        rope=RopeScaling(method="linear", factor=2.0),
    )
    module._modules["model"] = _trained_lora_model()
    out = export_pretrained(module, tmp_path / "final", lora_dir=tmp_path / "lora", info={"note": "test"})
    assert out == tmp_path / "final"
    assert (tmp_path / "lora" / "adapter_config.json").is_file() and (
        tmp_path / "lora" / "adapter_model.safetensors"
    ).is_file()
    assert (tmp_path / "final" / "posheads_training.json").is_file()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    reloaded = load_model(ModelConfig(name_or_path=str(tmp_path / "final")))
    assert (
        plain.config.rope_parameters["rope_type"] == "linear" and plain.config.max_position_embeddings == 64
    )
    ids = torch.randint(0, 256, (2, 60))
    with torch.no_grad():
        expected = module.model.eval()(ids).logits
        torch.testing.assert_close(plain(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_export_full_model_with_tied_embeddings_and_dtype(tmp_path):
    from transformers import AutoModelForCausalLM

    module = LengthExtensionModule(64, lm=ModelConfig(name_or_path="tiny", tiny=SMALL))
    model = module.model
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    export_pretrained(module, tmp_path / "final", dtype="bfloat16")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert loaded.dtype == torch.bfloat16
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())


# ----------------------------------------------------------------------------------------- W&B


def test_wandb_mode_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode("auto")[0] == "offline"
    assert resolve_wandb_mode("disabled")[0] == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    mode, why = resolve_wandb_mode("auto")
    assert mode == "offline" and "API key" in why
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    mode, why = resolve_wandb_mode("auto")
    assert mode == "offline" and "not reachable" in why


def test_wandb_environment_stays_inside_the_run(monkeypatch, tmp_path):
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.delenv(key, raising=False)
    env = wandb_environment(tmp_path / "run")
    assert all(v.startswith(str((tmp_path / "run").resolve())) for v in env.values())
