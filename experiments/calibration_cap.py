"""What a calibration's bias shifts cost the other classes' AP directly, and how much of it is FCOS's
per-image cap (``detections_per_img`` 100, ``topk_candidates`` 1000 per level).

A shift of one class's bias leaves that class's ranking nearly as it was, but raising the classes the tutor
learnt puts more of their detections above the 0.05 score floor and into each image's best 100, where they
can push out low-scored detections of the other classes: the tail of those classes' precision-recall curve.
This tool measures that direct effect on one tutor: its validation AP per class with a calibrated run's
shifts and without them, once at the model's cap and once with the cap lifted (1,000 detections per image,
every candidate kept), so what the cap takes shows as the difference between the two.

The tutor is the manufacturer's (the chain's, round 0: the shifts are added) or, with ``--checkpoint``, the
run's own tutor after ``--round`` as a checkpoint holds it (``report.checkpoint``; calibrated, so the shifts
are taken off; an ``f1-offsets`` run's weights never carry them, so they are added). The shifts are the run's,
summed over rounds 1..R (its ``tutor.json``, or the checkpoint's history). Seconds on one thread.

    python -m experiments.calibration_cap --run RUN [--round R] [--checkpoint STEM] --out FILE_STEM
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from data.voc import CLASS_INDEX
from models.io import read_weights
from models.parts import neck_head
from protocol.config import resolve_run_config
from report.checkpoint import unprefixed
from session.workspace import Session
from strategies.calibrate import shift_class_biases
from strategies.validator import CandidateValidator
from strategies.verify import VerificationPolicy

PROG = "python -m experiments.calibration_cap"
MODEL_CAP = "cap"  # the model's own detections_per_img and topk_candidates
LIFTED = "lifted"
LIFTED_DETECTIONS, LIFTED_CANDIDATES = 1000, 100_000


def summed_shifts(history: list[dict], last_round: int) -> dict[str, float]:
    """{class: the calibration's bias shifts summed over rounds 1..``last_round``} of a tutor history."""
    rounds = [h for h in history if 1 <= h["round"] <= last_round]
    if len(rounds) < last_round:
        raise SystemExit(f"{PROG}: error: the history has {len(rounds)} rounds, fewer than {last_round}")
    total: dict[str, float] = {}
    for h in rounds:
        if "calibration" not in h:
            raise SystemExit(f"{PROG}: error: round {h['round']} has no calibration: a --calibrate run is needed")
        for c, s in h["calibration"]["shift"].items():
            total[c] = total.get(c, 0.0) + float(s)
    return total


def direct_cost(validator: CandidateValidator, tutor: torch.nn.Module, shifts: dict[str, float],
                calibrated: bool) -> dict[str, dict[str, dict[str, float]]]:
    """{cap: {"with": AP per class, "without": AP per class}} of ``tutor`` with and without ``shifts``
    (``calibrated``: the tutor already carries them), at the model's cap and with the cap lifted."""
    sign = -1.0 if calibrated else 1.0
    other = validator.tutor_with(shift_class_biases(neck_head(tutor), {CLASS_INDEX[c]: sign * s
                                                                        for c, s in shifts.items()}))
    out = {}
    for cap, (detections, candidates) in ((MODEL_CAP, (tutor.detections_per_img, tutor.topk_candidates)),
                                          (LIFTED, (LIFTED_DETECTIONS, LIFTED_CANDIDATES))):
        figures = {}
        for model in (tutor, other):
            model.detections_per_img, model.topk_candidates = detections, candidates
            figures[model is tutor] = validator.validate(model)[0]
        out[cap] = {"with": figures[calibrated], "without": figures[not calibrated]}
    return out


def table(result: dict, groups: dict[str, list[str]]) -> str:
    lines = ["| class | group | AP without shifts | with, at the cap | change | without, the cap lifted | "
             "with the cap lifted: change |", "|---|---|---|---|---|---|---|"]
    cap, lifted = result[MODEL_CAP], result[LIFTED]
    for group, classes in groups.items():
        for c in classes:
            lines.append(f"| {c} | {group} | {100 * cap['without'][c]:.1f} | {100 * cap['with'][c]:.1f} | "
                         f"{100 * (cap['with'][c] - cap['without'][c]):+.1f} | {100 * lifted['without'][c]:.1f} | "
                         f"{100 * (lifted['with'][c] - lifted['without'][c]):+.1f} |")
        for name, figures in (("at the cap", cap), ("lifted", lifted)):
            mean = sum(figures["with"][c] - figures["without"][c] for c in classes) / len(classes)
            lines.append(f"| mean, {name} | {group} | | | {100 * mean:+.2f} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a DiReDi run folder made with --calibrate")
    parser.add_argument("--round", type=int, default=1, help="the shifts of rounds 1..R (default 1)")
    parser.add_argument("--checkpoint", type=Path, help="STEM of a checkpoint (STEM.json, STEM.safetensors) of "
                        "that run after round R: its tutor instead of the manufacturer's")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.round < 1:
        parser.error("--round must be at least 1")
    try:
        config = json.loads((args.run / "config.json").read_text())["run"]
        if args.checkpoint is None:
            history = json.loads((args.run / "tutor.json").read_text())
        else:
            meta = json.loads(args.checkpoint.with_suffix(".json").read_text())
            if int(meta["round"]) != args.round:
                parser.error(f"--checkpoint holds round {meta['round']}, not --round {args.round}")
            history = meta["tutor_history"]
    except (OSError, KeyError, ValueError) as err:
        raise SystemExit(f"{PROG}: error: {err}") from err
    shifts = summed_shifts(history, args.round)
    torch.set_num_threads(1)
    session = Session.open(resolve_run_config(config))
    tutor = session.chain.tutor.eval()
    if args.checkpoint is not None:
        tutor.load_state_dict(unprefixed("tutor", read_weights(args.checkpoint.with_suffix(".safetensors"))))
    ws = session.workspace
    validator = CandidateValidator(tutor, ws.validation_set(), ws.scenario.teacher_classes, VerificationPolicy(),
                                   1.0, 0)
    # An f1-offsets run never wrote its offsets into the weights: its checkpoint's tutor carries none of them
    carries_shifts = args.checkpoint is not None and config.get("calibrate") != "f1-offsets"
    result = direct_cost(validator, tutor, shifts, calibrated=carries_shifts)
    specs = session.client_specs()
    learnt = sorted({c for s in specs for c in s["private"]})
    groups = {"presumed": [c for c in validator.classes if c not in learnt], "learnt": learnt}
    record = {"run": str(args.run), "round": args.round, "tutor": "checkpoint" if args.checkpoint else "manufacturer",
              "shifts": shifts, "groups": groups, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    text = (f"Shifts of rounds 1..{args.round} of `{args.run}` ({', '.join(f'{c} {s:+.2f}' for c, s in shifts.items())}),"
            f" the {record['tutor']}'s tutor, validation AP (points):\n\n" + table(result, groups))
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
