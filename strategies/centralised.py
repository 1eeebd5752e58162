"""The two methods without a federation: local training and the centralised oracle.

* ``run_local``: each client trains its own edge on its own data; no server, no exchange (the
  paper's "Training" rows).
* ``run_oracle``: an upper bound: one edge trained centrally on the union of every client's data,
  with the federation's total step budget (clients x steps per round), evaluated on every client.

Both take as many steps per round as a DiReDi client (``RunConfig.direct_iters``), use the same
seeds (``protocol.wire.work_seed``) and emit records through the same ``Recorder``.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.utils.data import ConcatDataset

from data.workspace import Workspace
from distill.rd import RDSettings, direct_training
from evaluation.ap import per_class_ap
from protocol.wire import SERVER, make_record, work_seed
from strategies.ledger import Recorder


def _evaluated_record(method: str, server_round: int, client: int, trained: nn.Module, workspace: Workspace,
                      ap_before: dict[str, float], seconds: dict[str, float], peak_rss_mb: float) -> dict:
    ap_after, after = per_class_ap(trained, workspace.client_test(client), workspace.eval_classes())
    return make_record(method, server_round, client, ap_before=ap_before, ap_after=ap_after, after=after,
                       seconds=seconds, peak_rss_mb=peak_rss_mb, num_examples=len(workspace.client_train(client)))


def _ap(model: nn.Module, workspace: Workspace, client: int) -> dict[str, float]:
    return per_class_ap(model, workspace.client_test(client), workspace.eval_classes())[0]


def run_local(workspace: Workspace, edge: nn.Module, rounds: int, steps: int, settings: RDSettings,
              seed: int, recorder: Recorder) -> None:
    for client in range(len(workspace.clients)):
        model, ap_before = copy.deepcopy(edge), _ap(edge, workspace, client)
        for r in range(1, rounds + 1):
            model, report = direct_training(model, workspace.client_train(client), steps, settings,
                                            seed=work_seed(seed, r, client))
            record = _evaluated_record("local", r, client, model, workspace, ap_before,
                                       {"direct training": report.seconds}, report.peak_rss_mb)
            ap_before = record["ap_after"]
            recorder.emit(record)


def run_oracle(workspace: Workspace, edge: nn.Module, rounds: int, steps: int, settings: RDSettings,
               seed: int, recorder: Recorder) -> None:
    n = len(workspace.clients)
    union = ConcatDataset([workspace.client_train(i) for i in range(n)])
    model = copy.deepcopy(edge)
    before = {client: _ap(edge, workspace, client) for client in range(n)}
    for r in range(1, rounds + 1):
        model, report = direct_training(model, union, steps * n, settings, seed=work_seed(seed, r, SERVER))
        for client in range(n):
            record = _evaluated_record("oracle", r, client, model, workspace, before[client],
                                       {"central training": report.seconds / n}, report.peak_rss_mb)
            before[client] = record["ap_after"]
            recorder.emit(record)
