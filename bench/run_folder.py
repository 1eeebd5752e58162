"""What the cost benches share: a finished run's settings, and the one cost file they all fill.

    parser = argparse.ArgumentParser(...); add_run_arguments(parser)
    config, session, run = open_run(args.run, args.threads)   # the run's client settings, its chain
    write_cost_keys(args.out, {"feature_reuse": result})
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


DEFAULT_RUN = Path("experiments/results/default8")
COST_FILE = Path("experiments/results/cost.json")
# What a client's work depends on; the rest of a run's configuration (methods, rounds, ...) does not matter here.
CLIENT_KEYS = ("profile", "scenario", "num_clients", "seed", "rd_iters", "redistill_iters", "batch_size", "tutor1",
               "redistill", "redistill_lr", "redistill_score_weight", "edge_average")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--run`` (the run folder replayed), ``--out`` (the cost file) and ``--threads``."""
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN,
                        help="a run folder whose config.json names the scenario and settings")
    parser.add_argument("--out", type=Path, default=COST_FILE)
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch threads (a client actor has 1)")


def open_run(folder: Path, threads: int | None = None):
    """The run's configuration (its client settings), the server's session for it and config.json's "run",
    with torch on ``threads`` threads when given (imported here: bench.scale uses this module without
    loading torch)."""
    import torch

    from protocol.config import RunConfig, resolve_run_config
    from session.workspace import Session

    if threads is not None:
        torch.set_num_threads(threads)

    run = RunConfig.completed(json.loads((folder / "config.json").read_text())["run"])  # older: as they ran
    config = resolve_run_config({key: run[key] for key in CLIENT_KEYS})
    return config, Session.open(config), run


def write_cost_keys(out: Path, values: dict) -> None:
    """Sets these keys of the cost file, keeping what other benches wrote there (bench.cost, bench.scale,
    bench.feature_reuse, bench.frozen_forward and bench.round_work each fill their own keys of cost.json)."""
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged.update(values)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2))
