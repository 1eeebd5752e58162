"""What a round costs: traffic per client, seconds per verified delta, seconds per round.

    python -m bench.cost --threads 2                               # default run folder below
    python -m bench.cost --run runs/<name> --out runs/<name>/cost.json

* ``traffic`` and ``round_s`` are read from a finished run folder (``rounds.jsonl``): per client
  per round, MB = 10^6 bytes; DiReDi's download in round 1 (the tutor's body travels once) and in
  the later rounds (neck/head only) separately.
* ``verify_s_per_delta`` is timed here on the manufacturer's validation set: a candidate tutor
  (the tutor with a perturbed neck/head, a deep copy as ``DiReDiStrategy.verify`` makes it) and its
  per-class AP (``ap_by_name``), with the whole model on every image ("before") and with the body's
  features computed once per tutor ("after", ``evaluation.features.EvaluationFeatures``), the two
  interleaved, median of ``--repeats``; the detections are checked to be identical.
  ``verify_call_s``: one whole ``DiReDiStrategy.verify`` call per delta with the run's default
  policy (structure, norm, AP, the bootstrap noise of the protected classes, the kept classes).

Writes ``experiments/results/cost.json`` (keeping the keys other benches write there, e.g. ``scale``
and ``feature_reuse``) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.run_folder import COST_FILE, DEFAULT_RUN, write_cost_keys
from evaluation.ap import ap_by_name, predict
from evaluation.features import EvaluationFeatures
from models.parts import load_neck_head, neck_head
from protocol.config import resolve_run_config
from strategies.ledger import Recorder
from session.workspace import Session
from strategies.server_app import make_strategy


def traffic_and_rounds(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line]
    by_method: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_method[r["method"]][r["round"]].append(r)

    def mean_mb(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows) / 1e6

    traffic, round_s = {}, {}
    for method, rounds in by_method.items():
        if not any(r["bytes_up"] for rows in rounds.values() for r in rows):
            continue  # local / oracle: no traffic
        every = [r for rows in rounds.values() for r in rows]
        later = [r for number, rows in rounds.items() if number > 1 for r in rows]
        entry = {"up_mb": mean_mb(every, "bytes_up"), "down_mb": mean_mb(every, "bytes_down"),
                 "down_mb_first": mean_mb(rounds[1], "bytes_down") if 1 in rounds else None,
                 "down_mb_later": mean_mb(later, "bytes_down") if later else None}
        traffic[method] = entry
        walls = [rows[0]["round_wall_s"] for rows in rounds.values() if "round_wall_s" in rows[0]]
        round_s[method] = sum(walls) / len(walls) if walls else None
    return {"traffic": traffic, "round_s": round_s}


def verify_seconds(session: Session, repeats: int) -> dict:
    tutor, validation = session.chain.tutor, session.workspace.validation_set()
    classes = session.workspace.scenario.teacher_classes
    generator = torch.Generator().manual_seed(0)
    delta = {k: 0.01 * torch.randn(v.shape, generator=generator) for k, v in neck_head(tutor).items()}

    def candidate():
        return load_neck_head(copy.deepcopy(tutor), {k: v + delta[k] for k, v in neck_head(tutor).items()})

    def full():
        predictions, targets = predict(candidate(), validation)
        return ap_by_name(predictions, targets, classes)[0], predictions

    start = time.perf_counter()
    cache = EvaluationFeatures(tutor, validation)
    build_s = time.perf_counter() - start

    def cached():
        predictions, targets = cache.predict(candidate())
        return ap_by_name(predictions, targets, classes)[0], predictions

    seconds, outputs = {"before": [], "after": []}, {}
    for _ in range(repeats):  # interleaved, so that a change in the machine's load hits both alike
        for name, fn in (("before", full), ("after", cached)):
            start = time.perf_counter()
            outputs[name] = fn()
            seconds[name].append(time.perf_counter() - start)
    timings = {name: statistics.median(values) for name, values in seconds.items()}
    same = all(torch.equal(a[k], b[k]) for a, b in zip(outputs["before"][1], outputs["after"][1]) for k in a)
    if not same or len(outputs["before"][1]) != len(outputs["after"][1]) or outputs["before"][0] != outputs["after"][0]:
        raise SystemExit("cached-body verification gave other detections than the full model")
    return {**timings, "speedup": timings["before"] / timings["after"], "feature_cache_build_s": build_s,
            "feature_cache_mb": cache.nbytes / 1e6, "validation_images": len(validation),
            "verify_call_s": verify_call_seconds(session, delta, repeats)}


def verify_call_seconds(session: Session, delta: dict, repeats: int) -> float:
    """Median seconds of one ``DiReDiStrategy.verify`` call (the run's default policy), caches built."""
    strategy = make_strategy("diredi", session, Recorder("diredi"))
    strategy.verify(delta, 0, 1)  # builds the tutor's validation AP and the body's features
    seconds = []
    for i in range(repeats):  # a new delta each time: the strategy evaluates each delta's candidate once
        other = {name: value * (1.0 + 1e-3 * (i + 1)) for name, value in delta.items()}
        start = time.perf_counter()
        strategy.verify(other, 0, 1)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN,
                        help="a finished run folder (rounds.jsonl) to read traffic and round times from")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: comparable on a shared machine; more threads than free cores "
                             "slows torch down many times over)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=COST_FILE)
    args = parser.parse_args(argv)
    if not (args.run / "rounds.jsonl").is_file():
        parser.error(f"--run {args.run}: no rounds.jsonl there (run python -m sim.run first)")
    torch.set_num_threads(args.threads)
    session = Session.open(resolve_run_config({"profile": args.profile}))
    result = {"command": f"python -m bench.cost --run {args.run} --profile {args.profile} --threads {args.threads} "
                         f"--repeats {args.repeats}",
              **traffic_and_rounds(args.run), "verify_s_per_delta": verify_seconds(session, args.repeats)}
    write_cost_keys(args.out, result)

    print("| method | up MB | down MB (round 1) | down MB (later rounds) | round s |")
    print("|---|---|---|---|---|")
    for method, t in result["traffic"].items():
        later = "—" if t["down_mb_later"] is None else f"{t['down_mb_later']:.2f}"
        round_s = result["round_s"].get(method)
        print(f"| {method} | {t['up_mb']:.2f} | {t['down_mb_first']:.2f} | {later} | "
              f"{'—' if round_s is None else f'{round_s:.0f}'} |")
    v = result["verify_s_per_delta"]
    print(f"\nverification per delta ({v['validation_images']} validation images): {v['before']:.2f} s whole model, "
          f"{v['after']:.2f} s with the body's features cached ({v['speedup']:.1f}x; cache {v['feature_cache_mb']:.0f} MB, "
          f"built in {v['feature_cache_build_s']:.1f} s); a whole DiReDiStrategy.verify call {v['verify_call_s']:.2f} s")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
