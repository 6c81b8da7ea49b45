"""Loggers of a run: CSV always, Weights & Biases when configured (offline automatically when it must be).

W&B writes to the home directory unless told otherwise; :func:`wandb_environment` points ``WANDB_DIR`` at the run
directory and the cache / config / data / artifact directories below it (unless the environment already sets
them), before the first ``wandb`` call.
"""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import socket
import string
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from posheads.lit.config import WandbConfig

log = logging.getLogger(__name__)

__all__ = ["build_loggers", "resolve_wandb_mode", "wandb_environment"]

WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_environment(run_dir: str | os.PathLike) -> dict[str, str]:
    """Set ``WANDB_DIR=<run_dir>`` and ``WANDB_{CACHE,CONFIG,DATA,ARTIFACT}_DIR`` below ``<run_dir>/wandb-home``
    (those four only when not already set). Returns the values in effect."""
    run_dir = Path(run_dir).resolve()
    home = run_dir / "wandb-home"
    os.environ["WANDB_DIR"] = str(run_dir)
    for key, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
    ):
        os.environ.setdefault(key, str(home / sub))
    keys = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
    for key in keys:
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    return {k: os.environ[k] for k in keys}


def _wandb_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme != "http" else 80)


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        return os.path.isfile(path) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """``(online | offline | disabled, why)`` for ``wandb.mode``.

    ``auto``: ``WANDB_MODE`` from the environment if set; else offline without an API key (``WANDB_API_KEY`` or a
    ``~/.netrc`` entry for the W&B host) or without a connection to the W&B host; else online.
    """
    if mode != "auto":
        return mode, f"wandb.mode={mode!r}"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("offline", "dryrun"):
        return "offline", f"WANDB_MODE={env}"
    if env in ("disabled", "online"):
        return env, f"WANDB_MODE={env}"
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    host, port = _wandb_host()
    if not _has_api_key(host):
        return "offline", f"no W&B API key (WANDB_API_KEY or ~/.netrc entry for {host})"
    if not _reachable(host, port):
        return "offline", f"{host}:{port} is not reachable"
    return "online", "API key found and the W&B server is reachable"


def build_loggers(
    run_dir: str | os.PathLike, run_name: str, wandb: WandbConfig | None, resume: bool = False
) -> list[Logger]:
    """``[CSVLogger(<run>/csv), WandbLogger(...)]`` (W&B only when ``wandb.enabled``).

    A resumed run (``resume=True``) continues the same W&B run id (stored in ``<run>/wandb_run_id.txt``).
    """
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv")]
    if wandb is None or not wandb.enabled:
        return loggers
    mode, why = resolve_wandb_mode(wandb.mode)
    if mode == "disabled":
        log.info("W&B disabled (%s)", why)
        return loggers
    wandb_environment(run_dir)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if run_id is None:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    log.info("W&B %s (%s), files in %s", mode, why, run_dir / "wandb")
    loggers.append(
        WandbLogger(
            project=wandb.project,
            name=wandb.name or run_name,
            entity=wandb.entity,
            group=wandb.group,
            tags=list(wandb.tags),
            notes=wandb.notes,
            save_dir=str(run_dir),
            offline=mode == "offline",
            log_model=wandb.log_model,
            id=run_id,
            resume="allow",
        )
    )
    return loggers
