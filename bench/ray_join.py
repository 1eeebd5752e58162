"""What a federation pays to start its own Ray instance, against joining one that is already running.

    python -m bench.ray_join --repeats 4 --out experiments/results/ray_join.json

Each timed run is a fresh process (``python -m bench.ray_join --once``: one smoke federation, FedAvg, 2
clients, 1 round, on a smoke cache built before the timing), alternately with Ray started by the
simulation and with ``RAY_ADDRESS`` naming a one-node cluster this benchmark keeps running: what the test
suite does (``tests/conftest.py`` starts one cluster for all of its federations). Wall seconds of the
whole process, and CPU seconds of the driver process (with the children it waits for: Ray's daemons and
workers are not among them, they outlive it or belong to the cluster, so the wall time is the figure that
holds everything); medians over the repeats, and the median of the pairs' wall-time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def federation_once(cache: str) -> None:
    """One smoke FedAvg round of 2 clients (the suite's unit of federation)."""
    import torch

    from protocol.config import resolve_run_config
    from session.workspace import Session
    from sim.federation import run_federation

    torch.set_num_threads(1)
    session = Session.open(resolve_run_config({"profile": "smoke", "num-clients": 2, "rounds": 1, "cache-dir": cache}))
    result = run_federation("fedavg", session)
    assert len(result.records) == 2 and not result.recorder.failures


def timed(command: list[str], env: dict) -> dict:
    """Wall seconds of one child process, and its CPU seconds with those of the children it waited for."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_join", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="timed pairs after one warm-up pair")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/ray_join.json"))
    parser.add_argument("--once", metavar="CACHE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.once:
        federation_once(args.once)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        command = [sys.executable, "-m", "bench.ray_join", "--once", cache]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # data, chain
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": os.cpu_count() or 1, "object_store_memory": 512 * 1024 * 1024, "include_dashboard": False})
        try:
            joined_env = {**env, "RAY_ADDRESS": cluster.address}
            pairs = []
            for i in range(args.repeats + 1):
                own, joined = timed(command, env), timed(command, joined_env)
                print(f"pair {i}{' (warm-up)' if i == 0 else ''}: own Ray {own['wall_s']} s, joined {joined['wall_s']} s",
                      flush=True)
                if i:
                    pairs.append({"own_ray": own, "joined": joined})
        finally:
            cluster.shutdown()

    def median(key: str, figure: str) -> float:
        return round(statistics.median(p[key][figure] for p in pairs), 2)

    result = {
        "command": "python -m bench.ray_join " + " ".join(argv if argv is not None else sys.argv[1:]),
        "what": "one smoke federation (FedAvg, 2 clients, 1 round) per process: Ray started by the simulation "
                "against joining a running one-node cluster",
        "cpu_count": os.cpu_count(), "pairs": pairs,
        "median": {key: {figure: median(key, figure) for figure in ("wall_s", "cpu_s")} for key in ("own_ray", "joined")},
        "median_saving_wall_s": round(statistics.median(p["own_ray"]["wall_s"] - p["joined"]["wall_s"] for p in pairs), 2),
        "median_ratio_wall": round(statistics.median(p["own_ray"]["wall_s"] / p["joined"]["wall_s"] for p in pairs), 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["median"]), f"saving {result['median_saving_wall_s']} s per federation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
