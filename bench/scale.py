"""Does a round's cost stay bounded as the federation grows? 8 -> 32 -> 128 clients, with client
sampling so that every round has the same number of sampled clients.

    python -m bench.scale                       # 8, 32, 128 clients, 8 sampled, 2 rounds, diredi + fedavg
    python -m bench.scale --clients 8 32 --sampled 4 --rounds 1 --profile smoke

Each size is one `python -m sim.run --clients N --fraction S/N ...` in its own process (so the
driver's peak memory is its own). Per size and method: wall seconds per round, seconds per
sampled client, peak RSS of a client actor (the largest any client reported) and of the driver,
MB up/down per sampled client per round. Ray runs one actor per core, each with one CPU and one
torch thread (``sim.federation``), so actors never oversubscribe the cores.

Writes ``experiments/results/scale.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.run_folder import COST_FILE, write_cost_keys


def measure(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "rounds.jsonl").read_text().splitlines() if line]
    summary = json.loads((folder / "summary.json").read_text())
    out = {}
    for method in sorted({r["method"] for r in records}):
        mine = [r for r in records if r["method"] == method]
        rounds = sorted({r["round"] for r in mine})
        walls = {r["round"]: r["round_wall_s"] for r in mine}
        sampled = len(mine) / len(rounds)
        out[method] = {"sampled": sampled, "round_s": sum(walls.values()) / len(walls),
                       "s_per_sampled_client": sum(walls.values()) / len(mine),
                       "peak_rss_actor_mb": max(r["peak_rss_mb"] for r in mine),
                       "up_mb": sum(r["bytes_up"] for r in mine) / len(mine) / 1e6,
                       "down_mb": sum(r["bytes_down"] for r in mine) / len(mine) / 1e6,
                       "failed_clients": sampled * len(rounds) - len(mine)}
    return {"methods": out, "driver_peak_rss_mb": summary.get("driver_peak_rss_mb"), "wall_s": summary["wall_s"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--sampled", type=int, default=8, help="clients per round at every size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--methods", default="diredi,fedavg")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"), help="where the runs go")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/scale.json"))
    args = parser.parse_args(argv)
    if any(n < args.sampled for n in args.clients):
        parser.error(f"--clients: every size must be at least --sampled {args.sampled}")
    rows = []
    for n in args.clients:
        name = f"scale-{args.profile}-c{n}"
        command = [sys.executable, "-m", "sim.run", "--clients", str(n), "--fraction", repr(args.sampled / n),
                   "--rounds", str(args.rounds), "--methods", args.methods, "--profile", args.profile,
                   "--out", str(args.work), "--name", name, "--quiet", "--spread", "off"]  # as measured
        print(f"--- {n} clients: {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        finished = subprocess.run(command).returncode == 0
        row = {"clients": n, "fraction": args.sampled / n, "finished": finished,
               "seconds": time.perf_counter() - start, "command": " ".join(["python", *command[1:]])}
        if finished:
            row.update(measure(args.work / name))
        rows.append(row)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"sampled": args.sampled, "rounds": args.rounds, "scale": rows}, indent=2))

    print("\n| clients | method | sampled | s/round | s per sampled client | peak RSS actor MB | driver MB | up MB | down MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["finished"]:
            print(f"| {row['clients']} | failed | | | | | | | |")
            continue
        for method, m in row["methods"].items():
            print(f"| {row['clients']} | {method} | {m['sampled']:.0f} | {m['round_s']:.0f} | "
                  f"{m['s_per_sampled_client']:.1f} | {m['peak_rss_actor_mb']:.0f} | {row['driver_peak_rss_mb']:.0f} | "
                  f"{m['up_mb']:.2f} | {m['down_mb']:.2f} |")
    scale = [{"clients": row["clients"], "finished": row["finished"],
              **({"sampled": row["methods"]["diredi"]["sampled"],
                  "s_per_sampled_client": row["methods"]["diredi"]["s_per_sampled_client"],
                  "peak_rss_actor_mb": max(m["peak_rss_actor_mb"] for m in row["methods"].values()),
                  "driver_peak_rss_mb": row["driver_peak_rss_mb"],
                  "per_method": row["methods"]} if row["finished"] and "diredi" in row["methods"] else {})}
             for row in rows]
    write_cost_keys(args.out.parent / COST_FILE.name, {"scale": scale})  # bench.cost's file holds the scale rows too
    print(f"wrote {args.out}")
    return 0 if all(row["finished"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
