"""How much Distill C a client needs for its edge to take what the updated tutor knows.

    python -m experiments.distill_c --profile cpu --threads 2

Round 1 of the default federation up to the merge (as ``experiments.merge``: shared Tutor 1, each
client's Tutor 2, the default class-aware merge), then Distill C of the deployed edge from the
updated tutor on each chosen client's data under several step budgets and learning rates, and
direct training (labels only) at the same steps. Scored on the manufacturer's validation set (never
a client's test shard): the edge's AP on the client's new classes and mAP on the presumed classes.
Writes ``distill_c.json`` and ``distill_c.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill.rd import direct_training, distill_c, updated_tutor
from experiments.merge import round_one_deltas
from evaluation.ap import nan_mean, per_class_ap
from protocol.config import resolve_run_config
from protocol.wire import work_seed
from strategies.aggregate import aggregate
from session.workspace import Session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.distill_c", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--probe", type=int, nargs="+", default=[4, 2], help="clients whose Distill C is measured")
    parser.add_argument("--steps", type=int, nargs="+", default=[30, 90, 150])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 6e-3])
    parser.add_argument("--ratios", type=float, nargs="+", default=[None],
                        help="Distill C's distillation / detection loss ratio (default: the recipe's)")
    parser.add_argument("--freeze-norm", nargs="+", choices=("no", "yes"), default=["no"],
                        help="BatchNorm statistics re-estimated on the client's batches (no) or kept (yes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--tag", default="", help="suffix of the output files (distill_c<tag>.json/.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients})
    session = Session.open(config)
    ws, settings = session.workspace, config.client_training()
    tutor, edge = session.chain.tutor, session.chain.edge
    deltas, weights, trained = round_one_deltas(session)
    merged = aggregate(deltas, weights, config.aggregation, client_classes=trained)
    new_tutor = updated_tutor(tutor, merged, config.beta)
    val, classes = ws.validation_set(), ws.scenario.teacher_classes

    def score(model, private) -> dict:
        ap, _ = per_class_ap(model, val, classes)
        return {"new_ap": 100 * nan_mean(ap[c] for c in private),
                "presumed_mAP": 100 * nan_mean(ap[c] for c in ws.scenario.presumed_classes)}

    rows = []
    for i in args.probe:
        spec, data = ws.clients[i], ws.client_train(i)
        rows.append({"client": i, "phase": "deployed edge", "steps": 0, "lr": None, **score(edge, spec.private)})
        rows.append({"client": i, "phase": "updated tutor", "steps": 0, "lr": None, **score(new_tutor, spec.private)})
        for steps in args.steps:
            for lr in args.lrs:
                for freeze, ratio in ((f, r) for f in args.freeze_norm for r in args.ratios):
                    s = replace(settings, redistill_iters=steps, lr=lr, redistill_lr=lr, client_freeze_norm=freeze == "yes",
                                redistill_target_ratio=ratio or settings.redistill_target_ratio)
                    seed = work_seed(config.seed, 1, i)
                    distilled, _ = distill_c(edge, new_tutor, data, s, seed)
                    direct, _ = direct_training(edge, data, steps, s, seed)
                    for phase, model in (("Distill C", distilled), ("direct training", direct)):
                        if phase == "direct training" and ratio is not None and ratio != args.ratios[0]:
                            continue  # direct training has no distillation term: one row per setting is enough
                        rows.append({"client": i, "phase": phase, "steps": steps, "lr": lr, "freeze_norm": freeze,
                                     "ratio": s.redistill_target_ratio if phase == "Distill C" else None,
                                     **score(model, spec.private)})
                        print(f"client {i} {phase:16s} {steps:4d} steps lr {lr:g} BN kept {freeze} ratio "
                              f"{rows[-1]['ratio']}: new "
                              f"{rows[-1]['new_ap']:5.1f} presumed {rows[-1]['presumed_mAP']:5.1f}", flush=True)
    seconds = time.perf_counter() - start
    command = "python -m experiments.distill_c " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"distill_c{args.tag}.json").write_text(json.dumps({"command": command, "seconds": seconds, "rows": rows}, indent=2))
    lines = [f"# Distill C budget after one federated round ({args.profile} profile)", "",
             f"`{command}` ({seconds:.0f} s). Edge on the manufacturer's validation set, AP in percent.", "",
             "| client | phase | steps | lr | BN statistics kept | distill ratio | new classes | presumed mAP |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['client']} | {r['phase']} | {r['steps']} | {r['lr'] if r['lr'] is not None else '—'} | "
              f"{r.get('freeze_norm', '—')} | {r.get('ratio') or '—'} | {r['new_ap']:.1f} | {r['presumed_mAP']:.1f} |"
              for r in rows]
    (args.out / f"distill_c{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
