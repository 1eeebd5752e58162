"""What every strategy writes down per round, and the one path by which records leave it.

A ``RoundLedger`` is opened when a round is configured and holds, per node, the bytes each way,
the reply metrics, DiReDi's verdict and the server's seconds. When the round ends,
``Recorder.close_round`` turns each node's line into one record (``protocol.wire.make_record``
format) and hands it to the run's ``on_record``. DiReDi, FedAvg and FedProx all record this way;
local and oracle (no clients, no messages) call ``Recorder.emit`` with records they build.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from protocol.wire import (CONFIG, METRICS, PARTITION_ID, QUERY, SERVER, WHERE, content_bytes, record_from_metrics,
                           work_seed)
from strategies.verify import Decision

log = logging.getLogger(__name__)


@dataclass
class Clock:
    """Wall and CPU seconds since it was made. Wall time grows with whatever else shares the machine;
    this process's CPU seconds (all its threads) measure the work itself."""

    wall0: float = field(default_factory=time.perf_counter)
    cpu0: float = field(default_factory=time.process_time)

    def seconds(self) -> tuple[float, float]:
        """(wall, cpu) seconds so far."""
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


@dataclass
class NodeRound:
    """One node's part in one round."""

    node: int
    bytes_down: int = 0
    bytes_up: int = 0
    train: dict | None = None  # the "train" reply's metrics
    after: dict | None = None  # the metrics of the step that evaluated its final edge
    decision: Decision | None = None  # DiReDi's verification of its delta
    verify_seconds: float = 0.0
    verify_cpu_seconds: float = 0.0
    redistilled: bool = False  # DiReDi: its edge was re-distilled from an updated tutor
    where: dict | None = None  # the machine (and Ray node) its replies came from (``clients.app.where``)


@dataclass
class RoundLedger:
    server_round: int
    started: float = field(default_factory=time.perf_counter)
    nodes: dict[int, NodeRound] = field(default_factory=dict)  # by Flower node id (records name clients by partition)
    server_seconds: dict[str, float] = field(default_factory=dict)  # server work, per client's share
    server_cpu_seconds: dict[str, float] = field(default_factory=dict)  # the same in CPU seconds

    def charge(self, phase: str, clock: Clock, shares: int) -> None:
        """Books the server work ``clock`` timed as ``phase``, each of ``shares`` clients carrying an equal
        share (wall and CPU)."""
        wall, cpu = clock.seconds()
        self.server_seconds[phase], self.server_cpu_seconds[phase] = wall / shares, cpu / shares

    def node(self, node: int) -> NodeRound:
        return self.nodes.setdefault(node, NodeRound(node))

    def count_down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for m in messages:
            self.node(m.metadata.dst_node_id).bytes_down += content_bytes(m.content)
        return messages

    def count_up(self, reply: Message) -> NodeRound:
        entry = self.node(reply.metadata.src_node_id)
        entry.bytes_up += content_bytes(reply.content)
        if WHERE in reply.content.config_records:
            entry.where = dict(reply.content.config_records[WHERE])
        return entry

    def unanswered(self, replies: Iterable[Message]) -> list[int]:
        """The nodes this round's messages went to (``count_down``) that sent none of ``replies`` (an error
        reply is an answer): past the round trip's timeout."""
        answered = {reply.metadata.src_node_id for reply in replies}
        return sorted(node for node, entry in self.nodes.items() if entry.bytes_down and node not in answered)

    @property
    def trained(self) -> list[NodeRound]:
        """Nodes whose "train" reply arrived, in partition order (a fixed order: same sums, same records)."""
        return sorted((c for c in self.nodes.values() if c.train is not None),
                      key=lambda c: int(c.train[PARTITION_ID]))


class Recorder:
    """A method's records, client failures, verification decisions and timings."""

    def __init__(self, method: str, on_record: Callable[[dict], None] | None = None,
                 on_decision: Callable[[Decision], None] | None = None,
                 on_failure: Callable[[dict], None] | None = None) -> None:
        self.method = method
        self.on_record, self.on_decision, self.on_failure = on_record, on_decision, on_failure
        self.records: list[dict] = []
        self.failures: list[dict] = []  # {round, step, node, reason}
        self.decisions: list[Decision] = []
        self.round_seconds: dict[int, float] = {}
        self.tutor_history: list[dict] = []  # DiReDi: the tutor's validation AP, round 0 = original

    def split(self, replies: Iterable[Message], step: str, server_round: int) -> list[Message]:
        """Replies that carry content, in partition order; errors are logged as failures."""
        ok = []
        for reply in replies:
            if reply.has_error():
                self.fail(server_round, step, reply.metadata.src_node_id, reply.error.reason)
            else:
                ok.append(reply)
        return sorted(ok, key=lambda m: int(m.content[METRICS][PARTITION_ID]))

    def fail(self, server_round: int, step: str, node: int, reason: str) -> None:
        """Logs and keeps one client failure: an error reply, or no reply in time."""
        log.error("round %d %s: node %d failed: %s", server_round, step, node, reason)
        self.failures.append({"round": server_round, "step": step, "node": node, "reason": reason})
        if self.on_failure is not None:
            self.on_failure({"method": self.method, **self.failures[-1]})

    def fail_unanswered(self, ledger: RoundLedger, replies: Iterable[Message], step: str) -> None:
        """Logs and keeps a failure for every node of ``ledger`` that sent none of ``replies``: a client that
        did not answer in time is left out of the round, and the records say so."""
        for node in ledger.unanswered(replies):
            self.fail(ledger.server_round, step, node, "no reply within the round's timeout")

    def failure_reasons(self, server_round: int) -> str:
        return "; ".join(f["reason"] for f in self.failures if f["round"] == server_round)

    def decide(self, decision: Decision) -> None:
        self.decisions.append(decision)
        log.log(logging.INFO if decision.accepted else logging.WARNING,
                "round %d client %d: %s (%s), norm %.4g", decision.round, decision.client,
                "accepted" if decision.accepted else "REJECTED", decision.reason, decision.norm)
        if self.on_decision is not None:
            self.on_decision(decision)

    def emit(self, record: dict) -> None:
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)

    def close_round(self, ledger: RoundLedger) -> None:
        """One record per node that trained this round, each with the round's wall time."""
        self.round_seconds[ledger.server_round] = time.perf_counter() - ledger.started
        for entry in ledger.trained:
            fields = {"accepted": None}
            if entry.decision is not None:
                fields = {"accepted": entry.decision.accepted, "reason": entry.decision.reason,
                          "delta_norm": entry.decision.norm, "redistilled": entry.redistilled}
            record = record_from_metrics(self.method, ledger.server_round, entry.train, entry.after,
                                         bytes_up=entry.bytes_up, bytes_down=entry.bytes_down, **fields)
            record["seconds"].update(ledger.server_seconds)
            record["cpu_seconds"].update(ledger.server_cpu_seconds)
            if entry.decision is not None:
                record["seconds"]["server_verify"] = entry.verify_seconds
                record["cpu_seconds"]["server_verify"] = entry.verify_cpu_seconds
            record["round_wall_s"] = self.round_seconds[ledger.server_round]
            if entry.where is not None:
                record["where"] = entry.where
            self.emit(record)


def sample_count(num_nodes: int, fraction: float) -> int:
    """How many of ``num_nodes`` nodes take part in a round: ``fraction`` of them, at least one."""
    return max(1, int(round(fraction * num_nodes)))


class ClientSampler:
    """Seeded client sampling by the clients' stable identities (their partition ids).

    Flower's node ids are random in every run, so sampling node ids with a seeded generator would
    pick other clients each run. With ``fraction`` < 1 the sampler asks every node once for its
    identity ("query" message), then samples identities with ``random.Random(work_seed(seed,
    round, SERVER))``: a seed names the same clients in every run and for every method.
    """

    def __init__(self, num_nodes: int, fraction: float = 1.0, seed: int = 0, timeout: float = 600.0) -> None:
        self.num_nodes, self.fraction, self.seed, self.timeout = num_nodes, fraction, seed, timeout
        self.count = sample_count(num_nodes, fraction)
        self._identity: dict[int, int] = {}  # node id -> partition id

    def nodes(self, grid: Grid, server_round: int) -> list[int]:
        """This round's nodes, in partition order once identities are known."""
        everyone, _ = sample_nodes(grid, self.num_nodes, self.num_nodes)  # waits until all are connected
        if self.count >= len(everyone):
            return sorted(everyone)
        unknown = [node for node in everyone if node not in self._identity]
        if unknown:
            self._identify(grid, unknown)
        partitions = sorted(self._identity[node] for node in everyone)
        chosen = set(random.Random(work_seed(self.seed, server_round, SERVER)).sample(partitions, self.count))
        return sorted((node for node in everyone if self._identity[node] in chosen), key=self._identity.get)

    def identities(self, grid: Grid) -> dict[int, int]:
        """Node id -> partition id of every node (asking the nodes not identified yet)."""
        everyone, _ = sample_nodes(grid, self.num_nodes, self.num_nodes)
        unknown = [node for node in everyone if node not in self._identity]
        if unknown:
            self._identify(grid, unknown)
        return {node: self._identity[node] for node in everyone}

    def learn(self, node: int, partition: int) -> None:
        """A node's partition id as a reply reports it (the same map the "query" fills)."""
        self._identity[node] = partition

    def partition_of(self, node: int) -> int:
        """The partition id of a node that has answered (a reply or a "query")."""
        return self._identity[node]

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        messages = [Message(content=RecordDict({CONFIG: ConfigRecord({})}), message_type=QUERY, dst_node_id=node)
                    for node in nodes]
        for reply in grid.send_and_receive(messages, timeout=self.timeout):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id} did not say who it is: {reply.error.reason}")
            self._identity[reply.metadata.src_node_id] = int(reply.content[METRICS][PARTITION_ID])
        missing = [node for node in nodes if node not in self._identity]
        if missing:
            raise RuntimeError(f"{len(missing)} nodes did not answer the identity query within {self.timeout:.0f} s")
