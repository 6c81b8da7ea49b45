"""Ablation-sweep conditions: random controls matched per layer, lowest heads, user lists, validation."""

from __future__ import annotations

import json

import pytest

from posheads.eval.sweep import (
    ConditionSpec,
    ModelShape,
    build_conditions,
    dims_pairs,
    lowest_heads,
    lowest_matched_heads,
    parse_condition,
    parse_head,
    random_matched_heads,
    read_head_table,
    resolve_critical_pair,
    validate_heads,
)

SHAPE = ModelShape(
    num_layers=4, num_heads=6, head_dim=16, max_length=256, rope_theta=10000.0, original_context=256
)


def _table():
    rows = []
    for layer in range(4):
        for head in range(6):
            score = (layer * 6 + head) / 24.0
            rows.append({"layer": layer, "head": head, "score": score, "z": None, "positional": False})
    for layer, head in [(0, 1), (2, 3), (2, 5), (3, 0)]:
        rows[layer * 6 + head]["positional"] = True
    return rows


def test_random_controls_match_counts_per_layer_and_avoid_positional_heads():
    pos = [(0, 1), (2, 3), (2, 5), (3, 0)]
    seen = set()
    for seed in range(8):
        heads = random_matched_heads(pos, SHAPE, seed)
        per_layer = {}
        for layer, _ in heads:
            per_layer[layer] = per_layer.get(layer, 0) + 1
        assert per_layer == {0: 1, 2: 2, 3: 1}
        assert not set(heads) & set(pos)
        assert heads == random_matched_heads(pos, SHAPE, seed)  # seeded
        seen.add(tuple(heads))
    assert len(seen) > 4  # different seeds give different controls


def test_random_controls_take_a_full_layers_shortfall_from_the_nearest_layers():
    # layer 1 has 5 Positional Heads of 6: one non-positional head left, 4 short -> from layers 0 and 2
    pos = [(1, h) for h in range(5)] + [(2, 0)]
    for seed in range(20):
        heads = random_matched_heads(pos, SHAPE, seed)
        assert not set(heads) & set(pos), seed  # never a Positional Head
        assert len(heads) == len(pos)
        layers = [layer for layer, _ in heads]
        assert layers.count(1) == 1  # everything layer 1 has
        assert set(layers) <= {0, 1, 2}  # the shortfall comes from distance 1 only (enough heads there)
        assert layers.count(2) >= 1
    seen_zero = {sum(1 for layer, _ in random_matched_heads(pos, SHAPE, s) if layer == 0) for s in range(20)}
    assert len(seen_zero) > 1  # the pool at one distance is shared by both neighbours, drawn at random


def test_shortfall_goes_further_when_the_neighbours_are_full():
    shape = ModelShape(num_layers=7, num_heads=2, head_dim=8)
    pos = [(layer, h) for layer in (1, 2, 3) for h in (0, 1)]  # layers 1-3 entirely positional
    heads = random_matched_heads(pos, shape, 0)
    # layer 1 takes layer 0 (distance 1); layer 2's neighbours are full -> layer 4 (distance 2; layer 0 is
    # used up); layer 3 -> layer 5 (distance 2)
    assert heads == [(0, 0), (0, 1), (4, 0), (4, 1), (5, 0), (5, 1)]
    shape = ModelShape(num_layers=5, num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="non-positional"):
        random_matched_heads([(a, b) for a in range(5) for b in range(2) if (a, b) != (0, 0)], shape, 0)


def _table_with(pos):
    rows = _table()
    for r in rows:
        r["positional"] = (r["layer"], r["head"]) in set(pos)
    return rows


def test_controls_never_contain_a_positional_head():
    # The old rule drew a full layer's control among *all* its heads, i.e. the Positional Heads themselves.
    pos = [(1, h) for h in range(6)]  # a whole layer is positional
    conds = build_conditions(
        ["random", "lowest"], table=_table_with(pos), shape=SHAPE, random_seeds=range(10)
    )
    for c in conds:
        assert not set(c.heads) & set(pos), c.name
        assert len(c.heads) == 6 and set(c.per_layer) <= {0, 2}, c.name
        assert c.describe()["per_layer"] == {str(k): v for k, v in sorted(c.per_layer.items())}


def test_lowest_is_layer_matched_and_lowest_global_is_not():
    pos = [(0, 1), (2, 3), (2, 5), (3, 0)]
    table = _table_with(pos)  # score increases with layer*6+head
    lm = lowest_matched_heads(table, pos, SHAPE)
    assert lm == [(0, 0), (2, 0), (2, 1), (3, 1)]  # the lowest non-positional heads of layers 0, 2, 2, 3
    assert lowest_heads(table, 4) == [(0, 0), (0, 1), (0, 2), (0, 3)]  # global, layer 0 only
    conds = {c.name: c for c in build_conditions(["lowest", "lowest_global"], table=table, shape=SHAPE)}
    assert conds["lowest"].heads == tuple(lm)
    assert conds["lowest"].per_layer == {0: 1, 2: 2, 3: 1}
    assert conds["lowest_global"].heads == ((0, 0), (0, 2), (0, 3), (0, 4))  # skips Positional Head 0.1


def test_dims_pairs_rules():
    assert dims_pairs("high", 20, 32) == tuple(range(20, 32))  # 12 pairs above i_c
    assert dims_pairs("low", 20, 32) == tuple(range(8, 20))  # the 12 nearest below
    assert dims_pairs("low", 20, 32, "all") == tuple(range(20))
    assert dims_pairs("high", 5, 32) == tuple(range(5, 10)) and dims_pairs("low", 5, 32) == tuple(range(5))
    for i_c in range(33):
        assert len(dims_pairs("high", i_c, 32)) == len(dims_pairs("low", i_c, 32))
        assert not set(dims_pairs("high", i_c, 32)) & set(dims_pairs("low", i_c, 32))


def test_parse_condition_forms():
    assert parse_condition("positional:mean") == ConditionSpec("positional:mean", "positional", mode="mean")
    assert parse_condition("random@3") == ConditionSpec("random@3", "random", seed=3)
    assert parse_condition("dims_high[random@2]") == ConditionSpec(
        "dims_high[random@2]", "dims_high", seed=2, target="random"
    )
    assert parse_condition("dims_low").target == "positional"
    for bad, match in [
        ("dims_high:mean", "no ablation mode"),
        ("positional:half", "ablation mode"),
        ("lowest@2", "only random takes a seed"),
        ("dims_high[heads]", "family"),
        ("random@x", "not an integer"),
        ("bogus", "unknown condition"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_condition(bad)


def test_dims_on_every_family_and_mean_twins():
    pos = [(0, 1), (2, 3), (2, 5), (3, 0)]
    names = [
        "none",
        "positional",
        "positional:mean",
        "random@1:mean",
        "dims_high",
        "dims_low[random]",
        "dims_high[lowest]",
    ]
    conds = build_conditions(names, table=_table_with(pos), shape=SHAPE, random_seeds=[0, 1], i_c=3)
    by = {c.name: c for c in conds}
    assert list(by) == [
        "none",
        "positional",
        "positional:mean",
        "random@1:mean",
        "dims_high",
        "dims_low[random@0]",
        "dims_low[random@1]",
        "dims_high[lowest]",
    ]
    assert by["positional"].ablation == "zero" and by["positional:mean"].ablation == "mean"
    assert by["random@1:mean"].family == "random:mean"
    assert by["dims_high"].pairs == (3, 4, 5) and by["dims_low[random@1]"].pairs == (0, 1, 2)
    assert by["dims_low[random@0]"].family == "dims_low[random]"
    assert by["dims_low[random@1]"].heads == by["random@1:mean"].heads  # the same control set
    assert by["dims_high[lowest]"].heads == tuple(lowest_matched_heads(_table_with(pos), pos, SHAPE))
    assert by["dims_high"].describe()["n_pairs"] == 3
    with pytest.raises(ValueError, match="more than once"):
        build_conditions(["random", "random@1"], table=_table_with(pos), shape=SHAPE, random_seeds=[1])


def test_lowest_heads():
    assert lowest_heads(_table(), 3) == [(0, 0), (0, 1), (0, 2)]


def test_build_conditions():
    conds = build_conditions(
        ["none", "positional", "random", "lowest", "heads", "dims_high", "dims_low"],
        table=_table(),
        shape=SHAPE,
        random_seeds=[0, 1, 2],
        user_heads=["1.2", [3, 4]],
        i_c=4,
    )
    names = [c.name for c in conds]
    assert names == [
        "none",
        "positional",
        "random@0",
        "random@1",
        "random@2",
        "lowest",
        "heads",
        "dims_high",
        "dims_low",
    ]
    by = {c.name: c for c in conds}
    assert by["positional"].heads == ((0, 1), (2, 3), (2, 5), (3, 0))
    assert all(len(by[f"random@{s}"].heads) == 4 and by[f"random@{s}"].family == "random" for s in range(3))
    assert len(by["lowest"].heads) == 4
    assert by["heads"].heads == ((1, 2), (3, 4))
    assert by["dims_high"].kind == "dims" and by["dims_high"].side == "high"
    assert by["dims_low"].heads == by["positional"].heads
    assert by["none"].is_noop


def test_unknown_condition_and_missing_table():
    with pytest.raises(ValueError, match="unknown condition 'bogus'"):
        build_conditions(["none", "bogus"], shape=SHAPE)
    with pytest.raises(ValueError, match="need a Positional-Head table"):
        build_conditions(["positional"], shape=SHAPE)


@pytest.mark.parametrize(
    "value,match",
    [
        ([4, 0], "layer 4 is out of range, the model has 4 layers"),
        ("2.6", "head 6 is out of range"),
        ([-1, 0], "layer -1"),
    ],
)
def test_head_out_of_range_names_the_value(value, match):
    with pytest.raises(ValueError, match=match):
        validate_heads([value], SHAPE)


def test_parse_head_forms():
    assert (
        parse_head("3.4")
        == parse_head("3:4")
        == parse_head([3, 4])
        == parse_head({"layer": 3, "head": 4})
        == (3, 4)
    )
    with pytest.raises(ValueError, match="is not a head"):
        parse_head("x")
    with pytest.raises(ValueError, match="more than once"):
        validate_heads([[1, 1], "1.1"], SHAPE)


def test_critical_pair():
    assert resolve_critical_pair("quarter", SHAPE) == 4
    assert resolve_critical_pair(3, SHAPE) == 3
    # 2 pi 10000^(2i/16) > 256  <=>  i > 8 ln(256/2pi)/ln(10000) = 3.22
    assert resolve_critical_pair("critical", SHAPE) == resolve_critical_pair("auto", SHAPE) == 4
    assert resolve_critical_pair("auto", SHAPE, auto_rule="quarter") == 4
    with pytest.raises(ValueError, match="critical_pair=9"):
        resolve_critical_pair(9, SHAPE)


def test_read_head_table_forms(tmp_path):
    rows = _table()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"protocol": {}, "heads": rows}))
    assert read_head_table(tmp_path / "run") == rows
    csv = tmp_path / "heads.csv"
    csv.write_text(
        "layer,head,score,z,positional\n"
        + "\n".join(f"{r['layer']},{r['head']},{r['score']},,{r['positional']}" for r in rows)
    )
    assert read_head_table(csv) == rows
    with pytest.raises(FileNotFoundError, match="heads.from_results"):
        read_head_table(tmp_path / "nope.json")


def test_lowest_heads_follow_the_tables_rank_else_the_score(tmp_path):
    rows = _table()
    assert lowest_heads(rows, 2) == [(0, 0), (0, 1)]  # no rank column: by score
    rows[0]["score"] = None  # missing scores rank last
    assert lowest_heads(rows, 2) == [(0, 1), (0, 2)]
    for i, r in enumerate(rows):  # a rank (e.g. from heads.rank_by=excess) that reverses the score order
        r["rank"] = i + 1
    assert lowest_heads(rows, 2) == [(3, 4), (3, 5)]
    (tmp_path / "results.json").write_text(json.dumps({"heads": rows}))
    assert [r["rank"] for r in read_head_table(tmp_path)] == list(range(1, 25))


def test_allkeys_variant_has_its_own_matched_controls_and_both_sets_are_avoided():
    pos = [(0, 1), (2, 3), (2, 5), (3, 0)]
    pos_all = [(1, 0), (1, 1), (2, 3), (3, 2)]
    table = _table_with(pos)
    for r in table:
        r["positional_with_sinks"] = (r["layer"], r["head"]) in set(pos_all)
        r["rank_with_sinks"] = r["layer"] * 6 + r["head"] + 1  # the reverse of the score order
    conds = build_conditions(
        ["positional", "random", "lowest", "positional_allkeys", "random_allkeys", "lowest_allkeys"],
        table=table,
        shape=SHAPE,
        random_seeds=range(6),
    )
    by = {c.name: c for c in conds}
    assert by["positional_allkeys"].heads == tuple(sorted(pos_all))
    both = set(pos) | set(pos_all)
    for c in conds:
        if not c.name.startswith("positional"):
            assert not set(c.heads) & both, c.name  # no Positional Head of either variant
    assert (
        by["random_allkeys@3"].per_layer == {1: 2, 2: 1, 3: 1}
        and by["random_allkeys@3"].family == "random_allkeys"
    )
    assert by["random@3"].per_layer == {0: 1, 2: 2, 3: 1}
    # lowest_allkeys follows rank_with_sinks (reversed: the highest-index heads of each layer are lowest)
    assert set(by["lowest_allkeys"].heads) == {(1, 5), (1, 4), (2, 4), (3, 5)}
    with pytest.raises(ValueError, match="positional_with_sinks"):
        build_conditions(["positional_allkeys"], table=_table_with(pos), shape=SHAPE)
