"""The statistics pass without host synchronisation: a plan prepared before the forward (RowPlan.valid) leaves
no synchronising operation in the per-layer work -- checked by construction on CPU (every op that reads a
tensor's value on the host or has a data-dependent shape raises inside the hook) and, on a GPU, with
torch.cuda.set_sync_debug_mode("error") -- and gives the very same sums as the plan prepared inside the layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from posheads.heads import attention_hooks
from posheads.heads.stats import PairStats, RowPlan, collector_for_model, num_bins_for, sample_query_rows
from test_heads_ablation import tiny  # the same tiny GQA Llama (3 layers, 4 heads over 2 KV heads, seed 0)

#: aten ops that read a tensor's values on the host (item/int/float/bool) or whose output shape depends on
#: the values (so that a GPU must synchronise to size it)
HOST_READS = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "repeat_interleave",
    "argwhere",
}


class NoHostSync(TorchDispatchMode):
    """Raise on any op of :data:`HOST_READS` (and on ``Tensor.tolist`` / ``.numpy``, which bypass the
    dispatcher) while active."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            raise AssertionError(f"host synchronisation inside the statistics pass: aten.{name}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation inside the statistics pass: Tensor.tolist/numpy")

    saved = torch.Tensor.tolist, torch.Tensor.numpy
    torch.Tensor.tolist, torch.Tensor.numpy = refuse, refuse  # type: ignore[method-assign]
    try:
        with NoHostSync():
            yield
    finally:
        torch.Tensor.tolist, torch.Tensor.numpy = saved  # type: ignore[method-assign]


def _inputs(padding: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 96), generator=g)  # [2, 96]
    valid = torch.ones(2, 96, dtype=torch.bool)
    if padding:
        valid[1, :20] = False  # left padding of the second sequence
    return ids, (valid.long() if padding else None), valid


def run(
    model, ids, am, valid, prepared: bool, guard=None, **kwargs
) -> tuple[PairStats, PairStats | None, PairStats | None, dict]:
    """The collector's sums on one forward; ``guard()`` is entered around every layer's statistics."""
    device = next(model.parameters()).device
    collector = collector_for_model(
        model, num_bins_for(ids.shape[1]), sink_keys=1, geometry_null=True, device=device, **kwargs
    )
    rows = sample_query_rows(valid, 12, [5, 6])  # [2, 12]
    plan = RowPlan(rows=rows, seed=3, valid=valid if prepared else None)
    collector.plan = plan  # prepared here (before the forward) when valid is given
    assert (plan._prep is not None) == prepared

    def hook(module, call):
        with guard() if guard is not None else contextlib.nullcontext():
            return collector(module, call)

    with torch.no_grad(), attention_hooks(model, hook):
        model(ids.to(device), attention_mask=None if am is None else am.to(device))
    nulls = {layer: plan.null_map(layer) for layer in range(3)}
    return collector.stats, collector.sink_stats, collector.geometry_stats, nulls


@pytest.mark.parametrize("keys_per_bin", [8, None], ids=["sampled-keys", "all-keys"])
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_prepared_plan_gives_identical_sums(keys_per_bin, padding):
    model = tiny()
    ids, am, valid = _inputs(padding)
    lazy = run(model, ids, am, valid, prepared=False, keys_per_bin=keys_per_bin)
    ready = run(model, ids, am, valid, prepared=True, keys_per_bin=keys_per_bin)
    for a, b in zip(lazy[:3], ready[:3]):
        assert a is not None and b is not None
        for name, t in a.tensors().items():
            assert torch.equal(t, getattr(b, name)), name  # bit for bit
    assert float(lazy[0].rows) == float(ready[0].rows) == 24
    for layer in range(3):
        assert lazy[3][layer].keys() == ready[3][layer].keys()
        for key, value in lazy[3][layer].items():
            assert torch.equal(value, ready[3][layer][key])


@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "left-padding"])
def test_prepared_pass_has_no_host_sync_in_the_layers(padding):
    model = tiny()
    ids, am, valid = _inputs(padding)
    stats = run(model, ids, am, valid, prepared=True, guard=no_host_sync, keys_per_bin=8)[0]
    assert float(stats.rows) == 24 and float(stats.moments.abs().sum()) > 0
    # the guard does catch the synchronisations of a plan derived inside the layers
    with pytest.raises(AssertionError, match="host synchronisation inside the statistics pass"):
        run(model, ids, am, valid, prepared=False, guard=no_host_sync, keys_per_bin=8)


def test_identify_prepares_its_plans():
    from posheads.heads import HeadsConfig, identify_positional_heads

    model = tiny()
    ids, _, _ = _inputs(False)
    cfg = HeadsConfig(rows_per_sequence=8, keys_per_bin=8, top_fraction=0.25, batch_size=2)
    from posheads.heads import stats as stats_module

    prepared = []
    setter = stats_module.PairStatsCollector.plan.fset

    def spy(self, plan):
        setter(self, plan)
        prepared.append(plan is None or plan._prep is not None)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            stats_module.PairStatsCollector, "plan", property(stats_module.PairStatsCollector.plan.fget, spy)
        )
        identify_positional_heads(model, ids, cfg, progress=False)
    assert prepared and all(prepared)


@pytest.mark.gpu
def test_prepared_pass_has_no_cuda_sync_in_the_layers():
    model = tiny().to("cuda")
    ids, am, valid = _inputs(True)

    @contextlib.contextmanager
    def cuda_sync_error():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    ready = run(model, ids, am, valid, prepared=True, guard=cuda_sync_error, keys_per_bin=8)
    lazy = run(model, ids, am, valid, prepared=False, keys_per_bin=8)
    for a, b in zip(lazy[:3], ready[:3]):
        for name, t in a.tensors().items():
            torch.testing.assert_close(getattr(b, name), t, rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(RuntimeError):
        run(model, ids, am, valid, prepared=False, guard=cuda_sync_error, keys_per_bin=8)
