"""Build (or reuse) the manufacturer chain of a profile; print each stage's time and memory and each
model's mAP on the manufacturer's validation set.

    python -m bench.chain --profile cpu
    python -m bench.chain --profile cpu --threads 2 --precision bfloat16 --layout channels-last --out FILE

A second call reuses the cache and prints how long loading took. ``--precision`` / ``--layout``
(``models.compute``) train and evaluate the chain that way: another cached chain than float32's.
``--steps N`` trains every stage N steps instead of the profile's budget: a timing run (seconds per
step of each stage at the profile's sizes, e.g. the ``paper`` profile on a GPU), cached apart from
the profile's chain and not a chain to run a federation from.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from session.workspace import prepare
from models.compute import LAYOUTS, PRECISIONS, Compute, computing
from models.ladder import get_profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--scenario", default="default8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32")
    parser.add_argument("--layout", choices=LAYOUTS, default="nchw")
    parser.add_argument("--stop-after", choices=["teacher"], help="build only the teacher")
    parser.add_argument("--steps", type=int, help="train every stage this many steps (a timing run)")
    parser.add_argument("--cache", type=Path, default=Path(".cache"), help="data and chain cache (default .cache)")
    parser.add_argument("--out", type=Path, help="also write the stages' reports and mAPs to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    compute = Compute(args.precision, args.layout)
    profile = get_profile(args.profile)
    if args.steps is not None:
        profile = replace(profile, budget=replace(profile.budget, teacher_iters=args.steps, distill_iters=args.steps))
    start = time.perf_counter()
    ws = prepare(profile, args.scenario, seed=args.seed, device=args.device, compute=compute, cache_dir=args.cache)
    print(f"data ready in {time.perf_counter() - start:.1f} s: {json.dumps(ws.shards.sizes())}")
    start = time.perf_counter()
    chain = ws.chain(progress=False, stop_after=args.stop_after)
    seconds = time.perf_counter() - start
    print(f"chain ready in {seconds:.1f} s")
    for name, report in chain.reports().items():
        print(name, json.dumps(report))
    result = {"command": " ".join(["python -m bench.chain", *(sys.argv[1:] if argv is None else argv)]),
              "threads": args.threads, "device": ws.device, "chain_s": round(seconds, 1), "stages": chain.reports()}
    if args.stop_after is None:
        with computing(compute) as resolved:
            result["compute"], result["validation_map"] = resolved.to_dict(), ws.chain_validation_map(chain)
        print(f"validation mAP ({resolved.precision}, {resolved.layout}): {json.dumps(result['validation_map'])}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
