"""What the harm gate (``--operating-harm``) measured: each delta's leave-one-out harm to the merge.

    python -m experiments.harm --runs experiments/results/harm_runs/harm0.10-rep0 \
        --byzantine experiments/results/byzantine_harm.json --out experiments/results/harm

A delta's harm to a class is the recall at the operating threshold the round's merge has without it
minus the recall it has with it (``strategies.verify.leave_one_out_harm``); the gate rejects a delta
whose harm exceeds max(floor, the round's median + noise-z robust std). From the verification logs of
run folders made with the gate on (all clients honest), per round: the largest honest harm and its
class, the smallest threshold, and the deltas rejected (each one a false rejection); from a
``bench.byzantine`` JSON made with the gate on, per run (all honest, each attack): the hostile and
honest deltas' largest harm and who was rejected. Reads records only; writes ``<out>.json`` and
``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def largest(harm: dict[str, float]) -> tuple[str, float]:
    """The class a delta harms most and that harm (("", nan) when none was measured)."""
    finite = {c: h for c, h in harm.items() if h is not None and math.isfinite(h)}
    if not finite:
        return "", math.nan
    worst = max(finite, key=finite.get)
    return worst, finite[worst]


def run_rounds(folder: Path) -> list[dict]:
    """Per round of a run with the gate on: deltas measured, the largest harm (class, client), the smallest
    threshold over the guarded classes, and the deltas the gate rejected."""
    decisions = [json.loads(line) for line in (folder / "verification.jsonl").read_text().splitlines() if line.strip()]
    rounds = []
    for r in sorted({d["round"] for d in decisions}):
        mine = [d for d in decisions if d["round"] == r]
        measured = [d for d in mine if d.get("harm")]
        worst = max(((largest(d["harm"]), d["client"]) for d in measured), key=lambda x: x[0][1], default=None)
        thresholds = [t for d in measured for t in d.get("harm_threshold", {}).values() if t is not None]
        rounds.append({"round": r, "deltas": len(mine), "measured": len(measured),
                       "largest_harm": worst[0][1] if worst else math.nan,
                       "largest_class": worst[0][0] if worst else "", "largest_client": worst[1] if worst else -1,
                       "smallest_threshold": min(thresholds) if thresholds else math.nan,
                       "rejected_by_harm": [d["client"] for d in mine if "harm" in d.get("rejected_by", [])],
                       "rejected_other": [d["client"] for d in mine
                                          if not d["accepted"] and "harm" not in d.get("rejected_by", [])]})
    return rounds


def byzantine_runs(path: Path) -> list[dict]:
    """Per run of a bench.byzantine JSON: the hostile and honest deltas' largest harm and the rejections."""
    data = json.loads(path.read_text())
    runs = [("all honest", data["all_honest"]), *data["attacks"].items()]
    out = []
    for name, run in runs:
        rows = run.get("harm", [])
        side = {}
        for hostile in (True, False):
            mine = [(largest(h["harm"]), h["client"]) for h in rows if h["hostile"] == hostile]
            worst = max(mine, key=lambda x: x[0][1], default=(("", math.nan), -1))
            side["hostile" if hostile else "honest"] = {"largest_harm": worst[0][1], "class": worst[0][0],
                                                        "client": worst[1]}
        rejected = sorted({h["client"] for h in rows if not h["accepted"]})
        thresholds = [t for h in rows for t in h["threshold"].values() if t is not None]
        out.append({"run": name, **side, "smallest_threshold": min(thresholds) if thresholds else math.nan,
                    "rejected": rejected, "hostile_clients": data["hostile_clients"] if name != "all honest" else [],
                    "tutor_recall_after": run.get("tutor_recall", {})})
    return out


def points(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}"


def to_markdown(report: dict) -> str:
    lines = [f"# The harm gate's figures\n\n`{report['command']}`. Harm and thresholds in recall points at the "
             "operating threshold (the merge's recall without the delta minus with it).\n"]
    for name, rounds in report["runs"].items():
        rejected = sum(len(r["rejected_by_harm"]) for r in rounds)
        total = sum(r["deltas"] for r in rounds)
        lines += [f"\n## {name}: {rejected} of {total} honest deltas rejected by the harm gate\n",
                  "| round | deltas measured | largest harm (class, client) | smallest threshold | rejected by harm | rejected by other gates |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['round']} | {r['measured']}/{r['deltas']} | {points(r['largest_harm'])} ({r['largest_class']}, "
                  f"{r['largest_client']}) | {points(r['smallest_threshold'])} | {r['rejected_by_harm'] or '-'} | "
                  f"{r['rejected_other'] or '-'} |" for r in rounds]
    if report.get("byzantine"):
        lines += ["\n## bench.byzantine\n", "| run | hostile | largest hostile harm (class) | largest honest harm (class) "
                  "| smallest threshold | rejected |", "|---|---|---|---|---|---|"]
        for b in report["byzantine"]:
            lines.append(f"| {b['run']} | {b['hostile_clients'] or '-'} | {points(b['hostile']['largest_harm'])} "
                         f"({b['hostile']['class']}) | {points(b['honest']['largest_harm'])} ({b['honest']['class']}, "
                         f"client {b['honest']['client']}) | {points(b['smallest_threshold'])} | {b['rejected'] or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.harm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders made with --operating-harm")
    parser.add_argument("--byzantine", type=Path, help="a bench.byzantine JSON made with --operating-harm")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    for folder in args.runs:
        if not (folder / "verification.jsonl").is_file():
            parser.error(f"{folder} has no verification.jsonl")
    if args.byzantine is not None and not args.byzantine.is_file():
        parser.error(f"{args.byzantine} does not exist")
    report = {"command": "python -m experiments.harm " + " ".join(argv if argv is not None else sys.argv[1:]),
              "runs": {str(folder): run_rounds(folder) for folder in args.runs},
              "byzantine": byzantine_runs(args.byzantine) if args.byzantine else []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
