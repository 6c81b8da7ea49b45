"""Per-pair statistics: brute-force equality (exact keys), unbiased key sampling, merging, bounded memory."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posheads.heads import (
    AttentionCall,
    PairStats,
    PairStatsCollector,
    RowPlan,
    all_reduce,
    attention_hooks,
    capture_qk,
    collector_for_model,
    distance_bin,
    num_bins_for,
    pair_contributions,
    sample_query_rows,
)
from posheads.heads.stats import bin_edges
from posheads.profiling import peak_cpu_memory


def tiny(kv_heads: int = 2, seed: int = 0, rope_theta: float = 100.0):
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def brute_force(
    rec, rows: torch.Tensor, am: torch.Tensor, num_bins: int, plan: RowPlan, sink_keys: int = 0
) -> tuple[PairStats, PairStats]:
    """Every sum of PairStats from the captured q~/k~, one sampled row at a time, all keys (float64):
    ``(sums over the keys n >= sink_keys with the sink mass, sums over the keys n < sink_keys)``."""
    layers = sorted(rec.queries)
    q0 = rec.queries[layers[0]]
    n_heads, head_dim = q0.shape[1], q0.shape[-1]
    pairs = head_dim // 2
    s_pos = max(sink_keys, 1)
    main = PairStats.zeros(len(layers), n_heads, num_bins, pairs, sink_positions=s_pos)
    sink = PairStats.zeros(len(layers), n_heads, num_bins, pairs, sink_positions=s_pos)
    ar = torch.arange(pairs, dtype=torch.float64)
    for layer in layers:
        null_map = plan.null_map(layer)
        q = rec.queries[layer].double()
        k = rec.keys[layer].double()
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        for b in range(rows.shape[0]):
            for m in rows[b].tolist():
                if m < 0:
                    continue
                allowed = (torch.arange(am.shape[1]) <= m) & am[b].bool()
                keys = allowed.nonzero().flatten()
                logits = torch.einsum("hd,hnd->hn", q[b, :, m], k[b][:, keys]) * rec.scalings[layer]
                a = torch.softmax(logits, -1)  # [H, n]
                first = keys < s_pos  # attention on the first positions: sink mass and its square
                main.sink_mass[layer, :, keys[first]] += a[:, first]
                main.sink_sq[layer] += a[:, first].sum(-1).square()
                g = pair_contributions(q[b, :, m].unsqueeze(1), k[b][:, keys])  # [H, n, P]
                dom = g.argmax(-1)  # [H, n]
                p = torch.softmax(g, -1)
                soft = (p * ar).sum(-1)
                delta = (m - keys).double()
                dnull = null_map[(b, m)][m - keys].double()
                terms = torch.stack(
                    [torch.ones_like(delta), torch.log1p(delta), delta, torch.log1p(dnull), dnull]
                )
                bins = distance_bin(m - keys, num_bins)
                bins_null = distance_bin(dnull.long(), num_bins)
                is_sink = keys < sink_keys
                for w_index, w_all in ((0, torch.ones_like(a)), (1, a)):
                    for out, w in ((main, w_all * ~is_sink), (sink, w_all * is_sink)):
                        for h in range(n_heads):
                            onehot = torch.nn.functional.one_hot(dom[h], pairs).double()  # [n, P]
                            wt = w[h]
                            out.dom[w_index, layer, h].index_add_(0, bins, wt[:, None] * onehot)
                            out.dom_null[w_index, layer, h].index_add_(0, bins_null, wt[:, None] * onehot)
                            out.g[w_index, layer, h].index_add_(0, bins, wt[:, None] * g[h])
                            out.pp[w_index, layer, h].index_add_(0, bins, wt[:, None] * p[h].square())
                            abs_g = torch.stack(
                                [torch.zeros_like(wt), torch.zeros_like(wt), g[h].abs().sum(-1)], -1
                            )
                            out.content[w_index, layer, h].index_add_(0, bins, wt[:, None] * abs_g)
                            tp = (wt * terms)[:, :, None] * p[h][None]  # [5, n, P]
                            out.p[w_index, layer, h].index_add_(0, bins, tp.permute(1, 0, 2))
                            feats = torch.cat(
                                [terms, dom[h][None].double(), (soft[h][None] - (pairs - 1) / 2).square()]
                            )
                            tf = (wt * terms)[:, None, :] * feats[None]  # [5, 7, n]
                            out.moments[w_index, layer, h].index_add_(0, bins, tf.permute(2, 0, 1))
    return main, sink


def run_collector(model, ids, am, rows, **kwargs) -> tuple[PairStatsCollector, RowPlan, object]:
    num_bins = num_bins_for(ids.shape[1])
    collector = collector_for_model(model, num_bins, **kwargs)
    plan = RowPlan(rows=rows, seed=3)
    collector.plan = plan
    with torch.no_grad(), capture_qk(model) as rec, attention_hooks(model, collector):
        model(ids, attention_mask=am)
    return collector, plan, rec


def assert_stats_close(a: PairStats, b: PairStats, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    for name, t in a.tensors().items():
        if name == "rows":
            continue
        scale = getattr(b, name).abs().amax().clamp(min=1.0)
        torch.testing.assert_close(t / scale, getattr(b, name) / scale, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize(("kv_heads", "sink_keys"), [(4, 0), (2, 0), (2, 3)])
def test_exact_statistics_match_brute_force_with_padding(kv_heads: int, sink_keys: int):
    """Sampled rows, all keys: every accumulated sum equals a brute-force computation (batch 2, left padding);
    with ``sink_keys`` the pairs with key position ``n < sink_keys`` are in ``sink_stats`` only."""
    model = tiny(kv_heads)
    length = 40
    ids = torch.randint(0, 97, (2, length))
    am = torch.ones(2, length, dtype=torch.long)
    am[1, :5] = 0
    rows = torch.tensor([[0, 3, 10, 20, 39], [5, 9, 17, 30, -1]])
    collector, plan, rec = run_collector(
        model, ids, am, rows, keys_per_bin=None, chunk_elements=300, sink_keys=sink_keys
    )
    reference, sink_reference = brute_force(rec, rows, am, num_bins_for(length), plan, sink_keys)
    assert_stats_close(collector.stats, reference)
    if sink_keys:
        assert collector.sink_stats is not None
        assert float(sink_reference.moments.abs().sum()) > 0
        assert_stats_close(collector.sink_stats, sink_reference)
        assert collector.stats.sink_mass.shape[-1] == sink_keys and float(collector.stats.sink_mass.sum()) > 0
    else:
        assert collector.sink_stats is None and float(sink_reference.moments.abs().sum()) == 0.0
    assert float(collector.stats.rows) == 9.0
    # the null distances of a sequence are a permutation of its pooled valid (row, distance) pairs
    for b in range(2):
        pooled, permuted = [], []
        for (bb, m), null in plan.null_map(0).items():
            if bb == b:
                valid = [d for d in range(m + 1) if am[b, m - d]]
                pooled += valid
                permuted += null[valid].tolist()
        assert sorted(permuted) == sorted(pooled) and permuted != pooled
    assert any(not torch.equal(plan.null_map(0)[k], plan.null_map(1)[k]) for k in plan.null_map(0))


def test_sampled_keys_exact_on_small_bins():
    """keys_per_bin=C: bins with <= ceil(C/2) keys are enumerated, so their sums equal the exact ones in every
    draw (unbiasedness of the larger bins: tests/test_heads_estimator.py)."""
    model = tiny(2, rope_theta=10000.0)
    length = 256
    ids = torch.randint(0, 97, (2, length))
    am = torch.ones(2, length, dtype=torch.long)
    rows = sample_query_rows(torch.ones(2, length, dtype=torch.bool), 64, [0, 1])
    exact = run_collector(model, ids, am, rows, keys_per_bin=None)[0].stats
    small = 4  # bins 0..3 hold at most ceil(8/2) = 4 keys: enumerated exactly
    for seed in range(2):
        col = collector_for_model(model, num_bins_for(length), keys_per_bin=8)
        col.plan = RowPlan(rows=rows, seed=seed)
        with torch.no_grad(), attention_hooks(model, col):
            model(ids, attention_mask=am)
        for name in ("dom", "g", "pp"):
            torch.testing.assert_close(
                getattr(col.stats, name)[..., :small, :], getattr(exact, name)[..., :small, :]
            )
        # the larger bins are estimates: they differ from the exact sums (the draws are not enumerations)
        assert not torch.allclose(col.stats.g[..., small:, :], exact.g[..., small:, :])


def test_batching_does_not_change_the_sums():
    """One batch of two sequences == two forwards of one, merged (same rows and null seeds per sequence)."""
    model = tiny(2)
    ids = torch.randint(0, 97, (2, 32))
    rows = torch.tensor([[4, 12, 31], [7, 20, 28]])
    num_bins = num_bins_for(32)
    together = collector_for_model(model, num_bins, keys_per_bin=None)
    together.plan = RowPlan(rows=rows, seed=0)
    with torch.no_grad(), attention_hooks(model, together):
        model(ids)
    merged = None
    for b in range(2):
        col = collector_for_model(model, num_bins, keys_per_bin=None)
        col.plan = RowPlan(rows=rows[b : b + 1], seed=0)
        with torch.no_grad(), attention_hooks(model, col):
            model(ids[b : b + 1])
        merged = col.stats if merged is None else merged + col.stats
    assert merged is not None
    close = {"rtol": 1e-5, "atol": 1e-5}
    for name in ("dom", "g", "pp"):
        torch.testing.assert_close(getattr(together.stats, name), getattr(merged, name), **close)
    torch.testing.assert_close(
        together.stats.p[..., :3, :], merged.p[..., :3, :], **close
    )  # nulls: other perms
    torch.testing.assert_close(together.stats.moments[..., :3, :3], merged.moments[..., :3, :3], **close)
    assert float(merged.rows) == 6.0


def test_merge_add_state_dict_and_all_reduce_without_distributed():
    a = PairStats.zeros(2, 3, 4, 5)
    b = PairStats.zeros(2, 3, 4, 5)
    a.dom += 1.0
    b.dom += 2.0
    b.rows += 4
    c = a + b
    assert float(c.dom[0, 0, 0, 0, 0]) == 3.0 and float(a.dom[0, 0, 0, 0, 0]) == 1.0
    a.merge(b)
    assert torch.equal(a.dom, c.dom) and float(a.rows) == 4.0
    restored = PairStats.from_state_dict(c.state_dict())
    assert torch.equal(restored.dom, c.dom)
    assert all_reduce(c) is c  # no process group: a no-op
    with pytest.raises(ValueError, match="cannot merge"):
        a.merge(PairStats.zeros(2, 3, 5, 5))


def test_distance_bins_and_row_sampling():
    delta = torch.tensor([0, 1, 2, 3, 4, 7, 8, 255, 256, 10_000])
    assert distance_bin(delta, 10).tolist() == [0, 1, 2, 2, 3, 3, 4, 8, 9, 9]
    assert num_bins_for(256) == 9 and num_bins_for(257) == 10 and num_bins_for(1) == 1
    assert bin_edges(4) == [(0, 1), (1, 2), (2, 4), (4, 8)]
    valid = torch.ones(2, 100, dtype=torch.bool)
    valid[1, :30] = False
    rows = sample_query_rows(valid, 10, [5, 6])
    assert rows.shape == (2, 10)
    strata = (torch.arange(10) * 100) // 10
    assert bool(((rows[0] >= strata) & (rows[0] < strata + 10)).all())  # one row per stratum
    assert bool((rows[1] >= 30).all())
    assert torch.equal(rows, sample_query_rows(valid, 10, [5, 6]))  # seeded
    short = sample_query_rows(torch.ones(1, 4, dtype=torch.bool), 6, 0)
    assert short.tolist() == [[0, 1, 2, 3, -1, -1]]


def _peak_bytes(length: int, keys_per_bin: int | None) -> int:
    """Peak CPU memory allocated by one layer's statistics (torch profiler memory timeline)."""
    heads, kv, d = 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, d, generator=gen)
    k = torch.randn(1, kv, length, d, generator=gen)
    call = AttentionCall(0, q, k, None, d**-0.5)
    col = PairStatsCollector(
        1, heads, d, num_bins_for(length), keys_per_bin=keys_per_bin, chunk_elements=1 << 16
    )
    col.plan = RowPlan(sample_query_rows(torch.ones(1, length, dtype=torch.bool), 16, 0), seed=0)
    return peak_cpu_memory(col, None, call)


@pytest.mark.parametrize("keys_per_bin", [8, None])
def test_peak_memory_grows_at_most_linearly(keys_per_bin):
    short, long = 512, 2048
    p_short, p_long = _peak_bytes(short, keys_per_bin), _peak_bytes(long, keys_per_bin)
    assert p_short > 0
    # linear growth allows x4 (+ slack for the constant chunk buffers); an L x L x d/2 tensor would be x16
    assert p_long <= 1.25 * (long / short) * p_short, (p_short, p_long)
    # and far below one full L x L x d/2 float32 tensor for the row-sampled pass
    assert p_long < 4 * long * long * 8 / 8


def test_no_double_counting_and_kv_cache_error():
    model = tiny(2)
    ids = torch.randint(0, 97, (1, 16))
    col = collector_for_model(model, num_bins_for(16), keys_per_bin=None)
    col.plan = RowPlan(rows=torch.tensor([[3, 9, 15]]), seed=0)
    with torch.no_grad(), attention_hooks(model, col):
        model(ids)
        first = col.stats.clone()
        model(ids)  # same plan again (e.g. activation recomputation): not counted twice
    assert torch.equal(col.stats.dom, first.dom)
    auto = collector_for_model(model, num_bins_for(16), keys_per_bin=None, rows_per_sequence=4)
    with torch.no_grad(), attention_hooks(model, auto):
        model(ids)
        model(ids)  # automatic plans: a new forward is a new plan
    assert math.isclose(float(auto.stats.rows), 8.0)
    collector = collector_for_model(model, 5, keys_per_bin=None)
    with (
        pytest.raises(ValueError, match="full-sequence forward"),
        torch.no_grad(),
        attention_hooks(model, collector),
    ):
        out = model(ids[:, :8], use_cache=True)
        model(ids[:, 8:9], cache=out.past_key_values, use_cache=True)


_ALL_REDUCE_SCRIPT = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from posheads.heads import PairStats, all_reduce

def worker(rank, path):
    dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
    stats = PairStats.zeros(1, 2, 3, 4)
    stats.dom += rank + 1
    stats.rows += 10 * (rank + 1)
    all_reduce(stats)
    assert float(stats.dom[0, 0, 0, 0, 0]) == 3.0 and float(stats.rows) == 30.0
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
    print("ok")
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_all_reduce_sums_across_processes(tmp_path):
    """Two gloo processes (spawned from a subprocess: in-process DDP inside pytest hangs) sum their stats."""
    import subprocess
    import sys

    script = tmp_path / "all_reduce.py"
    script.write_text(_ALL_REDUCE_SCRIPT)
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
