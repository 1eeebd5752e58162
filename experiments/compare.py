"""The comparison study: every method, R rounds, S replicates, one scenario, one manufacturer chain per replicate.

    python -m experiments.compare                                 # 20 rounds x replicates 0 1 2, every method
    python -m experiments.compare --replicates 1                  # one replicate (a part that fits a session)
    python -m experiments.compare --summarise-only                # combine what the run folders hold
    python -m experiments.compare --precision bfloat16 --out DIR  # the same study in bfloat16 (its own chain)
    python -m experiments.compare --paper-distill-c --out experiments/results/compare   # the study of the paper's
                                                                  # Distill C, the defaults when it ran

Each replicate is its own resumable run of ``python -m sim.run`` (``--replicate k``: other training
seeds, data order and client sampling on the same data, shards and chain) in
``<out>/runs/rep<k>/``; a replicate whose folder exists is continued with ``--resume`` (finished
methods are reused, an unfinished one goes on after its last checkpointed round). The chain and the
shards are fingerprinted in ``<out>/chain.json`` by the first replicate; a later replicate on other
weights or shards stops with one line, so a study never mixes two chains. With ``--chain-per-replicate`` a
replicate begun under it keeps its own chain (``<out>/runs/rep<k>/chain.json``): the same seed builds another
chain on another CPU make, so each replicate runs where its chain can be rebuilt, every method of a replicate
on one chain (the verdicts pair within a replicate), and the intervals over replicates then also hold the
chain's own variation. The shards are data, the same on every machine, and stay fixed for the study.

The baselines' settings (FedAvg's client lr and local steps, FedProx's mu) come from
``experiments/results/baseline_grid.json`` (``experiments.baseline_grid``, chosen on the
manufacturer's validation set) unless ``--no-grid``. At the end (and with ``--summarise-only``) the
run folders are combined (``report.study``) into ``<out>/compare.json``, ``compare.md`` and the
plots; ``<out>/study.json`` keeps each invocation's command and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from models.compute import LAYOUTS, PRECISIONS, cpu_model
from protocol.config import METHODS, NO_SPREAD, PAPER_DISTILL_C, TRUSTED_MERGE
from report.study import CHAIN_ROLES
from report.writer import read_json_lines

# The study under today's defaults (spread on; replicates 0 and 1 on an AMD EPYC's chain, 2 and 3 on an Intel
# Xeon's). experiments/results/compare-combo holds the earlier study, DiReDi without spread, assembled from runs;
# experiments/results/compare the study of the paper's Distill C without spread (--paper-distill-c)
OUT = Path("experiments/results/compare-spread")
PAPER_FLAGS = [item for key, value in PAPER_DISTILL_C.items() for item in (f"--{key}", f"{value:g}")] + [
    item for key, value in {**NO_SPREAD, **TRUSTED_MERGE}.items() for item in (f"--{key}", f"{value}")
]  # and no spread and the trusted merge, as it ran
GRID = Path("experiments/results/baseline_grid.json")
POLL_S = 30.0
SIDE_BY_SIDE = ("local", "oracle")  # sim.run trains them together, before the federated methods


def grid_settings(path: Path) -> dict[str, float]:
    """sim.run flags of the chosen baseline settings, or {} when the grid has not been run."""
    if not path.exists():
        return {}
    chosen = json.loads(path.read_text())["chosen"]
    return {"--direct-lr": chosen["lr"], "--direct-iters": chosen["steps"], "--fedprox-mu": chosen["mu"]}


def replicate_command(args: argparse.Namespace, replicate: int, settings: dict) -> list[str]:
    folder = args.out / "runs" / f"rep{replicate}"
    command = [sys.executable, "-m", "sim.run", "--profile", args.profile, "--scenario", args.scenario,
               "--clients", str(args.clients), "--rounds", str(args.rounds), "--methods", ",".join(args.methods),
               "--replicate", str(replicate), "--out", str(args.out / "runs"), "--name", f"rep{replicate}",
               "--cache", args.cache, "--quiet"]
    if args.precision != "float32" or args.layout != "nchw":  # the float32 study's commands stay as they were
        command += ["--precision", args.precision, "--layout", args.layout]
    if args.eval_every != 1:
        command += ["--eval-every", str(args.eval_every)]
    if args.paper_distill_c:
        command += PAPER_FLAGS
    for flag, value in settings.items():
        command += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    if (folder / "config.json").exists():
        if not args.redo_stale:  # (--redo-stale runs DiReDi again under today's settings instead)
            command += finished_diredi_settings(command, folder)
        command.append("--resume")
        if args.redo_stale and stale_diredi(command, folder):
            command += ["--redo", "diredi"]
    return command


def command_run(command: list[str]) -> dict:
    """The run configuration (as config.json holds it) a ``sim.run`` command line makes."""
    from sim.run import build_parser, run_config_of
    from protocol.config import resolve_run_config

    start = command.index("sim.run") + 1
    return json.loads(json.dumps(resolve_run_config(run_config_of(build_parser().parse_args(command[start:]))).to_dict()))


def finished_diredi_settings(command: list[str], folder: Path) -> list[str]:
    """Flags that pin DiReDi's own settings to those the replicate's folder recorded, once DiReDi finished there:
    a default that changed since (e.g. ``--calibrate``) would otherwise stop the other methods from resuming,
    though none of them reads it (without ``--redo-stale``, which runs DiReDi again under today's settings)."""
    from protocol.config import RunConfig, diredi_only_settings
    from report.writer import RunFolder

    run_folder = RunFolder(folder)
    if "diredi" not in run_folder.read_done():
        return []
    recorded = RunConfig.completed(run_folder.read_config().get("run") or {})
    today = RunConfig.completed(command_run(command))
    flags = []
    for name in diredi_only_settings():
        if recorded[name] != today[name]:
            value = recorded[name]
            flags += [f"--{name.replace('_', '-')}",
                      ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)]
    return flags


def stale_diredi(command: list[str], folder: Path) -> bool:
    """Whether the replicate's folder can go on with ``command``'s settings only once DiReDi's records, made
    with other DiReDi settings, are dropped (every other setting the same)."""
    from report.writer import RunFolder

    run = command_run(command)
    return RunFolder.resume_problem(folder, run) is not None and RunFolder.resume_problem(folder, run, ("diredi",)) is None


def fingerprints(args: argparse.Namespace) -> dict[str, str]:
    """Hashes of the manufacturer's weights and of every shard: what all replicates must share."""
    from session.workspace import records_fingerprint, workspace_of
    from models.io import state_fingerprint
    from protocol.config import resolve_run_config

    config = resolve_run_config({"profile": args.profile, "scenario": args.scenario, "num-clients": args.clients,
                                 "cache-dir": args.cache, "precision": args.precision, "layout": args.layout})
    ws = workspace_of(config)
    chain = ws.chain(progress=True)
    shards = ws.shards
    out = {role: state_fingerprint(getattr(chain, role).state_dict()) for role in ("teacher", "tutor", "edge")}
    out["manufacturer_shards"] = records_fingerprint(shards.teacher_train + shards.presumed_train
                                                     + shards.manufacturer_val)
    out["client_shards"] = records_fingerprint([r for c in shards.clients for r in c.presumed + c.private + c.test])
    return out


# chain.json's keys that describe the chain instead of fingerprinting it
CHAIN_NOTES = ("cpu", "note")


def replicate_chain_path(args: argparse.Namespace, replicate: int) -> Path:
    """The chain.json a replicate's chain is checked against: its own once it has one (begun under
    --chain-per-replicate, which gives a new replicate one), else the study's."""
    folder = args.out / "runs" / f"rep{replicate}"
    own = folder / "chain.json"
    if own.exists() or (args.chain_per_replicate and not (folder / "config.json").exists()):
        return own
    return args.out / "chain.json"


def check_chain(args: argparse.Namespace, replicate: int, now: dict[str, str]) -> None:
    """Writes the fingerprints (and the CPU that built the chain) on first use; stops when the shards differ
    from the study's or the chain from the replicate's (``replicate_chain_path``)."""
    study = args.out / "chain.json"
    if not study.exists():
        args.out.mkdir(parents=True, exist_ok=True)
        study.write_text(json.dumps({**now, "cpu": cpu_model()}, indent=1))
    path = replicate_chain_path(args, replicate)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**{k: now[k] for k in CHAIN_ROLES}, "cpu": cpu_model()}, indent=1))
    chain, shards = json.loads(path.read_text()), json.loads(study.read_text())
    changed = [f"{k} in {path}" for k in CHAIN_ROLES if chain.get(k) != now[k]]
    changed += [f"{k} in {study}" for k in shards if k not in CHAIN_NOTES + CHAIN_ROLES and shards[k] != now.get(k)]
    if changed:
        built_on = f"replicate {replicate}'s chain was built on {chain['cpu']!r}, this machine is {cpu_model()!r}; " \
            if "cpu" in chain else ""
        own = "" if args.chain_per_replicate else \
            ", or let a new replicate keep a chain of its own with --chain-per-replicate"
        raise SystemExit(f"python -m experiments.compare: error: the manufacturer chain or shards differ from the "
                         f"study's or replicate's ({'; '.join(changed)}); {built_on}the same seed builds another chain "
                         f"on another CPU make or thread count: continue the study where its chain was built, "
                         f"rebuild the chain at the thread count its manifests record, or start a new study with "
                         f"--out{own}")


def records_done(args: argparse.Namespace) -> int:
    total = 0
    for replicate in args.replicates:
        path = args.out / "runs" / f"rep{replicate}" / "rounds.jsonl"
        if path.exists():
            with path.open() as f:
                total += sum(1 for _ in f)
    return total


def round_seconds(folders) -> dict[str, float]:
    """Per method, the median wall seconds of one of its rounds in the run folders' records: a federated
    round's ``round_wall_s``; a local or oracle round, its clients' seconds summed (one process trains
    them in turn)."""
    rounds: dict[tuple[str, str, int], float] = {}
    for folder in folders:
        for r in read_json_lines(Path(folder) / "rounds.jsonl"):  # a line still being written is left out
            key = (Path(folder).name, r["method"], r["round"])
            if r.get("round_wall_s") is not None:
                rounds[key] = float(r["round_wall_s"])
            else:
                rounds[key] = rounds.get(key, 0.0) + sum(r.get("seconds", {}).values())
    by_method: dict[str, list[float]] = {}
    for (_, method, _), seconds in rounds.items():
        by_method.setdefault(method, []).append(seconds)
    return {method: statistics.median(values) for method, values in by_method.items()}


def seconds_left(args: argparse.Namespace, seconds: dict[str, float]) -> float | None:
    """The study's remaining wall seconds at ``seconds`` per round of each method (``round_seconds``):
    per replicate, the rounds each method has not recorded, local and the oracle side by side (``sim.run``
    trains them together, before the federated methods). None where a method with rounds left has no timing."""
    total = 0.0
    for replicate in args.replicates:
        recorded: dict[str, int] = {}
        for r in read_json_lines(args.out / "runs" / f"rep{replicate}" / "rounds.jsonl"):
            recorded[r["method"]] = max(recorded.get(r["method"], 0), r["round"])
        left = {m: max(0, args.rounds - recorded.get(m, 0)) for m in args.methods}
        if any(left[m] and m not in seconds for m in args.methods):
            return None
        side_by_side = [left[m] * seconds[m] for m in SIDE_BY_SIDE if m in args.methods]
        total += max(side_by_side, default=0.0) + sum(left[m] * seconds[m] for m in args.methods
                                                      if m not in SIDE_BY_SIDE and left[m])
    return total


def eta_text(predicted_at_start: float | None, predicted_now: float | None, elapsed: float,
             done: int, first: int, total: int) -> str:
    """The ETA: the rounds left at each method's own pace (earlier rounds of the study), scaled by how much
    slower or faster this invocation has gone than that pace (the machine's load); without timings, the
    client-rounds left at this invocation's rate."""
    def minutes(seconds: float) -> str:
        return f"ETA {seconds / 60:.0f} min" if seconds >= 30 else "ETA under a minute"

    if predicted_at_start is not None and predicted_now is not None:
        done_predicted = predicted_at_start - predicted_now
        pace = elapsed / done_predicted if done_predicted > POLL_S else 1.0
        return minutes(predicted_now * pace)
    rate = (done - first) / elapsed if done > first else 0.0
    # No ETA until this invocation has recorded something: a resumed study has no rate yet.
    return minutes((total - done) / rate) if rate > 0 else "ETA after the first record"


def report_progress(args: argparse.Namespace, total: int, start: float, first: int, stop: threading.Event) -> None:
    """A line every POLL_S: client-rounds recorded over the whole study, and the ETA (``eta_text``)."""
    seconds = round_seconds(sorted((args.out / "runs").glob("rep*")))
    at_start = seconds_left(args, seconds)
    while not stop.wait(POLL_S):
        done = records_done(args)
        elapsed = time.perf_counter() - start
        eta = eta_text(at_start, seconds_left(args, seconds), elapsed, done, first, total)
        print(f"study: {done}/{total} client-rounds ({100 * done / total:.0f} %), {elapsed / 60:.1f} min, {eta}",
              flush=True)


def summarise(args: argparse.Namespace, command: str | None, wall_s: float | None) -> dict:
    from report.study import summarise_run_folders, write_study

    folders = [p for p in sorted((args.out / "runs").glob("rep*")) if (p / "rounds.jsonl").exists()]
    if not folders:
        made = json.loads((args.out / "compare.json").read_text()) if (args.out / "compare.json").is_file() else {}
        how = f"; its summary was assembled from other studies' runs by: {made['command']}" \
            if made.get("assembled") and made.get("command") else ""
        raise SystemExit(f"python -m experiments.compare: error: no run folder with records under "
                         f"{args.out / 'runs'}{how}")
    summary = summarise_run_folders(folders)  # with each replicate's chain when they differ
    write_study(summary, args.out, command=command, wall_s=wall_s)
    return summary


def log_invocation(args: argparse.Namespace, command: str, wall_s: float) -> None:
    path = args.out / "study.json"
    log = json.loads(path.read_text()) if path.exists() else {"invocations": []}
    log["invocations"].append({"command": command, "wall_s": round(wall_s, 1), "replicates": args.replicates,
                               "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    log["wall_s_total"] = round(sum(i["wall_s"] for i in log["invocations"]), 1)
    path.write_text(json.dumps(log, indent=1))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--replicates", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-every", type=int, default=1,
                        help="sim.run's --eval-every: clients evaluate after every k-th round and the last "
                             "(default 1; the verdicts' rounds 2, 10 and 20 are evaluated with k = 2)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--scenario", default="default8")
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="sim.run's --precision for every replicate, chain included (default float32)")
    parser.add_argument("--layout", choices=LAYOUTS, default="nchw", help="sim.run's --layout (default nchw)")
    parser.add_argument("--grid", type=Path, default=GRID, help="the baseline grid's JSON (chosen settings)")
    parser.add_argument("--no-grid", action="store_true", help="the baselines at the default settings")
    parser.add_argument("--summarise-only", action="store_true", help="combine the run folders; run nothing")
    parser.add_argument("--redo-stale", action="store_true",
                        help="run DiReDi again in a replicate whose DiReDi records were made with other DiReDi "
                             "settings than today's (after a DiReDi default changed; sim.run --redo diredi); the "
                             "other methods' records are kept. Without it such a replicate stops with an error")
    parser.add_argument("--chain-per-replicate", action="store_true",
                        help="a replicate begun under this flag keeps the chain of the machine it started on "
                             "(runs/rep<k>/chain.json) instead of the study's; every method of it runs on that chain")
    parser.add_argument("--paper-distill-c", action="store_true",
                        help="DiReDi as experiments/results/compare ran it, the paper's Distill C and no spread: sim.run "
                             + " ".join(PAPER_FLAGS))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 1 or args.eval_every < 1:
        parser.error("--rounds, --clients and --eval-every must be at least 1")
    if min(args.replicates) < 0 or len(set(args.replicates)) != len(args.replicates):
        parser.error("--replicates must be distinct numbers >= 0")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(METHODS)}")
    if "diredi" not in args.methods:
        parser.error("--methods must include diredi: the study compares it with the others")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m experiments.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.summarise_only:  # the wall time of the runs, when this study ran them
        study = args.out / "study.json"
        summarise(args, command, json.loads(study.read_text()).get("wall_s_total") if study.exists() else None)
        print(f"written: {args.out / 'compare.json'}, {args.out / 'compare.md'}")
        return 0
    start = time.perf_counter()
    chain = fingerprints(args)
    for replicate in args.replicates:  # every replicate before any runs: a refusal costs no training
        check_chain(args, replicate, chain)
    settings = {} if args.no_grid else grid_settings(args.grid)
    print(f"baseline settings: {settings or 'defaults'}", flush=True)
    total = len(args.replicates) * args.rounds * args.clients * len(args.methods)
    stop = threading.Event()
    ticker = threading.Thread(target=report_progress, args=(args, total, start, records_done(args), stop), daemon=True)
    ticker.start()
    try:
        for replicate in args.replicates:
            cmd = replicate_command(args, replicate, settings)
            print(f"replicate {replicate}: {' '.join(cmd[1:])}", flush=True)
            code = subprocess.call(cmd)
            if code != 0:
                print(f"python -m experiments.compare: error: replicate {replicate} stopped with exit code {code}; "
                      f"run the same command again to resume it", file=sys.stderr)
                return code
    finally:
        stop.set()
        log_invocation(args, command, time.perf_counter() - start)
    summarise(args, command, json.loads((args.out / "study.json").read_text())["wall_s_total"])
    print(f"written: {args.out / 'compare.json'}, {args.out / 'compare.md'} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
