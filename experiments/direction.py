"""Which reference separates honest deltas from sign-flipped and random ones by direction?

Round 1 of the default federation (the deltas the server would receive, as in ``experiments.merge``)
and two candidate references for the direction gate (``strategies.verify.direction_check``):

* "server": the server's own update on its public presumed data (FLTrust's root-data update,
  ``distill.rd.server_reference_update``): Tutor 1 and Tutor 2 on the manufacturer's presumed
  training images, and the same neck/head delta a client would send;
* "peers": the coordinate-wise median of the other deltas of the round (leave-one-out).

For every client: the cosine of its honest delta, of the sign-flipped delta and of random Gaussian
deltas with its norm, with each reference. A random direction in d dimensions has cosine about
N(0, 1/d) with any fixed vector, so ``z / sqrt(d)`` bounds what chance reaches (z = 4: about 3e-5).

    python -m experiments.direction --threads 2

Writes ``experiments/results/direction.json`` and ``direction.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from distill.rd import client_delta, reverse_distill_tutor1, reverse_distill_tutor2
from experiments.merge import round_one_deltas
from models.parts import delta_norm
from protocol.config import PAPER_DISTILL_C, resolve_run_config
from protocol.wire import SERVER, work_seed
from distill.rd import server_reference_update
from session.workspace import Session
from strategies.verify import cosine_score


def peer_median(deltas: list[dict], leave_out: int) -> dict:
    others = [d for i, d in enumerate(deltas) if i != leave_out]
    return {k: torch.stack([d[k] for d in others]).median(dim=0).values for k in deltas[0]}


def random_like(delta: dict, generator: torch.Generator) -> dict:
    noise = {k: torch.randn(v.shape, generator=generator) for k, v in delta.items()}
    scale = delta_norm(delta) / delta_norm(noise)
    return {k: v * scale for k, v in noise.items()}


def cosines(deltas: list[dict], server: dict, generator: torch.Generator, randoms: int) -> list[dict]:
    rows = []
    for i, delta in enumerate(deltas):
        row = {"client": i, "norm": delta_norm(delta)}
        for name, reference in (("server", server), ("peers", peer_median(deltas, i))):
            scores = [cosine_score(random_like(delta, generator), reference) for _ in range(randoms)]
            row[name] = {"honest": cosine_score(delta, reference),
                         "sign_flip": cosine_score({k: -v for k, v in delta.items()}, reference),
                         "random_max_abs": max(abs(r) for r in scores)}
        rows.append(row)
        print(f"client {i}: server {row['server']['honest']:.4f} (random |max| {row['server']['random_max_abs']:.4f}), "
              f"peers {row['peers']['honest']:.4f} (random |max| {row['peers']['random_max_abs']:.4f})", flush=True)
    return rows


def second_round(session: Session, deltas: list[dict], generator: torch.Generator, randoms: int) -> list[dict]:
    """Round 2 as the default federation runs it: the tutor moved by round 1's class-aware merge of
    every delta, each client's edge re-distilled from it (Distill C), then each client's own Tutor 1
    and Tutor 2; the server's reference from its own (unchanged) edge."""
    from data.voc import CLASS_INDEX
    from distill.rd import distill_c, updated_tutor
    from strategies.aggregate import aggregate

    config, ws = session.config, session.workspace
    settings, edge = config.client_training(), session.chain.edge
    trained = [{CLASS_INDEX[c] for c in spec.train_classes} for spec in ws.clients]
    weights = [float(len(ws.client_train(i))) for i in range(len(ws.clients))]
    merged = aggregate(deltas, weights, config.aggregation, client_classes=trained)
    tutor = updated_tutor(session.chain.tutor, merged, config.beta)
    second = []
    for i in range(len(ws.clients)):
        own_edge, _ = distill_c(edge, tutor, ws.client_train(i), settings, seed=work_seed(config.seed, 1, i))
        tutor1, _ = reverse_distill_tutor1(tutor, own_edge, ws.client_presumed(i), settings, seed=work_seed(config.seed, 2, i))
        tutor2, _ = reverse_distill_tutor2(tutor, tutor1, own_edge, ws.client_train(i), settings,
                                           seed=work_seed(config.seed, 2, i))
        second.append(client_delta(tutor1, tutor2, settings))
        print(f"round 2 client {i}: delta norm {delta_norm(second[-1]):.3f}", flush=True)
    server = server_reference_update(tutor, edge, ws.chain_data().presumed_train, settings,
                                     work_seed(config.seed, 2, SERVER))
    return cosines(second, server, generator, randoms)


def cosine_table(rows: list[dict]) -> list[str]:
    lines = ["| client | norm | server: honest | server: sign flip | server: random max abs | peers: honest | "
             "peers: sign flip | peers: random max abs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, p = r["server"], r["peers"]
        lines.append(f"| {r['client']} | {r['norm']:.3f} | {s['honest']:.4f} | {s['sign_flip']:.4f} | "
                     f"{s['random_max_abs']:.4f} | {p['honest']:.4f} | {p['sign_flip']:.4f} | {p['random_max_abs']:.4f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.direction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--randoms", type=int, default=20, help="random deltas per client")
    parser.add_argument("--second-round", action="store_true", help="also round 2 (each client re-distils its edge)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, **PAPER_DISTILL_C})
    session = Session.open(config)
    deltas, _, _ = round_one_deltas(session)
    settings, tutor, edge = config.client_training(), session.chain.tutor, session.chain.edge
    presumed = session.workspace.chain_data().presumed_train
    server = server_reference_update(tutor, edge, presumed, settings, work_seed(config.seed, 1, SERVER))
    dims = sum(v.numel() for v in server.values())
    generator = torch.Generator().manual_seed(0)
    rows = cosines(deltas, server, generator, args.randoms)
    round2 = second_round(session, deltas, generator, args.randoms) if args.second_round else []
    out = {"command": f"python -m experiments.direction --profile {args.profile} --clients {args.clients}"
                      + (" --second-round" if args.second_round else ""),
           "dimensions": dims, "chance_bound_z4": 4 / math.sqrt(dims), "server_delta_norm": delta_norm(server),
           "clients": rows, "round2": round2, "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "direction.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Direction gate: cosine with each reference (round 1, {args.clients} clients)", "",
             f"`{out['command']}`; d = {dims} neck/head weights, chance bound 4/sqrt(d) = {out['chance_bound_z4']:.4f}.", "",
             *cosine_table(rows)]
    if round2:
        lines += ["", "Round 2 (the tutor merged from round 1, each client's edge re-distilled from it, each client's own "
                  "Tutor 1; the server's reference from its own edge):", "", *cosine_table(round2)]
    (args.out / "direction.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'direction.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
