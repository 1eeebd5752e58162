"""Reproduce the paper's Table III (Exp 1: learn cat; Exp 2: learn dog, drop horse) and a Table IV
of our own (wall time and peak memory per phase) on the embedded synthetic data.

    python -m experiments.table3 --profile cpu --exp exp1 exp2 --out experiments/results

Writes, per experiment, ``table3-<exp>.md`` and ``table3-<exp>.json`` (key ``rows``: row id ->
``{"mAP", "new_ap", "presumed_mAP"}`` in percent, ``new_ap`` null where the row is not scored on the
new class).

Rows: the manufacturer chain (Large / Tutor after Distill A / Edge after Distill B) evaluated on
the manufacturer's validation set; then, per experiment, every model evaluated on the client's
held-out test shard over the presumed + private classes (dropped classes included, so a drop shows).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from distill.rd import (ClientTraining, client_delta, direct_training, distill_c, reverse_distill_tutor1,
                        reverse_distill_tutor2, updated_tutor)
from models.parts import delta_norm
from evaluation.ap import evaluate_model
from data.voc import VOC_CLASSES
from session.workspace import prepare

PAPER_TABLE3 = {  # mAP, from the paper's Table III (VOC, GPU), for side-by-side reading
    "exp1": {"Tutor 1": 53.7, "Tutor 2": 56.3, "Original tutor": 57.0, "Updated tutor": 58.7,
             "Original edge": 43.8, "Edge, direct training": 53.9, "Edge, Distill C": 59.9},
    "exp2": {"Tutor 1": 57.3, "Tutor 2": 56.7, "Original tutor": 55.8, "Updated tutor": 59.5,
             "Original edge": 46.3, "Edge, direct training": 66.3, "Edge, Distill C": 66.2},
}
PAPER_CHAIN = {"Large (teacher)": 77.8, "Tutor after Distill A": 69.6, "Edge after Distill B": 55.3}


def class_ids(names) -> list[int]:
    return [VOC_CLASSES.index(n) for n in names]


ROW_IDS = {"Large (teacher)": "teacher", "Tutor after Distill A": "tutor", "Edge after Distill B": "edge",
           "Tutor 1": "tutor1", "Tutor 2": "tutor2", "Original tutor": "original_tutor",
           "Updated tutor": "updated_tutor", "Original edge": "original_edge",
           "Edge, direct training": "edge_direct_training", "Edge, Distill C": "edge_distill_c"}


def evaluate_row(model, dataset, names, focus: list[str]) -> dict:
    result = evaluate_model(model, dataset, class_ids(names))
    per_class = result.to_dict(VOC_CLASSES)
    row = {"mAP": result.mAP, "precision": result.precision, "recall": result.recall, "f1": result.f1}
    for name in focus:
        row[f"AP {name}"] = result.ap.get(VOC_CLASSES.index(name), float("nan"))
    row["per_class"] = per_class
    return row


def run_experiment(exp: str, args, settings_overrides: dict) -> dict:
    log = logging.getLogger("table3")
    ws = prepare(args.profile, exp, num_clients=1, seed=args.seed, cache_dir=args.cache, device=args.device)
    spec = ws.clients[0]
    focus = list(spec.private) + list(spec.dropped)
    chain = ws.chain(progress=not args.quiet)
    settings = ClientTraining.from_profile(ws.profile, **settings_overrides)
    log.info("%s: private %s, dropped %s, settings %s", exp, spec.private, spec.dropped, settings)

    rows: dict[str, dict] = {}
    phases: dict[str, dict] = {}
    val = ws.validation_set()
    s = ws.scenario
    if not args.skip_chain_rows:
        rows["Large (teacher)"] = evaluate_row(chain.teacher, val, s.teacher_classes, [])
        val_presumed = ws.dataset(ws.shards.manufacturer_val, s.presumed_classes)
        rows["Tutor after Distill A"] = evaluate_row(chain.tutor, val_presumed, s.presumed_classes, [])
        rows["Edge after Distill B"] = evaluate_row(chain.edge, val_presumed, s.presumed_classes, [])
    for name, stage in chain.stages.items():
        phases[name] = {**stage.report, "reused_cache": stage.reused}

    test = ws.client_test(0)
    names = ws.eval_classes()
    seed = args.seed
    t1, r1 = reverse_distill_tutor1(chain.tutor, chain.edge, ws.client_presumed(0), settings, seed, not args.quiet)
    t2, r2 = reverse_distill_tutor2(chain.tutor, t1, chain.edge, ws.client_train(0), settings, seed, not args.quiet)
    delta = client_delta(t1, t2, settings)
    new_tutor = updated_tutor(chain.tutor, delta, settings.beta)
    edge_c, rc = distill_c(chain.edge, new_tutor, ws.client_train(0), settings, seed, not args.quiet)
    # The other Distill C choice, measured side by side: labels instead of the tutor's detections.
    other_targets = "labels" if settings.redistill_targets == "teacher" else "teacher"
    edge_c2, rc2 = distill_c(chain.edge, new_tutor, ws.client_train(0),
                             replace(settings, redistill_targets=other_targets), seed, not args.quiet)
    edge_d, rd = direct_training(chain.edge, ws.client_train(0), settings.redistill_iters, settings, seed,
                                 progress=not args.quiet)
    phases.update({"RD tutor 1": r1.summary(), "RD tutor 2": r2.summary(), "Distill C": rc.summary(),
                   f"Distill C ({other_targets})": {**rc2.summary(), "name": f"Distill C ({other_targets})"},
                   "Direct training": rd.summary()})

    for label, model in [("Tutor 1", t1), ("Tutor 2", t2), ("Original tutor", chain.tutor),
                         ("Updated tutor", new_tutor), ("Original edge", chain.edge),
                         ("Edge, direct training", edge_d), ("Edge, Distill C", edge_c),
                         (f"Edge, Distill C with {other_targets} targets", edge_c2)]:
        rows[label] = evaluate_row(model, test, names, focus)
    return {"experiment": exp, "private": list(spec.private), "dropped": list(spec.dropped),
            "eval_classes": names, "settings": settings.to_dict(), "delta_norm": delta_norm(delta),
            "delta_bytes": sum(t.numel() * t.element_size() for t in delta.values()),
            "test_images": len(test), "presumed": list(s.presumed_classes), "rows": rows, "phases": phases}


def rows_json(res: dict, presumed: list[str]) -> dict:
    """The machine-readable rows: id -> mAP, AP on the new (private) classes, mAP on the presumed classes."""
    out = {}
    for label, row in res["rows"].items():
        key = ROW_IDS.get(label, label.lower().replace(", ", "_").replace(" ", "_"))
        new = [row[f"AP {c}"] for c in res["private"] if f"AP {c}" in row and row[f"AP {c}"] == row[f"AP {c}"]]
        pres = [v for c, v in row["per_class"]["ap"].items() if c in presumed and v is not None]
        out[key] = {"label": label, "mAP": 100 * row["mAP"],
                    "new_ap": 100 * sum(new) / len(new) if new else None,
                    "presumed_mAP": 100 * sum(pres) / len(pres) if pres else None}
    return out


def _ratio(x) -> str:
    return "—" if x is None or x != x else f"{x:.2f}"


def _pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.1f}"


def markdown(results: list[dict]) -> str:
    out = []
    for res in results:
        exp = res["experiment"]
        focus = list(dict.fromkeys(k for r in res["rows"].values() for k in r if k.startswith("AP ")))
        out.append(f"### {exp}: private {', '.join(res['private']) or '—'}; dropped {', '.join(res['dropped']) or '—'}"
                   f" ({res['test_images']} test images, classes: {', '.join(res['eval_classes'])})\n")
        out.append("| model | mAP | precision | recall | F1 | " + " | ".join(focus) + " | paper mAP |")
        out.append("|---|---|---|---|---|" + "---|" * len(focus) + "---|")
        for label, row in res["rows"].items():
            paper = PAPER_TABLE3.get(exp, {}).get(label, PAPER_CHAIN.get(label))
            cells = [_pct(row["mAP"]), _pct(row["precision"]), _pct(row["recall"]), _pct(row["f1"])]
            cells += [_pct(row.get(k, float("nan"))) for k in focus]
            out.append(f"| {label} | " + " | ".join(cells) + f" | {paper if paper is not None else '—'} |")
        out.append(f"\nDelta: {res['delta_bytes'] / 1e6:.2f} MB, L2 norm {res['delta_norm']:.3f}.\n")
        out.append("| phase (Table IV) | iterations | wall time (s) | peak RSS (MiB) | cache | distill/det loss start | end |")
        out.append("|---|---|---|---|---|---|---|")
        for name, p in res["phases"].items():
            cache = "reused" if p.get("reused_cache") else "built"
            out.append(f"| {p.get('name', name)} | {p.get('iters')} | {p.get('seconds', float('nan')):.1f} | "
                       f"{p.get('peak_rss_mb', float('nan')):.0f} | {cache if 'reused_cache' in p else '—'} | "
                       f"{_ratio(p.get('loss_ratio_start'))} | {_ratio(p.get('loss_ratio_end'))} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--exp", nargs="+", default=["exp1", "exp2"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override an ClientTraining field, e.g. t2_from_t1=false beta=0.5")
    parser.add_argument("--skip-chain-rows", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(args.threads, 1))
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in ClientTraining.__dataclass_fields__:
            parser.error(f"unknown setting {key!r}; choose from {', '.join(ClientTraining.__dataclass_fields__)}")
        current = ClientTraining.__dataclass_fields__[key].type
        overrides[key] = value.lower() in ("1", "true", "yes") if current in ("bool", bool) else (
            value if current in ("str", str) else (int(value) if current in ("int", int) else float(value)))
    start = time.perf_counter()
    cmd = "python -m experiments.table3 " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for exp in args.exp:
        t0 = time.perf_counter()
        res = run_experiment(exp, args, overrides)
        payload = {"command": cmd, "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
                   **res, "rows_full": res["rows"], "rows": rows_json(res, res["presumed"])}
        (args.out / f"table3-{exp}.json").write_text(json.dumps(payload, indent=1, default=float))
        text = markdown([res])
        (args.out / f"table3-{exp}.md").write_text(f"Command: `{cmd}` ({time.perf_counter() - t0:.0f} s)\n\n{text}")
        print(text)
        print(f"wrote {args.out / f'table3-{exp}.md'}")
    log = logging.getLogger("table3")
    log.info("done in %.0f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
