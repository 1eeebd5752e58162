"""Does the tutor detect what it learns at the operating threshold? The tutor's validation figures per round
(``tutor.json``) of DiReDi runs with and without the server's calibration (``--calibrate f1`` or
``f1-offsets``: the history holds the deployed tutor's figures), paired by replicate.

For the classes the clients teach the tutor (every client's private classes) and for the manufacturer's
presumed classes (kept ones and the protected ``person``): the mean recall at the operating threshold over
rounds 1..R, its mean move from one round to the next, how many (round, class) pairs have recall 0, the mean
AP at round R and the tutor's validation mAP at round R. Records only; seconds.

    python -m experiments.tutor_calibration --variant RUN [RUN ...] --baseline RUN [RUN ...] --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from report.study import read_replicate


def load_run(folder: Path) -> tuple[int, list[dict], list[dict]]:
    """A run folder's replicate, client specs and tutor history (``tutor.json``: one entry per round, round 0
    the manufacturer's tutor; null read back as NaN)."""
    try:
        replicate, _, specs, tutor = read_replicate(folder)
    except (OSError, ValueError) as err:
        raise SystemExit(f"python -m experiments.tutor_calibration: error: {folder}: {err}") from err
    if not tutor or not specs:
        raise SystemExit(f"python -m experiments.tutor_calibration: error: {folder}: no tutor.json or client specs "
                         "(a DiReDi run folder is needed)")
    return replicate, specs, tutor


def class_groups(specs: list[dict]) -> dict[str, list[str]]:
    """``learnt``: every client's private classes; ``presumed``: the manufacturer's classes some client keeps
    (the protected ones included)."""
    learnt = sorted({c for spec in specs for c in spec["private"]})
    presumed = sorted({c for spec in specs for c in spec["kept"]} - set(learnt))
    return {"learnt": learnt, "presumed": presumed}


def tutor_figures(tutor: list[dict], classes: list[str], last_round: int) -> dict[str, float]:
    """The figures of one run on one class group, rounds 1..``last_round`` (percent and points)."""
    rounds = [r for r in tutor if 1 <= r["round"] <= last_round]
    if len(rounds) < last_round:
        raise SystemExit(f"python -m experiments.tutor_calibration: error: the run has {len(rounds)} rounds, "
                         f"fewer than {last_round}")
    recall = np.array([[100 * r["recall"][c] for c in classes] for r in rounds])  # rounds x classes
    final = rounds[-1]
    return {"recall_mean": float(recall.mean()),
            "recall_move": float(np.abs(np.diff(recall, axis=0)).mean()) if len(rounds) > 1 else 0.0,
            "recall_zero": int((recall == 0).sum()),
            "ap_last": float(np.mean([100 * final["ap"][c] for c in classes])),
            "map_last": float(100 * final["mAP"])}


def summarise(variants: list[Path], baselines: list[Path], last_round: int | None = None) -> dict:
    """Per arm and class group, each figure's mean over replicates (and the per-replicate values)."""
    runs = {"variant": sorted(map(load_run, variants), key=lambda run: run[0]),
            "baseline": sorted(map(load_run, baselines), key=lambda run: run[0])}
    reps = {arm: [replicate for replicate, _, _ in loaded] for arm, loaded in runs.items()}
    if reps["variant"] != reps["baseline"]:
        raise SystemExit("python -m experiments.tutor_calibration: error: the variant's replicates "
                         f"{reps['variant']} and the baseline's {reps['baseline']} differ")
    groups = class_groups(runs["variant"][0][1])
    if last_round is None:  # the last round both arms reached
        last_round = min(max(r["round"] for r in tutor) for loaded in runs.values() for _, _, tutor in loaded)
    result = {"last_round": last_round, "classes": groups, "replicates": reps["variant"], "arms": {}}
    for arm, loaded in runs.items():
        per_group = {}
        for group, classes in groups.items():
            figures = [tutor_figures(tutor, classes, last_round) for _, _, tutor in loaded]
            per_group[group] = {k: {"mean": float(np.mean([f[k] for f in figures])), "per_replicate": [f[k] for f in figures]}
                                for k in figures[0]}
        result["arms"][arm] = per_group
    return result


ROWS = [("recall_mean", "mean recall at the threshold, %", "{:.1f}"),
        ("recall_move", "mean move of that recall from one round to the next, points", "{:.1f}"),
        ("recall_zero", "(round, class) pairs with recall 0", "{:.0f}"),
        ("ap_last", "mean AP at the last round", "{:.1f}"),
        ("map_last", "validation mAP at the last round", "{:.1f}")]


def markdown(result: dict, command: str) -> str:
    arms = result["arms"]
    lines = [f"# The tutor at the operating threshold: variant / baseline, rounds 1-{result['last_round']}", "",
             f"`{command}`; replicates {result['replicates']}, means over them; learnt classes: "
             f"{', '.join(result['classes']['learnt'])}; presumed classes: {', '.join(result['classes']['presumed'])}.", "",
             "| figure | learnt classes | presumed classes |", "|---|---|---|"]
    for key, label, fmt in ROWS:
        cells = [" / ".join(fmt.format(arms[arm][group][key]["mean"]) for arm in ("variant", "baseline"))
                 for group in ("learnt", "presumed")]
        if key == "map_last":
            cells[1] = ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.tutor_calibration", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=Path, nargs="+", required=True, help="run folders with --calibrate f1 or f1-offsets")
    parser.add_argument("--baseline", type=Path, nargs="+", required=True, help="the same runs without it")
    parser.add_argument("--rounds", type=int, default=None, help="figures over rounds 1..R (default: the last both reached)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    command = "python -m experiments.tutor_calibration " + " ".join(
        ["--variant", *map(str, args.variant), "--baseline", *map(str, args.baseline)]
        + (["--rounds", str(args.rounds)] if args.rounds else []) + ["--out", str(args.out)])
    result = summarise(args.variant, args.baseline, args.rounds)
    result["command"] = command
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tutor_calibration.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result, command)
    (args.out / "tutor_calibration.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
