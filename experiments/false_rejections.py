"""False rejections: honest deltas the verification turned away, counted over every run folder kept.

    python -m experiments.false_rejections experiments/results --out experiments/results/false_rejections

Every run folder written by ``sim.run`` (and so by ``experiments.compare`` and ``experiments.variant``) holds
honest clients only (hostile ones exist only inside ``bench.byzantine``, which keeps no run folder), so each
rejected delta in its ``verification.jsonl`` is a false rejection. Runs are grouped by the settings of the
gates that can reject (protected, kept, direction, operating point, harm), each run's ``config.json`` read
as ``RunConfig.completed`` reads it for ``--resume`` (a setting it does not name at what that run did); a
folder without ``config.json`` is counted in the totals but never as a run at the default gates. Reads records only;
writes ``<out>.json`` and ``<out>.md``.

The same records say how far the merge's round-relative bounds sit above honest behaviour (``headroom``): each
accepted delta's norm and claimed example count as a multiple of its round's low median (what
``--clip-multiple`` and ``--weight-cap`` are multiples of), and how many honest deltas a bound did cut (norm
clipped, claim capped, a class row scaled).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

from protocol.config import RunConfig
from report.study import rejection_counts

# The settings of the gates that can reject a delta (protected_scope: "merge" judges a delta the protected gate
# rejected whole again inside the round's merge, so it rejects less than "delta", the gate before it).
REJECTING_GATES = ("protected_tolerance", "noise_z", "protected_scope", "kept_tolerance", "direction_z",
                   "direction_reference", "operating_tolerance", "operating_harm")


def gate_settings(completed: dict | None) -> dict | None:
    """The rejecting gates' settings of one completed run configuration (None: unknown)."""
    return None if completed is None else {key: completed[key] for key in REJECTING_GATES}


def headroom(decisions: list[dict]) -> dict:
    """Each accepted delta's norm and claim over its round's low median among the accepted (the medians the
    norm clip and the weight cap multiply; ``strategies.aggregate.median_cap``), and the honest deltas a bound
    cut: ``clipped`` (clip_factor < 1), ``capped`` (weight_used < weight), ``rows_scaled`` (a row factor < 1).
    Decisions recorded before a figure existed count as uncut."""
    by_round = defaultdict(list)
    for d in decisions:
        if d["accepted"]:
            by_round[d["round"]].append(d)
    norm_ratios, claim_ratios = [], []
    for kept in by_round.values():
        for key, ratios in (("norm", norm_ratios), ("weight", claim_ratios)):
            values = [float(d[key]) for d in kept if float(d.get(key) or 0) > 0]
            if values:
                median = statistics.median_low(values)
                ratios.extend(v / median for v in values)
    accepted = [d for kept in by_round.values() for d in kept]
    claimed = [float(d.get("weight") or 0) for d in accepted]
    return {"norm_ratios": norm_ratios, "claim_ratios": claim_ratios,
            "clipped": sum(1 for d in accepted if float(d.get("clip_factor", 1.0)) < 1),
            "capped": sum(1 for d, w in zip(accepted, claimed) if float(d.get("weight_used", w)) < w),
            "rows_scaled": sum(1 for d in accepted if any(float(f) < 1 for f in (d.get("row_clip") or {}).values()))}


def census(folder: Path) -> dict | None:
    """One run folder's deltas and rejections (None when it has no decisions)."""
    path = folder / "verification.jsonl"
    decisions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not decisions:
        return None
    config = folder / "config.json"
    run = RunConfig.completed(json.loads(config.read_text()).get("run", {})) if config.is_file() else None
    known = run or {}
    return {"run": folder.as_posix(), "scenario": Path(str(known.get("scenario", "?"))).stem,
            "rounds": max(d["round"] for d in decisions), **rejection_counts(decisions),
            "gates": gate_settings(run), "claims": known.get("claims", "?"), "spread": known.get("spread", "?"),
            "headroom": headroom(decisions)}


def runs_under(root: Path) -> list[dict]:
    """The census of every run folder under ``root`` (each folder holding a verification.jsonl)."""
    found = (census(path.parent) for path in sorted(root.rglob("verification.jsonl")))
    return [c for c in found if c is not None]


def is_default(gates: dict | None, defaults: dict, but: tuple[str, ...] = ()) -> bool:
    """The run's rejecting gates are the defaults (except the settings named in ``but``)."""
    return gates is not None and all(gates[k] == defaults[k] for k in REJECTING_GATES if k not in but)


def summarise(runs: list[dict], defaults: dict) -> dict:
    """Totals at the run's default gates and over every run, with a rate per delta."""
    def total(rows):
        deltas, rejected = sum(r["deltas"] for r in rows), sum(r["rejected"] for r in rows)
        gates = Counter()
        for r in rows:
            gates.update(r["by_gate"])
        return {"runs": len(rows), "deltas": deltas, "rejected": rejected, "by_gate": dict(gates),
                "admitted_in_merge": sum(r.get("admitted_in_merge", 0) for r in rows),
                "rate": rejected / deltas if deltas else math.nan}
    default_rows = [r for r in runs if is_default(r["gates"], defaults)]
    # the runs made before the protected gate judged inside the merge, at every other default gate
    but_scope = [r for r in runs if is_default(r["gates"], defaults, ("protected_scope",)) and r not in default_rows]
    return {"default_gates": defaults, "at_default_gates": total(default_rows), "all": total(runs),
            "at_default_gates_but_scope": {**total(but_scope),
                                           "scopes": sorted({r["gates"]["protected_scope"] for r in but_scope})},
            "at_default_gates_by_claims": {claims: total([r for r in default_rows if r["claims"] == claims])
                                           for claims in sorted({r["claims"] for r in default_rows})},
            "other_gates": total([r for r in runs if not is_default(r["gates"], defaults)]),
            "headroom": summarise_headroom(runs)}


def summarise_headroom(runs: list[dict]) -> dict:
    """Over every run: the largest and the 99th-percentile honest norm and claim, each over its round's
    low median, and how many honest deltas each bound cut."""
    def spread(ratios):
        ratios = sorted(ratios)
        if not ratios:
            return {"deltas": 0, "max": math.nan, "p99": math.nan}
        p99 = statistics.quantiles(ratios, n=100, method="inclusive")[98] if len(ratios) > 1 else ratios[0]
        return {"deltas": len(ratios), "max": ratios[-1], "p99": p99}
    heads = [r["headroom"] for r in runs]
    return {"runs": len(runs), "rounds": sum(r["rounds"] for r in runs),
            "norm": spread([x for h in heads for x in h["norm_ratios"]]),
            "claim": spread([x for h in heads for x in h["claim_ratios"]]),
            **{cut: sum(h[cut] for h in heads) for cut in ("clipped", "capped", "rows_scaled")}}


def run_headroom(head: dict) -> dict:
    """One run's headroom as its report keeps it: the largest ratios, not every one."""
    return {"norm_ratio_max": max(head["norm_ratios"], default=math.nan),
            "claim_ratio_max": max(head["claim_ratios"], default=math.nan),
            **{cut: head[cut] for cut in ("clipped", "capped", "rows_scaled")}}


def to_markdown(report: dict) -> str:
    s = report["summary"]
    d, a, b = s["at_default_gates"], s["all"], s["at_default_gates_but_scope"]
    lines = [f"# False rejections of honest deltas\n\n`{report['command']}`\n",
             f"At the default gates: {d['rejected']} of {d['deltas']} honest deltas rejected over {d['runs']} runs "
             f"({d['by_gate'] or 'none'}; {d['admitted_in_merge']} admitted inside the round's merge after the "
             f"protected gate rejected them whole); over every run kept: {a['rejected']} of {a['deltas']} "
             f"over {a['runs']} runs ({a['by_gate'] or 'none'}).\n",
             f"At the default gates but the protected gate judging each delta whole (protected_scope "
             f"{', '.join(b['scopes']) or '-'}): {b['rejected']} of {b['deltas']} over {b['runs']} runs "
             f"({b['by_gate'] or 'none'}).\n",
             "At the default gates by claim rule: " + "; ".join(
                 f"{claims}: {t['rejected']} of {t['deltas']} ({t['runs']} runs)"
                 for claims, t in s["at_default_gates_by_claims"].items()) + ".\n",
             _headroom_line(s["headroom"]),
             "| run | scenario | rounds | deltas | rejected | by gate (round: client) | default gates | claims | spread "
             "| largest norm / claim over the round's median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        where = ", ".join(f"{w['round']}: {w['client']}" for w in r["where"])
        gates = ", ".join(f"{k} {v}" for k, v in r["by_gate"].items())
        lines.append(f"| {r['run']} | {r['scenario']} | {r['rounds']} | {r['deltas']} | {r['rejected']} | "
                     f"{gates + ' (' + where + ')' if where else '-'} | "
                     f"{'yes' if is_default(r['gates'], s['default_gates']) else _differs(r['gates'], s['default_gates'])} "
                     f"| {r['claims']} | {r['spread']} | {r['headroom']['norm_ratio_max']:.2f} / "
                     f"{r['headroom']['claim_ratio_max']:.2f} |")
    return "\n".join(lines) + "\n"


def _headroom_line(h: dict) -> str:
    n, c = h["norm"], h["claim"]
    return (f"The merge's round-relative bounds against honest deltas (every run, {h['rounds']} rounds): the largest "
            f"accepted norm {n['max']:.2f} x its round's low median (99th percentile {n['p99']:.2f}, {n['deltas']} "
            f"deltas), the largest claim {c['max']:.2f} x (99th percentile {c['p99']:.2f}); cut by a bound: "
            f"{h['clipped']} clipped by norm, {h['capped']} claims capped, {h['rows_scaled']} with a class row "
            f"scaled.\n")


def _differs(gates: dict | None, defaults: dict) -> str:
    if gates is None:
        return "unknown (no config.json)"
    return "; ".join(f"{k} {gates[k]}" for k in REJECTING_GATES if gates[k] != defaults[k])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.false_rejections", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a folder searched for run folders (verification.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    defaults = gate_settings(RunConfig().to_dict())
    runs = runs_under(args.root)
    if not runs:
        parser.error(f"no run folder with decisions under {args.root}")
    summary = summarise(runs, defaults)
    runs = [{**r, "headroom": run_headroom(r["headroom"])} for r in runs]
    report = {"command": "python -m experiments.false_rejections " + " ".join(argv if argv is not None else sys.argv[1:]),
              "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print("\n".join(to_markdown(report).split("\n")[4:7]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
