"""How much CPU work a round is, per method, before any scheduling: what the round-cost ratio would be
if both methods kept every core busy all round.

    python -m bench.round_work --run experiments/results/default8 --threads 1

A simulated round runs the clients (two Ray actors on the two cores) and the server's own work on the
same machine, so its wall time is at least its CPU work divided by the cores. This times, on one
thread in one process (CPU seconds, ``time.process_time``), the work of a steady round (round 2 on:
every client computes its own Tutor 1) with the run's settings and scenario:

* ``client_s``: one client's round, per part. DiReDi: RD Tutor 1 on the presumed data, RD Tutor 2 on
  the client's data, the delta, Distill C from the tutor (with Tutor 2's body outputs, as a client
  has them: ``distill.body_memo``; the tutor's class scores on the kept presumed classes as soft targets when
  the run's ``redistill_score_weight`` is on), the re-distilled edge's evaluation on the client's test shard. FedAvg: direct training of as many steps (``rd_iters`` x 2 + ``redistill_iters``
  = ``direct_iters``) and the trained edge's evaluation. Averaged over ``--clients`` clients.
* ``server_s``: the server's per round. DiReDi: each delta's verification (its candidate tutor's
  validation AP and the noise of its protected-class drops, ``DiReDiStrategy.verify`` on this
  client's real delta) times the clients, and the updated tutor's evaluation (``record_tutor``).
  FedAvg: its weighted mean of the clients' edges, times nothing here (under a tenth of a second).
* ``work_ratio``: (clients x DiReDi client + DiReDi server) / (clients x FedAvg client): the ratio of
  the round walls if both rounds were packed onto the cores without a gap.

``--body-cache run`` also times each DiReDi client's round with the tutor body's outputs of every
(image, flip) pair of its data already in its memo, as ``--body-cache run`` has them in a late round
(``bench.feature_reuse``: 96 % of the body's images by round 10, all by round 20), interleaved with the
round without them; it writes ``body_cache`` (the filling itself is not timed).

Not counted, for either method: what every message costs besides its phases (building the models,
saving the client's state, releasing memory; a few tenths of a second) and Flower's messaging.

Writes the key ``round_work`` of ``experiments/results/cost.json`` (other keys kept) and prints it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench.run_folder import add_run_arguments, open_run, write_cost_keys
from data.voc import CLASS_INDEX
from distill.body_memo import BodyMemo
from distill.rd import client_delta, direct_training, distill_c, reverse_distill_tutor1, reverse_distill_tutor2
from evaluation.ap import per_class_ap
from models.compute import Compute, computing
from protocol.wire import work_seed
from strategies.ledger import Recorder
from strategies.server_app import make_strategy


def cpu_seconds(fn):
    """``fn()``'s result and the CPU seconds it took."""
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def client_round(session, config, partition: int, server_round: int, timer=cpu_seconds,
                 run_memo: BodyMemo | None = None, fedavg_too: bool = True) -> tuple[dict, dict, dict]:
    """One client's DiReDi and FedAvg work of a round, each part run through ``timer`` (``fn -> (result,
    measurement)``; default: CPU seconds), the measurements per part, and the client's delta.
    ``run_memo``: a run-long memo of the tutor body's outputs (``--body-cache run``) that every DiReDi
    phase reads and adds to; without it, the default's (Tutor 2's outputs, read by Distill C)."""
    ws, settings = session.workspace, config.client_training()
    tutor, edge = session.chain.tutor, session.chain.edge
    seed = work_seed(config.seed, server_round, partition)
    presumed, train, test = ws.client_presumed(partition), ws.client_train(partition), ws.client_test(partition)
    classes = ws.eval_classes()
    diredi, fedavg = {}, {}
    (tutor1, _), diredi["rd_tutor1"] = timer(
        lambda: reverse_distill_tutor1(tutor, edge, presumed, settings, seed, body_memo=run_memo))
    memo = run_memo or BodyMemo.for_model(tutor1)  # as the client: Tutor 2's body outputs, read by Distill C
    (tutor2, _), diredi["rd_tutor2"] = timer(
        lambda: reverse_distill_tutor2(tutor, tutor1, edge, train, settings, seed, body_memo=memo))
    delta, diredi["delta"] = timer(lambda: client_delta(tutor1, tutor2, settings))
    memo.recording = run_memo is not None
    kept = tuple(CLASS_INDEX[c] for c in ws.clients[partition].kept)  # the soft targets' classes, as the client
    (new_edge, _), diredi["distill_c"] = timer(lambda: distill_c(edge, tutor, train, settings, seed, body_memo=memo,
                                                                 kept_classes=kept))
    _, diredi["evaluate"] = timer(lambda: per_class_ap(new_edge, test, classes))
    if not fedavg_too:
        return diredi, fedavg, delta
    steps = 2 * settings.rd_iters + settings.redistill_iters
    (trained, _), fedavg["direct_training"] = timer(lambda: direct_training(edge, train, steps, settings, seed))
    _, fedavg["evaluate"] = timer(lambda: per_class_ap(trained, test, classes))
    return diredi, fedavg, delta


def filled_memo(tutor, datasets, batch_size: int) -> BodyMemo:
    """A memo holding the tutor body's outputs of every (image, flip) pair of ``datasets``, each computed
    in a batch of ``batch_size`` (what a client's run-long cache holds in a late round)."""
    memo = BodyMemo.for_model(tutor)
    tutor.eval()
    for dataset in datasets:
        for flip in (False, True):
            images = [dataset[i][0] for i in range(len(dataset))]
            images = [image.flip(-1) for image in images] if flip else images
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                if len(chunk) == 1:  # a batch of one is never kept (distill.body_memo)
                    chunk = images[start - 1:start + 1]
                memo.body_outputs(tutor, tutor.transform(chunk, None)[0].tensors)
    return memo


def measure_body_cache(session, config, clients: int) -> dict:
    """Per client, the DiReDi round with the default memo and with a filled run-long memo, interleaved."""
    ws, settings = session.workspace, config.client_training()
    rows = []
    for partition in range(clients):
        without, _, _ = client_round(session, config, partition, 2, fedavg_too=False)
        memo = filled_memo(session.chain.tutor, [ws.client_presumed(partition), ws.client_train(partition)],
                           settings.batch_size)
        memo.images_served = memo.images_computed = 0
        held = len(memo.outputs)
        per_image_mb = sum(t.numel() * t.element_size() for t in next(iter(memo.outputs.values())).values()) / 1e6
        with_cache, _, _ = client_round(session, config, partition, 2, run_memo=memo, fedavg_too=False)
        rows.append({"client": partition, "without": without, "with": with_cache, "images_held": held,
                     "cache_mb": held * per_image_mb,
                     "images_served": memo.images_served, "images_computed": memo.images_computed})
        print(f"client {partition}: DiReDi {sum(without.values()):.1f} s -> {sum(with_cache.values()):.1f} s with "
              f"the run-long body cache ({memo.images_served} body images served, {memo.images_computed} run)",
              flush=True)
    mean = {side: {name: statistics.mean(r[side][name] for r in rows) for name in rows[0][side]}
            for side in ("without", "with")}
    totals = {side: sum(parts.values()) for side, parts in mean.items()}
    return {"clients": rows, "client_s": {side: {**mean[side], "total": totals[side]} for side in mean},
            "diredi_client_speedup": totals["without"] / totals["with"],
            "cache_mb_mean": statistics.mean(r["cache_mb"] for r in rows)}


def parse_setting(text: str) -> Compute:
    """"precision:layout" (e.g. "bfloat16:channels-last") -> a compute setting."""
    precision, _, layout = text.partition(":")
    try:
        return Compute(precision, layout or "nchw")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def measure(session, config, setting: Compute, clients: int) -> dict:
    """The round's work under one compute setting: per-part client seconds (mean over ``clients``) and
    the server's."""
    with computing(setting) as resolved:
        strategy = make_strategy("diredi", session, Recorder("diredi"))
        strategy._open_round(2)
        _, features_s = cpu_seconds(strategy.validator.tutor_ap)  # once per run (validation features, tutor AP)
        parts: dict[str, dict[str, list[float]]] = {"diredi": {}, "fedavg": {}, "server": {}}
        for partition in range(clients):
            diredi, fedavg, delta = client_round(session, config, partition, server_round=2)
            _, verify_s = cpu_seconds(lambda: strategy.verify(delta, partition, 2))
            for method, timed in (("diredi", diredi), ("fedavg", fedavg), ("server", {"verify_per_delta": verify_s})):
                for name, seconds in timed.items():
                    parts[method].setdefault(name, []).append(seconds)
            print(f"{resolved.precision}/{resolved.layout} client {partition}: DiReDi {sum(diredi.values()):.1f} s, "
                  f"FedAvg {sum(fedavg.values()):.1f} s, verification {verify_s:.2f} s", flush=True)
        _, tutor_eval_s = cpu_seconds(lambda: strategy.validator.validate(strategy.tutor))  # record_tutor's evaluation
    mean = {method: {name: statistics.mean(v) for name, v in timed.items()} for method, timed in parts.items()}
    n = config.num_clients
    client = {method: sum(mean[method].values()) for method in ("diredi", "fedavg")}
    server = n * mean["server"]["verify_per_delta"] + tutor_eval_s
    result = {
        "compute": resolved.to_dict(), "clients_per_round": n,
        "client_s": {method: {**mean[method], "total": client[method]} for method in ("diredi", "fedavg")},
        "client_ratio": client["diredi"] / client["fedavg"],
        "server_s": {"diredi": {"verify_per_delta": mean["server"]["verify_per_delta"],
                                "updated_tutor_evaluation": tutor_eval_s, "total": server},
                     "once_per_run": {"validation_features_and_tutor_ap": features_s}},
        "work_s": {"diredi": n * client["diredi"] + server, "fedavg": n * client["fedavg"]},
    }
    result["work_ratio"] = result["work_s"]["diredi"] / result["work_s"]["fedavg"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_work", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--clients", type=int, default=2, help="clients timed (their mean is used)")
    parser.add_argument("--settings", type=lambda text: [parse_setting(t) for t in text.split(",") if t],
                        default=[Compute()],
                        help="compute settings timed, precision:layout, comma-separated (default float32:nchw); "
                             "with two or more, the speed-up of each over the first is written too")
    parser.add_argument("--body-cache", choices=("round", "run"), default="round",
                        help="run: also time DiReDi's client round with a filled run-long body cache (body_cache)")
    args = parser.parse_args(argv)
    if args.clients < 1:
        parser.error("--clients must be at least 1")
    config, session, run = open_run(args.run, args.threads)
    if args.clients > config.num_clients:
        parser.error(f"--clients {args.clients}: the run has {config.num_clients} clients")
    command = " ".join(["python -m bench.round_work", *(sys.argv[1:] if argv is None else argv)])
    if args.body_cache == "run":
        with computing(args.settings[0]):
            result = measure_body_cache(session, config, args.clients)
        write_cost_keys(args.out, {"body_cache": {"command": command, "threads": args.threads, **result}})
        print(f"DiReDi client round: {result['client_s']['without']['total']:.2f} -> "
              f"{result['client_s']['with']['total']:.2f} CPU s ({result['diredi_client_speedup']:.2f}x)")
        print(f"wrote {args.out}")
        return 0
    results = [measure(session, config, setting, args.clients) for setting in args.settings]
    keys = {"round_work": {"command": command, "threads": args.threads, **results[0]}}
    if len(results) > 1:
        base = results[0]
        keys["speedup"] = {"command": command, "threads": args.threads, "baseline": base["compute"], "settings": [
            {"compute": r["compute"],
             "fedavg_client": base["client_s"]["fedavg"]["total"] / r["client_s"]["fedavg"]["total"],
             "diredi_client": base["client_s"]["diredi"]["total"] / r["client_s"]["diredi"]["total"],
             "diredi_round_work": base["work_s"]["diredi"] / r["work_s"]["diredi"],
             "client_s": r["client_s"], "server_s": r["server_s"]} for r in results[1:]]}
    write_cost_keys(args.out, keys)
    print(json.dumps(keys, indent=1))
    for r in results:
        print(f"{r['compute']}: client work {r['client_ratio']:.2f}x, round work with the server's "
              f"{r['work_ratio']:.2f}x")
    for r in keys.get("speedup", {}).get("settings", []):
        print(f"{r['compute']} over {keys['speedup']['baseline']}: FedAvg client {r['fedavg_client']:.2f}x, "
              f"DiReDi client {r['diredi_client']:.2f}x, DiReDi round work {r['diredi_round_work']:.2f}x")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
