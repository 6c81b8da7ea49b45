"""Per-pair attention statistics accumulated in one pass over a probe set.

For one head (notation of docs/definitions.md, after Hong et al., arXiv 2410.08703): query position
``m``, key ``n <= m``, distance ``delta = m - n``, post-RoPE ``q~``, ``k~``, per-pair contribution
``g_i = q~[i] k~[i] + q~[i + d/2] k~[i + d/2]`` (``sum_i g_i = q~ . k~``), dominant pair ``D = argmax_i g_i``,
pair shares ``p = softmax_i(g_i / T)``, soft dominant pair ``S = sum_i i p_i``, the head's attention
probability ``a(m, n)``, and ``x = log(1 + delta)``.

Every statistic of the analysis is a function of sums over (query, key) pairs, kept per
(layer, head, log2 distance bin, pair) and for two weightings ``w``: ``0`` = unweighted (each causal pair
counts 1), ``1`` = attention-weighted (each pair counts ``a(m, n)``). The sums merge by addition across
batches and processes (:meth:`PairStats.merge`, :func:`all_reduce`), so the statistics of a probe set do not
depend on how it was batched or sharded.

**Distance bins.** Bin 0 holds ``delta = 0``, bin ``b >= 1`` holds ``2^(b-1) <= delta < 2^b``; the last bin
also collects every larger distance.

**Permuted-position null.** The distances of all valid (query, key) pairs of the sampled rows of one sequence
are permuted among themselves (seeded): pair ``(m, n)`` gets the distance ``delta'`` of a random other pair of
the same sequence. The null sums use ``delta'`` in place of ``delta`` with the same ``D``, ``p`` and ``a``,
which keeps the sequence's distance distribution and the attention pattern but makes ``delta'`` independent of
the pair allocation, so every null correlation has expectation 0. (Permuting only within each query row
would keep the between-row association -- rows late in the sequence have both longer distances and, for a
positional head, higher pairs -- and give a positional head a clearly positive null.)

**Attention sinks** (``sink_keys = k``). The pairs whose key position is ``n < k`` are left out of every sum
of :attr:`PairStatsCollector.stats` -- the keys are excluded before sampling -- and accumulated exactly (every
such key, never sampled) into :attr:`PairStatsCollector.sink_stats`, so ``stats + sink_stats`` are the sums
over all keys from the same pass. The attention probabilities stay the model's own (normalised over every key,
sinks included); the attention on the first ``max(k, 1)`` positions is recorded per head (``sink_mass``).

**RoPE-geometry null** (``geometry_null``). The permuted-position null above has expectation 0 by construction,
but a head whose q/k content does not depend on position at all still gets a positive score from RoPE alone
(high-frequency pairs decorrelate with distance, low-frequency ones do not). The geometry null measures that
baseline for each head: the key content is shuffled over the sequence's positions ``>= k`` and re-rotated at
its new position (``k'_n = R_n k_{s(n)}``, un-rotating the captured ``k~`` with the model's own frequencies),
the queries, the sink keys and the distances are kept, the attention is recomputed, and every statistic is
accumulated again (:attr:`PairStatsCollector.geometry_stats`). A head whose key content carries no
information about its position scores the same on the shuffled keys (for position-independent content the
two are identical); the excess over it is what the key content's arrangement in the sequence adds.

**Sampling and cost.** Query rows are sampled (stratified over each sequence, seeded: :func:`sample_query_rows`);
each row's full logit row ``q~_m . K~[:m+1]`` (``O(rows x L x d)``) gives the exact attention probabilities.
Keys are then taken either all (``keys_per_bin=None``: every sum is exact for the sampled rows) or stratified
by distance bin with ``C = keys_per_bin`` keys per (head, row, bin): bins with at most ``ceil(C/2)`` keys are
enumerated exactly; every larger bin gets ``ceil(C/2)`` keys drawn uniformly among its valid keys (shared by
the heads) and ``C - ceil(C/2)`` keys drawn in proportion to the head's attention inside the bin, with
Horvitz-Thompson weights for the deterministic mixture (see :meth:`PairStatsCollector._sampled_blocks`), so
every sum -- unweighted and attention-weighted -- is an unbiased estimate. The cost per layer is then
``O(rows x heads x log L x C x d/2)`` for the per-pair work, independent of ``L`` but for the logit rows.
The work runs in chunks of bounded size (never an ``L x L x d/2`` tensor), batched over heads, bins and rows,
reduces with one batched matrix product per quantity, and builds the histograms with ``index_add_`` into
fixed-size buffers. Sums are
float32 within one layer's chunks and float64 across layers, batches and processes; the soft pair is
accumulated centred (``S - (P-1)/2``) for a well-conditioned variance.

**No host synchronisation in the layers.** A plan given with its padding mask (``RowPlan(rows, seed, valid)``,
as :func:`posheads.heads.identify_positional_heads` and the tracker's probe pass do) is prepared when it is
assigned, before the forward: row order, per-sequence selections, every layer's null permutation, key-sampling
draws and geometry-null shuffles are drawn on the host with the same generators and moved to the device once.
The per-layer work then only launches kernels -- no ``.item()``, ``.tolist()``, ``nonzero`` or data-dependent
shapes, no Python branching on tensor values (``tests/test_heads_stats_sync.py`` runs the layers under a guard
that raises on any of them, and ``torch.cuda.set_sync_debug_mode("error")`` on a GPU); the sums are bit for bit
those of a plan prepared inside the layers.

**Pairs and content.** Where the RoPE pairs of each layer are (layout, rotary width, MLA offset) comes from
the verified description of :mod:`posheads.rope.layout` (``layout=`` a :class:`~posheads.rope.layout.ModelRope`):
pairs ``0..P-1`` are its rotary pairs only. The pass-through components of partial-rotary and MLA heads are no
pair: their logit contribution ``c = sum_pass q~ k~`` enters the attention probabilities (which use the whole
logit ``scaling * (sum_i g_i + c)``, soft-capped when the model soft-caps, Gemma 2) and is accumulated on its
own in :attr:`PairStats.content` (the "content" share).

**Spearman.** Ranks are taken at bin level: distances within one log2 bin are treated as ties, so the
weighted Spearman correlation of ``(delta, D)`` is computed exactly (with mid-ranks) from the joint
(bin, dominant pair) histogram ``dom``. This keeps the pass single and the memory ``O(bins x pairs)``.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from posheads.heads.capture import PAIR_LAYOUTS, AttentionCall, to_half_layout

__all__ = [
    "DIST_TERMS",
    "FEATURE_TERMS",
    "PairStats",
    "PairStatsCollector",
    "RowPlan",
    "all_reduce",
    "bin_edges",
    "distance_bin",
    "num_bins_for",
    "sample_query_rows",
]

# Row factors of the moment sums: sum_w  f(pair) * {1, x, delta, x_null, delta_null}
DIST_TERMS = ("one", "x", "delta", "x_null", "delta_null")
# Column factors of the scalar moment sums; "S2" is the squared *centred* soft pair (S - (P-1)/2)^2
FEATURE_TERMS = ("one", "x", "delta", "x_null", "delta_null", "D", "S2")
UNWEIGHTED, WEIGHTED = 0, 1


# ----------------------------------------------------------------------------------------------- bins


def num_bins_for(max_length: int) -> int:
    """Number of log2 distance bins needed for sequences of ``max_length`` tokens (max distance L - 1)."""
    if max_length < 1:
        raise ValueError(f"max_length={max_length!r} must be >= 1")
    return 1 if max_length == 1 else (max_length - 1).bit_length() + 1


def bin_edges(num_bins: int) -> list[tuple[int, int]]:
    """``[(lo, hi)]`` distance range of every bin (``hi`` exclusive; the last bin is open-ended in use)."""
    return [(0, 1)] + [(1 << (b - 1), 1 << b) for b in range(1, num_bins)]


def distance_bin(delta: torch.Tensor, num_bins: int, edges: torch.Tensor | None = None) -> torch.Tensor:
    """Bin index of integer distances: 0 for 0, ``floor(log2 delta) + 1`` otherwise, clamped to the last bin.
    ``edges``: the bin edges ``[1, 2, 4, ...]`` already on ``delta``'s device (no host-to-device copy)."""
    if edges is None:
        edges = torch.tensor([1 << b for b in range(num_bins - 1)], device=delta.device, dtype=delta.dtype)
    return torch.bucketize(delta.contiguous(), edges, right=True).clamp_(max=num_bins - 1)


# ------------------------------------------------------------------------------------------ accumulators


@dataclass
class PairStats:
    """Sums per (weighting, layer, head, bin, ...) -- see the module docstring for the notation.

    Axis 0 is the weighting (0 unweighted, 1 attention-weighted). Shapes with ``W=2, NL`` layers, ``H`` heads,
    ``NB`` bins, ``P = d/2`` pairs:

    Attributes:
        dom: ``[W, NL, H, NB, P]`` dominant-pair histogram: ``sum w [D = i]`` with the pair's true bin.
        dom_null: ``[W, NL, H, NB, P]`` the same with the bin of the permuted distance ``delta'``.
        g: ``[W, NL, H, NB, P]`` ``sum w g_i``.
        pp: ``[W, NL, H, NB, P]`` ``sum w p_i^2``.
        p: ``[W, NL, H, NB, 5, P]`` ``sum w t p_i`` for ``t`` in :data:`DIST_TERMS`.
        moments: ``[W, NL, H, NB, 5, 7]`` ``sum w t f`` for ``t`` in :data:`DIST_TERMS`, ``f`` in
            :data:`FEATURE_TERMS` (e.g. ``[..., 1, 5]`` is ``sum w x D``; ``[..., 0, 0]`` the bin's mass).
        rows: ``[]`` number of query rows accumulated (summed over layers once, i.e. per forward).
        content: ``[W, NL, H, NB, 3]``: ``sum w c``, ``sum w |c|`` and ``sum w sum_i |g_i|`` with ``c`` the
            pass-through ("content") logit contribution (0 for fully rotary heads); the content share of the
            logit magnitude is ``content[..., 1] / (content[..., 1] + content[..., 2])``.
        sink_mass: ``[NL, H, S]`` ``sum_rows a(m, n)`` for the first ``S`` key positions ``n = 0 .. S-1``
            (exact: from the full attention row, whatever ``keys_per_bin``); ``sink_mass / rows`` is the mean
            attention share of key ``n`` over the sampled query rows.
        sink_sq: ``[NL, H]`` ``sum_rows (sum_{n < S} a(m, n))^2`` (the per-row sink share's second moment, for
            its standard error).
    """

    dom: torch.Tensor
    dom_null: torch.Tensor
    g: torch.Tensor
    pp: torch.Tensor
    p: torch.Tensor
    moments: torch.Tensor
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    content: torch.Tensor | None = None
    sink_mass: torch.Tensor = None  # type: ignore[assignment]  # zeros [NL, H, 1] when not given
    sink_sq: torch.Tensor = None  # type: ignore[assignment]  # zeros [NL, H] when not given

    def __post_init__(self) -> None:
        # statistics saved before the content / sink sums existed get zeros
        if self.content is None:
            self.content = torch.zeros((*self.dom.shape[:4], 3), dtype=torch.float64, device=self.dom.device)
        shape = self.dom.shape[1:3]
        if self.sink_mass is None:
            self.sink_mass = torch.zeros((*shape, 1), dtype=torch.float64, device=self.dom.device)
        if self.sink_sq is None:
            self.sink_sq = torch.zeros(shape, dtype=torch.float64, device=self.dom.device)

    def content_share(self, weighting: int = 1) -> torch.Tensor:
        """``[NL, H, NB]`` share of the logit magnitude carried by the pass-through components (NaN: no mass)."""
        c = self.content[weighting]  # type: ignore[index]
        den = c[..., 1] + c[..., 2]
        return torch.where(den > 0, c[..., 1] / den.clamp(min=1e-300), torch.full_like(den, float("nan")))

    @classmethod
    def zeros(
        cls,
        num_layers: int,
        num_heads: int,
        num_bins: int,
        num_pairs: int,
        device: Any = None,
        sink_positions: int = 1,
    ) -> PairStats:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        base = (2, num_layers, num_heads, num_bins)
        return cls(
            dom=z(*base, num_pairs),
            dom_null=z(*base, num_pairs),
            g=z(*base, num_pairs),
            pp=z(*base, num_pairs),
            p=z(*base, len(DIST_TERMS), num_pairs),
            moments=z(*base, len(DIST_TERMS), len(FEATURE_TERMS)),
            rows=z(),
            content=z(*base, 3),
            sink_mass=z(num_layers, num_heads, sink_positions),
            sink_sq=z(num_layers, num_heads),
        )

    @property
    def num_layers(self) -> int:
        return self.dom.shape[1]

    @property
    def num_heads(self) -> int:
        return self.dom.shape[2]

    @property
    def num_bins(self) -> int:
        return self.dom.shape[3]

    @property
    def num_pairs(self) -> int:
        return self.dom.shape[4]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _check_compatible(self, other: PairStats) -> None:
        for name, t in self.tensors().items():
            o = getattr(other, name)
            if t.shape != o.shape:
                raise ValueError(
                    f"cannot merge PairStats: {name} has shape {tuple(t.shape)} vs {tuple(o.shape)}"
                )

    def merge(self, other: PairStats) -> PairStats:
        """In-place sum (returns ``self``)."""
        self._check_compatible(other)
        for name, t in self.tensors().items():
            t.add_(getattr(other, name).to(t.device))
        return self

    def __add__(self, other: PairStats) -> PairStats:
        return self.clone().merge(other)

    def clone(self) -> PairStats:
        return PairStats(**{k: v.clone() for k, v in self.tensors().items()})

    def to(self, device: Any) -> PairStats:
        return PairStats(**{k: v.to(device) for k, v in self.tensors().items()})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.tensors().items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PairStats:
        """Inverse of :meth:`state_dict` (sums saved before the sink fields existed get zero sink sums)."""
        return cls(**{f.name: state[f.name].to(torch.float64) for f in fields(cls) if f.name in state})

    # ---- convenient views (all float64)
    def mass(self, weighting: int = WEIGHTED) -> torch.Tensor:
        """``[NL, H, NB]`` total weight per bin (attention mass, or pair count for ``weighting=0``)."""
        return self.moments[weighting, ..., 0, 0]

    @property
    def sink_positions(self) -> int:
        """Number of first key positions whose attention mass is recorded (``sink_mass.shape[-1]``)."""
        return self.sink_mass.shape[-1]

    def sink_share(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(share, standard error)`` ``[NL, H]``: mean over the sampled query rows of the attention on the
        first :attr:`sink_positions` keys, and the standard error of that mean (``rows`` rows, treated as
        independent; NaN with fewer than 2 rows)."""
        n = float(self.rows)
        if n < 1:
            nan = torch.full(self.sink_sq.shape, float("nan"), dtype=torch.float64)
            return nan, nan.clone()
        total = self.sink_mass.sum(-1)
        mean = total / n
        if n < 2:
            return mean, torch.full_like(mean, float("nan"))
        var = ((self.sink_sq - n * mean.square()) / (n - 1)).clamp(min=0)
        return mean, (var / n).sqrt()


def all_reduce(stats: PairStats, group: Any = None) -> PairStats:
    """Sum ``stats`` in place over all processes when ``torch.distributed`` is initialised (else a no-op)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for t in stats.tensors().values():
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return stats


# ------------------------------------------------------------------------------------------ row sampling


def sample_query_rows(valid: torch.Tensor, num_rows: int, seeds: list[int] | int) -> torch.Tensor:
    """Stratified query rows: ``valid [B, L]`` bool (non-padding positions) -> ``LongTensor [B, R]``.

    The valid positions of each sequence are cut into ``num_rows`` equal strata and one position is drawn
    uniformly in each (seeded per sequence by ``seeds[b]``, so a sequence gets the same rows whatever batch
    it is in). Sequences with fewer valid positions than ``num_rows`` use all of them; missing rows are -1.
    """
    if num_rows < 1:
        raise ValueError(f"rows_per_sequence={num_rows!r} must be >= 1")
    b_count = valid.shape[0]
    seed_list = [seeds + b for b in range(b_count)] if isinstance(seeds, int) else list(seeds)
    if len(seed_list) != b_count:
        raise ValueError(f"seeds has {len(seed_list)} entries for a batch of {b_count}")
    out = torch.full((b_count, num_rows), -1, dtype=torch.long)
    for b in range(b_count):
        positions = valid[b].nonzero().flatten().cpu()  # [n]
        n = positions.numel()
        if n <= num_rows:
            out[b, :n] = positions
            continue
        gen = torch.Generator().manual_seed(int(seed_list[b]))
        lo = (torch.arange(num_rows) * n) // num_rows  # stratum starts
        hi = (torch.arange(1, num_rows + 1) * n) // num_rows
        pick = lo + (torch.rand(num_rows, generator=gen, dtype=torch.float64) * (hi - lo)).long()
        out[b] = positions[pick.clamp(max=n - 1)]
    return out


@dataclass
class RowPlan:
    """The query rows of one forward pass and the seed of its null permutation and key sampling.

    Attributes:
        rows: ``[B, R]`` query positions (indices along the sequence), -1 for none.
        seed: seeds the permuted-position null and the key sampling.
        valid: optional host ``[B, L]`` boolean padding mask of the forward's tokens (True = token). Given it,
            the collector builds everything that depends only on the plan -- row order, per-batch selections,
            the null permutations, the key-sampling draws and the geometry null's key permutations of every
            layer -- when the plan is assigned, before the forward, so the per-layer work runs without a host
            synchronisation (:class:`PairStatsCollector`); the results are the same. Without it they are
            derived inside each layer from the forward's mask (which may then also restrict keys beyond
            causality and padding, e.g. a sliding window; a prepared plan assumes causal + padding).
    """

    rows: torch.Tensor
    seed: int
    valid: torch.Tensor | None = None
    done_layers: set[int] = field(default_factory=set)
    _null: dict[int, Any] = field(default_factory=dict, repr=False)
    _prep: Any = field(default=None, repr=False)

    def null_map(self, layer: int) -> dict[tuple[int, int], torch.Tensor]:
        """``{(batch, position): LongTensor [Lmax]}``: the permuted distance ``delta'`` of each distance
        ``delta`` of a sampled row in ``layer`` (meaningful for the row's valid distances), once it has run."""
        entry = self._null.get(layer)
        if entry is None:
            return {}
        null, (b_idx, pos) = entry
        return {(int(b), int(m)): null[j].cpu() for j, (b, m) in enumerate(zip(b_idx, pos))}


# ------------------------------------------------------------------------------------------------ collector


@dataclass
class _Rows:
    """Sampled rows of one call, sorted by position (flattened over the batch)."""

    batch: torch.Tensor  # [N] batch index
    pos: torch.Tensor  # [N] query position m (sorted ascending)
    q: torch.Tensor  # [H, N, d] post-RoPE query (half layout, float32)
    a_delta: torch.Tensor  # [H, N, Lmax] attention probability of the key at distance delta (0 if invalid
    # or a sink key: the probabilities are normalised over every attendable key, sinks included)
    valid_delta: torch.Tensor  # [N, Lmax] float: 1 where the key at distance delta is attendable, not a sink
    null_delta: torch.Tensor  # [N, Lmax] long: permuted distance delta' (valid entries only)
    sink_a: torch.Tensor  # [H, N, S] attention probability of key position n = 0 .. S-1 (0 if not attendable)
    sink_valid: torch.Tensor  # [N, S] float: 1 where key position n = 0 .. S-1 is attendable from the row
    pos_list: list[int] = field(default_factory=list)  # pos on the host
    prep: Any = None  # the plan's _Prepared (device constants, key-sampling draws) or None


@dataclass
class _Prepared:
    """What the per-layer work needs that depends only on the plan, built on the host when the plan is assigned
    (before the forward) and moved to the device once: no host synchronisation is left in the layers."""

    b_idx: torch.Tensor  # [N] batch index, device
    pos: torch.Tensor  # [N] query position (ascending), device
    b_list: list[int]
    pos_list: list[int]
    batches: list[tuple[int, torch.Tensor]]  # (batch element, its rows' indices into N on the device)
    l_max: int
    n_rows: float
    nulls: dict[int, torch.Tensor]  # layer -> [N, Lmax] permuted distances, device
    draws: dict[int, list[torch.Tensor]]  # layer -> the key sampling's uniform draws, in order of use, device
    shuffles: dict[
        int, list[tuple[torch.Tensor, torch.Tensor]]
    ]  # layer -> per batch (target, source), device
    lo: torch.Tensor  # [nb] device
    hi: torch.Tensor  # [nb] device
    present_bins: torch.Tensor  # [nb] device
    edges: torch.Tensor  # distance bin edges, device


@dataclass
class _Block:
    """Key slots of a layer: ``nb`` consecutive bins from ``first_bin``, ``c`` slots per (bin, row).

    ``delta [X, nb, N, c]`` (``X`` = 1: shared by the heads; ``H``: per head), ``w_u [1 or H, nb, N, c]`` and
    ``w_a [H, nb, N, c]`` the slot's unweighted and attention-weighted weights (0 = unused slot).
    """

    delta: torch.Tensor
    w_u: torch.Tensor
    w_a: torch.Tensor
    first_bin: int

    def __post_init__(self) -> None:  # the chunk kernel flattens (bin, row, slot) views
        self.delta = self.delta.contiguous()
        self.w_u = self.w_u.contiguous()
        self.w_a = self.w_a.contiguous()


class _LayerSums:
    """float32 sums of one layer (added to the float64 :class:`PairStats` once per layer)."""

    def __init__(self, heads: int, bins: int, pairs: int, device: Any) -> None:
        def z(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        self.p = z(2, heads, bins, len(DIST_TERMS), pairs)
        self.moments = z(2, heads, bins, len(DIST_TERMS), len(FEATURE_TERMS))
        self.g = z(2, heads, bins, pairs)
        self.pp = z(2, heads, bins, pairs)
        self.dom = z(2, heads * bins * pairs)
        self.dom_null = z(2, heads * bins * pairs)
        self.content = z(2, heads, bins, 3)

    def add_to(self, stats: PairStats, layer: int) -> None:
        dev = stats.dom.device
        stats.p[:, layer] += self.p.to(dev, torch.float64)
        stats.moments[:, layer] += self.moments.to(dev, torch.float64)
        stats.g[:, layer] += self.g.to(dev, torch.float64)
        stats.pp[:, layer] += self.pp.to(dev, torch.float64)
        stats.dom[:, layer] += self.dom.to(dev, torch.float64).view_as(stats.dom[:, layer])
        stats.dom_null[:, layer] += self.dom_null.to(dev, torch.float64).view_as(stats.dom_null[:, layer])
        stats.content[:, layer] += self.content.to(dev, torch.float64)  # type: ignore[index]


class PairStatsCollector:
    """Attention hook that accumulates :class:`PairStats` for every layer it is installed on.

    Use with :func:`posheads.heads.capture.attention_hooks`; set :attr:`plan` before each forward pass (or leave
    it ``None`` to sample ``rows_per_sequence`` rows per sequence automatically with a per-forward seed).
    Runs under ``torch.no_grad``; the attention itself is not modified. A layer is never counted twice for
    one plan (activation recomputation re-runs attention), so set a fresh plan for every forward.

    Args:
        num_layers, num_heads, head_dim: model shape.
        num_bins: distance bins (:func:`num_bins_for` of the longest sequence).
        rows_per_sequence: rows sampled per sequence when no plan is set.
        keys_per_bin: ``None`` = all keys (exact); else ``C`` (see the module docstring).
        temperature: ``T`` in ``p = softmax(g / T)``.
        layout: a :class:`~posheads.rope.layout.ModelRope` (where each layer's pairs are; ``head_dim`` is then
            its number of pairs times 2), or ``"half"`` / ``"interleaved"`` for a fully rotary head.
        chunk_elements: bound on ``heads x rows x keys x pairs`` elements per chunk (memory/speed trade-off).
        seed: base seed of automatic plans.
        sink_keys: ``k``: the (query, key) pairs with key position ``n < k`` (attention sinks) are left out of
            :attr:`stats` and accumulated exactly (every such key, never sampled) into :attr:`sink_stats`, so
            ``stats + sink_stats`` are the sums over all keys. The attention probabilities stay the model's
            (normalised over every key). ``stats.sink_mass`` records the attention on the first
            ``max(k, 1)`` positions.
        geometry_null: also accumulate :attr:`geometry_stats`, the statistics of the RoPE-geometry null (see
            the module docstring), with the frequencies of ``layout`` (a description) or ``rope_inv_freq``.
        rope_inv_freq: RoPE frequencies ``theta_i`` ``[P]`` for the geometry null, or a callable returning them
            at hook time; overrides those of the description.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        num_bins: int,
        *,
        rows_per_sequence: int = 64,
        keys_per_bin: int | None = 8,
        temperature: float = 1.0,
        layout: Any = "half",
        chunk_elements: int = 1 << 20,
        seed: int = 0,
        device: Any = None,
        sink_keys: int = 0,
        geometry_null: bool = False,
        rope_inv_freq: torch.Tensor | Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if not isinstance(layout, str) and layout.num_pairs * 2 != head_dim:
            raise ValueError(
                f"head_dim={head_dim!r} must be twice the description's {layout.num_pairs} RoPE pairs"
            )
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim!r} must be even")
        if keys_per_bin is not None and keys_per_bin < 2:
            raise ValueError(f"keys_per_bin={keys_per_bin!r} must be >= 2 or None")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if num_bins < 1:
            raise ValueError(f"num_bins={num_bins!r} must be >= 1")
        if not isinstance(sink_keys, int) or isinstance(sink_keys, bool) or sink_keys < 0:
            raise ValueError(f"sink_keys={sink_keys!r} must be an int >= 0")
        if geometry_null and rope_inv_freq is None and isinstance(layout, str):
            raise ValueError(
                "geometry_null=True needs the RoPE frequencies: a RoPE description as layout, or rope_inv_freq"
            )
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_pairs = head_dim // 2
        self.num_bins = num_bins
        self.rows_per_sequence = rows_per_sequence
        self.keys_per_bin = keys_per_bin
        self.temperature = float(temperature)
        self.layout = layout
        self.chunk_elements = int(chunk_elements)
        self.seed = seed
        self.sink_keys = sink_keys
        self.sink_positions = max(sink_keys, 1)
        self.stats = self._zeros(num_layers, device)
        #: sums over the sink pairs (key position ``n < sink_keys``); ``None`` when ``sink_keys == 0``
        self.sink_stats: PairStats | None = self._zeros(num_layers, device) if sink_keys else None
        #: sums of the RoPE-geometry null (key content shuffled over positions, re-rotated); ``None`` if off
        self.geometry_stats: PairStats | None = self._zeros(num_layers, device) if geometry_null else None
        self.rope_inv_freq = rope_inv_freq
        self._plan: RowPlan | None = None
        self._orders: dict[int, torch.Tensor | None] = {}  # layer -> pair order on the device
        self._inv_freq: dict[int, torch.Tensor] = {}  # layer -> float64 RoPE frequencies on the device
        self._auto_forwards = 0
        self._auto = False
        self.seconds = 0.0  # wall time spent inside the hook (the statistics pass's own cost)

    def _zeros(self, num_layers: int, device: Any) -> PairStats:
        return PairStats.zeros(
            num_layers, self.num_heads, self.num_bins, self.num_pairs, device, self.sink_positions
        )

    def reset(self) -> PairStats:
        """Return the accumulated statistics (:attr:`stats`) and start from zero (sink sums included)."""
        device = self.stats.dom.device
        out, self.stats = self.stats, self._zeros(self.stats.num_layers, device)
        if self.sink_stats is not None:
            self.sink_stats = self._zeros(self.stats.num_layers, device)
        if self.geometry_stats is not None:
            self.geometry_stats = self._zeros(self.stats.num_layers, device)
        return out

    # ---- plan handling
    @property
    def plan(self) -> RowPlan | None:
        """The rows of the next forward; a plan with ``valid`` is prepared at assignment (see :class:`RowPlan`)."""
        return self._plan

    @plan.setter
    def plan(self, plan: RowPlan | None) -> None:
        if plan is not None and plan.valid is not None and plan._prep is None:
            plan._prep = self._prepare_plan(plan)
        self._plan = plan

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        device = self.stats.dom.device
        if device.type == "cuda":  # pinned + non-blocking: no synchronisation
            return t.pin_memory().to(device, non_blocking=True)
        return t.to(device)

    def _pair_order(self, layer: int) -> torch.Tensor | None:
        """Component order of ``layer`` (pair ``i`` = ``(i, i + P)``; ``None`` = as is), cached on the device."""
        if layer not in self._orders:
            order: torch.Tensor | None
            if isinstance(self.layout, str):
                d = self.head_dim
                interleaved = self.layout == "interleaved"
                order = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)]) if interleaved else None
            else:
                order = self.layout[layer].order()
            self._orders[layer] = None if order is None else self._to_device(order)
        return self._orders[layer]

    def _layer_inv_freq(self, layer: int) -> torch.Tensor:
        """The layer's RoPE frequencies (float64, on the device; cached unless given as a callable)."""
        if callable(self.rope_inv_freq):
            return torch.as_tensor(self.rope_inv_freq()).to(self.stats.dom.device, torch.float64).flatten()
        if layer not in self._inv_freq:
            if self.rope_inv_freq is not None:
                freq = torch.as_tensor(self.rope_inv_freq)
            else:
                freq = torch.tensor(self.layout[layer].inv_freq)
            self._inv_freq[layer] = self._to_device(freq.to(torch.float64).flatten().cpu())
        return self._inv_freq[layer]

    def _host_draws(self, layer: int, seed: int, n_rows: int, present: list[tuple[int, int, int]]) -> list:
        """The uniform draws :meth:`_sampled_blocks` makes for ``layer`` (same generator, same order)."""
        assert self.keys_per_bin is not None
        gen = torch.Generator().manual_seed(int(seed) * 1009 + layer + 1)
        c = self.keys_per_bin
        c_u, n_bins = (c + 1) // 2, len(present)
        c_a = c - c_u
        out = [torch.rand(1, n_rows, n_bins, c_u, generator=gen)]
        first_large = next((i for i, (_, lo, hi) in enumerate(present) if hi - lo > c_u), n_bins)
        if first_large < n_bins and c_a > 0:
            out.append(torch.rand(self.num_heads, n_rows, n_bins - first_large, c_a, generator=gen))
        return out

    def _host_shuffles(
        self, layer: int, seed: int, valid: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The geometry null's ``(target, source)`` positions of every sequence for ``layer`` (as
        :meth:`_geometry_keys` draws them)."""
        gen = torch.Generator().manual_seed(int(seed) * 15485863 + 3 * layer + 11)
        positions = torch.arange(valid.shape[1])
        out = []
        for b in range(valid.shape[0]):
            target = (valid[b] & (positions >= self.sink_keys)).nonzero().flatten()
            out.append((target, target[torch.randperm(target.numel(), generator=gen)]))
        return out

    def _prepare_plan(self, plan: RowPlan) -> _Prepared:
        """Everything of ``plan`` the layers need (host work, one transfer per tensor), before the forward."""
        assert plan.valid is not None
        rows, valid = plan.rows.cpu(), plan.valid.cpu().bool()
        if valid.dim() != 2 or valid.shape[0] != rows.shape[0]:
            raise ValueError(f"plan.valid has shape {tuple(valid.shape)}, plan.rows {tuple(rows.shape)}")
        b_idx, r_idx = (rows >= 0).nonzero(as_tuple=True)
        pos = rows[b_idx, r_idx]
        if pos.numel() and int(pos.max()) >= valid.shape[1]:
            raise ValueError(
                f"plan.rows contains position {int(pos.max())} >= sequence length {valid.shape[1]}"
            )
        order = torch.argsort(pos, stable=True)
        b_idx, pos = b_idx[order], pos[order]  # [N] sorted by position
        l_max = int(pos.max()) + 1 if pos.numel() else 1
        n_of = pos[:, None] - torch.arange(l_max)[None, :]  # [N, Lmax]
        valid_delta = (n_of >= 0) & valid[b_idx[:, None], n_of.clamp(min=0)]  # causal + padding
        if pos.numel() and not bool(valid_delta[:, 0].all()):
            raise ValueError("plan.rows contains a padding position (a query that cannot attend to itself)")
        present = self._bins_present(l_max)
        nulls: dict[int, torch.Tensor] = {}
        draws: dict[int, list[torch.Tensor]] = {}
        shuffles: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer in range(self.stats.num_layers):
            self._pair_order(layer)
            if not pos.numel():
                continue
            nulls[layer] = self._to_device(self._null_deltas(plan, layer, valid_delta, b_idx))
            if self.keys_per_bin is not None:
                draws[layer] = [
                    self._to_device(u) for u in self._host_draws(layer, plan.seed, len(pos), present)
                ]
            if self.geometry_stats is not None:
                self._layer_inv_freq(layer)
                shuffles[layer] = [
                    (self._to_device(t), self._to_device(s))
                    for t, s in self._host_shuffles(layer, plan.seed, valid)
                ]
        batches = [
            (b, self._to_device((b_idx == b).nonzero().flatten())) for b in torch.unique(b_idx).tolist()
        ]
        return _Prepared(
            b_idx=self._to_device(b_idx),
            pos=self._to_device(pos),
            b_list=b_idx.tolist(),
            pos_list=pos.tolist(),
            batches=batches,
            l_max=l_max,
            n_rows=float(pos.numel()),
            nulls=nulls,
            draws=draws,
            shuffles=shuffles,
            lo=self._to_device(torch.tensor([p[1] for p in present], dtype=torch.long)),
            hi=self._to_device(torch.tensor([p[2] for p in present], dtype=torch.long)),
            present_bins=self._to_device(torch.tensor([p[0] for p in present], dtype=torch.long)),
            edges=self._to_device(torch.tensor([1 << b for b in range(self.num_bins - 1)], dtype=torch.long)),
        )

    def _plan_for(self, call: AttentionCall) -> RowPlan | None:
        plan = self.plan
        if plan is None or (self._auto and call.layer_idx in plan.done_layers):
            seed = self.seed + 7919 * self._auto_forwards
            rows = sample_query_rows(call.query_valid(), self.rows_per_sequence, seed)
            plan = RowPlan(rows=rows, seed=seed)
            self.plan, self._auto = plan, True
            self._auto_forwards += 1
        if call.layer_idx in plan.done_layers:
            return None
        return plan

    def __call__(self, module: nn.Module, call: AttentionCall) -> None:
        if call.query.shape[2] != call.key.shape[2]:
            raise ValueError(
                "PairStatsCollector needs a full-sequence forward (query length "
                f"{call.query.shape[2]} != key length {call.key.shape[2]}); run it without a KV cache"
            )
        plan = self._plan_for(call)
        if plan is None:
            return None
        started = time.perf_counter()
        with torch.no_grad():
            k = self._to_pairs(call.key, call.layer_idx)
            rows = self._prepare_rows(call, plan, k)
            if rows is not None:
                layer = call.layer_idx
                k_flat, seq = self._flat_keys(k), k.shape[2]
                sums = _LayerSums(self.num_heads, self.num_bins, self.num_pairs, call.query.device)
                self._accumulate_layer(layer, k_flat, seq, rows, plan, sums)
                sums.add_to(self.stats, layer)
                if self.sink_stats is not None:
                    sink_sums = _LayerSums(self.num_heads, self.num_bins, self.num_pairs, call.query.device)
                    self._block(sink_sums, rows, k_flat, seq, self._sink_block(rows))
                    sink_sums.add_to(self.sink_stats, layer)
                self._add_sink_mass(self.stats, layer, rows)
                if self.geometry_stats is not None:
                    k_null = self._geometry_keys(call, plan, k)
                    rows_null = self._prepare_rows(call, plan, k_null)
                    assert rows_null is not None
                    sums = _LayerSums(self.num_heads, self.num_bins, self.num_pairs, call.query.device)
                    self._accumulate_layer(layer, self._flat_keys(k_null), seq, rows_null, plan, sums)
                    sums.add_to(self.geometry_stats, layer)
                    self._add_sink_mass(self.geometry_stats, layer, rows_null)
        if not plan.done_layers:
            count = plan._prep.n_rows if plan._prep is not None else float((plan.rows >= 0).sum())
            self.stats.rows += count  # (sink_stats.rows stays 0: stats + sink_stats)
            if self.geometry_stats is not None:
                self.geometry_stats.rows += count
        plan.done_layers.add(call.layer_idx)
        self.seconds += time.perf_counter() - started
        return None

    @staticmethod
    def _add_sink_mass(stats: PairStats, layer: int, rows: _Rows) -> None:
        dev = stats.sink_mass.device
        stats.sink_mass[layer] += rows.sink_a.sum(1).to(dev, torch.float64)
        stats.sink_sq[layer] += rows.sink_a.sum(-1).double().square().sum(1).to(dev)

    def _geometry_keys(self, call: AttentionCall, plan: RowPlan, k: torch.Tensor) -> torch.Tensor:
        """The keys of the RoPE-geometry null: ``k'_n = R_n k_{s(n)}``, half layout ``[B, Hkv, L, d]``.

        ``s`` is a random permutation (seeded per plan and layer, one per sequence) of the sequence's
        non-padding positions ``>= sink_keys``; the content ``k_{s(n)} = R_{s(n)}^{-1} k~_{s(n)}`` of position
        ``s(n)`` is rotated to position ``n``, i.e. ``k~_{s(n)}`` is rotated by ``theta_i (n - s(n))`` in pair
        ``i`` (pass-through components move unrotated). Sink keys and padding keep their keys; positions are
        ``0 .. L-1`` (no ``position_ids``). ``k`` is in pair order (:meth:`_to_pairs`).
        """
        prep: _Prepared | None = plan._prep
        inv_freq = self._layer_inv_freq(call.layer_idx).to(k.device)
        if inv_freq.numel() != self.num_pairs:
            raise ValueError(
                f"layer {call.layer_idx}: the RoPE-geometry null needs one frequency per pair, got "
                f"{inv_freq.numel()} for {self.num_pairs} pairs"
            )
        gen = torch.Generator().manual_seed(int(plan.seed) * 15485863 + 3 * call.layer_idx + 11)
        bsz, _, seq, _ = k.shape
        valid = call.query_valid()  # [B, L] non-padding positions
        positions = torch.arange(seq, device=k.device)
        out = k.clone()
        p_dim = self.num_pairs
        for b in range(bsz):
            if prep is not None:  # drawn before the forward
                target, source = prep.shuffles[call.layer_idx][b]
            else:
                target = (valid[b] & (positions >= self.sink_keys)).nonzero().flatten()  # n
                source = target[torch.randperm(target.numel(), generator=gen).to(k.device)]  # s(n)
            angle = (target - source).double()[:, None] * inv_freq[None, :]  # [n, P]
            cos, sin = angle.cos(), angle.sin()
            x = k[b][:, source].double()  # [Hkv, n, d]: pairs (i, i + P), then pass-through components
            x1, x2, rest = x[..., :p_dim], x[..., p_dim : 2 * p_dim], x[..., 2 * p_dim :]
            rotated = [x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest]  # pass-through: moved, not rotated
            out[b][:, target] = torch.cat(rotated, -1).to(k.dtype)
        return out

    # ---- per-layer preparation: rows, attention probabilities, null permutation
    def _prepare_rows(self, call: AttentionCall, plan: RowPlan, k: torch.Tensor) -> _Rows | None:
        """Sampled rows, their exact attention rows over the keys ``k`` (pair order, ``[B, Hkv, L, d]``),
        the sink keys' attention and the null permutation."""
        device = call.query.device
        bsz, n_heads, seq, _ = call.query.shape
        if n_heads != self.num_heads:
            raise ValueError(
                f"layer {call.layer_idx} has {n_heads} heads, the collector expects {self.num_heads}"
            )
        if plan.rows.shape[0] != bsz:
            raise ValueError(f"plan.rows has batch {plan.rows.shape[0]}, the forward has batch {bsz}")
        prep: _Prepared | None = plan._prep
        if prep is not None:  # built before the forward: no host synchronisation below
            if not prep.pos_list:
                return None
            if prep.l_max > seq:
                raise ValueError(f"plan.rows contains position {prep.l_max - 1} >= sequence length {seq}")
            b_idx, pos, l_max, batches = prep.b_idx, prep.pos, prep.l_max, prep.batches
        else:
            rows = plan.rows.to(device)
            b_idx, r_idx = (rows >= 0).nonzero(as_tuple=True)
            if b_idx.numel() == 0:
                return None
            pos = rows[b_idx, r_idx]
            if int(pos.max()) >= seq:
                raise ValueError(f"plan.rows contains position {int(pos.max())} >= sequence length {seq}")
            order = torch.argsort(pos, stable=True)
            b_idx, pos = b_idx[order], pos[order]  # [N] sorted by position
            l_max = int(pos.max()) + 1
            batches = [(b, (b_idx == b).nonzero().flatten()) for b in torch.unique(b_idx).tolist()]
        n_rows = pos.numel()
        if call.sinks is not None:
            raise ValueError(
                f"layer {call.layer_idx} passes attention sinks (s_aux) to the attention: the statistics' "
                "probabilities do not model them"
            )
        q = self._to_pairs(call.query, call.layer_idx)
        n_kv = k.shape[1]
        groups = n_heads // n_kv
        q_rows = q[b_idx, :, pos].float().transpose(0, 1).contiguous()  # [N, H, d] -> [H, N, d]
        row_allowed = call.allowed_rows(b_idx, pos)  # [N, L]
        deltas = torch.arange(l_max, device=device)
        n_of = pos[:, None] - deltas[None, :]  # [N, Lmax] key position at distance delta
        n_idx = n_of.clamp(min=0)
        valid_delta = (n_of >= 0) & row_allowed.gather(1, n_idx)  # [N, Lmax]
        if prep is None and not bool(valid_delta[:, 0].all()):  # (a prepared plan was checked on the host)
            raise ValueError("plan.rows contains a padding position (a query that cannot attend to itself)")
        # full logit rows -> exact attention probabilities a(m, n), one batch element at a time; the logits are
        # gathered into distance order first (a permutation of each row), masked, then normalised
        q_scaled = q_rows * call.scaling
        a_delta = None if len(batches) == 1 else torch.empty(n_heads, n_rows, l_max, device=device)
        for b, sel in batches:
            qb = q_scaled[:, sel].reshape(n_kv, groups * sel.numel(), -1)  # [Hkv, G*Nb, d]
            logits = torch.bmm(qb, k[b, :, :l_max].float().transpose(1, 2))  # [Hkv, G*Nb, Lmax] (n-space)
            logits = call.cap(logits.view(n_heads, sel.numel(), l_max))  # soft-cap (Gemma 2)
            logits = logits.gather(2, n_idx[sel].unsqueeze(0).expand(n_heads, -1, -1))  # [H, Nb, Lmax] delta
            logits.masked_fill_(~valid_delta[sel].unsqueeze(0), float("-inf"))
            probs = torch.softmax(logits, dim=-1)  # [H, Nb, Lmax]: a(m, m - delta), 0 where invalid
            if a_delta is None:
                a_delta = probs
            else:
                a_delta[:, sel] = probs
        assert a_delta is not None
        # the null permutes the distances of every valid pair, sink pairs included (one draw serves the
        # statistics with and without sinks; restricted to the non-sink pairs it is still independent of them)
        if prep is not None:
            null_delta = prep.nulls[call.layer_idx]
            b_list, pos_list = prep.b_list, prep.pos_list
        else:
            null_delta = self._null_deltas(plan, call.layer_idx, valid_delta, b_idx)
            b_list, pos_list = b_idx.tolist(), pos.tolist()
        plan._null[call.layer_idx] = (null_delta, (b_list, pos_list))
        s = self.sink_positions
        sink_delta = pos[:, None] - torch.arange(s, device=device)[None, :]  # [N, S] distance of key n
        sink_ok = (sink_delta >= 0) & (sink_delta < l_max)
        sink_ok &= valid_delta.gather(1, sink_delta.clamp(0, l_max - 1))
        sink_a = a_delta.gather(2, sink_delta.clamp(0, l_max - 1).unsqueeze(0).expand(n_heads, -1, -1))
        sink_a = sink_a * sink_ok  # [H, N, S]
        if self.sink_keys:  # the sink pairs leave every statistic of `stats` (they go to `sink_stats`)
            valid_delta = valid_delta & (n_of >= self.sink_keys)
            a_delta = a_delta * valid_delta
        return _Rows(
            b_idx,
            pos,
            q_rows,
            a_delta,
            valid_delta.float(),
            null_delta,
            sink_a,
            sink_ok.float(),
            pos_list,
            prep,
        )

    @staticmethod
    def _null_deltas(
        plan: RowPlan, layer: int, valid_delta: torch.Tensor, b_idx: torch.Tensor
    ) -> torch.Tensor:
        """``[N, Lmax]``: the permuted distance ``delta'`` of every (sampled row, distance) pair.

        The distances of all valid (query, key) pairs of the sampled rows of one sequence are randomly
        permuted among themselves, so ``delta'`` is independent of the pair's dominant pair and attention while
        keeping the sequence's distance distribution. Seeded per (plan, layer): the heads of a layer share a
        permutation, layers draw independent ones (so an average of nulls over layers averages out).
        """
        gen = torch.Generator().manual_seed(int(plan.seed) * 7907 + 104729 + layer)
        l_max = valid_delta.shape[1]
        null = torch.zeros(valid_delta.shape, dtype=torch.long, device=valid_delta.device)
        for b in torch.unique(b_idx).tolist():
            sel = (b_idx == b).nonzero().flatten()
            flat = (
                valid_delta[sel].flatten().nonzero().flatten()
            )  # valid (row, distance) pairs of the sequence
            partner = flat[torch.randperm(flat.numel(), generator=gen).to(flat.device)]  # a random bijection
            null_b = torch.zeros(sel.numel() * l_max, dtype=torch.long, device=null.device)
            null_b[flat] = partner % l_max  # the partner's distance
            null[sel] = null_b.view(sel.numel(), l_max)
        return null

    def _to_pairs(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """``x [..., head_dim]`` reordered so that pair ``i`` is components ``(i, i + P)``, pass-through after."""
        if isinstance(self.layout, str):
            if x.shape[-1] != self.head_dim:
                raise ValueError(
                    f"layer {layer} has q/k heads of width {x.shape[-1]}, expected {self.head_dim}"
                )
            if self.layout not in PAIR_LAYOUTS:
                return to_half_layout(x, self.layout)  # raises naming the layout
        else:
            rope = self.layout[layer]
            if x.shape[-1] != rope.head_dim:
                raise ValueError(
                    f"layer {layer} has q/k heads of width {x.shape[-1]}, its RoPE description says {rope.head_dim}"
                )
        order = self._pair_order(layer)  # to_half_layout's order, cached on the device
        return x if order is None else x.index_select(-1, order)

    # ---- the layer's statistics
    @staticmethod
    def _flat_keys(k: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, L, d]`` -> float32 ``[Hkv, B*L, d]``."""
        bsz, n_kv, seq, d = k.shape
        return k.float().transpose(0, 1).reshape(n_kv, bsz * seq, d)

    def _accumulate_layer(
        self, layer: int, k_flat: torch.Tensor, seq: int, rows: _Rows, plan: RowPlan, sums: _LayerSums
    ) -> None:
        """The non-sink keys of the rows (all, or sampled per bin) into ``sums``; ``k_flat [Hkv, B*L, d]``."""
        if self.keys_per_bin is None:
            blocks = self._exact_blocks(rows)
        else:
            prep: _Prepared | None = rows.prep
            draw: Callable[[tuple[int, ...]], torch.Tensor]
            if prep is not None:  # the draws made before the forward, in the same order
                drawn = iter(prep.draws[layer])

                def draw(shape: tuple[int, ...]) -> torch.Tensor:
                    return next(drawn)
            else:
                gen = torch.Generator().manual_seed(int(plan.seed) * 1009 + layer + 1)
                device = k_flat.device

                def draw(shape: tuple[int, ...]) -> torch.Tensor:
                    return torch.rand(*shape, generator=gen).to(device)

            blocks = self._sampled_blocks(rows, self.keys_per_bin, draw)
        for block in blocks:
            self._block(sums, rows, k_flat, seq, block)

    def _bins_present(self, l_max: int) -> list[tuple[int, int, int]]:
        """``[(bin, lo, hi)]`` of the bins holding distances ``< l_max`` (``hi`` clipped to ``l_max``)."""
        out = []
        for b, (lo, hi) in enumerate(bin_edges(self.num_bins)):
            if lo >= l_max:
                break
            out.append((b, lo, l_max if b == self.num_bins - 1 else min(hi, l_max)))
        return out

    def _sink_block(self, rows: _Rows) -> _Block:
        """The sink keys ``n < sink_keys`` of every row, enumerated exactly: one block over every present bin
        with ``sink_keys`` slots per (bin, row), each slot weighted only in the bin of its distance."""
        l_max = rows.valid_delta.shape[1]
        device = rows.valid_delta.device
        s = self.sink_keys
        present = self._bins_present(l_max)
        delta = (rows.pos[:, None] - torch.arange(s, device=device)[None, :]).clamp(min=0)  # [N, s]
        if rows.prep is not None:
            bins, edges = rows.prep.present_bins.view(-1, 1, 1), rows.prep.edges
        else:
            bins, edges = torch.tensor([b for b, _, _ in present], device=device).view(-1, 1, 1), None
        here = (distance_bin(delta, self.num_bins, edges).unsqueeze(0) == bins).float()  # [nb, N, s]
        here = here * rows.sink_valid[:, :s]  # attendable sink keys only
        return _Block(
            delta=delta.expand(1, len(present), -1, -1),
            w_u=here.unsqueeze(0),
            w_a=rows.sink_a[..., :s].unsqueeze(1) * here.unsqueeze(0),  # [H, nb, N, s]
            first_bin=present[0][0],
        )

    def _exact_blocks(self, rows: _Rows) -> list[_Block]:
        """Every key of every row: one block per bin (``keys_per_bin=None``)."""
        n_rows, l_max = rows.valid_delta.shape
        device = rows.valid_delta.device
        blocks = []
        for b, lo, hi in self._bins_present(l_max):
            delta = torch.arange(lo, hi, device=device).expand(1, 1, n_rows, -1)  # [1, 1, N, size]
            blocks.append(
                _Block(
                    delta=delta,
                    w_u=rows.valid_delta[:, lo:hi].view(1, 1, n_rows, -1),
                    w_a=rows.a_delta[:, :, lo:hi].unsqueeze(1),
                    first_bin=b,
                )
            )
        return blocks

    def _sampled_blocks(
        self, rows: _Rows, c: int, draw: Callable[[tuple[int, ...]], torch.Tensor]
    ) -> list[_Block]:
        """Keys stratified by distance bin, ``c`` per (head, row, bin), as two rectangular blocks.

        Deterministic-mixture importance sampling. Block U (shared by the heads) has ``c_u = ceil(c/2)`` slots
        per bin: a bin with at most ``c_u`` keys is enumerated exactly (weights ``valid`` and ``a``; unused
        slots weigh 0); a larger bin gets ``c_u`` keys drawn uniformly among its ``N_b`` valid keys. Block A
        (per head) gives each larger bin ``c_a = c - c_u`` keys drawn in proportion to the head's attention
        inside the bin (mass ``A_b``). Both draws are systematic inverse-CDF samples (one key per stratum of
        the cumulative weight). A key ``delta`` of a larger bin is then drawn ``E = c_u / N_b + c_a a / A_b``
        times in expectation (second term only when ``A_b > 0``), and the Horvitz-Thompson weights
        ``valid / E`` and ``a / E`` make the unweighted and attention-weighted sums unbiased, with every weight
        at most ``N_b / c_u`` (unweighted) or ``A_b / c_a`` (weighted): the bounds of pure uniform or pure
        attention sampling.
        """
        n_rows, l_max = rows.valid_delta.shape
        h_all = self.num_heads
        device = rows.valid_delta.device
        present = self._bins_present(l_max)
        n_bins = len(present)
        if rows.prep is not None:
            lo, hi = rows.prep.lo, rows.prep.hi
        else:
            lo = torch.tensor([p[1] for p in present], device=device)
            hi = torch.tensor([p[2] for p in present], device=device)
        size = hi - lo
        c_u = (c + 1) // 2
        c_a = c - c_u
        v = rows.valid_delta.unsqueeze(0)  # [1, N, Lmax]
        a = rows.a_delta  # [H, N, Lmax]

        def cumulative(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            cum = w.cumsum(-1)  # [X, N, Lmax]
            before = cum.index_select(-1, (lo - 1).clamp(min=0)) * (
                lo > 0
            )  # weight below each bin [X, N, nb]
            return cum, before, cum.index_select(-1, hi - 1) - before  # cum, base, bin total

        cum_v, base_v, n_b = cumulative(v)  # n_b [1, N, nb]
        cum_a, base_a, a_b = cumulative(a)  # a_b [H, N, nb]
        exact_bin = size <= c_u  # [nb]
        rate_u = (c_u / n_b.clamp(min=1)).permute(0, 2, 1).unsqueeze(-1)  # [1, nb, N, 1]
        rate_a = (
            torch.where(a_b > 0, c_a / a_b.clamp(min=1e-30), 0.0).permute(0, 2, 1).unsqueeze(-1)
        )  # [H,nb,N,1]

        def weights(delta: torch.Tensor, exact: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            """Horvitz-Thompson weights of the slots ``delta [X, nb, N, k]`` -> ``w_u, w_a [H, nb, N, k]``."""
            x_dim, nb, _, k = delta.shape
            idx = delta.permute(0, 2, 1, 3).reshape(x_dim, n_rows, nb * k)  # [X, N, nb*k]
            v_at = v.expand(x_dim, -1, -1).gather(2, idx).view(x_dim, n_rows, nb, k).permute(0, 2, 1, 3)
            a_at = a.gather(2, idx.expand(h_all, -1, -1)).view(h_all, n_rows, nb, k).permute(0, 2, 1, 3)
            sel = slice(n_bins - nb, None)  # the block's bins are the last nb present ones
            expected = v_at * rate_u[:, sel] + a_at * rate_a[:, sel]  # [H, nb, N, k]
            inv = torch.where(expected > 0, 1.0 / expected.clamp(min=1e-30), 0.0)
            if exact is not None:  # exact slots: weight 1 per real key
                inv = torch.where(exact, torch.ones((), device=device), inv)
            return v_at * inv, a_at * inv

        # block U: exact enumeration of the small bins, uniform draws in the others
        drawn = self._draw_range(cum_v, base_v, n_b, lo, hi, slice(None), c_u, draw)  # [1, nb, N, c_u]
        j = torch.arange(c_u, device=device)
        exact_slot = (j.view(1, -1) < size.view(-1, 1)) & exact_bin.view(-1, 1)  # [nb, c_u]
        enumerated = (lo.view(-1, 1) + j.view(1, -1)).clamp(max=l_max - 1)  # [nb, c_u]
        delta_u = torch.where(exact_bin.view(1, -1, 1, 1), enumerated.view(1, n_bins, 1, c_u), drawn)
        w_u, w_a = weights(delta_u, exact_slot.view(1, n_bins, 1, c_u))
        keep = (exact_slot | ~exact_bin.view(-1, 1)).view(1, n_bins, 1, c_u)  # padding slots of small bins: 0
        blocks = [_Block(delta=delta_u, w_u=w_u * keep, w_a=w_a * keep, first_bin=present[0][0])]
        # block A: attention draws in the bins larger than c_u
        first_large = next((i for i, (_, b_lo, b_hi) in enumerate(present) if b_hi - b_lo > c_u), n_bins)
        if first_large < n_bins and c_a > 0:
            sel = slice(first_large, None)
            drawn = self._draw_range(cum_a, base_a, a_b, lo, hi, sel, c_a, draw)  # [H, nbA, N, c_a]
            w_u, w_a = weights(drawn, None)
            void = (a_b[..., sel] > 0).permute(0, 2, 1).unsqueeze(-1)  # attention draws need attention mass
            blocks.append(
                _Block(delta=drawn, w_u=w_u * void, w_a=w_a * void, first_bin=present[first_large][0])
            )
        return blocks

    @staticmethod
    def _draw_range(
        cum: torch.Tensor,
        base: torch.Tensor,
        total: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        sel: slice,
        count: int,
        draw: Callable[[tuple[int, ...]], torch.Tensor],
    ) -> torch.Tensor:
        """Systematic inverse-CDF samples for the bins ``sel`` -> distances ``[X, nb_sel, N, count]``."""
        x_dim, n_rows, _ = cum.shape
        device = cum.device
        base, total, lo, hi = base[..., sel], total[..., sel], lo[sel], hi[sel]
        nb = lo.numel()
        u = draw((x_dim, n_rows, nb, count))  # uniform [0, 1)
        strata = (torch.arange(count, device=device, dtype=torch.float32) + u) / count  # in [0, 1)
        targets = (base.unsqueeze(-1) + strata * total.unsqueeze(-1)).view(x_dim, n_rows, -1)
        found = torch.searchsorted(cum, targets, right=True).view(x_dim, n_rows, nb, count)  # first cum > t
        found = torch.minimum(torch.maximum(found, lo.view(1, 1, -1, 1)), (hi - 1).view(1, 1, -1, 1))
        return found.permute(0, 2, 1, 3)

    def _block(self, sums: _LayerSums, rows: _Rows, k_flat: torch.Tensor, seq: int, block: _Block) -> None:
        """Accumulate one block, in row chunks that bound ``heads x bins x rows x slots x pairs``."""
        x_dim, nb, n_rows, c = block.delta.shape
        per_row = self.num_heads * nb * c * self.num_pairs
        chunk = max(1, self.chunk_elements // per_row)
        pos_cpu = rows.pos_list  # host positions: no synchronisation
        edges = bin_edges(self.num_bins)
        r_start = bisect.bisect_left(pos_cpu, edges[block.first_bin][0])  # rows with no key in the block
        for r0 in range(r_start, n_rows, chunk):
            r1 = min(n_rows, r0 + chunk)
            # bins beyond the chunk's largest position hold no key of its rows
            nbc = sum(
                1 for b in range(block.first_bin, block.first_bin + nb) if edges[b][0] <= pos_cpu[r1 - 1]
            )
            self._chunk(sums, rows, k_flat, seq, block, r0, r1, nbc)

    def _chunk(
        self,
        sums: _LayerSums,
        rows: _Rows,
        k_flat: torch.Tensor,
        seq: int,
        block: _Block,
        r0: int,
        r1: int,
        nbc: int,
    ) -> None:
        h_all, p_dim, n_bins = self.num_heads, self.num_pairs, self.num_bins
        n_kv, bl, d = k_flat.shape
        groups = h_all // n_kv
        delta = block.delta[:, :nbc, r0:r1]  # [X, nb, Nr, c]
        x_dim, nb, nr, c = delta.shape
        device = k_flat.device
        shape = (h_all, nb, nr, c)
        pos = rows.pos[r0:r1].view(1, 1, nr, 1)
        key_idx = rows.batch[r0:r1].view(1, 1, nr, 1) * seq + (pos - delta).clamp(min=0)  # [X, nb, Nr, c]
        q = rows.q[:, r0:r1]  # [H, Nr, d]
        if x_dim == 1:
            kc = k_flat.index_select(1, key_idx.reshape(-1)).view(n_kv, 1, nb, nr, c, d)
            qv = q.view(n_kv, groups, 1, nr, 1, d)
        else:  # per-head slots; GQA: query head h reads key head h // G
            head_kv = torch.arange(h_all, device=device) // groups
            flat = (head_kv.view(h_all, 1, 1, 1) * bl + key_idx).reshape(-1)
            kc = k_flat.reshape(n_kv * bl, d).index_select(0, flat).view(h_all, nb, nr, c, d)
            qv = q.view(h_all, 1, nr, 1, d)
        g = qv[..., :p_dim] * kc[..., :p_dim]
        g.addcmul_(qv[..., p_dim : 2 * p_dim], kc[..., p_dim : 2 * p_dim])  # g_i = q_i k_i + q_{i+P} k_{i+P}
        g = g.view(h_all * nb, nr * c, p_dim)  # [H*nb, Nr*c, P]
        if d > 2 * p_dim:  # pass-through ("content") contribution, never a pair
            content = (qv[..., 2 * p_dim :] * kc[..., 2 * p_dim :]).sum(-1).reshape(h_all * nb, nr * c)
        else:
            content = torch.zeros((), device=device).expand(h_all * nb, nr * c)
        dom = g.max(dim=-1).indices  # [H*nb, Nr*c] dominant pair D
        p = torch.softmax(g if self.temperature == 1.0 else g / self.temperature, dim=-1)  # [H*nb, Nr*c, P]
        # soft dominant pair, centred for a well-conditioned variance: S - (P-1)/2  [H*nb, Nr*c]
        soft = torch.matmul(p, torch.arange(p_dim, device=device, dtype=p.dtype) - (p_dim - 1) / 2)
        # distance terms [X, nb, Nr, c]: x = log(1 + delta), delta, and their permuted-position versions
        null_rows = rows.null_delta[r0:r1]  # [Nr, Lmax]
        idx = delta.permute(0, 2, 1, 3).reshape(x_dim, nr, nb * c)
        dnull_l = null_rows.unsqueeze(0).expand(x_dim, -1, -1).gather(2, idx)
        dnull_l = dnull_l.view(x_dim, nr, nb, c).permute(0, 2, 1, 3)  # [X, nb, Nr, c]
        df, dnull = delta.float(), dnull_l.float()
        terms = [torch.log1p(df), df, torch.log1p(dnull), dnull]
        wu = block.w_u[:, :nbc, r0:r1]
        wa = block.w_a[:, :nbc, r0:r1]
        # weight rows w * t for t in DIST_TERMS, w in (unweighted, weighted); row 2 t + w: [H*nb, 10, Nr*c]
        wrows = [wu.expand(shape), wa.expand(shape)]
        for t in terms:
            wrows += [(wu * t).expand(shape), (wa * t).expand(shape)]
        wmat = torch.stack(wrows, dim=2).reshape(h_all * nb, 2 * len(DIST_TERMS), nr * c)
        ones = torch.ones((), device=device).expand(shape)
        dom_f = dom.view(shape).float()
        feats = torch.stack(
            [ones, *(t.expand(shape) for t in terms), dom_f, soft.view(shape).square()], dim=-1
        )
        feats = feats.reshape(h_all * nb, nr * c, len(FEATURE_TERMS))  # [H*nb, Nr*c, 7]
        n_t = len(DIST_TERMS)
        b0, b1 = block.first_bin, block.first_bin + nb
        sums.p[:, :, b0:b1] += torch.bmm(wmat, p).view(h_all, nb, n_t, 2, p_dim).permute(3, 0, 1, 2, 4)
        sums.moments[:, :, b0:b1] += torch.bmm(wmat, feats).view(h_all, nb, n_t, 2, -1).permute(3, 0, 1, 2, 4)
        sums.g[:, :, b0:b1] += torch.bmm(wmat[:, :2], g).view(h_all, nb, 2, p_dim).permute(2, 0, 1, 3)
        sums.pp[:, :, b0:b1] += (
            torch.bmm(wmat[:, :2], p.square()).view(h_all, nb, 2, p_dim).permute(2, 0, 1, 3)
        )
        cfeat = torch.stack([content, content.abs(), g.abs().sum(-1)], dim=-1)  # [H*nb, Nr*c, 3]
        sums.content[:, :, b0:b1] += torch.bmm(wmat[:, :2], cfeat).view(h_all, nb, 2, 3).permute(2, 0, 1, 3)
        # dominant-pair histograms: by the true bin and by the permuted distance's bin
        head = torch.arange(h_all, device=device).view(h_all, 1, 1, 1)
        bins_true = torch.arange(b0, b1, device=device).view(1, nb, 1, 1)
        dom4 = dom.view(shape)
        idx_true = ((head * n_bins + bins_true) * p_dim + dom4).flatten()
        idx_null = (
            (head * n_bins + distance_bin(dnull_l, n_bins, None if rows.prep is None else rows.prep.edges))
            * p_dim
            + dom4
        ).flatten()
        size = h_all * n_bins * p_dim
        for w_index, w in ((UNWEIGHTED, wu), (WEIGHTED, wa)):
            flat_w = w.expand(shape).reshape(-1)
            # fixed-size histograms (= bincount, bit for bit on CPU) without bincount's synchronisation
            sums.dom[w_index] += flat_w.new_zeros(size).index_add_(0, idx_true, flat_w)
            sums.dom_null[w_index] += flat_w.new_zeros(size).index_add_(0, idx_null, flat_w)


def collector_for_model(model: nn.Module, num_bins: int, **kwargs: Any) -> PairStatsCollector:
    """A :class:`PairStatsCollector` shaped after ``model``: layers and heads from its config, the pairs of
    every layer from its verified RoPE description (:func:`posheads.rope.layout.model_rope`). ``layout``
    ``"auto"`` (default) uses the description; ``"half"`` / ``"interleaved"`` must agree with it. ``seq_len``
    (the analysed length) gives the description the frequencies the model uses at that length (dynamic NTK,
    LongRoPE), which the RoPE-geometry null rotates with."""
    from posheads.heads.capture import attention_modules
    from posheads.rope.layout import model_rope, rope_at_length

    modules = attention_modules(model)
    first = next(iter(modules.values()))
    cfg = first.config
    rope = rope_at_length(model, model_rope(model), kwargs.pop("seq_len", None))
    layout = kwargs.pop("layout", "auto")
    if layout not in (None, "auto") and (not isinstance(layout, str) or rope.layouts() != {layout}):
        raise ValueError(
            f"heads.layout={layout!r} disagrees with the verified RoPE of model_type={rope.model_type!r} "
            f"(layout {sorted(rope.layouts())}); use heads.layout='auto'"
        )
    num_layers = max(modules) + 1
    if len(rope) != num_layers:
        raise ValueError(f"the RoPE description has {len(rope)} layers, the model {num_layers}")
    return PairStatsCollector(
        num_layers, int(cfg.num_attention_heads), 2 * rope.num_pairs, num_bins, layout=rope, **kwargs
    )
