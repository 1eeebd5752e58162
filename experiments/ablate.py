"""What each link of DiReDi's knowledge transfer is worth: one lever at a time against one baseline.

    python -m experiments.ablate --profile cpu --sections balance links rd

Sections (each seeded, each writing ``ablation-<section>.json``; ``ablation.json`` and ``ablation.md``
merge every section present in ``--out``):

* ``balance``: Distill A for ``--balance-steps`` steps from the same start under each distillation
  loss / balance (labels only, FGD as the paper, FGD calibrated, FGD auto, PKD fixed, PKD auto, and the
  default without inheriting), scored on the manufacturer's validation set. This is what the
  default ``KDRecipe`` is chosen on: no client data is involved.
* ``links``: for Distill A, Distill B and Distill C, KD (the default recipe) vs labels-only
  training from the same start at equal steps. Distill A/B: the cached chain's stage vs a
  labels-only student from the same (inherited) start, on the manufacturer's validation set over
  the presumed classes. Distill C: from the deployed edge on Exp 1's client data, scored on the
  client's test shard; its labels-only twin is the paper's direct training.
* ``scratch``: Distill A and Distill B's labels-only twins from a fresh start (no inheriting) at the
  same steps: what inheriting and the distillation loss are worth together.
* ``rd``: Exp 1's reverse distillation, one lever at a time against the default ``ClientTraining``:
  tutor 1 / tutor 2 label weights (eq. 8), where tutor 2 starts, beta of eq. 10 (including -1, a
  sign-flipped delta), frozen vs trainable backbone, and RD's optimiser. Each row reports the
  updated tutor on the new class and on the presumed classes, on the manufacturer's validation set
  (which is what the defaults may be chosen on) and on the client's test shard.
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
from distill.chain import chain_phases, student_start
from distill.trainer import KDRecipe, PAPER_FGD, train
from models.parts import delta_norm
from evaluation.ap import evaluate_model, nan_mean
from data.voc import VOC_CLASSES
from session.workspace import prepare

SECTIONS = ("balance", "links", "rd", "scratch")
log = logging.getLogger("ablate")


def class_ids(names) -> list[int]:
    return [VOC_CLASSES.index(n) for n in names]


def score(model, dataset, names: list[str]) -> dict:
    """mAP and per-class AP (percent) of ``model`` over ``names``."""
    result = evaluate_model(model, dataset, class_ids(names))
    return {"mAP": 100 * result.mAP,
            "ap": {n: 100 * result.ap.get(VOC_CLASSES.index(n), float("nan")) for n in names}}


def balance_of(report) -> dict:
    b = report.balance()
    return {"loss_ratio_start": b["loss_ratio_start"], "loss_ratio_end": b["loss_ratio_end"],
            "det_loss_end": b["det_loss_end"], "seconds": report.seconds}


# ------------------------------------------------------------------------------------------------
def section_balance(ws, chain, args) -> dict:
    """Distill A under each loss/balance at equal steps from the same start (manufacturer's data only)."""
    s = ws.scenario
    data = ws.chain_data().presumed_train
    val = ws.dataset(ws.shards.manufacturer_val, s.presumed_classes)
    base = chain_phases(ws.profile, args.seed, KDRecipe())["distill_a"]
    base = replace(base, iters=args.balance_steps, name="Distill A (balance)")
    variants = {
        "labels only": (dict(distill_weight=0.0), True),
        "FGD, fixed weights (the paper)": (PAPER_FGD.phase_fields(), True),
        "FGD, calibrated (ratio 1 at step 0)": (dict(distill_loss="fgd", balance="calibrated", target_ratio=1.0), True),
        "FGD, auto (ratio 1)": (dict(distill_loss="fgd", balance="auto", target_ratio=1.0), True),
        "PKD, fixed weight 6": (dict(distill_loss="pkd", balance="fixed"), True),
        "PKD, auto (ratio 1)": (dict(distill_loss="pkd", balance="auto", target_ratio=1.0), True),
        "PKD, auto (ratio 1), no inheriting": (dict(distill_loss="pkd", balance="auto", target_ratio=1.0), False),
    }
    rows = {}
    for label, (fields, inherit) in variants.items():
        student = student_start(ws.profile, "tutor", args.seed + 1, chain.teacher if inherit else None).to(ws.device)
        report = train(student, data, replace(base, **fields), teacher=chain.teacher, progress=not args.quiet)
        rows[label] = {**score(student, val, s.presumed_classes), **balance_of(report), "steps": args.balance_steps,
                       "inherit": inherit, **fields}
        log.info("balance %s: mAP %.1f ratio %.2f -> %.2f", label, rows[label]["mAP"],
                 rows[label]["loss_ratio_start"], rows[label]["loss_ratio_end"])
    return {"steps": args.balance_steps, "rows": rows}


# ------------------------------------------------------------------------------------------------
def rd_run(ws, chain, settings: ClientTraining, seed: int, progress: bool):
    t1, r1 = reverse_distill_tutor1(chain.tutor, chain.edge, ws.client_presumed(0), settings, seed, progress)
    t2, r2 = reverse_distill_tutor2(chain.tutor, t1, chain.edge, ws.client_train(0), settings, seed, progress)
    return t1, t2, client_delta(t1, t2, settings), (r1, r2)


def tutor_effect(model, ws, new: list[str]) -> dict:
    """The updated tutor on the new class(es) and on the presumed classes, on the manufacturer's
    validation set and on the client's test shard."""
    s = ws.scenario
    out = {}
    for where, dataset, names in (("val", ws.validation_set(), [*s.presumed_classes, *new]),
                                  ("test", ws.client_test(0), ws.eval_classes())):
        r = score(model, dataset, names)
        out[where] = {"new_ap": nan_mean(r["ap"][n] for n in new),
                      "presumed_mAP": nan_mean(r["ap"][n] for n in s.presumed_classes),
                      "protected_ap": nan_mean(r["ap"][n] for n in s.protected_classes), "ap": r["ap"]}
    return out


def section_rd(ws, chain, args) -> dict:
    spec = ws.clients[0]
    new = list(spec.private)
    base = ClientTraining.from_profile(ws.profile)
    levers = {
        "default": {},
        "tutor 1 label weight 1.0": {"t1_label_weight": 1.0},
        "tutor 2 label weight 0.1": {"t2_label_weight": 0.1},
        "tutor 2 starts from the original tutor": {"t2_from_t1": False},
        "trainable backbone": {"freeze_backbone": False},
        "RD optimiser AdamW (lr 2e-3)": {"rd_optimizer": "adamw", "rd_lr": 2e-3},
        "RD with FGD, fixed weights (the paper)": {"rd_distill_loss": "fgd", "rd_balance": "fixed"},
    }
    levers = {k: v for k, v in levers.items() if not args.rd_levers or k == "default" or k in args.rd_levers}
    rows = {"original tutor": {**tutor_effect(chain.tutor, ws, new)}}
    default_delta = None
    for label, overrides in levers.items():
        settings = replace(base, **overrides)
        _, _, delta, (r1, r2) = rd_run(ws, chain, settings, args.seed, not args.quiet)
        tutor = updated_tutor(chain.tutor, delta, settings.beta)
        rows[label] = {**tutor_effect(tutor, ws, new), "overrides": overrides, "delta_norm": delta_norm(delta),
                       "tutor1": balance_of(r1), "tutor2": balance_of(r2)}
        log.info("rd %s: val new %.1f presumed %.1f", label, rows[label]["val"]["new_ap"],
                 rows[label]["val"]["presumed_mAP"])
        if label == "default":
            default_delta = delta
    for beta in args.betas:  # eq. 10's factor needs no retraining: the default delta, rescaled
        tutor = updated_tutor(chain.tutor, default_delta, beta)
        rows[f"beta {beta:g}" + (" (sign-flipped delta)" if beta < 0 else "")] = {
            **tutor_effect(tutor, ws, new), "overrides": {"beta": beta}}
    return {"experiment": args.exp, "new_classes": new, "rd_iters": base.rd_iters, "rows": rows}


# ------------------------------------------------------------------------------------------------
def section_links(ws, chain, args) -> dict:
    s = ws.scenario
    val = ws.dataset(ws.shards.manufacturer_val, s.presumed_classes)
    recipe = KDRecipe()
    phases = chain_phases(ws.profile, args.seed, recipe)
    links = {}
    for link, stage, role, teacher in (("distill_a", "distill_a", "tutor", chain.teacher),
                                       ("distill_b", "distill_b", "edge", chain.tutor)):
        if link not in args.links:
            continue
        phase = phases[link]
        kd_model = chain.tutor if role == "tutor" else chain.edge
        report = chain.stages[stage].report
        start = student_start(ws.profile, role, args.seed + (1 if role == "tutor" else 2),
                              teacher if recipe.inherit else None).to(ws.device)
        labels_report = train(start, ws.chain_data().presumed_train,
                              replace(phase, name=f"{link} labels only", distill_weight=0.0), progress=not args.quiet)
        links[link] = {"kd_mAP": score(kd_model, val, s.presumed_classes)["mAP"],
                       "labels_only_mAP": score(start, val, s.presumed_classes)["mAP"],
                       "steps": phase.iters, "loss_ratio_start": report.get("loss_ratio_start"),
                       "loss_ratio_end": report.get("loss_ratio_end"), "same_start": "inherited" if recipe.inherit
                       else "fresh", "evaluated_on": "manufacturer validation, presumed classes",
                       "labels_only_seconds": labels_report.seconds, "kd_seconds": report.get("seconds")}
        log.info("link %s: KD %.1f vs labels %.1f", link, links[link]["kd_mAP"], links[link]["labels_only_mAP"])

    if "distill_c" not in args.links:
        return {"links": links, "recipe": recipe.to_dict()}
    # Distill C on Exp 1's client: from the deployed edge, KD from the updated tutor + labels,
    # against direct training (labels only) at the same steps.
    settings = ClientTraining.from_profile(ws.profile)
    _, _, delta, _ = rd_run(ws, chain, settings, args.seed, not args.quiet)
    tutor = updated_tutor(chain.tutor, delta, settings.beta)
    test, names = ws.client_test(0), ws.eval_classes()
    edge_c, rc = distill_c(chain.edge, tutor, ws.client_train(0), settings, args.seed, not args.quiet)
    edge_d, _ = direct_training(chain.edge, ws.client_train(0), settings.redistill_iters, settings, args.seed,
                                progress=not args.quiet)
    b = rc.balance()
    new = list(ws.clients[0].private)
    kd, lo = score(edge_c, test, names), score(edge_d, test, names)
    links["distill_c"] = {"kd_mAP": kd["mAP"], "labels_only_mAP": lo["mAP"], "steps": settings.redistill_iters,
                          "loss_ratio_start": b["loss_ratio_start"], "loss_ratio_end": b["loss_ratio_end"],
                          "same_start": "deployed edge", "evaluated_on": f"{args.exp} client test shard",
                          "kd_new_ap": nan_mean(kd["ap"][n] for n in new),
                          "labels_only_new_ap": nan_mean(lo["ap"][n] for n in new)}
    log.info("link distill_c: KD %.1f vs labels %.1f", kd["mAP"], lo["mAP"])
    return {"links": links, "recipe": recipe.to_dict()}


def section_scratch(ws, chain, args) -> dict:
    s = ws.scenario
    val = ws.dataset(ws.shards.manufacturer_val, s.presumed_classes)
    phases = chain_phases(ws.profile, args.seed, KDRecipe())
    out = {}
    for link, role in (("distill_a", "tutor"), ("distill_b", "edge")):
        start = student_start(ws.profile, role, args.seed + (1 if role == "tutor" else 2), None).to(ws.device)
        report = train(start, ws.chain_data().presumed_train,
                       replace(phases[link], name=f"{link} labels only, fresh start", distill_weight=0.0),
                       progress=not args.quiet)
        out[link] = {"labels_only_scratch_mAP": score(start, val, s.presumed_classes)["mAP"],
                     "steps": phases[link].iters, "seconds": report.seconds}
        log.info("scratch %s: labels only from a fresh start %.1f", link, out[link]["labels_only_scratch_mAP"])
    return out


# ------------------------------------------------------------------------------------------------
def _f(x) -> str:
    return "—" if x is None or x != x else f"{x:.1f}"


def _r(x) -> str:
    return "—" if x is None or x != x else f"{x:.2f}"


def markdown(merged: dict) -> str:
    out = []
    if "links" in merged:
        out += ["### Links: KD vs labels-only from the same start, equal steps\n",
                "| link | start | steps | KD mAP | labels-only mAP | KD - labels | labels-only, fresh start | "
                "loss ratio start | end | scored on |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, link in merged["links"].items():
            out.append(f"| {name} | {link['same_start']} | {link['steps']} | {_f(link['kd_mAP'])} | "
                       f"{_f(link['labels_only_mAP'])} | {link['kd_mAP'] - link['labels_only_mAP']:+.1f} | "
                       f"{_f(link.get('labels_only_scratch_mAP'))} | {_r(link['loss_ratio_start'])} | "
                       f"{_r(link['loss_ratio_end'])} | {link['evaluated_on']} |")
        out.append("")
    if "balance" in merged:
        bal = merged["balance"]
        out += [f"### Balance: Distill A, {bal['steps']} steps, manufacturer's validation set (presumed classes)\n",
                "| loss / balance | mAP | loss ratio start | end | det loss end | s |", "|---|---|---|---|---|---|"]
        for label, r in bal["rows"].items():
            out.append(f"| {label} | {_f(r['mAP'])} | {_r(r['loss_ratio_start'])} | {_r(r['loss_ratio_end'])} | "
                       f"{_r(r['det_loss_end'])} | {r['seconds']:.0f} |")
        out.append("")
    if "rd" in merged:
        rd = merged["rd"]
        new = ", ".join(rd["new_classes"])
        out += [f"### RD levers ({rd['experiment']}, {rd['rd_iters']} steps per tutor): the updated tutor\n",
                f"| lever | val AP {new} | val presumed mAP | val person | test AP {new} | test presumed mAP | "
                "ratio T1 (end) | ratio T2 (end) | delta norm |",
                "|---|---|---|---|---|---|---|---|---|"]
        for label, r in rd["rows"].items():
            t1, t2 = r.get("tutor1", {}), r.get("tutor2", {})
            out.append(f"| {label} | {_f(r['val']['new_ap'])} | {_f(r['val']['presumed_mAP'])} | "
                       f"{_f(r['val']['protected_ap'])} | {_f(r['test']['new_ap'])} | {_f(r['test']['presumed_mAP'])} | "
                       f"{_r(t1.get('loss_ratio_end'))} | {_r(t2.get('loss_ratio_end'))} | "
                       f"{_r(r.get('delta_norm'))} |")
        out.append("")
    return "\n".join(out)


def merge(out_dir: Path) -> dict:
    merged = {}
    for section in SECTIONS:
        path = out_dir / f"ablation-{section}.json"
        if path.exists():
            data = json.loads(path.read_text())
            if section == "links":
                merged["links"] = data["result"]["links"]
                merged["recipe"] = data["result"]["recipe"]
            elif section == "scratch":
                for link, row in data["result"].items():
                    if link in merged.get("links", {}) and row["steps"] == merged["links"][link]["steps"]:
                        merged["links"][link]["labels_only_scratch_mAP"] = row["labels_only_scratch_mAP"]
            else:
                merged[section] = data["result"]
            merged.setdefault("commands", {})[section] = data["command"]
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    parser.add_argument("--exp", default="exp1", help="scenario of the Distill C link and the RD levers")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--balance-steps", type=int, default=200)
    parser.add_argument("--links", nargs="+", default=["distill_a", "distill_b", "distill_c"],
                        choices=["distill_a", "distill_b", "distill_c"],
                        help="links section: only these links (the others keep their earlier results)")
    parser.add_argument("--betas", type=float, nargs="*", default=[0.5, 2.0, -1.0])
    parser.add_argument("--rd-levers", nargs="*", default=[], help="only these RD levers (labels as in the table)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.balance_steps < 1:
        parser.error("--balance-steps must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(args.threads, 1))
    try:
        ws = prepare(args.profile, args.exp, num_clients=1, seed=args.seed, cache_dir=args.cache, device=args.device)
    except ValueError as err:
        parser.error(str(err))
    # The balance section chooses Distill A's recipe, so it needs only the teacher.
    chain = ws.chain(progress=not args.quiet, stop_after="teacher" if args.sections == ["balance"] else None)
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python -m experiments.ablate " + " ".join(sys.argv[1:] if argv is None else argv)
    for section in args.sections:
        start = time.perf_counter()
        result = {"balance": section_balance, "links": section_links, "rd": section_rd,
                  "scratch": section_scratch}[section](ws, chain, args)
        if section == "links":
            for row in result["links"].values():
                row["command"] = cmd
            previous = args.out / "ablation-links.json"
            if previous.exists():  # links not recomputed keep their earlier rows (and commands)
                old = json.loads(previous.read_text())["result"]["links"]
                result["links"] = {k: result["links"].get(k, old.get(k)) for k in
                                   ("distill_a", "distill_b", "distill_c") if k in result["links"] or k in old}
        payload = {"command": cmd, "seconds": time.perf_counter() - start, "profile": args.profile,
                   "seed": args.seed, "torch_threads": torch.get_num_threads(), "device": ws.device, "result": result}
        (args.out / f"ablation-{section}.json").write_text(json.dumps(payload, indent=1, default=float))
        merged = merge(args.out)
        (args.out / "ablation.json").write_text(json.dumps(merged, indent=1, default=float))
        text = markdown(merged)
        (args.out / "ablation.md").write_text(
            "".join(f"Command ({k}): `{v}`\n\n" for k, v in merged["commands"].items()) + text)
        print(markdown(merged))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
