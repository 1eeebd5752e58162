"""The client's budget: what DiReDi's RD and Distill C steps buy, against steps and CPU work.

    python -m experiments.budget --baseline experiments/results/edge_check_runs/base-rep0 \
        --variant "RD 6 per tutor" experiments/results/budget_runs/rd6-rep0 \
        --local experiments/results/budget_runs/local-rep0 \
        --work experiments/results/budget_work --out experiments/results/budget_study

Each variant is ``sim.run`` with the study's settings for DiReDi alone and other per-round step
counts (``--rd-iters``, ``--redistill-iters``), one run folder per replicate (``...-rep<k>``), paired
by replicate and client with the baseline DiReDi runs of the same replicate (same chain, data, seeds).
For every run: its client steps per round, the CPU work of one steady client round (round 2 on;
``bench.round_work --run FOLDER --out WORK/<folder name>.json``, one thread, timed on its own rather
than read from the run's records, whose seconds are wall time under whatever else ran; expressed in
direct-training steps timed in the same process, ``round_work_steps``), and at rounds 2 and 10 (and
the last) gain, forgetting (kept, protected) and recall of the new classes, with the difference from
the baseline (95% nested bootstrap interval, verdict "is the variant better"). Local training
(``--local``, the same replicates) is the yardstick of gain per unit of work: its client round is
the baseline's step count of direct training and one evaluation.

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from evaluation.study import paired_difference, verdict
from experiments.variant import replicate_of, values

METRICS = {"gain": True, "forgetting_kept": False, "forgetting_protected": False, "recall_new": True}


def steps_per_round(folder: Path) -> dict[str, int]:
    """RD steps per tutor, Distill C steps and the client's steps in a steady round (two RD tutors)."""
    run = json.loads((folder / "config.json").read_text())["run"]  # resolved: the profile's counts filled in
    rd_iters, redistill = int(run["rd_iters"]), int(run["redistill_iters"])
    return {"rd_per_tutor": rd_iters, "distill_c": redistill, "client_steps": 2 * rd_iters + redistill}


def round_work_steps(work_dir: Path, folder: Path, method: str) -> float:
    """One steady client round's CPU work of ``method`` ("diredi", or "local": direct training and its
    evaluation) in direct-training steps: ``bench.round_work``'s CPU seconds of the round divided by
    those of one direct-training step timed in the same process (its FedAvg client trains
    ``client_steps`` of them). Timings of a busy machine vary by tens of percent from one process to
    the next; within one process both move together, so the ratio holds. Mean over the files
    ``<run folder name>*.json`` (repeats); NaN when none."""
    units = []
    for path in sorted(work_dir.glob(f"{folder.name}*.json")):
        client_s = json.loads(path.read_text())["round_work"]["client_s"]
        step_s = client_s["fedavg"]["direct_training"] / steps_per_round(folder)["client_steps"]
        units.append(client_s[method]["total"] / step_s if method == "diredi"
                     else steps_per_round(folder)["client_steps"] + client_s["fedavg"]["evaluate"] / step_s)
    return float(np.mean(units)) if units else float("nan")


def compare(variant: list[dict], baseline: list[dict], rounds: list[int], against: str,
            metrics: dict[str, bool] = METRICS) -> list[dict]:
    """Per metric and round, the variant's and the baseline's means and their paired difference."""
    rows = []
    for metric, higher in metrics.items():
        for r in rounds:
            clients = sorted(set.intersection(*[set(v[r]) & set(b[r]) for v, b in zip(variant, baseline)]))
            a = [[v[r][c][metric] for c in clients] for v in variant]
            b = [[base[r][c][metric] for c in clients] for base in baseline]
            diff = paired_difference(a, b)
            rows.append({"against": against, "metric": metric, "round": r, "variant": float(np.nanmean(a)), "base": float(np.nanmean(b)),
                         "diff": diff["mean"], "ci95": diff["ci95"], "verdict": verdict(diff, higher)})
    return rows


def mean_at(runs: list[dict], metric: str, round_number: int, clients=None) -> float:
    return float(np.nanmean([[v[metric] for c, v in run[round_number].items() if clients is None or c in clients]
                             for run in runs]))


def clients_by_private_count(folder: Path) -> dict[int, set[int]]:
    """Number of private classes -> the clients with that many (a two-class client may need another split)."""
    specs = json.loads((folder / "config.json").read_text()).get("client_specs") or []
    groups: dict[int, set[int]] = {}
    for spec in specs:
        groups.setdefault(len(spec.get("private") or []), set()).add(int(spec["client"]))
    return dict(sorted(groups.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.budget", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, nargs="+", required=True, help="DiReDi runs, ...-rep<k>")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar=("NAME", "FOLDER"),
                        help="a variant's name and its run folders (...-rep<k>); repeat per variant")
    parser.add_argument("--local", type=Path, nargs="*", default=[], help="local training runs, ...-rep<k>")
    parser.add_argument("--work", type=Path, required=True, help="folder of bench.round_work files, <run>.json")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    baselines = {replicate_of(f): f for f in args.baseline}
    for entry in args.variant:
        if len(entry) < 2:
            parser.error(f"--variant {entry[0]!r}: name it and give at least one run folder")
    base_values = {k: values(f, "diredi") for k, f in baselines.items()}
    last = min(max(v) for v in base_values.values())
    rounds = sorted({r for r in (2, 10, last) if r <= last})

    def describe(name: str, folders: list[Path], method: str, cpu_method: str, rows: list[dict] | None) -> dict:
        runs = [values(f, method) for f in folders]
        cpu = [round_work_steps(args.work, f, cpu_method) for f in folders]
        steps = steps_per_round(folders[0]) if method == "diredi" else {
            "rd_per_tutor": 0, "distill_c": 0, "client_steps": steps_per_round(folders[0])["client_steps"]}
        entry = {"name": name, "method": method, "runs": [str(f) for f in folders], **steps,
                 "work_per_round": float(np.nanmean(cpu)) if not all(np.isnan(cpu)) else None,
                 "at": {r: {m: mean_at(runs, m, r) for m in METRICS} for r in rounds},
                 "gain_by_private_classes": {n: {r: mean_at(runs, "gain", r, clients) for r in rounds}
                                             for n, clients in clients_by_private_count(folders[0]).items()}}
        if entry["work_per_round"]:
            # gain per 1000 direct-training steps' worth of client CPU over the run's rounds (steady rounds;
            # round 1 of DiReDi is cheaper with the server's shared Tutor 1, so this slightly undercounts it)
            entry["gain_per_1000_steps"] = {r: entry["at"][r]["gain"] / (r * entry["work_per_round"] / 1000)
                                            for r in rounds}
        if method == "diredi":  # what RD buys the server: its tutor, and deltas its gates accept
            summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
            entry["tutor_val_map_last"] = float(np.mean([s["tutor_val_map"][-1] for s in summaries]))
            entry["rejected"] = int(sum(s["methods"]["diredi"]["rejected"] for s in summaries))
            entry["accepted"] = int(sum(s["methods"]["diredi"]["accepted"] for s in summaries))
        if rows is not None:
            entry["versus_baseline"] = rows
        return entry

    base_folders = [baselines[k] for k in sorted(baselines)]
    table = [describe("baseline", base_folders, "diredi", "diredi", None)]
    for name, *folders in args.variant:
        folders = [Path(f) for f in folders]
        missing = [f for f in folders if replicate_of(f) not in baselines]
        if missing:
            raise SystemExit(f"python -m experiments.budget: error: no baseline of replicate {replicate_of(missing[0])}")
        rows = compare([values(f, "diredi") for f in folders], [base_values[replicate_of(f)] for f in folders], rounds,
                       "baseline")
        table.append(describe(name, folders, "diredi", "diredi", rows))
    if args.local:
        local_values = {replicate_of(f): values(f, "local") for f in args.local}
        for entry in table:  # every DiReDi run's gain against local training's, same replicates and clients
            folders = [Path(f) for f in entry["runs"]]
            paired = [f for f in folders if replicate_of(f) in local_values]
            if paired:
                entry.setdefault("versus_baseline", []).extend(compare(
                    [values(f, "diredi") for f in paired], [local_values[replicate_of(f)] for f in paired], rounds,
                    "local", {"gain": True}))
        local = describe("local training", args.local, "local", "local", None)
        local["work_per_round"] = float(np.nanmean([round_work_steps(args.work, baselines[replicate_of(f)], "local")
                                                    for f in args.local]))
        local["gain_per_1000_steps"] = {r: local["at"][r]["gain"] / (r * local["work_per_round"] / 1000) for r in rounds}
        table.append(local)

    command = shlex.join(["python", "-m", "experiments.budget", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "rounds": rounds, "runs": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    last_round = rounds[-1]
    lines = ["# The client's budget: RD and Distill C steps against gain, forgetting and CPU work", "",
             f"`{command}`. Steps per steady client round; CPU work: one steady client round's CPU seconds on "
             "one thread (`bench.round_work`, without the run-long body cache, evaluation included) in units of "
             "one direct-training step timed in the same process; gain per 1000 steps: the gain at the round "
             "over that many steady rounds' work. AP points, mean over clients (and replicates); the tutor's "
             "validation mAP after the last round; deltas the verification rejected (every client is honest).", "",
             "| run | RD steps per tutor | Distill C steps | client steps | CPU work per round (steps) | "
             + " | ".join(f"gain r{r}" for r in rounds) + f" | forgetting kept r{last_round} | "
             f"forgetting protected r{last_round} | gain per 1000 steps r{last_round} | tutor val mAP | "
             "deltas rejected |",
             "|---|---|---|---|---|" + "---|" * len(rounds) + "---|---|---|---|---|"]
    for e in table:
        cpu = "-" if not e.get("work_per_round") else f"{e['work_per_round']:.0f}"
        per_min = "-" if "gain_per_1000_steps" not in e else f"{e['gain_per_1000_steps'][last_round]:.1f}"
        lines.append(f"| {e['name']} | {e['rd_per_tutor'] or '-'} | {e['distill_c'] or '-'} | {e['client_steps']} | "
                     f"{cpu} | " + " | ".join(f"{e['at'][r]['gain']:.1f}" for r in rounds)
                     + f" | {e['at'][last_round]['forgetting_kept']:.1f} | "
                     f"{e['at'][last_round]['forgetting_protected']:.1f} | {per_min} | "
                     + (f"{e['tutor_val_map_last']:.1f} | {e['rejected']} of {e['rejected'] + e['accepted']} |"
                        if "rejected" in e else "- | - |"))
    counts = list(table[0]["gain_by_private_classes"])
    lines += ["", "Gain by the clients' number of private classes (mean over those clients):", "",
              "| run | " + " | ".join(f"{n} private, r{r}" for n in counts for r in rounds) + " |",
              "|---|" + "---|" * (len(counts) * len(rounds))]
    lines += [f"| {e['name']} | " + " | ".join(f"{e['gain_by_private_classes'][n][r]:.1f}" for n in counts
                                               for r in rounds) + " |" for e in table]
    lines += ["", "Each run against the baseline DiReDi and (gain) local training, paired by replicate and client; "
              "95% nested bootstrap interval:",
              "", "| run | against | metric | round | run | against | difference | 95% CI | run better? |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in table:
        lines += [f"| {e['name']} | {r['against']} | {r['metric']} | {r['round']} | {r['variant']:.1f} | {r['base']:.1f} | "
                  f"{r['diff']:+.1f} | [{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}] | {r['verdict']} |"
                  for r in e.get("versus_baseline", [])]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
