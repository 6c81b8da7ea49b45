"""The validated configuration of a Positional-Head analysis."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from posheads.heads.capture import PAIR_LAYOUTS
from posheads.heads.hda import CRITICAL_RULES, HDA_VARIANTS
from posheads.heads.scores import DEFAULT_SCORE, PER_PAIR_DISTANCES, SCORE_VARIANTS

__all__ = ["RANK_BY", "HeadsConfig"]

#: ``HeadsConfig.rank_by`` values.
RANK_BY = ("score", "excess")


@dataclass
class HeadsConfig:
    """How to identify Positional Heads and measure their high-dimensional attention allocation.

    Attributes:
        rows_per_sequence: query rows sampled per sequence (stratified over the sequence, seeded).
        keys_per_bin: keys per (head, row, distance bin), ``None`` = all keys (exact, slower); see
            :mod:`posheads.heads.stats` for the sampling (unbiased, exact for bins of at most ``ceil(C/2)`` keys).
        num_bins: log2 distance bins; ``None`` = enough for the sequence length.
        score: positional score variant (:data:`~posheads.heads.scores.SCORE_VARIANTS`).
        per_pair_distance: ``"linear"`` (``delta``) or ``"log"`` for the per-pair score variants.
        rank_by: what heads are ranked (and ``z`` computed) on: ``"score"`` (default) or ``"excess"``
            (``score - null``). The score is reproducible to ~1e-4 across devices and PyTorch versions; the
            null is one permutation draw per head, whose noise (sd ~0.03 in SmolLM2) moved 5 of the top 27
            heads between two PyTorch versions under ``excess`` (docs/results.md). The null stays reported.
        top_fraction: Positional Heads = the top fraction of heads by ``rank_by`` (``None``: no such rule).
        z_threshold: ... and/or the heads with ``z >= z_threshold`` (``None``: no such rule).
        combine: ``"and"`` / ``"or"`` when both selection rules are set.
        critical: ``i_c`` rule: ``"critical"`` (critical dimension of the original context), ``"quarter"``
            (``d/4``) or a pair index.
        original_context: override the original (pre-training) context used by ``critical``.
        hda_variant: ``"hard"`` (dominant pair) or ``"soft"`` (pair shares).
        tau: HDA threshold of the extension.
        temperature: ``T`` in the pair shares ``p = softmax(g / T)``.
        layout: RoPE pair layout: ``"auto"`` (default: the model's RoPE description, derived from its config and
            verified on the model, :mod:`posheads.rope.layout`); ``"half"`` (rotate-half) or ``"interleaved"``
            are accepted only when they agree with it.
        batch_size: sequences per forward pass.
        seed: seeds rows, key sampling and the permuted-position null.
        chunk_elements: memory bound of one statistics chunk (``heads x bins x rows x keys x pairs``).
        profile_head: ``(layer, head)`` for the per-pair contribution plot; ``None`` = the top-scoring head.
        sink_keys: ``k``: the keys at positions ``n < k`` (attention sinks: the first token(s), which many heads
            attend to whatever the distance) are left out of every statistic -- scores, null, HDA, pair
            profiles. They are accumulated exactly on the side, so the analysis also reports every head's
            score with them (``score_with_sinks``) and its attention share on the first ``max(k, 1)`` keys
            (``sink_share``). ``0`` keeps every key. Default 1 (evidence in docs/definitions.md).
        geometry_null: also compute the RoPE-geometry null (``null_geometry``: the same statistics with the key
            content shuffled over positions and re-rotated, see :mod:`posheads.heads.stats`); doubles the
            statistics pass's own cost (not the forwards').
    """

    rows_per_sequence: int = 64
    keys_per_bin: int | None = 8
    num_bins: int | None = None
    score: str = DEFAULT_SCORE
    per_pair_distance: str = "linear"
    rank_by: str = "score"
    top_fraction: float | None = 0.10
    z_threshold: float | None = None
    combine: str = "and"
    critical: str | int = "critical"
    original_context: int | None = None
    hda_variant: str = "hard"
    tau: float = 0.5
    temperature: float = 1.0
    layout: str = "auto"
    batch_size: int = 1
    seed: int = 0
    chunk_elements: int = 1 << 20
    profile_head: tuple[int, int] | None = None
    sink_keys: int = 1
    geometry_null: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False, minimum: int = 1) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"heads.{name}={value!r} must be an int >= {minimum}")

        positive_int("rows_per_sequence")
        positive_int("keys_per_bin", allow_none=True, minimum=2)
        positive_int("num_bins", allow_none=True)
        positive_int("batch_size")
        positive_int("chunk_elements")
        positive_int("sink_keys", minimum=0)
        if not isinstance(self.geometry_null, bool):
            raise ValueError(f"heads.geometry_null={self.geometry_null!r} must be true or false")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"heads.seed={self.seed!r} must be an int >= 0")
        if self.score not in SCORE_VARIANTS:
            raise ValueError(f"heads.score={self.score!r} is not one of {list(SCORE_VARIANTS)}")
        if self.per_pair_distance not in PER_PAIR_DISTANCES:
            raise ValueError(
                f"heads.per_pair_distance={self.per_pair_distance!r} is not one of {list(PER_PAIR_DISTANCES)}"
            )
        if self.rank_by not in RANK_BY:
            raise ValueError(f"heads.rank_by={self.rank_by!r} is not one of {list(RANK_BY)}")
        if self.top_fraction is None and self.z_threshold is None:
            raise ValueError(
                "heads.top_fraction=None and heads.z_threshold=None: set at least one selection rule"
            )
        if self.top_fraction is not None and not (
            isinstance(self.top_fraction, (int, float)) and 0 < self.top_fraction <= 1
        ):
            raise ValueError(f"heads.top_fraction={self.top_fraction!r} must be in (0, 1]")
        if self.z_threshold is not None and not isinstance(self.z_threshold, (int, float)):
            raise ValueError(f"heads.z_threshold={self.z_threshold!r} must be a number")
        if self.combine not in ("and", "or"):
            raise ValueError(f"heads.combine={self.combine!r} is not one of ['and', 'or']")
        if isinstance(self.critical, str) and self.critical.lstrip("-").isdigit():
            self.critical = int(self.critical)
        if isinstance(self.critical, bool) or not (
            self.critical in CRITICAL_RULES or (isinstance(self.critical, int) and self.critical >= 0)
        ):
            raise ValueError(
                f"heads.critical={self.critical!r} is not one of {list(CRITICAL_RULES)} or a pair index >= 0"
            )
        positive_int("original_context", allow_none=True)
        if self.hda_variant not in HDA_VARIANTS:
            raise ValueError(f"heads.hda_variant={self.hda_variant!r} is not one of {list(HDA_VARIANTS)}")
        if not (isinstance(self.tau, (int, float)) and 0 <= self.tau <= 1):
            raise ValueError(f"heads.tau={self.tau!r} must be in [0, 1]")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"heads.temperature={self.temperature!r} must be > 0")
        if self.layout not in ("auto", *PAIR_LAYOUTS):
            raise ValueError(f"heads.layout={self.layout!r} is not one of {['auto', *PAIR_LAYOUTS]}")
        if self.profile_head is not None:
            ph = tuple(self.profile_head)
            if len(ph) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in ph):
                raise ValueError(
                    f"heads.profile_head={self.profile_head!r} must be a (layer, head) pair of ints"
                )
            self.profile_head = (int(ph[0]), int(ph[1]))

    def validate_for(self, num_layers: int, num_heads: int, head_dim: int, length: int | None = None) -> None:
        """Check the model-dependent options (head indices, pair index, sink keys) against a model's shape
        (``head_dim``: the rotary width, twice the number of RoPE pairs) and the probe length."""
        if length is not None and self.sink_keys >= length:
            raise ValueError(
                f"heads.sink_keys={self.sink_keys} leaves no key of a {length}-token probe sequence; "
                f"it must be < {length}"
            )
        if self.profile_head is not None:
            layer, head = self.profile_head
            if not 0 <= layer < num_layers:
                raise ValueError(
                    f"heads.profile_head={self.profile_head!r}: layer {layer} out of range 0..{num_layers - 1}"
                )
            if not 0 <= head < num_heads:
                raise ValueError(
                    f"heads.profile_head={self.profile_head!r}: head {head} out of range 0..{num_heads - 1}"
                )
        if isinstance(self.critical, int) and self.critical > head_dim // 2:
            raise ValueError(
                f"heads.critical={self.critical} exceeds the number of RoPE pairs {head_dim // 2}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.profile_head is not None:
            out["profile_head"] = list(self.profile_head)
        return out
