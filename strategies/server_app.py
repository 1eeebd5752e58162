"""The server side of a run: every method on the same data, seeds and evaluation, into one run folder.

Two entry points, one path:

* ``python -m sim.run`` resolves the configuration, opens a ``Session`` (data, shards, the
  manufacturer's chain) and runs ``run_methods`` inside Flower's simulation (``sim.federation``);
* ``flwr run .`` loads ``app`` below (pyproject: serverapp = "strategies.server_app:app"); its
  ``main`` resolves the same configuration from ``context.run_config`` with the same function
  (``protocol.config.resolve_run_config``) and calls the same ``run_methods``.

``run_methods`` runs each method with ``run_method`` (a Flower strategy on the grid for diredi and
the FedAvg family; in-process for local and oracle), appends every record and verification
decision to the run folder as it arrives, and writes the report at the end.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import Tensor

from session.workspace import Session
from models.compute import computing, placed_on
from models.parts import neck_head
from protocol.config import FEDERATED, resolve_run_config
from protocol.wire import FINE_TUNE, OWN_CLASSES, STATE_DIR, state_record
from report.checkpoint import load_checkpoint, save_checkpoint
from evaluation.metrics import run_summary
from report.writer import SUMMARY, TUTOR_HISTORY, RunFolder, write_all
from strategies.baselines import RecordingFedAdam, RecordingFedAvg, RecordingFedAvgM, RecordingFedProx
from distill.trainer import peak_rss_mb
from strategies.centralised import CENTRALISED, run_centralised
from strategies.diredi import DiReDiStrategy
from strategies.exchange import packed_grid
from strategies.ledger import ClientSampler, Recorder, sample_count
from strategies.verify import VerificationPolicy

log = logging.getLogger(__name__)


@dataclass
class MethodResult:
    method: str
    recorder: Recorder  # records, verification decisions, failures, round seconds, tutor history
    seconds: float
    tutor_state: dict[str, Tensor] | None = None  # DiReDi's final tutor
    edge_state: dict[str, Tensor] | None = None  # the server's final edge (None when edges live on clients)

    @property
    def records(self) -> list[dict]:
        return self.recorder.records


def default_policy(session: Session) -> VerificationPolicy:
    """Protected and kept (= presumed) classes from the scenario; norm bound = norm_factor x the tutor's
    own neck/head norm; the direction check (direction_z, direction_reference);
    the kept tolerance and the merge-time bounds from the run configuration."""
    config, scenario = session.config, session.workspace.scenario
    return VerificationPolicy.relative_to(neck_head(session.chain.tutor), norm_factor=config.norm_factor,
                                          protected_tolerance=config.protected_tolerance, noise_z=config.noise_z,
                                          protected_scope=config.protected_scope,
                                          protected_classes=tuple(scenario.protected_classes),
                                          kept_classes=tuple(scenario.presumed_classes),
                                          kept_tolerance=config.kept_tolerance,
                                          operating_tolerance=config.operating_tolerance,
                                          operating_harm=config.operating_harm,
                                          operating_threshold=config.operating_threshold, direction_z=config.direction_z,
                                          direction_reference=config.direction_reference,
                                          direction_scope=config.direction_scope,
                                          clip_norm=config.clip_norm, clip_multiple=config.clip_multiple,
                                          clip_share=config.clip_share,
                                          row_multiple=config.row_multiple, row_bound=config.row_bound,
                                          row_reference=config.row_reference, row_share=config.row_share,
                                          row_size=config.row_size, dilution_check=config.dilution_check,
                                          weight_cap=config.weight_cap, claims=config.claims)


def make_strategy(method: str, session: Session, recorder: Recorder,
                  policy: VerificationPolicy | None = None) -> Strategy:
    """The Flower strategy of a federated method, on copies of the manufacturer's models."""
    config, ws = session.config, session.workspace
    n = config.num_clients
    if method == "diredi":
        return DiReDiStrategy(
            copy.deepcopy(session.chain.tutor), copy.deepcopy(session.chain.edge), ws.validation_set(),
            ws.scenario.teacher_classes, config.client_training(), policy or default_policy(session),
            presumed_data=ws.chain_data().presumed_train, share_tutor1=config.tutor1 == "shared",
            aggregation=config.aggregation, redistill=config.redistill,
            edge_check=config.edge_check == "on",
            spread_data=ws.chain_data().teacher_train if config.spread == "on" else None,
            spread_iters=config.spread_iters, spread_memo=config.body_cache == "run",
            calibrate=config.calibrate, calibrate_reach=config.calibrate_reach, num_nodes=n, fraction=config.fraction, seed=config.training_seed, recorder=recorder)
    # The sampler picks this round's clients (seeded by their identities) and Flower's FedAvg trains
    # all of them; the evaluate step goes to every node and the recording mixin keeps those that trained.
    count = sample_count(n, config.fraction)
    nodes = {"fraction_train": 1.0, "min_train_nodes": count, "min_available_nodes": count,
             "fraction_evaluate": 1.0, "min_evaluate_nodes": n,
             "sampler": ClientSampler(n, config.fraction, config.training_seed), "recorder": recorder}
    if method == "fedavg":
        return RecordingFedAvg(**nodes)
    if method == "fedprox":
        return RecordingFedProx(**nodes, proximal_mu=config.fedprox_mu)
    if method == "fedavg_ls":  # FedAvg; each client trains only its own classes' scores
        return RecordingFedAvg(**nodes, method=method, client_config={OWN_CLASSES: 1})
    if method == "fedavg_ft":  # FedAvg; each client fine-tunes the global edge before evaluating it
        return RecordingFedAvg(**nodes, method=method, client_config={FINE_TUNE: 1})
    # Server optimisers: they step the edge's parameters, its BatchNorm buffers are averaged (ParameterStep)
    parameters = [name for name, _ in session.chain.edge.named_parameters()]
    if method == "fedavgm":
        return RecordingFedAvgM(**nodes, parameter_keys=parameters, server_learning_rate=1.0,
                                server_momentum=config.server_momentum)
    if method == "fedadam":  # eta_l: the clients' lr (Flower only reports it)
        return RecordingFedAdam(**nodes, parameter_keys=parameters, eta=config.fedadam_eta,
                                eta_l=config.direct_lr or config.client_training().lr, tau=config.fedadam_tau)
    raise ValueError(f"{method!r} is not a federated method; expected one of {', '.join(FEDERATED)}")


def run_method(method: str, session: Session, grid: Grid | None, recorder: Recorder | None = None,
               policy: VerificationPolicy | None = None, folder: RunFolder | None = None,
               client_state: bool = False) -> MethodResult:
    """Runs every round of ``method``; federated methods need the ``grid``.

    With a run ``folder``, a federated method checkpoints its server state after every round and
    starts from the folder's checkpoint when there is one (``report.checkpoint``); with
    ``client_state`` the clients also keep their state in the folder (``clients.store``: simulated
    clients share this machine's disk)."""
    if method not in CENTRALISED and grid is None:
        raise ValueError(f"{method} is a federated method: it needs a Flower grid")
    with computing(session.config.compute()):  # the server's verification and evaluation
        return _run_method(method, session, grid, recorder or Recorder(method), policy, folder, client_state)


def _run_method(method: str, session: Session, grid: Grid | None, recorder: Recorder,
                policy: VerificationPolicy | None, folder: RunFolder | None, client_state: bool) -> MethodResult:
    config = session.config
    random.seed(config.training_seed)  # Flower samples nodes with Python's random
    torch.manual_seed(config.training_seed)
    start = time.perf_counter()
    if method in CENTRALISED:
        run_centralised(config, {method: recorder}, len(session.workspace.clients))
        return MethodResult(method, recorder, time.perf_counter() - start)
    strategy = make_strategy(method, session, recorder, policy)
    run_config = ConfigRecord(config.to_record())
    initial, rounds_done = state_record(session.chain.edge), 0
    if folder is not None:
        if client_state:
            run_config[STATE_DIR] = str(folder.client_state_path)
        saved = load_checkpoint(folder.checkpoints_path, method)  # also sets the RNGs back
        if saved is not None:
            rounds_done, tensors, meta = saved
            log.warning("%s: resuming after round %d of %d (checkpoint)", method, rounds_done, config.rounds)
            strategy.restore(tensors, meta)
        strategy.checkpoint_fn = lambda r, tensors, meta: save_checkpoint(folder.checkpoints_path, method, r,
                                                                          tensors, meta)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=config.rounds, start_round=rounds_done + 1,
                            timeout=config.timeout_s, train_config=run_config,
                            evaluate_config=ConfigRecord(dict(run_config)))
    seconds = time.perf_counter() - start
    models = {name: _clone(state) for name, state in strategy.final_models(result).items()}
    return MethodResult(method, recorder, seconds, **models)


def _clone(state) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def run_methods(session: Session, grid: Grid | None, folder: RunFolder, methods: list[str] | None = None,
                on_record: Callable[[dict], None] | None = None,
                on_method: Callable[[str], None] | None = None, report: bool = True,
                client_state: bool = False) -> list[dict]:
    """Runs ``methods`` (default: the configuration's) that the folder does not list as done,
    appending records and decisions to it as they arrive, each federated method from its last
    checkpointed round (``run_method``); with ``report``, writes results.md and the plots over
    every record in the folder. Returns the folder's records."""
    def recorder_for(method: str) -> Recorder:
        return Recorder(method, on_record=lambda r: (folder.append_record(r), on_record and on_record(r)),
                        on_decision=lambda d: folder.append_verification(d.to_dict()),
                        on_failure=folder.append_failure)

    todo = [m for m in (methods if methods is not None else session.config.methods) if m not in folder.read_done()]
    for method in (m for m in todo if m not in CENTRALISED):
        done = folder.read_done()
        if on_method is not None:
            on_method(method)
        recorder = recorder_for(method)
        result = run_method(method, session, grid, recorder, folder=folder, client_state=client_state)
        for failure in result.recorder.failures:
            log.warning("%s: client failure: %s", method, failure)
        if recorder.tutor_history:
            folder.write_json(TUTOR_HISTORY, recorder.tutor_history)
        folder.write_done([*done, method])
        folder.forget_state(method)
    centralised = [m for m in todo if m in CENTRALISED]
    if centralised:  # local and oracle side by side (one process per core)
        if on_method is not None:
            on_method(" + ".join(centralised))
        run_centralised(session.config, {m: recorder_for(m) for m in centralised}, len(session.workspace.clients),
                        on_done=lambda m: folder.write_done([*folder.read_done(), m]))
    records = folder.read_records()
    if report:
        specs = session.client_specs()
        write_all(folder, records, specs, [s["private"] for s in specs], session.stage_rows(),
                  session.config.operating_threshold)
    return records


def write_summary(session: Session, folder: RunFolder, wall_s: float) -> dict:
    """summary.json (``evaluation.metrics.run_summary``) from the folder's records and tutor history."""
    specs = session.client_specs()
    summary = run_summary(folder.read_records(), specs, [s["private"] for s in specs], session.config.rounds,
                          wall_s, folder.read_json(TUTOR_HISTORY, []))
    summary["driver_peak_rss_mb"] = peak_rss_mb()  # this process: the server, its models and the runtime
    failures = folder.read_failures()  # error replies and replies that never came: per method, how many
    summary["client_failures"] = dict(Counter(f["method"] for f in failures))
    folder.write_json(SUMMARY, summary)
    return summary


# -- `flwr run .` ------------------------------------------------------------------------------

OUTPUT_KEYS = ("out-dir", "name")  # run-config keys that say where results go, not what is run

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    start, grid = time.perf_counter(), packed_grid(grid)
    raw = dict(context.run_config)
    out_dir, name = str(raw.pop("out-dir", "runs")), str(raw.pop("name", ""))
    if int(raw.get("num-clients", 0)) == 0:
        raw["num-clients"] = connected_nodes(grid)
    config = resolve_run_config(raw)
    session = Session.open(config)
    folder = RunFolder.start(Path(out_dir) / (name or config.run_name()), config.to_dict(), session.details())
    # client_state: each client keeps its state under this folder on its own disk (clients.store);
    # the server's verification and distillation run on the run's device (models.compute.placed_on)
    with placed_on(config.device):
        records = run_methods(session, grid, folder, on_method=lambda m: log.warning("--- %s ---", m),
                              client_state=True)
    write_summary(session, folder, time.perf_counter() - start)
    log.warning("%d records written to %s", len(records), folder.path)


def connected_nodes(grid: Grid, wait_s: float = 30.0) -> int:
    """Node count once it has been stable for 2 s (nodes register one by one at start-up)."""
    deadline, last, stable_since = time.monotonic() + wait_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(list(grid.get_node_ids()))
        if count != last:
            last, stable_since = count, time.monotonic()
        elif count > 0 and time.monotonic() - stable_since > 2.0:
            return count
        time.sleep(0.25)
    if last <= 0:
        raise TimeoutError("no client node connected")
    return last
