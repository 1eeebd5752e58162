"""Beyond one simulated machine: SuperNodes with their own folders (``clients.app.node_run_config``),
the local deployment launcher (``sim.deploy``) and a two-node Ray cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clients.app import node_run_config, node_state_dir
from data.scenario import SCENARIO_DIR
from data.voc import DataError
from protocol.config import RunConfig, resolve_run_config
from protocol.wire import STATE_DIR
from sim.deploy import LAUNCHER_KEYS, deploy, node_config, parse_run_config, run_config_text


def test_a_node_config_names_the_nodes_own_folders(tmp_path):
    run = RunConfig(cache_dir="/server/cache")
    assert node_run_config(run, {"partition-id": 0}) == run  # the simulation: the run's paths
    mine = node_run_config(run, {"partition-id": 0, "cache-dir": str(tmp_path / "c")})
    assert mine.cache_dir == str((tmp_path / "c").resolve()) and mine.seed == run.seed
    config = {STATE_DIR: "/server/runs/my-run/client-state"}
    assert node_state_dir(config, {}) == "/server/runs/my-run/client-state"
    assert node_state_dir(config, {"state-dir": str(tmp_path)}) == str(tmp_path.resolve() / "my-run")
    assert node_state_dir({}, {"state-dir": str(tmp_path)}) is None  # the server did not ask for state


def test_a_node_without_its_voc_folder_stops_with_one_line_naming_it(tmp_path):
    voc = tmp_path / "VOCdevkit"
    voc.mkdir()
    run = RunConfig(data="voc", voc_root=str(voc))
    assert node_run_config(run, {"partition-id": 1}).voc_root == str(voc)
    with pytest.raises(DataError, match=r"node 1: no VOC data at '.*elsewhere'.*data-root") as err:
        node_run_config(run, {"partition-id": 1, "data-root": str(tmp_path / "elsewhere")})
    assert "\n" not in str(err.value)


def test_a_shipped_scenario_travels_by_name_a_custom_one_by_path(tmp_path):
    config = resolve_run_config({"profile": "smoke", "cache-dir": str(tmp_path)})
    assert Path(config.scenario).parent == SCENARIO_DIR.resolve()  # the server resolved it
    assert config.to_record()["scenario"] == "default8"  # each client reads its own copy
    custom = tmp_path / "mine.yaml"
    custom.write_text((SCENARIO_DIR / "default8.yaml").read_text())
    config = resolve_run_config({"profile": "smoke", "cache-dir": str(tmp_path), "scenario": str(custom)})
    assert config.to_record()["scenario"] == str(custom.resolve())


def test_launcher_arguments():
    assert parse_run_config("profile='smoke' rounds=2 methods='diredi,fedavg'") == {
        "profile": "'smoke'", "rounds": "2", "methods": "'diredi,fedavg'"}
    with pytest.raises(ValueError, match="not key=value"):
        parse_run_config("rounds")
    text = run_config_text({"rounds": "2"}, 3, Path("/o"), "n", Path("/c"))
    assert set(parse_run_config(text)) == {"rounds", *LAUNCHER_KEYS}
    assert "num-clients=3" in text
    assert node_config(1, 2, Path("/n/node-1")) == \
        "partition-id=1 num-partitions=2 cache-dir='/n/node-1/cache' state-dir='/n/node-1/state'"


@pytest.mark.parametrize("text, message", [
    ("roundz=2", "unknown key roundz"),
    ("profile=smoke", "profile=smoke is not a TOML value"),
    ("rounds=0", "rounds"),
    ("nodes=2 out-dir='x'", None),  # set by the launcher: refused by main, before any check
])
def test_bad_launcher_input_stops_with_one_line_before_any_process(text, message, capsys):
    from sim.deploy import main

    with pytest.raises(SystemExit) as done:
        main(["--nodes", "2", "--run-config", text, "--home", "/nonexistent/never-made"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("python -m sim.deploy: error: --run-config:")
    assert message is None or message in err
    assert not Path("/nonexistent/never-made").exists()


def _processes_under(home: Path) -> list[int]:
    """Processes whose Flower home lies under ``home`` (every process the launcher started has one)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FLWR_HOME={home}".encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("seconds", "cpu_seconds", "peak_rss_mb", "round_wall_s", "where")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process checks read /proc (Linux)")
def test_a_local_deployment_gives_the_simulations_records_and_leaves_no_process(tmp_path, smoke_runs, threads_one):
    """Two SuperNodes, each with its own cache and state folder, run DiReDi and FedAvg for 2 rounds
    through `flwr run`: the records are the simulation's (all but seconds and memory)."""
    home, lines = tmp_path / "deploy", []
    out = smoke_runs.out("dep")  # the server's cache is the suite's; each node has its own
    code = deploy(2, {"profile": "'smoke'", "rounds": "2", "methods": "'diredi,fedavg'"}, home,
                  out, smoke_runs.name, smoke_runs.cache, timeout_s=600, server_threads=1, echo=lines.append)
    assert code == 0, "\n".join(lines[-30:])

    def records(folder: Path) -> list[dict]:
        return [comparable(json.loads(line)) for line in (folder / "rounds.jsonl").read_text().splitlines()]

    simulated, deployed = records(smoke_runs.reference), records(out / smoke_runs.name)
    assert len(simulated) == 8
    assert deployed == simulated
    for i in range(2):  # each node generated its data and kept its state in its own folders
        node = home / f"node-{i}"
        assert any((node / "cache" / "data").iterdir())
        assert any((node / "state" / "run" / "diredi").glob(f"client-{i}/round-*.state"))
    assert not (out / smoke_runs.name / "client-state").exists()  # nothing on the server's disk
    assert not _processes_under(home.resolve())
    assert os.environ.get("FLWR_HOME") is None  # the user's Flower home untouched


@pytest.mark.slow
def test_a_two_node_ray_cluster_runs_clients_on_both_nodes_with_their_own_folders(tmp_path, smoke_runs,
                                                                                   threads_one):
    """The simulation joins a Ray cluster of two nodes (one CPU each, so one client actor each); each
    node names its own cache in its environment (``DIREDI_CACHE_DIR``): the records are the
    single-node run's, and say which node each client ran on."""
    from ray.cluster_utils import Cluster

    from sim.run import main as sim_main

    out = smoke_runs.out("ray")
    node_caches = [tmp_path / "head-cache", tmp_path / "worker-cache"]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "env_vars": {"DIREDI_CACHE_DIR": str(node_caches[0])}})
    try:
        cluster.add_node(num_cpus=1, env_vars={"DIREDI_CACHE_DIR": str(node_caches[1])})
        assert sim_main([*smoke_runs.argv(out), "--ray-address", cluster.address]) == 0
    finally:
        cluster.shutdown()

    def records(folder: Path) -> list[dict]:
        return [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines()]

    one, two = records(smoke_runs.reference), records(out / smoke_runs.name)
    assert [comparable(r) for r in two] == [comparable(r) for r in one]
    assert len({r["where"]["ray-node"] for r in two}) == 2  # client actors on both nodes
    assert len({r["where"]["ray-node"] for r in one}) == 1
    for folder in node_caches:  # each node generated the data into its own cache
        assert any((folder / "data").iterdir())
