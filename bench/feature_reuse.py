"""Would reusing the tutor body's features across a client's RD Tutor 1, Tutor 2 and Distill C pay?

    python -m bench.feature_reuse --run experiments/results/default8 --threads 1

The tutor's backbone body is frozen and in eval mode in all three phases (RD: ``freeze=("backbone",)``
puts it in eval mode; Distill C: the tutor is the teacher, in eval mode), every image is resized to
the profile's square and the only augmentation is a horizontal flip, so the body's output for an
(image, flip) pair is fixed: a cache keyed by it could replace the body's forward pass. What this
measures, on the run's scenario and settings:

* ``per_round``: for every client and round, the exact (image, flip) pairs each phase draws (the
  trainer's own ``infinite_batches`` and ``_prepare`` with the phase seeds of a run), hence how many
  of a phase's images were seen by an earlier phase of the same round (the reusable ones), how many
  pairs a cache would hold (Tutor 1 and Tutor 2's) and its MB;
* ``body``: CPU seconds of the tutor body per batch size (a step whose batch is partly cached runs the
  body on the rest), and whether a sub-batch gives the same bits as the whole batch;
* ``across_rounds``: the same draws over ``--horizon`` rounds (the study's 20), with a cache that a
  client would keep on its disk from round to round (every phase stores what it computes; the body
  never changes, eq. 10): per round, the share of the body's images it would serve and its size;
* ``end_to_end``: one client's Tutor 1, Tutor 2 and Distill C run with and without a within-round
  cache of the RD phases' images (``distill.body_memo``, the project's own): identical losses and
  weights, CPU seconds, the cache's MB.

CPU seconds (``time.process_time``) rather than wall seconds: on a shared machine they move much
less with other people's load. Writes the key ``feature_reuse`` of ``experiments/results/cost.json``
(the other keys are kept) and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import distill.trainer as trainer
from bench.run_folder import add_run_arguments, open_run, write_cost_keys
from distill.body_memo import BodyMemo
from distill.rd import distill_c_phase, tutor1_phase, tutor2_phase
from protocol.wire import work_seed
from session.workspace import Session


class _Ids:
    """A data set of (image, target) items that tell which image (and, after ``_prepare``, which flip)
    they are: image [1, 1, 2] = [0, 1] turns into [1, 0] when flipped."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return torch.tensor([[[0.0, 1.0]]]), {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "image_id": self.ids[i]}


def image_ids(dataset) -> list[str]:
    if hasattr(dataset, "datasets"):  # ConcatDataset (a client's kept presumed + private images)
        return [i for d in dataset.datasets for i in image_ids(d)]
    return [r.image_id for r in dataset.records]


def draws(ids: list[str], phase: trainer.Phase) -> list[list[tuple[str, bool]]]:
    """The (image id, flipped) pairs of every step of ``phase`` on a data set with these ids, drawn as
    ``distill.trainer.train`` draws them."""
    generator = torch.Generator().manual_seed(phase.seed)
    batches = trainer.infinite_batches(_Ids(ids), phase.batch_size, generator)
    steps = []
    for _ in range(phase.iters):
        batch = next(batches)
        images, _ = trainer._prepare(batch, phase, generator)
        steps.append([(target["image_id"], bool(image[0, 0, 0] == 1.0)) for image, (_, target) in zip(images, batch)])
    return steps


def client_phases(config, session: Session, partition: int, server_round: int) -> list[tuple[str, list, trainer.Phase]]:
    """(name, data set ids, phase) of the phases a client runs in a round, in order. Tutor 1 is the
    server's in round 1 with a shared Tutor 1 (``DiReDiStrategy``), the client's afterwards."""
    ws, settings = session.workspace, config.client_training()
    seed = work_seed(config.seed, server_round, partition)
    presumed, train = image_ids(ws.client_presumed(partition)), image_ids(ws.client_train(partition))
    phases = [] if (config.tutor1 == "shared" and server_round == 1) else [("rd_tutor1", presumed, tutor1_phase(settings, seed))]
    return phases + [("rd_tutor2", train, tutor2_phase(settings, seed)), ("distill_c", train, distill_c_phase(settings, seed))]


def reuse_counts(phases) -> dict:
    """Per phase: images drawn and images an earlier phase of the round drew too (same flip); the
    pairs a cache of the RD phases' features would hold; batches found whole in it."""
    seen: set = set()
    out = {"cached_pairs": 0, "whole_batches": 0, "missing_per_step": []}
    for name, _, steps in phases:
        hits = sum(key in seen for step in steps for key in step)
        out[name] = {"images": sum(len(s) for s in steps), "reused": hits}
        out["missing_per_step"] += [sum(key not in seen for key in step) for step in steps]
        out["whole_batches"] += sum(all(key in seen for key in step) for step in steps)
        if name != "distill_c":  # the last phase: nothing after it would read what it stores
            seen.update(key for step in steps for key in step)
    out["cached_pairs"] = len(seen)
    return out


def across_rounds(config, session: Session, horizon: int, per_image_mb: float, body_s: dict, full: int) -> dict:
    """Per round 1..horizon (mean over clients): the share of the tutor body's images a cache kept from
    round to round would serve, its pairs and MB at the round's end, and the body CPU seconds it would
    save (a partly cached batch runs the body on the rest, never on one image alone)."""
    clients = len(session.workspace.clients)
    seen: list[set] = [set() for _ in range(clients)]
    out = {}
    for server_round in range(1, horizon + 1):
        drawn = served = 0
        saved = 0.0
        for partition in range(clients):
            for _, ids, phase in client_phases(config, session, partition, server_round):
                for step in draws(ids, phase):
                    missing = sum(key not in seen[partition] for key in step)
                    drawn, served = drawn + len(step), served + len(step) - missing
                    saved += body_s[full] - (body_s[max(missing, 2)] if missing else 0.0)
                    seen[partition].update(step)
        pairs = sum(len(s) for s in seen) / clients
        out[str(server_round)] = {"served_share": served / drawn, "cached_pairs_mean": pairs,
                                  "cache_mb_mean": pairs * per_image_mb, "est_cpu_s_saved_per_client": saved / clients}
    return out


def body_seconds(tutor, images: torch.Tensor, repeats: int) -> tuple[dict, dict]:
    """CPU seconds of the tutor body per batch size 1..N (median), and whether each sub-batch's
    features equal the whole batch's bit for bit."""
    body = tutor.backbone.body.eval()
    seconds, same = {}, {}
    with torch.no_grad():
        whole = body(images)
        for n in range(len(images), 0, -1):
            times = []
            for _ in range(repeats):
                start = time.process_time()
                part = body(images[:n])
                times.append(time.process_time() - start)
            seconds[n] = statistics.median(times)
            same[n] = all(torch.equal(part[k], whole[k][:n]) for k in whole)
    return seconds, same


def run_chain(session: Session, config, partition: int, server_round: int, cached: bool) -> dict:
    """One client's round (Tutor 1 if it computes one, Tutor 2, Distill C), with ``cached`` the tutor
    body's outputs kept per image by the RD phases and served to all three (``distill.body_memo``)."""
    chain, ws, settings = session.chain, session.workspace, config.client_training()
    memo = BodyMemo.for_model(chain.tutor) if cached else None
    start = time.process_time()
    losses, seed = {}, work_seed(config.seed, server_round, partition)
    tutor1 = copy.deepcopy(chain.tutor)
    if not (config.tutor1 == "shared" and server_round == 1):
        losses["rd_tutor1"] = trainer.train(tutor1, ws.client_presumed(partition), tutor1_phase(settings, seed),
                                            teacher=chain.edge, progress=False, body_memo=memo).losses
    tutor2 = copy.deepcopy(tutor1)
    losses["rd_tutor2"] = trainer.train(tutor2, ws.client_train(partition), tutor2_phase(settings, seed),
                                        teacher=chain.edge, progress=False, body_memo=memo).losses
    if memo is not None:
        memo.recording = False  # the last phase: nothing after it would read what it stores
    edge = copy.deepcopy(chain.edge)
    losses["distill_c"] = trainer.train(edge, ws.client_train(partition), distill_c_phase(settings, seed),
                                        teacher=copy.deepcopy(chain.tutor), progress=False, body_memo=memo).losses
    cpu_s = time.process_time() - start
    return {"cpu_s": cpu_s, "losses": losses, "weights": {"tutor2": tutor2.state_dict(), "edge": edge.state_dict()},
            "cache_mb": sum(v.numel() * v.element_size() for e in (memo.outputs.values() if memo else [])
                            for v in e.values()) / 1e6}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feature_reuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="end-to-end runs with and without the cache, interleaved")
    parser.add_argument("--client", type=int, default=0, help="the client run end to end")
    parser.add_argument("--horizon", type=int, default=20, help="rounds of the across-rounds count (the study's 20)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only count draws and time the body")
    args = parser.parse_args(argv)
    if args.horizon < 1:
        parser.error("--horizon must be at least 1")
    config, session, run = open_run(args.run, args.threads)
    ws, tutor = session.workspace, session.chain.tutor
    rounds = sorted({1, 2} & set(range(1, int(run.get("rounds", 2)) + 1)))

    # Body: seconds per batch size and bits of sub-batches (one real batch of the first client).
    batch = [ws.client_train(0)[i][0] for i in range(config.client_training().batch_size)]
    images = tutor.transform(batch, None)[0].tensors
    body_s, same_bits = body_seconds(tutor, images, repeats=5)
    with torch.no_grad():
        per_image_mb = sum(v[0].numel() * v[0].element_size() for v in tutor.backbone.body(images[:2]).values()) / 1e6

    per_round = {}
    for server_round in rounds:
        rows = []
        for partition in range(len(ws.clients)):
            phases = client_phases(config, session, partition, server_round)
            counts = reuse_counts([(name, ids, draws(ids, phase)) for name, ids, phase in phases])
            full = len(images)
            counts["est_cpu_s_saved"] = sum(body_s[full] - (body_s[max(m, 2)] if m else 0.0)
                                            for m in counts.pop("missing_per_step"))
            rows.append(counts)
        names = [n for n in ("rd_tutor1", "rd_tutor2", "distill_c") if n in rows[0]]
        drawn = sum(r[n]["images"] for r in rows for n in names)
        reused = sum(r[n]["reused"] for r in rows for n in names)
        per_round[str(server_round)] = {
            **{n: {"images": rows[0][n]["images"], "reused_mean": sum(r[n]["reused"] for r in rows) / len(rows)}
               for n in names},
            "body_images_reused_share": reused / drawn,
            "whole_batches_cached": sum(r["whole_batches"] for r in rows),
            "cached_pairs_mean": sum(r["cached_pairs"] for r in rows) / len(rows),
            "cache_mb_mean": per_image_mb * sum(r["cached_pairs"] for r in rows) / len(rows),
            "est_cpu_s_saved_per_client": sum(r["est_cpu_s_saved"] for r in rows) / len(rows),
            "body_cpu_s_per_client": sum(body_s[full] * (r[n]["images"] // full) for r in rows for n in names) / len(rows)}

    horizon = across_rounds(config, session, args.horizon, per_image_mb, body_s, len(images))

    end_to_end = {}
    for server_round in ([] if args.skip_end_to_end else rounds):
        runs = {"without": [], "with": []}
        for _ in range(args.repeats):  # interleaved: the machine's load hits both alike
            runs["without"].append(run_chain(session, config, args.client, server_round, False))
            runs["with"].append(run_chain(session, config, args.client, server_round, True))
        a, b = runs["without"][0], runs["with"][0]
        identical = a["losses"] == b["losses"] and all(
            torch.equal(a["weights"][m][k], b["weights"][m][k]) for m in a["weights"] for k in a["weights"][m])
        without = statistics.median(r["cpu_s"] for r in runs["without"])
        with_cache = statistics.median(r["cpu_s"] for r in runs["with"])
        end_to_end[str(server_round)] = {"client": args.client, "cpu_s_without": without, "cpu_s_with": with_cache,
                                         "cpu_s_saved": without - with_cache, "cache_mb": b["cache_mb"],
                                         "identical_losses_and_weights": identical}

    shards = ws.shards.sizes()["clients"]
    result = {
        "command": " ".join(["python -m bench.feature_reuse", *(sys.argv[1:] if argv is None else argv)]),
        "steps": {"rd_per_tutor": config.rd_iters, "distill_c": config.redistill_iters,
                  "batch_size": config.client_training().batch_size},
        "shard_images": {"presumed": [c["presumed"] for c in shards.values()],
                         "train": [c["presumed_kept"] + c["private"] for c in shards.values()]},
        "body": {"cpu_s_per_batch": {str(n): s for n, s in sorted(body_s.items())},
                 "sub_batch_same_bits": {str(n): v for n, v in sorted(same_bits.items())},
                 "mb_per_image": per_image_mb},
        "per_round": per_round,
        "across_rounds": horizon,
        "end_to_end": end_to_end,
    }
    if args.skip_end_to_end and args.out.exists():  # keep the end-to-end figures of the last full run
        earlier = json.loads(args.out.read_text()).get("feature_reuse", {})
        if earlier.get("end_to_end"):
            result["end_to_end"] = earlier["end_to_end"]
            result["end_to_end_command"] = earlier.get("end_to_end_command", earlier.get("command"))
    else:
        result["end_to_end_command"] = result["command"]
    write_cost_keys(args.out, {"feature_reuse": result})
    print(json.dumps({k: result[k] for k in ("body", "per_round", "end_to_end")}, indent=1))
    for r in (1, 2, 5, 10, args.horizon):
        if str(r) in horizon:
            h = horizon[str(r)]
            print(f"across rounds, round {r}: {100 * h['served_share']:.0f} % of body images served, "
                  f"cache {h['cache_mb_mean']:.0f} MB per client, ~{h['est_cpu_s_saved_per_client']:.1f} CPU s saved per client")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
