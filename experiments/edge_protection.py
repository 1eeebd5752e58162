"""Does the re-distilled edge keep what the manufacturer protects? Distill C levers over repeated rounds.

    python -m experiments.edge_protection --profile cpu --threads 2

Round 1 of the default federation up to the merge (as ``experiments.merge``: shared Tutor 1, each
client's Tutor 2, the default class-aware merge) gives the updated tutor. Then each probe client runs
``--rounds`` Distill C's in a row from the manufacturer's edge, each from the edge the last one left
(as a client does from round to round), with that tutor as the teacher throughout (in a federation the
tutor moves between rounds; here it is held fixed so that only the lever differs), once per lever:

* ``score weight w``: Distill C plus the tutor's class scores on the client's kept presumed classes as
  soft targets (``distill.scores``), weight w (0: today's Distill C);
* ``direct training``: the client's labels only, a DiReDi client's 60 steps per round (local training).

Scored after every round on the manufacturer's validation set, never a client's test shard:
``person`` (the protected class), the client's kept presumed classes, its new classes and its dropped
classes (released: they may fall). Writes ``edge_protection<tag>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from data.voc import CLASS_INDEX
from distill.rd import direct_training, distill_c, updated_tutor
from evaluation.ap import nan_mean, per_class_ap
from experiments.merge import round_one_deltas
from protocol.config import PAPER_DISTILL_C, resolve_run_config
from protocol.wire import work_seed
from strategies.aggregate import aggregate
from session.workspace import Session


def scores(model, val, classes, spec, protected) -> dict:
    """AP in points on the validation set: protected, kept (without protected), new, dropped."""
    ap, _ = per_class_ap(model, val, classes)
    kept = [c for c in spec.kept if c not in protected]
    return {"protected": 100 * nan_mean(ap[c] for c in protected),
            "kept": 100 * nan_mean(ap[c] for c in kept) if kept else float("nan"),
            "new": 100 * nan_mean(ap[c] for c in spec.private),
            "dropped": 100 * nan_mean(ap[c] for c in spec.dropped) if spec.dropped else float("nan")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.edge_protection", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--probe", type=int, nargs="+", default=[0, 2, 4, 6], help="clients measured")
    parser.add_argument("--rounds", type=int, default=5, help="Distill C rounds in a row per client")
    parser.add_argument("--score-weights", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--direct", action=argparse.BooleanOptionalAction, default=True,
                        help="also direct training (local) at a DiReDi client's steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="the chain and data cache")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--tag", default="", help="suffix of the output files")
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(w < 0 for w in args.score_weights):
        parser.error("--rounds must be at least 1 and every --score-weights value >= 0")
    if any(not 0 <= i < args.clients for i in args.probe):
        parser.error(f"--probe: clients are 0..{args.clients - 1}")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "cache-dir": str(args.cache),
                                 **PAPER_DISTILL_C})  # each lever against the paper's Distill C
    session = Session.open(config)
    ws, settings = session.workspace, config.client_training()
    edge = session.chain.edge
    deltas, weights, trained = round_one_deltas(session)
    tutor = updated_tutor(session.chain.tutor, aggregate(deltas, weights, config.aggregation, client_classes=trained),
                          config.beta)
    val, classes = ws.validation_set(), ws.scenario.teacher_classes
    protected = list(ws.scenario.protected_classes)
    levers = [(f"score weight {w:g}", w) for w in args.score_weights] + ([("direct training", None)] if args.direct else [])
    steps = 2 * settings.rd_iters + settings.redistill_iters

    rows = []
    for i in args.probe:
        spec, data = ws.clients[i], ws.client_train(i)
        kept = tuple(CLASS_INDEX[c] for c in spec.kept)
        start_scores = scores(edge, val, classes, spec, protected)
        for name, weight in levers:
            model = edge
            rows.append({"client": i, "lever": name, "round": 0, **start_scores})
            for r in range(1, args.rounds + 1):
                seed = work_seed(config.seed, r, i)
                if weight is None:
                    model, _ = direct_training(model, data, steps, settings, seed)
                else:
                    model, _ = distill_c(model, tutor, data, replace(settings, redistill_score_weight=weight), seed,
                                         kept_classes=kept)
                rows.append({"client": i, "lever": name, "round": r, **scores(model, val, classes, spec, protected)})
                row = rows[-1]
                print(f"client {i} {name:16s} round {r}: protected {row['protected']:5.1f} kept {row['kept']:5.1f} "
                      f"new {row['new']:5.1f} dropped {row['dropped']:5.1f}", flush=True)

    def mean(lever: str, r: int, key: str) -> float:
        return nan_mean(row[key] for row in rows if row["lever"] == lever and row["round"] == r)

    seconds = time.perf_counter() - start
    command = " ".join(["python -m experiments.edge_protection", *(sys.argv[1:] if argv is None else argv)])
    summary = {name: {str(r): {key: mean(name, r, key) for key in ("protected", "kept", "new", "dropped")}
                      for r in range(args.rounds + 1)} for name, _ in levers}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"edge_protection{args.tag}.json").write_text(json.dumps(
        {"command": command, "seconds": seconds, "probe": args.probe, "rows": rows, "mean": summary}, indent=2))
    lines = [f"# Edge protection: Distill C levers over {args.rounds} rounds ({args.profile} profile)", "",
             f"`{command}` ({seconds:.0f} s). The edge on the manufacturer's validation set, AP in points, mean over "
             f"clients {', '.join(map(str, args.probe))}; change from the manufacturer's edge in brackets.", "",
             "| lever | round | protected | kept | new | dropped |", "|---|---|---|---|---|---|"]
    for name, _ in levers:
        for r in range(1, args.rounds + 1):
            cells = [f"{summary[name][str(r)][k]:.1f} ({summary[name][str(r)][k] - summary[name]['0'][k]:+.1f})"
                     for k in ("protected", "kept", "new", "dropped")]
            lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    (args.out / f"edge_protection{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
