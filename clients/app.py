"""The Flower ClientApp: one customer of the manufacturer.

Handlers (message type -> work; the wire format is ``protocol.wire``):

* "train", work "diredi": AP of its edge on its test shard (ap-before); RD Tutor 1 (unless a
  shared Tutor 1 came in) and Tutor 2 on its own shards; replies ONLY the neck/head delta + metrics.
  A tutor arrives in full once; the client keeps its backbone body, later tutors are neck/head only.
* "train", work "direct" (the FedAvg family): ap-before of the received edge (fedavg_ft: of the edge
  it deployed, below); trains it on its labels at ``run.direct_lr`` (0: the profile's lr), with
  FedProx's proximal term when the message holds "proximal-mu", only its own classes' scores when it
  holds "own-classes" (fedavg_ls); replies the edge + metrics.
* "train.distill": Distill C of its edge (with spread: of the server's edge it received, with its
  dropped classes' classification rows from its own edge) from the received (updated) tutor on its
  data; keeps the
  new edge in ``context.state``; replies metrics only (ap-after, seconds, memory). With the edge check
  (``run.edge_check``) it keeps the new edge as a candidate, replies it with the metrics, and waits for
  the manufacturer's verdict.
* "evaluate" with "deploy-edge" (the edge check's verdict): 1 deploys the candidate, 0 keeps the edge
  deployed before; then the AP of the deployed edge on its test shard (ap-after).
* "evaluate": AP of an edge on its test shard (the received one, or its stored one for DiReDi).
  With "fine-tune" (fedavg_ft) the received global edge is first fine-tuned on the client's data
  (``distill.rd.fine_tune``, as many steps as Distill C); the fine-tuned edge is the one the client
  deploys: it is evaluated, and its evaluation is kept in ``context.state`` as the next round's "before".
* "query": its partition id, the stable identity seeded client sampling draws from.

When the configuration names a state folder (``STATE_DIR``), every handler also writes the client's
state to disk after its work, and a client whose state is empty in a later round (a resumed run)
loads it back first (``clients.store``).

Where a client's files live: the run configuration's paths are the server's. A SuperNode of a
deployment names its own in its node config (``node_run_config``, ``node_state_dir``): ``cache-dir``
(the synthetic data is generated there, the same images for a seed on every machine), ``data-root``
(its VOC folder, with ``--data voc``) and ``state-dir``; a machine of a Ray cluster names them in
its environment (``DIREDI_CACHE_DIR``, ...). Without them (the simulation on one machine, whose
clients share the server's disk) the run configuration's paths are used. Every reply names the
machine (and Ray node) it came from (``where``).

The client rebuilds its data and settings from the run configuration every message carries
(``protocol.config.RunConfig.from_record``); replies hold weights and numbers, never images,
boxes or labels.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch  # imported here so ArrayRecord's torch conversions work inside Ray actors: it checks sys.modules only
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.store import (is_body_reference, load_client_state, open_body_cache, read_body, save_body_memo,
                           save_body_outputs, save_client_state, store_body, take_body_memo)
from data.voc import CLASS_INDEX, DataError
from session.workspace import Workspace, workspace_of
from distill.body_memo import BodyMemo
from distill.rd import (client_delta, direct_training, distill_c, distill_c_lr, fine_tune,
                        reverse_distill_tutor1, reverse_distill_tutor2)
from distill.trainer import PhaseReport, peak_rss_mb
from evaluation.ap import per_class_ap
from models.compute import computing, current_compute, placed_on
from models.io import body_fingerprint, state_fingerprint
from models.ladder import build_to_load
from models.parts import interpolate_weights, part_of, with_class_rows
from protocol.config import RunConfig
from protocol.privacy import DP_EPSILON, DP_PARTICIPATIONS, epsilon_spent, is_on, noise_generator, privatise
from protocol.wire import (AFTER, AP_AFTER, AP_BEFORE, ARRAYS, BEFORE, BODY, CONFIG, DELTA, DEPLOY_EDGE, DIRECT_WORK, DIREDI_WORK,
                           EDGE, EDGE_SOURCE, FINE_TUNE, LOSSES, METHOD, METRICS, NUM_EXAMPLES, OWN_CLASSES,
                           PARTITION_ID, PEAK_RSS, SECONDS, CPU_SECONDS, SERVER_ROUND, SPREAD_EDGE, STATE_DIR, TRAINED, TUTOR, TUTOR1, WHERE, WORK,
                           decode, encode, pack_delta, state_record, top_k, work_seed)
from protocol.transport import packed, unpacked


def packed_transport(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod around every handler: the handler reads unpacked ArrayRecords and its reply
    travels packed, one array per record (``protocol.transport``; the server's ``PackedGrid``)."""
    return packed(call_next(unpacked(msg), context))


app = ClientApp(mods=[packed_transport])

# Decoded images of the most recent partitions this process served (least recently used dropped first).
# One partition's three shards hold about 60 MB of uint8 images in the cpu profile; an actor serves many
# partitions over a run, so an unbounded cache grew by that much per partition (up to 2.2 GB per actor
# at 128 clients). Decoding a shard again costs under a millisecond per image.
CACHED_PARTITIONS = 1
_DATASETS: OrderedDict[tuple[int, int], dict[str, object]] = OrderedDict()


def _dataset(workspace: Workspace, partition: int, kind: str):
    # Workspaces are memoised, so their identity is a stable key.
    key = (id(workspace), partition)
    shards = _DATASETS.setdefault(key, {})
    _DATASETS.move_to_end(key)
    while len(_DATASETS) > CACHED_PARTITIONS:
        _DATASETS.popitem(last=False)
    if kind not in shards:
        shards[kind] = {"presumed": workspace.client_presumed, "train": workspace.client_train,
                        "test": workspace.client_test}[kind](partition)
    return shards[kind]


def _set_threads() -> None:
    # Ray gives each actor OMP_NUM_THREADS = its CPU count (1): use exactly that, no oversubscription.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


# Node-config keys of a SuperNode's own folders (``flower-supernode --node-config``), and the
# environment variables that name them on a machine of a Ray cluster (``ray start`` passes its
# environment to the client actors it runs; Flower's simulation gives them no node config of their own).
NODE_CACHE_DIR, NODE_DATA_ROOT, NODE_STATE_DIR = "cache-dir", "data-root", "state-dir"
NODE_ENV = {NODE_CACHE_DIR: "DIREDI_CACHE_DIR", NODE_DATA_ROOT: "DIREDI_DATA_ROOT", NODE_STATE_DIR: "DIREDI_STATE_DIR"}


def node_folder(key: str, node_config: Mapping, environ: Mapping = os.environ) -> Path | None:
    """This node's own folder ``key``: from its node config, else its environment, else None."""
    value = node_config.get(key) or environ.get(NODE_ENV[key])
    return Path(str(value)).expanduser().resolve() if value else None


def node_run_config(run: RunConfig, node_config: Mapping, environ: Mapping = os.environ) -> RunConfig:
    """The run as this node sees it: its own cache folder and VOC folder (``node_folder``), the run
    configuration's (the server's) where it names none. A VOC folder that is not there stops the
    client with one line naming it (synthetic data is generated into the cache when missing)."""
    changes = {}
    if (cache := node_folder(NODE_CACHE_DIR, node_config, environ)) is not None:
        changes["cache_dir"] = str(cache)
    if (voc := node_folder(NODE_DATA_ROOT, node_config, environ)) is not None:
        changes["voc_root"] = str(voc)
    run = replace(run, **changes)
    if run.data == "voc" and not Path(run.voc_root).is_dir():
        raise DataError(f"node {node_config.get('partition-id', '?')}: no VOC data at {run.voc_root!r}; "
                        f"give this SuperNode --node-config \"{NODE_DATA_ROOT}='PATH'\"")
    return run


def node_state_dir(config: Mapping, node_config: Mapping, environ: Mapping = os.environ) -> str | None:
    """Where this client keeps its state, when the server asks clients to keep it (``STATE_DIR``): the
    node's own ``state-dir``/<run folder name> (``node_folder``), else the server's folder."""
    server = config.get(STATE_DIR)
    if server is None:
        return None
    if (own := node_folder(NODE_STATE_DIR, node_config, environ)) is not None:
        return str(own / Path(str(server)).parent.name)
    return str(server)


def where() -> ConfigRecord:
    """The machine this client runs on, its Ray node when it is a Ray actor, and the precision its
    models computed in ("auto" resolved on this machine; records keep all three; no empty strings:
    Flower cannot count their bytes)."""
    found = {"host": socket.gethostname() or "unknown", "precision": current_compute().precision}
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        found["ray-node"] = sys.modules["ray"].get_runtime_context().get_node_id()
    return ConfigRecord(found)


def _model(workspace: Workspace, role: str, record: ArrayRecord) -> nn.Module:
    return build_to_load(workspace.profile, role, record.to_torch_state_dict()).eval()


def _evaluate(edge: nn.Module, workspace: Workspace, partition: int, when: str, phase: str,
              context: Context, config: ConfigRecord) -> dict[str, float]:
    """ap-<when>.<class> over the federation's classes, <when>.<precision|recall|f1|mAP>, seconds.

    An edge evaluated already is not evaluated again: round r+1's "before" is the edge round r
    ended with (DiReDi's kept edge, FedAvg's global edge), so its figures come from the client's state.
    """
    start = time.perf_counter()
    key, fingerprint = f"{config[METHOD]}.evaluated", state_fingerprint(edge.state_dict())
    last = context.state.config_records.get(key)
    if last is None or last["fingerprint"] != fingerprint:
        ap, summary = per_class_ap(edge, _dataset(workspace, partition, "test"), workspace.eval_classes(),
                                   score_thresh=RunConfig.from_record(config).operating_threshold)
        last = context.state[key] = ConfigRecord({"fingerprint": fingerprint, **encode("ap", ap),
                                                  **encode("summary", summary)})
    return _evaluation_metrics(last, when, phase, time.perf_counter() - start)


def _evaluate_before(edge: nn.Module, workspace: Workspace, partition: int, context: Context,
                     config: ConfigRecord) -> dict[str, float]:
    """The evaluation of the edge a round starts from, or nothing in a round whose previous round was
    not evaluated (``RunConfig.evaluates_before``: the run's ``eval_every``)."""
    if not RunConfig.from_record(config).evaluates_before(int(config.get(SERVER_ROUND, 0))):
        return {}
    return _evaluate(edge, workspace, partition, BEFORE, "evaluate_before", context, config)


def _evaluate_after(edge: nn.Module, workspace: Workspace, partition: int, context: Context,
                    config: ConfigRecord) -> dict[str, float]:
    """The evaluation of the edge a round ends with, or nothing between evaluated rounds
    (``RunConfig.evaluates_after``)."""
    if not RunConfig.from_record(config).evaluates_after(int(config.get(SERVER_ROUND, 0))):
        return {}
    return _evaluate(edge, workspace, partition, AFTER, "evaluate_after", context, config)


def phase_seconds(phase: str, report: PhaseReport) -> dict[str, float]:
    """seconds.<phase> (wall) and cpu_seconds.<phase> (this process's CPU: the work, whatever shares the machine)."""
    return {f"{SECONDS}.{phase}": report.seconds, f"{CPU_SECONDS}.{phase}": report.cpu_seconds}


def _evaluation_metrics(record: ConfigRecord, when: str, phase: str, seconds: float) -> dict[str, float]:
    """ap-<when>.<class>, <when>.<summary> and seconds.<phase> of an evaluation ``_evaluate`` kept."""
    ap_prefix = AP_BEFORE if when == BEFORE else AP_AFTER
    return {**encode(ap_prefix, decode(record, "ap")), **encode(when, decode(record, "summary")),
            f"{SECONDS}.{phase}": seconds}


def _deployed_key(config: ConfigRecord) -> str:
    """fedavg_ft: the evaluation of the edge the client deployed (its fine-tuned edge of its last round)."""
    return f"{config[METHOD]}.deployed"


def loss_metrics(phase: str, report: PhaseReport) -> dict[str, float]:
    """A phase's detection loss, distillation term and their ratio at its end (finite values only)."""
    b = report.balance()
    values = {"det": b["det_loss_end"], "distill": b["distill_loss_end"], "ratio": b["loss_ratio_end"]}
    return {f"{LOSSES}.{phase}.{k}": float(v) for k, v in values.items() if math.isfinite(v)}


def body_metrics(phase: str, memo: BodyMemo | None) -> dict[str, float]:
    """How many of the phase's tutor-body inputs the memo served and how many the body ran on
    (``distill.body_memo``; nothing without a memo)."""
    if memo is None:
        return {}
    return encode(BODY, {f"{phase}.served": memo.images_served, f"{phase}.computed": memo.images_computed})


def _reply(msg: Message, metrics: dict, arrays: dict[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({**(arrays or {}), METRICS: MetricRecord(metrics), WHERE: where()})
    return Message(content=content, reply_to=msg)


def _tutor(msg: Message, context: Context, workspace: Workspace, config: ConfigRecord, name: str) -> nn.Module:
    """The tutor (or Tutor 1) under ``name``: full weights the first time, afterwards only its
    neck/head, joined to the backbone body this client kept (eq. 10 never changes the body)."""
    received = msg.content.array_records[name].to_torch_state_dict()
    method, root = str(config[METHOD]), node_state_dir(config, context.node_config)
    key = f"{method}.tutor-body"
    if any(part_of(k) == "backbone" for k in received):  # the whole tutor (strict loading checks it)
        body = state_record({k: v for k, v in received.items() if part_of(k) == "backbone"})
        # With a state folder the body is kept on the client's disk and context.state holds a reference
        # (clients.store: Flower ships context.state with every message).
        context.state[key] = store_body(root, method, body) if root else body
    elif key in context.state.array_records:
        received = {**context.state.array_records[key].to_torch_state_dict(), **received}
    elif root and is_body_reference(context.state.config_records.get(key)):
        received = {**read_body(root, method, context.state.config_records[key]), **received}
    else:
        raise ValueError(f"{name!r} holds only neck/head weights and this client holds no tutor backbone")
    return build_to_load(workspace.profile, "tutor", received).eval()


def _edge_key(config: ConfigRecord) -> str:
    return f"{config[METHOD]}.{EDGE}"  # per method: one simulation may run several methods


def _candidate_key(config: ConfigRecord) -> str:
    return f"{config[METHOD]}.edge-candidate"  # a re-distilled edge awaiting the edge check's verdict


def _deploy(context: Context, config: ConfigRecord) -> None:
    """The edge check's verdict: deploys the candidate edge (1) or drops it and keeps the edge deployed
    before (0)."""
    candidate = _candidate_key(config)
    if candidate not in context.state.array_records:
        raise ValueError("a deploy verdict came but this client holds no re-distilled edge awaiting it")
    if int(config[DEPLOY_EDGE]):
        _store_edge(context, config, context.state.array_records[candidate])
    del context.state[candidate]


def _store_edge(context: Context, config: ConfigRecord, edge: ArrayRecord) -> None:
    """Deploys an edge of this client's Distill C, and notes that it now has one (``_redistilled``)."""
    context.state[_edge_key(config)] = edge
    context.state[f"{config[METHOD]}.redistilled"] = ConfigRecord({SERVER_ROUND: int(config.get(SERVER_ROUND, 0))})


def _redistilled(context: Context, config: ConfigRecord) -> bool:
    """Whether this client deploys an edge of its own Distill C (before its first, the manufacturer's)."""
    return f"{config[METHOD]}.redistilled" in context.state.config_records


def _edge(msg: Message, context: Context, workspace: Workspace, config: ConfigRecord) -> nn.Module:
    """The client's edge: its stored one (DiReDi with client re-distillation) or the received one."""
    stored, key = config.get(EDGE_SOURCE) == "stored", _edge_key(config)
    if stored and key in context.state.array_records:
        return _model(workspace, "edge", context.state.array_records[key])
    if EDGE not in msg.content.array_records:
        raise ValueError("no edge model: none received and none stored on this client")
    if stored:  # first round: the manufacturer's edge becomes this client's own
        context.state[key] = msg.content.array_records[EDGE]
    return _model(workspace, "edge", msg.content.array_records[EDGE])


def _common(msg: Message, context: Context):
    _set_threads()
    config = msg.content[CONFIG]
    run = node_run_config(RunConfig.from_record(config), context.node_config)
    partition = int(context.node_config["partition-id"])
    seed = work_seed(run.training_seed, int(config.get(SERVER_ROUND, 0)), partition)
    return config, run, workspace_of(run), partition, seed


def _identity(ws: Workspace, partition: int) -> dict[str, float]:
    return {PARTITION_ID: partition, NUM_EXAMPLES: len(_dataset(ws, partition, "train"))}


def _release_memory() -> None:
    """Frees what a message left behind (reference cycles, then glibc's free heap pages) so that the
    next message starts from the actor's resting size: an actor serves many clients' messages, and
    without this its resident memory crept up from message to message (freed tensors stay in the heap)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")  # glibc (Linux); elsewhere nothing to trim
    except OSError:
        return None


_LIBC = _libc()


def client_device(run_device: str) -> torch.device:
    """Where this client trains and evaluates: its GPU when the run's device is one (Ray shows each client
    actor the GPU share it was given as "cuda"), else the CPU."""
    if not str(run_device).startswith("cuda"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"the run trains on {run_device!r} but this client sees no CUDA device "
                           f"(on {socket.gethostname()}); run with --device cpu, or give this node a GPU")
    return torch.device("cuda")


def _handler(handler):
    """``handler`` with the client's state kept on disk when the configuration names a folder
    (loaded first when this run's state is empty past round 1, a resumed run; written after), its
    models computing as the configuration says (``models.compute``) on the run's device
    (``client_device``; weights stay CPU tensors between phases), and the memory the message left
    behind released at its end (``_release_memory``)."""

    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            run_config = RunConfig.from_record(msg.content[CONFIG])
            with computing(run_config.compute()), placed_on(client_device(run_config.device)):
                return _with_state(handler, msg, context)
        finally:
            _release_memory()

    return run


def _with_state(handler, msg: Message, context: Context) -> Message:
    config = msg.content[CONFIG]
    root = node_state_dir(config, context.node_config)
    if root is None:
        return handler(msg, context)
    method = str(config[METHOD])
    partition, server_round = int(context.node_config["partition-id"]), int(config.get(SERVER_ROUND, 0))
    if server_round > 1 and not any(key.startswith(f"{method}.") for key in context.state):
        for key, record in (load_client_state(root, method, partition, server_round) or {}).items():
            context.state[key] = record
    reply = handler(msg, context)
    save_client_state(context.state, root, method, partition, server_round)
    return reply


# -- handlers --------------------------------------------------------------------------------------


@app.train()
@_handler
def train(msg: Message, context: Context) -> Message:
    work = msg.content[CONFIG][WORK]
    if work == DIREDI_WORK:
        return _train_diredi(msg, context)
    if work == DIRECT_WORK:
        return _train_direct(msg, context)
    raise ValueError(f"unknown work {work!r} in the train config; expected {DIREDI_WORK!r} or {DIRECT_WORK!r}")


def _train_diredi(msg: Message, context: Context) -> Message:
    config, run, ws, partition, seed = _common(msg, context)
    settings = run.client_training()
    edge = _edge(msg, context, ws, config)
    metrics = _evaluate_before(edge, ws, partition, context, config)
    arrays = msg.content.array_records
    tutor = _tutor(msg, context, ws, config, TUTOR) if TUTOR in arrays else None
    root, method = node_state_dir(config, context.node_config), str(config[METHOD])
    # The tutor body's outputs per image (distill.body_memo), with a state folder: kept for the whole run
    # on the client's disk (body_cache "run": Tutor 1, Tutor 2 and Distill C read and add to it), or
    # Tutor 2's only, waiting for this round's Distill C, whose first batches are Tutor 2's (not when
    # the server re-distils: nothing would read them).
    cache = root is not None and run.body_cache == "run"
    shared_t1 = _tutor(msg, context, ws, config, TUTOR1) if TUTOR1 in arrays else None  # the server's
    body_key = body_fingerprint(tutor if tutor is not None else shared_t1) if root else ""
    memo = open_body_cache(root, method, partition, body_key) if cache else None
    if shared_t1 is not None:
        tutor1, seconds_t1 = shared_t1, {f"{SECONDS}.rd_tutor1": 0.0, f"{CPU_SECONDS}.rd_tutor1": 0.0}
    else:
        tutor1, report = reverse_distill_tutor1(tutor, edge, _dataset(ws, partition, "presumed"), settings, seed,
                                                body_memo=memo)
        seconds_t1 = phase_seconds("rd_tutor1", report)
    if memo is None and root and run.redistill == "client":
        memo = BodyMemo(body_key)
    tutor2, report = reverse_distill_tutor2(tutor if tutor is not None else tutor1, tutor1, edge,
                                            _dataset(ws, partition, "train"), settings, seed, body_memo=memo)
    if cache:
        save_body_outputs(root, method, partition, memo)
    elif memo is not None:
        save_body_memo(root, method, partition, memo)
    body = body_metrics("rd", memo)
    delta = client_delta(tutor1, tutor2, settings)
    dp = {}
    if is_on(run.dp_clip, run.dp_noise):  # local DP (protocol.privacy; off: the delta untouched).
        # Before top-k: the error-feedback residual below then holds parts of *noised* deltas (post-processing).
        delta, dp = privatise(delta, run.dp_clip, run.dp_noise, noise_generator(seed))
        dp_key = f"{config[METHOD]}.dp"  # this client's releases so far: its privacy budget
        earlier = context.state.config_records.get(dp_key)
        count = 1 + (int(earlier["participations"]) if earlier is not None else 0)
        context.state[dp_key] = ConfigRecord({"participations": count})
        dp[DP_PARTICIPATIONS] = count
        if run.dp_noise > 0:
            dp[DP_EPSILON] = epsilon_spent(run.dp_noise, count, run.dp_delta)
    sparse = run.delta_topk < 1
    if sparse:  # error feedback: what last round's top-k left out is added to this round's delta
        key = f"{config[METHOD]}.residual"
        if key in context.state.array_records:
            residual = context.state.array_records[key].to_torch_state_dict()
            delta = {name: value + residual[name] for name, value in delta.items()}
        delta, residual = top_k(delta, run.delta_topk)
        context.state[key] = state_record(residual)
    metrics.update({**_identity(ws, partition), **encode(TRAINED, dict.fromkeys(ws.clients[partition].train_classes, 1)),
                    **seconds_t1, **phase_seconds("rd_tutor2", report), PEAK_RSS: peak_rss_mb(),
                    **loss_metrics("rd_tutor2", report), **body, **dp})
    return _reply(msg, metrics, {DELTA: pack_delta(delta, run.delta_precision, sparse=sparse)})


def _train_direct(msg: Message, context: Context) -> Message:
    config, run, ws, partition, seed = _common(msg, context)
    edge = _model(ws, "edge", msg.content.array_records[ARRAYS])
    deployed = context.state.config_records.get(_deployed_key(config))
    if not run.evaluates_before(int(config.get(SERVER_ROUND, 0))):
        metrics = {}
    elif deployed is not None and int(config.get(SERVER_ROUND, 0)) > 1:
        # fedavg_ft: the client's own fine-tuned edge of its last round is deployed, not the received one
        metrics = _evaluation_metrics(deployed, BEFORE, "evaluate_before", 0.0)
    else:  # round 1: the manufacturer's edge
        metrics = _evaluate(edge, ws, partition, BEFORE, "evaluate_before", context, config)
    settings = run.client_training()
    if run.direct_lr > 0:
        settings = replace(settings, lr=run.direct_lr)
    own = tuple(CLASS_INDEX[c] for c in ws.clients[partition].train_classes) if config.get(OWN_CLASSES) else None
    trained, report = direct_training(edge, _dataset(ws, partition, "train"), run.direct_iters, settings,
                                      seed, proximal_mu=float(config.get("proximal-mu", 0.0)), trained_classes=own)
    metrics.update({**_identity(ws, partition), **phase_seconds("direct_training", report),
                    PEAK_RSS: peak_rss_mb(), **loss_metrics("direct_training", report)})
    return _reply(msg, metrics, {ARRAYS: state_record(trained)})


@app.train("distill")
@_handler
def distill(msg: Message, context: Context) -> Message:
    config, run, ws, partition, seed = _common(msg, context)
    edge = deployed = _edge(msg, context, ws, config)
    spec = ws.clients[partition]
    others: list[int] = []  # with spread: the classes this client neither trains nor dropped (other clients')
    if SPREAD_EDGE in msg.content.array_records:  # spread: Distill C starts from the server's edge, ...
        spread = _model(ws, "edge", msg.content.array_records[SPREAD_EDGE])
        # ... but the classes this client dropped score as its own edge scores them: released stays released;
        # with --spread-own-rows own its new classes too, once its edge holds what its Distill C taught it
        own_rows = (*spec.dropped, *(spec.private if run.spread_own_rows == "own" and _redistilled(context, config)
                                     else ()))
        edge = with_class_rows(spread, edge, [CLASS_INDEX[c] for c in own_rows])
        others = [i for c, i in CLASS_INDEX.items() if c not in (*spec.train_classes, *spec.dropped)]
    tutor = _tutor(msg, context, ws, config, TUTOR)
    root, method = node_state_dir(config, context.node_config), str(config[METHOD])
    cache = root is not None and run.body_cache == "run"  # distill.body_memo; clients.store
    if cache:
        memo = open_body_cache(root, method, partition, body_fingerprint(tutor))
    else:
        memo = take_body_memo(root, method, partition) if root else None
    kept = tuple(CLASS_INDEX[c] for c in spec.kept)  # soft targets, when switched on ...
    if run.spread_scores == "others":  # ... and the others' classes: the tower under their rows should keep
        kept += tuple(others)          # reading them on images that show none of them
    settings = run.client_training()
    settings = replace(settings, redistill_lr=distill_c_lr(settings.redistill_lr or settings.lr,
                                                           int(config.get(SERVER_ROUND, 0)), run.redistill_lr_schedule))
    new_edge, report = distill_c(edge, tutor, _dataset(ws, partition, "train"), settings, seed,
                                 body_memo=memo, kept_classes=kept)
    if cache:
        save_body_outputs(root, method, partition, memo)
    from_server = others if run.spread_rows == "server" else []
    if from_server:  # the others' classes score as the server's edge scores them: Distill C, on images that
        # hold none of them, would push their scores under the detection threshold
        new_edge = with_class_rows(new_edge, spread, from_server)
    if run.edge_share < 1:  # keep part of the deployed edge: damps the edge's swing from round to round,
        # but not on the classes this client changes: its own new classes (their scores would be halved each
        # round) and the classes it dropped (the deployed edge's rows would bring them back); both measured
        changed = [CLASS_INDEX[c] for c in (*spec.private, *spec.dropped)] + from_server  # and the server's
        # with --spread-average server, the partner is the edge Distill C started from (the server's spread
        # edge, the client's own rows of the classes it dropped): the tower stays nearer the one the server's
        # rows of other clients' classes were distilled on
        partner = edge if run.spread_average == "server" else deployed
        new_edge.load_state_dict(interpolate_weights(partner.state_dict(), new_edge.state_dict(), run.edge_share,
                                                     new_rows=changed))
    metrics = {**_identity(ws, partition), **phase_seconds("distill_c", report), PEAK_RSS: peak_rss_mb(),
               **loss_metrics("distill_c", report), **body_metrics("distill_c", memo)}
    if run.edge_check == "on":  # the manufacturer checks the new edge first ("evaluate" with its verdict)
        context.state[_candidate_key(config)] = state_record(new_edge)
        return _reply(msg, metrics, {EDGE: context.state[_candidate_key(config)]})
    _store_edge(context, config, state_record(new_edge))
    metrics.update(_evaluate_after(new_edge, ws, partition, context, config))
    return _reply(msg, metrics)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """The client's stable identity (its partition id): the server samples clients by it, so that a
    seed names the same clients in every run (Flower's node ids change from run to run)."""
    return _reply(msg, {PARTITION_ID: int(context.node_config["partition-id"])})


@app.evaluate()
@_handler
def evaluate(msg: Message, context: Context) -> Message:
    config, run, ws, partition, seed = _common(msg, context)
    extra = {}
    if ARRAYS in msg.content.array_records:  # the FedAvg family: the global edge
        edge = _model(ws, "edge", msg.content.array_records[ARRAYS])
    else:
        if DEPLOY_EDGE in config:  # DiReDi's edge check: deploy the re-distilled edge, or keep the earlier one
            _deploy(context, config)
        edge = _edge(msg, context, ws, config)
    if config.get(FINE_TUNE):  # fedavg_ft: the client deploys the global edge fine-tuned on its own data
        edge, report = fine_tune(edge, _dataset(ws, partition, "train"), run.client_training(), seed)
        extra = {**phase_seconds("fine_tune", report), **loss_metrics("fine_tune", report)}
    metrics = _evaluate_after(edge, ws, partition, context, config)
    if config.get(FINE_TUNE) and metrics:  # the fine-tuned edge's evaluation, the next round's "before"
        evaluated = context.state.config_records[f"{config[METHOD]}.evaluated"]
        context.state[_deployed_key(config)] = ConfigRecord(dict(evaluated))
    elif config.get(FINE_TUNE):  # not evaluated: no figures of the deployed edge to carry over
        context.state.config_records.pop(_deployed_key(config), None)
    metrics.update({**_identity(ws, partition), **extra, PEAK_RSS: peak_rss_mb()})
    return _reply(msg, metrics)
