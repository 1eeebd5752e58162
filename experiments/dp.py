"""What local differential privacy on the clients' deltas costs DiReDi: clip to L2 norm C, add
N(0, (sigma C)^2) per coordinate on the client (``protocol.privacy``), epsilon from Opacus's RDP
accountant.

    python -m experiments.dp                           # default run, DiReDi only, sigma 0 (clip only) .. 2
    python -m experiments.dp --noise 0.01 0.5 --clip 0.2

1. DiReDi without DP (the default configuration: cpu profile, 8 clients, 2 rounds). C is the median
   of the norms of the deltas the server received in it (verification's ``norm``), rounded to two
   significant digits, unless ``--clip`` names one.
2. Offline, round 1 exactly as the federation computes it (``experiments.merge.round_one_deltas``:
   same tutors and seeds): every client's delta privatised as its client would (same noise seeds),
   all of them merged as the server merges accepted deltas, the updated tutor scored on the
   manufacturer's validation set. This is what the tutor would learn from the noised deltas if
   verification let every one through.
3. One DiReDi run per sigma (0 = clipping only) at that C: clients' knowledge gain, forgetting of
   kept presumed classes (``evaluation.metrics``, as the report computes them), deltas accepted by
   verification (and the gates that rejected the others), the tutor's validation mAP.

epsilon is each client's after its ``rounds`` participations (every client takes part in every
round at fraction 1) at ``--delta`` for the add/remove neighbouring relation (sensitivity C);
``epsilon_replace`` is the same noise against replacing the client's data (sensitivity 2C).

Writes ``experiments/results/dp.json`` after every run and ``dp.md`` at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from models.parts import delta_norm
from protocol.privacy import epsilon_spent, noise_generator, privatise


def significant(value: float, digits: int = 2) -> float:
    """``value`` rounded to ``digits`` significant digits (0.2347 -> 0.23)."""
    return float(f"{value:.{digits}g}")


def federated_run(session, clip: float, noise: float, delta: float) -> dict:
    """One DiReDi run of the session's configuration with DP at (clip, noise); its figures."""
    from evaluation.metrics import max_dp_epsilon, method_means, method_table
    from sim.federation import run_federation
    from session.workspace import Session

    config = replace(session.config, dp_clip=clip, dp_noise=noise, dp_delta=delta)
    start = time.perf_counter()
    result = run_federation("diredi", Session(config, session.workspace, session.chain))
    seconds = time.perf_counter() - start
    specs = session.client_specs()
    records = result.records
    (means,) = method_means(method_table(records, specs, [s["private"] for s in specs]))
    decisions = result.recorder.decisions
    history = result.recorder.tutor_history
    on = math.isfinite(clip) or noise > 0
    return {"clip": clip if math.isfinite(clip) else "inf", "noise": noise,
            "dp": on,  # the clients privatised (clipped at least); without noise epsilon is inf
            "epsilon": epsilon_spent(noise, config.rounds, delta),
            "epsilon_replace": epsilon_spent(noise / 2, config.rounds, delta),
            "epsilon_reported": max_dp_epsilon(records, "diredi"),  # the clients' own (when records carry it)
            "gain": 100 * means["gain"], "forgetting": 100 * means["forgetting_kept"],
            "clients_with_gain": sum(1 for r in method_table(records, specs, [s["private"] for s in specs])
                                     if r["gain"] > 0),
            "accepted": sum(d.accepted for d in decisions), "deltas": len(decisions),
            "rejected_by": dict(Counter(g for d in decisions for g in d.rejected_by)),
            "received_norm_median": statistics.median(d.norm for d in decisions) if decisions else math.nan,
            "tutor_val_map": [100 * h["mAP"] for h in history],
            "failures": [f["reason"][:200] for f in result.recorder.failures], "seconds": seconds}


def offline_round_one(session, clip: float, noises: list[float]) -> list[dict]:
    """Round 1's deltas, privatised per sigma with the clients' own seeds, all merged and scored."""
    from distill.rd import updated_tutor
    from experiments.merge import round_one_deltas, score
    from protocol.wire import work_seed
    from strategies.aggregate import aggregate

    config = session.config
    deltas, weights, trained = round_one_deltas(session)
    options = {"client_classes": trained} if config.aggregation == "class_aware" else {}
    rows = []
    for noise in [None, *noises]:  # None: no DP at all
        if noise is None:
            sent = deltas
        else:
            sent = [privatise(d, clip, noise, noise_generator(work_seed(config.seed, 1, i)))[0]
                    for i, d in enumerate(deltas)]
        merged = aggregate(sent, weights, config.aggregation, **options)
        figures = score(updated_tutor(session.chain.tutor, merged, config.beta), session)
        rows.append({"clip": "inf" if noise is None else clip, "noise": 0.0 if noise is None else noise,
                     "sent_norm_median": statistics.median(delta_norm(d) for d in sent),
                     **{k: figures[k] for k in ("new_ap", "presumed_mAP", "protected_ap")}})
        print(f"offline sigma {noise}: new-class AP {figures['new_ap']:.1f}, presumed mAP "
              f"{figures['presumed_mAP']:.1f}, protected {figures['protected_ap']:.1f}", flush=True)
    return rows


def jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or value == "inf":
        return "inf" if value in (math.inf, "inf") else "—"
    return format(value, fmt)


def write_markdown(out: dict, path: Path) -> None:
    lines = ["# Local differential privacy on client deltas (DiReDi)", "",
             f"`{out['command']}`; {out['rounds']} rounds, {out['clients']} clients, every client in every "
             f"round; C = {out['clip']} (median received delta norm of the run without DP: "
             f"{out['no_dp_norm_median']:.3f}); d = {out['coordinates']} neck/head coordinates, so the noise's "
             f"norm is about sigma x C x sqrt(d) = sigma x {out['clip'] * math.sqrt(out['coordinates']):.0f}; "
             f"epsilon at delta = {out['delta']:g} per client after {out['rounds']} participations "
             "(add/remove; replace-one: sensitivity 2C).", "",
             "| clip C | sigma | epsilon | epsilon (replace) | gain | forgetting (kept) | clients with gain | "
             "accepted | rejected by | tutor val mAP (per round) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in out["settings"]:
        lines.append(f"| {cell(s['clip'], '.3g')} | {s['noise']:g} | {cell(s['epsilon'], '.3g')} | "
                     f"{cell(s['epsilon_replace'], '.3g')} | {s['gain']:+.1f} | {s['forgetting']:.1f} | "
                     f"{s['clients_with_gain']}/{out['clients']} | {s['accepted']}/{s['deltas']} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(s['rejected_by'].items())) or '—'} | "
                     f"{' → '.join(f'{v:.1f}' for v in s['tutor_val_map'])} |")
    lines += ["", "Gates (verification, per client and round): structure = the delta's norm above norm-factor x "
              "the tutor's neck/head norm; direction = cosine with the server's reference update below "
              "direction-z / sqrt(d); protected = a protected class's validation AP dropped more than allowed. "
              "With no delta accepted the tutor and the clients' edges stay as they were (gain 0)."]
    if out.get("offline"):
        lines += ["", "Round 1 offline: every client's privatised delta merged (no verification), the updated "
                  "tutor on the manufacturer's validation set (AP in points).", "",
                  "| clip C | sigma | median sent norm | new-class AP | presumed mAP | protected AP |",
                  "|---|---|---|---|---|---|"]
        for r in out["offline"]:
            lines.append(f"| {cell(r['clip'], '.3g')} | {r['noise']:g} | {r['sent_norm_median']:.3g} | "
                         f"{r['new_ap']:.1f} | {r['presumed_mAP']:.1f} | {r['protected_ap']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.dp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clip", type=float, help="C (default: the median delta norm of the run without DP)")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01, 0.1, 0.5, 1.0, 2.0],
                        help="noise multipliers sigma (0: clipping only)")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--no-offline", action="store_true", help="skip the offline round-1 merge")
    parser.add_argument("--cache", type=Path, default=Path(".cache"))
    parser.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = parser.parse_args(argv)
    from models.parts import neck_head
    from protocol.config import NO_SPREAD, TRUSTED_MERGE, resolve_run_config
    from session.workspace import Session

    torch.set_num_threads(1)  # the server's work is small; leave the cores to the clients
    config = resolve_run_config({"profile": args.profile, "num-clients": args.clients, "rounds": args.rounds,
                                "methods": "diredi", "cache-dir": str(args.cache), "dp-delta": args.delta,
                                **NO_SPREAD, **TRUSTED_MERGE})  # as measured
    session = Session.open(config)
    coordinates = sum(v.numel() for v in neck_head(session.chain.tutor).values())
    run_config = config.to_dict()
    if not args.cache.is_absolute():  # the cache may be a link to another checkout: name it as given
        run_config["cache_dir"] = str(args.cache)
    out = {"command": " ".join(["python -m experiments.dp", *(sys.argv[1:] if argv is None else argv)]),
           "config": run_config, "rounds": config.rounds, "clients": config.num_clients, "delta": args.delta,
           "coordinates": coordinates, "settings": []}
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # JSON has no infinity: non-finite numbers are written as "inf" / "nan"
        (args.out / "dp.json").write_text(json.dumps(jsonable(out), indent=2, default=str))

    off = federated_run(session, math.inf, 0.0, args.delta)
    out["settings"].append(off)
    out["no_dp_norm_median"] = off["received_norm_median"]
    out["clip"] = args.clip if args.clip is not None else significant(off["received_norm_median"])
    save()
    print(f"no DP: gain {off['gain']:+.1f}, forgetting {off['forgetting']:.1f}, accepted "
          f"{off['accepted']}/{off['deltas']}, median norm {off['received_norm_median']:.3f} -> C = {out['clip']}",
          flush=True)
    if not args.no_offline:
        out["offline"] = offline_round_one(session, out["clip"], args.noise)
        save()
    for noise in args.noise:
        row = federated_run(session, out["clip"], noise, args.delta)
        out["settings"].append(row)
        save()
        print(f"C {out['clip']} sigma {noise}: epsilon {row['epsilon']:.3g}, gain {row['gain']:+.1f}, forgetting "
              f"{row['forgetting']:.1f}, accepted {row['accepted']}/{row['deltas']} {row['rejected_by']}", flush=True)
    write_markdown(out, args.out / "dp.md")
    print(f"wrote {args.out / 'dp.json'} and {args.out / 'dp.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
