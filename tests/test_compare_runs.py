"""``posheads.lit.compare``: across-run HDA vs perplexity from run directories' report and timeline."""

from __future__ import annotations

import json

import pytest

from posheads.lit.compare import compare_runs, main

EDGES = [[0, 1], [1, 2], [2, 4], [4, 8]]


def _run(tmp_path, name, scaling, seed, hda_final, area_final, ppl):
    run = tmp_path / name
    (run / "tracking").mkdir(parents=True)
    report = {
        "protocol": {"rope_scaling": scaling, "seed": seed, "data": {"train_order": f"shuffle_seed={seed}"}},
        "rows": [
            {"key": "before", "results": {"4": {"ppl": 20.0}, "8": {"ppl": 30.0}}},
            {"key": "after", "results": {"4": {"ppl": ppl - 1}, "8": {"ppl": ppl}}},
        ],
    }
    evals = [
        {"step": 0, "tracked_set": {"curve": [0.1, 0.2, 0.3, 0.5], "area": 1.0}, "ppl": {"ppl": 25.0}},
        {
            "step": 40,
            "tracked_set": {"curve": [0.1, 0.2, 0.3, hda_final], "area": area_final},
            "ppl": {"ppl": ppl},
        },
    ]
    timeline = {"bin_edges": EDGES, "tracked_heads": ["L0H1"], "evaluations": evals}
    (run / "report.json").write_text(json.dumps(report))
    (run / "tracking" / "timeline.json").write_text(json.dumps(timeline))
    return run


def test_compare_runs_correlates_across_runs(tmp_path, capsys):
    runs = [
        _run(tmp_path, "yarn_s0", "yarn x4", 0, 0.8, 1.6, 6.0),
        _run(tmp_path, "yarn_s1", "yarn x4", 1, 0.7, 1.5, 6.2),
        _run(tmp_path, "pi_s0", "linear x4", 0, 0.3, 0.9, 7.0),
        _run(tmp_path, "pi_s1", "linear x4", 1, 0.4, 0.8, 7.5),
    ]
    result = compare_runs(runs)
    first = result["runs"][0]
    assert first["hda_longest_first"] == 0.5 and first["hda_longest_final"] == 0.8
    assert (
        first["longest_bin"] == "4-8" and first["target_length"] == 8 and first["ppl_original_after"] == 5.0
    )
    rho = result["spearman_across_runs"]
    assert rho["area_final~ppl_target_after"]["rho"] == pytest.approx(-1.0)
    assert rho["hda_longest_final~ppl_target_after"]["rho"] == pytest.approx(-0.8)
    assert rho["area_final~ppl_target_after"]["n"] == 4
    main([str(r) for r in runs] + ["--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert "Spearman across runs area_final~ppl_target_after: -1.000" in out and "n = 4" in out
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["runs"][2]["scaling"] == "linear x4"


def test_compare_runs_names_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no report.json"):
        compare_runs([tmp_path / "empty"])


def test_method_separation_alone_is_not_a_significant_correlation(tmp_path):
    # Within each method HDA and PPL are unrelated (Spearman 0 exactly), but YaRN runs have high HDA and low
    # PPL and PI runs the reverse: the pooled rho is strongly negative; the grouped test must not call it
    # significant.
    hda0 = [0.1, 0.2, 0.3, 0.4, 0.5]
    ppl0 = [2.0, 5.0, 3.0, 1.0, 4.0]
    runs = [
        _run(tmp_path, f"yarn_s{i}", "yarn x4", i, 0.5 + h, 2.0, 6.0 + p / 10)
        for i, (h, p) in enumerate(zip(hda0, ppl0))
    ]
    runs += [
        _run(tmp_path, f"pi_s{i}", "linear x4", i, h, 1.0, 9.0 + p / 10)
        for i, (h, p) in enumerate(zip(hda0, ppl0))
    ]
    result = compare_runs(runs)
    pooled = result["spearman_across_runs"]["hda_longest_final~ppl_target_after"]
    assert pooled["rho"] < -0.5 and pooled["p_value"] < 0.05  # what the ungrouped test says
    g = result["grouped_by_method"]["hda_longest_final~ppl_target_after"]
    assert g["within"]["p_value"] > 0.5 and g["within"]["statistic"] == pytest.approx(0.0, abs=1e-12)
    assert g["within_method"] == {
        "yarn": {"rho": pytest.approx(0.0, abs=1e-12), "n": 5},
        "linear": {"rho": pytest.approx(0.0, abs=1e-12), "n": 5},
    }
    assert g["labels"]["p_value"] == 1.0  # two methods: the method means cannot be tested
