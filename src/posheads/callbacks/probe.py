"""The probe pass of the tracking callback: a fixed, seeded set of sequences at the target length, sharded over
ranks, run through the model once per evaluation with the :class:`posheads.heads.PairStatsCollector` installed.

Nothing here imports Lightning: the pass takes a ``forward`` function (how to run the model -- directly, or
through a distributed wrapper) and returns the summed statistics, so that the DDP test script and the
benchmarks run exactly what the callback runs.

Determinism. Every probe batch gets the same query rows and the same seed for the permuted-position null and
the key sampling whichever rank processes it (rows are seeded by the sequence's index in the probe set, the
plan by the batch's first sequence), so the statistics summed over ranks equal the single-process statistics up
to the order of floating-point additions (they are kept in float64) -- provided every rank computes the forward
in the same floating-point way (same kernels and thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from posheads.heads import (
    HeadsConfig,
    PairStats,
    RowPlan,
    all_reduce,
    attention_hooks,
    collector_for_config,
    sample_query_rows,
)

__all__ = ["ProbePassResult", "ProbeSet", "run_probe_pass", "select_probe", "shard_batches"]

#: ``forward(input_ids [B, L], want_logits) -> logits [B, L, V] | None``
ForwardFn = Callable[[torch.Tensor, bool], "torch.Tensor | None"]


@dataclass
class ProbeSet:
    """The sequences every evaluation analyses, chosen once.

    Attributes:
        input_ids: int64 ``[N, L]``.
        names: the document of each sequence (``len == N``).
        seed: the seed the sequences were chosen with (the tracker uses ``heads.seed``, which also seeds the
            query rows of the pass).
        source: where the candidates came from, for the timeline.
    """

    input_ids: torch.Tensor
    names: list[str]
    seed: int = 0
    source: str = "given"

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape[0] < 1 or self.input_ids.shape[1] < 2:
            raise ValueError(
                f"probe input_ids must be [N >= 1, L >= 2], got shape {tuple(self.input_ids.shape)}"
            )
        if len(self.names) != self.input_ids.shape[0]:
            raise ValueError(f"probe has {self.input_ids.shape[0]} sequences but {len(self.names)} names")

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[1])

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def describe(self) -> dict[str, Any]:
        return {
            "sequences": len(self),
            "length": self.length,
            "documents": sorted(set(self.names)),
            "seed": self.seed,
            "source": self.source,
        }


def select_probe(
    candidates: torch.Tensor, names: Sequence[str], num_sequences: int, seed: int, source: str = "given"
) -> ProbeSet:
    """A seeded choice of ``num_sequences`` rows of ``candidates`` (``[M, L]``), kept in their original order.

    All of them when ``M <= num_sequences``. Depends only on ``M`` and ``seed``, so every rank picks the same set.
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences={num_sequences!r} must be >= 1")
    m = int(candidates.shape[0])
    if m == 0:
        raise ValueError("no candidate sequences for the probe set")
    if len(names) != m:
        raise ValueError(f"{m} candidate sequences but {len(names)} names")
    if m <= num_sequences:
        chosen = list(range(m))
    else:
        gen = torch.Generator().manual_seed(int(seed))
        chosen = sorted(torch.randperm(m, generator=gen)[:num_sequences].tolist())
    return ProbeSet(candidates[chosen].clone(), [names[i] for i in chosen], int(seed), source)  # [N, L]


def shard_batches(n: int, batch_size: int, rank: int, world_size: int) -> tuple[list[list[int]], int]:
    """``(batches of this rank, number of forwards every rank runs)``.

    The probe set is cut into consecutive batches; batch ``j`` goes to rank ``j % world_size``. Every rank runs
    the same number of forwards (``ceil(batches / world)``): a rank with fewer batches runs padding forwards that
    collect nothing -- sharded strategies (FSDP) need every rank in every forward, and the sums are reduced
    collectively afterwards anyway.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not a rank of world_size={world_size}")
    batches = [list(range(s, min(n, s + batch_size))) for s in range(0, n, batch_size)]
    mine = batches[rank::world_size]
    return mine, math.ceil(len(batches) / world_size)


@dataclass
class ProbePassResult:
    """What one probe pass returns (identical on every rank after the reduction).

    Attributes:
        stats: the per-pair sums over the whole probe set (without the sink pairs, ``cfg.sink_keys``).
        sink_stats: the sink pairs' sums (``None`` when ``cfg.sink_keys == 0``).
        geometry_stats: the RoPE-geometry null's sums (``None`` unless ``cfg.geometry_null``).
        nll_sum: summed next-token NLL over the scored tokens (0 when not requested).
        tokens: number of scored tokens (every token but the first of each sequence; 0 when not requested).
        seconds: wall time of this rank's pass (forwards, statistics, reduction).
        forwards: forwards this rank ran (padding included).
    """

    stats: PairStats
    sink_stats: PairStats | None = None
    geometry_stats: PairStats | None = None
    nll_sum: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    forwards: int = 0

    @property
    def nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def ppl(self) -> float:
        return math.exp(self.nll) if self.tokens else math.nan


def _nll_sums(logits: torch.Tensor, input_ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-row summed NLL of ``input_ids[:, 1:]`` given ``logits [B, L, V]`` (float32, chunked) -> float64 ``[B]``."""
    from posheads.eval.perplexity import token_nll_sums

    return token_nll_sums(logits[:, :-1], input_ids[:, 1:], chunk=chunk)


@torch.no_grad()
def run_probe_pass(
    model: nn.Module,
    forward: ForwardFn,
    probe: ProbeSet,
    cfg: HeadsConfig | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
    compute_nll: bool = False,
    device: Any = None,
    reduce: bool = True,
) -> ProbePassResult:
    """Accumulate :class:`~posheads.heads.PairStats` (and optionally the NLL) over this rank's shard of ``probe``,
    then sum them over ranks (:func:`posheads.heads.all_reduce`) when ``reduce`` and ``torch.distributed`` is up.

    Args:
        model: the Transformers model whose attention layers are hooked (possibly peft-wrapped).
        forward: runs the model on ``input_ids [B, L]``; returns the logits when asked (``want_logits``).
        probe: the probe set.
        cfg: sampling options (``rows_per_sequence``, ``keys_per_bin``, ``num_bins``, ``temperature``,
            ``layout``, ``chunk_elements``, ``batch_size``, ``seed``) of :class:`~posheads.heads.HeadsConfig`.
        rank, world_size: this process and the number of processes sharing the probe set.
        compute_nll: also sum the next-token NLL of the probe sequences from the same forwards.
        device: where the input ids go (default: the model's first parameter's device).

    Seeding follows :func:`posheads.heads.identify_positional_heads`: sequence ``i`` of the probe set gets query
    rows seeded with ``cfg.seed * 1_000_003 + i`` and each batch's plan (null permutation, key sampling) the
    seed of its first sequence, so the single-process sums equal that function's on the same sequences and
    batch size, and the sums over ranks equal the single-process ones.
    """
    started = time.perf_counter()
    if device is None:
        device = next(model.parameters()).device
    n, length = probe.input_ids.shape
    cfg = cfg or HeadsConfig()
    collector = collector_for_config(model, cfg, length, device)
    mine, forwards = shard_batches(n, cfg.batch_size, rank, world_size)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    with attention_hooks(model, collector):
        for j in range(forwards):
            if j < len(mine):
                idx = mine[j]
                ids = probe.input_ids[idx].to(device)  # [b, L]
                valid = torch.ones(len(idx), length, dtype=torch.bool)  # [b, L] no padding in the probe set
                seeds = [cfg.seed * 1_000_003 + i for i in idx]
                rows = sample_query_rows(valid, cfg.rows_per_sequence, seeds)  # [b, R]
            else:  # padding forward: every rank runs the same number of forwards; it collects nothing
                ids = probe.input_ids[:1].to(device)  # [1, L]
                valid = torch.ones(1, length, dtype=torch.bool)
                rows = torch.full((1, 1), -1, dtype=torch.long)  # no query row
                seeds = [cfg.seed]
            collector.plan = RowPlan(rows=rows, seed=seeds[0], valid=valid)  # prepared now: sync-free pass
            logits = forward(ids, compute_nll and j < len(mine))
            if compute_nll and j < len(mine):
                if logits is None:
                    raise ValueError("compute_nll=True but the forward function returned no logits")
                nll += _nll_sums(logits, ids).sum()
                tokens += ids.numel() - ids.shape[0]
            del logits
    stats = collector.stats
    extras = (collector.sink_stats, collector.geometry_stats)
    sums = torch.stack([nll, torch.tensor(float(tokens), dtype=torch.float64, device=device)])  # [2]
    if reduce:
        all_reduce(stats)
        for extra in extras:
            if extra is not None:
                all_reduce(extra)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    result = ProbePassResult(
        stats=stats.to("cpu"),
        sink_stats=None if extras[0] is None else extras[0].to("cpu"),
        geometry_stats=None if extras[1] is None else extras[1].to("cpu"),
        nll_sum=float(sums[0]),
        tokens=int(round(float(sums[1]))),
        forwards=forwards,
    )
    del collector, stats, extras
    result.seconds = time.perf_counter() - started
    return result
