"""What the server's cache of the tutor body's outputs on the spread images saves (``--body-cache run``).

    python -m bench.spread_memo --run experiments/results/default8 --threads 2

With spread the server distils the updated tutor into its own edge every round on the manufacturer's
teacher-class images (``distill.rd.spread_distill``); the tutor's body never changes (eq. 10 moves
neck/head only), so its output for an (image, flip) pair is the same in every round. With
``--body-cache run`` the server keeps those outputs in memory from round to round
(``DiReDiStrategy(spread_memo=True)``). What this measures, on the run's scenario and settings:

* ``across_rounds``: the (image, flip) pairs each round's spread phase draws (the trainer's own draws
  with the strategy's seeds), the share a cache kept since round 1 would serve, its size in MB, and
  the body CPU seconds it would save (a partly cached batch runs the body on the rest, never on one
  image alone);
* ``end_to_end``: one spread distillation of ``--steps`` steps, run a second time with the same seed
  from a filled cache and without one (interleaved ``--repeats`` times): CPU seconds of each and
  whether the edges are the same bit for bit.

CPU seconds (``time.process_time``): on a shared machine they move much less with other load than
wall seconds. Writes the key ``spread_memo`` of ``experiments/results/cost.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.feature_reuse import body_seconds, draws, image_ids
from bench.run_folder import add_run_arguments, open_run, write_cost_keys
from data.voc import CLASS_INDEX
from distill.body_memo import BodyMemo
from distill.rd import spread_distill, spread_phase
from protocol.config import SPREAD_STEPS_PER_DISTILL_C
from protocol.wire import SERVER, work_seed


def spread_steps(run: dict, settings) -> int:
    """The server's spread steps per round of a run (0 in config.json: four times Distill C's)."""
    return int(run.get("spread_iters") or SPREAD_STEPS_PER_DISTILL_C * settings.redistill_iters)


def across_rounds(config, session, steps: int, horizon: int, per_image_mb: float, body_s: dict) -> dict:
    """Per round 1..horizon: the share of the spread phase's images a cache kept since round 1 would
    serve, the pairs and MB it holds at the round's end, and the body CPU seconds it would save."""
    settings, ws = config.client_training(), session.workspace
    ids = image_ids(ws.chain_data().teacher_train)
    classes = tuple(CLASS_INDEX[c] for c in ws.scenario.teacher_classes)
    full, seen, out = settings.batch_size, set(), {}
    for server_round in range(1, horizon + 1):
        phase = spread_phase(settings, work_seed(config.training_seed, server_round, SERVER), classes, iters=steps)
        drawn = served = 0
        saved = 0.0
        for step in draws(ids, phase):
            missing = sum(key not in seen for key in step)
            drawn, served = drawn + len(step), served + len(step) - missing
            saved += body_s[full] - (body_s[max(missing, 2)] if missing else 0.0)
            seen.update(step)
        out[str(server_round)] = {"served_share": served / drawn, "cached_pairs": len(seen),
                                  "cache_mb": len(seen) * per_image_mb, "est_body_cpu_s_saved": saved}
    return out


def end_to_end(session, config, steps: int, repeats: int, arms: tuple[str, ...] = ("served", "plain")) -> dict:
    """A spread distillation of ``steps`` steps repeated with the same seed: from a cache the first run
    filled, and without one; CPU seconds of each (interleaved) and whether the edges are identical."""
    chain, ws, settings = session.chain, session.workspace, config.client_training()
    images = ws.chain_data().teacher_train
    classes = tuple(CLASS_INDEX[c] for c in ws.scenario.teacher_classes)
    seed = work_seed(config.training_seed, 1, SERVER)
    memo = BodyMemo.for_model(chain.tutor)
    spread_distill(chain.edge, chain.tutor, images, settings, seed, classes, iters=steps, body_memo=memo)  # fills
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    edges = {}
    for _ in range(repeats):
        for name, body_memo in ((arm, memo if arm == "served" else None) for arm in arms):
            start = time.process_time()
            edges[name], _ = spread_distill(chain.edge, chain.tutor, images, settings, seed, classes, iters=steps,
                                            body_memo=body_memo)
            seconds[name].append(time.process_time() - start)
    same = len(edges) == 2 and all(torch.equal(a, b) for a, b in zip(edges["served"].state_dict().values(),
                                                                    edges["plain"].state_dict().values()))
    return {"steps": steps, "repeats": repeats, "cpu_s": seconds, "same_weights": same,
            "cpu_s_per_step_median": {k: statistics.median(v) / steps for k, v in seconds.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spread_memo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--horizon", type=int, default=20, help="rounds of the across-rounds count (the study's 20)")
    parser.add_argument("--steps", type=int, default=24, help="steps of the end-to-end spread distillation")
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs with and without the cache")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only count draws and time the body")
    parser.add_argument("--only", choices=("served", "plain"),
                        help="fill the cache, run one arm once and stop (no count, no cost file): a whole process "
                             "to time against the other arm")
    args = parser.parse_args(argv)
    for flag in ("horizon", "steps", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    config, session, run = open_run(args.run, args.threads)
    if run.get("spread") != "on":
        parser.error(f"{args.run} ran without spread: nothing for the server to cache")
    if args.only:
        e2e = end_to_end(session, config, args.steps, 1, (args.only,))
        print(f"{args.only}: {e2e['cpu_s'][args.only][0]:.1f} CPU s for {args.steps} steps")
        return 0
    settings, tutor, ws = config.client_training(), session.chain.tutor, session.workspace
    steps = spread_steps(run, settings)

    # Body: CPU seconds per batch size on one batch of the spread images, and one pair's MB.
    data = ws.chain_data().teacher_train
    images = tutor.transform([data[i][0] for i in range(settings.batch_size)], None)[0].tensors
    body_s, _ = body_seconds(tutor, images, repeats=5)
    with torch.no_grad():
        per_image_mb = sum(v[0].numel() * v[0].element_size() for v in tutor.backbone.body(images[:2]).values()) / 1e6

    result = {"command": "python -m bench.spread_memo " + " ".join(argv if argv is not None else sys.argv[1:]),
              "threads": args.threads, "spread_steps": steps, "body_cpu_s_per_batch": body_s,
              "mb_per_image_and_flip": per_image_mb,
              "across_rounds": across_rounds(config, session, steps, args.horizon, per_image_mb, body_s)}
    if not args.skip_end_to_end:
        result["end_to_end"] = end_to_end(session, config, args.steps, args.repeats)
    write_cost_keys(args.out, {"spread_memo": result})

    rounds = result["across_rounds"]
    print(f"spread: {steps} steps a round; body {body_s[settings.batch_size]:.3f} CPU s a batch of "
          f"{settings.batch_size}; {per_image_mb:.3f} MB per image and flip")
    for r in ("2", "5", "10", str(args.horizon)):
        if r in rounds:
            row = rounds[r]
            print(f"round {r}: served {100 * row['served_share']:.0f} %, cache {row['cache_mb']:.0f} MB, "
                  f"body CPU s saved {row['est_body_cpu_s_saved']:.1f}")
    total = sum(row["est_body_cpu_s_saved"] for row in rounds.values())
    print(f"rounds 1-{args.horizon}: {total:.0f} body CPU s saved in all")
    if "end_to_end" in result:
        e2e = result["end_to_end"]
        per_step = e2e["cpu_s_per_step_median"]
        print(f"end to end ({e2e['steps']} steps): {per_step['served']:.3f} CPU s a step served against "
              f"{per_step['plain']:.3f} without; same weights: {e2e['same_weights']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
