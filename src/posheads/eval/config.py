"""Typed configuration of ``evaluate.py`` (validated on construction; errors name the option and value).

Everything here is checked before any model work: :class:`EvalConfig` validates options and their
combinations; :func:`posheads.eval.cli.validate_against_model` then checks head indices, lengths and the
corpus against the model's config and tokenizer -- still without loading weights.

Lengths above what the model supports (its ``max_position_embeddings`` after the RoPE scaling, or the
scaling's target length) are handled by ``length_policy``: ``"warn"`` (default: evaluating beyond the
trained window is what extrapolation studies do, so a warning is logged and recorded in the protocol),
``"error"`` (refuse before loading the model) or ``"allow"`` (silently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from posheads.data import CorpusConfig
from posheads.eval.sweep import DIMS_PAIR_RULES, NEEDS_POSITIONAL, parse_condition, parse_head
from posheads.heads import HeadsConfig
from posheads.models import ModelConfig
from posheads.rope import RopeScaling

__all__ = [
    "LENGTH_POLICIES",
    "TASKS",
    "EvalConfig",
    "IdentifySettings",
    "NeedleSettings",
    "OutputSettings",
    "PasskeySettings",
    "LongContextSettings",
    "PerplexitySettings",
    "RetrievalSettings",
    "SweepSettings",
    "WandbSettings",
]

TASKS = ("heads", "perplexity", "perplexity_lc", "passkey", "needle", "retrieval")
LENGTH_POLICIES = ("warn", "error", "allow")
ABLATIONS = ("zero", "mean")


def _positive_ints(option: str, values: Any, allow_empty: bool = False) -> list[int]:
    if not isinstance(values, (list, tuple)) or (not values and not allow_empty):
        raise ValueError(f"{option}={values!r} must be a non-empty list of positive integers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{option}={list(values)!r}: {v!r} is not a positive integer")
    if len(set(values)) != len(values):
        raise ValueError(f"{option}={list(values)!r} has duplicates")
    return sorted(values)


def _optional_positive(option: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{option}={value!r} must be a positive integer or null")


def _depths(option: str, values: Any) -> list[float]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{option}={values!r} must be a non-empty list of depths in [0, 1]")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{option}={list(values)!r}: {v!r} is not a depth in [0, 1]")
        out.append(float(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{option}={list(values)!r} has duplicates")
    return out


@dataclass
class PerplexitySettings:
    """Long-input perplexity (task ``perplexity``).

    Attributes:
        lengths: window lengths in tokens; each uses the documents with at least that many tokens.
        stride: ``null`` = disjoint windows; an int ``s`` = sliding windows with stride ``s`` (each scores
            only the tokens the previous one did not), as in the YaRN evaluation.
        score_last: score only the last tokens of each window (the ones that see long context): an int
            ``n`` (last ``n`` tokens) or a float in (0, 1] (that fraction of the window); ``null`` = all.
        same_documents: every length uses only the documents long enough for the *longest* length, so that
            lengths are compared on the same text (otherwise each length uses every document that is long
            enough for it, and short lengths also see short documents).
        max_documents: use at most this many (qualifying) documents per length.
        max_documents_per_length: a smaller cap for some lengths, ``{length: documents}`` (the first
            documents of the list, e.g. ``{4096: 4}``: fewer documents at the longest length).
        max_windows_per_doc: at most this many windows per document.
        max_windows: at most this many windows per length (all documents together).
        conditions_at: evaluate only these conditions at some lengths, ``{length: [names]}`` (a name is a
            ``sweep.conditions`` entry, an expanded one such as ``random@3``, or a family such as ``random``);
            lengths not listed run every condition. E.g. ``{4096: [none, positional, random]}`` keeps the
            costliest length to the comparison that matters.
        nested: feed each document once per condition, at the longest length it is used for, and read the
            shorter lengths off the same forward (a causal model's prediction at position ``t`` sees only
            tokens ``<= t``, so this equals separate windows of the document's first ``L`` tokens). Needs
            ``stride: null`` and one window per document.
        n_boot: bootstrap resamples (over documents) of the intervals in ``results.json``.
        level: coverage of the intervals.
        bootstrap_seed: seed of the resampling.
    """

    lengths: list[int] = field(default_factory=lambda: [512, 1024, 2048])
    stride: int | None = None
    score_last: int | float | None = None
    same_documents: bool = True
    max_documents: int | None = None
    max_documents_per_length: dict[int, int] | None = None
    max_windows_per_doc: int | None = None
    max_windows: int | None = None
    conditions_at: dict[int, list[str]] | None = None
    nested: bool = False
    n_boot: int = 2000
    level: float = 0.95
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        self.lengths = _positive_ints("perplexity.lengths", self.lengths)
        if self.max_documents_per_length is not None:
            caps = {}
            for k, v in dict(self.max_documents_per_length).items():
                try:
                    length = int(k)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"perplexity.max_documents_per_length: key {k!r} is not a length"
                    ) from None
                if length not in self.lengths:
                    raise ValueError(
                        f"perplexity.max_documents_per_length: {length} is not one of perplexity.lengths {self.lengths}"
                    )
                _optional_positive(f"perplexity.max_documents_per_length[{length}]", v)
                caps[length] = int(v)
            self.max_documents_per_length = caps
        if self.conditions_at is not None:
            at: dict[int, list[str]] = {}
            for key, names in dict(self.conditions_at).items():
                try:
                    at_length = int(key)
                except (TypeError, ValueError):
                    raise ValueError(f"perplexity.conditions_at: key {key!r} is not a length") from None
                if at_length not in self.lengths:
                    raise ValueError(
                        f"perplexity.conditions_at: {at_length} is not one of perplexity.lengths {self.lengths}"
                    )
                if (
                    not isinstance(names, (list, tuple))
                    or not names
                    or not all(isinstance(n, str) for n in names)
                ):
                    raise ValueError(
                        f"perplexity.conditions_at[{at_length}]={names!r} must be a non-empty list of names"
                    )
                at[at_length] = list(names)
            self.conditions_at = at
        if not isinstance(self.nested, bool):
            raise ValueError(f"perplexity.nested={self.nested!r} must be a bool")
        if self.nested and (self.stride is not None or self.max_windows_per_doc not in (None, 1)):
            raise ValueError(
                f"perplexity.nested=true needs stride: null and max_windows_per_doc: 1 (got stride={self.stride!r}, "
                f"max_windows_per_doc={self.max_windows_per_doc!r})"
            )
        _optional_positive("perplexity.n_boot", self.n_boot)
        if self.n_boot is None:
            raise ValueError("perplexity.n_boot must be set")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not 0 < self.level < 1:
            raise ValueError(f"perplexity.level={self.level!r} must be in (0, 1)")
        if isinstance(self.bootstrap_seed, bool) or not isinstance(self.bootstrap_seed, int):
            raise ValueError(f"perplexity.bootstrap_seed={self.bootstrap_seed!r} must be an integer")
        if not isinstance(self.same_documents, bool):
            raise ValueError(f"perplexity.same_documents={self.same_documents!r} must be a bool")
        if self.stride is not None:
            if isinstance(self.stride, bool) or not isinstance(self.stride, int) or self.stride < 1:
                raise ValueError(
                    f"perplexity.stride={self.stride!r} must be a positive integer or null (disjoint)"
                )
            if self.stride > min(self.lengths):
                raise ValueError(
                    f"perplexity.stride={self.stride} exceeds the shortest length {min(self.lengths)} "
                    "(tokens between windows would never be scored)"
                )
        if self.score_last is not None:
            if isinstance(self.score_last, bool):
                raise ValueError(f"perplexity.score_last={self.score_last!r} must be an int, a float or null")
            if isinstance(self.score_last, float):
                if not 0.0 < self.score_last <= 1.0:
                    raise ValueError(
                        f"perplexity.score_last={self.score_last!r}: a fraction must be in (0, 1]"
                    )
            elif not isinstance(self.score_last, int) or self.score_last < 1:
                raise ValueError(
                    f"perplexity.score_last={self.score_last!r} must be an int >= 1 or a float in (0, 1]"
                )
            elif self.score_last >= min(self.lengths):
                raise ValueError(
                    f"perplexity.score_last={self.score_last} must be below the shortest length {min(self.lengths)}"
                )
        for opt in ("max_documents", "max_windows_per_doc", "max_windows"):
            _optional_positive(f"perplexity.{opt}", getattr(self, opt))


@dataclass
class PasskeySettings:
    """Passkey retrieval (task ``passkey``; Mohtashami & Jaggi 2023): lengths x depths x seeded trials.

    Attributes:
        lengths: prompt lengths in tokens (exact).
        depths: where the key sentence goes, as a fraction of the filler (0 = start, 1 = end).
        trials: prompts (different passkeys) per (length, depth); trial ``t`` is seeded from
            ``(seed, length, depth, t)``.
        seed: the base seed.
        num_digits: digits of the passkey.
        max_new_tokens: greedy decoding budget (decoding stops early once the number is complete).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 5
    seed: int = 0
    num_digits: int = 5
    max_new_tokens: int = 10

    def __post_init__(self) -> None:
        self.lengths = _positive_ints("passkey.lengths", self.lengths)
        self.depths = _depths("passkey.depths", self.depths)
        _optional_positive("passkey.trials", self.trials)
        _optional_positive("passkey.num_digits", self.num_digits)
        _optional_positive("passkey.max_new_tokens", self.max_new_tokens)
        if self.trials is None or self.num_digits is None or self.max_new_tokens is None:
            raise ValueError("passkey.trials, passkey.num_digits and passkey.max_new_tokens must be set")


@dataclass
class NeedleSettings:
    """Needle in a haystack (task ``needle``): a numeric needle in real corpus text, exact match.

    Attributes:
        lengths: prompt lengths in tokens (exact).
        depths: where the needle goes, as a fraction of the haystack.
        trials: prompts per (length, depth), each with its own haystack span, key and value.
        seed: the base seed.
        num_digits: digits of the needle's value.
        max_new_tokens: greedy decoding budget.
        haystack: the corpus for the haystack text; ``null`` = the evaluation corpus.
        haystack_documents: build the haystack pool from at most this many documents (``null`` = all).
    """

    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 5
    seed: int = 0
    num_digits: int = 7
    max_new_tokens: int = 12
    haystack: CorpusConfig | None = None
    haystack_documents: int | None = None

    def __post_init__(self) -> None:
        self.lengths = _positive_ints("needle.lengths", self.lengths)
        self.depths = _depths("needle.depths", self.depths)
        for opt in ("trials", "num_digits", "max_new_tokens"):
            _optional_positive(f"needle.{opt}", getattr(self, opt))
            if getattr(self, opt) is None:
                raise ValueError(f"needle.{opt} must be set")
        _optional_positive("needle.haystack_documents", self.haystack_documents)
        if isinstance(self.haystack, dict):
            self.haystack = CorpusConfig(**self.haystack)


@dataclass
class LongContextSettings:
    """Long-context-sensitive perplexity (task ``perplexity_lc``, :mod:`posheads.eval.longctx`): the NLL over the
    tokens whose log-probability gains more than ``threshold`` nats from the whole window over a short context,
    the tokens chosen once on the unablated model; reported next to the plain NLL of the same windows.

    Attributes:
        lengths: window lengths (one window per document: its first ``length`` tokens).
        short: the short context (even): windows of ``short`` tokens with stride ``short / 2``.
        threshold: the gain (nats) above which a token counts as long-context sensitive.
        max_documents: documents per length (the first ones long enough; held-out documents only).
        same_documents: every length on the documents long enough for the longest one.
    """

    lengths: list[int] = field(default_factory=lambda: [2048])
    short: int = 256
    threshold: float = 2.0
    max_documents: int | None = 4
    same_documents: bool = True

    def __post_init__(self) -> None:
        self.lengths = _positive_ints("perplexity_lc.lengths", self.lengths)
        if not isinstance(self.short, int) or self.short < 2 or self.short % 2:
            raise ValueError(f"perplexity_lc.short={self.short!r} must be an even integer >= 2")
        if self.short >= min(self.lengths):
            raise ValueError(
                f"perplexity_lc.short={self.short} must be below the shortest length {min(self.lengths)}"
            )
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"perplexity_lc.threshold={self.threshold!r} must be a finite number")
        _optional_positive("perplexity_lc.max_documents", self.max_documents)


@dataclass
class RetrievalSettings:
    """The retrieval suite (task ``retrieval``), scored by teacher forcing: see :mod:`posheads.data.tasks` for
    the tasks and their pinned templates, :func:`posheads.eval.retrieval.evaluate_suite` for the scores.

    Attributes:
        tasks: any of ``passkey``, ``needle``, ``multikey``, ``multivalue``, ``multiquery``, ``vartrack``,
            ``cwe``.
        lengths: prompt lengths in tokens (exact; the answer is scored after them).
        depths: depths of the (first / target) insert, for every task but ``cwe``.
        difficulties: ``cwe``: the number ``k`` of common words asked (1..5).
        trials: prompts per (task, length, depth or difficulty) cell; the depths of a trial share its haystack.
        seed: the base seed of the prompts.
        scoring: ``teacher_forced`` (one forward per prompt and group of conditions), ``greedy`` (exact match
            from greedy decoding; log-probabilities still teacher forced) or ``both`` (teacher-forced accuracy,
            greedy decoded as a check: ``greedy_agrees`` per row).
        num_digits: digits of every number (passkey, magic numbers, variable values).
        distractors: multikey: needles with other keys.
        values: multivalue: values of the one key.
        queries: multiquery: keys asked at once.
        hops: vartrack: assignments after the first.
        common_share: cwe: share of the list taken by the common words.
        haystack: the corpus of the haystacks (``null`` = the evaluation corpus).
        haystack_documents: build the haystack pool from at most this many documents (``null`` = all).
    """

    tasks: list[str] = field(
        default_factory=lambda: [
            "passkey",
            "needle",
            "multikey",
            "multivalue",
            "multiquery",
            "vartrack",
            "cwe",
        ]
    )
    lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    difficulties: list[int] = field(default_factory=lambda: [1, 3])
    trials: int = 10
    seed: int = 0
    scoring: str = "teacher_forced"
    num_digits: int = 5
    distractors: int = 3
    values: int = 3
    queries: int = 3
    hops: int = 3
    common_share: float = 0.3
    haystack: CorpusConfig | None = None
    haystack_documents: int | None = None

    def __post_init__(self) -> None:
        from posheads.data.tasks import SUITE_TASKS
        from posheads.eval.retrieval import SCORINGS

        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise ValueError(
                f"retrieval.tasks={self.tasks!r} must be a non-empty list of {list(SUITE_TASKS)}"
            )
        for t in self.tasks:
            if t not in SUITE_TASKS:
                raise ValueError(f"retrieval.tasks: unknown task {t!r}; known: {list(SUITE_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"retrieval.tasks={self.tasks!r} has duplicates")
        self.lengths = _positive_ints("retrieval.lengths", self.lengths)
        self.depths = _depths("retrieval.depths", self.depths)
        self.difficulties = _positive_ints("retrieval.difficulties", self.difficulties)
        bad = [k for k in self.difficulties if k > 5]
        if bad:
            raise ValueError(f"retrieval.difficulties {bad}: cwe asks at most 5 common words")
        for opt in ("trials", "num_digits", "values", "queries", "hops"):
            _optional_positive(f"retrieval.{opt}", getattr(self, opt))
            if getattr(self, opt) is None:
                raise ValueError(f"retrieval.{opt} must be set")
        if not isinstance(self.distractors, int) or self.distractors < 0:
            raise ValueError(f"retrieval.distractors={self.distractors!r} must be an integer >= 0")
        if not 0.0 < float(self.common_share) < 1.0:
            raise ValueError(f"retrieval.common_share={self.common_share!r} must be in (0, 1)")
        if self.scoring not in SCORINGS:
            raise ValueError(f"retrieval.scoring={self.scoring!r} is not one of {list(SCORINGS)}")
        _optional_positive("retrieval.haystack_documents", self.haystack_documents)
        if isinstance(self.haystack, dict):
            self.haystack = CorpusConfig(**self.haystack)

    def spec(self) -> Any:
        from posheads.data.tasks import TaskSpec

        return TaskSpec(
            self.num_digits, self.distractors, self.values, self.queries, self.hops, float(self.common_share)
        )

    def levels(self, task: str) -> list[Any]:
        from posheads.data.tasks import DIFFICULTY_TASKS

        return list(self.difficulties) if task in DIFFICULTY_TASKS else list(self.depths)

    @property
    def needs_haystack(self) -> bool:
        return bool(set(self.tasks) - {"passkey", "cwe"})


@dataclass
class IdentifySettings:
    """Positional-Head identification (task ``heads``) or where to read a previous table from.

    Attributes:
        length: tokens per probe sequence (the first ``length`` tokens of corpus documents that long).
        num_sequences: probe sequences (one per document, the first documents that qualify).
        from_results: read the head table of a previous run instead (a ``results.json``, its run directory,
            a JSON list or a CSV with ``layer, head, score, z, positional``); used when ``heads`` is not in
            ``tasks``.
        probe_documents: names of the corpus documents the probes come from (their first ``length`` tokens);
            ``null`` = the first ``num_sequences`` documents with at least ``length`` tokens (or, with
            ``from_results``, the probes that run's ``results.json`` records). The probe documents are held
            out: no evaluation task (perplexity, needle haystack) uses them, by construction.
        analysis: the analysis options (:class:`posheads.heads.HeadsConfig`: score statistic, selection
            rule, sampling, critical pair, batch size ...).
        plots: write the identification's plots (score heat-map, HDA curves, pair profile).
        allow_other_model: use a ``from_results`` table that records another model (name, type or shape) than
            the one evaluated; refused by default (:mod:`posheads.eval.headtable`), recorded in the protocol.
    """

    length: int = 2048
    num_sequences: int = 4
    from_results: str | None = None
    probe_documents: list[str] | None = None
    analysis: HeadsConfig = field(default_factory=HeadsConfig)
    plots: bool = True
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        for opt in ("length", "num_sequences"):
            _optional_positive(f"heads.{opt}", getattr(self, opt))
            if getattr(self, opt) is None:
                raise ValueError(f"heads.{opt} must be set")
        if isinstance(self.analysis, dict):
            self.analysis = HeadsConfig(**self.analysis)
        if self.probe_documents is not None:
            if not isinstance(self.probe_documents, (list, tuple)) or not self.probe_documents:
                raise ValueError(
                    f"heads.probe_documents={self.probe_documents!r} must be a non-empty list or null"
                )
            if len(set(self.probe_documents)) != len(self.probe_documents):
                raise ValueError(f"heads.probe_documents={self.probe_documents!r} has duplicates")
            self.probe_documents = [str(d) for d in self.probe_documents]


@dataclass
class SweepSettings:
    """Ablation conditions evaluated by every task (perplexity, passkey, needle).

    Attributes:
        conditions: any of ``none``, ``positional``, ``random`` (one condition per seed; ``random@3`` one
            seed), ``lowest`` (layer-matched), ``lowest_global``, ``heads`` (``user_heads``), ``dims_high`` /
            ``dims_low`` (RoPE pairs above / below ``i_c`` removed inside the Positional Heads;
            ``dims_high[random]``, ``dims_high[random@0]``, ``dims_high[lowest]`` inside a control set).
            A head condition may carry its ablation mode: ``positional:mean``, ``random:zero``. See
            :mod:`posheads.eval.sweep`.
        random_seeds: seeds of the random controls (same number of heads per layer as the Positional set,
            never a Positional Head).
        user_heads: heads of the ``heads`` condition, ``[layer, head]`` or ``"layer.head"``.
        ablation: ``zero`` (zero the head's input slice of ``o_proj``) or ``mean`` (replace it with the head's
            mean output over the probe sequences): the mode of head conditions that name none.
        critical_pair: ``i_c`` for dimension ablation: ``auto`` (the rule of ``heads.analysis.critical``),
            ``critical`` (first pair whose wavelength exceeds the pre-training context), ``quarter``
            (``d/4``) or a pair index.
        dims_pairs: ``equal`` (default): ``dims_high`` and ``dims_low`` remove the same number of pairs, the
            ones nearest ``i_c`` on each side; ``all``: every pair ``>= i_c`` / ``< i_c``.
        max_rows: conditions evaluated together in one batched forward (each row its own ablation mask);
            1 = sequential. Halved automatically on out-of-memory.
        max_batch_tokens: cap on ``rows x length`` per forward (``null`` = no cap).
        share_prefix: in single-forward scoring (perplexity, the retrieval suite) the layers before the first
            layer a group of conditions ablates run once and are broadcast to the group's rows; groups are
            formed after sorting the conditions by that layer (:func:`posheads.heads.ablation.shared_prefix`).
    """

    conditions: list[str] = field(default_factory=lambda: ["none"])
    random_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    user_heads: list[list[int] | str] = field(default_factory=list)
    ablation: str = "zero"
    critical_pair: int | str = "auto"
    dims_pairs: str = "equal"
    max_rows: int = 4
    max_batch_tokens: int | None = 16384
    share_prefix: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.conditions, (list, tuple)) or not self.conditions:
            raise ValueError(f"sweep.conditions={self.conditions!r} must be a non-empty list")
        specs = [parse_condition(c) for c in self.conditions]
        if len(set(self.conditions)) != len(self.conditions):
            raise ValueError(f"sweep.conditions={self.conditions!r} has duplicates")
        unseeded = [
            sp.entry
            for sp in specs
            if sp.seed is None and ("random" in (sp.base, sp.target) or sp.base == "random_allkeys")
        ]
        if unseeded and not self.random_seeds:
            raise ValueError(f"sweep.random_seeds=[] is empty but sweep.conditions has {unseeded}")
        if self.dims_pairs not in DIMS_PAIR_RULES:
            raise ValueError(f"sweep.dims_pairs={self.dims_pairs!r} is not one of {list(DIMS_PAIR_RULES)}")
        if len(set(self.random_seeds)) != len(self.random_seeds):
            raise ValueError(f"sweep.random_seeds={self.random_seeds!r} has duplicates")
        self.user_heads = [list(parse_head(h)) for h in self.user_heads]
        if "heads" in self.conditions and not self.user_heads:
            raise ValueError("sweep.conditions has 'heads' but sweep.user_heads=[] is empty")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"sweep.ablation={self.ablation!r} is not one of {list(ABLATIONS)}")
        if isinstance(self.critical_pair, str) and self.critical_pair not in ("auto", "critical", "quarter"):
            try:
                self.critical_pair = int(self.critical_pair)
            except ValueError:
                raise ValueError(
                    f"sweep.critical_pair={self.critical_pair!r} is not 'auto', 'critical', 'quarter' or an integer"
                ) from None
        if isinstance(self.critical_pair, int) and self.critical_pair < 0:
            raise ValueError(f"sweep.critical_pair={self.critical_pair!r} must be >= 0")
        _optional_positive("sweep.max_rows", self.max_rows)
        _optional_positive("sweep.max_batch_tokens", self.max_batch_tokens)

    @property
    def bases(self) -> set[str]:
        """The condition kinds used (``random@3:mean`` -> ``random``)."""
        return {parse_condition(c).base for c in self.conditions}

    @property
    def needs_positional(self) -> bool:
        return bool(NEEDS_POSITIONAL.intersection(self.bases))

    @property
    def needs_dims(self) -> bool:
        return bool({"dims_high", "dims_low"}.intersection(self.bases))

    @property
    def uses_mean(self) -> bool:
        """Whether any head condition is mean-ablated (the run then needs the heads' mean outputs)."""
        for c in self.conditions:
            sp = parse_condition(c)
            if sp.base not in ("none", "dims_high", "dims_low") and (sp.mode or self.ablation) == "mean":
                return True
        return False


@dataclass
class WandbSettings:
    """Log the run to Weights & Biases (offline unless ``WANDB_MODE`` / ``mode`` says otherwise).

    Attributes:
        project: W&B project.
        name: run name (default: the output directory's name).
        entity: W&B entity (team or user).
        mode: ``offline`` | ``online`` | ``disabled``.
        tags: run tags.
    """

    project: str = "posheads"
    name: str | None = None
    entity: str | None = None
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"output.wandb.mode={self.mode!r} is not one of ['offline', 'online', 'disabled']"
            )


@dataclass
class OutputSettings:
    """Where results go.

    Attributes:
        dir: the run directory (``results.json``, ``trials.jsonl``, ``heads.csv``, PNG plots).
        resume: keep the rows of an existing ``results.json`` there and compute only the missing ones;
            refused (before the model loads) when that file was made with another protocol (any option except
            ``output.*``, ``progress``, ``threads``, ``tasks`` and where the head table comes from differs).
        allow_protocol_change: resume even though the protocol differs; the differing options (old and new
            values) are recorded in ``protocol.resumed_with_changes``.
        plots: write PNG plots.
        wandb: log to W&B as well (``null`` = no logger).
    """

    dir: str = "runs/eval"
    resume: bool = False
    allow_protocol_change: bool = False
    plots: bool = True
    wandb: WandbSettings | None = None

    def __post_init__(self) -> None:
        if not self.dir:
            raise ValueError("output.dir='' must name a directory")
        if isinstance(self.wandb, dict):
            self.wandb = WandbSettings(**self.wandb)


@dataclass
class EvalConfig:
    """``evaluate.py``: identify Positional Heads, ablate them and matched controls, and measure long-input
    perplexity and retrieval accuracy across lengths.

    Attributes:
        model: the model or checkpoint to evaluate.
        rope: a RoPE scaling applied to the loaded model (``null`` = as the checkpoint says).
        corpus: documents for perplexity, identification probes and (by default) needle haystacks.
        tasks: any of ``heads``, ``perplexity``, ``passkey``, ``needle``, ``retrieval``, run in that order.
        perplexity: perplexity settings.
        passkey: passkey settings (greedy decoding).
        needle: needle-in-a-haystack settings (greedy decoding).
        retrieval: the retrieval suite (teacher-forced scoring).
        heads: Positional-Head identification settings.
        sweep: ablation conditions.
        output: output directory, resume, plots, W&B.
        length_policy: lengths above what the model supports: ``warn`` | ``error`` | ``allow``.
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda``, ``cuda:1`` ...
        threads: torch CPU threads (``null`` = torch's default).
        token_cache: directory for the tokenised-corpus cache (``null`` = no cache).
        progress: show tqdm progress bars.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    rope: RopeScaling | None = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tasks: list[str] = field(default_factory=lambda: ["perplexity"])
    perplexity: PerplexitySettings = field(default_factory=PerplexitySettings)
    passkey: PasskeySettings = field(default_factory=PasskeySettings)
    needle: NeedleSettings = field(default_factory=NeedleSettings)
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    perplexity_lc: LongContextSettings = field(default_factory=LongContextSettings)
    heads: IdentifySettings = field(default_factory=IdentifySettings)
    sweep: SweepSettings = field(default_factory=SweepSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    length_policy: str = "warn"
    device: str = "auto"
    threads: int | None = None
    token_cache: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name, cls in (
            ("model", ModelConfig),
            ("corpus", CorpusConfig),
            ("perplexity", PerplexitySettings),
            ("passkey", PasskeySettings),
            ("needle", NeedleSettings),
            ("retrieval", RetrievalSettings),
            ("perplexity_lc", LongContextSettings),
            ("heads", IdentifySettings),
            ("sweep", SweepSettings),
            ("output", OutputSettings),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))
        if isinstance(self.rope, dict):
            self.rope = RopeScaling(**self.rope)
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise ValueError(f"tasks={self.tasks!r} must be a non-empty list of {list(TASKS)}")
        for t in self.tasks:
            if t not in TASKS:
                raise ValueError(f"tasks: unknown task {t!r}; known: {list(TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks={self.tasks!r} has duplicates")
        self.tasks = [t for t in TASKS if t in self.tasks]  # canonical order
        if self.length_policy not in LENGTH_POLICIES:
            raise ValueError(f"length_policy={self.length_policy!r} is not one of {list(LENGTH_POLICIES)}")
        if "heads" in self.tasks and self.heads.from_results:
            raise ValueError(
                f"heads.from_results={self.heads.from_results!r} and tasks with 'heads': the run would identify "
                "the heads again and not use that table; drop 'heads' from tasks to reuse it, or unset "
                "heads.from_results"
            )
        if (
            self.sweep.needs_positional
            and self.evaluates
            and "heads" not in self.tasks
            and not self.heads.from_results
        ):
            needs = sorted(c for c in self.sweep.conditions if parse_condition(c).base in NEEDS_POSITIONAL)
            raise ValueError(
                f"sweep.conditions {needs} need the Positional Heads: add 'heads' to tasks or set heads.from_results"
            )
        if (
            self.sweep.uses_mean
            and self.evaluates
            and "heads" not in self.tasks
            and not self.heads.from_results
        ):
            raise ValueError(
                "mean ablation (sweep.ablation='mean' or a ':mean' condition) needs the head means of the "
                "probe set: add 'heads' to tasks (or read the heads with heads.from_results: the means are "
                "then taken on the probe documents that run recorded)"
            )
        if self.perplexity.conditions_at:
            # names must be conditions (``random@3``, families such as ``dims_high[random]`` included); a
            # condition the sweep does not run is allowed, so one file serves sweeps split across processes
            for length, names in self.perplexity.conditions_at.items():
                for name in names:
                    try:
                        parse_condition(name, option=f"perplexity.conditions_at[{length}]")
                    except ValueError as err:
                        raise ValueError(str(err)) from None
        _optional_positive("threads", self.threads)
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda") or self.device == "mps"):
            raise ValueError(f"device={self.device!r} is not 'auto', 'cpu', 'cuda[:N]' or 'mps'")

    @property
    def evaluates(self) -> bool:
        """Whether any evaluation task (not only identification) runs."""
        return any(t in self.tasks for t in ("perplexity", "perplexity_lc", "passkey", "needle", "retrieval"))

    def max_length(self) -> int:
        """The longest input any selected task feeds the model."""
        lengths = [0]
        if "heads" in self.tasks:
            lengths.append(self.heads.length)
        for task in ("perplexity", "perplexity_lc", "passkey", "needle", "retrieval"):
            if task in self.tasks:
                lengths.extend(getattr(self, task).lengths)
        return max(lengths)

    def planned_forward_tokens(self, num_conditions: int) -> dict[str, float]:
        """Rough cost: tokens through the model per task (retrieval counts each prompt once per condition).
        Perplexity counts are upper bounds when documents are fewer than the caps allow."""
        out: dict[str, float] = {}
        if "heads" in self.tasks:
            out["heads"] = self.heads.length * self.heads.num_sequences
        if "perplexity" in self.tasks:
            p = self.perplexity
            cap = p.max_windows if p.max_windows is not None else math.inf
            out["perplexity"] = sum(L * cap for L in p.lengths) * num_conditions
        for task in ("passkey", "needle"):
            if task in self.tasks:
                s = getattr(self, task)
                out[task] = sum(s.lengths) * len(s.depths) * s.trials * num_conditions
        if "retrieval" in self.tasks:
            r = self.retrieval
            cells = sum(len(r.levels(t)) for t in r.tasks)
            out["retrieval"] = sum(r.lengths) * cells * r.trials * num_conditions
        return out
