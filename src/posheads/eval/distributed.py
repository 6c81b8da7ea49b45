"""Evaluation over several processes (one per GPU, one or several nodes; gloo on CPU), with the results of a
single process.

``torchrun --nproc_per_node 8 evaluate.py --config X.yaml`` (or ``--nnodes N --node_rank R
--rdzv_endpoint host:port`` on each node, or ``srun`` setting the same ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT`` variables) starts one process per device;
:func:`init_from_env` joins them (NCCL on CUDA, gloo on CPU) and puts each on ``cuda:<LOCAL_RANK>``.

How the work is split (:class:`Ranks`):

* perplexity windows and retrieval prompts: item ``i`` of a loop runs on rank ``i mod world``; the per-item
  results (a window's NLL sums, a prompt's generated texts) are gathered and handed to the unchanged
  aggregation code in the original order (:meth:`Ranks.map`), so every row -- sums, counts, trial records --
  is bit for bit the single-process one (on the same hardware and thread count);
* identification: the probe batches are split the same way and the statistics summed over the ranks
  (:func:`posheads.heads.stats.all_reduce`, as the live tracker does), equal to the single-process ones up to
  float64 summation order;
* only rank 0 writes files (``results.json``, ``trials.jsonl``, the head table and plots) and prints.

No Lightning import: usable from the evaluation math.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

__all__ = ["SINGLE", "Ranks", "init_from_env", "launched_distributed"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the evaluation processes (``rank`` of ``world``)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank={self.rank} must be in [0, world={self.world})")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mine(self, n: int) -> range:
        """Indices ``0 .. n-1`` this rank works on: ``rank, rank + world, ...``."""
        return range(self.rank, n, self.world)

    def map(
        self,
        fn: Callable[[T], R],
        items: Sequence[T],
        wrap: Callable[[Iterable[T]], Iterable[T]] | None = None,
    ) -> Iterator[R]:
        """``fn(item)`` for every item, in order, each computed on one rank (:meth:`mine`) and gathered.

        One process: a lazy generator (results stream as they are computed). Several: this rank computes its
        items, then one ``all_gather_object`` gives every rank all results (so ``fn`` must return picklable,
        device-independent values, e.g. CPU tensors). ``wrap`` wraps the iteration over this rank's own items
        (a progress bar)."""
        wrap = wrap or (lambda it: it)
        if not self.distributed:
            yield from (fn(item) for item in wrap(items))
            return
        import torch.distributed as dist

        own = [items[i] for i in self.mine(len(items))]
        local = [fn(item) for item in wrap(own)]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)
        for i in range(len(items)):
            yield gathered[i % self.world][i // self.world]

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


SINGLE = Ranks()


def launched_distributed() -> bool:
    """Whether this process was started by ``torchrun`` / a launcher with ``WORLD_SIZE > 1``."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def init_from_env(device: str) -> tuple[Ranks, torch.device]:
    """Join the process group described by the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and pick this rank's device for ``device`` (``auto`` |
    ``cuda`` | ``cuda:N`` | ``cpu``): CUDA ranks use ``cuda:<LOCAL_RANK>`` and NCCL, CPU ranks gloo.
    Without a launcher (``WORLD_SIZE`` unset or 1): :data:`SINGLE` and the plain device."""
    import torch.distributed as dist

    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not launched_distributed():
        return SINGLE, torch.device(("cuda" if want_cuda else "cpu") if device == "auto" else device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available on rank {os.environ.get('RANK')}")
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), target
