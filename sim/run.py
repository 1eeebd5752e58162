"""Run the DiReDi federation and its baselines on the same data, seeds and evaluation.

    python -m sim.run --clients 8                       # default: cpu profile, synthetic data
    python -m sim.run --profile smoke --clients 2 --rounds 1 --methods diredi,fedavg
    python -m sim.run --data voc --voc-root ~/VOCdevkit --profile paper

Writes runs/<name>/: config.json, rounds.jsonl (one line per method, round and client),
verification.jsonl, results.md (Table III style) and PNG plots; prints the summary at the end.
The same run under the Flower CLI: `flwr run . --run-config "num-clients=8 ..."` (same keys).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from protocol.config import GROUPS, OUTPUT, RunConfig, choices_of

log = logging.getLogger("sim.run")
PROG = "python -m sim.run"  # how argparse and our own error lines name the command
# Shorter flags for two run-config keys (the README's commands use them); the keys' own flags work too.
SHORT_FLAGS = {"num-clients": "--clients", "cache-dir": "--cache"}
TYPES = {"int": int, "float": float, "str": str}  # a field's annotation -> the flag's parser (tuples: str)


def flag_of(field_name: str) -> str:
    """The flag errors and --help name a ``RunConfig`` field by: its short flag, else its run-config key."""
    key = field_name.replace("_", "-")
    return SHORT_FLAGS.get(key, f"--{key}")


def _shown(value) -> str:
    """A default as a user types it."""
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, float):
        return f"{value:g}"
    return '""' if value == "" else str(value)


def build_parser() -> argparse.ArgumentParser:
    """One flag per ``RunConfig`` field, built from the field (its run-config key, type, default, choices,
    help and --help section: ``protocol.config.setting``), plus the flags that are not settings of a run."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    for f in fields(RunConfig):
        key = f.name.replace("_", "-")
        flags = [SHORT_FLAGS[key], f"--{key}"] if key in SHORT_FLAGS else [f"--{key}"]
        kind = f.type.split("[")[0]
        groups[f.metadata["group"]].add_argument(
            *flags, dest=f.name, type=TYPES.get(kind, str), choices=choices_of(f),
            default=_shown(f.default) if kind == "tuple" else f.default,
            help=f"{f.metadata['help']} (default {_shown(f.default)})")
    output = groups[OUTPUT]
    output.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders")
    output.add_argument("--name", help="run folder name (default: derived from the settings)")
    output.add_argument("--resume", action="store_true",
                        help="go on with an existing run folder: its finished methods are reused, an unfinished "
                             "federated method continues after its last checkpointed round")
    output.add_argument("--redo", default="", metavar="METHODS",
                        help="with --resume: comma-separated methods whose records the folder drops and runs again "
                             "(e.g. diredi after its defaults changed: with DiReDi redone, its own settings may "
                             "differ from the folder's)")
    output.add_argument("--quiet", action="store_true", help="no progress bars")
    output.add_argument("--ray-address", help="join an existing Ray cluster instead of starting one")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI's arguments with ``args.config``, the resolved ``RunConfig``; every check that can
    fail runs here, before any work starts."""
    from protocol.config import ConfigError, resolve_run_config

    parser = build_parser()
    args = parser.parse_args(argv)
    raw = run_config_of(args)
    try:
        args.config = resolve_run_config(raw)
    except ConfigError as err:
        parser.error(f"{flag_of(err.key)} {err.problem}")
    args.name = args.name or args.config.run_name()
    args.redo = tuple(m for m in args.redo.split(",") if m)
    if args.redo and not args.resume:
        parser.error("--redo: only with --resume (a new run runs every method)")
    if any(m not in args.config.methods for m in args.redo):
        parser.error(f"--redo: {','.join(args.redo)} is not a subset of --methods {','.join(args.config.methods)}")
    if args.resume:
        from report.writer import RunFolder

        problem = RunFolder.resume_problem(args.out / args.name, json.loads(json.dumps(args.config.to_dict())),
                                           args.redo)
        if problem:
            parser.error(f"--resume: {problem}")
    return args


def run_config_of(args: argparse.Namespace) -> dict:
    """Every ``RunConfig`` field's run-config key and the value of its flag."""
    return {f.name.replace("_", "-"): getattr(args, f.name) for f in fields(RunConfig)}


def user_errors() -> tuple[type[Exception], ...]:
    """What bad input (data, scenario, settings, a cache file) raises, as opposed to a bug."""
    from data.voc import DataError  # scenario errors are DataErrors too
    from models.io import CorruptWeights
    from protocol.config import ConfigError

    return DataError, ConfigError, CorruptWeights


def main(argv=None) -> int:
    """Runs the CLI; bad input ends with one ``prog: error: ...`` line (as argparse's) and exit code 2."""
    args = parse_args(argv)
    try:
        return run(args, argv)
    except user_errors() as err:
        message = " ".join(str(err).split())  # one line, whatever the library's message held
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, argv=None) -> int:
    """The work: data and the manufacturer chain first, then the run folder (only once they loaded)."""
    config: RunConfig = args.config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr pulls it in; its INFO lines are noise
    import torch
    from tqdm.auto import tqdm

    from evaluation.metrics import method_means, method_table
    from report.writer import RunFolder
    from session.workspace import Session
    from strategies.server_app import run_methods, write_summary

    torch.manual_seed(config.training_seed)
    # One torch thread per core that is not busy elsewhere: more threads than free cores slow torch
    # down many times over (measured here). While Ray's client actors run, each uses one thread.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.perf_counter()
    session = Session.open(config, progress=not args.quiet)
    ws = session.workspace
    if config.num_clients > len(ws.scenario.clients):
        log.info("%d clients for %d scenario specs: specs are reused cyclically (data.scenario.select_clients)",
                 config.num_clients, len(ws.scenario.clients))
    print(f"data: {ws.data_root} ({len(ws.records)} images); shards: "
          f"{json.dumps(ws.shards.sizes()['clients'])}", flush=True)
    for name, rep in session.chain.reports().items():
        print(f"manufacturer {name}: {'reused cache' if rep['reused_cache'] else 'trained'} "
              f"({rep.get('iters')} iterations, {rep.get('seconds', 0):.0f} s when built)", flush=True)
    details = {"command": "python -m sim.run " + " ".join(sys.argv[1:] if argv is None else argv), **session.details()}
    try:
        folder = RunFolder.start(args.out / args.name, config.to_dict(), details, resume=args.resume, redo=args.redo)
    except ValueError as err:
        print(f"{PROG}: error: --resume: {err}", file=sys.stderr)
        return 2
    done = folder.read_done()  # (non-empty only with --resume)
    if args.resume:
        from report.checkpoint import checkpoint_round

        partial = {m: checkpoint_round(folder.checkpoints_path, m) for m in config.methods if m not in done}
        print(f"resuming {folder.path}: reusing {', '.join(done) or 'nothing'}"
              + "".join(f"; {m} from round {r + 1}" for m, r in partial.items() if r), flush=True)

    todo = [m for m in config.methods if m not in done]
    from strategies.ledger import sample_count

    per_round = {m: sample_count(config.num_clients, config.fraction) if m in config.federated_methods
                 else config.num_clients for m in todo}
    bar = tqdm(total=config.rounds * sum(per_round.values()), desc="client rounds", disable=args.quiet,
               dynamic_ncols=True, initial=sum(1 for r in folder.read_records() if r["method"] in todo))

    def on_record(record: dict) -> None:
        bar.set_postfix_str(f"{record['method']} r{record['round']} c{record['client']}")
        bar.update(1)

    progress = {"on_record": on_record, "on_method": lambda m: bar.write(f"--- {m} ---")}
    federated = [m for m in todo if m in config.federated_methods]
    # local and oracle outside the simulation: Flower's runtime keeps polling while it lives, and on
    # 2 cores that halves their training speed (measured: 145 s vs 79 s for local). Before it, so that
    # a long run cut short (a study run in parts) has its reference points first.
    records = run_methods(session, None, folder, [m for m in todo if m not in federated], report=not federated,
                          **progress)
    if federated:
        from sim.federation import simulate

        simulate(config, lambda grid, _: run_methods(session, grid, folder, federated, report=False, client_state=True,
                                                     **progress),
                 ray_address=args.ray_address)
        records = run_methods(session, None, folder, [], **progress)  # the report over every method's records
    bar.close()
    write_summary(session, folder, time.perf_counter() - start)

    specs = session.client_specs()
    means = method_means(method_table(records, specs, [s["private"] for s in specs]))
    print("\n| method | final mAP | knowledge gain | forgetting (kept) | released | upload MB/client/round |")
    print("|---|---|---|---|---|---|")
    for row in means:
        print(f"| {row['method']} | {100 * row['map_final']:.1f} | {100 * row['gain']:+.1f} | "
              f"{100 * row['forgetting_kept']:.1f} | {100 * row['released']:+.1f} | {row['bytes_up'] / 1e6:.2f} |")
    print(f"\nrun folder: {folder.path} ({time.perf_counter() - start:.0f} s); results: {folder.path / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
