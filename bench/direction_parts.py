"""Which tensors decide the direction gate: every delta's cosine with its peers' median, whole and per tensor.

    python -m bench.direction_parts --scenario experiments/scenarios/heldout8.yaml --hostile 1 3 \
        --out experiments/results/direction_parts_heldout8.json

Runs one federation of the attack bench (``bench.byzantine.run_attack``; by default the hostile clients send NaN,
so they are rejected by the structure gate and every merged delta is honest: the bench's "hostile kept out" run)
and records, for every delta the direction gate judged, its cosine with its reference over every neck/head
tensor ("all"), over all but the classification layer's class rows ("shared", ``--direction-scope shared``) and
over the class rows alone, and each tensor's share of the dot product. Writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def parts(delta: dict, reference: dict) -> dict:
    """Cosines of ``delta`` with ``reference`` by scope, and each tensor's term of the whole dot product
    (normalised by the two whole norms, so the terms sum to the whole cosine)."""
    from models.parts import CLASS_ROW_PARAMS
    from strategies.verify import cosine_score, direction_tensors

    rows = {k: v for k, v in delta.items() if k in CLASS_ROW_PARAMS}
    norm_d = sum(float(v.double().norm()) ** 2 for v in delta.values()) ** 0.5
    norm_r = sum(float(reference[k].double().norm()) ** 2 for k in delta) ** 0.5
    terms = {k: float((v.double().reshape(-1) @ reference[k].double().reshape(-1))) / (norm_d * norm_r)
             for k, v in delta.items()} if norm_d and norm_r else {}
    return {"all": cosine_score(delta, reference),
            "shared": cosine_score(direction_tensors(delta, "shared"), direction_tensors(reference, "shared")),
            "class_rows": cosine_score(rows, {k: reference[k] for k in rows}),
            "class_row_norm": sum(float(v.double().norm()) ** 2 for v in rows.values()) ** 0.5, "norm": norm_d,
            "terms": terms}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="default8")
    parser.add_argument("--hostile", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--attack", default="nan", help="bench.byzantine attack of the hostile clients (nan)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    import bench.byzantine as bench
    import strategies.diredi as diredi
    from protocol.config import NO_SPREAD, ConfigError, resolve_run_config
    from session.workspace import Session

    try:
        config = replace(resolve_run_config({"profile": "cpu", "scenario": args.scenario, "rounds": args.rounds,
                                             **NO_SPREAD}), timeout_s=900)
    except ConfigError as err:
        parser.error(str(err))
    problem = bench.hostile_problem(args.hostile, config.num_clients)
    if problem:
        parser.error(problem)
    torch.set_num_threads(1)
    seen = []  # (round, deltas, references) as the strategy's direction gate sees them
    references_of = diredi.DiReDiStrategy._references

    def spy(self, server_round, deltas):
        references = references_of(self, server_round, deltas)
        seen.append((server_round, deltas, references))
        return references

    diredi.DiReDiStrategy._references = spy
    run = bench.run_attack(Session.open(config), args.attack, args.hostile, config.timeout_s)
    decisions = {(d.round, round(d.cosine, 12)): d for d in run["recorder"].decisions if d.cosine == d.cosine}
    out = []
    for server_round, deltas, references in seen:
        for delta, reference in zip(deltas, references):
            if delta is None or reference is None:
                continue
            figures = parts(delta, reference)
            decision = decisions.get((server_round, round(figures["all"], 12)))
            out.append({"round": server_round, "client": decision.client if decision else None,
                        "accepted": decision.accepted if decision else None, **figures})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python -m bench.direction_parts " + " ".join(
        argv if argv is not None else sys.argv[1:]), "deltas": out}, indent=1))
    for d in out:
        print(f"round {d['round']} client {d['client']}: all {d['all']:.4f}, shared {d['shared']:.4f}, class rows "
              f"{d['class_rows']:.4f} (rows {d['class_row_norm']:.3f} of norm {d['norm']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
