"""The DiReDi server strategy on Flower's Message API, and the wire format shared with the clients.

One round (``DiReDiStrategy.start``):

1. ``configure_train`` -> "train" to every sampled node: the tutor's full weights (or, with
   ``share_tutor1``, Tutor 1 computed once on the server from public presumed data), the edge
   weights (only to nodes that do not hold their own edge yet) and the run settings;
2. clients run dual-tutor reverse distillation and reply the neck/head delta + metrics;
3. ``aggregate_train``: each delta is verified (structure, norm, candidate tutor per class on the
   manufacturer's validation set, protected classes), accepted deltas are merged
   (``strategies.aggregate``) and the tutor moves by beta * merged delta (eq. 10);
4. re-distillation (Distill C) from the updated tutor: ``redistill="client"`` sends "train.distill"
   (each client distils its own edge on its own data and keeps it); ``redistill="server"`` distils
   one edge on the server from public presumed data and sends it out with "evaluate";
5. one record per client: AP of its edge on its test shard before the round and after Distill C,
   bytes, seconds per phase, memory, and the verification verdict.

Why ``start`` is overridden: Flower's loop has one client step per phase (train, then evaluate),
and the array ``aggregate_train`` returns becomes the next global model. DiReDi has two client
steps per round (RD, then Distill C) and two server models (tutor and edge). Overriding ``start``
keeps ``aggregate_train`` a pure "verify and merge" hook (testable with hand-made replies, no grid)
and makes the second round trip an explicit step instead of a side effect hidden in a hook.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from clients.rd import RDSettings, distill_c, reverse_distill_tutor1
from models.parts import load_neck_head, neck_head, substitute
from strategies.aggregate import AGGREGATION_METHODS, aggregate
from strategies.verify import Decision, VerificationPolicy, protected_check, safe_norm, structural_check

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Wire format (shared by the strategies and sim/client_app.py)
# ---------------------------------------------------------------------------------------------

TRAIN = MessageType.TRAIN
DISTILL = f"{MessageType.TRAIN}.distill"
EVALUATE = MessageType.EVALUATE

CONFIG, METRICS = "config", "metrics"  # record names in every message
EDGE, TUTOR, TUTOR1, DELTA = "edge", "tutor", "tutor1", "delta"  # DiReDi array records
ARRAYS = "arrays"  # the FedAvg / FedProx global model (Flower's default key)

# MetricRecord takes numbers only, so per-class AP travels as "<prefix>.<class>" keys.
AP_BEFORE, AP_AFTER = "ap-before", "ap-after"
SECONDS = "seconds"  # "seconds.<phase>"
LOSSES = "losses"  # "losses.<phase>.<det|distill|ratio>": each phase's balance at its end
AFTER = "after"  # "after.<precision|recall|f1|mAP>" of the evaluation that gives ap-after
PARTITION_ID, NUM_EXAMPLES, PEAK_RSS = "partition-id", "num-examples", "peak-rss-mb"


def encode(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}.{name}": float(v) for name, v in values.items()}


def decode(metrics: Mapping[str, Any], prefix: str) -> dict[str, float]:
    start = prefix + "."
    return {key[len(start):]: float(v) for key, v in metrics.items() if key.startswith(start)}


def content_bytes(content: RecordDict) -> int:
    """Payload size of a message: array bytes (numpy serialised) + metric and config values + keys."""
    total = 0
    for name, record in content.items():
        total += len(name) + record.count_bytes()
    return total


def client_seed(seed: int, server_round: int, partition: int) -> int:
    """Seed of one client's work in one round (the RD functions add small offsets: keep a gap)."""
    return seed + 100_000 * server_round + 10 * partition


def per_class_ap(model: nn.Module, dataset, class_names: Iterable[str], batch_size: int = 16) -> tuple[dict[str, float], dict[str, float]]:
    """AP per class name of ``model`` on ``dataset``, and {precision, recall, f1, mAP}."""
    from sim.evaluate import evaluate_model
    from sim.voc import CLASS_INDEX

    names = list(class_names)
    result = evaluate_model(model, dataset, [CLASS_INDEX[c] for c in names], batch_size=batch_size)
    ap = {name: float(result.ap[CLASS_INDEX[name]]) for name in names}
    summary = {"precision": result.precision, "recall": result.recall, "f1": result.f1, "mAP": result.mAP}
    return ap, {k: float(v) for k, v in summary.items()}


def state_record(model_or_state: nn.Module | Mapping[str, Tensor]) -> ArrayRecord:
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def client_record(method: str, server_round: int, train_metrics: Mapping[str, Any],
                  after_metrics: Mapping[str, Any] | None, **fields) -> dict:
    """One per-round per-client record (the format sim/metrics.py reads) from the reply metrics."""
    after_metrics = after_metrics or {}
    seconds = decode(train_metrics, SECONDS) | decode(after_metrics, SECONDS)
    peak = max(float(train_metrics.get(PEAK_RSS, math.nan)), float(after_metrics.get(PEAK_RSS, math.nan)))
    return {
        "method": method,
        "round": server_round,
        "client": int(train_metrics[PARTITION_ID]),
        "ap_before": decode(train_metrics, AP_BEFORE),
        "ap_after": decode(after_metrics, AP_AFTER),
        "after": decode(after_metrics, AFTER),
        "seconds": seconds,
        "losses": decode(train_metrics, LOSSES) | decode(after_metrics, LOSSES),
        "peak_rss_mb": peak,
        "num_examples": int(train_metrics.get(NUM_EXAMPLES, 0)),
        **fields,
    }


def split_replies(replies: Iterable[Message], step: str, server_round: int,
                  failures: list[dict]) -> list[Message]:
    """Replies that carry content; errors are logged and appended to ``failures``."""
    ok = []
    for reply in replies:
        if reply.has_error():
            failure = {"round": server_round, "step": step, "node": reply.metadata.src_node_id,
                       "reason": reply.error.reason}
            log.error("round %d %s: node %d failed: %s", server_round, step, failure["node"], failure["reason"])
            failures.append(failure)
        else:
            ok.append(reply)
    return sorted(ok, key=lambda m: int(m.content[METRICS][PARTITION_ID]))  # a fixed order: same sums


def all_nodes(grid: Grid, wanted: int, fraction: float = 1.0, wait_s: float = 120.0) -> list[int]:
    """Samples ``fraction`` of the connected nodes (Python's ``random``, seeded by the server app),
    after waiting until ``wanted`` nodes are connected."""
    deadline = time.monotonic() + wait_s
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {wanted} nodes connected after {wait_s:.0f} s")
        time.sleep(0.5)
    count = max(1, int(round(fraction * len(nodes))))
    return sorted(random.sample(nodes, count))


# ---------------------------------------------------------------------------------------------
# The strategy
# ---------------------------------------------------------------------------------------------


class DiReDiStrategy(Strategy):
    """Holds the tutor and the edge; verifies, merges and re-distils (see the module docstring).

    Args:
        tutor, edge: the manufacturer's models (changed in place as rounds go).
        validation_data, validation_classes: the manufacturer's validation set and the classes it
            is evaluated on (never a client's data).
        settings: RD / Distill C settings (beta of eq. 10, iterations for the server-side phases).
        policy: verification policy (default: no norm bound, no protected classes).
        presumed_data: the manufacturer's public presumed data; needed by ``share_tutor1`` and
            ``redistill="server"``.
        aggregation, aggregation_options: "weighted" | "trimmed" | "ties" and their options.
        weighted_by_key: the reply metric giving each client's aggregation weight.
        redistill: "client" (each client distils its own edge on its data) or "server".
        min_nodes: nodes to wait for before sampling; fraction_train: share of nodes sampled.
        on_record(record), on_decision(decision): progress callbacks.
        validate_fn(model) -> {class: AP}: overrides the validation-set evaluation (tests).
    """

    method = "diredi"

    def __init__(self, tutor: nn.Module, edge: nn.Module, validation_data, validation_classes: Iterable[str],
                 settings: RDSettings, policy: VerificationPolicy | None = None, *, presumed_data=None,
                 share_tutor1: bool = False, aggregation: str = "weighted",
                 aggregation_options: Mapping[str, Any] | None = None, weighted_by_key: str = NUM_EXAMPLES,
                 redistill: str = "client", min_nodes: int = 1, fraction_train: float = 1.0, seed: int = 0,
                 on_record: Callable[[dict], None] | None = None,
                 on_decision: Callable[[Decision], None] | None = None,
                 validate_fn: Callable[[nn.Module], Mapping[str, float]] | None = None) -> None:
        if aggregation not in AGGREGATION_METHODS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATION_METHODS)}")
        if redistill not in ("client", "server"):
            raise ValueError(f"redistill must be 'client' or 'server', got {redistill!r}")
        if (share_tutor1 or redistill == "server") and presumed_data is None:
            raise ValueError("share_tutor1 and redistill='server' need the manufacturer's presumed_data")
        self.tutor, self.edge = tutor.eval(), edge.eval()
        self.validation_data, self.validation_classes = validation_data, list(validation_classes)
        self.settings = settings
        self.policy = policy or VerificationPolicy()
        self.presumed_data = presumed_data
        self.share_tutor1, self.redistill = share_tutor1, redistill
        self.aggregation, self.aggregation_options = aggregation, dict(aggregation_options or {})
        self.weighted_by_key = weighted_by_key
        self.min_nodes, self.fraction_train, self.seed = min_nodes, fraction_train, seed
        self.on_record, self.on_decision = on_record, on_decision
        self._validate = validate_fn or (lambda model: per_class_ap(model, validation_data, self.validation_classes)[0])

        self.records: list[dict] = []
        self.verification_log: list[Decision] = []
        self.failures: list[dict] = []  # client errors, by round and step
        self.tutor_history: list[dict] = []  # the tutor's validation AP: round 0 = original, then after each round
        self.round_seconds: dict[int, float] = {}  # wall time of each whole round (both round trips)
        self._tutor_ap: dict[str, float] | None = None  # cache for the current tutor
        self._nodes_with_edge: set[int] = set()  # nodes that keep their own edge (client re-distillation)
        self._round: dict[str, Any] = {}  # per-round bookkeeping, reset by configure_train

    # -- Flower hooks ---------------------------------------------------------------------------

    def summary(self) -> None:
        log.info("DiReDi: aggregation %s %s, redistill on the %s, shared tutor 1 %s, beta %s, policy %s",
                 self.aggregation, self.aggregation_options, self.redistill, self.share_tutor1,
                 self.settings.beta, self.policy)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """"train" to each sampled node. ``arrays`` is unused: the strategy holds its models."""
        nodes = all_nodes(grid, self.min_nodes, self.fraction_train)
        self._round = {"nodes": nodes, "bytes_down": {}, "bytes_up": {}, "server_seconds": {},
                       "pending": {}, "accepted": 0}
        cfg = ConfigRecord({**dict(config), "method": "diredi", "server-round": server_round,
                            "redistill": self.redistill, "edge-source": "stored" if self.redistill == "client" else "received"})
        arrays_out = {}
        if self.share_tutor1:
            start = time.perf_counter()
            tutor1, _ = reverse_distill_tutor1(self.tutor, self.edge, self.presumed_data, self.settings,
                                               seed=client_seed(self.seed, server_round, 9_999))
            # One Tutor 1 serves every client: its cost is shared among them in the records.
            self._round["server_seconds"]["server_tutor1"] = (time.perf_counter() - start) / len(nodes)
            arrays_out[TUTOR1] = state_record(tutor1)
            if not self.settings.t2_from_t1:  # tutor 2 then starts from the tutor itself
                arrays_out[TUTOR] = state_record(self.tutor)
        else:
            arrays_out[TUTOR] = state_record(self.tutor)
        edge_record = state_record(self.edge)
        messages = []
        for node in nodes:
            content = RecordDict({CONFIG: cfg, **arrays_out})
            if self.redistill == "server" or node not in self._nodes_with_edge:
                content[EDGE] = edge_record
            self._round["bytes_down"][node] = content_bytes(content)
            messages.append(Message(content=content, message_type=TRAIN, dst_node_id=node))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Verifies every delta, merges the accepted ones and updates the tutor (eq. 10).

        Returns the tutor's full weights and {received, accepted, rejected}; the tutor is unchanged
        (and None is returned for the arrays) when no delta is accepted.
        """
        self._round.setdefault("pending", {})
        self._round.setdefault("bytes_up", {})
        self._round.setdefault("server_seconds", {})
        ok = split_replies(replies, "train", server_round, self.failures)
        if not self.tutor_history:
            self.tutor_history.append(self._tutor_summary(0))
        accepted_deltas, weights = [], []
        for reply in ok:
            metrics = reply.content[METRICS]
            node = reply.metadata.src_node_id
            start = time.perf_counter()
            delta = self._read_delta(reply)
            decision = self.verify(delta, int(metrics[PARTITION_ID]), server_round,
                                   weight=float(metrics.get(self.weighted_by_key, math.nan)))
            seconds = time.perf_counter() - start
            self._log_decision(decision)
            if decision.accepted:
                accepted_deltas.append(delta)
                weights.append(decision.weight)
            self._round["bytes_up"][node] = content_bytes(reply.content)
            self._round["pending"][node] = {"train": dict(metrics), "decision": decision,
                                            "server_verify": seconds}
        self._round["accepted"] = len(accepted_deltas)
        summary = MetricRecord({"received": len(ok), "accepted": len(accepted_deltas),
                                "rejected": len(ok) - len(accepted_deltas)})
        if not accepted_deltas:
            log.warning("round %d: no delta accepted; the tutor is unchanged", server_round)
            return None, summary
        merged = aggregate(accepted_deltas, weights, self.aggregation, **self.aggregation_options)
        load_neck_head(self.tutor, substitute(neck_head(self.tutor), merged, self.settings.beta))
        self._tutor_ap = None
        self.tutor_history.append(self._tutor_summary(server_round))
        return state_record(self.tutor), summary

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """"evaluate" with the server's edge to this round's participants (server re-distillation)."""
        nodes = list(self._round.get("pending") or all_nodes(grid, self.min_nodes))
        cfg = ConfigRecord({**dict(config), "method": "diredi", "server-round": server_round,
                            "edge-source": "received"})
        content = RecordDict({CONFIG: cfg, EDGE: state_record(self.edge)})
        size = content_bytes(content)
        for node in nodes:
            self._round.setdefault("bytes_down", {})[node] = self._round["bytes_down"].get(node, 0) + size
        return [Message(content=content, message_type=EVALUATE, dst_node_id=node) for node in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Stores each client's evaluation of the re-distilled edge (ap-after)."""
        return self._collect_after(server_round, replies, "evaluate")

    # -- the second client step: Distill C ---------------------------------------------------

    def configure_distill(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """"train.distill" with the updated tutor to this round's participants."""
        cfg = ConfigRecord({**dict(config), "method": "diredi", "server-round": server_round,
                            "edge-source": "stored"})
        content = RecordDict({CONFIG: cfg, TUTOR: state_record(self.tutor)})
        size = content_bytes(content)
        messages = []
        for node in self._round["pending"]:
            self._round["bytes_down"][node] = self._round["bytes_down"].get(node, 0) + size
            messages.append(Message(content=content, message_type=DISTILL, dst_node_id=node))
        return messages

    def aggregate_distill(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._collect_after(server_round, replies, "distill")

    def redistill_edges(self, server_round: int, grid: Grid, config: ConfigRecord, timeout: float) -> None:
        """Distill C from the updated tutor, on the clients or on the server (see the class doc).

        Skipped when no delta was accepted: the tutor holds nothing new, so every edge stays as
        it was (its ap_after is its ap_before).
        """
        if not self._round["pending"]:
            return
        if self.redistill == "client":  # every node that answered "train" now keeps an edge of its own
            self._nodes_with_edge.update(self._round["pending"])
        if self._round["accepted"] == 0:
            for entry in self._round["pending"].values():
                entry["after"] = {**encode(AP_AFTER, decode(entry["train"], AP_BEFORE)),
                                  **encode(AFTER, decode(entry["train"], "before"))}
                entry["redistilled"] = False
            return
        if self.redistill == "client":
            replies = grid.send_and_receive(self.configure_distill(server_round, config), timeout=timeout)
            self.aggregate_distill(server_round, replies)
        else:
            start = time.perf_counter()
            self.edge, _ = distill_c(self.edge, self.tutor, self.presumed_data, self.settings,
                                     seed=client_seed(self.seed, server_round, 9_999))
            self.edge.eval()
            self._round["server_seconds"]["server_distill_c"] = (
                (time.perf_counter() - start) / len(self._round["pending"]))
            messages = self.configure_evaluate(server_round, ArrayRecord(), config, grid)
            self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))
        for entry in self._round["pending"].values():
            entry.setdefault("redistilled", "after" in entry)

    # -- the round loop -----------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 1,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Runs ``num_rounds`` DiReDi rounds. ``initial_arrays`` is ignored (the strategy holds the
        tutor and edge); ``train_config`` holds the run settings every client needs; ``timeout``
        bounds each round trip (RD, then Distill C)."""
        self.summary()
        config = train_config if train_config is not None else ConfigRecord()
        result = Result(arrays=state_record(self.tutor))
        for server_round in range(1, num_rounds + 1):
            log.info("DiReDi round %d/%d", server_round, num_rounds)
            round_start = time.perf_counter()
            messages = self.configure_train(server_round, result.arrays, config, grid)
            replies = list(grid.send_and_receive(messages, timeout=timeout))
            arrays, summary = self.aggregate_train(server_round, replies)
            if not self._round["pending"]:
                reasons = "; ".join(f["reason"] for f in self.failures if f["round"] == server_round)
                raise RuntimeError(f"round {server_round}: no client returned a delta "
                                   f"({len(replies)} replies of {len(messages)}): {reasons or 'timed out'}")
            if arrays is not None:
                result.arrays = arrays
            result.train_metrics_clientapp[server_round] = summary
            self.redistill_edges(server_round, grid, config, timeout)
            self.round_seconds[server_round] = time.perf_counter() - round_start
            self._finish_round(server_round)
        return result

    # -- verification -------------------------------------------------------------------------

    def verify(self, delta: Mapping[str, Tensor] | None, client: int, server_round: int,
               weight: float = 1.0) -> Decision:
        """Structure and norm first; then the candidate tutor's per-class validation AP."""
        if delta is None:
            return Decision(client, server_round, False, "the reply holds no delta array record", weight=weight)
        norm = safe_norm(delta)
        ok, reason = structural_check(delta, neck_head(self.tutor), self.policy.norm_bound)
        if ok and not (math.isfinite(weight) and weight >= 0):
            ok, reason = False, f"invalid aggregation weight {weight!r}"
        if not ok:
            return Decision(client, server_round, False, reason, norm=norm, weight=weight)
        before = self.tutor_validation_ap()
        candidate = load_neck_head(copy.deepcopy(self.tutor), substitute(neck_head(self.tutor), delta, self.settings.beta))
        after = dict(self._validate(candidate))
        ok, reason, figures = protected_check(before, after, self.policy)
        return Decision(client, server_round, ok, reason, norm=norm, ap_before=figures["ap_before"],
                        ap_after=figures["ap_after"], val_map_before=_nanmean(before.values()),
                        val_map_after=_nanmean(after.values()), weight=weight)

    def tutor_validation_ap(self) -> dict[str, float]:
        """Per-class validation AP of the current tutor (evaluated once per tutor version)."""
        if self._tutor_ap is None:
            self._tutor_ap = dict(self._validate(self.tutor))
        return self._tutor_ap

    # -- helpers ------------------------------------------------------------------------------

    def _tutor_summary(self, server_round: int) -> dict:
        ap = self.tutor_validation_ap()
        return {"round": server_round, "ap": dict(ap), "mAP": _nanmean(ap.values())}

    @staticmethod
    def _read_delta(reply: Message) -> dict[str, Tensor] | None:
        if DELTA not in reply.content.array_records:
            return None
        return dict(reply.content.array_records[DELTA].to_torch_state_dict())

    def _log_decision(self, decision: Decision) -> None:
        self.verification_log.append(decision)
        log.log(logging.INFO if decision.accepted else logging.WARNING,
                "round %d client %d: %s (%s), norm %.4g", decision.round, decision.client,
                "accepted" if decision.accepted else "REJECTED", decision.reason, decision.norm)
        if self.on_decision is not None:
            self.on_decision(decision)

    def _collect_after(self, server_round: int, replies: Iterable[Message], step: str) -> MetricRecord | None:
        ok = split_replies(replies, step, server_round, self.failures)
        for reply in ok:
            node = reply.metadata.src_node_id
            entry = self._round["pending"].get(node)
            if entry is None:
                continue
            entry["after"] = dict(reply.content[METRICS])
            self._round["bytes_up"][node] = self._round["bytes_up"].get(node, 0) + content_bytes(reply.content)
        return MetricRecord({"replies": len(ok)})

    def _finish_round(self, server_round: int) -> None:
        for node, entry in sorted(self._round["pending"].items(), key=lambda kv: int(kv[1]["train"][PARTITION_ID])):
            decision: Decision = entry["decision"]
            record = client_record(
                self.method, server_round, entry["train"], entry.get("after"),
                bytes_up=self._round["bytes_up"].get(node, 0), bytes_down=self._round["bytes_down"].get(node, 0),
                accepted=decision.accepted, reason=decision.reason, delta_norm=decision.norm,
                redistilled=bool(entry.get("redistilled", False)))
            record["seconds"].update(self._round["server_seconds"])
            record["seconds"]["server_verify"] = entry["server_verify"]
            self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)


def _nanmean(values: Iterable[float]) -> float:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else math.nan
