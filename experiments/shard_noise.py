"""How much a client's figures move by chance on its test shard alone: the paired bootstrap noise.

    python -m experiments.shard_noise --profile cpu --steps 120

For every client of the default federation: the manufacturer's edge and the same edge trained on
the client's own data (``--steps`` steps of direct training, the local baseline's two default
rounds) both detect the client's test shard; 200 paired bootstrap resamples of its images give the
standard deviation of the knowledge gain (mean AP change over the client's private classes) and of
the kept classes' change (``evaluation.ap.bootstrap_mean_ap_change``). That is the noise of one
client's number in one run from the test images alone, before any training seed moves it; the
study's intervals over replicates and clients hold it as well. The images a shard would need for a
2-point noise follow from sd ~ 1 / sqrt(images). Writes ``shard_noise.json`` and ``shard_noise.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from data.voc import CLASS_INDEX
from distill.rd import direct_training
from evaluation.ap import bootstrap_mean_ap_change, predict
from protocol.config import resolve_run_config
from protocol.wire import work_seed
from session.workspace import workspace_of

TARGET_SD = 2.0  # percentage points: the study issue's bound on one client's gain noise


def client_noise(ws, edge, client: int, steps: int, settings, seed: int, samples: int) -> dict:
    spec, test = ws.clients[client], ws.client_test(client)
    trained, _ = direct_training(edge, ws.client_train(client), steps, settings, seed=work_seed(seed, 1, client))
    before, targets = predict(edge, test)
    after, _ = predict(trained, test)
    row = {"client": client, "name": spec.name, "test_images": len(test)}
    for key, classes in (("gain", spec.private), ("kept", spec.kept)):
        ids = [CLASS_INDEX[c] for c in classes]
        positives = sum(int(((t["labels"] == i) & ~t["difficult"]).sum()) for t in targets for i in ids)
        sd = 100 * bootstrap_mean_ap_change(before, after, targets, ids, samples=samples, seed=seed)
        row[f"{key}_positives"] = positives
        row[f"{key}_sd"] = sd
        row[f"{key}_images_for_{TARGET_SD:g}pt"] = math.ceil(len(test) * (sd / TARGET_SD) ** 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.shard_noise", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=".cache")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    if min(args.clients, args.steps, args.samples, args.threads) < 1:
        parser.error("--clients, --steps, --samples and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "cache-dir": args.cache})
    ws = workspace_of(config)
    edge = ws.chain(progress=True).edge.cpu().eval()
    rows = []
    for client in range(len(ws.clients)):
        rows.append(client_noise(ws, edge, client, args.steps, config.client_training(), config.training_seed,
                                 args.samples))
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python -m experiments.shard_noise " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps": args.steps, "samples": args.samples, "target_sd": TARGET_SD, "clients": rows,
              "wall_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shard_noise.json").write_text(json.dumps(result, indent=1))
    lines = ["# Bootstrap noise of one client's figures from its test shard alone\n",
             f"`{result['command']}` ({result['wall_s']:.0f} s): the manufacturer's edge against the same edge after "
             f"{args.steps} steps of direct training on the client's data; {args.samples} paired resamples of the test "
             "images. sd in percentage points.\n",
             "| client | test images | new-class objects | gain sd | images for 2 pt | kept-class objects | kept change sd |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['test_images']} | {r['gain_positives']} | {r['gain_sd']:.1f} | "
                     f"{r[f'gain_images_for_{TARGET_SD:g}pt']} | {r['kept_positives']} | {r['kept_sd']:.1f} |")
    (args.out / "shard_noise.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
