"""Tests for report/writer.py (run folder JSON lines, results markdown, plots)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from report.writer import (
    RunFolder,
    format_megabytes,
    format_percent,
    format_points,
    results_markdown,
    write_all,
)
from strategies.ledger import Recorder

NAN = float("nan")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METHODS = ("diredi", "fedavg", "fedprox", "local", "oracle")


def synthetic_run(rounds=2, clients=2):
    """Deterministic made-up records for every method, with a NaN class and P/R/F1 on diredi."""
    specs = [
        {"client": 0, "private": ["cat"], "kept": ["car", "bus"], "dropped": ["horse"],
         "protected": ["car"]},
        {"client": 1, "private": ["dog"], "kept": ["car", "bus", "horse"], "dropped": [],
         "protected": ["car"]},
    ][:clients]
    all_private = [spec["private"] for spec in specs]
    records = []
    for m, method in enumerate(METHODS):
        for client in range(clients):
            ap = {"car": 0.6, "bus": 0.5, "horse": 0.4, "cat": 0.0, "dog": 0.05, "cow": NAN}
            for round_number in range(1, rounds + 1):
                after = {name: (value if math.isnan(value)
                                else min(1.0, value + 0.05 * (m + 1) - 0.03 * client))
                         for name, value in ap.items()}
                record = {"method": method, "round": round_number, "client": client,
                          "ap_before": dict(ap), "ap_after": after,
                          "bytes_up": 2_500_000 * (m + 1), "bytes_down": 5_000_000,
                          "seconds": {"train": 1.0 + m, "evaluate": 0.25},
                          "peak_rss_mb": 500.0 + client, "accepted": True if method == "diredi" else None}
                if method == "diredi":
                    record["after"] = {"precision": 0.61, "recall": 0.52, "f1": 0.56}
                records.append(record)
                ap = after
    return records, specs, all_private


# ----------------------------------------------------------------------------------------------
# RunFolder
# ----------------------------------------------------------------------------------------------


def test_run_folder_writes_json_lines_and_reads_them_back(tmp_path):
    folder = RunFolder(tmp_path / "runs" / "demo")
    assert folder.path.is_dir() and folder.name == "demo"
    folder.write_config({"name": "demo", "beta": 1.0, "classes": ("cat", "dog"), "tol": NAN})
    config = json.loads(folder.config_path.read_text())
    assert config == {"beta": 1.0, "classes": ["cat", "dog"], "name": "demo", "tol": None}

    records, _, _ = synthetic_run(rounds=1, clients=1)
    record = dict(records[0], peak_rss_mb=np.float32(12.5), bytes_up=np.int64(7))
    folder.append_record(record)
    folder.append_record(records[1])
    lines = folder.rounds_path.read_text().splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]  # strict JSON: no NaN tokens
    assert "NaN" not in lines[0]
    assert parsed[0]["ap_before"]["cow"] is None  # NaN -> null

    back = folder.read_records()
    assert len(back) == 2
    assert math.isnan(back[0]["ap_before"]["cow"])  # null -> NaN
    assert back[0]["ap_after"]["car"] == pytest.approx(records[0]["ap_after"]["car"])
    assert back[0]["accepted"] is True
    assert back[1]["accepted"] is None  # a top-level null that is not a float stays None
    assert back[0]["peak_rss_mb"] == 12.5 and back[0]["bytes_up"] == 7


def test_run_folder_verification_log_and_cut_off_tail(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.append_verification({"round": 1, "client": 0, "accepted": False, "reason": "norm"})
    assert folder.read_verification() == [{"round": 1, "client": 0, "accepted": False,
                                           "reason": "norm"}]
    folder.append_record({"method": "local", "round": 1, "client": 0})
    with folder.rounds_path.open("a") as handle:
        handle.write('{"method": "loc')  # a write cut off by a crash
    assert len(folder.read_records()) == 1
    assert RunFolder(tmp_path / "empty").read_records() == []


def test_client_failures_are_kept_and_a_resume_keeps_those_of_finished_methods(tmp_path):
    run = {"rounds": 2}
    folder = RunFolder.start(tmp_path / "run", run)
    recorder = Recorder("local", on_failure=folder.append_failure)
    recorder.fail(1, "train", 7, "no reply within the round's timeout")
    Recorder("diredi", on_failure=folder.append_failure).fail(1, "train", 8, "crashed")
    assert folder.read_failures() == [
        {"method": "local", "round": 1, "step": "train", "node": 7, "reason": "no reply within the round's timeout"},
        {"method": "diredi", "round": 1, "step": "train", "node": 8, "reason": "crashed"}]
    folder.write_done(["local"])  # local finished; diredi has no checkpoint: its round 1 is run again
    resumed = RunFolder.start(tmp_path / "run", run, resume=True)
    assert [f["method"] for f in resumed.read_failures()] == ["local"]
    assert RunFolder.start(tmp_path / "fresh", run).read_failures() == []


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------


def test_formatting_rules():
    assert format_percent(0.4567) == "45.7"
    assert format_percent(NAN) == "—"
    assert format_points(0.123) == "+12.3"
    assert format_points(-0.04) == "-4.0"
    assert format_points(-0.0001) == "0.0"  # no "-0.0"
    assert format_megabytes(2_500_000) == "2.50"


def test_results_markdown_has_every_method_and_handles_missing_prf():
    records, specs, all_private = synthetic_run()
    text = results_markdown(records, specs, all_private,
                            stage_rows={"Original edge": {"mAP": 0.438}, "Updated tutor": {"mAP": 0.587}})
    for method in METHODS:
        assert f"| {method} |" in text
    assert "| Original edge | 43.8 |" in text and "| Updated tutor | 58.7 |" in text
    methods_table = text.split("## Methods")[1].split("## Per client")[0]
    assert "precision" in methods_table  # diredi carries P/R/F1
    assert "| fedavg |" in methods_table
    fedavg_row = next(line for line in methods_table.splitlines() if line.startswith("| fedavg |"))
    assert "—" in fedavg_row  # P/R/F1 absent for fedavg
    assert "2.50" in text  # diredi upload: 2.5 MB/client/round
    assert "scored at or above 0.5, the run's operating threshold" in text
    assert "scored at or above 0.3, the run's" in results_markdown(records, specs, all_private, operating_threshold=0.3)


def test_results_markdown_without_detection_metrics_or_stages():
    records, specs, all_private = synthetic_run()
    for record in records:
        record.pop("after", None)
    text = results_markdown(records, specs, all_private, None)
    header = next(line for line in text.splitlines() if line.startswith("| method | clients"))
    assert "precision" not in header and "F1" not in header
    assert "## Model stages" not in text


def test_results_markdown_is_deterministic():
    records, specs, all_private = synthetic_run()
    first = results_markdown(records, specs, all_private)
    again = results_markdown(list(reversed(records)), specs, all_private)
    assert first == again


# ----------------------------------------------------------------------------------------------
# Everything on disk
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_write_all_writes_results_and_pngs(tmp_path):
    records, specs, all_private = synthetic_run()
    folder = RunFolder(tmp_path / "run")
    for record in records:
        folder.append_record(record)
    written = write_all(folder, folder.read_records(), specs, all_private,
                        stage_rows={"Original edge": {"mAP": 0.44}})
    expected = ({"results", "gain_forgetting", "round_curves", "curves_round", "curves_mb", "curves_compute"}
                | {f"heatmap_{m}" for m in METHODS})
    assert set(written) == expected
    for name, path in written.items():
        assert path.parent == folder.path and path.stat().st_size > 0
        if name != "results":
            assert path.read_bytes()[:8] == PNG_SIGNATURE
    text = written["results"].read_text()
    assert all(method in text for method in METHODS)

    # Same records -> byte-identical results.md.
    again = write_all(tmp_path / "again", folder.read_records(), specs, all_private,
                      stage_rows={"Original edge": {"mAP": 0.44}})
    assert again["results"].read_bytes() == written["results"].read_bytes()


def test_same_records_leaves_out_timings_and_finds_every_other_difference(tmp_path):
    from bench.same_records import compare_folders, main

    record = {"method": "diredi", "round": 1, "client": 0, "ap_after": {"car": 0.5}, "seconds": {"rd": 1.0},
              "peak_rss_mb": 900.0}
    for name, seconds, car in (("a", 1.0, 0.5), ("b", 2.5, 0.5), ("c", 1.0, 0.25)):
        (tmp_path / name).mkdir()
        line = {**record, "seconds": {"rd": seconds}, "peak_rss_mb": 900.0 + seconds, "ap_after": {"car": car}}
        (tmp_path / name / "rounds.jsonl").write_text(json.dumps(line) + "\n")
    assert compare_folders(tmp_path / "a", tmp_path / "b") == []  # only seconds and memory differ
    assert compare_folders(tmp_path / "a", tmp_path / "c") == ["rounds.jsonl line 1.ap_after.car: 0.5 != 0.25"]
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert main([str(tmp_path / "a"), str(tmp_path / "c")]) == 1


def test_the_same_tests_then_and_now_are_matched_by_function_wherever_their_file_moved(capsys):
    """bench.suite_same_tests: a test of then is today's test of the same function name (every
    parametrisation of it today), in whatever file it now sits; a function gone is named."""
    from bench.suite_same_tests import main, same_tests

    then = ["tests/test_strategy.py::test_merge", "tests/test_strategy.py::test_gate[a-1]",
            "tests/test_old.py::test_removed"]
    now = ["tests/test_aggregate.py::test_merge", "tests/test_verify.py::test_gate[a-1]",
           "tests/test_verify.py::test_gate[b-2]", "tests/test_new.py::test_added"]
    same, gone = same_tests(then, now)
    assert same == now[:3]
    assert gone == ["test_removed"]
    with pytest.raises(SystemExit) as stop:
        main(["--then", "no-such-commit-anywhere"])
    assert stop.value.code == 2
    assert "--then: 'no-such-commit-anywhere' is not a commit" in capsys.readouterr().err
