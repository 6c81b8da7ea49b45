"""``python evaluate.py --config FILE``: identify Positional Heads, ablate them and matched controls, and
measure long-input perplexity, passkey and needle accuracy across lengths.

Order of work (everything that can fail on bad input fails before the weights are loaded):

1. parse and validate the configuration (:class:`posheads.eval.config.EvalConfig`); check that
   ``output.dir`` is writable and, with ``output.resume``, that its ``results.json`` is readable and was made
   with the same protocol; read a previous head table if one is given;
2. read the model's *config* (not its weights) and the tokenizer; check head indices, ``i_c`` and lengths
   against the model (``length_policy``) and that a head table was identified on this model; tokenise the
   corpus and check that every length has documents long enough;
3. load the model, run the ``heads`` task (identification: table + plots in the run directory), build the
   ablation conditions, then ``perplexity``, ``passkey`` and ``needle``; every finished row is appended
   to ``results.json`` at once (atomic rewrite);
4. plots, a printed summary table, and the same to W&B when ``output.wandb`` is set.

Several processes (``torchrun --nproc_per_node N evaluate.py --config X.yaml``, one per GPU, several nodes
alike; gloo on CPU) split the identification batches, perplexity windows and retrieval prompts among
themselves and produce the ``results.json`` a single process writes (:mod:`posheads.eval.distributed`); only
rank 0 writes files and prints.

Dotted overrides work on the command line (``--perplexity.lengths '[512,1024]' --sweep.max_rows 1``);
``--print_config`` prints the resolved configuration. Bad input is reported as one line, ``error:
<option>=<value>: <reason>`` (exit status 2); ``--traceback`` or ``POSHEADS_TRACEBACK=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from posheads.data import TokenizedDocument, load_token_documents
from posheads.errors import ConfigError, located, run_cli, user_input
from posheads.eval.conditions import NONE, Condition, ConditionRunner, no_ablation
from posheads.eval.config import EvalConfig
from posheads.eval.distributed import SINGLE, Ranks, init_from_env, launched_distributed
from posheads.eval.perplexity import evaluate_perplexity_lengths, perplexity_intervals
from posheads.eval.plots import plot_results, summary_tables
from posheads.eval.results import ResultsFile, load_results, package_versions
from posheads.eval.sweep import (
    ModelShape,
    build_conditions,
    read_head_table,
    resolve_critical_pair,
    validate_heads,
)
from posheads.models import ModelConfig
from posheads.protocol_diff import describe_changes, flatten, protocol_changes

log = logging.getLogger("posheads.eval")

__all__ = ["Prepared", "build_parser", "main", "parse_config", "prepare", "run", "validate_against_model"]


# --------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------


def build_parser() -> Any:
    """The jsonargparse parser of ``evaluate.py`` (``--config FILE``, dotted overrides, ``--help``)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="evaluate.py",
        description=(EvalConfig.__doc__ or "").split("\n\n")[0],
        env_prefix="POSHEADS_EVAL",
        default_env=False,
        exit_on_error=False,
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="YAML configuration file (configs/eval/*.yaml)"
    )
    parser.add_class_arguments(EvalConfig, fail_untyped=True, sub_configs=True)
    return parser


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a validated :class:`EvalConfig`."""
    import argparse

    from posheads.errors import from_argparse

    parser = build_parser()
    try:
        ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except argparse.ArgumentError as err:
        known = flatten(parser.get_defaults(skip_validation=True).as_dict())
        raise from_argparse(err, known) from None
    values = ns.as_dict()
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    return config_from_dict({k: v for k, v in values.items() if k in names})


def config_from_dict(values: dict[str, Any]) -> EvalConfig:
    """Build the :class:`EvalConfig` of a parsed config section by section, so that every validation error
    names the option path as it is written in an evaluation config (``heads.analysis.top_fraction``,
    ``needle.haystack.kind``), as a :class:`~posheads.errors.ConfigError`."""
    from posheads.data import CorpusConfig
    from posheads.eval import config as ec
    from posheads.heads import HeadsConfig
    from posheads.rope import RopeScaling

    def build(cls: type, value: Any, *moves: tuple[str, str]) -> Any:
        if not isinstance(value, dict):
            return value
        with located(*moves):
            return cls(**value)

    out = dict(values)
    out["model"] = build(ModelConfig, out.get("model"))
    out["rope"] = build(RopeScaling, out.get("rope"))
    out["corpus"] = build(CorpusConfig, out.get("corpus"))
    if isinstance(out.get("heads"), dict):
        heads = dict(out["heads"])
        heads["analysis"] = build(HeadsConfig, heads.get("analysis"), ("heads", "heads.analysis"))
        out["heads"] = build(ec.IdentifySettings, heads)
    if isinstance(out.get("needle"), dict):
        needle = dict(out["needle"])
        needle["haystack"] = build(CorpusConfig, needle.get("haystack"), ("corpus", "needle.haystack"))
        out["needle"] = build(ec.NeedleSettings, needle)
    if isinstance(out.get("output"), dict):
        output = dict(out["output"])
        output["wandb"] = build(ec.WandbSettings, output.get("wandb"), ("wandb", "output.wandb"))
        out["output"] = build(ec.OutputSettings, output)
    for name, cls in (
        ("perplexity", ec.PerplexitySettings),
        ("passkey", ec.PasskeySettings),
        ("sweep", ec.SweepSettings),
    ):
        out[name] = build(cls, out.get(name))
    with located():
        return EvalConfig(**out)


# --------------------------------------------------------------------------------------------------------
# Validation against the model (no weights)
# --------------------------------------------------------------------------------------------------------


def peek_model_config(cfg: ModelConfig) -> Any:
    """The Transformers config of ``cfg``'s model without loading its weights."""
    from posheads.models import load_model_config

    return load_model_config(cfg)


def supported_length(config: Any, rope: Any) -> int | None:
    """The longest input the model (with ``rope`` applied) is configured for: the scaling's target length,
    else ``max_position_embeddings``."""
    if rope is not None:
        from posheads.rope import PROVENANCE_ATTRIBUTE, apply_rope_scaling

        scaled = apply_rope_scaling(copy.deepcopy(config), rope)
        prov = getattr(getattr(scaled, "get_text_config", lambda: scaled)(), PROVENANCE_ATTRIBUTE, None)
        if prov:
            return int(prov["target_max_position_embeddings"])
        config = scaled
    text = getattr(config, "get_text_config", lambda: config)()
    value = getattr(text, "max_position_embeddings", None)
    return None if value is None else int(value)


def validate_against_model(cfg: EvalConfig, config: Any) -> tuple[ModelShape, list[str]]:
    """Check head indices, ``i_c`` and lengths against the model's config. Returns the model shape and the
    length warnings (raises for ``length_policy='error'``)."""
    shape = ModelShape.from_config(config)
    if cfg.heads.analysis.original_context is not None:
        shape = dataclasses.replace(shape, original_context=cfg.heads.analysis.original_context)
    if "heads" in cfg.tasks:
        cfg.heads.analysis.validate_for(shape.num_layers, shape.num_heads, shape.head_dim)
    if "heads" in cfg.sweep.bases:
        validate_heads(cfg.sweep.user_heads, shape)
    if cfg.sweep.needs_dims:
        resolve_critical_pair(cfg.sweep.critical_pair, shape, cfg.heads.analysis.critical)
    limit = supported_length(config, cfg.rope)
    notes: list[str] = []
    if limit is not None:
        for task, lengths in _task_lengths(cfg).items():
            over = [L for L in lengths if limit < L]
            if over:
                scaling = (
                    ""
                    if cfg.rope is None
                    else f" with rope.method={cfg.rope.method!r} factor={cfg.rope.factor}"
                )
                msg = (
                    f"{task} {over} exceed the {limit} tokens the model supports{scaling} "
                    f"(max_position_embeddings / scaling target)"
                )
                if cfg.length_policy == "error":
                    raise ValueError(
                        msg + "; length_policy='error' refuses (set 'warn' or 'allow' to evaluate anyway)"
                    )
                notes.append(msg)
    return dataclasses.replace(shape, max_length=limit), notes


def _task_lengths(cfg: EvalConfig) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    if "heads" in cfg.tasks:
        out["heads.length"] = [cfg.heads.length]
    for task in ("perplexity", "perplexity_lc", "passkey", "needle", "retrieval"):
        if task in cfg.tasks:
            out[f"{task}.lengths"] = list(getattr(cfg, task).lengths)
    return out


@dataclass
class Prepared:
    """Everything checked and read before the weights are loaded."""

    cfg: EvalConfig
    model_config: Any
    shape: ModelShape
    tokenizer: Any
    documents: list[TokenizedDocument]
    haystack: torch.Tensor | None = None
    head_table: list[dict[str, Any]] | None = None
    warnings: list[str] = field(default_factory=list)
    probe_documents: list[TokenizedDocument] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)
    resume_changes: dict[str, Any] = field(default_factory=dict)
    table_differs: list[str] = field(default_factory=list)
    suite: list[Any] = field(default_factory=list)


def recorded_probes(path: str | os.PathLike) -> list[str] | None:
    """The probe documents a previous run's ``results.json`` records (``protocol.probes``), else ``None``."""
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if p.suffix != ".json" or not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    probes = (data.get("protocol") or {}).get("probes") if isinstance(data, dict) else None
    return [str(r["document"]) for r in probes] if probes else None


def split_documents(
    cfg: EvalConfig, docs: Sequence[TokenizedDocument]
) -> tuple[list[TokenizedDocument], list[TokenizedDocument]]:
    """``(probe documents, evaluation documents)``: disjoint by construction.

    Probes: ``heads.probe_documents`` when set (each must exist and hold ``heads.length`` tokens); with
    ``heads.from_results``, the probes that run recorded; else the first ``heads.num_sequences`` documents
    with at least ``heads.length`` tokens. Evaluation: every other document. Raises ``ValueError`` when
    the heads come from a table whose probes are unknown and an evaluation task reads the corpus (the
    held-out guarantee could not be kept)."""
    names = cfg.heads.probe_documents
    if names is None and cfg.heads.from_results and "heads" not in cfg.tasks:
        names = recorded_probes(cfg.heads.from_results)
        reads_corpus = (
            "perplexity" in cfg.tasks
            or "perplexity_lc" in cfg.tasks
            or ("needle" in cfg.tasks and cfg.needle.haystack is None)
            or ("retrieval" in cfg.tasks and cfg.retrieval.needs_haystack and cfg.retrieval.haystack is None)
        )
        if names is None and cfg.sweep.needs_positional and reads_corpus:
            raise ValueError(
                f"heads.from_results={cfg.heads.from_results!r} does not record the documents its heads were "
                "identified on; set heads.probe_documents to them so that evaluation leaves them out"
            )
    by_name = {d.name: d for d in docs}
    if names is not None:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(
                f"heads.probe_documents: {missing} are not documents of corpus.kind={cfg.corpus.kind!r}"
            )
        probes = [by_name[n] for n in names]
        if "heads" in cfg.tasks:
            short = [d.name for d in probes if d.n_tokens < cfg.heads.length]
            if short:
                raise ValueError(
                    f"heads.probe_documents: {short} have fewer than heads.length={cfg.heads.length} tokens"
                )
    elif "heads" in cfg.tasks:
        probes = [d for d in docs if d.n_tokens >= cfg.heads.length][: cfg.heads.num_sequences]
    else:
        probes = []
    held = {d.name for d in probes}
    return probes, [d for d in docs if d.name not in held]


def _check_documents(cfg: EvalConfig, docs: Sequence[TokenizedDocument]) -> None:
    longest = max((d.n_tokens for d in docs), default=0)
    where = f"corpus.kind={cfg.corpus.kind!r}"
    if "perplexity" in cfg.tasks:
        short = [L for L in cfg.perplexity.lengths if longest < L]
        if short:
            raise ValueError(
                f"perplexity.lengths {short}: no document of {where} has that many tokens (the longest of "
                f"{len(docs)} has {longest}); use shorter lengths or a corpus of longer documents"
            )
    if "perplexity_lc" in cfg.tasks:
        short = [L for L in cfg.perplexity_lc.lengths if longest < L]
        if short:
            raise ValueError(
                f"perplexity_lc.lengths {short}: no document of {where} has that many tokens (the longest of "
                f"{len(docs)} has {longest})"
            )


def _check_retrieval(cfg: EvalConfig, tokenizer: Any, haystack: torch.Tensor | None) -> None:
    from posheads.data.retrieval import prompt_overhead

    for task in ("passkey", "needle"):
        if task not in cfg.tasks:
            continue
        s = getattr(cfg, task)
        need = prompt_overhead(tokenizer, task, s.num_digits)
        short = [L for L in s.lengths if need >= L]
        if short:
            raise ValueError(
                f"{task}.lengths {short} are too short: the prompt without filler takes {need} tokens"
            )
    if "needle" in cfg.tasks and haystack is not None:
        need = max(cfg.needle.lengths)
        if haystack.numel() < need:
            raise ValueError(
                f"needle.lengths: the haystack pool has {haystack.numel()} tokens, fewer than the longest "
                f"length {need}; use a larger needle.haystack corpus or shorter lengths"
            )


#: Options that may change when a run is resumed: they say which work is done and where it goes, not how the
#: numbers are made (a head table read from elsewhere is checked by the conditions it gives, head by head).
RESUME_FREE = (
    "output",
    "progress",
    "threads",
    "tasks",
    "heads.from_results",
    "heads.plots",
    "heads.allow_other_model",
)


def _plain(value: Any) -> Any:
    from posheads.eval.results import _jsonable

    return json.loads(json.dumps(_jsonable(value), default=str))


def check_output(cfg: EvalConfig) -> dict[str, Any]:
    """``output.dir`` is writable; with ``output.resume``, its ``results.json`` is readable and was made with
    the same protocol (every option except :data:`RESUME_FREE`). Returns the options that differ (``{option: {before, after}}``; non-empty only with
    ``output.allow_protocol_change``)."""
    import tempfile

    out_dir = Path(cfg.output.dir)
    try:  # the run creates it anyway; a test file proves it writable (os.access says yes to root everywhere)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ConfigError(
            "output.dir",
            cfg.output.dir,
            f"is not a writable directory ({type(err).__name__}: {err.strerror or err})",
            hint="choose a directory you can write to",
        ) from err
    path = out_dir / "results.json"
    if not cfg.output.resume or not path.exists():
        return {}
    try:
        old = load_results(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "output.resume",
            True,
            f"{path} cannot be read ({type(err).__name__}: {err})",
            hint="set output.resume=false to start afresh (the unreadable file is kept as "
            "results.replaced-<time>.json), or repair / remove it",
        ) from err
    before = (old.get("protocol") or {}).get("config")
    if not isinstance(before, dict):
        if any(old.get(s) for s in ("perplexity", "passkey", "needle")):
            raise ConfigError(
                "output.resume",
                True,
                f"{path} holds rows but records no configuration to compare with",
                hint="use a new output.dir, or output.resume=false",
            )
        return {}
    changes = protocol_changes(
        _plain(before),
        _plain(_config_dict(cfg)),
        defaults=_plain(_config_dict(EvalConfig())),
        free=RESUME_FREE,
    )
    if changes and not cfg.output.allow_protocol_change:
        raise ConfigError(
            "output.resume",
            True,
            f"{path} was made with another protocol: {describe_changes(changes)}",
            hint="use a new output.dir, output.resume=false (the earlier file is kept as "
            "results.replaced-<time>.json), or output.allow_protocol_change=true (recorded in the protocol)",
        )
    if changes:
        log.warning(
            "resuming %s with changed options (output.allow_protocol_change): %s", path, list(changes)
        )
    return changes


def _check_original_context(cfg: EvalConfig) -> None:
    """No silent default for the pre-training context: a model whose config does not state it (Transformers
    would fill in its class default) needs it given wherever it is used -- a RoPE scaling, ``i_c``."""
    from posheads.models import config_declares_context

    if config_declares_context(cfg.model):
        return
    why = (
        f"the config of model.name_or_path={cfg.model.name_or_path!r} does not state the context it was "
        "pre-trained on (no max_position_embeddings); Transformers would fill in a default"
    )
    if (
        cfg.rope is not None
        and cfg.rope.method != "none"
        and cfg.rope.original_max_position_embeddings is None
    ):
        raise ConfigError(
            "rope.original_max_position_embeddings", None, why, hint="set it to the pre-training context"
        )
    needs_i_c = "heads" in cfg.tasks or bool({"dims_high", "dims_low"}.intersection(cfg.sweep.conditions))
    if needs_i_c and cfg.heads.analysis.original_context is None:
        raise ConfigError(
            "heads.analysis.original_context",
            None,
            why + " (i_c depends on it)",
            hint="set it to the pre-training context",
        )


def prepare(cfg: EvalConfig) -> Prepared:
    """Step 2 of the run: every check that needs no weights (errors as
    :class:`~posheads.errors.ConfigError`)."""
    from posheads.models import ModelLoadError

    with user_input(extra=(ModelLoadError,)):
        return _prepare(cfg)


def _prepare(cfg: EvalConfig) -> Prepared:
    from posheads.eval.headtable import check_identity, model_identity, read_identity
    from posheads.models import load_tokenizer

    # stage 1: the configuration alone
    changes = check_output(cfg)
    table = table_identity = None
    if cfg.sweep.needs_positional and "heads" not in cfg.tasks and cfg.heads.from_results:
        try:
            table = read_head_table(cfg.heads.from_results)
            table_identity = read_identity(cfg.heads.from_results)
        except (OSError, ValueError, KeyError) as err:
            if isinstance(err, ConfigError) or str(err).startswith("heads.from_results"):
                raise
            raise ConfigError(
                "heads.from_results",
                cfg.heads.from_results,
                f"cannot be read as a head table ({type(err).__name__}: {err})",
                hint="give a results.json, its run directory, or a heads.csv written by the heads task",
            ) from err
    # stage 2: the model's config (no weights)
    config = peek_model_config(cfg.model)
    _check_original_context(cfg)
    shape, notes = validate_against_model(cfg, config)
    for note in notes:
        if cfg.length_policy == "warn":
            warnings.warn(note, stacklevel=2)
            log.warning(note)
    identity = model_identity(cfg.model, config)
    differs: list[str] = []
    if table is not None:
        assert cfg.heads.from_results is not None
        differs = check_identity(
            "heads.from_results",
            cfg.heads.from_results,
            table_identity,
            identity,
            cfg.heads.allow_other_model,
        )
        validate_heads([[r["layer"], r["head"]] for r in table], shape, option="heads.from_results")
    tokenizer = load_tokenizer(cfg.model)
    docs: list[TokenizedDocument] = []
    probe_docs: list[TokenizedDocument] = []
    if (
        {"heads", "perplexity", "perplexity_lc"}.intersection(cfg.tasks)
        or ("needle" in cfg.tasks and cfg.needle.haystack is None)
        or ("retrieval" in cfg.tasks and cfg.retrieval.needs_haystack and cfg.retrieval.haystack is None)
        or (cfg.sweep.uses_mean and cfg.evaluates)  # the means are taken on the probe documents
    ):
        docs = load_token_documents(cfg.corpus, tokenizer, cache_dir=cfg.token_cache, progress=cfg.progress)
        probe_docs, docs = split_documents(cfg, docs)
        if "heads" in cfg.tasks and not probe_docs:
            raise ValueError(
                f"heads.length={cfg.heads.length}: no document of corpus.kind={cfg.corpus.kind!r} has that many tokens"
            )
        _check_documents(cfg, docs)
    haystack = None
    if "needle" in cfg.tasks:
        from posheads.data.retrieval import haystack_pool

        source = docs
        if cfg.needle.haystack is not None:
            source = load_token_documents(
                cfg.needle.haystack, tokenizer, cache_dir=cfg.token_cache, progress=cfg.progress
            )
        if cfg.needle.haystack_documents is not None:
            source = source[: cfg.needle.haystack_documents]
        haystack = haystack_pool(source, tokenizer)
    _check_retrieval(cfg, tokenizer, haystack)
    suite = _suite_prompts(cfg, tokenizer, docs) if "retrieval" in cfg.tasks else []
    return Prepared(
        cfg,
        config,
        shape,
        tokenizer,
        docs,
        haystack,
        table,
        notes,
        probe_docs,
        identity,
        changes,
        differs,
        suite,
    )


def _suite_prompts(cfg: EvalConfig, tokenizer: Any, docs: Sequence[TokenizedDocument]) -> list[Any]:
    """Every prompt of the retrieval suite (built before the weights load: a too-short length or a too-small
    haystack fails here, naming the task and length)."""
    from posheads.data.retrieval import haystack_pool
    from posheads.data.tasks import suite_prompts

    r = cfg.retrieval
    pool = None
    if r.needs_haystack:
        source: Sequence[TokenizedDocument] = docs
        if r.haystack is not None:
            source = load_token_documents(
                r.haystack, tokenizer, cache_dir=cfg.token_cache, progress=cfg.progress
            )
        if r.haystack_documents is not None:
            source = source[: r.haystack_documents]
        pool = haystack_pool(source, tokenizer)
    prompts: list[Any] = []
    for task in r.tasks:
        try:
            prompts += suite_prompts(
                tokenizer, pool, task, r.lengths, r.levels(task), r.trials, r.seed, r.spec()
            )
        except ValueError as err:
            raise ValueError(f"retrieval.tasks {task!r}: {err}") from None
    return prompts


# --------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _protocol(
    cfg: EvalConfig, prep: Prepared, model: Any, conditions: Sequence[Condition], i_c: int | None
) -> dict[str, Any]:
    from posheads.rope import scaling_of

    try:
        scaling = scaling_of(model.config).to_dict()
    except (ValueError, AttributeError):
        scaling = None
    corpus = dataclasses.asdict(cfg.corpus)
    corpus["documents"] = len(prep.documents)
    corpus["tokens"] = sum(d.n_tokens for d in prep.documents)
    corpus["held_out"] = [d.name for d in prep.probe_documents]
    return {
        "model": cfg.model.describe(),
        "name_or_path": cfg.model.name_or_path,
        "dtype": cfg.model.dtype,
        "attn_implementation": cfg.model.attn_implementation,
        "scaling": scaling,
        "rope": None if cfg.rope is None else cfg.rope.to_dict(),
        "supported_length": prep.shape.max_length,
        "length_warnings": prep.warnings,
        "corpus": corpus,
        "tasks": cfg.tasks,
        "lengths": {
            t: getattr(cfg, t).lengths
            for t in ("perplexity", "passkey", "needle", "retrieval")
            if t in cfg.tasks
        },
        "stride": cfg.perplexity.stride,
        "score_last": cfg.perplexity.score_last,
        "perplexity": dataclasses.asdict(cfg.perplexity),
        "passkey": dataclasses.asdict(cfg.passkey) if "passkey" in cfg.tasks else None,
        "needle": dataclasses.asdict(cfg.needle) if "needle" in cfg.tasks else None,
        "retrieval": dataclasses.asdict(cfg.retrieval) if "retrieval" in cfg.tasks else None,
        "retrieval_templates": _templates() if "retrieval" in cfg.tasks else None,
        "identification": dataclasses.asdict(cfg.heads),
        "probes": [
            {"document": d.name, "start": 0, "end": min(d.n_tokens, cfg.heads.length)}
            for d in prep.probe_documents
        ],
        "seeds": {
            "random_heads": list(cfg.sweep.random_seeds),
            "passkey": cfg.passkey.seed,
            "needle": cfg.needle.seed,
        },
        "conditions": [c.name for c in conditions],
        "ablation": cfg.sweep.ablation,
        "critical_pair": i_c,
        "dims_pairs": cfg.sweep.dims_pairs,
        "model_shape": dataclasses.asdict(prep.shape),
        "device": str(_device(cfg.device)),
        "threads": torch.get_num_threads(),
        "versions": package_versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _probe_sequences(cfg: EvalConfig, probes: Sequence[TokenizedDocument]) -> torch.Tensor:
    """``[N, heads.length]`` identification probes: the first ``heads.length`` tokens of each probe document
    (:func:`split_documents`; held out from evaluation)."""
    if len(probes) < cfg.heads.num_sequences and cfg.heads.probe_documents is None:
        log.warning(
            "heads.num_sequences=%d but only %d documents have %d tokens; using those",
            cfg.heads.num_sequences,
            len(probes),
            cfg.heads.length,
        )
    return torch.stack([d.ids[: cfg.heads.length] for d in probes])  # [N, L]


def _retrieval_prompts(
    cfg: EvalConfig, task: str, tokenizer: Any, haystack: torch.Tensor | None
) -> list[Any]:
    from posheads.data.retrieval import derive_seed, needle_prompt, passkey_prompt

    s = getattr(cfg, task)
    prompts = []
    for length in s.lengths:
        for depth in s.depths:
            for trial in range(s.trials):
                seed = derive_seed(task, s.seed, length, depth, trial)
                if task == "passkey":
                    prompts.append(passkey_prompt(tokenizer, length, depth, seed, num_digits=s.num_digits))
                else:
                    assert haystack is not None
                    prompts.append(
                        needle_prompt(tokenizer, haystack, length, depth, seed, num_digits=s.num_digits)
                    )
    return prompts


def run(cfg: EvalConfig, prepared: Prepared | None = None) -> dict[str, Any]:
    """Run the evaluation described by ``cfg``; returns the final ``results.json`` content.

    ``cfg.threads`` sets torch's CPU threads for the run (restored afterwards)."""
    previous = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    created = False
    if launched_distributed():
        import torch.distributed as dist

        created = not dist.is_initialized()
    try:
        return _run(cfg, prepared)
    finally:
        torch.set_num_threads(previous)
        if created:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(cfg: EvalConfig, prepared: Prepared | None) -> dict[str, Any]:
    t0 = time.time()
    prep = prepared or prepare(cfg)

    from posheads.eval import identify as ident
    from posheads.models import load_model

    ranks, device = init_from_env(cfg.device)  # one process = SINGLE; torchrun: this rank's device
    progress = cfg.progress and ranks.is_main
    model: Any = load_model(cfg.model, cfg.rope)
    model = model.to(device)
    model.eval()
    log.info("model loaded in %.1fs", time.time() - t0)
    if "heads" in cfg.tasks or cfg.sweep.needs_dims:
        from posheads.rope.layout import model_rope

        # the RoPE description every analysis uses, checked on the model before any task runs
        rope = model_rope(model)
        log.info("RoPE verified: %s (max shift-check error %.1e)", rope.layers[0].describe(), rope.max_error)

    out_dir = Path(cfg.output.dir)
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(
        out_dir,
        {"model": cfg.model.describe(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
        resume=cfg.output.resume,
        writer=ranks.is_main,
    )
    if ranks.distributed:  # rank 0's file (resumed rows) on every rank
        results.data = ranks.broadcast(results.data)

    i_c = None
    if cfg.sweep.needs_dims:
        i_c = resolve_critical_pair(cfg.sweep.critical_pair, prep.shape, cfg.heads.analysis.critical)
    table = prep.head_table
    means = None
    timings: dict[str, float] = {"load": round(time.time() - t0, 1)}
    try:
        if "heads" in cfg.tasks:
            t_task = time.time()
            probes = _probe_sequences(cfg, prep.probe_documents).to(device)
            found = ident.identify(
                model,
                probes,
                cfg.heads,
                out_dir,
                progress=progress,
                need_means=cfg.sweep.uses_mean,
                ranks=ranks,
            )
            table, means = found.table, found.means
            if found.files.get("csv") is not None:
                from posheads.eval.headtable import stamp_csv

                stamp_csv(found.files["csv"], prep.identity)
            results.set("heads", table)
            results.set("heads_summary", _heads_summary(found.analysis))
            timings["heads"] = round(time.time() - t_task, 1)
        elif cfg.sweep.uses_mean and cfg.evaluates:
            # heads read from a previous run: the means for mean ablation are taken on its probe documents
            if not prep.probe_documents:
                raise ValueError(
                    f"mean ablation with heads.from_results={cfg.heads.from_results!r} needs the probe documents "
                    "of that identification: the table records none; set heads.probe_documents"
                )
            from posheads.heads import head_means

            probes = _probe_sequences(cfg, prep.probe_documents).to(device)
            means = head_means(model, probes, batch_size=cfg.heads.analysis.batch_size)
        conditions = [NONE]
        if cfg.evaluates:
            conditions = build_conditions(
                cfg.sweep.conditions,
                table=table,
                shape=prep.shape,
                random_seeds=cfg.sweep.random_seeds,
                user_heads=cfg.sweep.user_heads,
                ablation=cfg.sweep.ablation,
                i_c=i_c,
                dims_rule=cfg.sweep.dims_pairs,
            )
        described = [c.describe() for c in conditions]
        previous = results.data.get("conditions") or []
        if cfg.output.resume and previous and previous != json.loads(json.dumps(described)):
            raise ConfigError(
                "output.resume",
                True,
                f"the conditions of this run differ from those recorded in {results.path} "
                "(another head table, seeds or user heads)",
                hint="use a new output.dir or output.resume=false",
            )
        results.set("conditions", described)
        protocol = _protocol(cfg, prep, model, conditions, i_c)
        protocol["device"] = str(device)
        protocol["processes"] = ranks.world
        protocol["config"] = _config_dict(cfg)
        protocol["model_identity"] = prep.identity
        if prep.resume_changes:
            protocol["resumed_with_changes"] = prep.resume_changes
        if prep.table_differs:
            protocol["head_table_other_model"] = prep.table_differs
        results.set("protocol", protocol)
        if ranks.is_main:
            _print_plan(cfg, conditions)

        needs_ablation = any(not c.is_noop for c in conditions)
        layout = cfg.heads.analysis.layout
        apply = (
            ident.ablation_apply(cfg.sweep.ablation, i_c, means, layout) if needs_ablation else no_ablation
        )
        from posheads.heads.ablation import shared_prefix

        runner = ConditionRunner(
            model,
            conditions,
            apply,
            cfg.sweep.max_rows,
            cfg.sweep.max_batch_tokens,
            prefix=shared_prefix if cfg.sweep.share_prefix else None,
            num_layers=prep.shape.num_layers,
        )

        if "perplexity" in cfg.tasks:
            t_task = time.time()
            p = cfg.perplexity
            at = p.conditions_at or {}
            todo = [
                c
                for c in conditions
                if not all(
                    results.has("perplexity", condition=c.name, length=L)
                    for L in p.lengths
                    if L not in at or c.name in at[L] or c.family in at[L]
                )
            ]
            if todo:
                evaluate_perplexity_lengths(
                    model,
                    prep.documents,
                    p.lengths,
                    nested=p.nested,
                    stride=p.stride,
                    score_last=p.score_last,
                    max_windows_per_doc=p.max_windows_per_doc,
                    max_windows=p.max_windows,
                    max_documents=p.max_documents,
                    max_documents_per_length=p.max_documents_per_length,
                    conditions_at=p.conditions_at,
                    min_document_tokens=max(p.lengths) if p.same_documents else None,
                    runner=runner,
                    conditions=todo,
                    on_row=lambda row: results.append("perplexity", row.to_dict()),
                    progress=progress,
                    ranks=ranks,
                )
            results.set(
                "perplexity_intervals",
                perplexity_intervals(results.data, n_boot=p.n_boot, seed=p.bootstrap_seed, level=p.level),
            )
            timings["perplexity"] = round(time.time() - t_task, 1)
        if "perplexity_lc" in cfg.tasks:
            t_task = time.time()
            _run_long_context(cfg, model, prep, runner, conditions, results, ranks)
            timings["perplexity_lc"] = round(time.time() - t_task, 1)
        for task in ("passkey", "needle"):
            if task in cfg.tasks:
                t_task = time.time()
                _run_retrieval(cfg, task, model, prep, runner, conditions, results, ranks)
                timings[task] = round(time.time() - t_task, 1)
        if "retrieval" in cfg.tasks:
            t_task = time.time()
            _run_suite(cfg, model, prep, runner, conditions, results, ranks)
            timings["retrieval"] = round(time.time() - t_task, 1)
        results.set("status", "complete")
    except BaseException as err:
        results.data["status"] = "failed"
        results.data["failure"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        elapsed = time.time() - t0
        protocol = dict(results.data["protocol"])
        protocol["elapsed_s"] = round(elapsed, 1)
        protocol["timings_s"] = timings
        try:
            results.set("protocol", protocol)
        except OSError as write_err:  # e.g. a full disk: the last good results.json stays as it was
            log.error("could not record the end of the run in %s: %s", results.path, write_err)
    data = results.data
    if not ranks.is_main:
        return data
    plots = plot_results(data, out_dir) if cfg.output.plots else []
    print(summary_tables(data))
    print(f"\nresults: {results.path}  plots: {[p.name for p in plots]}  elapsed: {elapsed:.0f}s")
    if cfg.output.wandb is not None:
        _log_wandb(cfg, data, plots, out_dir)
    return data


def _run_retrieval(
    cfg: EvalConfig,
    task: str,
    model: Any,
    prep: Prepared,
    runner: ConditionRunner,
    conditions: Sequence[Condition],
    results: ResultsFile,
    ranks: Ranks = SINGLE,
) -> None:
    from posheads.eval.retrieval import evaluate_retrieval

    s = getattr(cfg, task)
    prompts = _retrieval_prompts(cfg, task, prep.tokenizer, prep.haystack)
    progress = cfg.progress and ranks.is_main
    for length in tqdm(s.lengths, desc=f"{task} lengths", disable=not progress):
        for depth in s.depths:
            todo = [
                c for c in conditions if not results.has(task, condition=c.name, length=length, depth=depth)
            ]
            cell = [p for p in prompts if p.length == length and p.depth == depth]
            if not todo or not cell:
                continue
            evaluate_retrieval(
                model,
                prep.tokenizer,
                cell,
                task=task,
                max_new_tokens=s.max_new_tokens,
                runner=runner,
                conditions=todo,
                on_row=lambda row: results.append(task, row.to_dict()),
                on_trial=results.trial,
                progress=progress,
                ranks=ranks,
            )


def _run_long_context(
    cfg: EvalConfig,
    model: Any,
    prep: Prepared,
    runner: ConditionRunner,
    conditions: Sequence[Condition],
    results: ResultsFile,
    ranks: Ranks = SINGLE,
) -> None:
    """Long-context-sensitive perplexity per length (token selection on the unablated model, then every
    condition still missing from results.json), then its document-bootstrap intervals."""
    from posheads.eval.longctx import evaluate_long_context_perplexity, long_context_intervals

    s = cfg.perplexity_lc
    for length in s.lengths:
        todo = [c for c in conditions if not results.has("perplexity_lc", condition=c.name, length=length)]
        if not todo:
            continue
        evaluate_long_context_perplexity(
            model,
            prep.documents,
            length,
            short=s.short,
            threshold=s.threshold,
            max_documents=s.max_documents,
            min_document_tokens=max(s.lengths) if s.same_documents else None,
            runner=runner,
            conditions=todo,
            on_row=lambda row: results.append("perplexity_lc", row.to_dict()),
            progress=cfg.progress and ranks.is_main,
            ranks=ranks,
        )
    results.set("perplexity_lc_intervals", long_context_intervals(results.rows("perplexity_lc")))


def _templates() -> dict[str, Any]:
    from posheads.data.tasks import TEMPLATES

    return TEMPLATES


def _run_suite(
    cfg: EvalConfig,
    model: Any,
    prep: Prepared,
    runner: ConditionRunner,
    conditions: Sequence[Condition],
    results: ResultsFile,
    ranks: Ranks = SINGLE,
) -> None:
    """The retrieval suite, cell by cell (task, length, depth / difficulty); finished rows are skipped on resume.
    Then the summary over depths / difficulties (:mod:`posheads.eval.retrieval_summary`) from the trial
    records."""
    from posheads.eval.retrieval import evaluate_suite
    from posheads.eval.retrieval_summary import summarize_run

    cells: dict[tuple[Any, ...], list[Any]] = {}
    for p in prep.suite:
        cells.setdefault((p.task, p.length, p.depth, p.difficulty), []).append(p)
    # shortest length first (every task at the first length before any at the next), then task, then level
    order = {t: i for i, t in enumerate(cfg.retrieval.tasks)}
    ordered = sorted(cells.items(), key=lambda kv: (kv[0][1], order[kv[0][0]]))
    for (task, length, depth, difficulty), cell in tqdm(
        ordered, desc="retrieval cells", disable=not cfg.progress
    ):
        todo = [
            c
            for c in conditions
            if not results.has(
                "retrieval", task=task, condition=c.name, length=length, depth=depth, difficulty=difficulty
            )
        ]
        if not todo:
            continue
        evaluate_suite(
            model,
            cell,
            runner=runner,
            conditions=todo,
            scoring=cfg.retrieval.scoring,
            on_row=lambda row: results.append("retrieval", row),
            on_trial=results.trial,
            progress=cfg.progress and ranks.is_main,
            ranks=ranks,
        )
    if ranks.is_main:
        results.set("retrieval_summary", summarize_run(results.dir, long_context=False))


def _config_dict(cfg: EvalConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _heads_summary(analysis: Any) -> dict[str, Any]:
    """The identification summary kept in results.json: i_c, score distribution, null, the Positional Heads,
    per-layer counts, set-averaged HDA (the per-head HDA curves are in ``analysis.json``)."""
    return analysis.summary()


def _print_plan(cfg: EvalConfig, conditions: Sequence[Condition]) -> None:
    cost = cfg.planned_forward_tokens(len(conditions))
    parts = ", ".join(f"{k}: {v:,.0f}" for k, v in cost.items() if v != float("inf"))
    heads = ", ".join(f"{c.name}({len(c.heads)})" for c in conditions)
    print(f"conditions: {heads}\nplanned tokens through the model: {parts}", file=sys.stderr)


@contextlib.contextmanager
def _wandb_dirs(out_dir: Path) -> Iterator[None]:
    """Point W&B's run, cache, config and data directories into the run directory (unless the user set them),
    for the duration of the block -- W&B writes to the home directory otherwise."""
    wanted = {
        "WANDB_DIR": out_dir,
        "WANDB_CACHE_DIR": out_dir / "wandb-cache",
        "WANDB_CONFIG_DIR": out_dir / "wandb-config",
        "WANDB_DATA_DIR": out_dir / "wandb-data",
    }
    saved = {k: os.environ.get(k) for k in wanted}
    try:
        for key, value in wanted.items():
            if saved[key] is None:
                os.environ[key] = str(value)
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _log_wandb(cfg: EvalConfig, data: dict[str, Any], plots: Sequence[Path], out_dir: Path) -> None:
    """Log the results to W&B: one table per section, ``ppl/<condition>/<length>`` and
    ``<task>/<condition>/<length>/<depth>`` summary values, and the PNG plots."""
    settings = cfg.output.wandb
    assert settings is not None
    import wandb

    with _wandb_dirs(out_dir):
        run = wandb.init(
            project=settings.project,
            name=settings.name or out_dir.name,
            entity=settings.entity,
            mode=cast(Any, settings.mode),
            tags=settings.tags,
            dir=str(out_dir),
            config=data["protocol"],
            reinit="finish_previous",
        )
        try:
            for section in ("heads", "perplexity", "passkey", "needle"):
                rows = data.get(section) or []
                if rows:
                    columns = list(rows[0])
                    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
                    run.log({f"eval/{section}": table})
            for r in data.get("perplexity", []):
                run.summary[f"ppl/{r['condition']}/{r['length']}"] = r["ppl"]
            for task in ("passkey", "needle"):
                for r in data.get(task, []):
                    run.summary[f"{task}/{r['condition']}/{r['length']}/{r['depth']:g}"] = r["accuracy"]
            for p in plots:
                run.log({f"plots/{p.stem}": wandb.Image(str(p))})
        finally:
            run.finish()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``evaluate.py`` (``argv`` defaults to ``sys.argv[1:]``). Bad input exits with status 2
    and one ``error: ...`` line (:func:`posheads.errors.run_cli`)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(_main, argv, "evaluate.py")


def _main(args: list[str]) -> dict[str, Any]:
    cfg = parse_config(args)
    prep = prepare(cfg)
    return run(cfg, prep)
