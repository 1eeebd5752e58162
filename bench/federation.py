"""Time the default federation end to end and print where the time goes.

    python -m bench.federation                      # = python -m sim.run --clients 8, timed
    python -m bench.federation -- --profile smoke --clients 2

Everything after `--` is passed to `sim.run`. Run it once first (or `python -m bench.chain`) so the
manufacturer chain is cached: the 10-minute goal is for a run with the chain cached.
"""

import json
import sys
import time
from collections import defaultdict

from sim.run import main as run_main
from sim.run import parse_args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    args = parse_args(argv)
    start = time.perf_counter()
    code = run_main(argv)
    total = time.perf_counter() - start
    folder = args.out / args.name
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line]
    per_method: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        for phase, seconds in (record.get("seconds") or {}).items():
            per_method[record["method"]][phase] += seconds or 0.0
    print(f"\nwall time of `python -m sim.run {' '.join(argv)}`: {total:.0f} s")
    print("client-side seconds per phase, summed over clients and rounds (clients run 2 at a time):")
    for method, phases in per_method.items():
        print(f"  {method}: " + ", ".join(f"{p} {s:.0f} s" for p, s in phases.items()))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
