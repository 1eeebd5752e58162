"""The server's calibration of the tutor's operating point (strategies.calibrate): pure search on
hand-made F1 tables, and the bias arithmetic; the tutor's figures at the threshold per run
(experiments.tutor_calibration) on hand-made tutor.json files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from strategies.calibrate import (CLASS_BIAS, best_shifts, calibrated_classes, moved, offset_choice_noise,
                                  offset_search, search_shifts, shift_class_biases)


def test_best_shift_is_the_highest_f1_with_ties_to_the_smaller_shift():
    table = {"a": {-1.0: 0.2, 0.0: 0.3, 1.0: 0.5},
             "b": {-1.0: 0.6, 0.0: 0.4, 1.0: 0.6},  # a tie: the smaller in size, then the lower
             "c": {-0.5: 0.7, 0.0: 0.7, 0.5: 0.7}}  # flat: no reason to move
    assert best_shifts(table, min_gain=0.0) == {"a": 1.0, "b": -1.0, "c": 0.0}


def test_a_gain_below_the_margin_leaves_the_bias_where_it_is():
    table = {"a": {0.0: 0.500, 0.5: 0.505}, "b": {0.0: 0.500, 0.5: 0.52}}
    assert best_shifts(table, min_gain=0.01) == {"a": 0.0, "b": 0.5}
    with pytest.raises(ValueError, match="shift 0"):
        best_shifts({"a": {0.5: 0.1}})


def test_the_search_finds_each_classs_optimum_on_the_fine_grid():
    optimum = {"person": 1.25, "bus": -2.0, "car": 0.0}
    asked = []

    def f1_of(shifts):  # a peaked F1 per class, each depending on its own shift only
        asked.append(dict(shifts))
        return {c: max(0.0, 0.8 - 0.2 * abs(s - optimum[c])) for c, s in shifts.items()}

    shifts, table = search_shifts(f1_of, optimum, coarse=(-3, -2, -1, 0, 1, 2, 3), fine=0.25, min_gain=0.01)
    assert shifts == optimum
    assert table["person"][1.25] == pytest.approx(0.8) and table["person"][0.0] == pytest.approx(0.55)
    assert len(asked) == 7 + 2  # every coarse shift for all classes at once, then best -+ the fine step
    assert moved(shifts) == {"person": 1.25, "bus": -2.0}


def test_shifting_biases_moves_those_rows_only_and_leaves_the_input_alone():
    nh = {CLASS_BIAS: torch.zeros(5), "head.other": torch.ones(2)}
    out = shift_class_biases(nh, {1: 0.5, 3: -2.0})
    assert out[CLASS_BIAS].tolist() == [0.0, 0.5, 0.0, -2.0, 0.0]
    assert nh[CLASS_BIAS].tolist() == [0.0] * 5 and out["head.other"] is nh["head.other"]


def test_f1_learnt_calibrates_only_the_classes_outside_the_presumed_ones():
    validation, presumed = ["aeroplane", "car", "person", "sheep"], ("aeroplane", "person")
    assert calibrated_classes("f1", validation, presumed) == validation
    assert calibrated_classes("f1-learnt", validation, presumed) == ["car", "sheep"]
    assert calibrated_classes("off", validation, presumed) == []
    with pytest.raises(ValueError, match="calibration mode"):
        calibrated_classes("platt", validation, presumed)


def _tutor_run(folder, replicate: int, recalls: list[float]):
    """A run folder whose tutor has ``recalls`` on car (learnt) for rounds 1.., and 0.5 on person."""
    folder.mkdir()
    rounds = [{"round": k, "mAP": 0.4, "ap": {"car": 0.3, "person": 0.6}, "recall": {"car": r, "person": 0.5}}
              for k, r in enumerate([0.0, *recalls])]
    (folder / "tutor.json").write_text(json.dumps(rounds))
    specs = [{"private": ["car"], "kept": ["person"]}]
    (folder / "config.json").write_text(json.dumps({"client_specs": specs, "run": {"replicate": replicate}}))
    (folder / "rounds.jsonl").write_text("")  # a run folder: its edges' records are not read
    return folder


def test_tutor_calibration_figures_pair_replicates_and_refuse_unpaired_runs(tmp_path):
    from experiments.tutor_calibration import main, summarise

    variant = _tutor_run(tmp_path / "v", 0, [0.6, 0.4, 0.5])
    baseline = _tutor_run(tmp_path / "b", 0, [0.0, 0.8, 0.0])
    result = summarise([variant], [baseline])
    assert result["last_round"] == 3 and result["classes"] == {"learnt": ["car"], "presumed": ["person"]}
    learnt = {arm: result["arms"][arm]["learnt"] for arm in ("variant", "baseline")}
    assert learnt["variant"]["recall_mean"]["mean"] == pytest.approx(50.0)
    assert learnt["variant"]["recall_move"]["mean"] == pytest.approx(15.0)  # |40-60|, |50-40|
    assert learnt["baseline"]["recall_zero"]["mean"] == 2 and learnt["variant"]["recall_zero"]["mean"] == 0
    assert result["arms"]["variant"]["presumed"]["ap_last"]["mean"] == pytest.approx(60.0)
    assert main(["--variant", str(variant), "--baseline", str(baseline), "--out", str(tmp_path / "out")]) == 0
    assert "| mean recall at the threshold, % | 50.0 / 26.7 |" in (tmp_path / "out" / "tutor_calibration.md").read_text()
    other = _tutor_run(tmp_path / "o", 1, [0.1, 0.2, 0.3])
    with pytest.raises(SystemExit, match="replicates"):
        summarise([variant], [other])


def test_calibration_cap_sums_a_runs_shifts_and_needs_a_calibrated_run():
    from experiments.calibration_cap import summed_shifts

    history = [{"round": 0}, {"round": 1, "calibration": {"shift": {"car": 2.0, "bus": -0.25}}},
               {"round": 2, "calibration": {"shift": {"bus": -0.5}}}, {"round": 3, "calibration": {"shift": {}}}]
    assert summed_shifts(history, 1) == {"car": 2.0, "bus": -0.25}
    assert summed_shifts(history, 3) == {"car": 2.0, "bus": -0.75}
    with pytest.raises(SystemExit, match="fewer than 4"):
        summed_shifts(history, 4)
    with pytest.raises(SystemExit, match="no calibration"):
        summed_shifts([{"round": 1, "ap": {}}], 1)


def test_the_offset_search_starts_from_the_offsets_a_tutor_has():
    """F1 peaks at an absolute offset of -4.5 (a drift of the merged scores): from an offset of -3 the search
    reaches it, beyond the grid's 3 logits from zero; from -4.5 it stays."""
    def f1_of(offsets):
        return {c: 1.0 - abs(s + 4.5) / 10 for c, s in offsets.items()}

    new, change, _ = offset_search(f1_of, ["car"], {"car": -3.0})
    assert new == {"car": -4.5} and change == {"car": -1.5}
    new, change, _ = offset_search(f1_of, ["car"], {"car": -4.5})
    assert new == {"car": -4.5} and change == {"car": 0.0}
    assert offset_search(f1_of, ["car"], {})[0] == {"car": -3.25}  # by default the grid's end and one fine step
    assert offset_search(f1_of, ["car"], {}, reach=8.0)[0] == {"car": -4.5}  # followed beyond the grid (extend_search)


GRID = (-3, -2.5, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3)


def test_a_class_still_rising_at_the_grids_end_is_followed_beyond_it():
    """After an honest first round sheep's F1 was still rising at +3.25 (README, "The offset search beyond the
    grid"): the search follows such a class a coarse step at a time until its F1 falls, and leaves a class
    whose best lies inside the grid where it is, at no extra validation."""
    optimum = {"sheep": 5.0, "bus": -1.0, "dog": -4.5}
    asked = []

    def f1_of(shifts):
        asked.append(dict(shifts))
        return {c: max(0.0, 0.9 - 0.1 * abs(s - optimum[c])) for c, s in shifts.items()}

    shifts, table = search_shifts(f1_of, optimum, coarse=GRID, fine=0.25, reach=8.0)
    assert shifts == optimum
    # up: 3.5, 4, 4.5, 5, 5.5 (sheep only; 5.5 falls); down: -3.5, -4, -4.5, -5 (dog only); then the fine steps
    assert [sorted(a) for a in asked[13:22]] == [["sheep"]] * 5 + [["dog"]] * 4
    assert len(asked) == 13 + 9 + 2
    assert max(table["sheep"]) == 5.5 and min(table["bus"]) == -3.0
    assert search_shifts(f1_of, optimum, coarse=GRID, fine=0.25, reach=3.0)[0] == {"sheep": 3.25, "bus": -1.0,
                                                                                    "dog": -3.25}


def test_a_class_with_no_detection_at_any_shift_is_raised_until_it_has_some_but_never_past_the_reach():
    """F1 0 at every shift of the grid: the class's scores sit far below the threshold, so the search raises it
    until its F1 rises and peaks (cat after round 1 on heldout8); a class that never reaches the threshold is
    raised to ``reach`` and keeps its bias (no gain over shift 0)."""
    def f1_of(shifts):
        peaks = {"cat": 6.0}
        return {c: max(0.0, 0.5 - 0.2 * abs(s - peaks[c])) if c in peaks else 0.0 for c, s in shifts.items()}

    shifts, table = search_shifts(f1_of, ["cat", "ghost"], coarse=GRID, fine=0.25, reach=8.0)
    assert shifts == {"cat": 6.0, "ghost": 0.0}
    assert max(table["cat"]) == 6.5 and max(table["ghost"]) == 8.0 and min(table["ghost"]) == -3.0
    with pytest.raises(ValueError, match="symmetric"):
        search_shifts(f1_of, ["cat"], coarse=(-1, 0, 1, 2), reach=8.0)


def _counts(found: list[int], false: list[int], images: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image counts of a class with one object an image: ``found`` of them detected (true positives on the
    first images) and ``false`` false positives spread over the images."""
    tp = np.zeros(images, dtype=np.int64)
    tp[:found[0]] = 1
    fp = np.zeros(images, dtype=np.int64)
    for i in range(false[0]):
        fp[i % images] += 1
    return tp, fp, np.ones(images, dtype=np.int64)


def test_the_operating_points_noise_is_wide_on_a_flat_f1_and_nil_on_a_sharp_one():
    # flat: at 0, 20 found and 10 false (F1 0.571); at +0.25, 26 found and 19 false (F1 0.60): a few objects
    # apart, so resamples choose either, and the recall read on all images moves by 6 of 40 objects
    flat = {0.0: _counts([20], [10]), 0.25: _counts([26], [19]), -0.25: _counts([6], [2])}
    # sharp: F1 0.9 at 0, at most 0.5 at its neighbours: every resample keeps 0
    sharp = {0.0: _counts([36], [4]), 0.25: _counts([38], [70]), -0.25: _counts([14], [0])}
    noise = offset_choice_noise({"flat": flat, "sharp": sharp}, start={}, samples=300, seed=1)
    assert noise["sharp"]["chosen"] == {0.0: 1.0} and noise["sharp"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert set(noise["flat"]["chosen"]) == {0.0, 0.25} and 0.05 < noise["flat"]["std"] < 0.1
    # the same seed, the same figures
    assert offset_choice_noise({"flat": flat}, start={}, samples=300, seed=1)["flat"] == noise["flat"]


def test_the_replayed_choice_keeps_to_where_the_search_started_unless_a_move_gains_the_margin():
    flat = {0.0: _counts([20], [10]), 0.25: _counts([26], [19]), -0.25: _counts([6], [2])}
    # the search started at 0 and a move must gain 0.5 in F1: no resample moves
    stays = offset_choice_noise({"c": flat}, start={"c": 0.0}, samples=100, seed=0, min_gain=0.5)["c"]
    assert stays["chosen"] == {0.0: 1.0} and stays["std"] == pytest.approx(0.0, abs=1e-12)
    # started at +0.25 (the chosen offset is one step below it): resamples stay there unless 0 gains the margin
    kept = offset_choice_noise({"c": flat}, start={"c": 0.25}, samples=100, seed=0, min_gain=0.5)["c"]
    assert kept["chosen"] == {0.25: 1.0}
    with pytest.raises(ValueError, match="relative offset 0"):
        offset_choice_noise({"c": {0.25: _counts([1], [0])}}, start={}, samples=10, seed=0)
