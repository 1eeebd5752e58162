"""Where a client round's seconds go: each part of a DiReDi and a FedAvg client round under torch's profiler.

    python -m bench.profile_round --run experiments/results/default8 --threads 1

Replays one client's round 2 (as ``bench.round_work``: the run's settings, every client computing its
own Tutor 1) on one thread under ``torch.profiler`` and sorts each part's time into

* ``convolution``: convolutions, forward and backward (oneDNN's and torch's own kernels);
* ``norm``: BatchNorm and GroupNorm, forward and backward;
* ``activation``: ReLU / ReLU6 (hardtanh) and their backward;
* ``upsample``: the FPN's top-down interpolation, forward and backward;
* ``optimizer``: the optimiser's step and zeroing the gradients (everything under them);
* ``nms``: non-maximum suppression (evaluation);
* ``other torch``: every other torch operator (losses and their matching, elementwise ops, copies,
  the transform's resize and normalisation);
* ``python and data``: what is left of the part's wall time: Python, decoding and flipping images,
  FCOS's target assignment loops, AP matching.

Operators are counted by their own time (not their children's), so the categories add up to the
part's time. Writes the setting's entry of the key ``profile_round`` of ``experiments/results/cost.json``
(other settings and keys kept).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from torch.profiler import ProfilerActivity, profile

from bench.round_work import client_round
from bench.run_folder import add_run_arguments, open_run, write_cost_keys
from models.compute import Compute, computing

CATEGORIES = ("convolution", "norm", "activation", "upsample", "optimizer", "nms", "other torch", "python and data")
_BY_NAME = (("convolution", ("conv",)), ("norm", ("batch_norm", "group_norm")),
            ("activation", ("hardtanh", "relu", "threshold_backward")), ("upsample", ("upsample",)),
            ("nms", ("nms",)))


def category(name: str) -> str:
    """The category of a profiler event's name (an aten operator or a record_function scope)."""
    if name.startswith("Optimizer."):
        return "optimizer"
    if name.startswith("aten::") or name.startswith("torchvision::"):
        op = name.split("::", 1)[1]
        return next((cat for cat, keys in _BY_NAME if any(k in op for k in keys)), "other torch")
    return ""  # a scope of our own or of autograd: its time is its children's


def profiled(fn):
    """``fn()``'s result and its seconds per category (optimizer events counted whole, their children not)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - start
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    events = prof.events()
    optimizer = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("Optimizer.")]
    for event in events:
        cat = category(event.name)
        if not cat:
            continue
        if cat == "optimizer":
            seconds[cat] += event.cpu_time_total / 1e6
        elif not any(a <= event.time_range.start <= b for a, b in optimizer):
            seconds[cat] += event.self_cpu_time_total / 1e6
    seconds["python and data"] = max(wall - sum(seconds.values()), 0.0)
    return out, {"wall": wall, **seconds}


def client_parts(session, config, partition: int, server_round: int = 2) -> dict[str, dict[str, float]]:
    """``bench.round_work.client_round`` with each part under the profiler (the delta, a subtraction, left out)."""
    diredi, fedavg, _ = client_round(session, config, partition, server_round, timer=profiled)
    names = {"rd_tutor1": "RD tutor 1", "rd_tutor2": "RD tutor 2", "distill_c": "Distill C", "evaluate": "evaluation",
             "direct_training": "direct training"}
    return {**{f"diredi: {names[k]}": v for k, v in diredi.items() if k != "delta"},
            **{f"fedavg: {names[k]}": v for k, v in fedavg.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--client", type=int, default=0, help="the client whose round is profiled")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--layout", default="nchw")
    args = parser.parse_args(argv)
    try:
        setting = Compute(args.precision, args.layout)
    except ValueError as err:
        parser.error(str(err))
    config, session, _ = open_run(args.run, args.threads)
    if not 0 <= args.client < config.num_clients:
        parser.error(f"--client {args.client}: the run has clients 0..{config.num_clients - 1}")
    with computing(setting) as resolved:
        client_parts(session, config, args.client)  # warm-up: first calls allocate and pick kernels
        parts = client_parts(session, config, args.client)
    print(f"client {args.client}, round 2, {args.threads} thread(s), {resolved.precision}/{resolved.layout}; seconds:")
    print("| part | wall | " + " | ".join(CATEGORIES) + " |")
    print("|---|---|" + "---|" * len(CATEGORIES))
    for name, s in parts.items():
        print(f"| {name} | {s['wall']:.2f} | " + " | ".join(f"{s[c]:.2f}" for c in CATEGORIES) + " |")
    command = " ".join(["python -m bench.profile_round", *(sys.argv[1:] if argv is None else argv)])
    profiles = json.loads(args.out.read_text()).get("profile_round", {}) if args.out.is_file() else {}
    profiles[f"{resolved.precision}/{resolved.layout}"] = {  # one entry per setting, others kept
        "command": command, "client": args.client, "threads": args.threads, "compute": resolved.to_dict(),
        "seconds": {k: {c: round(v, 3) for c, v in s.items()} for k, s in parts.items()}}
    write_cost_keys(args.out, {"profile_round": profiles})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
