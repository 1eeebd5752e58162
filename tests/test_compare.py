"""The comparison study's pieces: replicates, the baseline grid (validation data only), shard noise."""

import argparse
import json

import numpy as np
import pytest
import torch

from session.workspace import Workspace, workspace_of
from evaluation.ap import bootstrap_ap_drop, bootstrap_mean_ap_change
from protocol.config import ConfigError, RunConfig, resolve_run_config
from protocol.wire import work_seed


def test_a_replicate_changes_training_seeds_not_data():
    base = resolve_run_config({"profile": "smoke", "num-clients": 2})
    other = resolve_run_config({"profile": "smoke", "num-clients": 2, "replicate": 2})
    assert base.training_seed == base.seed == 0
    assert other.training_seed != base.training_seed and other.seed == base.seed
    assert other.run_name() != base.run_name() and other.run_name().endswith("-rep2")
    # a run folder from before replicates existed (no "replicate" in its config.json) is replicate 0
    older = {k: v for k, v in json.loads(json.dumps(base.to_dict())).items() if k != "replicate"}
    assert RunConfig.completed(older) == RunConfig.completed(json.loads(json.dumps(base.to_dict())))
    assert other.to_dict()["replicate"] == 2
    seeds = {work_seed(resolve_run_config({"profile": "smoke", "replicate": k}).training_seed, r, p)
             for k in range(3) for r in range(1, 21) for p in range(-1, 8)}
    assert len(seeds) == 3 * 20 * 9  # no two replicates share a party's seed in any round
    with pytest.raises(ConfigError, match="replicate"):
        resolve_run_config({"profile": "smoke", "replicate": -1})


def _detections(scores_by_image, labels, boxes):
    return [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(s),
             "labels": torch.tensor(lab, dtype=torch.int64)} for s, lab, b in zip(scores_by_image, labels, boxes)]


def test_bootstrap_of_a_mean_change_is_the_class_drop_noise_for_one_class():
    rng = np.random.default_rng(0)
    targets, before, after = [], [], []
    for i in range(40):
        box = [10.0, 10.0, 50.0, 50.0]
        targets.append({"boxes": torch.tensor([box]), "labels": torch.tensor([3]),
                        "difficult": torch.tensor([False]), "image_id": str(i)})
        hit, miss = box, [60.0, 60.0, 90.0, 90.0]
        before.append(_detections([[float(rng.random())]], [[3]], [hit if rng.random() < 0.5 else miss])[0])
        after.append(_detections([[float(rng.random())]], [[3]], [hit if rng.random() < 0.8 else miss])[0])
    one = bootstrap_mean_ap_change(before, after, targets, [3], samples=100, seed=1)
    drop = bootstrap_ap_drop(before, after, targets, [3], samples=100, seed=1)[3]
    assert one == pytest.approx(drop) and one > 0
    assert bootstrap_mean_ap_change(before, before, targets, [3], samples=50) == 0.0


def test_the_baseline_grid_reads_no_test_shard(smoke_cache, monkeypatch):
    from experiments import baseline_grid

    def no_test_shard(self, i):
        raise AssertionError(f"the baseline grid read client {i}'s test shard")

    monkeypatch.setattr(Workspace, "client_test", no_test_shard)
    config = resolve_run_config({"profile": "smoke", "num-clients": 2, "cache-dir": str(smoke_cache)})
    points = baseline_grid.run_grid(config, [(2e-3, 2, 0.0), (1e-3, 2, 0.0), (2e-3, 2, 0.01)], rounds=1, workers=1)
    assert [p["mu"] for p in points] == [0.0, 0.0, 0.01]
    assert all(np.isfinite(p["mAP"]) and len(p["per_round"]) == 1 for p in points)
    chosen = baseline_grid.choose(points)
    best = max(p["mAP"] for p in points)
    assert chosen["mAP"] >= best - baseline_grid.TIE_POINTS


def test_choose_prefers_fewer_steps_within_the_tie():
    from experiments.baseline_grid import choose

    points = [{"lr": 2e-3, "steps": 120, "mAP": 30.3}, {"lr": 4e-3, "steps": 60, "mAP": 30.0},
              {"lr": 1e-3, "steps": 60, "mAP": 25.0}]
    assert choose(points)["steps"] == 60 and choose(points)["lr"] == 4e-3
    assert choose([*points, {"lr": 1e-3, "steps": 30, "mAP": 31.0}])["steps"] == 30
    assert choose([*points, {"lr": 1e-3, "steps": 240, "mAP": 40.0}], max_steps=120)["steps"] == 60
    with pytest.raises(ValueError):
        choose(points, max_steps=10)


def test_weighted_average_is_fedavgs_rule():
    from experiments.baseline_grid import weighted_average

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 7.0]), "n": torch.tensor(4)}
    out = weighted_average([a, b], [1, 3])
    assert torch.allclose(out["w"], torch.tensor([2.5, 6.0])) and out["n"].dtype == torch.int64 and int(out["n"]) == 4


def test_the_fedavg_skew_diagnosis_runs_on_validation_data_only(smoke_cache, monkeypatch):
    from experiments import fedavg_skew

    def no_test_shard(self, i):
        raise AssertionError(f"the diagnosis read client {i}'s test shard")

    monkeypatch.setattr(Workspace, "client_test", no_test_shard)
    config = resolve_run_config({"profile": "smoke", "num-clients": 2, "cache-dir": str(smoke_cache),
                                 "rd-iters": 1, "redistill-iters": 1})
    for aware in (False, True):
        rows = fedavg_skew.run(config, rounds=1, label_skew_aware=aware)
        new = {c for spec in workspace_of(config).clients for c in spec.private}
        assert {row["class"] for row in rows} == new
        assert all(0.0 <= row["score_global"] <= 1.0 and row["holders"] >= 1 for row in rows)


@pytest.mark.slow
def test_a_smoke_study_of_two_replicates_writes_the_json_and_the_plots(smoke_cache, tmp_path):
    from experiments import compare

    out = tmp_path / "study"
    common = ["--profile", "smoke", "--clients", "2", "--rounds", "2", "--methods", "diredi,local",
              "--cache", str(smoke_cache), "--out", str(out), "--no-grid"]
    assert compare.main([*common, "--replicates", "0"]) == 0
    assert compare.main([*common, "--replicates", "1"]) == 0  # a study run in parts, one replicate each
    result = json.loads((out / "compare.json").read_text())
    assert result["rounds"] == 2 and result["seeds"] == [0, 1]
    assert set(result["methods"]) == {"diredi", "local"}
    entry = result["methods"]["diredi"]["per_round"][-1]
    for key in ("gain", "forgetting_kept", "forgetting_protected", "bwt_kept", "spread"):
        assert len(entry[key]["ci95"]) == 2
    assert {"mb_cum", "client_s_cum"} <= set(entry)
    assert {v["verdict"] for v in result["verdicts"]} <= {"yes", "no", "cannot tell"}
    assert {v["baseline"] for v in result["verdicts"]} == {"local"}
    for name in ("compare.md", "curves_round.png", "curves_mb.png", "curves_compute.png", "clients_last_round.png"):
        assert (out / name).stat().st_size > 0, name
    assert len(json.loads((out / "study.json").read_text())["invocations"]) == 2
    # the two replicates share data and chain, but not their training: their records differ
    recs = [(out / "runs" / f"rep{k}" / "rounds.jsonl").read_text() for k in (0, 1)]
    assert recs[0] != recs[1]
    # a different chain is refused
    chain = json.loads((out / "chain.json").read_text())
    assert chain["cpu"] == compare.cpu_model()  # the make that built it: another make builds another chain
    (out / "chain.json").write_text(json.dumps({**chain, "edge": "0" * 40}))
    with pytest.raises(SystemExit, match=r"chain or shards differ from the study's or replicate's \(edge in .*built on"):
        compare.main([*common, "--replicates", "2"])


def test_summarising_an_assembled_study_without_runs_names_the_command_that_made_it(tmp_path):
    """experiments/results/compare-combo holds no runs of its own: --summarise-only says how it was made."""
    from experiments import compare

    (tmp_path / "compare.json").write_text(json.dumps({"assembled": [{"replicate": 0}],
                                                       "command": "python -m report.study A --replace B --out C"}))
    with pytest.raises(SystemExit, match="no run folder .* assembled .* by: python -m report.study A --replace B"):
        compare.main(["--summarise-only", "--out", str(tmp_path)])
    (tmp_path / "compare.json").unlink()
    with pytest.raises(SystemExit, match="no run folder with records under"):
        compare.main(["--summarise-only", "--out", str(tmp_path)])


def test_redo_stale_runs_diredi_again_only_where_its_own_settings_changed(tmp_path):
    """--redo-stale adds sim.run's --redo diredi for a replicate whose DiReDi records were made with other
    DiReDi settings, not where they match (running the command again never drops DiReDi twice) and not where
    a setting the other methods read changed (that replicate must fail, not lose its records)."""
    from experiments.compare import parse_args, replicate_command
    from report.writer import RunFolder
    from sim.run import build_parser, run_config_of

    args = parse_args(["--rounds", "2", "--clients", "2", "--profile", "smoke", "--replicates", "0", "--redo-stale",
                       "--out", str(tmp_path), "--no-grid"])
    fresh = replicate_command(args, 0, {})
    assert "--resume" not in fresh and "--redo" not in fresh
    today = json.loads(json.dumps(resolve_run_config(run_config_of(build_parser().parse_args(fresh[3:]))).to_dict()))

    def folder_with(**recorded) -> None:
        folder = RunFolder.start(tmp_path / "runs" / "rep0", {**today, **recorded})
        folder.append_record({"method": "diredi", "round": 1, "client": 0})
        folder.write_done(["diredi"])

    folder_with()
    assert "--resume" in replicate_command(args, 0, {}) and "--redo" not in replicate_command(args, 0, {})
    folder_with(claims="lifting")  # DiReDi ran under another DiReDi setting
    assert replicate_command(args, 0, {})[-2:] == ["--redo", "diredi"]
    folder_with(claims="lifting", rounds=3)  # and the rounds differ too: no redo, sim.run refuses the folder
    assert "--redo" not in replicate_command(args, 0, {})
    args.redo_stale = False
    folder_with(claims="lifting")
    command = replicate_command(args, 0, {})
    assert "--redo" not in command
    # without --redo-stale, DiReDi's finished records keep their settings: the other methods resume under them
    assert command[-3:] == ["--claims", "lifting", "--resume"]
    resumed = json.loads(json.dumps(resolve_run_config(run_config_of(build_parser().parse_args(command[3:]))).to_dict()))
    assert RunFolder.resume_problem(tmp_path / "runs" / "rep0", resumed) is None
    folder_with(claims="lifting", rounds=3)  # a setting the other methods read differs: sim.run still refuses
    command = replicate_command(args, 0, {})
    resumed = json.loads(json.dumps(resolve_run_config(run_config_of(build_parser().parse_args(command[3:]))).to_dict()))
    assert RunFolder.resume_problem(tmp_path / "runs" / "rep0", resumed) is not None


def test_a_replicate_keeps_a_chain_of_its_own_under_chain_per_replicate(tmp_path):
    """Another CPU make builds another chain from the same seed: a new replicate may run on this machine's
    chain, a replicate begun on another chain never switches, and the shards stay the study's."""
    from experiments import compare
    from report.study import run_chains, study_markdown

    def args(*flags):
        return compare.parse_args(["--out", str(tmp_path), *flags])

    first = {"teacher": "a" * 40, "tutor": "b" * 40, "edge": "c" * 40, "manufacturer_shards": "m", "client_shards": "s"}
    other = {**first, "teacher": "x" * 40, "tutor": "y" * 40, "edge": "z" * 40}
    compare.check_chain(args(), 0, first)  # the study begins: replicate 0 runs on the study's chain
    (tmp_path / "runs" / "rep0").mkdir(parents=True)
    (tmp_path / "runs" / "rep0" / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"teacher in .*chain\.json.*--chain-per-replicate"):
        compare.check_chain(args(), 1, other)
    assert not (tmp_path / "runs" / "rep1").exists()
    compare.check_chain(args("--chain-per-replicate"), 1, other)  # a new replicate keeps this machine's chain
    own = json.loads((tmp_path / "runs" / "rep1" / "chain.json").read_text())
    assert own["edge"] == "z" * 40 and own["cpu"] == compare.cpu_model() and "client_shards" not in own
    with pytest.raises(SystemExit, match=r"edge in .*chain\.json"):  # replicate 0 began on the study's chain
        compare.check_chain(args("--chain-per-replicate"), 0, other)
    compare.check_chain(args(), 1, other)  # once it has a chain of its own, it goes on without the flag
    with pytest.raises(SystemExit, match=r"tutor in .*rep1"):
        compare.check_chain(args(), 1, first)
    with pytest.raises(SystemExit, match="client_shards in"):  # data are the same on every machine
        compare.check_chain(args("--chain-per-replicate"), 1, {**other, "client_shards": "t"})

    chains = run_chains([tmp_path / "runs" / "rep0", tmp_path / "runs" / "rep1"])
    assert chains["rep0"]["teacher"] == "a" * 40 and chains["rep1"]["teacher"] == "x" * 40
    text = study_markdown({"chains": chains, "rounds": 2, "seeds": [0, 1], "clients": 2})
    assert "different manufacturer chains" in text and "| rep1 | xxxxxxxx | yyyyyyyy | zzzzzzzz |" in text


def test_the_eta_counts_each_methods_rounds_left_at_its_own_pace(tmp_path):
    """Local and the oracle run side by side (the slower counts), federated methods one after another at
    their recorded round wall time; the pace this invocation has kept scales the estimate."""
    from experiments.compare import eta_text, round_seconds, seconds_left

    def write(replicate: int, rounds: dict[str, int]) -> None:
        folder = tmp_path / "runs" / f"rep{replicate}"
        folder.mkdir(parents=True)
        lines = []
        for method, last in rounds.items():
            for r in range(1, last + 1):
                for client in range(2):
                    record = {"method": method, "round": r, "client": client}
                    if method == "diredi":
                        record["round_wall_s"] = 100.0  # a federated round's wall time, on every record
                    else:  # one process trains the clients in turn
                        record["seconds"] = {"direct training": 10.0 if method == "local" else 30.0, "evaluate": 5.0}
                    lines.append(json.dumps(record))
        (folder / "rounds.jsonl").write_text("\n".join(lines) + "\n")

    write(0, {"local": 4, "oracle": 4, "diredi": 4})
    write(1, {"local": 4, "oracle": 1})  # replicate 1: the oracle 3 rounds behind, DiReDi not begun
    seconds = round_seconds(sorted((tmp_path / "runs").glob("rep*")))
    assert seconds == {"local": 30.0, "oracle": 70.0, "diredi": 100.0}
    args = argparse.Namespace(replicates=[1], out=tmp_path, rounds=4, methods=["diredi", "local", "oracle"])
    assert seconds_left(args, seconds) == 3 * 70.0 + 4 * 100.0
    args.methods.append("fedavg")  # never timed: no estimate
    assert seconds_left(args, seconds) is None
    # this invocation took twice the recorded pace for the work done so far
    assert eta_text(610.0, 310.0, elapsed=600.0, done=10, first=0, total=40) == f"ETA {310 * 2 / 60:.0f} min"
    assert eta_text(None, None, elapsed=600.0, done=10, first=0, total=40) == "ETA 30 min"  # records' rate
    assert eta_text(None, None, elapsed=60.0, done=5, first=5, total=40) == "ETA after the first record"
    assert eta_text(50.0, 20.0, elapsed=10.0, done=30, first=0, total=40) == "ETA under a minute"
