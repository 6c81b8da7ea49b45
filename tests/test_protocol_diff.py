"""The protocol comparison both command lines use before resuming a run."""

from posheads.protocol_diff import describe_changes, flatten, protocol_changes


def test_flatten_keeps_empty_mappings_as_values():
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}


def test_changes_skip_free_options_and_options_added_at_their_default():
    before = {"model": {"lr": 1e-4, "rope": {"factor": 2}}, "trainer": {"max_steps": 10}}
    after = {
        "model": {"lr": 1e-4, "rope": {"factor": 4}, "new_opt": 3},
        "trainer": {"max_steps": 99},
        "added": {"x": 5},
    }
    defaults = {"model": {"new_opt": 3}, "added": {"x": 1}}
    changes = protocol_changes(before, after, defaults=defaults, free=["trainer.max_steps"])
    assert changes == {
        "added.x": {"before": None, "after": 5},  # added since, but not at its default: a change
        "model.rope.factor": {"before": 2, "after": 4},
    }
    assert protocol_changes(before, before) == {}
    assert protocol_changes({"trainer": {"max_steps": 1}}, {}, free=["trainer"]) == {}


def test_describe_changes_lists_the_first_ones_and_counts_the_rest():
    changes = {f"o{i}": {"before": i, "after": i + 1} for i in range(8)}
    text = describe_changes(changes, limit=2)
    assert text == "o0 (0 -> 1), o1 (1 -> 2) and 6 more"
