"""Flower's simulation runtime on Ray, driven from this process.

    simulate(config, lambda grid: run_methods(session, grid, folder))       # what sim.run does
    result = run_federation("diredi", session)                              # one method (tests, experiments)

One Ray actor per CPU, one CPU and one torch thread per client actor (no oversubscription); with a GPU
device (``--device cuda``) each client actor also asks for an even share of the GPUs (``client_gpus``) and
the server's verification and distillation run on the GPU too (``models.compute.placed_on``). Without
``ray_address`` (or Ray's ``RAY_ADDRESS`` variable) Ray starts locally sized to this machine; with it,
the run joins that cluster (then Ray decides the CPU count). Flower and Ray logs are quiet unless ``quiet=False``.
The ServerApp runs in a thread of this process, so ``server_main`` is passed by closure.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from distill.trainer import resolve_device
from models.compute import placed_on
from protocol.config import RunConfig
from strategies.exchange import packed_grid
from strategies.ledger import Recorder
from session.workspace import Session
from strategies.server_app import MethodResult, run_method
from strategies.verify import VerificationPolicy


def simulate(config: RunConfig, server_main: Callable[[Grid, Context], Any], ray_address: str | None = None,
             quiet: bool = True, client_app: ClientApp | None = None, client_cpus: float = 1.0) -> None:
    """Runs ``server_main(grid, context)`` as the ServerApp of a simulation with one node per client
    running ``client_app`` (default: the project's, ``clients.app.app``; it must live in an importable
    module, e.g. ``bench.byzantine.app``); ``client_cpus`` < 1 runs more client actors than cores
    (for clients that mostly wait)."""
    from flwr.simulation import run_simulation  # imported late: importing flwr resets its logger

    import clients.app  # an importable module: Ray actors import it (and torch) by reference

    app = ServerApp()
    failure: list[BaseException] = []

    device = resolve_device(config.device)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            with placed_on(device):  # the server's verification and distillation
                server_main(packed_grid(grid), context)
        except BaseException as err:  # Flower logs it and carries on: keep it for the caller
            failure.append(err)
            raise

    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    init_args = ray_init_args(ray_address, quiet, gpus=gpus)
    actors = min(config.num_clients, int((os.cpu_count() or 1) / client_cpus))
    backend_config = {"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus(gpus, actors)},
                      "init_args": init_args}
    with _quiet_flower(quiet):
        run_simulation(server_app=app, client_app=client_app or clients.app.app, num_supernodes=config.num_clients,
                       backend_name="ray", backend_config=backend_config)
    if failure:
        raise RuntimeError(f"the server app failed: {failure[0]!r}") from failure[0]


def client_gpus(gpus: int, actors: int) -> float:
    """A client actor's share of this machine's ``gpus``: split evenly among the ``actors`` that run at
    once, at most one each (0 without GPUs: Ray then hides every GPU from the actor)."""
    return min(1.0, gpus / max(1, actors)) if gpus > 0 else 0.0


def ray_init_args(ray_address: str | None, quiet: bool, environ: Mapping[str, str] = os.environ,
                  gpus: int = 0) -> dict:
    """``ray.init``'s arguments: join ``ray_address`` or, failing that, Ray's own ``RAY_ADDRESS``; else start
    a new Ray instance of this machine's size, ``gpus`` included ("local": without it Ray joins whatever
    cluster was started last on this machine, which Ray records in its temporary folder: another program's
    or a test's)."""
    init_args: dict = {"logging_level": "ERROR" if quiet else "INFO", "log_to_driver": not quiet,
                       "include_dashboard": False}
    address = ray_address or environ.get("RAY_ADDRESS")
    if address:
        init_args["address"] = address  # Ray rejects num_cpus when joining a cluster
    else:
        init_args.update(address="local", num_cpus=os.cpu_count() or 1, num_gpus=gpus)
    return init_args


def run_federation(method: str, session: Session, policy: VerificationPolicy | None = None,
                   on_record: Callable[[dict], None] | None = None, **simulate_options) -> MethodResult:
    """Runs every round of one federated method on its own simulation."""
    out: list[MethodResult] = []
    recorder = Recorder(method, on_record=on_record)
    simulate(session.config, lambda grid, _: out.append(run_method(method, session, grid, recorder, policy)),
             **simulate_options)
    return out[0]


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
