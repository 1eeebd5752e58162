"""The Flower ServerApp: builds the strategy of a method and runs its rounds.

Two ways in:

* ``sim.federation.run_federation`` builds a ``FederationPlan`` (models, server-side data,
  settings, callbacks) in the driver process and hands ``server_app_for(plan)`` to
  ``run_simulation``: the ServerApp runs in a thread of that process, so the plan is passed by
  closure and the results come back in ``plan.outcome``.
* ``flwr run .`` loads ``app`` below (pyproject: serverapp = "sim.server_app:app"); it reads
  ``context.run_config`` (profile, scenario, num-server-rounds, method, seed, and optionally
  num-clients, cache-dir, share-tutor1, aggregation, redistill, out-dir), prepares the same workspace
  and manufacturer chain, and logs a summary (writing records to out-dir when given).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy
from torch import nn

from clients.rd import RDSettings
from distill.chain import Chain
from models.parts import neck_head
from sim.client_app import client_config
from sim.workspace import Workspace, prepare
from strategies.baselines import RecordingFedAvg, RecordingFedProx
from strategies.diredi import DiReDiStrategy, state_record
from strategies.verify import Decision, VerificationPolicy

log = logging.getLogger(__name__)
METHODS = ("diredi", "fedavg", "fedprox")
# Rough CPU seconds per training iteration (1 thread), to size the round-trip timeout generously.
SECONDS_PER_ITER = {"smoke": 0.2, "cpu": 2.0, "paper": 30.0}


@dataclass
class FederationPlan:
    """Everything the server side of one federated run needs (built in the driver process)."""

    method: str
    tutor: nn.Module
    edge: nn.Module
    validation_data: Any
    validation_classes: list[str]
    presumed_data: Any
    settings: RDSettings
    client_config: dict  # ConfigRecord values every client message carries
    rounds: int
    num_clients: int
    seed: int = 0
    timeout: float = 3600.0
    policy: VerificationPolicy | None = None
    share_tutor1: bool = False
    aggregation: str = "weighted"
    aggregation_options: dict = field(default_factory=dict)
    redistill: str = "client"
    proximal_mu: float = 0.01
    on_record: Callable[[dict], None] | None = None
    on_decision: Callable[[Decision], None] | None = None
    outcome: dict = field(default_factory=dict)  # filled by run_plan: strategy, result, seconds


def round_timeout(profile_name: str, settings: RDSettings, num_clients: int, direct_iters: int,
                  cpus: int | None = None) -> float:
    """A generous bound for one round trip: all of a round's client iterations, run in waves of
    as many clients as there are CPUs, at a pessimistic speed, times 3, plus 5 minutes."""
    iters = 2 * settings.rd_iters + settings.redistill_iters + direct_iters
    waves = math.ceil(num_clients / max(1, cpus or os.cpu_count() or 1))
    per_iter = SECONDS_PER_ITER.get(profile_name, 5.0) * settings.batch_size / 8
    return 3.0 * waves * (iters * per_iter + 120.0) + 300.0


def default_policy(workspace: Workspace, tutor: nn.Module) -> VerificationPolicy:
    """Protected classes from the scenario; norm bound = the norm of the tutor's own neck/head."""
    return VerificationPolicy.relative_to(neck_head(tutor), norm_factor=1.0,
                                          protected_classes=tuple(workspace.scenario.protected_classes))


def make_plan(method: str, workspace: Workspace, chain: Chain, rounds: int, settings: RDSettings, *,
              policy: VerificationPolicy | None = None, direct_iters: int | None = None,
              timeout: float | None = None, **options) -> FederationPlan:
    """A plan over ``workspace`` with the manufacturer's ``chain`` (its models are copied, so the
    chain's cached models stay the originals)."""
    import copy

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    config = client_config(workspace, settings, direct_iters)
    tutor, edge = copy.deepcopy(chain.tutor).eval(), copy.deepcopy(chain.edge).eval()
    return FederationPlan(
        method=method, tutor=tutor, edge=edge, validation_data=workspace.validation_set(),
        validation_classes=list(workspace.scenario.teacher_classes),
        presumed_data=workspace.chain_data().presumed_train, settings=settings, client_config=config,
        rounds=rounds, num_clients=len(workspace.clients), seed=workspace.seed,
        timeout=timeout or round_timeout(workspace.profile.name, settings, len(workspace.clients),
                                         int(config["direct-iters"])),
        policy=policy or default_policy(workspace, tutor), **options)


def make_strategy(plan: FederationPlan) -> Strategy:
    n = plan.num_clients
    if plan.method == "diredi":
        return DiReDiStrategy(
            plan.tutor, plan.edge, plan.validation_data, plan.validation_classes, plan.settings, plan.policy,
            presumed_data=plan.presumed_data, share_tutor1=plan.share_tutor1, aggregation=plan.aggregation,
            aggregation_options=plan.aggregation_options, redistill=plan.redistill, min_nodes=n,
            seed=plan.seed, on_record=plan.on_record, on_decision=plan.on_decision)
    nodes = {"min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}
    if plan.method == "fedavg":
        return RecordingFedAvg(**nodes, on_record=plan.on_record)
    return RecordingFedProx(**nodes, proximal_mu=plan.proximal_mu, on_record=plan.on_record)


def run_plan(plan: FederationPlan, grid: Grid) -> None:
    """Runs the plan's rounds on ``grid``; results go to ``plan.outcome``."""
    random.seed(plan.seed)  # Flower samples nodes with Python's random
    torch.manual_seed(plan.seed)
    strategy = make_strategy(plan)
    method = "diredi" if plan.method == "diredi" else "direct"
    config = ConfigRecord({**plan.client_config, "method": method})
    start = time.perf_counter()
    result = strategy.start(grid=grid, initial_arrays=state_record(plan.edge), num_rounds=plan.rounds,
                            timeout=plan.timeout, train_config=config, evaluate_config=ConfigRecord(dict(config)))
    plan.outcome.update(strategy=strategy, result=result, seconds=time.perf_counter() - start)


def server_app_for(plan: FederationPlan) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_plan(plan, grid)

    return app


# -- `flwr run .` ------------------------------------------------------------------------------

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = dict(context.run_config)
    num_clients = int(rc.get("num-clients", 0)) or _connected_nodes(grid)
    workspace = prepare(str(rc.get("profile", "smoke")), str(rc.get("scenario", "default8")),
                        num_clients=num_clients, seed=int(rc.get("seed", 0)),
                        cache_dir=str(rc.get("cache-dir", ".cache")))
    chain = workspace.chain(progress=False)
    settings = RDSettings.from_profile(workspace.profile)
    records: list[dict] = []
    plan = make_plan(str(rc.get("method", "diredi")), workspace, chain, int(rc.get("num-server-rounds", 1)),
                     settings, share_tutor1=bool(rc.get("share-tutor1", False)),
                     aggregation=str(rc.get("aggregation", "weighted")),
                     redistill=str(rc.get("redistill", "client")), on_record=records.append)
    run_plan(plan, grid)
    for r in records:
        log.warning("round %d client %d: mAP before %.3f after %.3f", r["round"], r["client"],
                    _mean(r["ap_before"].values()), _mean(r["ap_after"].values()))
    if rc.get("out-dir"):
        out = Path(str(rc["out-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{plan.method}-records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _connected_nodes(grid: Grid, wait_s: float = 30.0) -> int:
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


def _mean(values) -> float:
    kept = [v for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan
