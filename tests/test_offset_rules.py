"""experiments.offset_rules on hand-made search tables."""

import pytest

from experiments.offset_rules import choose, replay

# [offset, F1, recall]: F1 flat between 1.0 and 1.25, recall not
TABLE = [[0.0, 0.30, 0.20], [0.5, 0.50, 0.40], [1.0, 0.570, 0.55], [1.25, 0.569, 0.65], [1.5, 0.55, 0.72]]


def test_each_rule_picks_its_offset():
    assert choose(TABLE, "f1")[0] == 1.0
    assert choose(TABLE, "recall:0.01")[0] == 1.25  # within a point of the best F1, the highest recall
    assert choose(TABLE, "recall:0.0001")[0] == 1.0
    assert choose(TABLE, "median:0.03")[0] == 1.25  # 1.0, 1.25, 1.5 are within 0.03
    assert choose(TABLE, "start:0.03", start=1.5)[0] == 1.5
    assert choose(TABLE, "f1", start=1.0)[0] == 1.0
    assert choose([[0.0, 0.500, 0.5], [0.5, 0.505, 0.7]], "f1")[0] == 0.0  # not beaten by the 1-point margin
    with pytest.raises(ValueError, match="unknown rule"):
        choose(TABLE, "mode:0.1")


def test_replay_judges_each_rule_against_the_same_rules_references():
    def run(table):
        return {"calibration": [{"offsets": {}}, {"search": {"car": table}}]}

    lower = [[0.0, 0.30, 0.20], [0.5, 0.50, 0.40], [1.0, 0.570, 0.45], [1.25, 0.569, 0.65], [1.5, 0.55, 0.72]]
    sweep = {"all_honest": run(TABLE), "hostile_kept_out": run(TABLE),
             "attacks": {"shift": {**run(lower), "classes": {"car": {"tolerance": {"recall": 0.05}}}}}}
    out = replay(sweep, rules=("f1", "recall:0.01"))
    assert out["f1"]["beyond_tolerance"]["shift"] == {"car": [10.0, 5.0]} and out["f1"]["through"] == 1
    assert out["recall:0.01"]["through"] == 0  # both pick 1.25, where the attack's recall equals the references'
    with pytest.raises(ValueError, match="no search table"):
        replay({**sweep, "all_honest": {"calibration": [{"offsets": {}}]}})
