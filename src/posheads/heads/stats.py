"""Per-pair attention statistics accumulated in one pass over a probe set.

For one head (notation of ``docs``/DESIGN.md section 2, after Hong et al., arXiv 2410.08703): query position
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

**Permuted-position null.** For each sampled query row the valid key positions are permuted (seeded);
``delta'`` is the distance of the key that takes the place of ``n``. The null sums use ``delta'`` in place of
``delta`` with the same ``D``, ``p`` and ``a``, which keeps each row's distance distribution and the
attention pattern but breaks the link between distance and pair allocation.

**Sampling and cost.** Query rows are sampled (stratified over each sequence, seeded: :func:`sample_query_rows`);
each row's full logit row ``q~_m . K~[:m+1]`` gives the exact attention probabilities. Keys are taken either
all (``keys_per_bin=None``: the sums are exact for the sampled rows) or stratified by distance bin: bins with at
most ``2 * keys_per_bin`` keys are enumerated exactly; each larger bin gets ``keys_per_bin`` keys sampled
uniformly among its valid keys (weight ``n_b / C``, for the unweighted sums) and ``keys_per_bin`` keys sampled
proportionally to the attention inside the bin (weight ``A_b / C`` with ``A_b`` the bin's exact attention mass,
for the weighted sums). Both use systematic inverse-CDF sampling (one uniform per stratum of the bin's
cumulative weight), so every sum is an unbiased estimate and the bin masses are exact. The work runs in key
chunks of bounded size (never an ``L x L x d/2`` tensor), batched over heads and rows, and reduces each bin with
one batched matrix product per quantity; histograms use ``bincount``.

**Spearman.** Ranks are taken at bin level: distances within one log2 bin are treated as ties, so the
weighted Spearman correlation of ``(delta, D)`` is computed exactly (with mid-ranks) from the joint
(bin, dominant pair) histogram ``dom``. This keeps the pass single and the memory ``O(bins x pairs)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from posheads.heads.capture import AttentionCall, to_half_layout

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
# Column factors of the scalar moment sums
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


def distance_bin(delta: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin index of integer distances: 0 for 0, ``floor(log2 delta) + 1`` otherwise, clamped to the last bin."""
    edges = torch.tensor([1 << b for b in range(num_bins - 1)], device=delta.device, dtype=delta.dtype)
    return torch.bucketize(delta, edges, right=True).clamp_(max=num_bins - 1)


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
    """

    dom: torch.Tensor
    dom_null: torch.Tensor
    g: torch.Tensor
    pp: torch.Tensor
    p: torch.Tensor
    moments: torch.Tensor
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))

    @classmethod
    def zeros(
        cls, num_layers: int, num_heads: int, num_bins: int, num_pairs: int, device: Any = None
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
                raise ValueError(f"cannot merge PairStats: {name} has shape {tuple(t.shape)} vs {tuple(o.shape)}")

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
        return cls(**{f.name: state[f.name].to(torch.float64) for f in fields(cls)})

    # ---- convenient views (all float64)
    def mass(self, weighting: int = WEIGHTED) -> torch.Tensor:
        """``[NL, H, NB]`` total weight per bin (attention mass, or pair count for ``weighting=0``)."""
        return self.moments[weighting, ..., 0, 0]


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
    """

    rows: torch.Tensor
    seed: int
    done_layers: set[int] = field(default_factory=set)
    _null: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


# ------------------------------------------------------------------------------------------------ collector


@dataclass
class _Rows:
    """Sampled rows of one call, sorted by position (flattened over the batch)."""

    batch: torch.Tensor  # [N] batch index
    pos: torch.Tensor  # [N] query position m (sorted ascending)
    q: torch.Tensor  # [H, N, d] post-RoPE query (half layout, float32)
    a: torch.Tensor  # [H, N, L] attention probabilities of the full row (n-space)
    valid_delta: torch.Tensor  # [N, Lmax] key at distance delta is attendable
    null_delta: torch.Tensor  # [N, Lmax] permuted distance delta' (valid entries only)


class PairStatsCollector:
    """Attention hook that accumulates :class:`PairStats` for every layer it is installed on.

    Use with :func:`posheads.heads.capture.attention_hooks`; set :attr:`plan` before each forward pass (or leave
    it ``None`` to sample ``rows_per_sequence`` rows per sequence automatically with a per-forward seed).
    Runs under ``torch.no_grad``; the attention itself is not modified.

    Args:
        num_layers, num_heads, head_dim: model shape.
        num_bins: distance bins (:func:`num_bins_for` of the longest sequence).
        rows_per_sequence: rows sampled per sequence when no plan is set.
        keys_per_bin: ``None`` = all keys; else ``C`` (see module docstring).
        temperature: ``T`` in ``p = softmax(g / T)``.
        layout: ``"half"`` (rotate-half, Hugging Face) or ``"interleaved"`` pairing.
        chunk_elements: bound on ``heads x rows x keys x pairs`` elements per chunk (memory/speed trade-off).
        seed: base seed of automatic plans.
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        head_dim: int,
        num_bins: int,
        *,
        rows_per_sequence: int = 64,
        keys_per_bin: int | None = None,
        temperature: float = 1.0,
        layout: str = "half",
        chunk_elements: int = 1 << 20,
        seed: int = 0,
        device: Any = None,
    ) -> None:
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim!r} must be even")
        if keys_per_bin is not None and keys_per_bin < 1:
            raise ValueError(f"keys_per_bin={keys_per_bin!r} must be >= 1 or None")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
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
        self.stats = PairStats.zeros(num_layers, num_heads, num_bins, self.num_pairs, device=device)
        self.plan: RowPlan | None = None
        self._auto_forwards = 0
        self._auto = False

    # ---- plan handling
    def _plan_for(self, call: AttentionCall) -> RowPlan | None:
        plan = self.plan
        if plan is None or (self._auto and call.layer_idx in plan.done_layers):
            allowed = call.allowed()
            diag = torch.diagonal(allowed, dim1=-2, dim2=-1)  # [B, L] the query itself is attendable
            seed = self.seed + 7919 * self._auto_forwards
            rows = sample_query_rows(diag, self.rows_per_sequence, seed)
            plan = RowPlan(rows=rows, seed=seed)
            self.plan, self._auto = plan, True
            self._auto_forwards += 1
        if call.layer_idx in plan.done_layers:
            return None  # e.g. activation recomputation: never count a layer twice for one plan
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
        with torch.no_grad():
            rows = self._prepare_rows(call, plan)
            if rows is not None:
                self._accumulate_layer(call, rows, plan)
        if not plan.done_layers:
            self.stats.rows += float((plan.rows >= 0).sum())
        plan.done_layers.add(call.layer_idx)
        return None

    # ---- per-layer preparation: rows, attention probabilities, null permutation
    def _prepare_rows(self, call: AttentionCall, plan: RowPlan) -> _Rows | None:
        device = call.query.device
        bsz, n_heads, seq, _ = call.query.shape
        if n_heads != self.num_heads:
            raise ValueError(f"layer {call.layer_idx} has {n_heads} heads, the collector expects {self.num_heads}")
        rows = plan.rows.to(device)
        if rows.shape[0] != bsz:
            raise ValueError(f"plan.rows has batch {rows.shape[0]}, the forward has batch {bsz}")
        b_idx, r_idx = (rows >= 0).nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            return None
        pos = rows[b_idx, r_idx]
        if int(pos.max()) >= seq:
            raise ValueError(f"plan.rows contains position {int(pos.max())} >= sequence length {seq}")
        order = torch.argsort(pos, stable=True)
        b_idx, pos = b_idx[order], pos[order]  # [N] sorted by position
        n_rows = pos.numel()
        q = to_half_layout(call.query, self.layout)
        k = to_half_layout(call.key, self.layout)
        q_rows = q[b_idx, :, pos].float().transpose(0, 1).contiguous()  # [N, H, d] -> [H, N, d]
        groups = n_heads // k.shape[1]
        allowed = call.allowed()  # [B, L, L]
        row_allowed = allowed[b_idx, pos]  # [N, L]
        # full logit rows -> exact attention probabilities a(m, n), one batch element at a time
        a = torch.empty(n_heads, n_rows, seq, device=device, dtype=torch.float32)
        for b in torch.unique(b_idx).tolist():
            sel = (b_idx == b).nonzero().flatten()
            qb = q_rows[:, sel].view(k.shape[1], groups * sel.numel(), -1)  # [Hkv, G*Nb, d]
            logits = torch.bmm(qb, k[b].float().transpose(1, 2)) * call.scaling  # [Hkv, G*Nb, L]
            logits = logits.view(n_heads, sel.numel(), seq)
            logits.masked_fill_(~row_allowed[sel].unsqueeze(0), float("-inf"))
            a[:, sel] = torch.softmax(logits, dim=-1)
        a = torch.nan_to_num_(a, nan=0.0)  # a fully masked row (cannot happen for valid rows) -> zeros
        l_max = int(pos.max()) + 1
        deltas = torch.arange(l_max, device=device)
        n_of = pos[:, None] - deltas[None, :]  # [N, Lmax] key position at distance delta
        in_range = n_of >= 0
        valid_delta = in_range & row_allowed.gather(1, n_of.clamp(min=0))
        null_delta = self._null_deltas(plan, valid_delta, b_idx, pos)
        return _Rows(b_idx, pos, q_rows, a, valid_delta, null_delta)

    def _null_deltas(
        self, plan: RowPlan, valid_delta: torch.Tensor, b_idx: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """``[N, Lmax]``: a seeded random bijection of each row's valid distances (same for every layer)."""
        key = f"{valid_delta.shape}"
        cached = plan._null.get(key)
        if cached is not None and bool((plan._null["valid"] == valid_delta).all()):
            return cached
        gen = torch.Generator().manual_seed(int(plan.seed) + 104729)
        noise = torch.rand(valid_delta.shape, generator=gen, dtype=torch.float64).to(valid_delta.device)
        noise = noise.masked_fill(~valid_delta, float("inf"))
        shuffled = torch.argsort(noise, dim=1)  # valid distances first, in random order
        rank = (valid_delta.long().cumsum(1) - 1).clamp(min=0)  # rank of each valid distance
        null = shuffled.gather(1, rank)  # [N, Lmax]: delta -> delta'
        null = torch.where(valid_delta, null, torch.zeros_like(null))
        plan._null = {key: null, "valid": valid_delta}
        return null

    # ---- the layer's statistics
    def _accumulate_layer(self, call: AttentionCall, rows: _Rows, plan: RowPlan) -> None:
        layer = call.layer_idx
        k = to_half_layout(call.key, self.layout).float()  # [B, Hkv, L, d]
        bsz, n_kv, seq, d = k.shape
        k_flat = k.transpose(0, 1).reshape(n_kv, bsz * seq, d)  # [Hkv, B*L, d]
        n_rows, l_max = rows.valid_delta.shape
        device = k.device
        deltas = torch.arange(l_max, device=device)
        # attention probabilities in delta-space [H, N, Lmax]
        n_of = (rows.pos[:, None] - deltas[None, :]).clamp(min=0)
        a_delta = rows.a.gather(2, n_of.unsqueeze(0).expand(self.num_heads, -1, -1))
        a_delta = a_delta * rows.valid_delta
        valid = rows.valid_delta.float()
        bins_all = distance_bin(deltas, self.num_bins)  # [Lmax]
        kpb = self.keys_per_bin
        edges = bin_edges(self.num_bins)
        if kpb is None:
            exact_end = l_max
        else:
            exact_bins = [b for b, (lo, hi) in enumerate(edges) if hi - lo <= 2 * kpb and b < self.num_bins - 1]
            exact_end = min(l_max, edges[max(exact_bins)][1] if exact_bins else 1)
        # exact part: every key with delta < exact_end
        slot_delta = deltas[:exact_end].expand(n_rows, -1).unsqueeze(0)  # [1, N, S]
        self._kernel(
            layer,
            rows,
            k_flat,
            seq,
            slot_delta,
            bins_all[:exact_end],
            w_u=valid[:, :exact_end],
            w_a=a_delta[:, :, :exact_end],
        )
        if exact_end >= l_max:
            return
        # sampled part: bins starting at exact_end
        gen = torch.Generator(device="cpu").manual_seed(int(plan.seed) * 1009 + layer + 1)
        sampled = [b for b, (lo, _) in enumerate(edges) if lo >= exact_end and lo < l_max]
        for weights, per_head in ((valid.unsqueeze(0), False), (a_delta, True)):
            slot_delta, slot_weight, slot_bins = self._sample_slots(weights, sampled, edges, l_max, kpb, gen)
            self._kernel(
                layer,
                rows,
                k_flat,
                seq,
                slot_delta,
                slot_bins,
                w_u=None if per_head else slot_weight[0],
                w_a=slot_weight if per_head else None,
            )

    def _sample_slots(
        self,
        weights: torch.Tensor,
        bins: list[int],
        edges: list[tuple[int, int]],
        l_max: int,
        c: int,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Systematic inverse-CDF sampling of ``c`` distances per bin from ``weights [X, N, Lmax]``.

        Returns ``slot_delta [X, N, nbins*c]`` (long), ``slot_weight [X, N, nbins*c]`` (= bin total / c) and the
        bin of every slot ``[nbins*c]``.
        """
        x_dim, n_rows, _ = weights.shape
        device = weights.device
        cum = weights.double().cumsum(-1)  # [X, N, Lmax]
        cum = torch.cat([torch.zeros(x_dim, n_rows, 1, dtype=cum.dtype, device=device), cum], -1)  # [X,N,Lmax+1]
        lo = torch.tensor([edges[b][0] for b in bins], device=device)
        hi = torch.tensor([min(edges[b][1] if b < self.num_bins - 1 else l_max, l_max) for b in bins], device=device)
        base = cum[..., lo]  # [X, N, nb]  cumulative weight before the bin
        total = cum[..., hi] - base  # [X, N, nb]
        u = torch.rand(x_dim, n_rows, len(bins), c, generator=gen, dtype=torch.float64).to(device)
        strata = (torch.arange(c, device=device, dtype=torch.float64) + u) / c  # [X, N, nb, c] in (0, 1)
        targets = base.unsqueeze(-1) + strata * total.unsqueeze(-1)  # [X, N, nb, c]
        # first delta whose cumulative weight exceeds the target: cum[..., delta + 1] > t
        found = torch.searchsorted(cum[..., 1:].contiguous(), targets.reshape(x_dim, n_rows, -1), right=True)
        found = found.view(x_dim, n_rows, len(bins), c)
        found = torch.minimum(torch.maximum(found, lo.view(1, 1, -1, 1)), (hi - 1).view(1, 1, -1, 1))
        weight = (total / c).unsqueeze(-1).expand(-1, -1, -1, c)  # [X, N, nb, c]
        slot_bins = torch.tensor(bins, device=device).repeat_interleave(c)
        return found.reshape(x_dim, n_rows, -1), weight.reshape(x_dim, n_rows, -1).float(), slot_bins

    def _kernel(
        self,
        layer: int,
        rows: _Rows,
        k_flat: torch.Tensor,
        seq: int,
        slot_delta: torch.Tensor,
        slot_bins: torch.Tensor,
        *,
        w_u: torch.Tensor | None,
        w_a: torch.Tensor | None,
    ) -> None:
        """Accumulate the sums over the given key slots.

        Args:
            slot_delta: ``[X, N, S]`` distance of every slot (``X`` = 1 shared by heads, or ``H``).
            slot_bins: ``[S]`` bin of every slot, non-decreasing.
            w_u: ``[N, S]`` unweighted weight (validity or sampling weight) or ``None`` (= 0).
            w_a: ``[H, N, S]`` attention weight or ``None`` (= 0).

        Slots are processed in chunks that never straddle a bin, so each chunk reduces with one batched
        matrix product per quantity (batch = heads, inner dimension = rows x keys).
        """
        n_rows, n_slots = slot_delta.shape[1:]
        per_slot_row = self.num_heads * self.num_pairs
        bins_cpu = slot_bins.tolist()
        edges = bin_edges(self.num_bins)
        start = 0
        while start < n_slots:
            b = bins_cpu[start]
            end = start
            while end < n_slots and bins_cpu[end] == b:
                end += 1
            # rows whose position is below the bin's smallest distance have no key in it: skip them
            r0 = int(torch.searchsorted(rows.pos, torch.tensor(edges[b][0], device=rows.pos.device)))
            if r0 < n_rows:
                chunk = max(1, self.chunk_elements // (per_slot_row * (n_rows - r0)))
                for s0 in range(start, end, chunk):
                    s1 = min(end, s0 + chunk)
                    self._chunk(
                        layer,
                        b,
                        rows,
                        r0,
                        k_flat,
                        seq,
                        slot_delta[:, r0:, s0:s1],
                        None if w_u is None else w_u[r0:, s0:s1],
                        None if w_a is None else w_a[:, r0:, s0:s1],
                    )
            start = end

    def _chunk(
        self,
        layer: int,
        b: int,
        rows: _Rows,
        r0: int,
        k_flat: torch.Tensor,
        seq: int,
        delta: torch.Tensor,
        w_u: torch.Tensor | None,
        w_a: torch.Tensor | None,
    ) -> None:
        """One chunk of slots, all in bin ``b``: ``delta [X, Nr, Sc]``, weights ``[Nr, Sc]`` / ``[H, Nr, Sc]``."""
        h_all, p_dim, nb = self.num_heads, self.num_pairs, self.num_bins
        n_kv, bl, d = k_flat.shape
        groups = h_all // n_kv
        x_dim, nr, sc = delta.shape
        device = k_flat.device
        st = self.stats
        # post-RoPE keys of every slot
        key_idx = rows.batch[r0:, None] * seq + (rows.pos[r0:, None] - delta).clamp(min=0)  # [X, Nr, Sc]
        q = rows.q[:, r0:]  # [H, Nr, d]
        if x_dim == 1:
            kc = k_flat.index_select(1, key_idx.reshape(-1)).view(n_kv, 1, nr, sc, d)  # [Hkv, 1, Nr, Sc, d]
            qv = q.view(n_kv, groups, nr, 1, d)  # [Hkv, G, Nr, 1, d]
        else:  # per-head slots; GQA: query head h reads key head h // G
            head_kv = torch.arange(h_all, device=device) // groups
            flat = (head_kv.view(h_all, 1, 1) * bl + key_idx).reshape(-1)
            kc = k_flat.reshape(n_kv * bl, d).index_select(0, flat).view(h_all, nr, sc, d)  # [H, Nr, Sc, d]
            qv = q.unsqueeze(2)  # [H, Nr, 1, d]
        half = p_dim
        g = qv[..., :half] * kc[..., :half]
        g.addcmul_(qv[..., half:], kc[..., half:])  # [.., Nr, Sc, P]
        g = g.view(h_all, nr * sc, p_dim)  # [H, Nr*Sc, P]
        dom = g.argmax(-1)  # [H, Nr*Sc]
        p = torch.softmax(g if self.temperature == 1.0 else g / self.temperature, dim=-1)  # [H, Nr*Sc, P]
        soft = torch.matmul(p, torch.arange(p_dim, device=device, dtype=p.dtype))  # [H, Nr*Sc] soft pair S
        # distance terms [X, Nr, Sc]
        df = delta.float()
        dnull_l = rows.null_delta[r0:].unsqueeze(0).expand(x_dim, -1, -1).gather(2, delta)  # [X, Nr, Sc]
        dnull = dnull_l.float()
        terms = [torch.log1p(df), df, torch.log1p(dnull), dnull]  # x, delta, x', delta'
        zero = torch.zeros((), device=device)
        wu = w_u if w_u is not None else zero
        wa = w_a if w_a is not None else zero
        shape = (h_all, nr, sc)
        # weight rows w * t for t in DIST_TERMS, w in (unweighted, weighted): row index 2*t + w -> [H, 10, Nr*Sc]
        wrows = [wu.expand(shape), wa.expand(shape)]
        for t in terms:
            wrows += [(wu * t).expand(shape), (wa * t).expand(shape)]
        wmat = torch.stack(wrows, dim=1).view(h_all, 2 * len(DIST_TERMS), nr * sc)
        feats = torch.stack(
            [torch.ones(shape, device=device), *(t.expand(shape) for t in terms),
             dom.view(shape).float(), soft.view(shape).square()],
            dim=-1,
        ).view(h_all, nr * sc, len(FEATURE_TERMS))  # [H, Nr*Sc, 7]
        n_t = len(DIST_TERMS)
        p_sum = torch.bmm(wmat, p).view(h_all, n_t, 2, p_dim).permute(2, 0, 1, 3)  # [2, H, 5, P]
        f_sum = torch.bmm(wmat, feats).view(h_all, n_t, 2, -1).permute(2, 0, 1, 3)  # [2, H, 5, 7]
        g_sum = torch.bmm(wmat[:, :2], g).transpose(0, 1)  # [2, H, P]
        pp_sum = torch.bmm(wmat[:, :2], p.square()).transpose(0, 1)  # [2, H, P]
        st.p[:, layer, :, b] += p_sum.to(st.p.dtype)
        st.moments[:, layer, :, b] += f_sum.to(st.moments.dtype)
        st.g[:, layer, :, b] += g_sum.to(st.g.dtype)
        st.pp[:, layer, :, b] += pp_sum.to(st.pp.dtype)
        # dominant-pair histograms: by the true bin (constant here) and by the permuted distance's bin
        head = torch.arange(h_all, device=device).view(h_all, 1)
        idx_true = ((head * nb + b) * p_dim + dom).flatten()
        bin_null = distance_bin(dnull_l, nb).view(x_dim, nr * sc)
        idx_null = ((head * nb + bin_null) * p_dim + dom).flatten()
        size = h_all * nb * p_dim
        for w_index, w in ((UNWEIGHTED, w_u), (WEIGHTED, w_a)):
            if w is None:
                continue
            flat_w = w.expand(shape).reshape(-1)
            hist = torch.bincount(idx_true, flat_w, minlength=size).view(h_all, nb, p_dim)
            st.dom[w_index, layer] += hist.to(st.dom.dtype)
            hist = torch.bincount(idx_null, flat_w, minlength=size).view(h_all, nb, p_dim)
            st.dom_null[w_index, layer] += hist.to(st.dom_null.dtype)


def collector_for_model(model: nn.Module, num_bins: int, **kwargs: Any) -> PairStatsCollector:
    """A :class:`PairStatsCollector` shaped after ``model`` (layers, heads, head_dim from its config)."""
    from posheads.heads.capture import attention_modules

    modules = attention_modules(model)
    first = next(iter(modules.values()))
    cfg = first.config
    head_dim = int(getattr(first, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads)
    num_layers = max(modules) + 1
    return PairStatsCollector(num_layers, int(cfg.num_attention_heads), head_dim, num_bins, **kwargs)
