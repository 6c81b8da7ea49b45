"""Shared fixtures. Every test runs offline: no hub, no W&B servers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
# Tiny models gain nothing from threads, and on a busy 2-core machine oversubscribed OpenMP threads are many
# times slower (measured: tests/test_train_fit.py 146 s -> 35 s at load 5). Subprocess scripts inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the offline SmolLM2-135M-Instruct; loaded once per test session."""
    from posheads.models import ModelConfig, load_model, load_tokenizer

    cfg = ModelConfig()
    return load_model(cfg), load_tokenizer(cfg)


@pytest.fixture
def tiny_model():
    from posheads.models import tiny_llama

    return tiny_llama()


@pytest.fixture
def tiny_tok():
    from posheads.models import tiny_tokenizer

    return tiny_tokenizer()
