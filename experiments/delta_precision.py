"""Does uploading the delta in half precision, or only its largest entries, change what the tutor
learns? One round of the default federation's deltas, merged as the server merges them, from
float32 deltas, float16 deltas and float16 top-k deltas (10 % and 1 % of each tensor's entries,
one round, so without the error feedback a client adds in later rounds); every updated tutor
scored on the manufacturer's validation set.

    python -m experiments.delta_precision --threads 2

Writes ``experiments/results/delta_precision.json``: per precision the upload in MB per client,
the tutor's validation AP on the clients' new classes, the presumed mAP and the protected AP, and
the largest absolute difference between the two merged deltas.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from distill.rd import updated_tutor
from experiments.merge import round_one_deltas, score
from models.parts import delta_norm
from protocol.config import resolve_run_config
from protocol.wire import pack_delta, top_k, unpack_delta
from strategies.aggregate import aggregate
from session.workspace import Session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.delta_precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("experiments/results/delta_precision.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients})
    session = Session.open(config)
    start = time.perf_counter()
    deltas, weights, trained = round_one_deltas(session)
    options = {"client_classes": trained} if config.aggregation == "class_aware" else {}
    results, merged = {}, {}
    shapes = {k: v.shape for k, v in deltas[0].items()}
    for precision, keep in (("float32", 1.0), ("float16", 1.0), ("float16", 0.1), ("float16", 0.01)):
        label = precision if keep == 1 else f"{precision}, top {keep:.0%}"
        sent = deltas if keep == 1 else [top_k(d, keep)[0] for d in deltas]
        packed = [pack_delta(d, precision, sparse=keep < 1) for d in sent]
        received = [unpack_delta(p, shapes) for p in packed]
        merged[label] = aggregate(received, weights, config.aggregation, **options)
        tutor = updated_tutor(session.chain.tutor, merged[label], config.beta)
        results[label] = {"up_mb_per_client": sum(p.count_bytes() for p in packed) / len(packed) / 1e6,
                          **score(tutor, session)}
        print(f"{label}: upload {results[label]['up_mb_per_client']:.3f} MB, new-class AP "
              f"{results[label]['new_ap']:.2f}, presumed mAP {results[label]['presumed_mAP']:.2f}, "
              f"protected {results[label]['protected_ap']:.2f}", flush=True)
    difference = {k: merged["float16"][k] - merged["float32"][k] for k in merged["float32"]}
    out = {"command": f"python -m experiments.delta_precision --profile {args.profile} --clients {args.clients}",
           "config": config.to_dict(), "results": results,
           "merged_delta_norm": delta_norm(merged["float32"]), "max_abs_difference":
           max(float(v.abs().max()) for v in difference.values()), "difference_norm": delta_norm(difference),
           "seconds": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
