"""Which merge lets disjoint client knowledge add up in the tutor: one round of the default federation's
RD, every client's delta computed once, then each merge rule and scale applied to the same deltas.

    python -m experiments.merge --profile cpu --threads 2

Round 1 exactly as the federation runs it (``RunConfig`` defaults: the shared Tutor 1 from the
server's edge on public presumed data, then each client's Tutor 2 on its own data, same seeds), so
the deltas are the ones the server would receive. Each merge is scored by the updated tutor on the
manufacturer's validation set (never a client's test shard): AP on each client's new classes, mAP
over the presumed classes, AP on the protected classes. Writes ``merge.json`` and ``merge.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data.voc import CLASS_INDEX
from distill.rd import client_delta, reverse_distill_tutor1, reverse_distill_tutor2, updated_tutor
from evaluation.ap import ap_by_name, bootstrap_ap_drop, nan_mean, predict
from models.parts import delta_norm
from protocol.config import resolve_run_config
from protocol.wire import SERVER, work_seed
from strategies.aggregate import aggregate
from session.workspace import Session

# (label, aggregation, options); every one is also tried at each --betas value
MERGES = [
    ("weighted mean", "weighted", {}),
    ("trimmed mean (0.2)", "trimmed", {"trim_fraction": 0.2}),
    ("TIES (keep 0.2)", "ties", {}),
    ("class-aware, shared by weighted mean", "class_aware", {"shared": "weighted"}),
    ("class-aware, shared by trimmed mean", "class_aware", {"shared": "trimmed"}),
    ("class-aware, shared by TIES", "class_aware", {"shared": "ties"}),
]


def score(tutor, session: Session, keep: dict | None = None) -> dict:
    """The tutor's figures; ``keep`` receives its predictions (for the bootstrap below)."""
    ws = session.workspace
    s = ws.scenario
    predictions, targets = predict(tutor, ws.validation_set())
    ap, _ = ap_by_name(predictions, targets, s.teacher_classes)
    if keep is not None:
        keep.update(predictions=predictions, targets=targets)
    new = {f"c{i}": nan_mean(ap[c] for c in spec.private) for i, spec in enumerate(ws.clients)}
    return {"ap": {k: 100 * v for k, v in ap.items()},
            "new_ap_per_client": {k: 100 * v for k, v in new.items()},
            "new_ap": 100 * nan_mean(new.values()),
            "presumed_mAP": 100 * nan_mean(ap[c] for c in s.presumed_classes),
            "protected_ap": 100 * nan_mean(ap[c] for c in s.protected_classes)}


def round_one_deltas(session: Session) -> tuple[list[dict], list[float], list[set[int]]]:
    """Round 1's deltas as the federation computes them (shared Tutor 1 from the server's edge, then
    each client's Tutor 2, same seeds), with each client's weight (train images) and trained classes."""
    config, ws = session.config, session.workspace
    settings, tutor, edge = config.client_training(), session.chain.tutor, session.chain.edge
    tutor1, _ = reverse_distill_tutor1(tutor, edge, ws.chain_data().presumed_train, settings,
                                       seed=work_seed(config.seed, 1, SERVER))
    deltas, weights, trained = [], [], []
    for i, spec in enumerate(ws.clients):
        data = ws.client_train(i)
        tutor2, _ = reverse_distill_tutor2(tutor1, tutor1, edge, data, settings, seed=work_seed(config.seed, 1, i))
        deltas.append(client_delta(tutor1, tutor2, settings))
        weights.append(float(len(data)))
        trained.append({CLASS_INDEX[c] for c in spec.train_classes})
        print(f"client {i} ({spec.name}): delta norm {delta_norm(deltas[-1]):.3f}", flush=True)
    return deltas, weights, trained


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--betas", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=200, help="resamples of the validation images")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "seed": args.seed})
    session = Session.open(config)
    ws, tutor = session.workspace, session.chain.tutor
    deltas, weights, trained = round_one_deltas(session)
    original: dict = {}
    rows = [{"merge": "original tutor", "aggregation": None, "beta": 0.0, **score(tutor, session, original)}]
    protected = [CLASS_INDEX[c] for c in ws.scenario.protected_classes]
    for i, delta in enumerate(deltas):  # each client's delta alone: what there is to merge, and its cost
        candidate: dict = {}
        alone = score(updated_tutor(tutor, delta, 1.0), session, candidate)
        # Is a protected-class drop damage or chance? The drop's paired bootstrap standard deviation
        # over the validation images (what verification's tolerance should be stated against).
        noise = bootstrap_ap_drop(original["predictions"], candidate["predictions"], original["targets"],
                                  protected, samples=args.bootstrap, seed=config.seed)
        rows.append({"merge": f"client {i} alone", "aggregation": None, "beta": 1.0, **alone,
                     "protected_drop": rows[0]["protected_ap"] - alone["protected_ap"],
                     "protected_drop_std": 100 * nan_mean(noise.values())})
        print(f"client {i} alone: protected drop {rows[-1]['protected_drop']:.1f} "
              f"+- {rows[-1]['protected_drop_std']:.1f} (bootstrap std)", flush=True)
    for label, method, options in MERGES:
        opts = dict(options, client_classes=trained) if method == "class_aware" else options
        merged = aggregate(deltas, weights, method, **opts)
        for beta in args.betas:
            row = {"merge": label, "aggregation": method, "options": options, "beta": beta,
                   "merged_norm": delta_norm(merged), **score(updated_tutor(tutor, merged, beta), session)}
            rows.append(row)
            print(f"{label:40s} beta {beta:<4} new {row['new_ap']:5.1f}  presumed {row['presumed_mAP']:5.1f}  "
                  f"protected {row['protected_ap']:5.1f}", flush=True)
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m experiments.merge " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    (args.out / "merge.json").write_text(json.dumps({"command": command, "seconds": seconds, "config": config.to_dict(),
                                                     "rows": rows}, indent=2))
    lines = [f"# Merge rules on one round's deltas ({args.profile} profile, {args.clients} clients)", "",
             f"`{command}` ({seconds:.0f} s). The updated tutor on the manufacturer's validation set, AP in "
             "percent: mean over clients of the AP on the client's new classes; mAP over the presumed "
             "classes; AP on the protected classes.", "",
             "| merge | beta | new classes | " + " | ".join(f"c{i}" for i in range(len(ws.clients)))
             + " | presumed | protected |",
             "|---|---|---|" + "---|" * len(ws.clients) + "---|---|"]
    noise = [r for r in rows if "protected_drop" in r]
    for row in rows:
        per = " | ".join(f"{v:.1f}" for v in row["new_ap_per_client"].values())
        lines.append(f"| {row['merge']} | {row['beta']:g} | {row['new_ap']:.1f} | {per} | {row['presumed_mAP']:.1f} | "
                     f"{row['protected_ap']:.1f} |")
    lines += ["", "Each client's delta alone on the protected classes: the drop and its paired bootstrap "
              f"standard deviation over the {len(original['targets'])} validation images ({args.bootstrap} resamples):", "",
              "| client | protected AP drop | bootstrap std | drop / std |", "|---|---|---|---|"]
    lines += [f"| {r['merge']} | {r['protected_drop']:.1f} | {r['protected_drop_std']:.1f} | "
              f"{r['protected_drop'] / r['protected_drop_std']:.1f} |" for r in noise]
    (args.out / "merge.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
