"""The Flower ClientApp: one customer of the manufacturer.

Handlers (message type -> work; the strategies' wire format is in ``strategies/diredi.py``):

* "train", method "diredi": AP of its edge on its test shard (ap-before); RD Tutor 1 (unless a
  shared Tutor 1 came in) and Tutor 2 on its own shards; replies ONLY the neck/head delta + metrics.
* "train", method "direct" (FedAvg / FedProx): ap-before of the received edge; trains it on its
  labels (with FedProx's proximal term when "proximal-mu" > 0); replies the edge + metrics.
* "train.distill": Distill C of its edge from the received (updated) tutor on its data; keeps the
  new edge in ``context.state``; replies metrics only (ap-after, seconds, memory).
* "evaluate": AP of an edge on its test shard (the received one, or its stored one for DiReDi).

The client rebuilds its data from the ConfigRecord (profile, scenario, number of clients, seed,
data source, cache folder) through ``sim.workspace.prepare``, memoised per process: data is
read-only, so sharing it between the partitions one Ray actor serves is safe; per-client state
lives only in ``context.state``. Replies hold weights and numbers, never images, boxes or labels.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path

import torch  # imported here so ArrayRecord's torch conversions work inside Ray actors: it checks sys.modules only
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from clients.rd import (RDSettings, client_delta, direct_training, distill_c, reverse_distill_tutor1,
                        reverse_distill_tutor2)
from models.ladder import build_model, get_profile
from sim.voc import CLASS_INDEX
from sim.workspace import Workspace, prepare
from strategies.diredi import (AFTER, AP_AFTER, AP_BEFORE, ARRAYS, CONFIG, DELTA, EDGE, METRICS, NUM_EXAMPLES,
                               LOSSES, PARTITION_ID, PEAK_RSS, SECONDS, TUTOR, TUTOR1, client_seed, encode,
                               per_class_ap, state_record)

app = ClientApp()


# -- data and settings, rebuilt from the config --------------------------------------------------


@functools.lru_cache(maxsize=4)
def _workspace(profile: str, scenario: str, num_clients: int, seed: int, data: str, voc_root: str,
               cache_dir: str) -> Workspace:
    return prepare(profile, scenario, num_clients=num_clients, seed=seed, data=data,
                   voc_root=voc_root or None, cache_dir=cache_dir)


def workspace_from_config(config: ConfigRecord) -> Workspace:
    return _workspace(str(config["profile"]), str(config["scenario"]), int(config["num-clients"]),
                      int(config["seed"]), str(config["data"]), str(config.get("voc-root", "")),
                      str(config["cache-dir"]))


def settings_from_config(config: ConfigRecord) -> RDSettings:
    return RDSettings(**json.loads(str(config["rd-settings"])))


_DATASETS: dict[tuple[int, int, str], object] = {}


def _dataset(workspace: Workspace, partition: int, kind: str):
    # Kept per process so decoded images stay cached across rounds (VOCDetection caches uint8);
    # workspaces are memoised, so their identity is a stable key.
    key = (id(workspace), partition, kind)
    if key not in _DATASETS:
        _DATASETS[key] = {"presumed": workspace.client_presumed, "train": workspace.client_train,
                          "test": workspace.client_test}[kind](partition)
    return _DATASETS[key]


def federation_classes(workspace: Workspace) -> list[str]:
    """Presumed classes + every client's private ones (VOC order): every client reports AP over
    this same key set (Flower's built-in aggregation needs identical metric keys across replies);
    a class outside the client's own test classes is NaN (no positives in its shard)."""
    names = set(workspace.scenario.presumed_classes) | {c for s in workspace.clients for c in s.private}
    return sorted(names, key=CLASS_INDEX.__getitem__)


def _set_threads() -> None:
    # Ray gives each actor OMP_NUM_THREADS = its CPU count (1): use exactly that, no oversubscription.
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20
    except OSError:
        return math.nan


def _model(workspace: Workspace, role: str, record: ArrayRecord) -> nn.Module:
    model = build_model(workspace.profile, role)
    model.load_state_dict(record.to_torch_state_dict())
    return model.eval()


def _evaluate(edge: nn.Module, workspace: Workspace, partition: int, ap_prefix: str, summary_prefix: str,
              phase: str) -> dict[str, float]:
    """ap-<when>.<class> over the federation's classes, <when>.<precision|recall|f1|mAP>, seconds."""
    start = time.perf_counter()
    own = workspace.eval_classes(partition)
    ap, summary = per_class_ap(edge, _dataset(workspace, partition, "test"), own)
    everything = {c: ap.get(c, math.nan) for c in federation_classes(workspace)}
    return {**encode(ap_prefix, everything), **encode(summary_prefix, summary),
            f"{SECONDS}.{phase}": time.perf_counter() - start}


def _reply(msg: Message, metrics: dict, arrays: dict[str, ArrayRecord] | None = None) -> Message:
    content = RecordDict({**(arrays or {}), METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _edge(msg: Message, context: Context, workspace: Workspace, config: ConfigRecord) -> nn.Module:
    """The client's edge: its stored one (DiReDi with client re-distillation) or the received one."""
    stored = config.get("edge-source") == "stored"
    if stored and EDGE in context.state.array_records:
        return _model(workspace, "edge", context.state.array_records[EDGE])
    if EDGE not in msg.content.array_records:
        raise ValueError("no edge model: none received and none stored on this client")
    if stored:  # first round: the manufacturer's edge becomes this client's own
        context.state[EDGE] = msg.content.array_records[EDGE]
    return _model(workspace, "edge", msg.content.array_records[EDGE])


def _common(msg: Message, context: Context):
    _set_threads()
    config = msg.content[CONFIG]
    workspace = workspace_from_config(config)
    partition = int(context.node_config["partition-id"])
    seed = client_seed(int(config["seed"]), int(config.get("server-round", 0)), partition)
    return config, workspace, partition, seed


# -- handlers --------------------------------------------------------------------------------------


@app.train()
def train(msg: Message, context: Context) -> Message:
    method = msg.content[CONFIG]["method"]
    if method == "diredi":
        return _train_diredi(msg, context)
    if method == "direct":
        return _train_direct(msg, context)
    raise ValueError(f"unknown method {method!r} in the train config; expected 'diredi' or 'direct'")


def _train_diredi(msg: Message, context: Context) -> Message:
    config, ws, partition, seed = _common(msg, context)
    settings = settings_from_config(config)
    edge = _edge(msg, context, ws, config)
    metrics = _evaluate(edge, ws, partition, AP_BEFORE, "before", "evaluate_before")
    arrays = msg.content.array_records
    tutor = _model(ws, "tutor", arrays[TUTOR]) if TUTOR in arrays else None
    peak = _rss_mb()
    if TUTOR1 in arrays:  # the server's shared Tutor 1
        tutor1, seconds_t1 = _model(ws, "tutor", arrays[TUTOR1]), 0.0
    else:
        tutor1, report = reverse_distill_tutor1(tutor, edge, _dataset(ws, partition, "presumed"), settings, seed)
        seconds_t1, peak = report.seconds, max(peak, report.peak_rss_mb)
    tutor2, report = reverse_distill_tutor2(tutor if tutor is not None else tutor1, tutor1, edge,
                                            _dataset(ws, partition, "train"), settings, seed)
    delta = client_delta(tutor1, tutor2, settings)
    metrics.update({PARTITION_ID: partition, NUM_EXAMPLES: len(_dataset(ws, partition, "train")),
                    f"{SECONDS}.rd_tutor1": seconds_t1, f"{SECONDS}.rd_tutor2": report.seconds,
                    PEAK_RSS: max(peak, report.peak_rss_mb, _rss_mb()), **loss_metrics("rd_tutor2", report)})
    return _reply(msg, metrics, {DELTA: state_record(delta)})


def _train_direct(msg: Message, context: Context) -> Message:
    config, ws, partition, seed = _common(msg, context)
    settings = settings_from_config(config)
    edge = _model(ws, "edge", msg.content.array_records[ARRAYS])
    metrics = _evaluate(edge, ws, partition, AP_BEFORE, "before", "evaluate_before")
    trained, report = direct_training(edge, _dataset(ws, partition, "train"), int(config["direct-iters"]),
                                      settings, seed, proximal_mu=float(config.get("proximal-mu", 0.0)))
    metrics.update({PARTITION_ID: partition, NUM_EXAMPLES: len(_dataset(ws, partition, "train")),
                    f"{SECONDS}.direct_training": report.seconds,
                    PEAK_RSS: max(report.peak_rss_mb, _rss_mb()), **loss_metrics("direct_training", report)})
    return _reply(msg, metrics, {ARRAYS: state_record(trained)})


def loss_metrics(phase: str, report) -> dict[str, float]:
    """A phase's detection loss, distillation term and their ratio at its end (finite values only)."""
    b = report.balance()
    values = {"det": b["det_loss_end"], "distill": b["distill_loss_end"], "ratio": b["loss_ratio_end"]}
    return {f"{LOSSES}.{phase}.{k}": float(v) for k, v in values.items() if math.isfinite(v)}


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    config, ws, partition, seed = _common(msg, context)
    settings = settings_from_config(config)
    edge = _edge(msg, context, ws, config)
    tutor = _model(ws, "tutor", msg.content.array_records[TUTOR])
    new_edge, report = distill_c(edge, tutor, _dataset(ws, partition, "train"), settings, seed)
    context.state[EDGE] = state_record(new_edge)
    metrics = _evaluate(new_edge, ws, partition, AP_AFTER, AFTER, "evaluate_after")
    metrics.update({PARTITION_ID: partition, NUM_EXAMPLES: len(_dataset(ws, partition, "train")),
                    f"{SECONDS}.distill_c": report.seconds, PEAK_RSS: max(report.peak_rss_mb, _rss_mb()),
                    **loss_metrics("distill_c", report)})
    return _reply(msg, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, ws, partition, _ = _common(msg, context)
    if config["method"] == "direct":
        edge = _model(ws, "edge", msg.content.array_records[ARRAYS])
    else:
        edge = _edge(msg, context, ws, config)
    metrics = _evaluate(edge, ws, partition, AP_AFTER, AFTER, "evaluate_after")
    metrics.update({PARTITION_ID: partition, NUM_EXAMPLES: len(_dataset(ws, partition, "test")),
                    PEAK_RSS: _rss_mb()})
    return _reply(msg, metrics)


def client_config(workspace: Workspace, settings: RDSettings, direct_iters: int | None = None) -> dict:
    """Everything a client needs to rebuild its data and settings, as ConfigRecord values."""
    if workspace.profile != get_profile(workspace.profile.name):
        raise ValueError(f"clients rebuild profiles by name: profile {workspace.profile.name!r} was modified")
    cache_dir = Path(workspace.cache_dir).resolve()
    config = {
        "profile": workspace.profile.name,
        "scenario": str(Path(workspace.scenario.source).resolve()),
        "num-clients": len(workspace.clients),
        "seed": int(workspace.seed),
        "data": workspace.data,
        "cache-dir": str(cache_dir),
        "rd-settings": json.dumps(settings.to_dict()),
        "direct-iters": int(direct_iters if direct_iters is not None else settings.redistill_iters),
    }
    if workspace.data == "voc":  # (no empty strings: Flower's ConfigRecord.count_bytes rejects them)
        config["voc-root"] = str(Path(workspace.data_root).resolve())
    return config
