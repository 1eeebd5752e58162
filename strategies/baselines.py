"""Flower's own FedAvg, FedProx, FedAvgM and FedAdam, recording each client's numbers for the report.

The global model is the full edge; clients train it directly on their labels (``clients/app.py``,
work "direct"). These subclasses wrap Flower's four round hooks to fill a ``RoundLedger`` (bytes
each way, the train reply's metrics with the AP of the global edge before the round, the evaluate
reply's AP of the aggregated edge) and close it through the same ``Recorder`` as DiReDi.
Aggregation itself is Flower's, untouched; replies reach it in partition order, so the float sums
do not depend on which client answered first.

Two more methods are a ``RecordingFedAvg`` under another name whose messages carry a switch for the
clients (``protocol.wire``): fedavg_ls (``OWN_CLASSES``: each client trains only its own classes'
scores) and fedavg_ft (``FINE_TUNE``: each client fine-tunes the global edge before evaluating it).
FedAvgM and FedAdam step the model's parameters only (``ParameterStep``).

Resume, as DiReDi's: ``restore(tensors, meta)`` then ``start(..., start_round=k)``. Flower's
``Strategy.start`` always counts rounds from 1, so a resumed strategy runs Flower's loop for the
remaining rounds from the checkpointed global model with ``round_offset`` = the rounds already done,
and every hook adds the offset, so clients, records and seeds see the true round numbers.
FedAvgM's momentum and FedAdam's moments are checkpointed with the global model and restored
(``restore_server_state``), so a resumed run steps as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from torch import Tensor

from protocol.wire import DIRECT_WORK, METHOD, METRICS, WORK
from report.checkpoint import prefixed, unprefixed
from strategies.ledger import ClientSampler, Recorder, RoundLedger


class RecordingMixin:
    """Hooks around a Flower strategy's round methods; the strategy's own logic runs unchanged."""

    method = "direct"

    def _init_recorder(self, recorder: Recorder | None, sampler: ClientSampler | None, method: str | None = None,
                       client_config: Mapping[str, int | float] | None = None) -> None:
        if method is not None:
            self.method = method
        self.client_config = dict(client_config or {})  # added to every message's config (clients' switches)
        self.recorder = recorder or Recorder(self.method)
        self.sampler = sampler
        self.ledger: RoundLedger | None = None
        self.round_offset = 0  # rounds done before this start (a resumed run)
        self.checkpoint_fn: Callable[[int, dict[str, Tensor], dict], Any] | None = None  # called after each round
        self._arrays: ArrayRecord | None = None  # the global model after this round's aggregation
        self._restored: ArrayRecord | None = None  # a checkpoint's global model, until ``start``

    def _tag(self, config: ConfigRecord) -> ConfigRecord:
        return ConfigRecord({**dict(config), METHOD: self.method, WORK: DIRECT_WORK, **self.client_config})

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
        self.recorder.fail_unanswered(self.ledger, replies, "train")
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
        """The global model after the round and the server optimiser's state (``report.checkpoint``)."""
        state = {k: torch.from_numpy(np.array(v)) for k, v in self.server_state().items()}
        return {**prefixed("global", self._arrays.to_torch_state_dict()), **prefixed("server", state)}, {}

    def server_state(self) -> dict[str, np.ndarray]:
        """The server optimiser's state after the round (FedAvg and FedProx have none)."""
        return {}

    def restore(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Back to a ``checkpoint``: the next ``start`` begins from its global model and optimiser state."""
        self._restored = self.restored_arrays(tensors)
        self.restore_server_state(tensors)

    @staticmethod
    def restored_arrays(tensors: Mapping[str, Tensor]) -> ArrayRecord:
        """The global model a checkpoint holds, to start the remaining rounds from."""
        return ArrayRecord(unprefixed("global", tensors))

    def restore_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        """The server optimiser's state a checkpoint holds (FedAvg and FedProx have none)."""

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, start_round: int = 1) -> Result:
        """Flower's loop for rounds ``start_round`` .. ``num_rounds``, as ``DiReDiStrategy.start``: after a
        ``restore`` from the checkpoint's global model (``initial_arrays`` then ignored). Flower counts its
        rounds from 1, so the rounds already done become ``round_offset``, which every hook adds."""
        initial_arrays = self.begin(start_round, initial_arrays)
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds - self.round_offset,
                             timeout=timeout, train_config=train_config, evaluate_config=evaluate_config,
                             evaluate_fn=evaluate_fn)

    def begin(self, start_round: int, initial_arrays: ArrayRecord | None) -> ArrayRecord:
        """What ``start`` does before Flower's loop: the rounds already done become ``round_offset``, and
        the global model is the restored checkpoint's if there is one, else ``initial_arrays``."""
        self.round_offset = start_round - 1
        if self._restored is not None:
            initial_arrays, self._restored = self._restored, None
        if initial_arrays is None:
            raise ValueError("no global model: give initial_arrays or restore a checkpoint first")
        return initial_arrays

    def final_models(self, result: Result) -> dict[str, dict[str, Tensor]]:
        """The models a finished run keeps (``strategies.server_app.MethodResult``): the global edge."""
        return {"edge_state": result.arrays.to_torch_state_dict()}


class _OnlyNodes:
    """A grid that shows only ``nodes`` (this round's sample) and passes everything else through."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid, self._nodes = grid, list(nodes)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class _View:
    """A reply whose content shows only ``keys`` of its arrays (and all its metrics); errors pass unchanged."""

    def __init__(self, reply: Message, keys: Iterable[str]) -> None:
        self._reply = reply
        if not reply.has_error():
            self.content = RecordDict({name: ArrayRecord({k: record[k] for k in keys if k in record})
                                       if isinstance(record, ArrayRecord) else record
                                       for name, record in reply.content.items()})

    def __getattr__(self, name: str):
        return getattr(self._reply, name)


class ParameterStep:
    """FedAvgM's / FedAdam's server step on the model's parameters; its BatchNorm buffers averaged as FedAvg does.

    The edge's state dict holds BatchNorm buffers besides its parameters: running_mean / running_var
    (float32) and num_batches_tracked (int64). Flower's server optimisers step every array they get,
    which breaks the statistics: FedAvgM's momentum carries them past the clients' values (clients that
    each re-estimate a running_var at ``target`` end round 2 at ``target - 0.9 x (start - target)``,
    negative once the clients' variance is under about half the manufacturer's: NaN in every later
    forward pass; ``tests/test_baselines.py`` shows it), and FedAdam moves each by about eta per round
    whatever the clients measured (a variance going from 1 to 0.3 would take hundreds of rounds at eta 1e-3).

    So the strategy's step sees the parameters only (``parameter_keys``: the edge's ``named_parameters``)
    and the new global model's buffers are FedAvg's weighted average of the clients' (Flower's
    ``aggregate_arrayrecords``, which averages num_batches_tracked into float64 as FedAvg leaves it; the
    clients load it back into int64). Flower's step is otherwise untouched: this class sits between
    ``RecordingMixin`` and the Flower strategy in the bases, shows the strategy each reply with its
    parameters only (``_View``) and trims the model the strategy keeps as its current one
    (``current_arrays``: FedOpt's every round, FedAvgM's first) to the parameters, in ``parameter_keys``
    order (FedAvgM pairs arrays by position). FedAdam's step comes out in float64 (its bias-corrected
    rate is a numpy float64); it is cast back to the clients' dtype, so the global model travels as
    FedAvg's does.

    The subclasses' ``server_state`` / ``restore_server_state`` give the optimiser's state (FedAvgM's
    momentum, FedAdam's first and second moments) to the checkpoint after every round and take it back
    on resume, so a resumed run steps as an uninterrupted one.
    """

    def _init_parameters(self, parameter_keys: Iterable[str]) -> None:
        self.parameter_keys = tuple(parameter_keys)
        if not self.parameter_keys:
            raise ValueError(f"{type(self).__name__} needs the model's parameter names (parameter_keys)")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round, arrays, config, grid)  # the whole edge to the clients
        current, keys = self.current_arrays, self.parameter_keys  # what the strategy has just taken as its model
        if isinstance(current, ArrayRecord):
            self.current_arrays = ArrayRecord({k: current[k] for k in keys})
        elif current is not None:
            self.current_arrays = {k: current[k] for k in keys}
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        stepped, metrics = super().aggregate_train(server_round, [_View(r, self.parameter_keys) for r in replies])
        if stepped is None or not ok:
            return stepped, metrics
        sent = ok[0].content[self.arrayrecord_key]
        buffers = [k for k in sent.keys() if k not in stepped]
        averaged = aggregate_arrayrecords([_View(r, buffers).content for r in ok], self.weighted_by_key)
        arrays = {}
        for key in sent.keys():  # the clients' order
            if key in stepped:
                value = stepped[key].numpy()
                arrays[key] = Array(np.asarray(value, dtype=np.dtype(sent[key].dtype)))
            else:
                arrays[key] = averaged[key]
        return ArrayRecord(arrays), metrics


class RecordingFedAvg(RecordingMixin, FedAvg):
    """Flower's FedAvg; also fedavg_ls and fedavg_ft under their ``method`` name, with the clients'
    switch in ``client_config`` (``strategies.server_app.make_strategy``)."""

    method = "fedavg"

    def __init__(self, *args, recorder: Recorder | None = None, sampler: ClientSampler | None = None,
                 method: str | None = None, client_config: Mapping[str, int | float] | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_recorder(recorder, sampler, method, client_config)


class RecordingFedProx(RecordingMixin, FedProx):
    method = "fedprox"

    def __init__(self, *args, recorder: Recorder | None = None, sampler: ClientSampler | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_recorder(recorder, sampler)


class _RecordingParameterStep(RecordingMixin, ParameterStep):
    """The constructor FedAvgM's and FedAdam's recording subclasses share (Flower's strategy comes next)."""

    def __init__(self, *args, parameter_keys: Iterable[str] = (), recorder: Recorder | None = None,
                 sampler: ClientSampler | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_recorder(recorder, sampler)
        self._init_parameters(parameter_keys)


class RecordingFedAvgM(_RecordingParameterStep, FedAvgM):
    """Flower's FedAvgM (server momentum) on the parameters; buffers as FedAvg (``ParameterStep``).
    Its momentum (one array per parameter) is checkpointed as "server.momentum.<name>"."""

    method = "fedavgm"

    def server_state(self) -> dict[str, np.ndarray]:
        if self.momentum_vector is None:
            return {}
        return {f"momentum.{k}": v for k, v in zip(self.parameter_keys, self.momentum_vector, strict=True)}

    def restore_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        state = unprefixed("server.momentum", tensors)
        if state:
            self.momentum_vector = [state[k].numpy() for k in self.parameter_keys]


class RecordingFedAdam(_RecordingParameterStep, FedAdam):
    """Flower's FedAdam on the parameters; buffers as FedAvg (``ParameterStep``). Its first and second
    moments are checkpointed as "server.m.<name>" and "server.v.<name>"."""

    method = "fedadam"

    def server_state(self) -> dict[str, np.ndarray]:
        return {**{f"m.{k}": v for k, v in (self.m_t or {}).items()},
                **{f"v.{k}": v for k, v in (self.v_t or {}).items()}}

    def restore_server_state(self, tensors: Mapping[str, Tensor]) -> None:
        m, v = unprefixed("server.m", tensors), unprefixed("server.v", tensors)
        if m and v:
            self.m_t = {k: m[k].numpy() for k in self.parameter_keys}
            self.v_t = {k: v[k].numpy() for k in self.parameter_keys}
