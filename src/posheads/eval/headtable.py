"""Which model a head table came from.

A head table (``heads.csv`` of an identification run, or the ``heads`` of a ``results.json``) names heads by
``(layer, head)``; those indices mean something only for the model they were identified on. Every table this
project writes carries the model's identity:

* ``heads.csv`` -- a first line ``# posheads-model: {json}`` (CSV readers here skip ``#`` lines);
* ``results.json`` -- ``protocol.model_identity``.

The identity is ``{model, model_type, num_layers, num_heads, head_dim}`` (``model`` =
:meth:`posheads.models.ModelConfig.describe`). :func:`check_identity` refuses a table whose identity differs
from the model's, naming the keys that differ; a table without identity (written by hand or by an older
version) is accepted with a warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from posheads.atomic import atomic_write_text
from posheads.errors import ConfigError

log = logging.getLogger("posheads.eval")

__all__ = ["IDENTITY_PREFIX", "check_identity", "model_identity", "read_identity", "stamp_csv"]

IDENTITY_PREFIX = "# posheads-model: "
IDENTITY_KEYS = ("model", "model_type", "num_layers", "num_heads", "head_dim")


def model_identity(model_cfg: Any, config: Any) -> dict[str, Any]:
    """The identity of the model ``model_cfg`` (a :class:`~posheads.models.ModelConfig`) whose Transformers
    config is ``config``."""
    from posheads.eval.sweep import ModelShape

    shape = ModelShape.from_config(config)
    text = getattr(config, "get_text_config", lambda: config)()
    return {
        "model": model_cfg.describe(),
        "model_type": str(getattr(text, "model_type", "") or ""),
        "num_layers": shape.num_layers,
        "num_heads": shape.num_heads,
        "head_dim": shape.head_dim,
    }


def stamp_csv(path: str | os.PathLike, identity: dict[str, Any]) -> None:
    """Prefix the CSV head table at ``path`` with its identity line (atomic rewrite; an existing identity line
    is replaced)."""
    p = Path(path)
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines(keepends=True) if not ln.startswith("#")]
    atomic_write_text(p, IDENTITY_PREFIX + json.dumps(identity, sort_keys=True) + "\n" + "".join(lines))


def read_identity(path: str | os.PathLike) -> dict[str, Any] | None:
    """The identity recorded in a head table (CSV, ``results.json`` or a run directory holding one); ``None``
    when it records none."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if p.suffix == ".csv":
        with p.open(encoding="utf-8") as fh:
            first = fh.readline()
        if first.startswith(IDENTITY_PREFIX):
            value = json.loads(first[len(IDENTITY_PREFIX) :])
            return value if isinstance(value, dict) else None
        return None
    with p.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if isinstance(data, dict):
        value = (data.get("protocol") or {}).get("model_identity")
        return value if isinstance(value, dict) else None
    return None


def check_identity(
    option: str,
    path: str,
    table: dict[str, Any] | None,
    model: dict[str, Any],
    allow_other_model: bool = False,
    hint: str | None = None,
) -> list[str]:
    """Refuse a head table identified on another model. Returns the keys that differ (empty when they match or
    the table records no identity); with ``allow_other_model`` a difference is only logged (and returned, for
    the protocol)."""
    if table is None:
        log.warning(
            "%s=%r records no model identity (written by hand or by an older version): its (layer, head) "
            "indices are taken to be %s's",
            option,
            path,
            model.get("model"),
        )
        return []
    differ = [k for k in IDENTITY_KEYS if k in table and table[k] != model.get(k)]
    if differ and not allow_other_model:
        pairs = ", ".join(f"{k}: table {table[k]!r} vs model {model.get(k)!r}" for k in differ)
        raise ConfigError(
            option,
            path,
            f"the head table was identified on another model ({pairs})",
            hint=hint
            or "identify the heads on this model (tasks: [heads]), or set heads.allow_other_model=true to use "
            "the table anyway (recorded in the protocol)",
        )
    if differ:
        log.warning("%s=%r comes from another model (%s); heads.allow_other_model=true", option, path, differ)
    return differ
