"""Build (or reuse) the manufacturer chain of a profile and print each stage's time and memory.

    python -m bench.chain --profile cpu

A second call reuses the cache and prints how long loading took.
"""

import argparse
import json
import logging
import time

import torch

from data.workspace import prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--scenario", default="default8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available)")
    parser.add_argument("--stop-after", choices=["teacher"], help="build only the teacher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ws = prepare(args.profile, args.scenario, seed=args.seed, device=args.device)
    print(f"data ready in {time.perf_counter() - start:.1f} s: {json.dumps(ws.shards.sizes())}")
    start = time.perf_counter()
    chain = ws.chain(progress=False, stop_after=args.stop_after)
    print(f"chain ready in {time.perf_counter() - start:.1f} s")
    for name, report in chain.reports().items():
        print(name, json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
