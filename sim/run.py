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

from models.compute import LAYOUTS, PRECISIONS
from models.ladder import PROFILES
from protocol.config import AGGREGATION_METHODS, BODY_CACHES, CLAIM_RULES, DELTA_PRECISIONS, DIRECTION_REFERENCES, EDGE_CHECKS, METHODS, REDISTILL_SIDES, SPREAD_MODES, TUTOR1_MODES, RunConfig

log = logging.getLogger("sim.run")
DEFAULTS = RunConfig()
PROG = "python -m sim.run"  # how argparse and our own error lines name the command
# CLI flag -> run-config key, where they differ (errors name the flag the user typed).
FLAG_OF_KEY = {"num-clients": "--clients", "cache-dir": "--cache"}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


# --help's sections, by concern (every flag belongs to exactly one; the run-config keys are the flags'
# names, but for FLAG_OF_KEY's two)
GROUPS = {
    "the run": ("--clients", "--rounds", "--fraction", "--methods", "--profile", "--seed", "--replicate",
                "--timeout-s"),
    "data": ("--scenario", "--data", "--voc-root"),
    "evaluation": ("--eval-every", "--operating-threshold"),
    "output, cache and resume": ("--out", "--name", "--cache", "--resume", "--quiet", "--ray-address"),
    "DiReDi's clients (RD and Distill C)": ("--redistill", "--tutor1", "--rd-iters", "--redistill-iters",
                                            "--redistill-lr", "--redistill-score-weight", "--edge-check", "--spread",
                                            "--body-cache", "--batch-size", "--delta-precision", "--delta-topk"),
    "DiReDi's verification": ("--norm-factor", "--protected-tolerance", "--noise-z", "--kept-tolerance",
                              "--direction-z", "--direction-reference", "--operating-tolerance"),
    "DiReDi's merge": ("--aggregation", "--beta", "--claims", "--clip-multiple", "--row-multiple", "--clip-norm",
                       "--weight-cap"),
    "the baselines": ("--direct-iters", "--direct-lr", "--fedprox-mu", "--server-momentum", "--fedadam-eta",
                      "--fedadam-tau"),
    "compute": ("--device", "--precision", "--layout"),
    "differential privacy on client deltas": ("--dp-clip", "--dp-noise", "--dp-delta"),
}


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group_of = {}
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title)
        group_of.update({flag: group for flag in flags})

    def add(flag: str, **options) -> None:
        group_of[flag].add_argument(flag, **options)  # a flag in no group fails here, when the parser is built

    add("--clients", type=int, default=d.num_clients, help=f"number of simulated clients (default {d.num_clients})")
    add("--rounds", type=int, default=d.rounds, help=f"federated rounds (default {d.rounds})")
    add("--eval-every", type=int, default=d.eval_every,
        help="clients evaluate their edge after every k-th round and after the last; the rounds between "
             f"record costs only (default {d.eval_every}: every round)")
    add("--fraction", type=float, default=d.fraction,
        help="share of the clients sampled each round by every federated method, seeded (default 1.0)")
    add("--methods", default=",".join(d.methods),
        help=f"comma-separated subset of {','.join(METHODS)} (default: {','.join(d.methods)})")
    add("--scenario", default=d.scenario, help="scenario name in data/scenarios/ or a YAML path")
    add("--data", choices=("synth", "voc"), default=d.data)
    add("--voc-root", type=Path, help="VOCdevkit or VOC20xx folder (with --data voc)")
    add("--profile", choices=tuple(PROFILES), default=d.profile)
    add("--seed", type=int, default=d.seed, help="the data: shards and the manufacturer chain (default 0)")
    add("--replicate", type=int, default=d.replicate,
        help="a study's replicate: other training seeds, data order and client sampling on the same data, "
             "shards and chain (default 0: the training seeds are --seed)")
    add("--out", type=Path, default=Path("runs"), help="parent folder of run folders")
    add("--name", help="run folder name (default: derived from the settings)")
    add("--cache", type=Path, default=Path(d.cache_dir), help="data and model cache")
    add("--ray-address", help="join an existing Ray cluster instead of starting one")
    add("--resume", action="store_true",
        help="go on with an existing run folder: its finished methods are reused, an unfinished federated "
             "method continues after its last checkpointed round")
    add("--aggregation", choices=AGGREGATION_METHODS, default=d.aggregation)
    add("--beta", type=float, default=d.beta, help="eq. (10): the tutor moves by beta x the merged delta "
        f"(default {d.beta})")
    add("--redistill", choices=REDISTILL_SIDES, default=d.redistill)
    add("--tutor1", choices=TUTOR1_MODES, default=d.tutor1,
        help="Tutor 1 depends only on the edge and presumed data: compute it once on the server while every "
             "client holds the server's edge (shared, default), or always on every client")
    add("--rd-iters", type=positive_int, help="RD steps per tutor per round (default: per profile)")
    add("--redistill-iters", type=positive_int, help="Distill C steps per round (default: per profile)")
    add("--direct-iters", type=positive_int,
        help="steps per round of the federated direct-training baselines' clients (default: as many as a DiReDi "
             "client; local and oracle always take that many)")
    add("--direct-lr", type=float, default=d.direct_lr,
        help="client lr of the federated direct-training baselines (default 0: the profile's)")
    add("--fedprox-mu", type=float, default=d.fedprox_mu, help=f"FedProx's mu (default {d.fedprox_mu:g})")
    add("--delta-precision", choices=DELTA_PRECISIONS, default=d.delta_precision,
        help=f"dtype of the uploaded neck/head delta (default {d.delta_precision})")
    add("--delta-topk", type=float, default=d.delta_topk,
        help="upload only this share of each delta tensor's largest entries; the rest is added to the "
             "client's next delta (default 1: all)")
    add("--batch-size", type=positive_int, help="batch size of the clients' work (default: per profile)")
    add("--device", default=d.device,
        help="cpu | cuda | cuda:N | auto (default: cuda when available) for training the manufacturer "
             "chain; the federation and the local/oracle baselines run on the CPU")
    add("--precision", choices=PRECISIONS, default=d.precision,
        help="the ResNet bodies' arithmetic, chain included: bfloat16 (autocast) | float32 | auto (bfloat16 where "
             f"the CPU has AVX-512 BF16 or AMX); weights, deltas and AP stay float32 (default {d.precision})")
    add("--layout", choices=LAYOUTS, default=d.layout,
        help=f"tensor layout of every model's convolutions (default {d.layout})")
    add("--redistill-lr", type=float, default=d.redistill_lr,
        help="a client's Distill C learning rate (0: the profile's lr, as local training's; default 0)")
    add("--redistill-score-weight", type=float, default=d.redistill_score_weight,
        help="a client's Distill C also learns the tutor's class scores on its kept presumed classes, with this "
             f"weight (0: off, the paper's Distill C; default {d.redistill_score_weight:g})")
    add("--edge-check", choices=EDGE_CHECKS, default=d.edge_check,
        help="on: the manufacturer checks each client's re-distilled edge on its validation set and the client "
             "deploys it only if its protected classes stay within the verification's tolerance of the "
             f"manufacturer's edge, else keeps its earlier edge (DiReDi; default {d.edge_check})")
    add("--spread", choices=SPREAD_MODES, default=d.spread,
        help="on: each round the server distils the updated tutor into an edge of its own on the manufacturer's "
             "images (the tutor's outputs as targets) and each client's Distill C starts from that edge, so "
             f"classes other clients taught the tutor can reach it (DiReDi; default {d.spread})")
    add("--operating-tolerance", type=float, default=d.operating_tolerance,
        help="DiReDi's verification: the recall at score 0.5 a delta may cost a guarded class on the validation "
             "set (protected, kept and learnt classes; or noise-z x the drop's bootstrap std if larger; "
             f"inf: recorded only; default {d.operating_tolerance:g})")
    add("--operating-threshold", type=float, default=d.operating_threshold,
        help="the score from which a product reports detections: eq. 11's precision, recall and F1 and the "
             f"verification's recall are measured there (default {d.operating_threshold:g})")
    add("--claims", choices=CLAIM_RULES, default=d.claims,
        help="DiReDi's class-aware merge: trusted (each client's rows of the classes it says it trained) | earned "
             "(only classes its candidate tutor improves on the validation set, or holds when no claimer improves "
             "them) | improving (only classes it improves; a class no claimer improves keeps its rows) | lifting "
             "(earned, and its own row of the class must not lower the tutor's top scores of the class on the "
             f"validation images holding it; default {d.claims})")
    add("--clip-multiple", type=float, default=d.clip_multiple,
        help="DiReDi's merge: accepted deltas clipped to this multiple of the round's median delta norm "
             f"(inf: off; default {d.clip_multiple:g})")
    add("--row-multiple", type=float, default=d.row_multiple,
        help="DiReDi's merge: each accepted delta's classification rows of a class clipped to this multiple of the "
             f"round's median change of that class's rows (inf: off; default {d.row_multiple:g})")
    add("--body-cache", choices=BODY_CACHES, default=d.body_cache,
        help="how long a DiReDi client keeps its tutor body's outputs per image: round (Tutor 2's, for its "
             "Distill C) | run (on its disk from round to round: fewer body passes, about 0.23 MB per image "
             f"and flip in the cpu profile); the same figures either way (default {d.body_cache})")
    add("--dp-clip", type=float, default=d.dp_clip,
        help="differential privacy: each client clips its delta to this L2 norm before upload (default inf: off)")
    add("--dp-noise", type=float, default=d.dp_noise,
        help="differential privacy: Gaussian noise of std dp-noise x dp-clip per delta coordinate, on the client "
             "(default 0: off; needs --dp-clip); clients report the epsilon they spent")
    add("--dp-delta", type=float, default=d.dp_delta,
        help=f"differential privacy: the delta of the (epsilon, delta) clients report (default {d.dp_delta:g})")
    add("--norm-factor", type=float, default=d.norm_factor,
        help=f"verification: a delta's norm bound is this factor x the tutor's neck/head norm (default {d.norm_factor:g})")
    add("--protected-tolerance", type=float, default=d.protected_tolerance,
        help="verification: the largest AP drop a delta may cost a protected class on the validation set "
             f"(default {d.protected_tolerance:g})")
    add("--noise-z", type=float, default=d.noise_z,
        help="verification: ... or noise-z x the drop's bootstrap std, if larger (0: no bootstrap; "
             f"default {d.noise_z:g})")
    add("--kept-tolerance", type=float, default=d.kept_tolerance,
        help="verification: the largest mean AP drop over the presumed classes (inf: recorded only; "
             f"default {d.kept_tolerance:g})")
    add("--direction-z", type=float, default=d.direction_z,
        help="verification: a delta's cosine with the reference update must reach direction-z / sqrt(d) "
             f"(0: off; default {d.direction_z:g})")
    add("--direction-reference", choices=DIRECTION_REFERENCES, default=d.direction_reference,
        help="verification: the direction gate's reference, the median of the round's other deltas (peers) or "
             f"the server's own RD update (server; default {d.direction_reference})")
    add("--clip-norm", type=float, default=d.clip_norm,
        help=f"DiReDi's merge: accepted deltas clipped to this L2 norm (inf: off; default {d.clip_norm:g})")
    add("--weight-cap", type=float, default=d.weight_cap,
        help="DiReDi's merge: a client's claimed example count capped at this multiple of the round's median "
             f"claim (inf: off; default {d.weight_cap:g})")
    add("--server-momentum", type=float, default=d.server_momentum,
        help=f"fedavgm: Flower's FedAvgM server momentum, server lr 1 (default {d.server_momentum:g})")
    add("--fedadam-eta", type=float, default=d.fedadam_eta,
        help=f"fedadam: Flower's FedAdam server learning rate (default {d.fedadam_eta:g})")
    add("--fedadam-tau", type=float, default=d.fedadam_tau,
        help=f"fedadam: its adaptivity (default {d.fedadam_tau:g})")
    add("--timeout-s", type=float, default=d.timeout_s,
        help="seconds the server waits for one round trip with the clients (0: sized from the profile's step "
             "time; default 0)")
    add("--quiet", action="store_true", help="no progress bars")
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
        parser.error(f"{FLAG_OF_KEY.get(err.key, '--' + err.key)} {err.problem}")
    args.name = args.name or args.config.run_name()
    if args.resume:
        earlier = args.out / args.name / "config.json"
        if not earlier.exists():
            parser.error(f"--resume: {earlier.parent} holds no earlier run (no config.json)")
        if json.loads(earlier.read_text()).get("run") != json.loads(json.dumps(args.config.to_dict())):
            parser.error(f"--resume: {earlier.parent} was made with other settings; start a new run (or --name)")
    return args


def flag_of(field_name: str) -> str:
    """The CLI flag of a ``RunConfig`` field: its run-config key, but for ``FLAG_OF_KEY``'s."""
    key = field_name.replace("_", "-")
    return FLAG_OF_KEY.get(key, f"--{key}")


def run_config_of(args: argparse.Namespace) -> dict:
    """Every ``RunConfig`` field's run-config key and the value of its flag; an unset optional flag
    (``--voc-root``, the step counts and batch size: "the profile's") is the field's empty value."""
    raw = {}
    for f in fields(RunConfig):
        value = getattr(args, flag_of(f.name)[2:].replace("-", "_"))
        if value is None:
            value = getattr(DEFAULTS, f.name)
        raw[f.name.replace("_", "-")] = str(value) if isinstance(value, Path) else value
    return raw


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
        folder = RunFolder.start(args.out / args.name, config.to_dict(), details, resume=args.resume)
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
