"""Round-level checkpoint and resume: the pieces (server checkpoints, client state on disk) and a
two-round smoke run killed after round 1 of each federated method, then resumed, against an
uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from clients.store import is_body_reference, load_client_state, read_body, save_client_state
from models.io import CorruptWeights
from report.checkpoint import checkpoint_round, load_checkpoint, save_checkpoint

TIMING = ("seconds", "cpu_seconds", "round_wall_s", "peak_rss_mb", "where")  # wall-clock, memory and placement differ run to run


def test_checkpoint_round_trip_restores_tensors_meta_and_both_rngs(tmp_path):
    tensors = {"tutor.w": torch.arange(6.0).reshape(2, 3)}
    torch.manual_seed(3)
    random.seed(3)
    save_checkpoint(tmp_path, "diredi", 2, tensors, {"partitions_with_body": [0, 1]})
    expected_torch, expected_python = torch.rand(4), random.random()
    torch.manual_seed(99)
    random.seed(99)
    server_round, loaded, meta = load_checkpoint(tmp_path, "diredi")
    assert server_round == 2 and checkpoint_round(tmp_path, "diredi") == 2
    assert torch.equal(loaded["tutor.w"], tensors["tutor.w"]) and meta["partitions_with_body"] == [0, 1]
    assert torch.equal(torch.rand(4), expected_torch) and random.random() == expected_python
    assert load_checkpoint(tmp_path, "fedavg") is None and checkpoint_round(tmp_path, "fedavg") == 0
    (tmp_path / "diredi.safetensors").write_bytes(b"torn")
    with pytest.raises(CorruptWeights, match="does not match its manifest"):
        load_checkpoint(tmp_path, "diredi")


def test_client_state_keeps_the_round_a_resume_goes_back_to_and_stores_the_body_once(tmp_path):
    body = ArrayRecord({"backbone.body.w": torch.ones(3)})
    state = RecordDict({"diredi.tutor-body": body, "diredi.edge": ArrayRecord({"w": torch.zeros(2)}),
                        "fedavg.evaluated": ConfigRecord({"fingerprint": "x"})})
    for server_round, value in ((1, 1.0), (2, 2.0), (4, 4.0)):
        state["diredi.edge"] = ArrayRecord({"w": torch.full((2,), value)})
        save_client_state(state, tmp_path, "diredi", 3, server_round)
        save_client_state(state, tmp_path, "diredi", 5, server_round)
    folder = tmp_path / "diredi" / "client-3"
    assert sorted(p.name for p in folder.iterdir()) == ["round-2.state", "round-4.state"]  # round 1 dropped
    assert len(list((tmp_path / "diredi" / "bodies").iterdir())) == 1  # one body for both clients
    back = load_client_state(tmp_path, "diredi", 3, before_round=4)  # round 4 was cut short: back to 2
    assert set(back) == {"diredi.tutor-body", "diredi.edge"}  # only this method's records
    assert torch.equal(back["diredi.edge"].to_torch_state_dict()["w"], torch.full((2,), 2.0))
    assert is_body_reference(back["diredi.tutor-body"])  # the body stays on disk, referenced
    assert torch.equal(read_body(tmp_path, "diredi", back["diredi.tutor-body"])["backbone.body.w"], torch.ones(3))
    assert save_client_state(back, tmp_path, "diredi", 3, 5).is_file()  # a reference is saved as it is
    again = load_client_state(tmp_path, "diredi", 3, before_round=6)
    assert dict(again["diredi.tutor-body"]) == dict(back["diredi.tutor-body"])
    assert load_client_state(tmp_path, "diredi", 3, before_round=2) is None
    assert load_client_state(tmp_path, "diredi", 7, before_round=9) is None


def _records(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
    return sorted(rows, key=lambda r: (r["method"], r["round"], r["client"]))


def _run(argv: list[str], env: dict, stop_when: Path | None = None, timeout: float = 600) -> int:
    """``python -m sim.run argv``; with ``stop_when``, killed (its whole process group, Ray's
    processes included) as soon as that checkpoint manifest records round 1."""
    process = subprocess.Popen([sys.executable, "-m", "sim.run", *argv], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if stop_when is not None and stop_when.exists() and json.loads(stop_when.read_text())["round"] == 1:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return -9
            time.sleep(0.05)
        if process.poll() is None:
            raise TimeoutError(f"sim.run {argv} ran past {timeout} s")
        assert process.returncode == 0, process.stderr.read()[-3000:]
        return 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_run_killed_after_round_one_resumes_with_the_records_of_an_uninterrupted_run(smoke_runs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    uninterrupted = _records(smoke_runs.reference)
    assert {(r["method"], r["round"]) for r in uninterrupted} == {(m, r) for m in ("diredi", "fedavg") for r in (1, 2)}
    assert not (smoke_runs.reference / "checkpoints" / "diredi.json").exists()  # a finished method leaves none

    out = smoke_runs.out("res")
    run, argv = out / smoke_runs.name, smoke_runs.argv(out)
    checkpoints = run / "checkpoints"
    assert _run(argv, env, stop_when=checkpoints / "diredi.json") == -9
    assert json.loads((run / "done.json").read_text()) == []
    # Resumed once: DiReDi goes on at round 2; killed again after FedAvg's round 1, resumed again.
    assert _run([*argv, "--resume"], env, stop_when=checkpoints / "fedavg.json") == -9
    assert json.loads((run / "done.json").read_text()) == ["diredi"]
    assert _run([*argv, "--resume"], env) == 0
    resumed = _records(run)
    assert resumed == uninterrupted
    decisions = [json.loads(line) for line in (run / "verification.jsonl").read_text().splitlines()]
    assert sorted((d["round"], d["client"]) for d in decisions) == [(1, 0), (1, 1), (2, 0), (2, 1)]
