"""Where the deployed edge's swing on the protected class comes from: each method's round-to-round moves.

    python -m experiments.swing experiments/results/compare/runs/rep0 ...rep1 ...rep2 \
        --out experiments/results/swing

Chaudhry's forgetting takes a client's best earlier round, so it measures how far the deployed edge
moves on a protected class from one round to the next on the client's test shard. Per method, over the
given run folders (replicates), clients and protected classes: the mean absolute move per round
(``step``, AP points); how much of it all clients share in a round (``common``: the standard deviation
of the round's mean move over clients, against ``spread``, the standard deviation of all moves); and
for DiReDi, the tutor's own move on the manufacturer's validation set per round and the correlation of
each client's move with it (is the edge's swing the tutor's?). Reads records only.

How much of Chaudhry's forgetting at the last round such moves make without any drift
(``forgetting`` against ``forgetting_no_drift``): per client and protected class, paths of as many
points whose values are independent draws around one constant, spread so that their moves have the
path's own standard deviation (sd of moves / sqrt 2 per point); the mean forgetting of such paths is
what the swing alone gives when no round is better than another.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from report.study import read_replicate


def protected_moves(records: list[dict], specs: list[dict], method: str) -> dict[int, dict[int, list[float]]]:
    """round -> client -> the moves (AP points) of each of the client's protected classes from the round
    before (the first round's from the edge it started with)."""
    protected = {int(s["client"]): list(s.get("protected") or []) for s in specs}
    moves: dict[int, dict[int, list[float]]] = defaultdict(dict)
    for client, classes in protected.items():
        mine = sorted((r for r in records if r["method"] == method and r["client"] == client), key=lambda r: r["round"])
        for before, after in zip([None, *mine], mine):
            start = after["ap_before"] if before is None else before["ap_after"]
            pairs = [(start.get(c), after["ap_after"].get(c)) for c in classes]
            values = [100 * (b - a) for a, b in pairs if a is not None and b is not None and np.isfinite(a - b)]
            if values:
                moves[after["round"]][client] = values
    return moves


def protected_paths(records: list[dict], specs: list[dict], method: str) -> list[list[float]]:
    """Per client and protected class the AP path (points): the start, then after every round."""
    paths = []
    for spec in specs:
        mine = sorted((r for r in records if r["method"] == method and r["client"] == int(spec["client"])),
                      key=lambda r: r["round"])
        for c in spec.get("protected") or []:
            path = [r["ap_after"].get(c) for r in mine]
            if mine and all(v is not None and np.isfinite(v) for v in [mine[0]["ap_before"].get(c), *path]):
                paths.append([100 * v for v in [mine[0]["ap_before"][c], *path]])
    return paths


def last_forgetting(path: np.ndarray) -> np.ndarray:
    """Chaudhry's forgetting at the last point of each row: the best earlier value minus the last, >= 0."""
    return np.maximum(path[..., :-1].max(axis=-1) - path[..., -1], 0.0)


def forgetting_without_drift(path: list[float], draws: int, rng: np.random.Generator) -> float:
    """The mean ``last_forgetting`` of ``draws`` paths of independent normal values with the path's length
    and the spread of its moves (each value's sd = the moves' sd / sqrt 2)."""
    values = np.asarray(path, dtype=float)
    sd = float(np.std(np.diff(values))) / np.sqrt(2) if len(values) > 1 else 0.0
    return float(last_forgetting(rng.normal(0.0, sd, size=(draws, len(values)))).mean())


def tutor_moves(folder: Path, classes: list[str]) -> dict[int, float]:
    """round -> the tutor's move on the protected classes (mean, AP points) on the validation set."""
    path = folder / "tutor.json"
    if not path.is_file():
        return {}
    history = {t["round"]: t["ap"] for t in json.loads(path.read_text())}
    return {r: float(np.mean([100 * (history[r][c] - history[r - 1][c]) for c in classes]))
            for r in history if r - 1 in history}


def swing(folders: list[Path], method: str, draws: int = 2000, seed: int = 0) -> dict | None:
    steps, spread, common, edge_tutor = [], [], [], []
    tutor_steps, forgotten, no_drift = [], [], []
    rng = np.random.default_rng(seed)
    for folder in folders:
        _, records, specs, _ = read_replicate(folder)
        moves = protected_moves(records, specs, method)
        if not moves:
            return None
        for path in protected_paths(records, specs, method):
            forgotten.append(float(last_forgetting(np.asarray(path))))
            no_drift.append(forgetting_without_drift(path, draws, rng))
        classes = sorted({c for s in specs for c in (s.get("protected") or [])})
        tutor = tutor_moves(folder, classes) if method == "diredi" else {}
        for r, by_client in moves.items():
            flat = [v for vs in by_client.values() for v in vs]
            steps += [abs(v) for v in flat]
            spread += flat
            common.append(float(np.mean(flat)))
            if r in tutor:
                tutor_steps.append(abs(tutor[r]))
                edge_tutor += [(v, tutor[r]) for v in flat]
    out = {"step": float(np.mean(steps)), "spread": float(np.std(spread)), "common": float(np.std(common)),
           "moves": len(steps), "forgetting": float(np.mean(forgotten)),
           "forgetting_no_drift": float(np.mean(no_drift))}
    if edge_tutor:
        edge, tutor = np.array(edge_tutor).T
        out["tutor_step"] = float(np.mean(tutor_steps))
        out["edge_tutor_correlation"] = float(np.corrcoef(edge, tutor)[0, 1])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.swing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (one per replicate)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/swing"))
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not (folder / "rounds.jsonl").is_file():
            parser.error(f"{folder} holds no rounds.jsonl")
    _, records, _, _ = read_replicate(args.runs[0])
    methods = list(dict.fromkeys(r["method"] for r in records))
    rows = {m: s for m in methods if (s := swing(args.runs, m)) is not None}
    command = " ".join(["python -m experiments.swing", *(sys.argv[1:] if argv is None else argv)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "methods": rows}, indent=2))
    lines = ["# The protected class's move per round at each method's deployed edge", "", f"`{command}`", "",
             "AP points on the clients' test shards, over replicates, clients, rounds and protected classes; the "
             "tutor's on the manufacturer's validation set.", "",
             "Forgetting: Chaudhry's at the last round (best earlier AP minus the last), mean over replicates, "
             "clients and protected classes; without drift: the mean over 2,000 paths of as many independent values "
             "around a constant whose moves have the path's own sd (what the moves alone give when no round is "
             "better than another).", "",
             "| method | mean abs move per round | sd of moves | sd of the round's mean over clients | tutor's mean abs move | "
             "correlation edge move / tutor move | forgetting, last round | forgetting without drift |",
             "|---|---|---|---|---|---|---|---|"]
    for m, s in rows.items():
        tutor = f"{s['tutor_step']:.2f}" if "tutor_step" in s else "-"
        corr = f"{s['edge_tutor_correlation']:+.2f}" if "edge_tutor_correlation" in s else "-"
        lines.append(f"| {m} | {s['step']:.1f} | {s['spread']:.1f} | {s['common']:.1f} | {tutor} | {corr} | "
                     f"{s['forgetting']:.1f} | {s['forgetting_no_drift']:.1f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
