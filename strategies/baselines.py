"""Flower's own FedAvg and FedProx, recording each client's numbers for the report.

The global model is the full edge; clients train it directly on their labels (``sim/client_app.py``,
method "direct"). Flower averages the reply metrics; these subclasses additionally keep, per
round and client, the AP of the global edge on the client's test shard before the round (from the
train reply) and after aggregation (from the evaluate reply), bytes each way and seconds per phase,
in the same record format as ``DiReDiStrategy.records``. Aggregation itself is Flower's, untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from strategies.diredi import METRICS, PARTITION_ID, client_record, content_bytes, split_replies


class RecordingMixin:
    """Hooks around a Flower strategy's four round methods; the strategy's own logic runs unchanged."""

    method = "direct"

    def _init_records(self, on_record: Callable[[dict], None] | None) -> None:
        self.on_record = on_record
        self.records: list[dict] = []
        self.failures: list[dict] = []
        self._round: dict = {}
        self.round_seconds: dict[int, float] = {}  # configure_train to the end of aggregate_evaluate

    def _count_down(self, messages: Iterable[Message]) -> list[Message]:
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self._round["bytes_down"][node] = self._round["bytes_down"].get(node, 0) + content_bytes(m.content)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round = {"bytes_down": {}, "bytes_up": {}, "train": {}, "evaluate": {}, "start": time.perf_counter()}
        return self._count_down(super().configure_train(server_round, arrays, config, grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = split_replies(replies, "train", server_round, self.failures)
        if replies and not ok:
            raise RuntimeError(f"round {server_round}: every client failed: "
                               + "; ".join(f["reason"] for f in self.failures if f["round"] == server_round))
        for reply in ok:
            node = reply.metadata.src_node_id
            self._round["train"][node] = dict(reply.content[METRICS])
            self._round["bytes_up"][node] = content_bytes(reply.content)
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._count_down(super().configure_evaluate(server_round, arrays, config, grid))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for reply in split_replies(replies, "evaluate", server_round, self.failures):
            node = reply.metadata.src_node_id
            self._round["evaluate"][node] = dict(reply.content[METRICS])
            self._round["bytes_up"][node] = self._round["bytes_up"].get(node, 0) + content_bytes(reply.content)
        trained = sorted(self._round["train"].items(), key=lambda kv: int(kv[1][PARTITION_ID]))
        for node, train_metrics in trained:
            record = client_record(self.method, server_round, train_metrics, self._round["evaluate"].get(node),
                                   bytes_up=self._round["bytes_up"].get(node, 0),
                                   bytes_down=self._round["bytes_down"].get(node, 0), accepted=None)
            self.records.append(record)
            if self.on_record is not None:
                self.on_record(record)
        metrics = super().aggregate_evaluate(server_round, replies)
        self.round_seconds[server_round] = time.perf_counter() - self._round["start"]
        return metrics


class RecordingFedAvg(RecordingMixin, FedAvg):
    method = "fedavg"

    def __init__(self, *args, on_record: Callable[[dict], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_records(on_record)


class RecordingFedProx(RecordingMixin, FedProx):
    method = "fedprox"

    def __init__(self, *args, on_record: Callable[[dict], None] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_records(on_record)
