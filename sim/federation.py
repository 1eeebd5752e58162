"""Run one federated method through Flower's simulation runtime on Ray.

    result = run_federation("diredi", workspace, chain, rounds=3, settings=RDSettings.from_profile(p))

One Ray actor per CPU, one CPU and one torch thread per client actor (no oversubscription). Without
``ray_address`` Ray starts locally sized to this machine; with it, the run joins that cluster
(then Ray decides the CPU count). Flower and Ray logs are quiet unless ``quiet=False``; progress
arrives through ``on_record`` (one record per client and round).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from torch import Tensor

from clients.rd import RDSettings
from distill.chain import Chain
from sim.server_app import METHODS, make_plan, server_app_for
from sim.workspace import Workspace
from strategies.verify import Decision, VerificationPolicy

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    method: str
    records: list[dict]  # one per client and round (see strategies/diredi.py: client_record)
    verification_log: list[dict]  # Decision.to_dict() per delta (DiReDi; empty for baselines)
    tutor_state: dict[str, Tensor] | None  # DiReDi's final tutor
    edge_state: dict[str, Tensor] | None  # the server's final edge (None when edges live on clients)
    seconds: float
    failures: list[dict] = field(default_factory=list)  # client errors: {round, step, node, reason}
    tutor_history: list[dict] = field(default_factory=list)  # DiReDi: the tutor's validation AP per round
    round_seconds: dict[int, float] = field(default_factory=dict)  # wall time per round (no start-up)


def run_federation(method: str, workspace: Workspace, chain: Chain, rounds: int, settings: RDSettings,
                   ray_address: str | None = None, on_record: Callable[[dict], None] | None = None,
                   share_tutor1: bool = False, aggregation: str = "weighted", redistill: str = "client",
                   policy: VerificationPolicy | None = None, *, aggregation_options: dict | None = None,
                   direct_iters: int | None = None, proximal_mu: float = 0.01,
                   on_decision: Callable[[Decision], None] | None = None, timeout: float | None = None,
                   quiet: bool = True) -> FederationResult:
    """Runs ``rounds`` rounds of ``method`` ("diredi" | "fedavg" | "fedprox") over the workspace's clients."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    plan = make_plan(method, workspace, chain, rounds, settings, policy=policy, direct_iters=direct_iters,
                     timeout=timeout, share_tutor1=share_tutor1, aggregation=aggregation,
                     aggregation_options=dict(aggregation_options or {}), redistill=redistill,
                     proximal_mu=proximal_mu, on_record=on_record, on_decision=on_decision)
    from flwr.simulation import run_simulation  # imported late: importing flwr resets its logger

    import sim.client_app  # an importable module: Ray actors import it (and torch) by reference

    init_args: dict = {"logging_level": "ERROR" if quiet else "INFO", "log_to_driver": not quiet,
                       "include_dashboard": False}
    if ray_address:
        init_args["address"] = ray_address  # Ray rejects num_cpus when joining a cluster
    else:
        init_args["num_cpus"] = os.cpu_count() or 1
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}
    start = time.perf_counter()
    with _quiet_flower(quiet):
        run_simulation(server_app=server_app_for(plan), client_app=sim.client_app.app,
                       num_supernodes=len(workspace.clients), backend_name="ray",
                       backend_config=backend_config)
    seconds = time.perf_counter() - start
    if "strategy" not in plan.outcome:
        raise RuntimeError(f"the {method} server app ended without a result (see the Flower log above)")
    strategy = plan.outcome["strategy"]
    diredi = method == "diredi"
    return FederationResult(
        method=method, records=list(strategy.records),
        verification_log=[d.to_dict() for d in getattr(strategy, "verification_log", [])],
        tutor_state={k: v.clone() for k, v in plan.tutor.state_dict().items()} if diredi else None,
        edge_state=(_edge_state(plan, strategy) if not diredi or redistill == "server" else None),
        seconds=seconds, failures=list(strategy.failures),
        tutor_history=list(getattr(strategy, "tutor_history", [])), round_seconds=dict(strategy.round_seconds))


def _edge_state(plan, strategy) -> dict[str, Tensor]:
    if plan.method == "diredi":
        return {k: v.clone() for k, v in strategy.edge.state_dict().items()}
    # FedAvg / FedProx: the last aggregated global edge
    return {k: v.clone() for k, v in plan.outcome["result"].arrays.to_torch_state_dict().items()}


class _quiet_flower:
    """Lowers the "flwr" logger (import resets it, so this runs after the import) for the run."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self):
        self.logger = logging.getLogger("flwr")
        self.level = self.logger.level
        if self.quiet:
            self.logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)
