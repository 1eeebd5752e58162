"""Two of eight clients hostile, one attack at a time: does verification keep them out, and what
does the tutor lose?

    python -m bench.byzantine                          # every attack, default scenario, 1 round
    python -m bench.byzantine --attacks nan sign_flip --rounds 2

Hostile clients run this module's ClientApp: the project's own handlers, whose "train" reply is
then altered, as a client written outside the project would send it over the same wire format.
Which clients are hostile and the attack travel in the server's config (keys ``attack`` and
``hostile``; the honest handlers ignore keys they do not know). Each attack is one DiReDi run of
the default configuration (2 of 8 clients hostile), compared with an all-honest run of the same
seed. Per attack: hostile deltas rejected (a missing reply counts as kept out), honest deltas
accepted, the tutor's protected-class validation AP drop over the run, the honest clients' mean
gain over the all-honest run's (the same clients), and whether the run finished.

Writes ``experiments/results/byzantine.json`` after every attack and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import clients.app as honest
from data.voc import CLASS_INDEX
from evaluation.metrics import method_table
from protocol.wire import CONFIG, DELTA, METRICS, NUM_EXAMPLES, state_record

ATTACK, HOSTILE, SLEEP = "attack", "hostile", "hostile-sleep-s"
ATTACKS = ("nan", "scaled100", "sign_flip", "random", "wrong_shape", "extra_backbone", "absurd_weight",
           "eraser", "score_shift", "crash", "timeout")
# score_shift: every score of these classes lowered by SCORE_SHIFT logits (their ranking, and so their AP,
# barely moves; their recall at the operating threshold falls), the rest of the delta honest
SHIFTED_CLASSES, SCORE_SHIFT = ("aeroplane", "bus", "horse", "motorbike"), 3.0

app = ClientApp()


def _attack(msg: Message, context: Context) -> str | None:
    config = msg.content[CONFIG]
    hostile = {int(p) for p in str(config.get(HOSTILE, "")).split(",") if p.strip()}
    return str(config[ATTACK]) if int(context.node_config["partition-id"]) in hostile else None


def altered_delta(delta: dict[str, torch.Tensor], attack: str, seed: int) -> dict[str, torch.Tensor]:
    """The hostile delta of ``attack`` made from an honest ``delta`` (float32)."""
    first = next(iter(delta))
    if attack == "nan":
        return {**delta, first: delta[first].clone().fill_(math.nan)}
    if attack == "scaled100":
        return {k: 100 * v for k, v in delta.items()}
    if attack == "sign_flip":
        return {k: -v for k, v in delta.items()}
    if attack == "random":  # Gaussian noise with the honest delta's norm
        generator = torch.Generator().manual_seed(seed)
        noise = {k: torch.randn(v.shape, generator=generator) for k, v in delta.items()}
        scale = math.sqrt(sum(float((v ** 2).sum()) for v in delta.values()) /
                          sum(float((v ** 2).sum()) for v in noise.values()))
        return {k: scale * v for k, v in noise.items()}
    if attack == "wrong_shape":
        return {**delta, first: torch.zeros(3)}
    if attack == "extra_backbone":
        return {**delta, "backbone.body.0.0.weight": torch.zeros(4)}
    if attack == "eraser":  # the protected class never scores again; the rest honest
        name = "head.classification_head.cls_logits.bias"
        erased = delta[name].clone()
        erased[CLASS_INDEX["person"]] = -30.0
        return {**delta, name: erased}
    if attack == "score_shift":
        name = "head.classification_head.cls_logits.bias"
        shifted = delta[name].clone()
        shifted[[CLASS_INDEX[c] for c in SHIFTED_CLASSES]] -= SCORE_SHIFT
        return {**delta, name: shifted}
    return delta  # absurd_weight: the delta is honest, the claimed weight is not


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = _attack(msg, context)
    if attack == "crash":
        raise RuntimeError("hostile client: crashed on purpose")
    if attack == "timeout":
        time.sleep(float(msg.content[CONFIG][SLEEP]))
    reply = honest.train(msg, context)
    if attack is None or reply.has_error() or attack == "timeout":
        return reply
    metrics = dict(reply.content[METRICS])
    delta = {k: v.float() for k, v in reply.content.array_records[DELTA].to_torch_state_dict().items()}
    if attack == "absurd_weight":
        metrics[NUM_EXAMPLES] = 1e12
    content = RecordDict({DELTA: state_record(altered_delta(delta, attack, int(context.node_config["partition-id"]))),
                          METRICS: MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.train("distill")
def distill(msg: Message, context: Context) -> Message:
    return honest.distill(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return honest.identify(msg, context)


# -- the benchmark ---------------------------------------------------------------------------------


def run_attack(session, attack: str, hostile: list[int], timeout_s: float) -> dict:
    """One DiReDi run with ``hostile`` clients doing ``attack`` ("none": all honest)."""
    from sim.federation import simulate
    from strategies.ledger import Recorder
    from strategies.server_app import make_strategy

    config = session.config
    recorder = Recorder("diredi")
    extra = {ATTACK: attack, HOSTILE: ",".join(map(str, hostile)), SLEEP: timeout_s + 20.0}
    finished = []

    def server_main(grid, _context):
        strategy = make_strategy("diredi", session, recorder)
        strategy.start(grid=grid, num_rounds=config.rounds, timeout=timeout_s,
                       train_config=ConfigRecord({**config.to_record(), **extra}))
        finished.append(True)

    start = time.perf_counter()
    try:  # a sleeping client holds an actor: give the others actors of their own
        simulate(config, server_main, client_app=app, client_cpus=0.5 if attack == "timeout" else 1.0)
    except RuntimeError as err:
        print(f"{attack}: the run failed: {err}", flush=True)
    return {"recorder": recorder, "finished": bool(finished), "seconds": time.perf_counter() - start}


def honest_gains(session, records: list[dict], honest_clients: list[int]) -> float:
    specs = session.client_specs()
    rows = [r for r in method_table(records, specs, [s["private"] for s in specs]) if r["client"] in honest_clients]
    gains = [r["gain"] for r in rows if isinstance(r["gain"], float) and math.isfinite(r["gain"])]
    return 100 * sum(gains) / len(gains) if gains else math.nan


def operating_figures(decision) -> dict:
    """One decision's operating point: the largest recall drop at the threshold over the guarded classes,
    where, and the drop allowed there."""
    drops = {c: decision.recall_before[c] - decision.recall_after[c] for c in decision.recall_tolerance
             if math.isfinite(decision.recall_before.get(c, math.nan))}
    if not drops:
        return {}
    worst = max(drops, key=drops.get)
    return {"class": worst, "drop": drops[worst], "tolerance": decision.recall_tolerance[worst],
            "accepted": decision.accepted}


def summarise(session, run: dict, hostile: list[int], baseline_gain: float | None) -> dict:
    recorder = run["recorder"]
    n = session.config.num_clients
    honest_clients = [c for c in range(n) if c not in hostile]
    accepted = {d.client for d in recorder.decisions if d.accepted}
    history = recorder.tutor_history
    protected = session.workspace.scenario.protected_classes
    drop = (100 * max(history[0]["ap"][c] - history[-1]["ap"][c] for c in protected)
            if len(history) > 1 else 0.0)
    gain = honest_gains(session, recorder.records, honest_clients)
    return {"rejected": sum(1 for c in hostile if c not in accepted), "hostile": len(hostile),
            "honest_accepted": sum(1 for c in honest_clients if c in accepted), "honest": len(honest_clients),
            "protected_ap_drop": drop, "honest_gain": gain,
            "honest_gain_ratio": gain / baseline_gain if baseline_gain else math.nan,
            "finished": run["finished"], "seconds": run["seconds"],
            "reasons": {d.client: d.reason for d in recorder.decisions if d.client in hostile},
            "operating_point": {d.client: operating_figures(d) for d in recorder.decisions},
            "tutor_recall": history[-1].get("recall", {}) if history else {},
            "weights_used": {d.client: d.weight_used for d in recorder.decisions if d.client in hostile},
            "failures": [f["reason"][:200] for f in recorder.failures]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.byzantine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--hostile", type=int, nargs="+", default=[0, 1], help="partition ids of the hostile clients")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a round trip waits for replies")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/byzantine.json"))
    parser.add_argument("--operating-tolerance", type=float, default=math.inf,
                        help="the verification's operating-point gate (inf: recorded only, the default)")
    args = parser.parse_args(argv)
    from protocol.config import resolve_run_config
    from strategies.server_app import Session

    torch.set_num_threads(1)  # the server's work is small; leave the cores to the clients
    config = replace(resolve_run_config({"profile": args.profile, "rounds": args.rounds,
                                         "operating-tolerance": args.operating_tolerance}), timeout_s=args.timeout)
    session = Session.open(config)
    honest_clients = [c for c in range(config.num_clients) if c not in args.hostile]
    base = run_attack(session, "none", args.hostile, args.timeout)
    base_gain = honest_gains(session, base["recorder"].records, honest_clients)  # the same clients, all honest
    out = {"command": "python -m bench.byzantine " + " ".join(argv if argv is not None else sys.argv[1:]),
           "config": config.to_dict(), "hostile_clients": args.hostile,
           "all_honest": {**summarise(session, base, [], None), "gain_of_the_honest_clients": base_gain},
           "attacks": {}}
    for attack in args.attacks:
        out["attacks"][attack] = a = summarise(session, run_attack(session, attack, args.hostile, args.timeout),
                                               args.hostile, base_gain)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2, default=str))
        print(f"{attack}: hostile rejected {a['rejected']}/{a['hostile']}, honest accepted "
              f"{a['honest_accepted']}/{a['honest']}, protected drop {a['protected_ap_drop']:.2f}, "
              f"honest gain ratio {a['honest_gain_ratio']:.2f}, finished {a['finished']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
