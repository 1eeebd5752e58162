"""Where a method's gain on the clients' own new classes falls behind another's: per class, per client.

    python -m experiments.own_gap experiments/results/compare-spread/runs/rep0 --rounds 1 5 10 15 20 \
        --out experiments/results/own_gap_spread

A client's gain (``evaluation.metrics``) is the mean, over its private classes, of the AP change on its own
test shard from the edge it started with; every class counts alike, whatever its number of test objects.
Over the given run folders (replicates), this sets side by side:

* per private class and round, the tutor's and the server's spread edge's AP on the manufacturer's
  validation set (``tutor.json``; DiReDi runs) and each method's edges' AP on the test shards of the
  clients that hold the class;
* per client at the last round, each private class's AP under the two methods compared (``--methods``,
  first minus second), its test objects, and its share of the mean gain's difference (a class's
  difference / its client's classes / the clients);
* per method and round the gain as the study reports it and weighted by test objects (each client's
  classes weighted by their objects in its test shard): a class with a handful of objects moves its AP
  by tens of points from round to round and weighs as much as one with eighty.

Validation and test shards are different images: tutor against edge is a level on another set, not a
pairing. Reads records only; writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from evaluation.metrics import objects_weighted_gain
from report.study import read_replicate
from report.writer import write_result


def own_classes(records: list[dict], specs: list[dict], method: str, round_: int) -> dict[int, dict[str, dict]]:
    """client -> private class -> {"ap": AP at ``round_`` (points), "gain": its change from the client's
    start, "objects": the class's objects in the client's test shard}; clients without a record of
    ``round_`` (or without an evaluation then) are left out."""
    out: dict[int, dict[str, dict]] = {}
    for spec in specs:
        client, private = int(spec["client"]), list(spec.get("private") or [])
        mine = sorted((r for r in records if r["method"] == method and r["client"] == client), key=lambda r: r["round"])
        at = [r for r in mine if r["round"] == round_ and r.get("ap_after")]
        if not mine or not at or not mine[0].get("ap_before"):
            continue
        start, now, counts = mine[0]["ap_before"], at[0]["ap_after"], at[0].get("after") or {}
        classes = {}
        for c in private:
            if start.get(c) is None or now.get(c) is None or not math.isfinite(now[c] - start[c]):
                continue
            classes[c] = {"ap": 100 * now[c], "gain": 100 * (now[c] - start[c]),
                          "objects": float(counts.get(f"npos.{c}", float("nan")))}
        if classes:
            out[client] = classes
    return out


def mean_gain(by_client: dict[int, dict[str, dict]], weighted: bool = False) -> float:
    """The mean over clients of each client's gain over its private classes: alike (the study's gain) or
    weighted by their test objects (``evaluation.metrics.objects_weighted_gain``, which weighs a client's
    classes alike where a count is missing)."""
    gains = []
    for classes in by_client.values():
        change = {c: f["gain"] for c, f in classes.items()}  # AP change from 0 to it: the change itself
        objects = {c: f["objects"] for c, f in classes.items()} if weighted else {}
        gains.append(objects_weighted_gain(dict.fromkeys(change, 0.0), change, change, objects))
    return float(np.mean(gains)) if gains else float("nan")


def gap_shares(first: dict[int, dict[str, dict]], second: dict[int, dict[str, dict]]) -> list[dict]:
    """Per client and private class both methods evaluated: each one's AP, the test objects and the
    class's share of the difference of the two mean gains (first minus second), in points."""
    clients = sorted(set(first) & set(second))
    rows = []
    for client in clients:
        classes = sorted(set(first[client]) & set(second[client]))
        for c in classes:
            a, b = first[client][c], second[client][c]
            rows.append({"client": client, "class": c, "first": a["ap"], "second": b["ap"], "objects": a["objects"],
                         "share": (a["gain"] - b["gain"]) / len(classes) / len(clients)})
    return rows


def own_gap(runs: list[str], methods: tuple[str, str], rounds: list[int], extra: tuple[str, ...] = ()) -> dict:
    shown = list(dict.fromkeys([*methods, *extra]))
    per_class: dict[str, dict[str, dict[int, list[float]]]] = {}
    gains: dict[str, dict[int, dict[str, list[float]]]] = {m: {} for m in shown}
    shares: list[dict] = []
    for path in runs:
        _, records, specs, history = read_replicate(path)
        tutor = {h["round"]: h for h in history}
        for r in rounds:
            for m in shown:
                by_client = own_classes(records, specs, m, r)
                if not by_client:
                    continue
                entry = gains[m].setdefault(r, {"alike": [], "objects": []})
                entry["alike"].append(mean_gain(by_client))
                entry["objects"].append(mean_gain(by_client, weighted=True))
                for classes in by_client.values():
                    for c, f in classes.items():
                        per_class.setdefault(c, {}).setdefault(m, {}).setdefault(r, []).append(f["ap"])
            if r in tutor:
                for c in per_class:
                    per_class[c].setdefault("tutor", {}).setdefault(r, []).append(100 * tutor[r]["ap"][c])
                    if "spread_edge" in tutor[r]:
                        per_class[c].setdefault("spread_edge", {}).setdefault(r, []).append(
                            100 * tutor[r]["spread_edge"]["ap"][c])
        last = max(rounds)
        shares += [{"run": str(path), **row} for row in
                   gap_shares(own_classes(records, specs, methods[0], last), own_classes(records, specs, methods[1], last))]
    mean = {c: {k: {r: float(np.mean(v)) for r, v in by_round.items()} for k, by_round in figures.items()}
            for c, figures in sorted(per_class.items())}
    return {"runs": runs, "methods": list(methods), "rounds": rounds,
            "gain": {m: {r: {k: float(np.mean(v)) for k, v in e.items()} for r, e in by_round.items()}
                     for m, by_round in gains.items()},
            "classes": mean, "last_round_shares": shares}


def markdown(result: dict, command: str) -> str:
    first, second = result["methods"]
    rounds = result["rounds"]
    lines = [f"`{command}`", "", "Mean over the run folders given (replicates).", "",
             "## Gain on the clients' own new classes (points)", "",
             "| method | weighting | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|---|" + "---|" * len(rounds)]
    for m, by_round in result["gain"].items():
        for key, name in (("alike", "classes alike (the study's)"), ("objects", "by test objects")):
            lines.append(f"| {m} | {name} | " + " | ".join(
                f"{by_round[r][key]:.1f}" if r in by_round else "-" for r in rounds) + " |")
    lines += ["", "## Per class: AP (points); tutor and server's spread edge on the validation set, edges on the "
              "test shards of the clients that hold the class", "",
              "| class | model | " + " | ".join(f"round {r}" for r in rounds) + " |", "|---|---|" + "---|" * len(rounds)]
    for c, figures in result["classes"].items():
        for k, by_round in figures.items():
            lines.append(f"| {c} | {k} | " + " | ".join(
                f"{by_round[r]:.0f}" if r in by_round else "-" for r in rounds) + " |")
    lines += ["", f"## Round {max(rounds)}: {first} against {second}, per client and class", "",
              f"| run | client | class | test objects | {first} AP | {second} AP | share of the gain difference |",
              "|---|---|---|---|---|---|---|"]
    for row in result["last_round_shares"]:
        lines.append(f"| {Path(row['run']).name} | {row['client']} | {row['class']} | {row['objects']:.0f} | "
                     f"{row['first']:.0f} | {row['second']:.0f} | {row['share']:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.own_gap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (replicates) holding both methods' records")
    parser.add_argument("--methods", nargs=2, default=["diredi", "local"], metavar=("FIRST", "SECOND"))
    parser.add_argument("--also", nargs="*", default=["oracle"], help="methods shown beside them (default: oracle)")
    parser.add_argument("--rounds", nargs="+", type=int, default=[1, 5, 10, 15, 20])
    parser.add_argument("--out", type=Path, default=Path("experiments/results/own_gap"))
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.rounds):
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for path in args.runs:
        if not (Path(path) / "rounds.jsonl").exists():
            parser.error(f"{path} holds no run (no rounds.jsonl)")
    command = " ".join(["python -m experiments.own_gap", *(sys.argv[1:] if argv is None else argv)])
    result = own_gap(args.runs, tuple(args.methods), sorted(set(args.rounds)), tuple(args.also))
    result["command"] = command
    write_result(args.out, result, markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
