"""The wire format both Flower apps speak: message types, record names, metric keys, the codecs
for per-class numbers, byte counting, the per-round record and the seeds of every party's work.

Neither ``clients/`` nor ``strategies/`` imports the other; both import this module.

A message's content is a RecordDict:

    "config"   ConfigRecord: the run configuration (``protocol.config.RunConfig.to_record``)
               + "method" (diredi | fedavg | fedprox | fedavgm | ...), "work" (diredi | direct),
               "server-round", "edge-source" (stored | received); FedProx adds Flower's "proximal-mu";
               fedavg_ls adds "own-classes", fedavg_ft "fine-tune" (below)
    "metrics"  MetricRecord (replies): numbers only, keys below
    "tutor" | "tutor1" | "edge" | "delta" | "arrays"   ArrayRecords: state dicts ("tutor" and
               "tutor1" in full only to a node that holds no tutor body yet, afterwards neck/head
               only; "delta" is the neck/head delta of eq. 9; "arrays" is Flower's default key
               for FedAvg/FedProx)

On the wire each ArrayRecord travels packed, one safetensors array per record
(``protocol.transport``); both apps read and write the records above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, MessageType, RecordDict
from torch import Tensor, nn

from models.parts import neck_head

# -- message types: two client steps per DiReDi round (RD, then Distill C), one evaluate step
TRAIN = MessageType.TRAIN
DISTILL = f"{MessageType.TRAIN}.distill"
EVALUATE = MessageType.EVALUATE
QUERY = MessageType.QUERY  # "who are you": a client answers its partition id (seeded client sampling)

# -- record names
CONFIG, METRICS = "config", "metrics"
WHERE = "where"  # a reply's ConfigRecord: the machine (and Ray node) the client ran on, its models' precision
EDGE, TUTOR, TUTOR1, DELTA = "edge", "tutor", "tutor1", "delta"
ARRAYS = "arrays"

# -- config keys a message adds to the run configuration
METHOD, WORK, SERVER_ROUND, EDGE_SOURCE = "method", "work", "server-round", "edge-source"
DIREDI_WORK, DIRECT_WORK = "diredi", "direct"  # WORK: what a "train" message asks of a client
STATE_DIR = "client-state-dir"  # where clients also keep their state on disk (resume; clients.store)
# Switches of the direct-training baselines (value 1), in both their train and evaluate messages:
OWN_CLASSES = "own-classes"  # fedavg_ls: train only the class scores of the classes the client's labels hold
FINE_TUNE = "fine-tune"  # fedavg_ft: fine-tune the received edge on the client's data, deploy and evaluate that
# DiReDi with the edge check: the manufacturer's verdict on a client's re-distilled edge (1: deploy it,
# 0: keep the edge deployed before), in the "evaluate" message that follows "train.distill"
DEPLOY_EDGE = "deploy-edge"
# DiReDi with spread: the server's edge distilled from the updated tutor, Distill C's start (array record)
SPREAD_EDGE = "spread-edge"

# -- metric keys. MetricRecord takes numbers only, so per-class values travel as "<prefix>.<class>".
AP_BEFORE, AP_AFTER = "ap-before", "ap-after"
BEFORE, AFTER = "before", "after"  # "<before|after>.<precision|recall|f1|mAP>" of the same evaluations
SECONDS = "seconds"  # "seconds.<phase>": wall time
CPU_SECONDS = "cpu_seconds"  # "cpu_seconds.<phase>": the process's CPU seconds, the work whatever the load
BODY = "body"  # "body.<phase>.served" / ".computed": the tutor body's inputs served by the memo or run
TRAINED = "trained"  # "trained.<class>" = 1: the classes a client's labels hold (class-aware merging)
LOSSES = "losses"  # "losses.<phase>.<det|distill|ratio>": each phase's balance at its end
# "edge-check.<deployed|ap-reference.<class>|ap-candidate.<class>|noise.<class>|tolerance.<class>|seconds>":
# the manufacturer's check of a re-distilled edge on its validation set (added by the server)
EDGE_CHECK = "edge-check"
PARTITION_ID, NUM_EXAMPLES, PEAK_RSS = "partition-id", "num-examples", "peak-rss-mb"


def encode(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}.{name}": float(v) for name, v in values.items()}


def decode(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    start = prefix + "."
    return {key[len(start):]: float(v) for key, v in metrics.items() if key.startswith(start)}


def content_bytes(content: RecordDict) -> int:
    """Payload size of a message: array bytes (numpy serialised) + metric and config values + keys;
    not ``WHERE``, the simulation's note of where a client ran (no client of the method sends it)."""
    return sum(len(name) + record.count_bytes() for name, record in content.items() if name != WHERE)


def state_record(model_or_state: nn.Module | Mapping[str, Tensor]) -> ArrayRecord:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


_LOW_PRECISION = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SPARSE_INDEX, SPARSE_VALUES = "@index", "@values"  # "<tensor>@index" / "<tensor>@values": a sparse tensor


class TutorRecords:
    """A tutor as it travels: its full weights to a node that does not hold the tutor's backbone body
    yet, only its neck/head to one that does (eq. 10 never changes the body). Each form is packed once."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._full: ArrayRecord | None = None
        self._neck_head: ArrayRecord | None = None

    def for_node(self, node: int, nodes_with_body: set[int]) -> ArrayRecord:
        if node in nodes_with_body:
            if self._neck_head is None:
                self._neck_head = state_record(neck_head(self.model))
            return self._neck_head
        if self._full is None:
            self._full = state_record(self.model)
        return self._full


class MalformedDelta(ValueError):
    """A received delta that cannot be read back into the tutor's neck/head tensors."""


def top_k(delta: Mapping[str, Tensor], keep: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Sparsification by magnitude: per tensor the ``keep`` share of entries with the largest
    magnitude (at least one); returns (what is sent, with zeros elsewhere; the residual). The
    client adds the residual to its next delta (error feedback), so nothing is lost for good."""
    sent, residual = {}, {}
    for name, value in delta.items():
        flat = value.detach().flatten()
        kept = torch.zeros_like(flat)
        index = flat.abs().topk(max(1, math.ceil(keep * flat.numel()))).indices
        kept[index] = flat[index]
        sent[name], residual[name] = kept.view_as(value), value - kept.view_as(value)
    return sent, residual


def pack_delta(delta: Mapping[str, Tensor], precision: str = "float32", sparse: bool = False) -> ArrayRecord:
    """A client's delta as it travels: float tensors in ``precision`` ("float16" halves the upload);
    with ``sparse``, each tensor as the flat indices (int32) and values of its non-zero entries."""
    dtype = _LOW_PRECISION.get(precision, torch.float32)
    out = {}
    for name, value in delta.items():
        value = value.to(dtype) if value.is_floating_point() else value
        if sparse:
            index = value.flatten().nonzero().flatten()
            out[name + SPARSE_INDEX], out[name + SPARSE_VALUES] = index.to(torch.int32), value.flatten()[index]
        else:
            out[name] = value
    return state_record(out)


def unpack_delta(record: ArrayRecord, shapes: Mapping[str, torch.Size] | None = None) -> dict[str, Tensor]:
    """A received delta for verification and merging: half-precision tensors widened to float32,
    sparse tensors scattered into zeros of the shape in ``shapes`` (the tutor's neck/head). Any
    other dtype is left as it came, for ``strategies.verify.structural_check`` to judge; a sparse
    pair that cannot be read raises ``MalformedDelta`` with the reason."""
    arrays = record.to_torch_state_dict()
    out = {}
    for key, value in arrays.items():
        if key.endswith(SPARSE_VALUES):
            continue
        if not key.endswith(SPARSE_INDEX):
            out[key] = value.float() if value.dtype in _LOW_PRECISION.values() else value
            continue
        name = key[:-len(SPARSE_INDEX)]
        values = arrays.get(name + SPARSE_VALUES)
        if values is None:
            raise MalformedDelta(f"{name}: indices without values")
        if shapes is None or name not in shapes:
            raise MalformedDelta(f"{name}: a sparse tensor that is not one of the tutor's neck/head")
        numel = math.prod(shapes[name])
        if value.dtype not in (torch.int32, torch.int64) or value.dim() != 1 or values.shape != value.shape:
            raise MalformedDelta(f"{name}: {tuple(value.shape)} {value.dtype} indices for {tuple(values.shape)} values")
        if len(value) and (int(value.min()) < 0 or int(value.max()) >= numel):
            raise MalformedDelta(f"{name}: indices outside 0..{numel - 1}")
        if not values.is_floating_point():
            raise MalformedDelta(f"{name}: values of dtype {values.dtype}")
        dense = torch.zeros(numel, dtype=torch.float32)
        dense[value.long()] = values.float()
        out[name] = dense.view(shapes[name])
    orphans = [k for k in arrays if k.endswith(SPARSE_VALUES) and k[:-len(SPARSE_VALUES)] + SPARSE_INDEX not in arrays]
    if orphans:
        raise MalformedDelta(f"{orphans[0]}: values without indices")
    return out


# -- seeds: one scheme for every party and round ---------------------------------------------------

SERVER = -1  # the "partition" of work the server does itself (shared Tutor 1, server-side Distill C)


def work_seed(seed: int, server_round: int, party: int) -> int:
    """Seed of one party's work in one round: ``party`` is a partition id, or ``SERVER``.

    The functions of ``distill.rd`` add an offset to it, one per data order, hence the gap of 10
    between parties:

    ====== =====================================================================
    offset phase
    ====== =====================================================================
    0      RD Tutor 1
    1      RD Tutor 2, and Distill C (Tutor 2's order: its body outputs are reused)
    2      unused (Distill C's own order before the cost issue)
    3      direct training (FedAvg family, local; the oracle on ``SERVER``)
    4      FedAvg+FT's fine-tuning
    5      spread's server-side distillation (on ``SERVER``)
    ====== =====================================================================
    """
    return seed + 100_000 * server_round + 10 * party


# -- the per-round, per-client record (what evaluation.metrics and the report read) -------------


def make_record(method: str, server_round: int, client: int, *, ap_before: Mapping[str, float],
                ap_after: Mapping[str, float], after: Mapping[str, float], seconds: Mapping[str, float],
                peak_rss_mb: float, losses: Mapping[str, float] | None = None, num_examples: int = 0,
                bytes_up: int = 0, bytes_down: int = 0, accepted: bool | None = None,
                cpu_seconds: Mapping[str, float] | None = None, **fields) -> dict:
    """One record. ``after``: {precision, recall, f1, mAP} of the evaluation that gave ``ap_after``, with
    each class's counts at the operating point ("tp.<class>", "fp.<class>", "npos.<class>"); ``before``
    (in ``fields``, when known): the same of the evaluation that gave ``ap_before``;
    ``accepted``: DiReDi's verdict on the client's delta (None for methods without one); ``seconds`` and
    ``cpu_seconds``: {phase: wall / CPU seconds} (CPU where the phase measured it)."""
    return {"method": method, "round": server_round, "client": client, "ap_before": dict(ap_before),
            "ap_after": dict(ap_after), "after": dict(after), "seconds": dict(seconds),
            "cpu_seconds": dict(cpu_seconds or {}),
            "losses": dict(losses or {}), "peak_rss_mb": peak_rss_mb, "num_examples": num_examples,
            "bytes_up": bytes_up, "bytes_down": bytes_down, "accepted": accepted, **fields}


def record_from_metrics(method: str, server_round: int, train_metrics: Mapping[str, Any],
                        after_metrics: Mapping[str, Any] | None, **fields) -> dict:
    """A record from a client's reply metrics: its "train" reply, and the reply of the step that
    evaluated its final edge ("train.distill" or "evaluate"; None when there was none). With
    differential privacy on, the record carries ``dp``: {epsilon, clip_factor, norm, participations}."""
    after_metrics = after_metrics or {}
    dp = decode(train_metrics, "dp")  # differential privacy's figures (protocol.privacy), when it is on
    if dp:
        fields["dp"] = dp
    body = decode(train_metrics, BODY) | decode(after_metrics, BODY)  # distill.body_memo, with a state folder
    if body:
        fields["body_memo"] = {key: int(value) for key, value in body.items()}
    check = decode(after_metrics, EDGE_CHECK)  # the edge check, when it is on
    if check:
        fields["edge_check"] = check
    return make_record(
        method, server_round, int(train_metrics[PARTITION_ID]),
        ap_before=decode(train_metrics, AP_BEFORE), ap_after=decode(after_metrics, AP_AFTER),
        after=decode(after_metrics, AFTER), before=decode(train_metrics, BEFORE),
        seconds=decode(train_metrics, SECONDS) | decode(after_metrics, SECONDS),
        cpu_seconds=decode(train_metrics, CPU_SECONDS) | decode(after_metrics, CPU_SECONDS),
        losses=decode(train_metrics, LOSSES) | decode(after_metrics, LOSSES),
        peak_rss_mb=max((float(m[PEAK_RSS]) for m in (train_metrics, after_metrics)
                         if PEAK_RSS in m and math.isfinite(float(m[PEAK_RSS]))), default=math.nan),
        num_examples=int(train_metrics.get(NUM_EXAMPLES, 0)), **fields)
