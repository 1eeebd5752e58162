"""experiments.false_rejections: honest deltas rejected, counted from hand-made run folders."""

from __future__ import annotations

import json

import pytest

from experiments import false_rejections


def _run(folder, decisions, run=None):
    folder.mkdir(parents=True)
    (folder / "verification.jsonl").write_text("\n".join(json.dumps(d) for d in decisions) + "\n")
    if run is not None:
        (folder / "config.json").write_text(json.dumps({"command": "x", "run": run}))


def _decision(client, round_, accepted, rejected_by=()):
    return {"client": client, "round": round_, "accepted": accepted, "rejected_by": list(rejected_by),
            "reason": "ok" if accepted else f"rejected by {rejected_by}"}


def test_census_counts_each_gate_and_keeps_other_gates_apart(tmp_path):
    today = {"scenario": "data/scenarios/default8.yaml", "claims": "earned", "spread": "on", "protected_scope": "merge",
             "operating_tolerance": "inf", "operating_harm": "inf", "kept_tolerance": "inf"}
    admitted = {**_decision(1, 2, True), "appeal": {"accepted": True}}  # rejected whole, admitted in the merge
    _run(tmp_path / "a" / "rep0", [_decision(0, 1, True), _decision(1, 1, False, ["direction"]),
                                   _decision(0, 2, False, ["protected", "direction"]), admitted], today)
    _run(tmp_path / "e", [_decision(0, 1, False, ["protected"]), _decision(1, 1, True)],
         {**today, "protected_scope": "delta"})
    _run(tmp_path / "b", [_decision(0, 1, False, ["harm"]), _decision(1, 1, True)], {**today, "operating_harm": 0.1})
    _run(tmp_path / "c", [_decision(0, 1, False)])  # no config.json: an unknown build, never "default"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "verification.jsonl").write_text("")  # a run that has not reached DiReDi yet
    out = tmp_path / "out" / "fr"
    assert false_rejections.main([str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"].split("/")[-1] for r in report["runs"]] == ["rep0", "b", "c", "e"]
    first = report["runs"][0]
    assert first["deltas"] == 4 and first["rejected"] == 2 and first["rounds"] == 2
    assert first["admitted_in_merge"] == 1
    assert first["by_gate"] == {"direction": 2, "protected": 1} and first["scenario"] == "default8"
    summary = report["summary"]
    assert summary["at_default_gates"] == {"runs": 1, "deltas": 4, "rejected": 2, "admitted_in_merge": 1,
                                           "by_gate": {"direction": 2, "protected": 1}, "rate": 0.5}
    # the run whose protected gate judged deltas whole is counted apart, not among the defaults
    assert summary["at_default_gates_but_scope"]["runs"] == 1 and summary["at_default_gates_but_scope"]["rejected"] == 1
    assert summary["all"]["deltas"] == 9 and summary["all"]["rejected"] == 5
    assert summary["all"]["by_gate"]["unrecorded"] == 1 and summary["other_gates"]["runs"] == 3
    assert summary["at_default_gates_by_claims"]["earned"]["rejected"] == 2
    text = out.with_suffix(".md").read_text()
    assert "At the default gates: 2 of 4 honest deltas rejected over 1 runs" in text
    assert "operating_harm 0.1" in text and "unknown (no config.json)" in text and "protected_scope delta" in text
    assert "but the protected gate judging each delta whole (protected_scope delta): 1 of 2 over 1 runs" in text


def test_a_run_from_before_a_gate_existed_counts_as_that_gate_off(tmp_path):
    _run(tmp_path / "old", [_decision(0, 1, True)], {"scenario": "data/scenarios/default8.yaml"})
    old = false_rejections.census(tmp_path / "old")
    assert old["gates"]["operating_harm"] == "inf" and old["gates"]["protected_tolerance"] == 0.05
    assert old["claims"] == "trusted" and old["spread"] == "off"  # what runs did before those defaults changed
    assert false_rejections.gate_settings(None) is None


def test_a_folder_without_runs_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        false_rejections.main([str(tmp_path), "--out", str(tmp_path / "x")])
    assert "no run folder with decisions" in capsys.readouterr().err


def test_headroom_is_each_accepted_delta_over_its_rounds_low_median(tmp_path):
    def kept(client, round_, norm, weight, **cut):
        return {**_decision(client, round_, True), "norm": norm, "weight": weight, **cut}
    decisions = [kept(0, 1, 1.0, 100), kept(1, 1, 2.0, 100), kept(2, 1, 3.0, 150, clip_factor=0.9),
                 kept(3, 1, 5.0, 300, weight_used=200.0, row_clip={"cat": 0.5, "dog": 1.0}),
                 {**_decision(4, 1, False, ["direction"]), "norm": 100.0, "weight": 9000},  # rejected: not counted
                 kept(0, 2, 4.0, 50)]
    head = false_rejections.headroom(decisions)
    # round 1: low median of norms 1, 2, 3, 5 is 2; of claims 100, 100, 150, 300 is 100; round 2 alone: 1
    assert head["norm_ratios"] == [0.5, 1.0, 1.5, 2.5, 1.0] and head["claim_ratios"] == [1.0, 1.0, 1.5, 3.0, 1.0]
    assert (head["clipped"], head["capped"], head["rows_scaled"]) == (1, 1, 1)
    _run(tmp_path / "r", decisions, {"scenario": "data/scenarios/default8.yaml"})
    out = tmp_path / "fr"
    assert false_rejections.main([str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["summary"]["headroom"]["norm"]["max"] == 2.5 and report["summary"]["headroom"]["claim"]["deltas"] == 5
    assert report["runs"][0]["headroom"]["claim_ratio_max"] == 3.0
    assert "the largest accepted norm 2.50 x its round's low median" in out.with_suffix(".md").read_text()
