"""Does a shorter manufacturer chain keep its quality? Chains of several training seeds at a fraction of
the profile's steps, against the full budget, on the manufacturer's validation set.

    python -m experiments.chain_budget --seeds 0 1 2 3 --fractions 1 0.5 --device cuda --jobs 8 \
        --threads 2 --out experiments/results/chain_budget

The data and the shards are the same in every chain (the workspace's seed 0); only the chain's own seed
changes (the models' initial weights and each stage's batch order), so the spread over seeds is the
chain's own noise, the yardstick for "within 1 point of today's chain". A fraction f trains the
teacher round(f x 1200) steps and Distill A and B round(f x 900) each (cpu profile), with the same
learning rate and the same warm-up and cosine decay over the shorter run.

Each (seed, fraction) runs as its own process (``--jobs`` at a time, ``--threads`` torch threads each)
and writes ``<out>/chains/seed<S>-f<F>.json``; chains go to ``--cache`` (``chain/`` there, keyed as
usual: seed 0 at fraction 1 on the CPU at 2 threads is the cached default chain). ``--summarise-only``
rereads those files. Writes ``<out>.json`` and ``<out>.md``: per fraction the mean and standard
deviation over seeds of each model's validation mAP, and per seed the difference from the full
budget with a t interval over seeds. Seconds are wall seconds of jobs that shared the machine, not
timings; a chain's steps are what its cost scales with (``python -m bench.chain`` times a chain alone).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROLES = ("teacher", "tutor", "edge")
# two-sided 95 % quantiles of Student's t by degrees of freedom (1-10)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def scaled_profile(profile, fraction: float):
    """``profile`` with the chain's steps (teacher, Distill A and B) scaled by ``fraction``."""
    b = profile.budget
    return replace(profile, budget=replace(b, teacher_iters=max(1, round(fraction * b.teacher_iters)),
                                           distill_iters=max(1, round(fraction * b.distill_iters))))


def t_interval(values) -> dict:
    """Mean of ``values`` with its 95 % t interval (n - 1 degrees of freedom; none for n < 2)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2 or x.size - 1 not in T95:
        return {"mean": mean, "ci95": [math.nan, math.nan], "n": int(x.size)}
    half = T95[x.size - 1] * float(x.std(ddof=1)) / math.sqrt(x.size)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(x.size)}


def job_name(seed: int, fraction: float) -> str:
    return f"seed{seed}-f{fraction:g}"


def run_job(args) -> int:
    """One chain: train (or load) it and write its validation mAP."""
    import torch

    from distill.chain import manufacturer_chain
    from models.ladder import get_profile
    from session.workspace import prepare

    torch.set_num_threads(args.threads)
    profile = scaled_profile(get_profile(args.profile), args.fraction)
    ws = prepare(profile, args.scenario, seed=0, device=args.device, cache_dir=args.cache)
    s = ws.scenario
    start = time.perf_counter()
    chain = manufacturer_chain(profile, ws.chain_data(), s.teacher_classes, s.presumed_classes, args.seed,
                               Path(args.cache) / "chain", progress=False, device=ws.device)
    seconds = time.perf_counter() - start
    result = {"seed": args.seed, "fraction": args.fraction, "threads": args.threads, "device": ws.device,
              "steps": {"teacher": profile.budget.teacher_iters, "distill_a": profile.budget.distill_iters,
                        "distill_b": profile.budget.distill_iters},
              "wall_s": round(seconds, 1), "validation_map": ws.chain_validation_map(chain),
              "stages": {name: {k: report.get(k) for k in ("seconds", "last_loss", "reused_cache", "key")}
                         for name, report in chain.reports().items()}}
    path = Path(args.out) / "chains" / f"{job_name(args.seed, args.fraction)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("seed", "fraction", "wall_s", "validation_map")}), flush=True)
    return 0


def run_all(args) -> None:
    """Every (seed, fraction) job, ``args.jobs`` at a time; the data is made once first."""
    from models.ladder import get_profile
    from session.workspace import prepare

    prepare(get_profile(args.profile), args.scenario, seed=0, device="cpu", cache_dir=args.cache)
    todo = [(s, f) for f in args.fractions for s in args.seeds
            if not (Path(args.out) / "chains" / f"{job_name(s, f)}.json").exists()]
    running: list[tuple[str, subprocess.Popen, float]] = []
    start = time.perf_counter()
    done = 0
    while todo or running:
        while todo and len(running) < args.jobs:
            seed, fraction = todo.pop(0)
            command = [sys.executable, "-m", "experiments.chain_budget", "--worker", "--seed", str(seed),
                       "--fraction", repr(fraction), "--profile", args.profile, "--scenario", args.scenario,
                       "--device", args.device, "--threads", str(args.threads), "--cache", str(args.cache),
                       "--out", str(args.out)]
            running.append((job_name(seed, fraction), subprocess.Popen(command), time.perf_counter()))
        time.sleep(2)
        for entry in list(running):
            name, process, began = entry
            if process.poll() is not None:
                running.remove(entry)
                done += 1
                left = len(todo) + len(running)
                print(f"[{done}/{done + left}] {name} exit {process.returncode} after "
                      f"{time.perf_counter() - began:.0f} s ({time.perf_counter() - start:.0f} s in all)", flush=True)


def summarise(out: Path, command: str) -> dict:
    """Per fraction: mean and sd over seeds; against fraction 1: the paired difference per seed."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "chains").glob("*.json"))]
    if not rows:
        raise SystemExit(f"no chain results under {out / 'chains'}")
    by = {(r["seed"], float(r["fraction"])): r for r in rows}
    fractions = sorted({f for _, f in by}, reverse=True)
    summary = {"command": command, "device": sorted({r["device"] for r in rows}),
               "threads": sorted({r["threads"] for r in rows}), "fractions": {}}
    for f in fractions:
        seeds = sorted(s for s, g in by if g == f)
        entry = {"seeds": seeds, "steps": by[(seeds[0], f)]["steps"],
                 "wall_s": [by[(s, f)]["wall_s"] for s in seeds]}
        for role in ROLES:
            values = [by[(s, f)]["validation_map"][role] for s in seeds]
            entry[role] = {"per_seed": values, "mean": float(np.mean(values)),
                           "sd": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan}
            paired = [by[(s, f)]["validation_map"][role] - by[(s, 1.0)]["validation_map"][role]
                      for s in seeds if (s, 1.0) in by]
            if f != 1.0 and paired:
                entry[role]["minus_full"] = t_interval(paired)
        summary["fractions"][f"{f:g}"] = entry
    return summary


def markdown(summary: dict) -> str:
    def interval(d):
        lo, hi = d["ci95"]
        return f"{d['mean']:+.1f} [{lo:+.1f}, {hi:+.1f}]" if math.isfinite(lo) else f"{d['mean']:+.1f}"

    lines = [f"`{summary['command']}` (device {', '.join(summary['device'])}, threads "
             f"{', '.join(map(str, summary['threads']))})", "",
             "| fraction | steps (teacher / A / B) | seeds | teacher mAP | tutor mAP | edge mAP |",
             "|---|---|---|---|---|---|"]
    for f, e in summary["fractions"].items():
        steps = e["steps"]
        cells = [f"{e[r]['mean']:.1f} (sd {e[r]['sd']:.1f}; {', '.join(f'{v:.1f}' for v in e[r]['per_seed'])})"
                 for r in ROLES]
        lines.append(f"| {f} | {steps['teacher']} / {steps['distill_a']} / {steps['distill_b']} | "
                     f"{len(e['seeds'])} | " + " | ".join(cells) + " |")
    paired = [(f, e) for f, e in summary["fractions"].items() if "minus_full" in e["teacher"]]
    if paired:
        lines += ["", "| fraction minus full budget, same seed (95 % t interval over seeds) | teacher | tutor | edge |",
                  "|---|---|---|---|"]
        for f, e in paired:
            lines.append(f"| {f} | " + " | ".join(interval(e[r]["minus_full"]) for r in ROLES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--scenario", default="default8")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="chains trained at once")
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/chain_budget"))
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_job(args)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    if 1.0 not in args.fractions:
        parser.error("--fractions must include 1 (the full budget every other fraction is compared with)")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    if len(set(args.seeds)) != len(args.seeds) or any(s < 0 for s in args.seeds):
        parser.error(f"--seeds must be distinct and >= 0, got {args.seeds}")
    command = " ".join(["python -m experiments.chain_budget", *(sys.argv[1:] if argv is None else argv)])
    if not args.summarise_only:
        run_all(args)
    elif args.out.with_suffix(".json").exists():  # keep the command that trained the chains
        command = json.loads(args.out.with_suffix(".json").read_text()).get("command", command)
    summary = summarise(args.out, command)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    args.out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
