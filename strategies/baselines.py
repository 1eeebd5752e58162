"""Flower's own FedAvg and FedProx, recording each client's numbers for the report.

The global model is the full edge; clients train it directly on their labels (``clients/app.py``,
work "direct"). These subclasses wrap Flower's four round hooks to fill a ``RoundLedger`` (bytes
each way, the train reply's metrics with the AP of the global edge before the round, the evaluate
reply's AP of the aggregated edge) and close it through the same ``Recorder`` as DiReDi.
Aggregation itself is Flower's, untouched.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from protocol.wire import DIRECT_WORK, METHOD, METRICS, WORK
from strategies.ledger import ClientSampler, Recorder, RoundLedger


class RecordingMixin:
    """Hooks around a Flower strategy's round methods; the strategy's own logic runs unchanged."""

    method = "direct"

    def _init_recorder(self, recorder: Recorder | None, sampler: ClientSampler | None) -> None:
        self.recorder = recorder or Recorder(self.method)
        self.sampler = sampler
        self.ledger: RoundLedger | None = None

    def _tag(self, config: ConfigRecord) -> ConfigRecord:
        return ConfigRecord({**dict(config), METHOD: self.method, WORK: DIRECT_WORK})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.ledger = RoundLedger(server_round)
        if self.sampler is not None:  # the seeded sample: Flower's own sampling then takes all of it
            grid = _OnlyNodes(grid, self.sampler.nodes(grid, server_round))
        return self.ledger.count_down(super().configure_train(server_round, arrays, self._tag(config), grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = self.recorder.split(replies, "train", server_round)
        if replies and not ok:
            raise RuntimeError(f"round {server_round}: every client failed: {self.recorder.failure_reasons(server_round)}")
        for reply in ok:
            self.ledger.count_up(reply).train = dict(reply.content[METRICS])
        return super().aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The aggregated edge to the nodes that trained this round (with client sampling, the
        same clients whose "before" the train step measured)."""
        trained = {entry.node for entry in self.ledger.trained}
        messages = super().configure_evaluate(server_round, arrays, self._tag(config), grid)
        return self.ledger.count_down(m for m in messages if m.metadata.dst_node_id in trained)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for reply in self.recorder.split(replies, "evaluate", server_round):
            self.ledger.count_up(reply).after = dict(reply.content[METRICS])
        metrics = super().aggregate_evaluate(server_round, replies)
        self.recorder.close_round(self.ledger)
        return metrics


class _OnlyNodes:
    """A grid that shows only ``nodes`` (this round's sample) and passes everything else through."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class RecordingFedAvg(RecordingMixin, FedAvg):
    method = "fedavg"

    def __init__(self, *args, recorder: Recorder | None = None, sampler: ClientSampler | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_recorder(recorder, sampler)


class RecordingFedProx(RecordingMixin, FedProx):
    method = "fedprox"

    def __init__(self, *args, recorder: Recorder | None = None, sampler: ClientSampler | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_recorder(recorder, sampler)
