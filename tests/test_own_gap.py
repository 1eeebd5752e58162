"""experiments.own_gap: the own-class gain per class and client, on hand-made records."""

import math

import pytest

from experiments.own_gap import gap_shares, mean_gain, own_classes

SPECS = [{"client": 0, "private": ["car", "dog"]}, {"client": 1, "private": ["cat"]}]


def record(method: str, client: int, server_round: int, after: dict, before: dict | None = None,
           objects: dict | None = None) -> dict:
    return {"method": method, "client": client, "round": server_round, "ap_before": before or {},
            "ap_after": after, "after": {f"npos.{c}": n for c, n in (objects or {}).items()}}


RECORDS = [
    record("diredi", 0, 1, {"car": 0.2, "dog": 0.4}, before={"car": 0.0, "dog": 0.1}, objects={"car": 4, "dog": 96}),
    record("diredi", 0, 2, {"car": 0.9, "dog": 0.5}, objects={"car": 4, "dog": 96}),
    record("diredi", 1, 1, {"cat": 0.3}, before={"cat": 0.0}, objects={"cat": 50}),
    record("diredi", 1, 2, {"cat": 0.5}, objects={"cat": 50}),
    record("local", 0, 2, {"car": 0.1, "dog": 0.5}, before={"car": 0.0, "dog": 0.1}, objects={"car": 4, "dog": 96}),
    record("local", 1, 2, {"cat": 0.6}, before={"cat": 0.0}, objects={"cat": 50}),
]


def test_own_classes_measure_from_the_client_s_start_and_carry_the_test_objects():
    got = own_classes(RECORDS, SPECS, "diredi", 2)
    assert got[0]["car"] == {"ap": pytest.approx(90.0), "gain": pytest.approx(90.0), "objects": 4.0}
    assert got[0]["dog"]["gain"] == pytest.approx(40.0)  # from round 1's before (10), not from round 1's after
    assert got[1]["cat"]["gain"] == pytest.approx(50.0)
    assert own_classes(RECORDS, SPECS, "diredi", 3) == {}
    assert set(own_classes(RECORDS, SPECS, "local", 2)) == {0, 1}  # a method's first record is its start


def test_weighting_by_test_objects_tames_a_class_with_a_handful_of_objects():
    by_client = own_classes(RECORDS, SPECS, "diredi", 2)
    alike = ((90 + 40) / 2 + 50) / 2
    weighted = ((90 * 4 + 40 * 96) / 100 + 50) / 2
    assert mean_gain(by_client) == pytest.approx(alike)
    assert mean_gain(by_client, weighted=True) == pytest.approx(weighted) and weighted < alike
    no_counts = {0: {"car": {"ap": 90.0, "gain": 90.0, "objects": math.nan},
                     "dog": {"ap": 40.0, "gain": 40.0, "objects": 96.0}}}
    assert mean_gain(no_counts, weighted=True) == pytest.approx(65.0)  # a missing count: classes alike
    assert math.isnan(mean_gain({}))


def test_the_shares_add_up_to_the_difference_of_the_mean_gains():
    first, second = own_classes(RECORDS, SPECS, "diredi", 2), own_classes(RECORDS, SPECS, "local", 2)
    rows = gap_shares(first, second)
    assert sum(r["share"] for r in rows) == pytest.approx(mean_gain(first) - mean_gain(second))
    car = next(r for r in rows if r["class"] == "car")
    assert car["share"] == pytest.approx((90 - 10) / 2 / 2) and car["objects"] == 4.0
