"""Run the DiReDi federation and its baselines on the same data, seeds and evaluation.

    python -m sim.run --clients 8                       # default: cpu profile, synthetic data
    python -m sim.run --profile smoke --clients 2 --rounds 1 --methods diredi,fedavg
    python -m sim.run --data voc --voc-root ~/VOCdevkit --profile paper

Writes runs/<name>/: config.json, rounds.jsonl (one line per method, round and client),
verification.jsonl, results.md (Table III style) and PNG plots; prints the summary at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

METHODS = ("diredi", "fedavg", "fedprox", "local", "oracle")
# Per-round client work of the federation, per profile: smaller than the Table III experiments so
# the default 8-client run (five methods) fits minutes on 2 cores. --rd-iters etc. override it.
FEDERATION_BUDGET = {
    "smoke": {"rd_iters": 2, "redistill_iters": 2, "batch_size": 4},
    "cpu": {"rd_iters": 30, "redistill_iters": 30, "batch_size": 8},
    "paper": {"rd_iters": 2000, "redistill_iters": 1200, "batch_size": 8},
}
log = logging.getLogger("sim.run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sim.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8, help="number of simulated clients (default 8)")
    parser.add_argument("--rounds", type=int, default=1, help="federated rounds (default 1)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS)} (default: all)")
    parser.add_argument("--scenario", default="default8", help="scenario name under experiments/ or a YAML path")
    parser.add_argument("--data", choices=("synth", "voc"), default="synth")
    parser.add_argument("--voc-root", type=Path, help="VOCdevkit or VOC20xx folder (with --data voc)")
    parser.add_argument("--profile", choices=("smoke", "cpu", "paper"), default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="parent folder of run folders")
    parser.add_argument("--name", help="run folder name (default: derived from the settings)")
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="data and model cache")
    parser.add_argument("--ray-address", help="join an existing Ray cluster instead of starting one")
    parser.add_argument("--resume", action="store_true", help="reuse the finished methods of an existing run folder")
    parser.add_argument("--aggregation", choices=("weighted", "trimmed", "ties"), default="weighted")
    parser.add_argument("--redistill", choices=("client", "server"), default="client")
    parser.add_argument("--tutor1", choices=("shared", "per-client"), default="shared",
                        help="Tutor 1 depends only on the edge and presumed data: compute it once per round "
                             "on the server (shared, default) or on every client")
    parser.add_argument("--rd-iters", type=int, help="RD steps per tutor per round (default: per profile)")
    parser.add_argument("--redistill-iters", type=int, help="Distill C steps per round (default: per profile)")
    parser.add_argument("--batch-size", type=int, help="batch size of the clients' work (default: per profile)")
    parser.add_argument("--device", default="auto",
                        help="cpu | cuda | cuda:N | auto (default: cuda when available) for training the manufacturer "
                             "chain; the federation and the local/oracle baselines run on the CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    # Every check that can fail runs here, before any work starts.
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        parser.error(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(METHODS)}")
    args.methods = methods
    if args.clients < 1:
        parser.error(f"--clients must be at least 1, got {args.clients}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    for flag in ("rd_iters", "redistill_iters", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.data == "voc" and (args.voc_root is None or not args.voc_root.is_dir()):
        parser.error(f"--data voc needs --voc-root pointing to an existing folder (got {args.voc_root})")
    if args.data == "synth" and args.voc_root is not None:
        parser.error("--voc-root is only used with --data voc")
    from distill.trainer import resolve_device

    try:
        args.device = str(resolve_device(args.device))
    except ValueError as err:
        parser.error(f"--device: {err}")
    from sim.scenario import load_scenario
    from sim.voc import DataError

    try:
        scenario = load_scenario(args.scenario)
    except (DataError, FileNotFoundError, OSError) as err:
        parser.error(f"--scenario: {err}")
    if args.clients > len(scenario.clients):
        log.info("%d clients for %d scenario specs: specs are reused cyclically (sim.scenario.select_clients)",
                 args.clients, len(scenario.clients))
    args.name = args.name or f"{scenario.name}-{args.profile}-{args.data}-c{args.clients}-r{args.rounds}-s{args.seed}"
    folder = args.out / args.name
    if args.resume and not (folder / "config.json").exists():
        parser.error(f"--resume: {folder} holds no earlier run (no config.json)")
    return args


def resolved_config(args, workspace, settings) -> dict:
    return {"command": "python -m sim.run " + " ".join(sys.argv[1:]), "clients": args.clients, "rounds": args.rounds,
            "methods": args.methods, "scenario": workspace.scenario.name, "data": args.data,
            "voc_root": str(args.voc_root) if args.voc_root else None, "profile": workspace.profile.to_dict(),
            "seed": args.seed, "aggregation": args.aggregation, "redistill": args.redistill,
            "tutor1": args.tutor1, "rd_settings": settings.to_dict(),
            "direct_iters_per_round": direct_iters(settings),
            "client_specs": client_specs(workspace), "shards": workspace.shards.sizes()}


def direct_iters(settings) -> int:
    """Local steps per round of every baseline: as many as a DiReDi client takes (T1 + T2 + Distill C).

    DiReDi's steps are on the larger tutor, so this matches step counts, not FLOPs; the report shows
    the measured seconds of both.
    """
    return 2 * settings.rd_iters + settings.redistill_iters


def client_specs(workspace) -> list[dict]:
    protected = list(workspace.scenario.protected_classes)
    return [{"client": i, "name": c.name, "private": list(c.private), "kept": list(c.kept),
             "dropped": list(c.dropped), "protected": [p for p in protected if p in c.kept]}
            for i, c in enumerate(workspace.clients)]


def evaluate_record(method: str, server_round: int, client: int, model_before, model_after, workspace,
                    seconds: dict, peak_rss_mb: float, ap_before=None) -> dict:
    """A record in the federation's format for the in-process baselines (local, oracle)."""
    from strategies.diredi import per_class_ap

    test, names = workspace.client_test(client), workspace.eval_classes(client)
    if ap_before is None:
        ap_before, _ = per_class_ap(model_before, test, names)
    ap_after, after = per_class_ap(model_after, test, names)
    return {"method": method, "round": server_round, "client": client, "ap_before": ap_before,
            "ap_after": ap_after, "after": after, "seconds": seconds, "peak_rss_mb": peak_rss_mb,
            "bytes_up": 0, "bytes_down": 0, "accepted": None}


def run_local(workspace, chain, rounds: int, settings, on_record) -> list[dict]:
    """Each client trains its own edge on its own data; no server, no exchange (the paper's "Training")."""
    import copy

    from clients.rd import direct_training

    records = []
    for client in range(len(workspace.clients)):
        edge, ap_before = copy.deepcopy(chain.edge), None
        for r in range(1, rounds + 1):
            trained, report = direct_training(edge, workspace.client_train(client), direct_iters(settings),
                                              settings, seed=workspace.seed + 1000 * r + client)
            record = evaluate_record("local", r, client, edge, trained, workspace,
                                     {"direct training": report.seconds}, report.peak_rss_mb, ap_before)
            ap_before = record["ap_after"]
            edge = trained
            records.append(record)
            on_record(record)
    return records


def run_oracle(workspace, chain, rounds: int, settings, on_record) -> list[dict]:
    """Upper bound: one edge trained centrally on the union of every client's data, with the
    federation's total step budget (clients x local steps per round), evaluated on every client."""
    import copy

    from torch.utils.data import ConcatDataset

    from clients.rd import direct_training

    union = ConcatDataset([workspace.client_train(i) for i in range(len(workspace.clients))])
    edge, before = copy.deepcopy(chain.edge), {}
    records = []
    for r in range(1, rounds + 1):
        trained, report = direct_training(edge, union, direct_iters(settings) * len(workspace.clients), settings,
                                          seed=workspace.seed + 1000 * r)
        for client in range(len(workspace.clients)):
            record = evaluate_record("oracle", r, client, edge, trained, workspace,
                                     {"central training": report.seconds / len(workspace.clients)},
                                     report.peak_rss_mb, before.get(client))
            before[client] = record["ap_after"]
            records.append(record)
            on_record(record)
        edge = trained
    return records


def stage_rows(workspace, chain) -> dict[str, dict]:
    """The manufacturer's models on its own validation set (Table III's first rows)."""
    from strategies.diredi import per_class_ap

    s = workspace.scenario
    rows = {}
    for label, model, classes in [("Large (teacher)", chain.teacher, s.teacher_classes),
                                  ("Tutor after Distill A", chain.tutor, s.presumed_classes),
                                  ("Edge after Distill B", chain.edge, s.presumed_classes)]:
        data = workspace.dataset(workspace.shards.manufacturer_val, classes)
        _, summary = per_class_ap(model, data, classes)
        rows[label] = {"map": summary["mAP"], "precision": summary["precision"], "recall": summary["recall"],
                       "f1": summary["f1"]}
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # flwr pulls it in; its INFO lines are noise
    import torch
    from tqdm.auto import tqdm

    from clients.rd import RDSettings
    from sim.federation import run_federation
    from sim.report import RunFolder, write_all
    from sim.metrics import method_means, method_table
    from sim.workspace import prepare

    torch.manual_seed(args.seed)
    # One torch thread per core that is not busy elsewhere: more threads than free cores slow torch
    # down many times over (measured here). While Ray's client actors run, each uses one thread.
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    start = time.perf_counter()
    workspace = prepare(args.profile, args.scenario, num_clients=args.clients, seed=args.seed, data=args.data,
                        voc_root=args.voc_root, cache_dir=args.cache, device=args.device)
    print(f"data: {workspace.data_root} ({len(workspace.records)} images); shards: "
          f"{json.dumps(workspace.shards.sizes()['clients'])}", flush=True)
    chain = workspace.chain(progress=not args.quiet)
    for model in (chain.teacher, chain.tutor, chain.edge):
        model.cpu()  # the Flower federation (Ray actors, wire format) works on CPU tensors
    for name, rep in chain.reports().items():
        print(f"manufacturer {name}: {'reused cache' if rep['reused_cache'] else 'trained'} "
              f"({rep.get('iters')} iterations, {rep.get('seconds', 0):.0f} s when built)", flush=True)
    budget = {k: v if getattr(args, k) is None else getattr(args, k)
              for k, v in FEDERATION_BUDGET[workspace.profile.name].items()}
    settings = RDSettings.from_profile(workspace.profile, **budget)
    folder = RunFolder(args.out / args.name)
    config = resolved_config(args, workspace, settings)

    done_path = folder.path / "done.json"
    done: list[str] = []
    records: list[dict] = []
    if args.resume:
        old = folder.read_config()
        comparable = json.loads(json.dumps(config, default=str))  # as it reads back from config.json
        if {k: v for k, v in old.items() if k != "command"} != {k: v for k, v in comparable.items() if k != "command"}:
            print(f"--resume: {folder.path} was made with other settings; start a new run (or --name)", file=sys.stderr)
            return 2
        done = json.loads(done_path.read_text()) if done_path.exists() else []
        records = [r for r in folder.read_records() if r["method"] in done]
        print(f"resuming {folder.path}: reusing {', '.join(done) or 'nothing'}", flush=True)
    # rounds.jsonl holds exactly the finished methods' records plus the current one's.
    folder.rounds_path.write_text("")
    if not done:
        folder.verification_path.write_text("")
    for record in records:
        folder.append_record(record)
    folder.write_config(config)

    todo = [m for m in args.methods if m not in done]
    bar = tqdm(total=len(todo) * args.rounds * args.clients, desc="client rounds", disable=args.quiet,
               dynamic_ncols=True)

    def on_record(record: dict) -> None:
        folder.append_record(record)
        records.append(record)
        bar.set_postfix_str(f"{record['method']} r{record['round']} c{record['client']}")
        bar.update(1)

    for method in todo:
        bar.write(f"--- {method} ---")
        if method in ("diredi", "fedavg", "fedprox"):
            result = run_federation(method, workspace, chain, args.rounds, settings, ray_address=args.ray_address,
                                    on_record=on_record, share_tutor1=args.tutor1 == "shared",
                                    aggregation=args.aggregation, redistill=args.redistill,
                                    direct_iters=direct_iters(settings),
                                    on_decision=lambda d: folder.append_verification(d.to_dict()))
            for failure in result.failures:
                bar.write(f"client failure: {failure}")
        elif method == "local":
            run_local(workspace, chain, args.rounds, settings, on_record)
        else:
            run_oracle(workspace, chain, args.rounds, settings, on_record)
        done.append(method)
        done_path.write_text(json.dumps(done))
    bar.close()

    specs = client_specs(workspace)
    all_private = [s["private"] for s in specs]
    written = write_all(folder, records, specs, all_private, stage_rows(workspace, chain))
    means = method_means(method_table(records, specs, all_private))
    print("\n| method | final mAP | knowledge gain | forgetting (kept) | released | upload MB/client/round |")
    print("|---|---|---|---|---|---|")
    for row in means:
        print(f"| {row['method']} | {100 * row['map_final']:.1f} | {100 * row['gain']:+.1f} | "
              f"{100 * row['forgetting_kept']:.1f} | {100 * row['released']:+.1f} | {row['bytes_up'] / 1e6:.2f} |")
    print(f"\nrun folder: {folder.path} ({time.perf_counter() - start:.0f} s); results: {written['results']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
