"""The direct-training baselines' settings, chosen on the manufacturer's validation set.

    python -m experiments.baseline_grid --profile cpu --rounds 3 --workers 2

FedAvg's client learning rate and local steps, then FedProx's mu at the chosen pair, from a small
recorded grid. Each grid point runs FedAvg in-process for ``--rounds`` rounds on the default
federation (every client trains the global edge on its own training shard; the server takes the
mean weighted by the clients' example counts, Flower's FedAvg rule) and scores the global edge
after every round on the manufacturer's validation set: mAP over every class the federation
evaluates (presumed and the clients' new ones). A client's test shard is never read (a test
replaces ``Workspace.client_test`` with one that fails and runs the grid).

The choice: among the points with at most a DiReDi client's steps per round (``--max-steps``,
default 2 x RD + Distill C = 60: the baselines are tuned at DiReDi's client compute, the study's
curves against compute show what more buys), the best validation mAP after the last round; a tie
within 0.5 points goes to fewer steps, then to the lower learning rate. Writes ``baseline_grid.json`` (every
point, per round, with the command) and ``baseline_grid.md``; ``experiments.compare`` reads the
chosen settings from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path

import torch
from torch import Tensor, nn

from evaluation.ap import nan_mean, per_class_ap
from protocol.config import RunConfig, resolve_run_config
from protocol.wire import work_seed
from session.workspace import workspace_of

RESULTS = Path("experiments/results")
TIE_POINTS = 0.5  # validation mAP differences below this are not a reason to pay more steps


def weighted_average(states: list[dict[str, Tensor]], weights: list[float]) -> dict[str, Tensor]:
    """FedAvg's aggregate: sum_i w_i x_i / sum_i w_i per tensor (integer buffers rounded back)."""
    total = float(sum(weights))
    out = {}
    for name, first in states[0].items():
        mean = sum(w * s[name].double() for s, w in zip(states, weights)) / total
        out[name] = mean.round().to(first.dtype) if not first.is_floating_point() else mean.to(first.dtype)
    return out


def fedavg_round(edge: nn.Module, client_data: list, steps: int, settings, seed: int, server_round: int,
                 proximal_mu: float = 0.0) -> nn.Module:
    """One FedAvg round in-process: each client trains a copy of ``edge`` (``distill.rd.direct_training``,
    the seeds the Flower clients use), the server averages them weighted by example counts."""
    from distill.rd import direct_training

    states, weights = [], []
    for client, data in enumerate(client_data):
        trained, _ = direct_training(edge, data, steps, settings, seed=work_seed(seed, server_round, client),
                                     proximal_mu=proximal_mu)
        states.append({k: v.detach() for k, v in trained.state_dict().items()})
        weights.append(len(data))
    edge.load_state_dict(weighted_average(states, weights))
    return edge


def validation_scores(model: nn.Module, ws) -> dict[str, float]:
    """mAP over the federation's classes on the manufacturer's validation set, and its two halves."""
    classes = ws.eval_classes()
    ap, _ = per_class_ap(model, ws.validation_set(), classes)
    new = sorted({c for spec in ws.clients for c in spec.private})
    return {"mAP": 100 * nan_mean(ap.values()), "new_mAP": 100 * nan_mean(ap[c] for c in new),
            "presumed_mAP": 100 * nan_mean(ap[c] for c in ws.scenario.presumed_classes)}


def run_point(config: RunConfig, lr: float, steps: int, mu: float, rounds: int) -> dict:
    """One grid point: FedAvg (FedProx when mu > 0) for ``rounds`` rounds, scored after each."""
    import copy

    torch.set_num_threads(1)  # one process per core, as the Flower clients run
    ws = workspace_of(config)
    edge = copy.deepcopy(ws.chain(progress=False).edge).cpu()
    settings = replace(config.client_training(), lr=lr)
    data = [ws.client_train(i) for i in range(len(ws.clients))]
    start, per_round = time.perf_counter(), []
    for r in range(1, rounds + 1):
        fedavg_round(edge, data, steps, settings, config.training_seed, r, proximal_mu=mu)
        per_round.append({"round": r, **validation_scores(edge, ws)})
    return {"lr": lr, "steps": steps, "mu": mu, "per_round": per_round, **per_round[-1],
            "seconds": time.perf_counter() - start}


def choose(points: list[dict], max_steps: int | None = None) -> dict:
    """The best final validation mAP of the points with at most ``max_steps``; within ``TIE_POINTS`` of
    it, fewer steps, then the lower lr."""
    points = [p for p in points if max_steps is None or p["steps"] <= max_steps]
    if not points:
        raise ValueError(f"no grid point with at most {max_steps} steps")
    best = max(p["mAP"] for p in points)
    near = [p for p in points if p["mAP"] >= best - TIE_POINTS]
    return min(near, key=lambda p: (p["steps"], p["lr"], -p["mAP"]))


def run_grid(config: RunConfig, points: list[tuple[float, int, float]], rounds: int, workers: int) -> list[dict]:
    if workers <= 1:
        return [run_point(config, *point, rounds) for point in points]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_point, config, *point, rounds) for point in points]
        results = []
        for i, future in enumerate(futures):
            results.append(future.result())
            print(f"grid point {i + 1}/{len(points)}: lr {results[-1]['lr']:g}, steps {results[-1]['steps']}, "
                  f"mu {results[-1]['mu']:g}: val mAP {results[-1]['mAP']:.1f}", flush=True)
        return results


def grid_markdown(result: dict) -> str:
    lines = ["# Baseline settings chosen on the manufacturer's validation set\n",
             f"`{result['command']}` ({result['wall_s']:.0f} s; {result['rounds']} rounds of in-process FedAvg, "
             f"{result['clients']} clients)\n",
             "| grid | lr | local steps | mu | val mAP | new classes | presumed | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for part in ("fedavg", "fedprox"):
        for p in result[part]["points"]:
            lines.append(f"| {part} | {p['lr']:g} | {p['steps']} | {p['mu']:g} | {p['mAP']:.1f} | {p['new_mAP']:.1f} | "
                         f"{p['presumed_mAP']:.1f} | {p['seconds']:.0f} |")
    c = result["chosen"]
    lines += ["", f"Chosen among points with at most {result['max_steps']} local steps (a DiReDi client's per round): "
                  f"FedAvg lr {c['lr']:g}, {c['steps']} local steps; FedProx mu {c['mu']:g}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.baseline_grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3])
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 60, 120])
    parser.add_argument("--mus", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--max-steps", type=int, help="choose among points with at most this many steps "
                        "(default: a DiReDi client's steps per round)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in ("clients", "rounds", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if min(args.lrs) <= 0 or min(args.steps) < 1 or min(args.mus) <= 0:
        parser.error("--lrs and --mus must be > 0, --steps at least 1")
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "cache-dir": args.cache})
    workspace_of(config).chain(progress=True)  # built once here, not in every worker
    max_steps = args.max_steps or config.diredi_client_steps
    start = time.perf_counter()
    fedavg = run_grid(config, [(lr, steps, 0.0) for steps in args.steps for lr in args.lrs], args.rounds, args.workers)
    best = choose(fedavg, max_steps)
    fedprox = run_grid(config, [(best["lr"], best["steps"], mu) for mu in args.mus], args.rounds, args.workers)
    best_prox = max(fedprox, key=lambda p: p["mAP"])
    result = {"command": "python -m experiments.baseline_grid " + " ".join(sys.argv[1:] if argv is None else argv),
              "rounds": args.rounds, "clients": args.clients, "scored_on": "manufacturer validation set",
              "fedavg": {"points": fedavg}, "fedprox": {"points": fedprox},
              "chosen": {"lr": best["lr"], "steps": best["steps"], "mu": best_prox["mu"]}, "max_steps": max_steps,
              "wall_s": time.perf_counter() - start, "torch_threads_per_worker": 1}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "baseline_grid.json").write_text(json.dumps(result, indent=1))
    (args.out / "baseline_grid.md").write_text(grid_markdown(result))
    print(grid_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
