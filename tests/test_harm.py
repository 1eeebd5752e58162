"""experiments.harm: the harm gate's figures read back from hand-made records."""

from __future__ import annotations

import json

from experiments import harm


def test_harm_summary_counts_rejections_and_finds_the_largest_harm(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    decisions = [
        {"client": 0, "round": 1, "accepted": True, "rejected_by": [], "harm": {"bus": 0.02, "person": -0.01},
         "harm_threshold": {"bus": 0.1, "person": 0.12}},
        {"client": 1, "round": 1, "accepted": False, "rejected_by": ["harm"], "harm": {"bus": 0.3},
         "harm_threshold": {"bus": 0.1}},
        {"client": 2, "round": 1, "accepted": False, "rejected_by": ["direction"], "harm": {}},
        {"client": 0, "round": 2, "accepted": True, "rejected_by": [], "harm": {}},
    ]
    (run / "verification.jsonl").write_text("\n".join(json.dumps(d) for d in decisions) + "\n")
    byzantine = tmp_path / "byz.json"
    byzantine.write_text(json.dumps({"hostile_clients": [1], "all_honest": {"harm": []}, "attacks": {"score_shift:3": {
        "harm": [{"client": 0, "hostile": False, "accepted": True, "harm": {"bus": 0.05}, "threshold": {"bus": 0.1}},
                 {"client": 1, "hostile": True, "accepted": False, "harm": {"bus": 0.4, "horse": 0.2},
                  "threshold": {"bus": 0.1, "horse": 0.1}}], "tutor_recall": {"bus": 0.7}}}}))
    out = tmp_path / "harm"
    assert harm.main(["--runs", str(run), "--byzantine", str(byzantine), "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    first, second = report["runs"][str(run)]
    assert first["largest_harm"] == 0.3 and first["largest_class"] == "bus" and first["largest_client"] == 1
    assert first["rejected_by_harm"] == [1] and first["rejected_other"] == [2] and first["measured"] == 2
    assert first["smallest_threshold"] == 0.1 and second["measured"] == 0
    attacked = report["byzantine"][1]
    assert attacked["hostile"]["largest_harm"] == 0.4 and attacked["honest"]["largest_harm"] == 0.05
    assert attacked["rejected"] == [1] and report["byzantine"][0]["rejected"] == []
    assert "1 of 4 honest deltas rejected" in out.with_suffix(".md").read_text()
