"""Flower's own FedAvg and FedProx, recording each client's numbers for the report.

The global model is the full edge; clients train it directly on their labels (``clients/app.py``,
work "direct"). These subclasses wrap Flower's four round hooks to fill a ``RoundLedger`` (bytes
each way, the train reply's metrics with the AP of the global edge before the round, the evaluate
reply's AP of the aggregated edge) and close it through the same ``Recorder`` as DiReDi.
Aggregation itself is Flower's, untouched; replies reach it in partition order, so the float sums
do not depend on which client answered first.

Resume: Flower's ``Strategy.start`` always counts rounds from 1. A resumed strategy is started for
the remaining rounds from the checkpointed global model with ``round_offset`` = the rounds already
done, and every hook adds the offset, so clients, records and seeds see the true round numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

from torch import Tensor

from protocol.wire import DIRECT_WORK, METHOD, METRICS, WORK
from strategies.checkpoint import prefixed, unprefixed
from strategies.ledger import ClientSampler, Recorder, RoundLedger


class RecordingMixin:
    """Hooks around a Flower strategy's round methods; the strategy's own logic runs unchanged."""

    method = "direct"

    def _init_recorder(self, recorder: Recorder | None, sampler: ClientSampler | None) -> None:
        self.recorder = recorder or Recorder(self.method)
        self.sampler = sampler
        self.ledger: RoundLedger | None = None
        self.round_offset = 0  # rounds done before this start (a resumed run)
        self.checkpoint_fn: Callable[[int, dict[str, Tensor], dict], Any] | None = None  # called after each round
        self._arrays: ArrayRecord | None = None  # the global model after this round's aggregation

    def _tag(self, config: ConfigRecord) -> ConfigRecord:
        return ConfigRecord({**dict(config), METHOD: self.method, WORK: DIRECT_WORK})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.ledger, self._arrays = RoundLedger(server_round), arrays
        if self.sampler is not None:  # the seeded sample: Flower's own sampling then takes all of it
            grid = _OnlyNodes(grid, self.sampler.nodes(grid, server_round))
        return self.ledger.count_down(super().configure_train(server_round, arrays, self._tag(config), grid))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.round_offset
        replies = list(replies)
        ok = self.recorder.split(replies, "train", server_round)  # in partition order
        if replies and not ok:
            raise RuntimeError(f"round {server_round}: every client failed: {self.recorder.failure_reasons(server_round)}")
        for reply in ok:
            self.ledger.count_up(reply).train = dict(reply.content[METRICS])
        arrays, metrics = super().aggregate_train(server_round, ok + [r for r in replies if r.has_error()])
        if arrays is not None:
            self._arrays = arrays
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """The aggregated edge to the nodes that trained this round (with client sampling, the
        same clients whose "before" the train step measured)."""
        server_round += self.round_offset
        trained = {entry.node for entry in self.ledger.trained}
        messages = super().configure_evaluate(server_round, arrays, self._tag(config), grid)
        return self.ledger.count_down(m for m in messages if m.metadata.dst_node_id in trained)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        for reply in self.recorder.split(replies, "evaluate", server_round):
            self.ledger.count_up(reply).after = dict(reply.content[METRICS])
        metrics = super().aggregate_evaluate(server_round, replies)
        self.recorder.close_round(self.ledger)
        if self.checkpoint_fn is not None:
            self.checkpoint_fn(server_round, *self.checkpoint())
        return metrics

    def checkpoint(self) -> tuple[dict[str, Tensor], dict]:
        """The global model after the round (``strategies.checkpoint``)."""
        return prefixed("global", self._arrays.to_torch_state_dict()), {}

    @staticmethod
    def restored_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
        """The global model a checkpoint holds, to start the remaining rounds from."""
        return ArrayRecord(unprefixed("global", tensors))


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
