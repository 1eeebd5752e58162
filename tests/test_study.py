"""Tests for evaluation/study.py (nested bootstrap, per-round client values, the study summary) and
report/study.py (compare.json, compare.md, plots)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.study import (
    client_round_values,
    compute_seconds,
    gain_at_compute,
    nested_bootstrap_ci,
    paired_difference,
    summarise_study,
    verdict,
)
from report.study import entry_cell, study_markdown, summarise_run_folders, verdict_grid, write_study
from report.writer import TUTOR_HISTORY, RunFolder

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SAMPLES = 400  # enough for the checks below, fast


# ----------------------------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------------------------


def test_constant_table_gives_a_zero_width_interval_at_the_constant():
    result = nested_bootstrap_ci(np.full((3, 4), 0.25), samples=SAMPLES)
    assert result["mean"] == pytest.approx(0.25)
    assert result["ci95"][0] == result["ci95"][1] == result["mean"]
    assert (result["n_seeds"], result["n_clients"]) == (3, 4)


def test_interval_brackets_the_mean_and_stays_within_the_values():
    table = np.array([[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0.0, 1.0, 5.0]])
    result = nested_bootstrap_ci(table, samples=SAMPLES)
    lo, hi = result["ci95"]
    assert result["mean"] == pytest.approx(table.mean())
    assert table.min() <= lo < result["mean"] < hi <= table.max()
    wider = nested_bootstrap_ci(table, samples=SAMPLES, level=0.99)["ci95"]
    assert wider[0] <= lo and wider[1] >= hi


def test_large_shift_is_a_yes_and_identical_methods_cannot_tell():
    rng = np.random.default_rng(1)
    b = rng.normal(0.0, 1.0, size=(3, 8))
    a = b + 10.0 + rng.normal(0.0, 1.0, size=(3, 8))
    diff = paired_difference(a, b, samples=SAMPLES)
    assert diff["ci95"][0] > 0 and diff["mean"] == pytest.approx(np.mean(a - b))
    assert verdict(diff, higher_is_better=True) == "yes"
    assert verdict(diff, higher_is_better=False) == "no"  # "A lower than B": all of it on the worse side
    same = paired_difference(b, b, samples=SAMPLES)
    assert same["mean"] == 0.0 and same["ci95"] == [0.0, 0.0]
    assert verdict(same, True) == verdict(same, False) == "cannot tell"


def test_verdict_reads_the_interval():
    assert verdict([0.1, 2.0], True) == "yes"
    assert verdict([-2.0, -0.1], True) == "no"
    assert verdict([-2.0, -0.1], False) == "yes"
    assert verdict([0.1, 2.0], False) == "no"
    assert verdict([-1.0, 1.0], True) == "cannot tell"
    assert verdict([0.0, 1.0], True) == "cannot tell"  # 0 is inside
    assert verdict([NAN, NAN], True) == "cannot tell"
    assert verdict({"ci95": [1.0, 2.0]}, True) == "yes"


def test_nans_are_skipped_and_all_nan_is_nan():
    table = np.array([[1.0, NAN, 3.0], [NAN, NAN, 3.0]])
    result = nested_bootstrap_ci(table, samples=SAMPLES)
    assert result["mean"] == pytest.approx((1 + 3 + 3) / 3)
    assert result["ci95"][0] < result["mean"] < result["ci95"][1]
    # NaN cells are left out of every resample, not counted as 0: finite cells all 5 give exactly [5, 5]
    fives = nested_bootstrap_ci(np.array([[5.0, NAN, 5.0], [NAN, NAN, 5.0]]), samples=SAMPLES)
    assert fives["ci95"] == [5.0, 5.0]
    assert (result["n_seeds"], result["n_clients"]) == (2, 2)
    empty = nested_bootstrap_ci([[NAN, NAN], [NAN, None]], samples=SAMPLES)
    assert math.isnan(empty["mean"]) and all(math.isnan(v) for v in empty["ci95"])
    assert (empty["n_seeds"], empty["n_clients"]) == (0, 0)
    # paired: NaN where either side is NaN
    diff = paired_difference([[1.0, NAN]], [[0.5, 2.0]], samples=SAMPLES)
    assert diff["mean"] == pytest.approx(0.5) and diff["n_clients"] == 1


def test_same_seed_same_interval_other_seed_other_draws():
    table = np.random.default_rng(0).normal(size=(4, 6))
    first = nested_bootstrap_ci(table, samples=SAMPLES, seed=7)
    assert nested_bootstrap_ci(table, samples=SAMPLES, seed=7) == first
    assert nested_bootstrap_ci(table, samples=SAMPLES, seed=8)["ci95"] != first["ci95"]


def test_one_replicate_or_one_client_works():
    clients_only = nested_bootstrap_ci([[1.0, 2.0, 3.0, 4.0]], samples=SAMPLES)  # S = 1: over clients
    assert clients_only["n_seeds"] == 1 and clients_only["ci95"][0] < 2.5 < clients_only["ci95"][1]
    replicates_only = nested_bootstrap_ci([1.0, 2.0, 3.0], samples=SAMPLES)  # 1-D: S replicates, C = 1
    assert replicates_only["n_seeds"] == 3 and replicates_only["n_clients"] == 1
    assert replicates_only["ci95"][0] < 2.0 < replicates_only["ci95"][1]
    single = nested_bootstrap_ci([[0.5]], samples=SAMPLES)
    assert single["mean"] == single["ci95"][0] == single["ci95"][1] == 0.5


def test_replicate_stage_widens_the_interval_when_replicates_differ():
    # Replicate means 0 and 10, no spread within: the client-only view of one replicate has no width,
    # the nested one spans the replicates.
    table = np.array([[0.0] * 4, [10.0] * 4])
    result = nested_bootstrap_ci(table, samples=SAMPLES)
    assert result["ci95"] == [0.0, 10.0]
    assert nested_bootstrap_ci(table[:1], samples=SAMPLES)["ci95"] == [0.0, 0.0]


# ----------------------------------------------------------------------------------------------
# Per round and client
# ----------------------------------------------------------------------------------------------


SPEC = {"client": 0, "private": ["cat"], "kept": ["car", "bus"], "dropped": ["horse"], "protected": ["car"]}


def counts(tp, fp, npos, name):
    return {f"tp.{name}": tp, f"fp.{name}": fp, f"npos.{name}": npos}


def hand_records():
    """One client, two rounds: cat learned, car dips then partly recovers, bus steady."""
    start = {"car": 0.60, "bus": 0.50, "horse": 0.40, "cat": 0.00, "dog": 0.10}
    after1 = {"car": 0.40, "bus": 0.50, "horse": 0.30, "cat": 0.30, "dog": 0.20}
    after2 = {"car": 0.50, "bus": 0.50, "horse": 0.20, "cat": 0.50, "dog": 0.30}
    before = {**counts(8, 2, 10, "car"), **counts(5, 5, 10, "bus"), **counts(0, 0, 4, "cat")}
    return [
        {"method": "diredi", "round": 2, "client": 0, "ap_before": after1, "ap_after": after2,
         "bytes_up": 1_000_000, "bytes_down": 3_000_000, "seconds": {"rd_tutor1": 4.0, "evaluate": 100.0},
         "after": {**counts(6, 4, 10, "car"), **counts(5, 5, 10, "bus"), **counts(3, 1, 4, "cat")}},
        {"method": "diredi", "round": 1, "client": 0, "ap_before": start, "ap_after": after1, "before": before,
         "bytes_up": 500_000, "bytes_down": 1_500_000,
         "seconds": {"rd_tutor1": 2.0, "distill_c": 1.0, "evaluate_before": 50.0, "evaluate": 60.0},
         "after": {**counts(4, 1, 10, "car"), **counts(5, 5, 10, "bus"), **counts(1, 0, 4, "cat")}},
    ]


def test_compute_seconds_takes_cpu_where_measured_and_never_evaluation():
    wall_only = {"seconds": {"rd_tutor1": 2.0, "distill_c": 1.0, "evaluate_before": 50.0}}
    assert compute_seconds(wall_only) == pytest.approx(3.0)  # records from before CPU seconds were kept
    # a machine shared with another run: wall time doubled, the work (CPU) did not
    both = {"seconds": {"rd_tutor1": 4.0, "distill_c": 2.0, "server_spread": 6.0, "evaluate_after": 9.0},
            "cpu_seconds": {"rd_tutor1": 2.0, "distill_c": 1.0, "evaluate_after": 4.0}}
    assert compute_seconds(both) == pytest.approx(2.0 + 1.0 + 6.0)  # server_spread: no CPU figure, its wall
    assert compute_seconds(both, server_shares=False) == pytest.approx(2.0 + 1.0)  # the client's own machine


def test_client_round_values_on_hand_made_records():
    values = client_round_values(hand_records(), [SPEC], [["cat"], ["dog"]])
    assert list(values) == ["diredi"] and list(values["diredi"]) == [1, 2]
    one, two = values["diredi"][1][0], values["diredi"][2][0]
    assert one["gain"] == pytest.approx(30.0) and two["gain"] == pytest.approx(50.0)
    # backward transfer over kept (car, bus): ((0.4-0.6)+0)/2, then ((0.5-0.6)+0)/2
    assert one["bwt_kept"] == pytest.approx(-10.0) and two["bwt_kept"] == pytest.approx(-5.0)
    assert two["bwt_protected"] == pytest.approx(-10.0)
    # car's deepest point below its start (0.6) is round 1's 0.4: it stays charged after car recovers
    assert one["worst_drop_protected"] == pytest.approx(20.0) == two["worst_drop_protected"]
    # Chaudhry: car's best earlier 0.6 minus now 0.5 = 0.1, bus 0: mean 5 pp; protected (car) 10 pp
    assert two["forgetting_kept"] == pytest.approx(5.0) and two["forgetting_protected"] == pytest.approx(10.0)
    assert two["released"] == pytest.approx(-20.0) and two["spread"] == pytest.approx(20.0)
    assert two["map"] == pytest.approx(100 * (0.5 + 0.5 + 0.2 + 0.5 + 0.3) / 5)
    assert one["mb_cum"] == pytest.approx(2.0) and two["mb_cum"] == pytest.approx(6.0)
    assert one["client_s_cum"] == pytest.approx(3.0) and two["client_s_cum"] == pytest.approx(7.0)  # no evaluation
    assert two["own_s_cum"] == pytest.approx(7.0)  # no server share in these records
    assert one["recall_new"] == pytest.approx(25.0) and two["recall_new"] == pytest.approx(75.0)
    assert two["f1_new"] == pytest.approx(75.0)  # precision 3/4, recall 3/4
    # kept recall: start (8+5)/20, after round 2 (6+5)/20
    assert two["recall_kept"] == pytest.approx(55.0)
    assert two["recall_kept_drop"] == pytest.approx(65.0 - 55.0)


def test_a_round_without_evaluation_has_no_values_and_its_costs_count_in_the_next():
    records = hand_records()
    second = next(r for r in records if r["round"] == 2)
    third = {**second, "round": 3, "ap_before": after_of(second), "seconds": {"rd_tutor1": 1.0}}
    second.update(ap_after={}, after={}, seconds={"rd_tutor1": 4.0})  # round 2 not evaluated
    values = client_round_values(records + [third], [SPEC], [["cat"], ["dog"]])["diredi"]
    assert list(values) == [1, 3]
    assert values[3][0]["mb_cum"] == pytest.approx(2.0 + 4.0 + 4.0)
    assert values[3][0]["client_s_cum"] == pytest.approx(3.0 + 4.0 + 1.0)
    assert values[3][0]["gain"] == pytest.approx(50.0)  # from the first round's start to round 3's edge


def after_of(record):
    return dict(record["ap_after"])


def test_client_round_values_without_counts_or_specs_gives_nan():
    record = dict(hand_records()[1])
    del record["after"], record["before"]
    values = client_round_values([record], [], [])["diredi"][1][0]
    assert all(math.isnan(values[k]) for k in ("gain", "recall_new", "recall_kept_drop", "bwt_kept"))
    assert values["mb_cum"] == pytest.approx(2.0) and not math.isnan(values["map"])


# ----------------------------------------------------------------------------------------------
# A study end to end
# ----------------------------------------------------------------------------------------------


STUDY_METHODS = ("diredi", "fedavg", "local")
STUDY_SPECS = [
    {"client": 0, "private": ["cat"], "kept": ["car", "bus"], "dropped": ["horse"], "protected": ["car"]},
    {"client": 1, "private": ["dog"], "kept": ["car", "bus", "horse"], "dropped": [], "protected": ["car"]},
]


def synthetic_replicate(replicate, rounds=2):
    """Records of 3 methods x 2 clients; diredi gains most, local sends nothing."""
    records = []
    rng = np.random.default_rng(replicate)
    for m, method in enumerate(STUDY_METHODS):
        for client in range(2):
            ap = {"car": 0.6, "bus": 0.5, "horse": 0.4, "cat": 0.0, "dog": 0.05, "cow": NAN}
            for round_number in range(1, rounds + 1):
                step = (0.15 if method == "diredi" else 0.05) + 0.01 * rng.random()
                after = {k: v if math.isnan(v) else min(1.0, v + (step if k in ("cat", "dog") else -0.01 * m))
                         for k, v in ap.items()}
                records.append({
                    "method": method, "round": round_number, "client": client, "ap_before": dict(ap),
                    "ap_after": after, "bytes_up": 0 if method == "local" else 2_000_000 * (m + 1),
                    "bytes_down": 0 if method == "local" else 4_000_000,
                    "seconds": {"direct training" if m else "rd_tutor1": 3.0 + m, "evaluate": 1.0},
                    "peak_rss_mb": 100.0, "accepted": True if method == "diredi" else None,
                    "after": {"precision": 0.5, "recall": 0.5, "f1": 0.5, **counts(2 + m, 1, 5, "cat"),
                              **counts(3, 1, 5, "dog"), **counts(4, 1, 6, "car")}})
                ap = after
    tutor = [{"round": r, "ap": {"car": 0.6 + 0.01 * r, "cat": 0.1 * r + 0.01 * replicate}, "mAP": 0.4 + 0.02 * r}
             for r in range(rounds + 1)]
    return records, tutor


def write_run_folder(path, replicate):
    records, tutor = synthetic_replicate(replicate)
    folder = RunFolder(path)
    folder.write_config({"run": {"replicate": replicate, "rounds": 2, "methods": list(STUDY_METHODS)},
                         "client_specs": STUDY_SPECS})
    for record in records:
        folder.append_record(record)
    folder.write_json(TUTOR_HISTORY, tutor)
    return folder


def test_study_from_run_folders_writes_compare_json_md_and_plots(tmp_path):
    paths = [write_run_folder(tmp_path / f"r{r}", r).path for r in (0, 1)]
    summary = summarise_run_folders(paths, samples=200)
    written = write_study(summary, tmp_path / "study", command="python -m sim.study ...", wall_s=12.0)
    assert set(written) == {"compare_json", "compare_md", "curves_round", "curves_mb", "curves_compute",
                            "clients_last_round", "tutor_progress"}
    for name, path in written.items():
        assert path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_SIGNATURE

    compare = json.loads(written["compare_json"].read_text())  # strict JSON (NaN written as null)
    assert compare["rounds"] == 2 and compare["seeds"] == [0, 1] and compare["clients"] == 2
    assert list(compare["methods"]) == list(STUDY_METHODS)
    diredi = compare["methods"]["diredi"]
    assert [e["round"] for e in diredi["per_round"]] == [1, 2]
    entry = diredi["per_round"][-1]
    for key in ("gain", "forgetting_kept", "forgetting_protected", "bwt_kept", "bwt_protected", "released",
                "spread", "map", "recall_new", "f1_new", "recall_kept", "f1_kept"):
        assert set(entry[key]) >= {"mean", "ci95"} and len(entry[key]["ci95"]) == 2
    assert isinstance(entry["mb_cum"], float) and len(entry["mb_cum_ci95"]) == 2
    assert entry["mb_cum"] == pytest.approx(2 * 6.0) and entry["client_s_cum"] == pytest.approx(2 * 3.0)
    assert entry["released"]["n_clients"] == 1  # client 1 drops nothing
    assert compare["methods"]["local"]["per_round"][-1]["mb_cum"] == 0.0
    assert [row["client"] for row in diredi["last_round_clients"]] == [0, 1]
    assert set(diredi["last_round_clients"][0]["gain"]) >= {"mean", "ci95"}
    assert [t["round"] for t in compare["tutor"]] == [0, 1, 2]
    assert set(compare["tutor"][1]["ap"]) == {"car", "cat"} and "ci95" in compare["tutor"][1]["mAP"]

    verdicts = compare["verdicts"]
    assert {v["baseline"] for v in verdicts} == {"fedavg", "local"} and {v["round"] for v in verdicts} == {2}
    assert not any(v["baseline"] == "local" and v["metric"] == "mb_cum" for v in verdicts)
    assert len(verdicts) == 7 + 6 + 2 + 2  # and the gain at equal compute (with the server's shares, without)
    for v in verdicts:
        assert set(v) >= {"claim", "metric", "baseline", "round", "diff", "ci95", "verdict"}
    by_claim = {(v["baseline"], v["metric"]): v for v in verdicts}
    assert by_claim[("fedavg", "gain")]["verdict"] == "yes"  # diredi gains 0.3 vs 0.1 in every cell
    # fedavg spent 8 s by round 2, diredi 6 s in all: no client has DiReDi's gain at that spend
    equal = by_claim[("fedavg", "gain_at_equal_compute")]
    assert equal["n_clients"] == 0 and equal["verdict"] == "cannot tell"
    assert by_claim[("fedavg", "mb_cum")]["verdict"] == "yes"  # 12 MB vs 16 MB
    assert by_claim[("fedavg", "mb_cum")]["diff"] == pytest.approx(-4.0)
    assert by_claim[("local", "gain")]["claim"] == "DiReDi gains more than local"

    text = written["compare_md"].read_text()
    assert text.index("## At a glance: round 2") < text.index("## Verdicts") < text.index("## diredi") < text.index("## fedavg")
    glance = text[text.index("## At a glance"):text.index("## Verdicts")]
    rows = [line for line in glance.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [row.split(" | ")[0][2:] for row in rows] == list(STUDY_METHODS)  # every method once, in order
    assert rows[0].split(" | ")[1] == "2"  # replicates
    assert rows[0].split(" | ")[2] == entry_cell(diredi["per_round"][-1], "gain", "points")
    assert "DiReDi gains more than fedavg" in text and "python -m sim.study" in text and "Wall time" in text


def test_gain_at_compute_interpolates_from_the_origin_and_stops_at_the_last_round():
    assert gain_at_compute([2.0, 4.0], [10.0, 30.0], 0.0) == 0.0
    assert gain_at_compute([2.0, 4.0], [10.0, 30.0], 1.0) == pytest.approx(5.0)  # from (0, 0)
    assert gain_at_compute([2.0, 4.0], [10.0, 30.0], 3.0) == pytest.approx(20.0)
    assert gain_at_compute([2.0, 4.0], [10.0, 30.0], 4.0) == pytest.approx(30.0)
    assert math.isnan(gain_at_compute([2.0, 4.0], [10.0, 30.0], 4.5))  # it never spent that much
    assert math.isnan(gain_at_compute([2.0, 4.0], [10.0, NAN], 1.0))


def test_the_equal_compute_verdict_pairs_diredi_where_it_had_spent_what_the_baseline_spent():
    """FedAvg made cheap (1.5 s a round): by its round 2 it spent 3 s, what DiReDi spent in its round 1,
    so DiReDi's round-1 gain (about 15 points) meets FedAvg's round-2 gain (about 10)."""
    replicates = []
    for r in (0, 1):
        records, tutor = synthetic_replicate(r)
        for record in records:
            if record["method"] == "fedavg":
                record["seconds"] = {"direct training": 1.5, "evaluate": 1.0}
        replicates.append((r, records, STUDY_SPECS, tutor))
    verdicts = {(v["baseline"], v["metric"], v["round"]): v for v in summarise_study(replicates, samples=SAMPLES)["verdicts"]}
    equal = verdicts[("fedavg", "gain_at_equal_compute", 2)]
    assert equal["claim"] == "DiReDi gains more than fedavg at equal client compute"
    assert equal["n_clients"] == 2 and 3.0 < equal["diff"] < 7.0 and equal["verdict"] == "yes"
    assert equal["diff"] < verdicts[("fedavg", "gain", 2)]["diff"]  # less than at equal rounds


def test_the_server_share_counts_in_one_equal_compute_verdict_and_not_in_the_other():
    """DiReDi's clients spend 3 s a round, the server 3 s more on each one's behalf; FedAvg's clients 3 s.
    With the server's shares DiReDi had spent FedAvg's round-2 compute by its round 1; on the client's
    own machine at its round 2, so only there do the two meet at the same gain difference as per round."""
    replicates = []
    for r in (0, 1):
        records, tutor = synthetic_replicate(r)
        for record in records:
            record["seconds"] = ({"rd_tutor1": 3.0, "server_spread": 3.0, "evaluate": 1.0}
                                 if record["method"] == "diredi" else {"direct training": 3.0, "evaluate": 1.0})
        replicates.append((r, records, STUDY_SPECS, tutor))
    summary = summarise_study(replicates, samples=SAMPLES)
    verdicts = {(v["baseline"], v["metric"], v["round"]): v for v in summary["verdicts"]}
    own = verdicts[("fedavg", "gain_at_equal_own_compute", 2)]
    assert own["claim"] == "DiReDi gains more than fedavg at equal compute on the client's own machine"
    assert own["diff"] == pytest.approx(verdicts[("fedavg", "gain", 2)]["diff"])
    assert verdicts[("fedavg", "gain_at_equal_compute", 2)]["diff"] < own["diff"]
    entry = summary["methods"]["diredi"]["per_round"][-1]
    assert entry["client_s_cum"] == pytest.approx(12.0) and entry["own_s_cum"] == pytest.approx(6.0)


def test_finished_only_leaves_out_a_method_part_way(tmp_path):
    folder = write_run_folder(tmp_path / "r0", 0)
    folder.write_done(["diredi", "local"])  # fedavg was cut part-way
    assert set(summarise_run_folders([folder.path], samples=50)["methods"]) == set(STUDY_METHODS)
    summary = summarise_run_folders([folder.path], samples=50, finished_only=True)
    assert set(summary["methods"]) == {"diredi", "local"}
    assert {v["baseline"] for v in summary["verdicts"]} == {"local"}


def test_a_method_run_apart_replaces_its_records_in_the_study(tmp_path):
    """--replace: DiReDi rerun with another setting takes the place of the study's DiReDi in its replicate;
    the other methods stay the study's, and compare.md names the folders and the setting that differs."""
    from report.study import main

    paths = [write_run_folder(tmp_path / f"r{r}", r).path for r in (0, 1)]
    rerun = RunFolder(tmp_path / "diredi-r1")
    rerun.write_config({"run": {"replicate": 1, "rounds": 2, "methods": ["diredi"], "edge_average": 0.5},
                        "client_specs": STUDY_SPECS})
    records, tutor = synthetic_replicate(1)
    for record in records:
        if record["method"] == "diredi":
            rerun.append_record({**record, "ap_after": {k: 0.0 for k in record["ap_after"]}})  # learns nothing
    rerun.write_json(TUTOR_HISTORY, tutor)
    before = summarise_run_folders(paths, samples=200)
    after = summarise_run_folders(paths, samples=200, replace=[rerun.path])
    assert after["assembled"] == [{"replicate": 1, "methods": ["diredi"], "study_run": "r1", "replacing_run":
                                   "diredi-r1", "settings_study_vs_replacing": {"edge_average": [1.0, 0.5]}}]
    gain = {s: {e["round"]: e["gain"]["mean"] for e in x["methods"]["diredi"]["per_round"]}
            for s, x in (("before", before), ("after", after))}
    assert gain["after"][2] < gain["before"][2]
    assert after["methods"]["fedavg"] == before["methods"]["fedavg"]  # the other methods are the study's

    main([str(p) for p in paths] + ["--replace", str(rerun.path), "--out", str(tmp_path / "study"), "--samples", "50"])
    assert "diredi from `diredi-r1`, the other methods from `r1` (settings that differ: edge_average: 1.0 -> 0.5)" \
        in (tmp_path / "study" / "compare.md").read_text()
    rerun.write_config({"run": {"replicate": 1}, "client_specs": STUDY_SPECS[:1]})
    with pytest.raises(ValueError, match="other clients"):
        summarise_run_folders(paths, replace=[rerun.path])
    with pytest.raises(ValueError, match="no run of replicate 1"):
        summarise_run_folders(paths[:1], replace=[rerun.path])


def test_study_with_missing_rounds_and_no_tutor(tmp_path):
    full, _ = synthetic_replicate(0, rounds=3)
    short, _ = synthetic_replicate(1, rounds=3)
    short = [r for r in short if not (r["method"] == "fedavg" and r["round"] == 3)]  # replicate 1's fedavg stopped
    summary = summarise_study([(0, full, STUDY_SPECS, []), (1, short, STUDY_SPECS, [])], samples=100)
    assert summary["rounds"] == 3 and summary["tutor"] == []
    assert summary["methods"]["fedavg"]["replicates_per_round"] == {"1": 2, "2": 2, "3": 1}
    assert {v["round"] for v in summary["verdicts"]} == {2, 3}
    last = [v for v in summary["verdicts"] if v["round"] == 3 and v["baseline"] == "fedavg"]
    equal = ("gain_at_equal_compute", "gain_at_equal_own_compute")
    assert all(v["n_seeds"] == 1 for v in last if v["metric"] not in equal)  # paired on the
    # replicate both have; at equal compute none: fedavg spent more by round 3 than DiReDi in all
    assert [v["n_seeds"] for v in last if v["metric"] in equal] == [0, 0]
    written = write_study(summary, tmp_path / "out")
    assert "tutor_progress" not in written and (tmp_path / "out" / "curves_mb.png").stat().st_size > 0
    assert "round 3: 1" in study_markdown(summary)


def test_write_all_adds_the_three_curves(tmp_path):
    from report.writer import write_all

    records, tutor = synthetic_replicate(0)
    folder = RunFolder(tmp_path / "run")
    folder.write_json(TUTOR_HISTORY, tutor)
    write_all(folder, records, STUDY_SPECS, [s["private"] for s in STUDY_SPECS])
    for name in ("curves_round.png", "curves_mb.png", "curves_compute.png", "round_curves.png", "results.md"):
        assert (folder.path / name).stat().st_size > 0


def test_a_variant_is_paired_with_the_study_run_of_its_replicate(tmp_path):
    """experiments.variant: a copy of the study's own replicate 0 differs from it by nothing; a copy whose
    DiReDi edge lost 10 points of `person` after round 1 forgets more, and the verdict says "no"."""
    import json
    import shutil
    from pathlib import Path

    from experiments.variant import main

    source = Path(__file__).resolve().parents[1] / "experiments" / "results" / "compare" / "runs" / "rep0"
    study = tmp_path / "study"
    (study / "rep0").mkdir(parents=True)
    keep = [line for line in (source / "rounds.jsonl").read_text().splitlines()
            if json.loads(line)["method"] in ("diredi", "local")]
    for folder in (study / "rep0", tmp_path / "same-rep0", tmp_path / "worse-rep0"):
        folder.mkdir(exist_ok=True)
        shutil.copy(source / "config.json", folder / "config.json")
        (folder / "rounds.jsonl").write_text("\n".join(keep) + "\n")
    worse = []
    for line in keep:
        record = json.loads(line)
        if record["method"] == "diredi" and record["round"] >= 2:
            record["ap_after"]["person"] = max(0.0, record["ap_after"]["person"] - 0.10)
        worse.append(json.dumps(record))
    (tmp_path / "worse-rep0" / "rounds.jsonl").write_text("\n".join(worse) + "\n")

    def rows(name: str) -> dict:
        out = tmp_path / name
        assert main(["--variant", str(tmp_path / f"{name}-rep0"), "--name", name, "--study", str(study),
                     "--out", str(out)]) == 0
        return {(r["baseline"], r["metric"], r["round"]): r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}

    same = rows("same")
    assert all(r["diff"] == 0 and r["verdict"] == "cannot tell" for k, r in same.items() if k[0] == "diredi")
    worse_rows = rows("worse")
    protected = worse_rows[("diredi", "forgetting_protected", 20)]
    assert protected["diff"] > 5 and protected["verdict"] == "no"
    assert worse_rows[("diredi", "gain", 20)]["diff"] == 0  # person is no new class
    path = {r["run"]: r for r in json.loads((tmp_path / "worse.json").read_text())["protected_path"]}
    # rounds 2.. lost 10 points (less where person was below 0.1): the worst and the last round show it
    assert path["worse"]["last"] - path["baseline diredi"]["last"] == pytest.approx(-10, abs=1.5)
    assert path["worse"]["worst"] < path["baseline diredi"]["worst"] - 5 and "deployed" not in path["worse"]
    def against(method: str, as_method: str) -> dict:
        """--baseline: a run folder holding only ``method``'s records of the study's replicate 0, renamed
        ``as_method``; the variant "worse" against it."""
        name = f"{as_method}-rep0"
        (tmp_path / name).mkdir()
        shutil.copy(source / "config.json", tmp_path / name / "config.json")
        lines = [json.dumps({**json.loads(line), "method": as_method}) for line in keep
                 if json.loads(line)["method"] == method]
        (tmp_path / name / "rounds.jsonl").write_text("\n".join(lines) + "\n")
        assert main(["--variant", str(tmp_path / "worse-rep0"), "--name", "worse", "--baseline", str(tmp_path / name),
                     "--out", str(tmp_path / f"against-{name}")]) == 0
        return json.loads((tmp_path / f"against-{name}.json").read_text())

    # other DiReDi runs (here without local training) instead of the study's: the rows against DiReDi only
    base = against("diredi", "diredi")
    assert {r["baseline"] for r in base["rows"]} == {"diredi"}
    assert base["rows"] == [r for r in worse_rows.values() if r["baseline"] == "diredi"]
    # local training's runs alone (the same chain, no DiReDi there): the rows against local only
    local = against("local", "local")
    assert {r["baseline"] for r in local["rows"]} == {"local"}
    assert local["rows"] == [r for r in worse_rows.values() if r["baseline"] == "local"]
    assert {r["run"] for r in local["protected_path"]} == {"worse", "baseline local"}
    with pytest.raises(SystemExit, match="has no diredi records and no local records"):
        against("local", "oracle")


def test_a_variant_of_another_method_and_the_studys_interval(tmp_path):
    """--method pairs the variant's local training with the study's; --summary reads the study's interval:
    the study's own replicate 0 is inside it where the interval is wide, and 30 points more gain is not."""
    import json
    import shutil
    from pathlib import Path

    from experiments.variant import main

    results = Path(__file__).resolve().parents[1] / "experiments" / "results" / "compare"
    source = results / "runs" / "rep0"
    study, variant = tmp_path / "study" / "rep0", tmp_path / "more-rep0"
    lines = [json.loads(line) for line in (source / "rounds.jsonl").read_text().splitlines()
             if json.loads(line)["method"] == "local"]
    for folder, shift in ((study, 0.0), (variant, 0.3)):
        folder.mkdir(parents=True)
        shutil.copy(source / "config.json", folder / "config.json")
        records = []
        for record in lines:
            specs = json.loads((source / "config.json").read_text())["client_specs"]
            private = next(s["private"] for s in specs if s["client"] == record["client"])
            after = {c: v + shift if c in private else v for c, v in record["ap_after"].items()}
            records.append(json.dumps({**record, "ap_after": after}))
        (folder / "rounds.jsonl").write_text("\n".join(records) + "\n")
    out = tmp_path / "more"
    assert main(["--variant", str(variant), "--name", "more", "--method", "local", "--study", str(study.parent),
                 "--summary", str(results / "compare.json"), "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert {r["baseline"] for r in result["rows"]} == {"local"} and result["method"] == "local"
    gain = next(r for r in result["rows"] if r["metric"] == "gain" and r["round"] == 20)
    assert gain["diff"] == pytest.approx(30.0, abs=0.5) and gain["verdict"] == "yes"
    inside = {(r["metric"], r["round"]): r for r in result["inside_study_interval"]}
    assert not inside[("gain", 20)]["inside"]  # 30 points above the study's mean
    assert inside[("forgetting_protected", 20)]["inside"]  # untouched, and the study's interval holds rep0


def test_edge_protection_scores_every_lever_after_every_round(tmp_path, smoke_cache, threads_one):
    import json

    from experiments.edge_protection import main

    assert main(["--profile", "smoke", "--clients", "2", "--probe", "1", "--rounds", "2", "--score-weights", "0", "2",
                 "--threads", "1", "--cache", str(smoke_cache), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "edge_protection.json").read_text())
    levers = {"score weight 0", "score weight 2", "direct training"}
    assert {(r["lever"], r["round"]) for r in result["rows"]} == {(lever, r) for lever in levers for r in (0, 1, 2)}
    assert set(result["mean"]) == levers and (tmp_path / "edge_protection.md").exists()
    # every lever starts from the same manufacturer's edge
    rows = {(r["lever"], r["round"]): r for r in result["rows"]}
    assert rows[("score weight 0", 0)] == {**rows[("score weight 2", 0)], "lever": "score weight 0"}


def test_the_budget_table_pairs_variants_and_counts_cpu_work(tmp_path):
    """experiments.budget: a variant with half the RD steps whose new classes gained 5 more points from
    round 2 on is better on gain ("yes") and equal elsewhere; its CPU work is its round's CPU seconds over
    one direct-training step of the same process, averaged over repeats; local training's is its steps
    plus its evaluation; gain per 1000 steps is gain / (rounds x work / 1000); every DiReDi run is paired
    with local training."""
    import json
    import shutil
    from pathlib import Path

    from experiments.budget import main

    source = Path(__file__).resolve().parents[1] / "experiments" / "results" / "compare" / "runs" / "rep0"
    lines = (source / "rounds.jsonl").read_text().splitlines()
    specs = json.loads((source / "config.json").read_text())["client_specs"]
    private = {s["client"]: s["private"] for s in specs}

    def run(name: str, method: str, rd_iters: int, boost: float = 0.0) -> Path:
        folder = tmp_path / f"{name}-rep0"
        folder.mkdir()
        config = json.loads((source / "config.json").read_text())
        config["run"]["rd_iters"] = rd_iters
        (folder / "config.json").write_text(json.dumps(config))
        shutil.copy(source / "summary.json", folder / "summary.json")
        kept = []
        for line in lines:
            record = json.loads(line)
            if record["method"] != method:
                continue
            if boost and record["round"] >= 2:
                for c in private[record["client"]]:
                    record["ap_after"][c] = record["ap_after"][c] + boost
            kept.append(json.dumps(record))
        (folder / "rounds.jsonl").write_text("\n".join(kept) + "\n")
        return folder

    base, fewer, local = run("base", "diredi", 12), run("fewer", "diredi", 6, boost=0.05), run("local", "local", 12)
    work = tmp_path / "work"
    work.mkdir()

    def timed(name: str, diredi_s: float, direct_s: float, evaluate_s: float) -> None:
        (work / f"{name}.json").write_text(json.dumps({"round_work": {"client_s": {
            "diredi": {"total": diredi_s}, "fedavg": {"direct_training": direct_s, "evaluate": evaluate_s}}}}))

    timed("base-rep0", 12.0, 6.0, 1.0)  # 60 direct steps in 6 s: 0.1 s a step -> 120 steps of work
    timed("base-rep0-again", 18.0, 12.0, 2.0)  # a busier process: 0.2 s a step -> 90 steps of work
    timed("fewer-rep0", 8.0, 4.8, 1.0)  # 48 direct steps in 4.8 s -> 80 steps of work
    out = tmp_path / "budget"
    assert main(["--baseline", str(base), "--variant", "RD 6", str(fewer), "--local", str(local),
                 "--work", str(work), "--out", str(out)]) == 0
    runs = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())["runs"]}
    assert [runs["baseline"][k] for k in ("rd_per_tutor", "distill_c", "client_steps")] == [12, 36, 60]
    assert [runs["RD 6"][k] for k in ("rd_per_tutor", "distill_c", "client_steps")] == [6, 36, 48]
    assert runs["baseline"]["work_per_round"] == pytest.approx((120 + 90) / 2)
    assert runs["RD 6"]["work_per_round"] == pytest.approx(80)
    assert runs["local training"]["work_per_round"] == pytest.approx(((60 + 10) + (60 + 10)) / 2)
    gain = runs["RD 6"]["at"]["10"]["gain"]
    assert runs["RD 6"]["gain_per_1000_steps"]["10"] == pytest.approx(gain / (10 * 80 / 1000))
    versus = {(r["against"], r["metric"], r["round"]): r for r in runs["RD 6"]["versus_baseline"]}
    assert versus[("baseline", "gain", 10)]["diff"] == pytest.approx(5.0, abs=0.01)
    assert versus[("baseline", "gain", 10)]["verdict"] == "yes"
    assert versus[("baseline", "forgetting_kept", 10)]["diff"] == 0
    assert {k[0] for k in versus} == {"baseline", "local"}
    assert set(runs["baseline"]["gain_by_private_classes"]) == {"1", "2"}
    assert "| RD 6 | 6 | 36 | 48 | 80 |" in out.with_suffix(".md").read_text()


def test_the_summary_lists_each_runs_chain_only_when_the_chains_differ(tmp_path):
    """A replicate with a chain.json of its own (``--chain-per-replicate``) is listed beside the runs that
    take the study's (``<study>/runs/<run>`` -> ``<study>/chain.json``); one chain for all lists nothing."""
    runs = tmp_path / "study" / "runs"
    paths = [write_run_folder(runs / f"rep{r}", r).path for r in (0, 1)]
    amd = {"teacher": "aaa", "tutor": "bbb", "edge": "ccc", "cpu": "AMD EPYC", "manufacturer_shards": "s"}
    (tmp_path / "study" / "chain.json").write_text(json.dumps(amd))
    assert "chains" not in summarise_run_folders(paths, samples=50)
    (runs / "rep1" / "chain.json").write_text(json.dumps({**amd, "edge": "ddd", "cpu": "Intel Xeon"}))
    summary = summarise_run_folders(paths, samples=50)
    assert summary["chains"] == {"rep0": {"teacher": "aaa", "tutor": "bbb", "edge": "ccc", "cpu": "AMD EPYC"},
                                 "rep1": {"teacher": "aaa", "tutor": "bbb", "edge": "ddd", "cpu": "Intel Xeon"}}
    text = write_study(summary, tmp_path / "out")["compare_md"].read_text()
    assert "Intel Xeon" in text and "AMD EPYC" in text


def test_a_baseline_that_a_replicate_lacks_says_how_many_replicates_its_verdicts_pair(tmp_path):
    """A study whose replicate 1 has not run fedavg yet: fedavg's verdicts pair replicate 0 only, and the
    verdict table says so; local's pair both and keep the plain label."""
    paths = [write_run_folder(tmp_path / f"r{r}", r).path for r in (0, 1)]
    RunFolder(paths[0]).write_done(list(STUDY_METHODS))
    RunFolder(paths[1]).write_done(["diredi", "local"])
    summary = summarise_run_folders(paths, samples=50, finished_only=True)
    assert {v["replicates_paired"] for v in summary["verdicts"] if v["baseline"] == "fedavg"} == {1}
    assert {v["replicates_paired"] for v in summary["verdicts"] if v["baseline"] == "local"} == {2}
    grid = "\n".join(verdict_grid(summary))
    assert "| fedavg (1 of 2 replicates) |" in grid and "| local |" in grid and "| fedavg |" not in grid


def test_the_study_counts_diredis_false_rejections_from_the_folder_that_gave_its_records(tmp_path):
    """Every client of a study is honest: compare.json / compare.md count each replicate's rejected deltas, and a
    replicate whose DiReDi was replaced (--replace) counts the replacing run's decisions, not the study's."""
    paths = [write_run_folder(tmp_path / f"r{r}", r).path for r in (0, 1)]
    decide = lambda r, c, ok, **extra: {"round": r, "client": c, "accepted": ok, "reason": "why", **extra}  # noqa: E731
    RunFolder(paths[0]).append_verification(decide(1, 0, True))
    RunFolder(paths[0]).append_verification(decide(1, 1, True, appeal={"accepted": True}))
    RunFolder(paths[1]).append_verification(decide(1, 0, True))
    RunFolder(paths[1]).append_verification(decide(2, 1, False, rejected_by=["protected"]))
    summary = summarise_run_folders(paths, samples=50)
    assert [(v["run"], v["deltas"], v["rejected"], v["by_gate"], v["admitted_in_merge"])
            for v in summary["verification"]] == [("r0", 2, 0, {}, 1), ("r1", 2, 1, {"protected": 1}, 0)]
    text = study_markdown(summary)
    assert "**1 of 4** over 2 replicates (protected 1); 1 admitted inside" in text
    assert "round 2 client 1: why" in text

    rerun = RunFolder(tmp_path / "diredi-r1")
    rerun.write_config({"run": {"replicate": 1, "rounds": 2, "methods": ["diredi"]}, "client_specs": STUDY_SPECS})
    for record in synthetic_replicate(1)[0]:
        if record["method"] == "diredi":
            rerun.append_record(record)
    rerun.append_verification(decide(2, 1, True))
    replaced = summarise_run_folders(paths, samples=50, replace=[rerun.path])
    assert [(v["run"], v["rejected"]) for v in replaced["verification"]] == [("r0", 0), ("diredi-r1", 0)]
    assert "**0 of 3** over 2 replicates;" in study_markdown(replaced)


def test_a_variant_runs_replicate_comes_from_its_name_else_from_its_config(tmp_path):
    from experiments.variant import replicate_of

    named = tmp_path / "lever-rep3"
    named.mkdir()
    assert replicate_of(named) == 3
    other = write_run_folder(tmp_path / "lever-r10", 2).path
    assert replicate_of(other) == 2
    (tmp_path / "bare").mkdir()
    with pytest.raises(SystemExit, match="names no replicate"):
        replicate_of(tmp_path / "bare")
