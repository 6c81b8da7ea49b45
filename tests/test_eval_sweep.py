"""Ablation-sweep conditions: random controls matched per layer, lowest heads, user lists, validation."""

from __future__ import annotations

import json

import pytest

from posheads.eval.sweep import (
    ModelShape,
    build_conditions,
    lowest_heads,
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


def test_random_controls_fall_back_to_all_heads_of_a_full_layer():
    pos = [(1, h) for h in range(5)]
    heads = random_matched_heads(pos, SHAPE, 0)
    assert len(heads) == 5 and all(layer == 1 for layer, _ in heads)


def test_lowest_heads():
    assert lowest_heads(_table(), 3) == [(0, 0), (0, 1), (0, 2)]


def test_build_conditions():
    conds = build_conditions(
        ["none", "positional", "random", "lowest", "heads", "dims_high", "dims_low"],
        table=_table(),
        shape=SHAPE,
        random_seeds=[0, 1, 2],
        user_heads=["1.2", [3, 4]],
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
    with pytest.raises(ValueError, match=r"\['bogus'\] not in"):
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
