"""Shared by the training tests and tests/scripts/ddp_train.py: a tiny run config and W&B record reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

#: A 2-layer Llama with a 32-token "pre-trained" context, extended to 64 with YaRN, on 40 help topics.
TINY_SPEC = {
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}


def tiny_config(run_dir: Path, name: str, steps: int = 8, **overrides: Any) -> dict[str, Any]:
    """A complete training config for a few CPU steps (sections as in configs/*.yaml)."""
    config: dict[str, Any] = {
        "seed_everything": 0,
        "model": {
            "target_length": 64,
            "lm": {"name_or_path": "tiny", "tiny": dict(TINY_SPEC)},
            "rope": {"method": "yarn", "factor": 2.0},
            "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": steps, "schedule": "cosine"},
        },
        "data": {
            "corpus": {"kind": "pydoc", "max_documents": 40},
            "batch_size": 4,
            "val_windows": 4,
            "cache_dir": "",
        },
        "trainer": {
            "max_steps": steps,
            "accelerator": "cpu",
            "devices": 1,
            "val_check_interval": steps,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "run": {"output_dir": str(run_dir), "name": name, "torch_threads": 1},
        "checkpoint": {"every_n_train_steps": steps, "save_top_k": -1},
        "report": {"enabled": False},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a W&B ``run-<id>.wandb`` file (leveldb-log framing: 7-byte file header, 32 KiB
    blocks, 7-byte record headers ``crc32 | length (2 bytes LE) | type``; types full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B datastore"
    block, pos, payloads, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(payload)
        elif kind == 2:
            partial = payload
        elif kind == 3:
            partial += payload
        elif kind == 4:
            payloads.append(partial + payload)
        else:
            break
    records = []
    for payload in payloads:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records
