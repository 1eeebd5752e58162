"""A DiReDi variant against the study, replicate by replicate: does a lever change the study's figures?

    python -m experiments.variant --variant experiments/results/edge_protection_runs/w4-rep0 \
        --name "score weight 4" --out experiments/results/edge_protection_study

A variant run is ``sim.run`` with the study's settings (``experiments.compare``) for DiReDi alone plus
the lever, one run folder per replicate, named ``...-rep<k>`` (else its config.json names the replicate). Each
is paired with the study's run of the same replicate (``experiments/results/compare/runs/rep<k>``: the same training seeds, data order and
clients), and the variant's DiReDi is compared with the study's DiReDi and local training at rounds 2,
10 and the last: the difference per client, with a 95% nested bootstrap interval over the replicates
given and their clients (``evaluation.study``), and "yes / no / cannot tell" for "the variant is better".
``--baseline`` pairs with other DiReDi runs instead (e.g. the study's DiReDi rerun on a machine whose
manufacturer chain differs from the study's: a CPU of another make computes other bits); local training
is then compared only where those runs hold it (and alone where they hold only local training). The
study's runs hold the paper's Distill C (the default when they ran); a variant of today's defaults pairs
with the combination's runs, which are today's study's DiReDi: ``--baseline
experiments/results/combo_runs/avg-lr-w4-r20-rep<k>``. Beside the verdicts, the protected classes' path
along the run (``protected_path``: how far a client's deployed edge moves on them from round to round on
its test shard, its worst round and its last against where it started) and, for a run with the edge
check, how many re-distilled edges were deployed.
``--method M`` compares another method of the variant's runs with the same method of the study's
(e.g. a study under other compute settings: ``--method local``); the comparison with local training
is DiReDi's only. ``--summary`` (the study's ``compare.json``) adds whether the variant's mean over its
replicates falls inside the study's 95% interval over the study's replicates, metric by metric: the
cost issue's test of a setting that must learn the same.
Writes ``<out>.json`` and ``<out>.md``.

    python -m experiments.variant --variant experiments/results/compare-bf16cl/runs/rep0 \
        --name "bfloat16 + channels-last" \
        --method local --summary experiments/results/compare/compare.json \
        --out experiments/results/compare-bf16cl/against_float32_local
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from evaluation.study import client_round_values, paired_difference, verdict
from report.study import read_replicate

METRICS = {  # metric -> higher is better
    "gain": True, "gain_objects": True, "forgetting_kept": False, "forgetting_protected": False, "bwt_protected": True,
    "worst_drop_protected": False,
    "recall_new": True, "spread": True,
    "released": False,  # a dropped class's AP change: more negative is released further (clients that drop one)
}  # not compute: the study's seconds are wall time under varying load (README), a variant's too
STUDY = Path("experiments/results/compare/runs")


@functools.lru_cache(maxsize=None)
def read_folder(folder: Path) -> tuple:
    """``read_replicate`` once per run folder: several tables read the same folders (read only)."""
    return read_replicate(folder)


def replicate_of(folder: Path) -> int:
    """A run folder's replicate: from its name (``...-rep<k>``), else from its config.json (``run.replicate``)."""
    match = re.search(r"rep(\d+)$", folder.name)
    if match is not None:
        return int(match.group(1))
    config = folder / "config.json"
    replicate = (json.loads(config.read_text()).get("run") or {}).get("replicate") if config.is_file() else None
    if replicate is None:
        raise SystemExit(f"python -m experiments.variant: error: {folder} is not named ...-rep<k> and its "
                         f"config.json names no replicate")
    return int(replicate)


EVALUATIONS = ("ap_before", "ap_after")


def evaluations(folder: Path, method: str) -> set[tuple[int, str]]:
    """(round, "ap_before" | "ap_after") of every evaluation of ``method``'s edges in a run folder
    (``--eval-every k`` leaves some out)."""
    _, records, _, _ = read_folder(folder)
    return {(int(r["round"]), key) for r in records if r["method"] == method for key in EVALUATIONS if r.get(key)}


def only_evaluations(record: dict, shown: set[tuple[int, str]] | None) -> dict:
    """``record`` without the evaluations outside ``shown``: a run evaluated every round reads as one
    evaluated at another's rounds, so that Chaudhry's forgetting (a max over evaluations) compares alike."""
    if shown is None:
        return record
    hidden = [key for key in EVALUATIONS if (int(record["round"]), key) not in shown]
    return {**record, **{key: {} for key in hidden}, **({"after": {}} if "ap_after" in hidden else {})}


def values(folder: Path, method: str, shown: set[tuple[int, str]] | None = None) -> dict[int, dict[int, dict]]:
    """round -> client -> metrics of ``method`` in a run folder (``shown``: only those evaluations)."""
    _, records, specs, _ = read_folder(folder)
    all_private = [list(s.get("private") or []) for s in specs]  # as the study reads a replicate
    per_method = client_round_values([only_evaluations(r, shown) for r in records if r["method"] == method],
                                     specs, all_private)
    if method not in per_method:
        raise SystemExit(f"python -m experiments.variant: error: {folder} has no {method} records")
    return per_method[method]


def optional_values(folder: Path, method: str, shown: set[tuple[int, str]] | None = None
                    ) -> dict[int, dict[int, dict]] | None:
    """``values``, or None when the run folder holds no records of ``method``."""
    _, records, _, _ = read_folder(folder)
    return values(folder, method, shown) if any(r["method"] == method for r in records) else None


def protected_path(folder: Path, method: str, shown: set[tuple[int, str]] | None = None) -> dict[str, float]:
    """The protected classes' AP on each client's test shard along the run, in AP points, mean over
    clients and protected classes: "step" the mean absolute change from one evaluation to the next, "worst"
    the lowest round minus the start (the edge before round 1), "last" the last round minus the start;
    with edge check records, "deployed" the share of re-distilled edges deployed (kept: the rest).
    ``shown``: only those evaluations (``only_evaluations``)."""
    _, records, specs, _ = read_folder(folder)
    protected = {int(s["client"]): list(s.get("protected") or []) for s in specs}
    steps, worst, last, deployed = [], [], [], []
    for client, classes in protected.items():
        mine = sorted((only_evaluations(r, shown) for r in records if r["method"] == method and r["client"] == client),
                      key=lambda r: r["round"])
        evaluated = [r for r in mine if r.get("ap_after")]
        for c in classes:
            path = [100 * mine[0]["ap_before"][c]] + [100 * r["ap_after"][c] for r in evaluated] if mine else []
            path = [v for v in path if np.isfinite(v)]
            if len(path) < 2:
                continue
            steps.append(float(np.mean(np.abs(np.diff(path)))))
            worst.append(min(path[1:]) - path[0])
            last.append(path[-1] - path[0])
        deployed += [r["edge_check"]["deployed"] for r in mine if "edge_check" in r]
    out = {"step": float(np.mean(steps)), "worst": float(np.mean(worst)), "last": float(np.mean(last))}
    if deployed:
        out["deployed"] = float(np.mean(deployed))
    return out


def study_intervals(summary_path: Path, method: str, pairs: list, rounds: list[int]) -> list[dict]:
    """Per metric and round: the variant's mean over its replicates and clients, the study's mean and
    95% interval over the study's replicates (``compare.json``), and whether the first is inside."""
    summary = json.loads(summary_path.read_text())
    per_round = {entry["round"]: entry for entry in summary["methods"][method]["per_round"]}
    rows = []
    for metric in METRICS:
        for r in rounds:
            entry = per_round.get(r, {}).get(metric)
            if entry is None:
                continue
            mean = float(np.nanmean([[v[metric] for v in p[1][r].values()] for p in pairs]))
            lo, hi = entry["ci95"]
            rows.append({"metric": metric, "round": r, "variant": mean, "study": entry["mean"], "ci95": [lo, hi],
                         "inside": bool(lo <= mean <= hi)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.variant", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=Path, nargs="+", required=True, help="the variant's run folders, ...-rep<k>")
    parser.add_argument("--name", required=True, help="the variant's name in the tables")
    parser.add_argument("--study", type=Path, default=STUDY, help="the study's run folders (rep<k>)")
    parser.add_argument("--baseline", type=Path, nargs="+",
                        help="DiReDi runs to pair with instead of the study's, ...-rep<k> (e.g. made on another "
                             "machine's manufacturer chain than the study's); local training is compared where "
                             "they hold it, and alone where they hold only local training")
    parser.add_argument("--method", default="diredi", help="the method compared (default diredi)")
    parser.add_argument("--summary", type=Path,
                        help="the study's compare.json: is the variant's mean inside the study's interval?")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    method = args.method
    baselines = {replicate_of(f): f for f in args.baseline or []}
    pairs, base_folders = [], {}
    for folder in args.variant:
        k = replicate_of(folder)
        base = baselines.get(k) if args.baseline else args.study / f"rep{k}"
        if base is None or not (base / "rounds.jsonl").exists():
            raise SystemExit(f"python -m experiments.variant: error: no baseline run of replicate {k} "
                             f"({'--baseline' if args.baseline else args.study})")
        base_folders[k] = base
    # every run compared at the evaluations they all made (a run with --eval-every 2 against one with 1)
    runs = [(f, method) for f in args.variant] + [(b, m) for b in base_folders.values()
                                                   for m in dict.fromkeys((method, "local"))]
    made = [e for e in (evaluations(f, m) for f, m in runs) if e]
    shown = set.intersection(*made) if made else None
    for folder in args.variant:
        k = replicate_of(folder)
        base = base_folders[k]
        same = optional_values(base, method, shown)
        local = optional_values(base, "local", shown) if method == "diredi" else None
        if same is None and local is None:
            raise SystemExit(f"python -m experiments.variant: error: {base} has no {method} records"
                             + (" and no local records" if method == "diredi" else ""))
        pairs.append((k, values(folder, method, shown), same, local))
    last = min(max(v) for _, v, _, _ in pairs)
    rounds = sorted({r for r in (2, 10, last) if r <= last})
    rows = []
    for baseline, index in ((method, 2), ("local", 3)):
        if any(p[index] is None for p in pairs):
            continue
        for metric, higher in METRICS.items():
            for r in rounds:
                clients = sorted(set.intersection(*[set(p[1][r]) & set(p[index][r]) for p in pairs]))
                a = [[p[1][r][c][metric] for c in clients] for p in pairs]
                b = [[p[index][r][c][metric] for c in clients] for p in pairs]
                mean_a, mean_b = float(np.nanmean(a)), float(np.nanmean(b))
                diff = paired_difference(a, b)
                rows.append({"baseline": baseline, "metric": metric, "round": r, "variant": mean_a, "base": mean_b,
                             "diff": diff["mean"], "ci95": diff["ci95"], "verdict": verdict(diff, higher)})
    paths = {args.name: [protected_path(f, method, shown) for f in args.variant]}
    for other in dict.fromkeys((method, "local")):
        if all(p[3 if other == "local" and method == "diredi" else 2] is not None for p in pairs):
            paths[f"baseline {other}"] = [protected_path(base_folders[p[0]], other, shown) for p in pairs]
    path_rows = [{"run": name, **{k: float(np.mean([v[k] for v in values])) for k in values[0]}}
                 for name, values in paths.items()]
    command = shlex.join(["python", "-m", "experiments.variant", *(sys.argv[1:] if argv is None else argv)])
    inside = study_intervals(args.summary, method, pairs, rounds) if args.summary else []
    result = {"command": command, "variant": args.name, "method": method, "replicates": [p[0] for p in pairs],
              "runs": [str(f) for f in args.variant], "rows": rows, "protected_path": path_rows,
              "inside_study_interval": inside}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    against = "its baseline runs" if args.baseline else "the study"
    lines = [f"# {args.name} against {against} (replicates {', '.join(str(p[0]) for p in pairs)})", "",
             f"`{command}`. Per client, paired by replicate and client with the baseline's run of the same "
             "replicate (the study's unless --baseline names others); 95% nested bootstrap interval; verdict: "
             "is the variant better.", "",
             "| against | metric | round | variant | baseline | difference | 95% CI | variant better? |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['baseline']} | {r['metric']} | {r['round']} | {r['variant']:.1f} | {r['base']:.1f} | "
              f"{r['diff']:+.1f} | [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] | {r['verdict']} |" for r in rows]
    lines += ["", "The protected classes along the run (`protected_path`; AP points on the clients' test shards, mean "
              "over replicates, clients and protected classes; deployed: share of re-distilled edges deployed):", "",
              "| run | round-to-round change | worst round - start | last round - start | deployed |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['step']:.1f} | {r['worst']:+.1f} | {r['last']:+.1f} | "
              f"{format(r['deployed'], '.0%') if 'deployed' in r else '-'} |" for r in path_rows]
    if inside:
        lines += ["", f"The variant's {method} against the study's 95% interval over its replicates "
                  f"(`{args.summary}`; the variant's mean over its replicates and clients):", "",
                  "| metric | round | variant | study mean | study 95% CI | inside? |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['round']} | {r['variant']:.1f} | {r['study']:.1f} | "
                  f"[{r['ci95'][0]:.1f}, {r['ci95'][1]:.1f}] | {'yes' if r['inside'] else '**no**'} |" for r in inside]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
