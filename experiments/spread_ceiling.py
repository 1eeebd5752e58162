"""Where spread is lost: per class the tutor, the server's spread edge and the clients' edges.

    python -m experiments.spread_ceiling experiments/results/spread_runs/spread-combo-rep0 ...rep1 ...rep2 \
        --oracle experiments/results/compare/runs/rep0 ...rep1 ...rep2 --round 10 \
        --out experiments/results/spread_ceiling

Spread (``evaluation.metrics.knowledge_spread``) is a client edge's AP change, on its own test shard,
over the classes other clients hold. An edge can only spread what the updated tutor knows, so per such
class this puts side by side, at one round, over the given spread runs (replicates):

* ``tutor``: the updated tutor's AP on the manufacturer's validation set (``tutor.json``);
* ``spread_edge``: the server's spread edge distilled from it on the same validation set, when the
  run recorded it (``tutor.json``'s ``spread_edge``, since this experiment was added);
* ``clients``: the clients' edges' AP change on the class (mean over the clients for which it is
  another client's class), the run's spread per class;
* ``oracle``: the same change for the oracle's edges (``--oracle``: run folders that hold oracle
  records of the same clients), the issue's yardstick.

Validation and test shards are different images, so ``tutor`` against ``clients`` is a ceiling of
the same classes on another set, not a paired figure. Reads records only; writes ``<out>.json`` and
``<out>.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from report.study import read_replicate
from report.writer import write_result


def client_class_spread(records: list[dict], specs: list[dict], method: str, round_: int) -> dict[str, list[float]]:
    """class -> AP change (points) from the client's start to ``round_`` on that class, one value per
    client for which it is another client's private class."""
    own = {int(s["client"]): set(s.get("private") or []) for s in specs}
    everyone = sorted({c for classes in own.values() for c in classes})
    out: dict[str, list[float]] = defaultdict(list)
    for client, mine in own.items():
        rows = sorted((r for r in records if r["method"] == method and r["client"] == client), key=lambda r: r["round"])
        at = [r for r in rows if r["round"] == round_ and r.get("ap_after")]
        if not rows or not at or not rows[0].get("ap_before"):
            continue
        start, now = rows[0]["ap_before"], at[0]["ap_after"]
        for c in everyone:
            if c not in mine and start.get(c) is not None and now.get(c) is not None:
                value = 100 * (now[c] - start[c])
                if math.isfinite(value):
                    out[c].append(value)
    return out


def tutor_at(history: list[dict], round_: int) -> dict | None:
    return next((h for h in history if h.get("round") == round_), None)


def ceiling(runs: list[str], oracle_runs: list[str], round_: int) -> dict:
    classes: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in runs:
        _, records, specs, history = read_replicate(path)
        entry = tutor_at(history, round_)
        if entry is None:
            raise SystemExit(f"{path}: the tutor's history has no round {round_}")
        for c, values in client_class_spread(records, specs, "diredi", round_).items():
            classes[c]["clients"].append(float(np.mean(values)))
            classes[c]["tutor"].append(100 * entry["ap"][c])
            if "spread_edge" in entry:
                classes[c]["spread_edge"].append(100 * entry["spread_edge"]["ap"][c])
    for path in oracle_runs:
        _, records, specs, _ = read_replicate(path)
        for c, values in client_class_spread(records, specs, "oracle", round_).items():
            classes[c]["oracle"].append(float(np.mean(values)))
    table = {c: {k: {"mean": float(np.mean(v)), "per_run": v} for k, v in figures.items()}
             for c, figures in sorted(classes.items())}
    means = {k: float(np.mean([t[k]["mean"] for t in table.values() if k in t]))
             for k in ("tutor", "spread_edge", "clients", "oracle") if any(k in t for t in table.values())}
    return {"round": round_, "runs": runs, "oracle_runs": oracle_runs, "classes": table, "mean_over_classes": means}


def markdown(result: dict, command: str) -> str:
    columns = [k for k in ("tutor", "spread_edge", "clients", "oracle") if k in result["mean_over_classes"]]
    heads = {"tutor": "tutor, validation AP", "spread_edge": "server's spread edge, validation AP",
             "clients": "clients' edges, AP change on their test shards (spread)",
             "oracle": "oracle's edges, AP change (spread)"}
    lines = [f"`{command}`", "", f"Round {result['round']}, mean over runs (points):", "",
             "| class | " + " | ".join(heads[k] for k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for c, figures in result["classes"].items():
        lines.append(f"| {c} | " + " | ".join(f"{figures[k]['mean']:.1f}" if k in figures else "-" for k in columns) + " |")
    lines.append("| mean over classes | " + " | ".join(f"{result['mean_over_classes'][k]:.1f}" for k in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="DiReDi run folders with --spread on (replicates)")
    parser.add_argument("--oracle", nargs="*", default=[], help="run folders with oracle records of the same clients")
    parser.add_argument("--round", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/spread_ceiling"))
    args = parser.parse_args(argv)
    if args.round < 1:
        parser.error(f"--round must be at least 1, got {args.round}")
    for path in [*args.runs, *args.oracle]:
        if not (Path(path) / "rounds.jsonl").exists():
            parser.error(f"{path} holds no run (no rounds.jsonl)")
    command = " ".join(["python -m experiments.spread_ceiling", *(sys.argv[1:] if argv is None else argv)])
    result = ceiling(args.runs, args.oracle, args.round)
    result["command"] = command
    write_result(args.out, result, markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
