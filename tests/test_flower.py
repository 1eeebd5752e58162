"""Whole rounds through real Flower + Ray (smoke profile, 2 clients, 1 round each).

Every reply a client sends is captured on the server side (the strategies pass each one through
``Recorder.split``) and inspected: it may hold weights and numbers, never images, boxes or labels.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.ladder import NUM_CLASSES
from models.parts import neck_head
from protocol.config import resolve_run_config
from protocol.wire import WHERE
from sim.federation import run_federation
from strategies.ledger import Recorder
from session.workspace import Session
from strategies.verify import VerificationPolicy

NUM_CLIENTS = 2
# The protected-class check still runs, but no finite delta can fail it: these tests follow accepted
# deltas through the round (rejection is tested in test_diredi.py), so none may depend on luck.
ACCEPT_HONEST = VerificationPolicy(protected_tolerance=1.0, protected_classes=("person",))
FORBIDDEN_WORDS = ("image", "box", "label", "target", "pixel")


@pytest.fixture(scope="module")
def cache(smoke_cache):
    return smoke_cache


def session_for(cache, **settings) -> Session:
    return Session.open(resolve_run_config({"profile": "smoke", "num-clients": NUM_CLIENTS, "rounds": 1,
                                            "cache-dir": str(cache), **settings}))


@pytest.fixture(scope="module")
def setup(cache, threads_one):
    session = session_for(cache)
    return session.workspace, session.chain, session


def run_captured(method: str, setup, policy=None, **settings):
    """Runs one round; returns (result, [(step, reply message), ...] for every client reply)."""
    session = setup[2] if not settings else session_for(setup[2].config.cache_dir, **settings)
    seen = []
    original = Recorder.split

    def spy(self, replies, step, server_round):
        replies = list(replies)
        seen.extend((step, r) for r in replies)
        return original(self, replies, step, server_round)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Recorder, "split", spy)
        result = run_federation(method, session, policy=policy)
    return result, seen


@pytest.fixture(scope="module")
def diredi_run(setup):
    return run_captured("diredi", setup, policy=ACCEPT_HONEST, tutor1="per-client")


@pytest.fixture(scope="module")
def fedavg_run(setup):
    return run_captured("fedavg", setup)


def check_records(result, method: str, workspace):
    assert result.recorder.failures == []
    assert [r["client"] for r in result.records] == list(range(NUM_CLIENTS))
    for r in result.records:
        assert r["method"] == method and r["round"] == 1
        assert r["ap_before"] and set(r["ap_before"]) == set(r["ap_after"])
        own = set(workspace.eval_classes())
        assert own <= set(r["ap_before"])
        assert all(0.0 <= v <= 1.0 for c, v in r["ap_before"].items() if c in own and not math.isnan(v))
        assert r["bytes_up"] > 0 and r["bytes_down"] > r["bytes_up"]
        assert r["num_examples"] > 0 and r["peak_rss_mb"] > 0
        assert all(s >= 0 for s in r["seconds"].values())


def check_reply_is_weights_and_numbers(content, allowed_array_keys: set[str] | None):
    for name, record in content.array_records.items():
        assert allowed_array_keys is not None, f"unexpected array record {name!r}"
        assert set(record.keys()) == allowed_array_keys
    where = content.config_records.get(WHERE)  # the one text a reply holds: the client's machine
    assert where is not None and set(where) == {"host", "ray-node", "precision"}  # a simulation's client is a Ray actor
    assert where["precision"] == "float32"  # the default: no bfloat16 anywhere
    assert all(isinstance(v, str) and len(v) <= 256 for v in where.values())
    for records in (content.metric_records, {k: v for k, v in content.config_records.items() if k != WHERE}):
        for record in records.values():
            for key, value in record.items():
                assert not any(word in key.lower() for word in FORBIDDEN_WORDS), key
                assert isinstance(value, (int, float, bool, list)), (key, type(value))
                if isinstance(value, list):
                    assert len(value) <= NUM_CLASSES, key


@pytest.mark.slow
def test_diredi_round_runs_end_to_end(diredi_run, setup):
    result, _ = diredi_run
    workspace, chain, _ = setup
    check_records(result, "diredi", workspace)
    assert len(result.recorder.decisions) == NUM_CLIENTS
    for r, d in zip(result.records, result.recorder.decisions):
        assert r["accepted"] == d.accepted and math.isfinite(d.norm)
        assert {"evaluate_before", "rd_tutor1", "rd_tutor2", "server_verify"} <= set(r["seconds"])
        assert r["accepted"] and r["redistilled"] and "distill_c" in r["seconds"]
        # the work in CPU seconds beside the wall time, for every phase but evaluation
        assert {"rd_tutor1", "rd_tutor2", "server_verify", "distill_c"} <= set(r["cpu_seconds"])
        assert r["cpu_seconds"]["distill_c"] > 0 and not any(p.startswith("evaluate") for p in r["cpu_seconds"])
    changed = [k for k, v in neck_head(chain.tutor).items() if not torch.equal(v, result.tutor_state[k])]
    assert changed, "accepted deltas should move the tutor's neck/head"
    assert result.edge_state is None  # client re-distillation: each edge lives on its client


@pytest.mark.slow
def test_diredi_replies_carry_no_data(diredi_run, setup):
    _, replies = diredi_run
    _, chain, _ = setup
    nh_keys = set(neck_head(chain.tutor))
    steps = [step for step, _ in replies]
    assert steps.count("train") == NUM_CLIENTS
    for step, reply in replies:
        assert not reply.has_error()
        # train: the neck/head delta only; distill / evaluate: numbers only
        check_reply_is_weights_and_numbers(reply.content, nh_keys if step == "train" else None)
        if step == "train":  # uploaded in half precision by default (RunConfig.delta_precision)
            assert {a.dtype for a in reply.content.array_records["delta"].values()} == {"float16"}


@pytest.mark.slow
def test_fedavg_runs_and_replies_carry_no_data(fedavg_run, setup):
    result, replies = fedavg_run
    workspace, chain, _ = setup
    check_records(result, "fedavg", workspace)
    assert result.recorder.decisions == [] and result.tutor_state is None
    assert set(result.edge_state) == set(chain.edge.state_dict())
    edge_keys = set(chain.edge.state_dict())
    assert sorted(step for step, _ in replies) == ["evaluate"] * NUM_CLIENTS + ["train"] * NUM_CLIENTS
    for step, reply in replies:
        check_reply_is_weights_and_numbers(reply.content, edge_keys if step == "train" else None)


def comparable(record: dict) -> dict:
    """A record without what legitimately varies between runs (wall time, memory, the machine)."""
    return {k: v for k, v in record.items() if k not in ("seconds", "cpu_seconds", "peak_rss_mb", "round_wall_s", "where")}


@pytest.mark.slow
def test_same_seed_same_numbers(diredi_run, setup):
    first, _ = diredi_run
    second, _ = run_captured("diredi", setup, policy=ACCEPT_HONEST, tutor1="per-client")
    assert [comparable(r) for r in second.records] == [comparable(r) for r in first.records]
    assert [d.norm for d in second.recorder.decisions] == [d.norm for d in first.recorder.decisions]
    for name, value in first.tutor_state.items():
        assert torch.equal(value, second.tutor_state[name]), name


@pytest.mark.slow
def test_shared_tutor1_and_server_redistillation(setup):
    result, replies = run_captured("diredi", setup, tutor1="shared", redistill="server", policy=ACCEPT_HONEST)
    workspace, chain, _ = setup
    check_records(result, "diredi", workspace)
    nh_keys = set(neck_head(chain.tutor))
    assert sorted(step for step, _ in replies) == ["evaluate"] * NUM_CLIENTS + ["train"] * NUM_CLIENTS
    for step, reply in replies:
        check_reply_is_weights_and_numbers(reply.content, nh_keys if step == "train" else None)
    for r in result.records:
        assert r["seconds"]["rd_tutor1"] == 0.0 and r["seconds"]["server_tutor1"] > 0  # one Tutor 1, on the server
        assert r["accepted"] and "server_distill_c" in r["seconds"] and "distill_c" not in r["seconds"]
    assert set(result.edge_state) == set(chain.edge.state_dict())  # the server's re-distilled edge


@pytest.mark.slow
def test_the_compute_setting_reaches_every_client(setup):
    result, replies = run_captured("fedavg", setup, precision="bfloat16", layout="channels-last")
    check_records(result, "fedavg", setup[0])
    assert replies and all(reply.content.config_records[WHERE]["precision"] == "bfloat16" for _, reply in replies)


# -- both entry points run the same experiment -------------------------------------------------------


def flwr_run_config(**overrides) -> dict:
    """What `flwr run . --run-config "..."` hands the ServerApp: pyproject's defaults + overrides."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    return {**pyproject["tool"]["flwr"]["app"]["config"], **overrides}


def test_pyproject_run_config_defaults_are_the_cli_defaults():
    import dataclasses

    from protocol.config import RunConfig
    from sim.run import parse_args

    raw = flwr_run_config()
    for key in ("out-dir", "name"):
        raw.pop(key)
    assert raw.pop("num-clients") == 0  # the one documented difference: 0 = every connected node
    from_flwr = resolve_run_config({**raw, "num-clients": 8})
    assert from_flwr == parse_args([]).config
    assert set(raw) | {"num-clients"} == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}


def test_the_run_configuration_reaches_the_policy_and_the_clients_operating_point(setup):
    """Merge bounds, claim rule and operating threshold go from the run configuration to the strategy's
    policy; a client measures eq. 11 at the run's threshold (AP does not move with it)."""
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from protocol.wire import METHOD
    from strategies.server_app import default_policy

    workspace, chain, session = setup
    settings = {"row-multiple": 3.0, "clip-multiple": 2.0, "claims": "earned", "operating-threshold": 0.3}
    policy = default_policy(session_for(session.config.cache_dir, **settings))
    assert (policy.row_multiple, policy.clip_multiple, policy.claims, policy.operating_threshold) == (3.0, 2.0, "earned", 0.3)
    figures = {}
    for threshold in (0.05, 0.5):
        config = ConfigRecord({**session_for(session.config.cache_dir, **{"operating-threshold": threshold})
                               .config.to_record(), METHOD: "fedavg"})
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        figures[threshold] = client_app._evaluate(chain.edge, workspace, 0, "after", "evaluate", context, config)
    ap = {k: v for k, v in figures[0.5].items() if k.startswith("ap-")}
    assert ap and ap == {k: v for k, v in figures[0.05].items() if k.startswith("ap-")}
    assert figures[0.05]["after.recall"] > figures[0.5]["after.recall"]


@pytest.mark.slow
def test_sim_run_and_the_flwr_server_app_give_the_same_records(smoke_runs, threads_one):
    """`python -m sim.run` (the suite's reference run) and the ServerApp that `flwr run .` loads, with
    the same settings."""
    import json

    from flwr.app import Context, RecordDict

    from protocol.config import RunConfig
    from sim.federation import simulate
    from strategies.server_app import main as flwr_server_main

    out = smoke_runs.out("srv")
    run_config = flwr_run_config(**{"profile": "smoke", "rounds": 2, "methods": "diredi,fedavg",
                                    "cache-dir": str(smoke_runs.cache), "out-dir": str(out), "name": smoke_runs.name})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    # flwr run . starts one SuperNode per client; here, the same simulation runtime sim.run uses.
    simulate(RunConfig(num_clients=NUM_CLIENTS), lambda grid, _: flwr_server_main(grid, context))

    def records(folder) -> list[dict]:
        return [comparable(json.loads(line)) for line in (folder / "rounds.jsonl").read_text().splitlines()]

    cli, flwr = records(smoke_runs.reference), records(out / smoke_runs.name)
    assert [(r["method"], r["round"], r["client"]) for r in cli] == \
        [(m, k, c) for m in ("diredi", "fedavg") for k in (1, 2) for c in (0, 1)]
    assert flwr == cli
    assert json.loads((out / smoke_runs.name / "config.json").read_text())["run"] == \
        json.loads((smoke_runs.reference / "config.json").read_text())["run"]


@pytest.mark.slow
def test_two_rounds_keep_each_clients_edge_and_tutor1_follows_it(setup):
    """Round 2 starts from the edge each client re-distilled in round 1; the shared Tutor 1 serves
    only round 1 (every client then holds the server's edge), afterwards each client computes its own."""
    result, _ = run_captured("diredi", setup, policy=ACCEPT_HONEST, rounds=2, tutor1="shared")
    by_round = {(r["round"], r["client"]): r for r in result.records}
    assert sorted(by_round) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    _, chain, _ = setup
    body_bytes = sum(t.numel() * t.element_size() for k, t in chain.tutor.state_dict().items()
                     if k.startswith("backbone.body."))
    for client in range(NUM_CLIENTS):
        # the tutor's body travels once (round 1); round 2 carries neck/head only (and no edge)
        assert by_round[(1, client)]["bytes_down"] - by_round[(2, client)]["bytes_down"] > body_bytes
    for client in range(NUM_CLIENTS):
        first, second = by_round[(1, client)], by_round[(2, client)]
        assert first["accepted"] and first["redistilled"]
        # its own stored edge, not the server's (NaN: a class without positives in the shard)
        assert second["ap_before"].keys() == first["ap_after"].keys()
        assert all(a == b or (math.isnan(a) and math.isnan(b))
                   for a, b in zip(second["ap_before"].values(), first["ap_after"].values()))
        assert first["seconds"]["rd_tutor1"] == 0.0 and first["seconds"]["server_tutor1"] > 0
        assert second["seconds"]["rd_tutor1"] > 0 and "server_tutor1" not in second["seconds"]
    assert [entry["round"] for entry in result.recorder.tutor_history] == [0, 1, 2]
    # Round 1's Distill C changed the edges, so the check above tells a stored edge from the server's.
    assert any(by_round[(1, c)]["ap_after"] != by_round[(1, c)]["ap_before"] for c in range(NUM_CLIENTS))


def test_a_client_evaluates_each_edge_version_once(setup, monkeypatch):
    """Round r+1's "before" is the edge round r ended with: its figures come from the client's state;
    any other weights are evaluated."""
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from protocol.wire import METHOD

    workspace, chain, _ = setup
    calls = []
    real = client_app.per_class_ap
    monkeypatch.setattr(client_app, "per_class_ap", lambda *a, **k: calls.append(1) or real(*a, **k))
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    config = ConfigRecord({METHOD: "fedavg"})
    first = client_app._evaluate(chain.edge, workspace, 0, "after", "evaluate_after", context, config)
    again = client_app._evaluate(chain.edge, workspace, 0, "before", "evaluate_before", context, config)
    assert len(calls) == 1
    assert {k.split(".", 1)[1]: v for k, v in first.items() if not k.startswith("seconds")} == \
           {k.split(".", 1)[1]: v for k, v in again.items() if not k.startswith("seconds")}
    changed = __import__("copy").deepcopy(chain.edge)
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    client_app._evaluate(changed, workspace, 0, "after", "evaluate_after", context, config)
    assert len(calls) == 2
    client_app._evaluate(chain.edge, workspace, 0, "after", "evaluate_after", context,
                         ConfigRecord({METHOD: "diredi"}))  # another method's state is its own
    assert len(calls) == 3


def test_between_evaluated_rounds_a_diredi_client_evaluates_nothing(setup, monkeypatch):
    """The evaluations DiReDi's handlers ask for (``_evaluate_before`` in "train", ``_evaluate_after`` in
    "train.distill" and "evaluate") follow the run's eval-every: 3 rounds, every 2nd."""
    from flwr.app import ConfigRecord, Context, RecordDict

    import clients.app as client_app
    from protocol.wire import METHOD, SERVER_ROUND

    workspace, chain, session = setup
    calls = []
    real = client_app.per_class_ap
    monkeypatch.setattr(client_app, "per_class_ap", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = {**session.config.to_record(), "rounds": 3, "eval-every": 2, METHOD: "diredi"}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    edges = [__import__("copy").deepcopy(chain.edge) for _ in range(4)]  # round r: from edges[r-1] to edges[r]
    with torch.no_grad():
        for shift, edge in enumerate(edges):
            next(edge.parameters()).add_(float(shift))
    asked = {}
    for r in (1, 2, 3):
        config = ConfigRecord({**run, SERVER_ROUND: r})
        asked[r] = (bool(client_app._evaluate_before(edges[r - 1], workspace, 0, context, config)),
                    bool(client_app._evaluate_after(edges[r], workspace, 0, context, config)))
    assert asked == {1: (True, False), 2: (False, True), 3: (True, True)}
    assert len(calls) == 3  # round 3's "before" is round 2's "after", kept


@pytest.mark.slow
def test_client_sampling_trains_evaluates_and_records_the_sampled_clients_only(cache, threads_one):
    session = session_for(cache, **{"num-clients": 4, "fraction": 0.5})
    sampled = {}
    for method in ("diredi", "fedavg"):
        result = run_federation(method, session, policy=ACCEPT_HONEST)
        assert result.recorder.failures == []
        sampled[method] = [r["client"] for r in result.records]
        assert len(sampled[method]) == 2 and len(set(sampled[method])) == 2
        for r in result.records:  # each sampled client was trained and its final edge evaluated
            assert r["ap_after"] and set(r["ap_after"]) == set(r["ap_before"]) and r["bytes_up"] > 0
    # sampled by the clients' identities: the same clients for each method although every
    # simulation gives its nodes new random ids
    assert sampled["diredi"] == sampled["fedavg"]


@pytest.mark.slow
def test_a_top_k_delta_travels_sparse_and_is_merged(setup):
    result, replies = run_captured("diredi", setup, policy=ACCEPT_HONEST, **{"delta-topk": 0.1})
    _, chain, _ = setup
    uploads = [r for step, r in replies if step == "train"]
    assert len(uploads) == NUM_CLIENTS
    for upload in uploads:
        keys = set(upload.content.array_records["delta"].keys())
        assert keys == {k + suffix for k in neck_head(chain.tutor) for suffix in ("@index", "@values")}
    dense = sum(v.numel() * 2 for v in neck_head(chain.tutor).values())  # float16 bytes of the dense delta
    assert all(r["bytes_up"] < 0.5 * dense for r in result.records)
    assert all(r["accepted"] for r in result.records)
    assert any(not torch.equal(v, result.tutor_state[k]) for k, v in neck_head(chain.tutor).items())


@pytest.mark.slow
def test_a_run_long_body_cache_serves_later_rounds_with_the_same_records(cache, tmp_path, threads_one):
    """``--body-cache run``: every DiReDi client keeps its tutor body's outputs on its disk from round to
    round (distill.body_memo); round 2 finds round 1's images there, and every learning figure is the
    one of the default (``round``: Tutor 2's outputs for the round's Distill C only)."""
    import json

    from sim.run import main as cli_main

    common = ["--profile", "smoke", "--clients", str(NUM_CLIENTS), "--rounds", "2", "--methods", "diredi",
              "--tutor1", "per-client", "--cache", str(cache), "--out", str(tmp_path), "--quiet"]
    assert cli_main([*common, "--name", "round"]) == 0
    assert cli_main([*common, "--name", "run__", "--body-cache", "run"]) == 0

    def records(name: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / name / "rounds.jsonl").read_text().splitlines()]

    # the same figures; only the config's bytes ("body-cache") and the memo's counts differ
    differ = ("bytes_up", "bytes_down", "body_memo")
    by_round, by_run = records("round"), records("run__")
    assert [{k: v for k, v in comparable(r).items() if k not in differ} for r in by_run] == \
        [{k: v for k, v in comparable(r).items() if k not in differ} for r in by_round]
    for r_round, r_run in zip(by_round, by_run):
        drawn = r_run["body_memo"]["rd.served"] + r_run["body_memo"]["rd.computed"]
        if r_run["round"] == 1:
            assert r_run["body_memo"]["rd.served"] < drawn
        else:  # round 2 finds round 1's images; the default keeps nothing across rounds
            assert r_run["body_memo"]["rd.served"] > r_round["body_memo"]["rd.served"]
        assert r_run["body_memo"]["distill_c.served"] >= r_round["body_memo"]["distill_c.served"] > 0
    assert not (tmp_path / "run__" / "client-state").exists()  # a finished method's cache is deleted


@pytest.mark.slow
def test_the_edge_check_sends_each_edge_up_and_a_kept_edge_stays_deployed(setup, monkeypatch):
    """With the edge check each client's re-distilled edge travels up and is deployed only on the
    manufacturer's word; here client 0 is told to keep its edge (the manufacturer's, in round 1), so its
    evaluation after the round is the one before. The gate itself is tested in test_diredi.py."""
    from dataclasses import replace

    from protocol.wire import METRICS, PARTITION_ID
    from strategies.diredi import DiReDiStrategy

    check = DiReDiStrategy.check_edge

    def keep_client_0(self, reply):
        check(self, reply)
        node = reply.metadata.src_node_id
        if int(reply.content[METRICS][PARTITION_ID]) == 0 and node in self._edge_verdicts:
            self._edge_verdicts[node] = replace(self._edge_verdicts[node], deploy=False, reason="told to keep")

    monkeypatch.setattr(DiReDiStrategy, "check_edge", keep_client_0)
    result, replies = run_captured("diredi", setup, policy=ACCEPT_HONEST, tutor1="per-client", edge_check="on")
    assert result.recorder.failures == []
    by_client = {r["client"]: r for r in result.records}
    kept, deployed = by_client[0], by_client[1]
    assert kept["edge_check"]["deployed"] == 0 and deployed["edge_check"]["deployed"] == 1
    assert kept["ap_after"] == kept["ap_before"]  # the manufacturer's edge, still deployed
    assert deployed["ap_after"] != deployed["ap_before"]
    # every client's check ran on the validation set: the reference is the manufacturer's edge's person AP
    assert kept["edge_check"]["ap-reference.person"] == deployed["edge_check"]["ap-reference.person"]
    assert deployed["edge_check"]["ap-candidate.person"] >= 0
    _, chain, _ = setup
    edge_bytes = sum(t.numel() * t.element_size() for t in chain.edge.state_dict().values())
    distill_replies = [r for step, r in replies if step == "distill"]
    assert len(distill_replies) == NUM_CLIENTS and all("edge" in r.content.array_records for r in distill_replies)
    for r in distill_replies:
        check_reply_is_weights_and_numbers(r.content, set(chain.edge.state_dict()))
    assert all(record["bytes_up"] > edge_bytes for record in result.records)
    assert sorted(step for step, _ in replies).count("deploy") == NUM_CLIENTS


def test_a_simulation_joins_the_cluster_it_is_given_and_otherwise_starts_its_own_ray():
    """A run never joins a cluster it was not given: with no address Ray would join the cluster another
    program started last on this machine (and reject our CPU count), so it asks for a local instance."""
    import os

    from sim.federation import ray_init_args

    alone = ray_init_args(None, quiet=True, environ={})
    assert alone["address"] == "local" and alone["num_cpus"] == (os.cpu_count() or 1)
    for given, environ in (("10.0.0.1:6379", {}), (None, {"RAY_ADDRESS": "10.0.0.1:6379"}),
                           ("10.0.0.1:6379", {"RAY_ADDRESS": "10.0.0.2:6379"})):
        joined = ray_init_args(given, quiet=True, environ=environ)
        assert joined["address"] == "10.0.0.1:6379" and "num_cpus" not in joined
