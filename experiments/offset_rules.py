"""Other rules for the calibration's choice of offset, replayed on an attack sweep's recorded search tables.

    python -m experiments.offset_rules experiments/results/byzantine_hostile25.json experiments/results/byzantine.json \
        --out experiments/results/offset_rules

The offset search (``strategies.calibrate``) picks each class's offset of highest validation F1 at the
operating threshold. Where F1 is flat a 0.25-logit step moves recall at the threshold by up to 14 points, and the
attack bench judges recall: the verdicts on recall turn on which of two near-equal F1s is higher. This replays
other tie rules on what each bench run recorded, without running anything: every run's last calibration
(``search``: per class, every [offset, F1, recall] the search measured on the validation set) gives the
offset each rule would deploy and the recall there; each attack's recall loss per class is then measured against
the same rule's choice in the bench's two references (all honest, hostile kept out; the smaller loss, as the
bench takes it) and judged against the tolerance the bench recorded.

Why a replay answers this without new runs: under ``--calibrate f1-offsets`` the offsets never reach the weights,
so the tutor a round's search looks at is the same whatever offset an earlier round chose. What it cannot see:
only offsets the search measured can be chosen (the grid of -3..+3 logits around the round's starting offset and
the fine steps around the best), and the tolerances are the recorded ones (the bootstrap noise at the offset the
bench deployed). Approximate; a rule that does well here still needs its sweeps.

Rules: ``f1`` (the search's: highest F1, the offset nearest the start among equals, the start kept unless
beaten by the search's 1-point margin), ``recall:m`` (of the offsets
within m of the best F1, the one of highest recall), ``median:m`` (their middle offset), ``start:m`` (the one
nearest the offset the class had before the round). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from strategies.calibrate import MIN_F1_GAIN

RULES = ("f1", "recall:0.01", "recall:0.005", "median:0.01", "start:0.01")


def choose(table: list[list[float]], rule: str, start: float = 0.0) -> list[float]:
    """The [offset, F1, recall] row of ``table`` that ``rule`` deploys (``start``: the class's offset before)."""
    best = max(row[1] for row in table)
    if rule == "f1":  # as strategies.calibrate.best_shifts: the start stays unless beaten by MIN_F1_GAIN
        at_start = [row for row in table if row[0] == start]
        if at_start and best < at_start[0][1] + MIN_F1_GAIN:
            return at_start[0]
        return min((row for row in table if row[1] == best), key=lambda row: (abs(row[0] - start), row[0]))
    kind, _, margin = rule.partition(":")
    near = sorted((row for row in table if row[1] >= best - float(margin)), key=lambda row: row[0])
    if kind == "recall":
        return max(near, key=lambda row: (row[2], row[1]))
    if kind == "median":
        return near[(len(near) - 1) // 2]
    if kind == "start":
        return min(near, key=lambda row: (abs(row[0] - start), -row[1]))
    raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")


def deployed_recall(run: dict, rule: str) -> dict[str, float]:
    """Per class, the validation recall at the threshold of the offset ``rule`` picks in ``run``'s last search."""
    calibrations = run.get("calibration") or []
    if not calibrations or "search" not in calibrations[-1]:
        raise ValueError("the run records no search table (benchmarks made before its [offset, F1, recall] record)")
    before = calibrations[-2].get("offsets", {}) if len(calibrations) > 1 else {}
    return {c: choose(table, rule, float(before.get(c, 0.0)))[2]
            for c, table in calibrations[-1]["search"].items() if table}


def replay(sweep: dict, rules=RULES) -> dict:
    """Per rule and attack, the classes whose recall loss exceeds the bench's recorded tolerance."""
    references = [sweep["all_honest"], sweep["hostile_kept_out"]]
    out = {}
    for rule in rules:
        beyond = {}
        reference_recall = [deployed_recall(run, rule) for run in references]
        for name, attack in sweep["attacks"].items():
            recall = deployed_recall(attack, rule)
            beyond[name] = {}
            for c, figures in attack["classes"].items():
                if c not in recall or not all(c in r for r in reference_recall):
                    continue
                loss = min(r[c] - recall[c] for r in reference_recall)
                if loss > figures["tolerance"]["recall"] + 1e-9:
                    beyond[name][c] = [round(100 * loss, 1), round(100 * figures["tolerance"]["recall"], 1)]
        out[rule] = {"through": sum(1 for v in beyond.values() if v), "beyond_tolerance": beyond}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.offset_rules", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="bench.byzantine JSON files")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    results, lines = {}, []
    for path in args.sweeps:
        try:
            results[str(path)] = replay(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"{path}: {err}")
    command = "python -m experiments.offset_rules " + " ".join(argv if argv is not None else sys.argv[1:])
    lines += [f"`{command}`", "", "Attacks through on recall at the threshold, per offset rule (replayed on the "
              "recorded search tables; approximate, see the module's doc)", "",
              "| sweep | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for path, by_rule in results.items():
        lines.append(f"| {Path(path).name} | " + " | ".join(
            f"{by_rule[r]['through']}: " + (", ".join(f"{a} ({', '.join(c)})" for a, c in
                                                     by_rule[r]["beyond_tolerance"].items() if c) or "-")
            for r in RULES) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "rules": list(RULES),
                                                         "sweeps": results}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
