"""The two methods without a federation: local training and the centralised oracle.

* ``local_client``: each client trains its own edge on its own data; no server, no exchange (the
  paper's "Training" rows).
* ``run_oracle``: an upper bound: one edge trained centrally on the union of every client's data,
  with the federation's total step budget (clients x steps per round), evaluated on every client.

Both take as many steps per round as a DiReDi client (``RunConfig.diredi_client_steps``, whatever
the federated baselines' ``direct_iters``), use the same
seeds (``protocol.wire.work_seed``) and emit records through the same ``Recorder``.

``run_centralised`` runs their independent pieces (one job per local client, one for the oracle)
in one process per core, each on one torch thread, the way Ray runs client actors: on 2 cores
that is faster than one process on 2 threads, and every job gives the same numbers whatever the
number of cores (each always computes on one thread).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from torch import nn
from torch.utils.data import ConcatDataset

from session.workspace import Workspace, workspace_of
from distill.rd import ClientTraining, direct_training
from evaluation.ap import MODEL_SCORE_THRESH, per_class_ap
from distill.trainer import PhaseReport, resolve_device
from models.compute import computing, placed_on
from protocol.config import RunConfig, evaluation_round
from protocol.wire import SERVER, make_record, work_seed
from strategies.ledger import Recorder

CENTRALISED = ("local", "oracle")


Evaluation = tuple[dict[str, float], dict[str, float]]  # per_class_ap's (AP per class, summary)


NOT_EVALUATED: Evaluation = ({}, {})


def _evaluated_record(method: str, server_round: int, client: int, trained: nn.Module, workspace: Workspace,
                      before: Evaluation, phase: str, report: PhaseReport, share: int, threshold: float,
                      evaluate: bool = True) -> dict:
    """The round's record, its training ``phase`` timed by ``report`` (wall and CPU seconds, 1 / ``share`` of
    them: the oracle's one model serves every client); without ``evaluate`` (a round between evaluations) it
    has no AP."""
    ap_after, after = _evaluate(trained, workspace, client, threshold) if evaluate else NOT_EVALUATED
    return make_record(method, server_round, client, ap_before=before[0], ap_after=ap_after, after=after,
                       before=before[1], seconds={phase: report.seconds / share},
                       cpu_seconds={phase: report.cpu_seconds / share}, peak_rss_mb=report.peak_rss_mb,
                       num_examples=len(workspace.client_train(client)))


def _evaluate(model: nn.Module, workspace: Workspace, client: int, threshold: float) -> Evaluation:
    return per_class_ap(model, workspace.client_test(client), workspace.eval_classes(), score_thresh=threshold)


def local_client(workspace: Workspace, edge: nn.Module, client: int, rounds: int, steps: int,
                 settings: ClientTraining, seed: int, recorder: Recorder, threshold: float = MODEL_SCORE_THRESH,
                 eval_every: int = 1) -> None:
    """One client's local training, round after round, from the manufacturer's edge; eq. 11's figures at
    ``threshold``, after every ``eval_every``-th round and the last (``protocol.config.evaluation_round``)."""
    model, before = copy.deepcopy(edge), _evaluate(edge, workspace, client, threshold)
    for r in range(1, rounds + 1):
        model, report = direct_training(model, workspace.client_train(client), steps, settings,
                                        seed=work_seed(seed, r, client))
        record = _evaluated_record("local", r, client, model, workspace, before, "direct training", report, 1,
                                   threshold, evaluation_round(r, rounds, eval_every))
        before = record["ap_after"], record["after"]
        recorder.emit(record)


def run_oracle(workspace: Workspace, edge: nn.Module, rounds: int, steps: int, settings: ClientTraining,
               seed: int, recorder: Recorder, threshold: float = MODEL_SCORE_THRESH, eval_every: int = 1) -> None:
    n = len(workspace.clients)
    union = ConcatDataset([workspace.client_train(i) for i in range(n)])
    model = copy.deepcopy(edge)
    before = {client: _evaluate(edge, workspace, client, threshold) for client in range(n)}
    for r in range(1, rounds + 1):
        model, report = direct_training(model, union, steps * n, settings, seed=work_seed(seed, r, SERVER))
        for client in range(n):
            record = _evaluated_record("oracle", r, client, model, workspace, before[client], "central training",
                                       report, n, threshold, evaluation_round(r, rounds, eval_every))
            before[client] = record["ap_after"], record["after"]
            recorder.emit(record)


# -- one process per core ----------------------------------------------------------------------


def _job(config: RunConfig, method: str, client: int | None) -> list[dict]:
    """One piece of work in a worker process: a local client's rounds, or the whole oracle."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(config.training_seed)
    workspace = workspace_of(config)
    edge = workspace.chain(progress=False).edge.cpu()
    recorder = Recorder(method)
    args = (config.rounds, config.diredi_client_steps, config.client_training(), config.training_seed, recorder)
    with computing(config.compute()), placed_on(resolve_device(config.device)):
        if method == "local":
            local_client(workspace, edge, client, *args, threshold=config.operating_threshold,
                         eval_every=config.eval_every)
        else:
            run_oracle(workspace, edge, *args, threshold=config.operating_threshold, eval_every=config.eval_every)
    return recorder.records


def run_centralised(config: RunConfig, recorders: Mapping[str, Recorder], num_clients: int,
                    on_done: Callable[[str], None] | None = None, workers: int | None = None) -> None:
    """Runs the methods of ``recorders`` (a subset of ``CENTRALISED``) in worker processes and emits
    their records in a fixed order (local by client, then oracle); ``on_done(method)`` follows a
    method's last record."""
    jobs = [("oracle", None)] if "oracle" in recorders else []  # the longest job first
    jobs += [("local", c) for c in range(num_clients)] if "local" in recorders else []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(_job, config, *job) for job in jobs}
        for method in (m for m in CENTRALISED if m in recorders):
            for job in (j for j in jobs if j[0] == method):
                for record in futures[job].result():
                    recorders[method].emit(record)
            if on_done is not None:
                on_done(method)
