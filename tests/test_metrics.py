"""Tests for evaluation/metrics.py (knowledge gain, forgetting, released knowledge, spread, summaries)."""

from __future__ import annotations

import math

import pytest

from evaluation.metrics import (
    class_forgetting,
    client_summary,
    flatten_class_names,
    knowledge_gain,
    knowledge_spread,
    method_means,
    method_table,
    other_private_classes,
    released_knowledge,
    round_series,
    unintended_forgetting,
)

NAN = float("nan")


# ----------------------------------------------------------------------------------------------
# Formulas on hand-made numbers
# ----------------------------------------------------------------------------------------------


def test_knowledge_gain_is_mean_change_over_private_classes():
    start = {"cat": 0.10, "dog": 0.20, "car": 0.70}
    now = {"cat": 0.50, "dog": 0.40, "car": 0.10}
    # (0.40 + 0.20) / 2; the presumed class "car" does not count.
    assert knowledge_gain(start, now, ["cat", "dog"]) == pytest.approx(0.30)


def test_knowledge_gain_skips_nan_and_missing_classes():
    start = {"cat": 0.10, "dog": NAN, "cow": 0.2}
    now = {"cat": 0.50, "dog": 0.90, "cow": NAN}
    assert knowledge_gain(start, now, ["cat", "dog", "cow", "sheep"]) == pytest.approx(0.40)
    assert math.isnan(knowledge_gain(start, now, ["dog", "cow"]))
    assert math.isnan(knowledge_gain(start, now, []))


def test_released_knowledge_negative_when_dropped_class_falls():
    start = {"horse": 0.60, "boat": 0.40}
    now = {"horse": 0.20, "boat": 0.40}
    assert released_knowledge(start, now, ["horse", "boat"]) == pytest.approx(-0.20)
    assert math.isnan(released_knowledge(start, now, []))


def test_knowledge_spread_over_other_clients_private_classes():
    all_private = [["cat"], ["dog"], ["cat", "cow"]]
    others = other_private_classes(all_private, ["cat"])
    assert others == ["dog", "cow"]
    start = {"cat": 0.0, "dog": 0.10, "cow": 0.0}
    now = {"cat": 0.9, "dog": 0.30, "cow": 0.10}
    assert knowledge_spread(start, now, others) == pytest.approx(0.15)


def test_flatten_class_names_accepts_flat_nested_and_mapping():
    assert flatten_class_names(["cat", "dog", "cat"]) == ["cat", "dog"]
    assert flatten_class_names([["cat"], ("dog", "cat")]) == ["cat", "dog"]
    assert flatten_class_names({0: ["cow"], 1: ["cat"]}) == ["cow", "cat"]
    assert flatten_class_names(None) == []


def test_class_forgetting_is_max_over_history_not_first_minus_last():
    # Start 0.5, rises to 0.8, ends 0.6: forgetting is 0.8 - 0.6 (not 0.5 - 0.6 < 0).
    assert class_forgetting([0.5, 0.8, 0.6]) == pytest.approx(0.2)
    # The peak may be anywhere before the latest evaluation.
    assert class_forgetting([0.9, 0.3, 0.4, 0.35]) == pytest.approx(0.55)


def test_class_forgetting_clamped_at_zero_when_latest_is_best():
    assert class_forgetting([0.2, 0.3, 0.7]) == 0.0
    assert class_forgetting([0.4, 0.4]) == 0.0


def test_class_forgetting_nan_rules():
    assert class_forgetting([NAN, 0.8, NAN, 0.5]) == pytest.approx(0.3)  # NaN earlier skipped
    assert math.isnan(class_forgetting([0.8, NAN]))  # latest missing
    assert math.isnan(class_forgetting([NAN, NAN, 0.5]))  # nothing earlier
    assert math.isnan(class_forgetting([0.5]))  # a single evaluation


def test_unintended_forgetting_averages_over_given_classes():
    history = [
        {"car": 0.6, "bus": 0.5, "cat": 0.0, "boat": NAN},
        {"car": 0.7, "bus": 0.4, "cat": 0.5, "boat": NAN},
        {"car": 0.5, "bus": 0.6, "cat": 0.3, "boat": NAN},
    ]
    # car: 0.7 - 0.5 = 0.2; bus: latest is best -> 0; boat: NaN -> skipped.
    assert unintended_forgetting(history, ["car", "bus", "boat"]) == pytest.approx(0.1)
    assert unintended_forgetting(history, ["car"]) == pytest.approx(0.2)
    assert math.isnan(unintended_forgetting(history, ["boat"]))
    assert math.isnan(unintended_forgetting(history, []))


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------

SPEC = {"client": 0, "private": ["cat"], "kept": ["car", "bus"], "dropped": ["horse"],
        "protected": ["car"]}
ALL_PRIVATE = [["cat"], ["dog"]]


def make_record(method, round_number, client, ap_before, ap_after, **extra):
    record = {"method": method, "round": round_number, "client": client, "ap_before": ap_before,
              "ap_after": ap_after, "bytes_up": 1000 * round_number, "bytes_down": 4000,
              "seconds": {"train": 1.5, "eval": 0.5}, "peak_rss_mb": 100.0 * round_number,
              "accepted": True}
    record.update(extra)
    return record


def two_round_records(method="diredi", client=0):
    r0 = {"cat": 0.0, "dog": 0.1, "car": 0.6, "bus": 0.5, "horse": 0.6, "cow": NAN}
    r1 = {"cat": 0.3, "dog": 0.2, "car": 0.8, "bus": 0.5, "horse": 0.4, "cow": NAN}
    r2 = {"cat": 0.5, "dog": 0.3, "car": 0.7, "bus": 0.6, "horse": 0.2, "cow": NAN}
    return [
        # given out of order on purpose
        make_record(method, 2, client, r1, r2, accepted=False,
                    after={"precision": 0.6, "recall": 0.5, "f1": 0.55}),
        make_record(method, 1, client, r0, r1),
    ]


def test_client_summary_on_tiny_history():
    summary = client_summary(two_round_records(), SPEC, ALL_PRIVATE)
    assert summary["method"] == "diredi" and summary["client"] == 0 and summary["rounds"] == 2
    assert summary["gain"] == pytest.approx(0.5)  # cat 0.0 -> 0.5
    # car peaked at 0.8 after round 1, ends 0.7 -> 0.1; bus ends at its best -> 0.
    assert summary["forgetting_kept"] == pytest.approx(0.05)
    assert summary["forgetting_protected"] == pytest.approx(0.1)
    assert summary["released"] == pytest.approx(-0.4)  # horse 0.6 -> 0.2
    assert summary["spread"] == pytest.approx(0.2)  # dog 0.1 -> 0.3
    # final mAP over the evaluated (non-NaN) classes of the last ap_after
    assert summary["map_final"] == pytest.approx((0.5 + 0.3 + 0.7 + 0.6 + 0.2) / 5)
    assert summary["map_start"] == pytest.approx((0.0 + 0.1 + 0.6 + 0.5 + 0.6) / 5)
    assert summary["precision"] == pytest.approx(0.6)
    assert summary["f1"] == pytest.approx(0.55)
    assert summary["bytes_up"] == pytest.approx(1500.0)
    assert summary["bytes_down"] == pytest.approx(4000.0)
    assert summary["seconds"] == {"eval": 1.0, "train": 3.0}
    assert summary["seconds_total"] == pytest.approx(4.0)
    assert summary["peak_rss_mb"] == pytest.approx(200.0)
    assert (summary["accepted_rounds"], summary["rejected_rounds"]) == (1, 1)


def test_client_summary_nan_when_no_measurable_class():
    records = [make_record("local", 1, 0, {"cat": NAN, "car": 0.5}, {"cat": NAN, "car": 0.5})]
    spec = {"client": 0, "private": ["cat"], "kept": ["car"], "dropped": [], "protected": []}
    summary = client_summary(records, spec, [])
    assert math.isnan(summary["gain"])
    assert summary["forgetting_kept"] == 0.0
    assert math.isnan(summary["forgetting_protected"])
    assert math.isnan(summary["released"])
    assert math.isnan(summary["spread"])
    assert math.isnan(summary["precision"])  # absent from the record


def test_client_summary_requires_records():
    with pytest.raises(ValueError):
        client_summary([], SPEC, ALL_PRIVATE)


def test_method_table_and_means():
    records = (two_round_records("fedavg", 0) + two_round_records("diredi", 0)
               + two_round_records("diredi", 1))
    specs = [SPEC, {"client": 1, "private": ["dog"], "kept": ["car"], "dropped": [],
                    "protected": ["car"]}]
    table = method_table(records, specs, ALL_PRIVATE)
    # method order follows the paper (diredi first), then client
    assert [(row["method"], row["client"]) for row in table] == [("diredi", 0), ("diredi", 1),
                                                                 ("fedavg", 0)]
    client1 = table[1]
    assert client1["gain"] == pytest.approx(0.2)  # dog 0.1 -> 0.3
    assert client1["spread"] == pytest.approx(0.5)  # cat 0.0 -> 0.5
    assert math.isnan(client1["released"])

    means = method_means(table)
    assert [row["method"] for row in means] == ["diredi", "fedavg"]
    diredi = means[0]
    assert diredi["clients"] == 2
    assert diredi["gain"] == pytest.approx((0.5 + 0.2) / 2)
    assert diredi["released"] == pytest.approx(-0.4)  # NaN of client 1 skipped
    assert diredi["seconds"] == {"eval": 1.0, "train": 3.0}
    assert diredi["peak_rss_mb"] == pytest.approx(200.0)


def test_round_series_tracks_metrics_as_they_stood_each_round():
    series = round_series(two_round_records(), [SPEC], ALL_PRIVATE)
    assert [(row["method"], row["round"]) for row in series] == [("diredi", 1), ("diredi", 2)]
    assert series[0]["gain"] == pytest.approx(0.3)  # cat 0.0 -> 0.3 after round 1
    assert series[0]["forgetting_kept"] == 0.0  # car rose, bus held: nothing forgotten yet
    assert series[1]["gain"] == pytest.approx(0.5)
    assert series[1]["forgetting_kept"] == pytest.approx(0.05)  # car fell from its 0.8 peak


def test_run_summary_reports_the_mean_round_wall_time_of_federated_methods():
    from evaluation.metrics import run_summary

    federated = two_round_records("diredi")
    for record, seconds in zip(federated, (20.0, 10.0)):  # rounds 2 and 1
        record["round_wall_s"] = seconds
    summary = run_summary(federated + two_round_records("local"), [SPEC], ALL_PRIVATE, 2, 99.0)
    assert summary["methods"]["diredi"]["round_s"] == pytest.approx(15.0)
    assert summary["methods"]["local"]["round_s"] is None
    assert summary["methods"]["diredi"]["gain"] == pytest.approx(50.0)  # percentage points


def test_worst_drop_charges_drops_below_the_start_not_below_the_best_round():
    """A class that rises and comes back to its start has forgotten (Chaudhry) but never dropped below
    the model it started from; a dip below the start is charged at its deepest; classes are averaged."""
    from evaluation.metrics import class_forgetting, worst_drop

    start = {"person": 0.50, "car": 0.40}
    history = [{"person": 0.60, "car": 0.30}, {"person": 0.50, "car": 0.35}]
    assert class_forgetting([0.50, 0.60, 0.50]) == pytest.approx(0.10)
    assert worst_drop(start, history, ["person"]) == 0.0
    assert worst_drop(start, history, ["car"]) == pytest.approx(0.10)
    assert worst_drop(start, history, ["person", "car"]) == pytest.approx(0.05)
    assert math.isnan(worst_drop(start, history, ["dog"]))


def test_the_objects_weighted_gain_weighs_each_class_by_its_test_objects():
    from evaluation.metrics import objects_weighted_gain, shard_objects

    start, now = {"car": 0.0, "dog": 0.1}, {"car": 0.9, "dog": 0.5}
    objects = shard_objects({"after": {"npos.car": 4.0, "npos.dog": 96.0, "mAP": 0.3}})
    assert objects == {"car": 4.0, "dog": 96.0}
    assert objects_weighted_gain(start, now, ["car", "dog"], objects) == pytest.approx((0.9 * 4 + 0.4 * 96) / 100)
    assert objects_weighted_gain(start, now, ["car", "dog"], {"dog": 96.0}) == pytest.approx(0.65)  # a count missing
    assert objects_weighted_gain(start, {"dog": 0.5}, ["car", "dog"], objects) == pytest.approx(0.4)  # car not evaluated
    assert math.isnan(objects_weighted_gain(start, {}, ["car"], objects))
