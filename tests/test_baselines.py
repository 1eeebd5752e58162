"""The FedAvg family's new baselines: fedavgm, fedadam, fedavg_ls and fedavg_ft.

* the label-skew mask of fedavg_ls (``distill.trainer.ClassMask``), without Flower;
* ``make_strategy`` builds each with the configured hyperparameters;
* FedAvgM / FedAdam step only the parameters and keep the BatchNorm buffers as FedAvg averages them,
  and their server-optimiser state survives a checkpoint (fake replies, no Flower runtime);
* a fedavg_ft client deploys its fine-tuned edge: the next round's "before" (handlers called directly);
* one smoke Flower simulation of all four methods (2 clients, 1 round).
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from data.voc import CLASS_INDEX
from session.workspace import prepare
from distill.rd import ClientTraining, direct_training
from distill.trainer import ClassMask
from models.ladder import build_model, detection_losses, get_profile, neck_features
from protocol.config import resolve_run_config
from protocol.wire import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID

CLS = "head.classification_head.cls_logits"
NEW = ("fedavgm", "fedadam", "fedavg_ls", "fedavg_ft")


@pytest.fixture(scope="module")
def cache(smoke_cache):
    return smoke_cache


@pytest.fixture(scope="module")
def ws(cache):
    return prepare("smoke", "default8", num_clients=2, seed=0, cache_dir=cache)


# -- (a) fedavg_ls: only the client's own classes' scores train ---------------------------------------


def own_classes(ws, partition: int) -> tuple[int, ...]:
    return tuple(CLASS_INDEX[c] for c in ws.clients[partition].train_classes)


def test_the_client_data_holds_only_its_own_labels_in_the_models_label_space(ws):
    """The mask indexes logits by label: a client's training labels are its classes' CLASS_INDEX."""
    data, own = ws.client_train(0), set(own_classes(ws, 0))
    labels = {int(label) for i in range(len(data)) for label in data[i][1]["labels"]}
    assert labels and labels <= own
    model = build_model("smoke", "edge")
    assert model.head.classification_head.cls_logits.out_channels == len(CLASS_INDEX)


def test_class_mask_stops_the_gradient_of_the_other_classes_scores(ws):
    data = ws.client_train(0)
    model = build_model("smoke", "edge", seed=0).train()
    own = own_classes(ws, 0)
    others = [c for c in range(len(CLASS_INDEX)) if c not in own]
    images, targets = zip(*[data[i] for i in range(4)])
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    mask = ClassMask(model, own)
    try:
        image_list, targets = model.transform(list(images), targets)
        sum(detection_losses(model, image_list, targets, neck_features(model, image_list.tensors)).values()).backward()
    finally:
        mask.remove()
    layer = model.head.classification_head.cls_logits
    for grad in (layer.weight.grad, layer.bias.grad):
        assert torch.count_nonzero(grad[others]) == 0
        assert all(torch.count_nonzero(grad[c]) > 0 for c in own)
    assert not model.head.classification_head._forward_hooks  # removed


def test_label_skew_training_leaves_the_other_classes_rows_unchanged(ws):
    data = ws.client_train(0)
    edge = build_model("smoke", "edge", seed=0)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    own = own_classes(ws, 0)
    others = [c for c in range(len(CLASS_INDEX)) if c not in own]
    before = {k: v.clone() for k, v in edge.state_dict().items()}
    masked, _ = direct_training(edge, data, 3, settings, seed=0, trained_classes=own)
    plain, _ = direct_training(edge, data, 3, settings, seed=0)
    for suffix in ("weight", "bias"):
        key = f"{CLS}.{suffix}"
        assert torch.equal(masked.state_dict()[key][others], before[key][others])  # neither up nor down
        assert all(not torch.equal(masked.state_dict()[key][c], before[key][c]) for c in own)  # trained
        assert not torch.equal(plain.state_dict()[key][others], before[key][others])  # without the mask they move
    assert not masked.head.classification_head._forward_hooks
    # the rest of the model trains as usual
    assert not torch.equal(masked.state_dict()["head.regression_head.bbox_reg.weight"],
                           before["head.regression_head.bbox_reg.weight"])


# -- (c) make_strategy builds each new method with the configured hyperparameters --------------------


def fake_session(**settings):
    """make_strategy reads the configuration and the manufacturer's edge only (no data, no training)."""
    from types import SimpleNamespace

    from session.workspace import Session

    config = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 1, **settings})
    return Session(config, None, SimpleNamespace(edge=build_model("smoke", "edge", seed=0)))


def test_make_strategy_builds_each_new_method_with_its_settings():
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM

    from protocol.wire import FINE_TUNE, OWN_CLASSES
    from strategies.baselines import RecordingFedAdam, RecordingFedAvg, RecordingFedAvgM
    from strategies.ledger import Recorder
    from strategies.server_app import make_strategy

    session = fake_session(**{"server-momentum": 0.8, "fedadam-eta": 0.02, "fedadam-tau": 0.005,
                              "direct-lr": 0.004})
    built = {m: make_strategy(m, session, Recorder(m)) for m in NEW}
    m = built["fedavgm"]
    assert isinstance(m, RecordingFedAvgM) and isinstance(m, FedAvgM)
    assert (m.server_momentum, m.server_learning_rate, m.server_opt) == (0.8, 1.0, True)
    a = built["fedadam"]
    assert isinstance(a, RecordingFedAdam) and isinstance(a, FedAdam)
    assert (a.eta, a.tau, a.eta_l, a.beta_1, a.beta_2) == (0.02, 0.005, 0.004, 0.9, 0.99)  # Flower's betas
    edge = session.chain.edge
    for strategy in (m, a):  # the server step sees the parameters, not the BatchNorm buffers
        assert strategy.parameter_keys == tuple(name for name, _ in edge.named_parameters())
    for method, switch in (("fedavg_ls", OWN_CLASSES), ("fedavg_ft", FINE_TUNE)):
        s = built[method]
        assert type(s) is RecordingFedAvg and isinstance(s, FedAvg) and s.method == method
        assert s.client_config == {switch: 1} and s.recorder.method == method
        assert dict(s._tag(ConfigRecord({})))[switch] == 1
    for method, s in built.items():
        assert s.method == method and s.sampler is not None
    # without direct-lr FedAdam reports the profile's lr as the clients'
    assert make_strategy("fedadam", fake_session(), Recorder("fedadam")).eta_l == \
        fake_session().config.client_training().lr


# -- FedAvgM / FedAdam: parameters stepped, buffers averaged, state checkpointed (no Flower runtime) ---


@pytest.fixture
def no_runtime(monkeypatch):
    """Flower's messages read the run id of the process they are built in; no run here."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    """A grid stand-in: Flower's FedAvg samples from get_node_ids (no messages are sent here)."""

    def get_node_ids(self):
        return [101, 102]


def client_states(global_state: dict, server_round: int) -> list[tuple[dict, int]]:
    """Two clients' trained edges: parameters moved a little, every running_var re-estimated at 0.3 x
    the manufacturer's (a client's smaller variance), num_batches_tracked counted on."""
    out = []
    for partition, examples in ((0, 30), (1, 10)):
        g = torch.Generator().manual_seed(100 * server_round + partition)
        state = {}
        for key, value in global_state.items():
            if key.endswith("running_var"):
                state[key] = 0.3 * value
            elif key.endswith("num_batches_tracked"):
                state[key] = value + 7
            elif key.endswith("running_mean"):
                state[key] = value + 0.1 * (partition + 1)
            else:
                state[key] = value + 0.01 * torch.randn(value.shape, generator=g)
        out.append((state, examples))
    return out


def replies_to(messages: list[Message], states: list[tuple[dict, int]]) -> list[Message]:
    replies = []
    for partition, (message, (state, examples)) in enumerate(zip(messages, states)):
        metadata = Metadata(run_id=1, message_id="", src_node_id=message.metadata.dst_node_id, dst_node_id=0,
                            reply_to_message_id="instruction", group_id="1", created_at=time.time(), ttl=600.0,
                            message_type="train")
        content = RecordDict({ARRAYS: ArrayRecord({k: v.clone() for k, v in state.items()}),
                              METRICS: MetricRecord({PARTITION_ID: partition, NUM_EXAMPLES: examples})})
        replies.append(Message(content=content, metadata=metadata))
    return replies


def one_round(strategy, server_round: int, arrays: ArrayRecord, manufacturer: dict) -> ArrayRecord:
    """Flower's round ``server_round`` (a resumed strategy adds its ``round_offset``)."""
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), Nodes()))
    assert all(set(m.content[ARRAYS].keys()) == set(manufacturer) for m in messages)  # the whole edge goes out
    states = client_states(manufacturer, server_round + getattr(strategy, "round_offset", 0))
    out, _ = strategy.aggregate_train(server_round, replies_to(messages, states))
    return out


def fedavg_average(states: list[tuple[dict, int]], key: str) -> np.ndarray:
    total = sum(n for _, n in states)
    return sum(s[key].numpy() * (n / total) for s, n in states)


@pytest.mark.parametrize("method", ["fedavgm", "fedadam"])
def test_server_optimisers_step_parameters_and_average_buffers(method, no_runtime):
    from strategies.ledger import Recorder
    from strategies.server_app import make_strategy

    session = fake_session()
    manufacturer = {k: v.clone() for k, v in session.chain.edge.state_dict().items()}
    params = {name for name, _ in session.chain.edge.named_parameters()}
    buffers = [k for k in manufacturer if k not in params]
    assert any(k.endswith("running_var") for k in buffers) and any(k.endswith("num_batches_tracked") for k in buffers)
    strategy = make_strategy(method, session, Recorder(method))
    arrays, previous = ArrayRecord(manufacturer), manufacturer
    for server_round in (1, 2, 3):
        out = one_round(strategy, server_round, arrays, manufacturer)
        states = client_states(manufacturer, server_round)
        assert list(out.keys()) == list(manufacturer)  # every array, in the model's order
        state = out.to_torch_state_dict()
        for key in buffers:  # FedAvg's weighted average, whatever the server optimiser does
            assert np.array_equal(state[key].numpy(), fedavg_average(states, key)), key
            if key.endswith("running_var"):
                assert (state[key] > 0).all()
        for key in params:  # stepped by the server optimiser, kept in the clients' dtype
            assert state[key].dtype == manufacturer[key].dtype
            assert not torch.equal(state[key], previous[key])
            if method == "fedadam":  # Adam moves each parameter by about eta per round
                assert (state[key] - previous[key]).abs().max() < 3 * strategy.eta
        if method == "fedavgm" and server_round == 1:  # momentum starts as the first pseudo-gradient
            for key in params:
                assert np.allclose(state[key].numpy(), fedavg_average(states, key), atol=1e-6)
        arrays, previous = out, state
    # Flower's FedAvgM stepping the buffers too would end round 2 with a negative running_var
    if method == "fedavgm":
        from flwr.serverapp.strategy import FedAvgM

        raw = FedAvgM(server_momentum=0.9, min_train_nodes=2, min_available_nodes=2)
        arrays = ArrayRecord(manufacturer)
        for server_round in (1, 2):
            messages = list(raw.configure_train(server_round, arrays, ConfigRecord({}), Nodes()))
            arrays, _ = raw.aggregate_train(server_round,
                                            replies_to(messages, client_states(manufacturer, server_round)))
        var = next(k for k in buffers if k.endswith("running_var"))
        assert (arrays[var].numpy() < 0).any()


@pytest.mark.parametrize("method", ["fedavgm", "fedadam"])
def test_a_resumed_server_optimiser_steps_as_an_uninterrupted_one(method, no_runtime):
    """Round 2 from a checkpoint after round 1 (global model + server state, through safetensors)
    gives the arrays the uninterrupted strategy gives."""
    from models.io import read_weights, save_weights
    from strategies.ledger import Recorder
    from strategies.server_app import make_strategy

    session = fake_session()
    manufacturer = {k: v.clone() for k, v in session.chain.edge.state_dict().items()}
    through = make_strategy(method, session, Recorder(method))
    after_1 = one_round(through, 1, ArrayRecord(manufacturer), manufacturer)
    expected = one_round(through, 2, after_1, manufacturer).to_torch_state_dict()

    first = make_strategy(method, session, Recorder(method))
    one_round(first, 1, ArrayRecord(manufacturer), manufacturer)
    tensors, _ = first.checkpoint()
    assert any(k.startswith("server.") for k in tensors)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        tensors = read_weights(save_weights(tensors, Path(folder) / "checkpoint.safetensors"))
    resumed = make_strategy(method, session, Recorder(method))
    resumed.restore(tensors, {})  # as strategies.server_app resumes: restore, then start at round 2
    arrays = resumed.begin(start_round=2, initial_arrays=None)  # start's own first step, before Flower's loop
    got = one_round(resumed, 1, arrays, manufacturer).to_torch_state_dict()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


# -- fedavg_ft's client: it deploys its fine-tuned edge, the next round's "before" (no Flower runtime) ---


def client_message(config: dict, server_round: int, edge_state: dict, message_type: str) -> Message:
    from protocol.wire import CONFIG, SERVER_ROUND

    content = RecordDict({ARRAYS: ArrayRecord({k: v.clone() for k, v in edge_state.items()}),
                          CONFIG: ConfigRecord({**config, SERVER_ROUND: server_round})})
    return Message(content=content, message_type=message_type, dst_node_id=1)


def weights_sum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture
def client_threads(monkeypatch):
    """The client handlers set torch's thread count from OMP_NUM_THREADS (a Ray actor's 1): here 1 as
    well, and the suite's count restored afterwards."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_a_fedavg_ft_client_deploys_its_fine_tuned_edge(cache, tmp_path, no_runtime, client_threads, monkeypatch):
    """Round 1: "before" is the received (manufacturer's) edge, "after" the fine-tuned global edge; round
    2's "before" is that fine-tuned edge, also for a client whose state comes back from disk (resume).
    Which edge was evaluated shows in the figures: the evaluation here reports the sum of its weights."""
    from flwr.app import Context

    import clients.app as client_app
    from protocol.wire import (AFTER, AP_AFTER, AP_BEFORE, BEFORE, DIRECT_WORK, FINE_TUNE, METHOD, SECONDS,
                               STATE_DIR, WORK, decode)

    monkeypatch.setattr(client_app, "per_class_ap",
                        lambda model, data, classes, **_: ({c: weights_sum(model) for c in classes},
                                                      {"mAP": weights_sum(model)}))
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache)})
    config = {**run.to_record(), METHOD: "fedavg_ft", WORK: DIRECT_WORK, FINE_TUNE: 1, STATE_DIR: str(tmp_path)}
    manufacturer, global_1, global_2 = (build_model("smoke", "edge", seed=s) for s in (0, 1, 2))

    def context() -> Context:
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})

    first = context()
    trained = client_app.train(client_message(config, 1, manufacturer.state_dict(), "train"), first).content[METRICS]
    assert decode(trained, BEFORE) == {"mAP": weights_sum(manufacturer)}  # round 1: the received edge
    evaluated = client_app.evaluate(client_message(config, 1, global_1.state_dict(), "evaluate"), first)
    evaluated = evaluated.content[METRICS]
    assert evaluated[f"{SECONDS}.fine_tune"] > 0
    fine_tuned = decode(evaluated, AFTER)["mAP"]
    assert fine_tuned != weights_sum(global_1)  # the global edge fine-tuned, then evaluated
    fresh = context()  # a resumed client: its state comes back from the state folder
    for ctx in (first, fresh):
        again = client_app.train(client_message(config, 2, global_2.state_dict(), "train"), ctx).content[METRICS]
        assert decode(again, BEFORE) == {"mAP": fine_tuned}  # not the received global edge
        assert decode(again, AP_BEFORE) == decode(evaluated, AP_AFTER)



def test_between_evaluations_a_fedavg_ft_client_fine_tunes_and_evaluates_nothing(cache, tmp_path, no_runtime,
                                                                                   client_threads, monkeypatch):
    """eval-every 2 over 3 rounds: round 1 evaluates the received edge only ("before", every figure's
    start), round 2 its fine-tuned edge ("after"), round 3 starts from that evaluation and ends with
    one (the last round). The fine-tuning, the method's work, runs every round."""
    from flwr.app import Context

    import clients.app as client_app
    from protocol.wire import AFTER, AP_AFTER, AP_BEFORE, BEFORE, DIRECT_WORK, FINE_TUNE, METHOD, SECONDS, WORK, decode

    evaluated_sums = []

    def fake_ap(model, data, classes, **_):
        evaluated_sums.append(weights_sum(model))
        return {c: evaluated_sums[-1] for c in classes}, {"mAP": evaluated_sums[-1]}

    monkeypatch.setattr(client_app, "per_class_ap", fake_ap)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 3, "eval-every": 2,
                              "cache-dir": str(cache)})
    config = {**run.to_record(), METHOD: "fedavg_ft", WORK: DIRECT_WORK, FINE_TUNE: 1}
    edges = [build_model("smoke", "edge", seed=s).state_dict() for s in range(4)]
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    train, after = {}, {}
    for r in (1, 2, 3):
        train[r] = client_app.train(client_message(config, r, edges[r - 1], "train"), ctx).content[METRICS]
        after[r] = client_app.evaluate(client_message(config, r, edges[r], "evaluate"), ctx).content[METRICS]
        assert after[r][f"{SECONDS}.fine_tune"] > 0
    assert decode(train[1], AP_BEFORE) and not decode(after[1], AP_AFTER) and not decode(after[1], AFTER)
    assert not decode(train[2], AP_BEFORE) and not decode(train[2], BEFORE) and decode(after[2], AP_AFTER)
    assert decode(train[3], BEFORE) == decode(after[2], AFTER) and decode(after[3], AP_AFTER)
    assert len(evaluated_sums) == 3  # round 1's before, round 2's and round 3's after


def test_local_training_evaluated_every_other_round_ends_where_every_round_does(ws):
    """The same seeds train the same edge whatever eval-every is: the last round's figures are equal,
    the rounds between have records with their costs and no AP."""
    from strategies.centralised import local_client
    from strategies.ledger import Recorder

    edge = build_model("smoke", "edge", seed=0)
    settings = ClientTraining.from_profile(get_profile("smoke"))
    runs = {}
    for every in (1, 2):
        recorder = Recorder("local")
        local_client(ws, edge, 0, 3, 2, settings, 0, recorder, eval_every=every)
        runs[every] = recorder.records
    every_round, every_other = runs[1], runs[2]
    assert [r["round"] for r in every_other] == [1, 2, 3]
    assert not every_other[0]["ap_after"] and every_other[0]["seconds"]["direct training"] > 0
    assert not every_other[1]["ap_before"] and every_other[1]["ap_after"] == every_round[1]["ap_after"]
    assert every_other[2]["ap_before"] == every_round[2]["ap_before"]
    assert every_other[2]["ap_after"] == every_round[2]["ap_after"] and every_other[2]["after"] == every_round[2]["after"]
    assert every_other[0]["ap_before"] == every_round[0]["ap_before"]


def distill_c_starts(monkeypatch) -> list[dict]:
    """The edge every Distill C of ``clients.app`` starts from (its state, in call order), as they come."""
    import clients.app as client_app

    starts = []
    real = client_app.distill_c

    def spy(edge, *args, **kwargs):
        starts.append({k: v.clone() for k, v in edge.state_dict().items()})
        return real(edge, *args, **kwargs)

    monkeypatch.setattr(client_app, "distill_c", spy)
    return starts


def test_a_diredi_client_distils_from_the_spread_edge_when_one_comes(cache, tmp_path, no_runtime, client_threads,
                                                                    monkeypatch):
    """DiReDi's "train.distill": Distill C starts from the client's own deployed edge, or, with spread,
    from the server's edge the message carries, except the rows of the classes this client dropped
    (client 1 drops horse), which come from its own edge; the result is the edge the client keeps."""
    from flwr.app import Context

    import clients.app as client_app
    from models.parts import CLASS_ROW_PARAMS
    from protocol.wire import (AFTER, CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, SPREAD_EDGE,
                               TUTOR, WORK, decode, state_record)

    monkeypatch.setattr(client_app, "per_class_ap",
                        lambda model, data, classes, **_: ({c: weights_sum(model) for c in classes},
                                                      {"mAP": weights_sum(model)}))
    starts = distill_c_starts(monkeypatch)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache)})
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    own, spread, tutor = build_model("smoke", "edge", seed=1), build_model("smoke", "edge", seed=2), \
        build_model("smoke", "tutor", seed=0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(own)

    def distill(with_spread: bool) -> float:
        records = {TUTOR: state_record(tutor), **({SPREAD_EDGE: state_record(spread)} if with_spread else {})}
        content = RecordDict({**records, CONFIG: ConfigRecord({**config, SERVER_ROUND: 1})})
        reply = client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
        return decode(reply.content[METRICS], AFTER)["mAP"]

    def kept_edge():
        model = build_model("smoke", "edge", seed=3)
        model.load_state_dict(context.state.array_records[f"diredi.{EDGE}"].to_torch_state_dict())
        return model

    evaluated = distill(with_spread=True)
    start, theirs, mine = starts[0], spread.state_dict(), own.state_dict()
    horse = CLASS_INDEX["horse"]
    others = [c for c in range(theirs[CLASS_ROW_PARAMS[1]].shape[0]) if c != horse]
    for name, value in start.items():
        if name in CLASS_ROW_PARAMS:
            assert torch.equal(value[horse], mine[name][horse]) and torch.equal(value[others], theirs[name][others])
        else:
            assert torch.equal(value, theirs[name]), name  # the server's edge, not the client's
    assert evaluated == weights_sum(kept_edge()) not in (weights_sum(spread), weights_sum(own))
    kept = kept_edge().state_dict()
    distill(with_spread=False)
    assert all(torch.equal(v, kept[k]) for k, v in starts[1].items())  # without spread: the edge it kept


def test_with_spread_own_rows_distill_c_starts_the_client_s_new_classes_from_its_own_edge(
        cache, tmp_path, no_runtime, client_threads, monkeypatch):
    """--spread-own-rows own: Distill C starts from the server's spread edge, but the rows of the client's own
    new classes (and of the classes it dropped) are those of the edge it deployed, once that edge came from
    its own Distill C; before its first Distill C (the manufacturer's edge) they are the server's."""
    from flwr.app import Context

    import clients.app as client_app
    from models.parts import CLASS_ROW_PARAMS
    from protocol.wire import CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, SPREAD_EDGE, TUTOR, WORK, \
        state_record

    starts = distill_c_starts(monkeypatch)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache),
                              "spread": "on", "spread-own-rows": "own"})
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    own, spread, tutor = build_model("smoke", "edge", seed=1), build_model("smoke", "edge", seed=2), \
        build_model("smoke", "tutor", seed=0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(own)
    with torch.no_grad():  # every tensor of the server's edge unlike the client's (both start from one class prior)
        for value in spread.state_dict().values():
            if value.is_floating_point():
                value.add_(0.01)
    spec = client_app.workspace_of(run).clients[1]
    private, dropped = [CLASS_INDEX[c] for c in spec.private], [CLASS_INDEX[c] for c in spec.dropped]
    assert private and dropped

    def distill(server_round: int) -> dict:
        deployed = context.state.array_records[f"diredi.{EDGE}"].to_torch_state_dict()
        content = RecordDict({TUTOR: state_record(tutor), SPREAD_EDGE: state_record(spread),
                              CONFIG: ConfigRecord({**config, SERVER_ROUND: server_round})})
        client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
        return deployed

    theirs = spread.state_dict()
    for server_round in (1, 2):
        deployed = distill(server_round)
        start = starts[-1]
        for name in CLASS_ROW_PARAMS:
            assert torch.equal(start[name][dropped], deployed[name][dropped])
            source = theirs if server_round == 1 else deployed
            assert torch.equal(start[name][private], source[name][private]), (server_round, name)
            assert not torch.equal(deployed[name][private], theirs[name][private])
        assert all(torch.equal(v, theirs[k]) for k, v in start.items() if k not in CLASS_ROW_PARAMS)  # the tower


@pytest.mark.parametrize("rows", ["server", "distilled"])
def test_with_spread_rows_from_the_server_other_clients_classes_keep_the_spread_edge_s_rows(
        cache, tmp_path, no_runtime, client_threads, rows):
    """--spread-rows server (the default): after Distill C (and the edge average), the rows of the classes
    the client neither trains nor dropped are the server's spread edge's, whole; its own classes' rows are
    not. ``distilled``: none is."""
    from flwr.app import Context

    import clients.app as client_app
    from models.parts import CLASS_ROW_PARAMS
    from protocol.wire import CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, SPREAD_EDGE, TUTOR, WORK, \
        state_record

    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache),
                              "spread": "on", "spread-rows": rows})
    assert run.edge_share == 0.5
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    own, spread, tutor = build_model("smoke", "edge", seed=1), build_model("smoke", "edge", seed=2), \
        build_model("smoke", "tutor", seed=0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(own)
    content = RecordDict({TUTOR: state_record(tutor), SPREAD_EDGE: state_record(spread),
                          CONFIG: ConfigRecord({**config, SERVER_ROUND: 1})})
    client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
    kept = context.state.array_records[f"diredi.{EDGE}"].to_torch_state_dict()
    spec = client_app.workspace_of(run).clients[1]
    mine = {CLASS_INDEX[c] for c in (*spec.train_classes, *spec.dropped)}
    others = [i for i in CLASS_INDEX.values() if i not in mine]
    theirs = spread.state_dict()
    for name in CLASS_ROW_PARAMS:
        assert torch.equal(kept[name][others], theirs[name][others]) == (rows == "server")
        assert all(not torch.equal(kept[name][i], theirs[name][i]) for i in mine)


@pytest.mark.parametrize("scores", ["kept", "others"])
def test_with_spread_scores_others_distill_c_also_learns_the_tutor_s_scores_of_other_clients_classes(
        cache, tmp_path, no_runtime, client_threads, monkeypatch, scores):
    """--spread-scores others: Distill C's soft targets are the tutor's scores on the client's kept presumed
    classes and on the classes it neither trains nor dropped; ``kept`` (the default): the kept ones only.
    Never a class it trains or dropped."""
    from flwr.app import Context

    import clients.app as client_app
    from protocol.wire import CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, SPREAD_EDGE, TUTOR, WORK, \
        state_record

    asked = []
    real = client_app.distill_c

    def spy(*args, kept_classes=(), **kwargs):
        asked.append(set(kept_classes))
        return real(*args, kept_classes=kept_classes, **kwargs)

    monkeypatch.setattr(client_app, "distill_c", spy)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache),
                              "spread": "on", "spread-scores": scores})
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(build_model("smoke", "edge", seed=1))
    content = RecordDict({TUTOR: state_record(build_model("smoke", "tutor", seed=0)),
                          SPREAD_EDGE: state_record(build_model("smoke", "edge", seed=2)),
                          CONFIG: ConfigRecord({**config, SERVER_ROUND: 1})})
    client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
    spec = client_app.workspace_of(run).clients[1]
    kept = {CLASS_INDEX[c] for c in spec.kept}
    mine = {CLASS_INDEX[c] for c in (*spec.train_classes, *spec.dropped)}
    others = set(CLASS_INDEX.values()) - mine
    assert kept and others - kept and not (asked[0] & {CLASS_INDEX[c] for c in (*spec.private, *spec.dropped)})
    assert asked == [kept | others if scores == "others" else kept]


def _record_redistilled_edges(client_app, monkeypatch) -> list[dict]:
    """Each edge Distill C returns, as it returned it (before any averaging); evaluation skipped."""
    monkeypatch.setattr(client_app, "per_class_ap",
                        lambda model, data, classes, **_: ({c: 0.0 for c in classes}, {"mAP": 0.0}))
    made = []
    real = client_app.distill_c

    def spy(edge, *args, **kwargs):
        new_edge, report = real(edge, *args, **kwargs)
        made.append({k: v.clone() for k, v in new_edge.state_dict().items()})
        return new_edge, report

    monkeypatch.setattr(client_app, "distill_c", spy)
    return made


def test_an_averaged_edge_takes_the_rows_of_the_classes_the_client_changes_whole(cache, tmp_path, no_runtime,
                                                                                   client_threads, monkeypatch):
    """--edge-average 0.5: the edge a client keeps is half its re-distilled edge and half the edge it had,
    except the classification rows of its own new classes and of the classes it dropped (client 1: cat
    and horse), which are the re-distilled edge's: new classes at full strength, dropped ones released."""
    from flwr.app import Context

    import clients.app as client_app
    from models.parts import CLASS_ROW_PARAMS
    from protocol.wire import CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, TUTOR, WORK, state_record

    made = _record_redistilled_edges(client_app, monkeypatch)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache),
                              "edge-average": 0.5})
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    own, tutor = build_model("smoke", "edge", seed=1), build_model("smoke", "tutor", seed=0)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(own)
    content = RecordDict({TUTOR: state_record(tutor), CONFIG: ConfigRecord({**config, SERVER_ROUND: 1})})
    client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
    kept = context.state.array_records[f"diredi.{EDGE}"].to_torch_state_dict()
    redistilled, before = made[0], own.state_dict()
    changed = [CLASS_INDEX[c] for c in ("cat", "horse")]  # default8's c1-cat-nohorse
    others = [c for c in range(before[CLASS_ROW_PARAMS[1]].shape[0]) if c not in changed]
    for name in CLASS_ROW_PARAMS:
        assert torch.equal(kept[name][changed], redistilled[name][changed])
        assert torch.allclose(kept[name][others], (before[name][others] + redistilled[name][others]) / 2)
    conv = next(k for k in kept if k.endswith("weight") and k not in CLASS_ROW_PARAMS)
    assert torch.allclose(kept[conv], (before[conv] + redistilled[conv]) / 2)
    assert not torch.equal(kept[conv], redistilled[conv])  # Distill C moved it: the average is not the new edge


@pytest.mark.parametrize("partner", ["deployed", "server"])
def test_with_spread_the_edge_average_takes_the_partner_spread_average_names(cache, tmp_path, no_runtime,
                                                                              client_threads, monkeypatch, partner):
    """--spread on --spread-average server: the client keeps half its re-distilled edge and half the server's
    spread edge its Distill C started from (``deployed``, the default: half the edge it deployed before);
    the rows of the classes it changes and of the other clients' classes are whole either way."""
    from flwr.app import Context

    import clients.app as client_app
    from models.parts import CLASS_ROW_PARAMS
    from protocol.wire import CONFIG, DIREDI_WORK, EDGE, EDGE_SOURCE, METHOD, SERVER_ROUND, SPREAD_EDGE, TUTOR, \
        WORK, state_record

    made = _record_redistilled_edges(client_app, monkeypatch)
    run = resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 2, "cache-dir": str(cache),
                              "spread": "on", "spread-average": partner})
    config = {**run.to_record(), METHOD: "diredi", WORK: DIREDI_WORK, EDGE_SOURCE: "stored"}
    own, spread = build_model("smoke", "edge", seed=1), build_model("smoke", "edge", seed=2)
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    context.state[f"diredi.{EDGE}"] = state_record(own)
    content = RecordDict({TUTOR: state_record(build_model("smoke", "tutor", seed=0)),
                          SPREAD_EDGE: state_record(spread), CONFIG: ConfigRecord({**config, SERVER_ROUND: 1})})
    client_app.distill(Message(content=content, message_type="train.distill", dst_node_id=1), context)
    kept = context.state.array_records[f"diredi.{EDGE}"].to_torch_state_dict()
    redistilled = made[0]
    expected_partner = (spread if partner == "server" else own).state_dict()
    conv = next(k for k in kept if k.endswith("weight") and k not in CLASS_ROW_PARAMS)
    assert torch.allclose(kept[conv], (expected_partner[conv] + redistilled[conv]) / 2)
    spec = client_app.workspace_of(run).clients[1]
    kept_rows = [CLASS_INDEX[c] for c in spec.kept]  # averaged rows: the partner shows there too
    for name in CLASS_ROW_PARAMS:
        assert torch.allclose(kept[name][kept_rows], (expected_partner[name][kept_rows]
                                                      + redistilled[name][kept_rows]) / 2)
    changed = [CLASS_INDEX[c] for c in (*spec.private, *spec.dropped)]
    others = [i for c, i in CLASS_INDEX.items() if c not in (*spec.train_classes, *spec.dropped)]
    for name in CLASS_ROW_PARAMS:
        assert torch.equal(kept[name][changed], redistilled[name][changed])
        assert torch.equal(kept[name][others], spread.state_dict()[name][others])


# -- (b) the four methods through real Flower + Ray: one simulation, 2 clients, 1 round ---------------


@pytest.mark.slow
def test_the_four_baselines_run_on_flower(cache, threads_one):
    from sim.federation import simulate
    from strategies.ledger import Recorder
    from session.workspace import Session
    from strategies.server_app import run_method
    from tests.test_flower import check_records

    session = Session.open(resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 1,
                                               "cache-dir": str(cache), "methods": ",".join(NEW)}))
    results, seconds = {}, {}

    def server(grid, _):
        for method in NEW:
            start = time.perf_counter()
            results[method] = run_method(method, session, grid, Recorder(method))
            seconds[method] = time.perf_counter() - start

    simulate(session.config, server)
    print({m: round(s, 1) for m, s in seconds.items()})
    edge = session.chain.edge.state_dict()
    for method in NEW:
        result = results[method]
        check_records(result, method, session.workspace)  # one record per client, as FedAvg's
        for record in result.records:
            assert record["ap_after"] and all(math.isfinite(v) or math.isnan(v) for v in record["ap_after"].values())
            assert any(math.isfinite(v) for v in record["ap_after"].values())
            assert "direct_training" in record["seconds"] and record["accepted"] is None
            assert ("fine_tune" in record["seconds"]) == (method == "fedavg_ft")
        assert set(result.edge_state) == set(edge)
        assert all(torch.isfinite(v.float()).all() for v in result.edge_state.values())
    for record in results["fedavg_ft"].records:
        assert record["seconds"]["fine_tune"] > 0 and "fine_tune.det" in record["losses"]
    # fedavg_ft's clients train as FedAvg's, and FedAvgM's first step is FedAvg's average (its momentum
    # starts as the first pseudo-gradient): after one round both hold the same global edge
    for key, value in results["fedavg_ft"].edge_state.items():
        assert torch.allclose(results["fedavgm"].edge_state[key].to(value.dtype), value, atol=1e-6), key
    # fedavg_ls: the classes no client holds keep the manufacturer's classification rows (FedAvg moves them)
    held = {CLASS_INDEX[c] for spec in session.workspace.clients for c in spec.train_classes}
    nobody = [c for c in range(len(CLASS_INDEX)) if c not in held]
    assert nobody
    for suffix in ("weight", "bias"):
        key = f"{CLS}.{suffix}"
        assert torch.allclose(results["fedavg_ls"].edge_state[key][nobody], edge[key][nobody], atol=1e-7)
        assert not torch.allclose(results["fedavg_ft"].edge_state[key][nobody], edge[key][nobody], atol=1e-7)
