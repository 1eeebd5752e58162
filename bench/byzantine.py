"""Two of eight clients hostile, one attack at a time: does verification keep them out, and what
does the tutor lose?

    python -m bench.byzantine                          # every attack, default scenario, 1 round
    python -m bench.byzantine --attacks nan sign_flip --rounds 2
    python -m bench.byzantine --attacks false_claim:0.5 false_claim:2 --claims earned --rounds 2
    python -m bench.byzantine --rounds 2 --hostile 2 5 --scenario experiments/scenarios/heldout8.yaml
    python -m bench.byzantine --rounds 2 --resume      # go on with experiments/results/byzantine.json

Hostile clients run this module's ClientApp: the project's own handlers, whose "train" reply is
then altered, as a client written outside the project would send it over the same wire format.
Which clients are hostile and the attack travel in the server's config (keys ``attack`` and
``hostile``; the honest handlers ignore keys they do not know). Each attack is one DiReDi run of
the default configuration (2 of 8 clients hostile; ``--scenario`` another federation), compared with an
all-honest run of the same seed (the claim rule, the bounds and the calibration are the run's defaults unless given: ``--claims``,
``--weight-cap``, ``--row-bound``, ...). Per attack: hostile deltas rejected (a missing reply counts as kept out), honest deltas
accepted, the tutor's protected-class validation AP drop over the run, the honest clients' mean
gain over the all-honest run's (the same clients), whether the run finished, and the tutor's
validation AP and recall at the operating threshold per class after the run beside the all-honest
run's (``class_loss``: what the attack cost each class, positive = lost).

Attack families with a strength (``family:strength``; the family alone takes its default strength):
``score_shift`` (a calibration shift: every score of four kept classes lowered by the strength in
logits), ``false_claim`` (the hostile clients claim a private class two honest clients hold, which
they do not, edit its row's bias by minus the strength, and claim 10^12 examples, capped by the
merge), ``hidden_edit`` (an honest delta with the protected class's bias lowered by the strength,
10^12 examples claimed), ``combined`` (all three at once, at the cap: the four kept classes and the protected
class lowered by the strength, and the false claim), ``tiny_claim`` (every class row the client claims, its own
classes' and the false claim's, sent at the strength times itself, default 0.01, weight at the cap: a row that holds
its class while it pulls a low row median down, to cut the honest contributors' rows). Two families poison the
data instead, the delta then honestly trained on it (nothing in it is edited; strength: the share of the objects
changed, default 1): ``label_drop`` (the objects of the client's kept classes, `person` included, unlabelled:
they become background, and its Tutor 2 learns to score them down, the data-level twin of ``score_shift``) and
``label_flip`` (its private class's objects labelled as the class a false claim names, which it then claims: a
claim its data backs), both at the cap.

Each attack's verdict (``attack_verdict``): "kept out" when every hostile delta is rejected; otherwise
"bounded" when no class of the deployed tutor after the run lost more than its tolerance in AP or in recall at
the operating threshold, else "gets through". A class's loss is measured against the lesser of two outcomes
the server accepts, the all-honest run's tutor and the one of a run whose hostile deltas are kept out (a "nan"
run, always made; ``lesser_loss``), and for a class only the hostile clients hold against the tutor before the
run (nothing honest teaches it: it may go unlearned, not fall below where it was); its tolerance is ``noise_z`` x the loss's paired
bootstrap std on the validation images, at least the protected tolerance for a protected class's AP
(``class_tolerances``). For recall at the threshold that std also counts the reference's operating-point noise
(``operating_point_noise``): the server chooses each class's operating point on the validation set, and on a
class whose F1 is flat around its best a merge that moves its scores by a hair (an honest client with more data
does) chooses the neighbouring offset, and the recall moves by a step of the class's curve; the paired noise of one
pair of tutors does not see that. The verdict against the paired noise alone is kept beside ("strict_verdict").

Writes ``experiments/results/byzantine.json`` (and its verdicts as ``byzantine.md``) after every attack, with
the chain's fingerprints and the CPU it ran on. ``--resume`` goes on with that file in a later invocation: its
attacks are kept and skipped; the reference runs are made again and must come out as the file's (the same
settings, hostile clients, chain and arithmetic), else the bench stops in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import clients.app as honest
from data.voc import CLASS_INDEX
from evaluation.metrics import method_table
from models.parts import CLASS_ROW_PARAMS
from protocol.config import RunConfig, choices_of
from protocol.wire import CONFIG, DELTA, METRICS, NUM_EXAMPLES, TRAINED, decode, encode, state_record

ATTACK, HOSTILE, SLEEP = "attack", "hostile", "hostile-sleep-s"
CLAIMED = "hostile-claim"  # the class a false_claim attack claims (chosen by the benchmark)
ATTACKS = ("nan", "scaled100", "sign_flip", "random", "wrong_shape", "extra_backbone", "absurd_weight",
           "eraser", "score_shift", "false_claim", "hidden_edit", "combined", "tiny_claim", "label_drop", "label_flip",
           "crash", "timeout")
# the families that take a strength ("family:strength"), and their default strength
STRENGTHS = {"score_shift": 3.0, "false_claim": 1.0, "hidden_edit": 1.0, "combined": 1.0, "tiny_claim": 0.01,
             "label_drop": 1.0, "label_flip": 1.0}
POISONING = ("label_drop", "label_flip")  # the delta honestly trained on altered labels; strength: a share (0, 1]
AT_THE_CAP = ("absurd_weight", "false_claim", "hidden_edit", "combined", "tiny_claim", *POISONING)  # 10^12 examples
CLAIMING = ("false_claim", "combined", "tiny_claim", "label_flip")  # they claim a class they do not hold
OBJECT_FIELDS = ("boxes", "labels", "difficult")  # a target's per-object fields (data.voc.VOCDetection)
# score_shift: every score of these classes lowered by the strength in logits (their ranking, and so their AP,
# barely moves; their recall at the operating threshold falls), the rest of the delta honest
SHIFTED_CLASSES = ("aeroplane", "bus", "horse", "motorbike")
BIAS = "head.classification_head.cls_logits.bias"
# The calibration's choice is replayed over the offsets within this many fine steps (0.25 logits) of the chosen
# one: a resample's best F1 lies next to the whole set's (``operating_point_noise``)
CHOICE_STEPS = 4
CHAIN_ROLES = ("teacher", "tutor", "edge")  # the manufacturer's models a bench file's references were made from
# the run settings the benchmark takes from its command line (the protected gate's scope, the merge's claim rule,
# bounds and calibration, the direction gate's scope)
MERGE_SETTINGS = ("protected_scope", "claims", "clip_multiple", "row_multiple", "weight_cap", "row_bound", "clip_share",
                  "row_reference", "row_share", "row_size", "dilution_check", "calibrate", "calibrate_reach",
                  "direction_scope")


def parse_attack(text: str) -> tuple[str, float]:
    """"family" or "family:strength" -> (family, strength); the strength is NaN for attacks without one."""
    family, _, strength = text.partition(":")
    if family not in ATTACKS:
        raise argparse.ArgumentTypeError(f"unknown attack {family!r}; expected one of {', '.join(ATTACKS)}")
    if family not in STRENGTHS:
        if strength:
            raise argparse.ArgumentTypeError(f"{family} takes no strength")
        return family, math.nan
    try:
        value = float(strength) if strength else STRENGTHS[family]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: the strength must be a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: the strength must be a finite number > 0")
    if family in POISONING and value > 1:
        raise argparse.ArgumentTypeError(f"{text}: the strength is the share of objects changed, at most 1")
    return family, value


def checked_attack(text: str) -> str:
    parse_attack(text)
    return text

app = ClientApp(mods=[honest.packed_transport])  # the same packed transport as honest clients


def _attack(msg: Message, context: Context) -> str | None:
    config = msg.content[CONFIG]
    hostile = {int(p) for p in str(config.get(HOSTILE, "")).split(",") if p.strip()}
    return str(config[ATTACK]) if int(context.node_config["partition-id"]) in hostile else None


def poisoned_target(target: dict, attack: str, kept: Collection[str], private: Collection[str], claimed: str,
                    seed: int) -> dict:
    """One training image's target as a data-poisoning client labels it (``attack``: "label_drop" or
    "label_flip", with a strength): each object of the classes the family changes (``kept`` for label_drop,
    ``private`` for label_flip) is changed with probability the strength, drawn from (seed, image, object) so the
    same seed changes the same objects; label_drop removes it (background), label_flip relabels it as ``claimed``."""
    family, share = parse_attack(attack)
    changed = {CLASS_INDEX[c] for c in (kept if family == "label_drop" else private)}
    hit = [int(label) in changed and random.Random(f"{seed}:{target['image_id']}:{j}").random() < share
           for j, label in enumerate(target["labels"].tolist())]
    hit = torch.tensor(hit, dtype=torch.bool)
    if family == "label_flip":
        labels = target["labels"].clone()
        labels[hit] = CLASS_INDEX[claimed]
        return {**target, "labels": labels}
    return {**target, **{k: target[k][~hit] for k in OBJECT_FIELDS if k in target}}


class PoisonedShard(Dataset):
    """A client's training images with their targets as ``poisoned_target`` labels them (the images unchanged)."""

    def __init__(self, base: Dataset, attack: str, kept: Collection[str], private: Collection[str], claimed: str,
                 seed: int):
        self.base, self.attack, self.kept, self.private, self.claimed, self.seed = \
            base, attack, tuple(kept), tuple(private), claimed, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, target = self.base[i]
        return image, poisoned_target(target, self.attack, self.kept, self.private, self.claimed, self.seed)


@contextmanager
def poisoned_training(msg: Message, context: Context, attack: str, claimed: str) -> Iterator[None]:
    """While the honest handler trains, the client's training shard is ``PoisonedShard``'s: the handler reads its
    shards through ``clients.app._dataset``'s per-process cache, which this fills, and empties after."""
    _, _, ws, partition, _ = honest._common(msg, context)
    spec = ws.clients[partition]
    honest._dataset(ws, partition, "train")  # the cache entry of this partition, made as the handler makes it
    shards = honest._DATASETS[(id(ws), partition)]
    shards["train"] = PoisonedShard(ws.client_train(partition), attack, spec.kept, spec.private, claimed, partition)
    try:
        yield
    finally:
        shards.pop("train", None)


def altered_delta(delta: dict[str, torch.Tensor], attack: str, seed: int, claimed: str = "",
                  own: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """The hostile delta of ``attack`` ("family" or "family:strength") made from an honest ``delta``
    (float32); ``claimed``: the class a false claim names; ``own``: the classes the client's labels hold."""
    attack, strength = parse_attack(attack)
    first = next(iter(delta))
    if attack == "tiny_claim":  # every row it claims at a small fraction of itself: a low row median to cut others'
        rows = [CLASS_INDEX[c] for c in {*own, *([claimed] if claimed else [])}]
        out = {**delta}
        for name in CLASS_ROW_PARAMS:
            out[name] = delta[name].clone()
            out[name][rows] *= strength
        return out
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
    if attack in ("absurd_weight", "crash", "timeout", *POISONING):
        return delta  # absurd_weight: the delta is honest, the claimed weight is not; poisoning: trained on poison
    edited = delta[BIAS].clone()
    if attack == "eraser":  # the protected class never scores again; the rest honest
        edited[CLASS_INDEX["person"]] = -30.0
    lowered = {"score_shift": SHIFTED_CLASSES, "hidden_edit": ("person",),
               "combined": (*SHIFTED_CLASSES, "person")}.get(attack, ())
    edited[[CLASS_INDEX[c] for c in lowered]] -= strength
    if attack in CLAIMING and claimed:  # a row it never trained: only the small edit
        edited[CLASS_INDEX[claimed]] = -strength
    return {**delta, BIAS: edited}


@app.train()
def train(msg: Message, context: Context) -> Message:
    attack = _attack(msg, context)
    if attack == "crash":
        raise RuntimeError("hostile client: crashed on purpose")
    if attack == "timeout":
        time.sleep(float(msg.content[CONFIG][SLEEP]))
    claimed = str(msg.content[CONFIG].get(CLAIMED, ""))
    if attack not in (None, "none") and parse_attack(attack)[0] in POISONING:
        with poisoned_training(msg, context, attack, claimed):
            reply = honest.train(msg, context)
    else:
        reply = honest.train(msg, context)
    if attack in (None, "none", "timeout") or reply.has_error():
        return reply
    metrics = dict(reply.content[METRICS])
    delta = {k: v.float() for k, v in reply.content.array_records[DELTA].to_torch_state_dict().items()}
    family, _ = parse_attack(attack)
    if family in AT_THE_CAP:
        metrics[NUM_EXAMPLES] = 1e12
    if family in CLAIMING and claimed:
        metrics.update(encode(TRAINED, {claimed: 1}))
    own = [c for c, held in decode(reply.content[METRICS], TRAINED).items() if held]
    altered = altered_delta(delta, attack, int(context.node_config["partition-id"]), claimed, own)
    content = RecordDict({DELTA: state_record(altered), METRICS: MetricRecord(metrics)})
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


def claimed_class(session, hostile: list[int]) -> str:
    """The class a false claim names: the private class held by the most honest clients (ties: VOC order)."""
    specs = [s for s in session.client_specs() if s["client"] not in hostile]
    held = [c for s in specs for c in s["private"]]
    return max(sorted(set(held), key=CLASS_INDEX.__getitem__), key=held.count) if held else ""


def run_attack(session, attack: str, hostile: list[int], timeout_s: float, choice_noise: bool = False) -> dict:
    """One DiReDi run with ``hostile`` clients doing ``attack`` ("none": all honest); with ``choice_noise`` (the
    reference runs) also its tutor's operating-point noise (``operating_point_noise``)."""
    from sim.federation import simulate
    from strategies.ledger import Recorder
    from strategies.server_app import make_strategy

    config = session.config
    recorder = Recorder("diredi")
    extra = {ATTACK: attack, HOSTILE: ",".join(map(str, hostile)), SLEEP: timeout_s + 20.0,
             CLAIMED: claimed_class(session, hostile)}
    finished, strategies = [], []

    def server_main(grid, _context):
        strategy = make_strategy("diredi", session, recorder)
        strategies.append(strategy)
        strategy.start(grid=grid, num_rounds=config.rounds, timeout=timeout_s,
                       train_config=ConfigRecord({**config.to_record(), **extra}))
        finished.append(True)

    start = time.perf_counter()
    try:  # a sleeping client holds an actor: give the others actors of their own
        simulate(config, server_main, client_app=app, client_cpus=0.5 if attack == "timeout" else 1.0)
    except RuntimeError as err:
        print(f"{attack}: the run failed: {err}", flush=True)
    noise = (operating_point_noise(strategies[0], recorder.tutor_history, config.seed)
             if choice_noise and strategies else {})
    return {"recorder": recorder, "finished": bool(finished), "seconds": time.perf_counter() - start,
            "deployed": deployed_predictions(strategies[0]) if strategies else ([], []), "choice_noise": noise}


def operating_point_noise(strategy, history: list[dict], seed: int) -> dict[str, dict]:
    """Per class the server calibrates, how far its recall at the operating threshold moves with the choice of
    the tutor's operating point alone (``strategies.calibrate.offset_choice_noise``): the last round's choice
    replayed on bootstrap resamples of the validation images, over the offsets within ``CHOICE_STEPS`` fine
    steps of the chosen one. Empty when the server does not calibrate (its operating point is not chosen)."""
    from strategies.calibrate import FINE_STEP, calibrated_classes, offset_choice_noise

    if strategy.calibrate == "off":
        return {}
    policy, validator = strategy.policy, strategy.validator
    classes = calibrated_classes(strategy.calibrate, validator.classes,
                                 (*policy.kept_classes, *policy.protected_classes))
    last = next((h["calibration"] for h in reversed(history) if "calibration" in h), {})
    offsets = {c: float(strategy.offsets.get(c, 0.0)) for c in classes}  # f1-offsets; else moved in the weights
    counts: dict[str, dict[float, tuple]] = {c: {} for c in classes}
    for step in range(-CHOICE_STEPS, CHOICE_STEPS + 1):
        found = validator.shifted_counts({c: offsets[c] + step * FINE_STEP for c in classes})
        for c in classes:
            counts[c][step * FINE_STEP] = found[c]
    start = {c: -float(last.get("shift", {}).get(c, 0.0)) for c in classes}  # relative to the chosen offset
    return offset_choice_noise(counts, start, policy.bootstrap_samples, seed)


def deployed_predictions(strategy) -> tuple[list[dict], list[dict]]:
    """The strategy's tutor as deployed (its weights and, with f1-offsets, its score offsets): its detections of
    the validation images, and their ground truth."""
    predictions = strategy.validator.deployed(strategy.offsets)[1]
    return predictions, strategy.validator.targets


def hostile_only_classes(session, hostile: list[int]) -> list[str]:
    """The classes only the hostile clients hold: nothing honest teaches them, and the scenario does not
    presume them."""
    specs = session.client_specs()
    honest = {c for s in specs if s["client"] not in hostile for c in s["private"]}
    theirs = {c for s in specs if s["client"] in hostile for c in s["private"]}
    return sorted(theirs - honest - set(session.workspace.scenario.presumed_classes))


def class_tolerances(ap_noise: dict[str, float], recall_noise: dict[str, float], protected: tuple[str, ...],
                     protected_floor: float, z: float, choice_noise: dict[str, float] | None = None
                     ) -> dict[str, dict[str, float]]:
    """Per class, the loss allowed in AP and in recall at the operating threshold (fractions): ``z`` x the
    loss's paired bootstrap std on the validation images (what the same tutor's figure moves by chance),
    at least ``protected_floor`` for a protected class's AP (the protected gate's own tolerance). With
    ``choice_noise`` (per class, the reference's operating-point noise, ``operating_point_noise``) the recall's
    std is the two together, sqrt(paired^2 + choice^2): the deployed recall also moves with the calibration's
    choice, which the paired resampling of one pair of tutors does not see."""
    choice = choice_noise or {}
    return {c: {"ap": max(protected_floor if c in protected else 0.0, z * ap_noise[c]),
                "recall": z * math.hypot(recall_noise.get(c, math.nan), choice.get(c, 0.0))} for c in ap_noise}


def judged(table: dict[str, dict], choice_noise: dict[str, dict[str, dict]], policy) -> dict[str, dict]:
    """``table`` (per class: "loss", "noise" and "reference" per figure; ``class_losses``) with each class's
    tolerance (``class_tolerances``) counting the operating-point noise of the reference its recall loss is
    measured against (``choice_noise``: reference name -> ``operating_point_noise``; none for "before", whose
    operating point was not chosen in the run), and its "strict_tolerance", the paired noise alone."""
    choice = {c: float(choice_noise.get(f["reference"]["recall"], {}).get(c, {}).get("std", 0.0)) for c, f in table.items()}
    choice = {c: v if math.isfinite(v) else 0.0 for c, v in choice.items()}
    ap, recall = ({c: f["noise"][k] for c, f in table.items()} for k in ("ap", "recall"))
    settings = (policy.protected_classes, policy.protected_tolerance, policy.noise_z)
    tolerance, strict = class_tolerances(ap, recall, *settings, choice), class_tolerances(ap, recall, *settings)
    return {c: {**f, "noise": {**f["noise"], "operating_point": choice[c]}, "tolerance": tolerance[c],
                "strict_tolerance": strict[c]} for c, f in table.items()}


def verdicts(kept_out: bool, classes: dict[str, dict]) -> dict:
    """``attack_verdict`` against the tolerance that counts the operating point's noise, and beside it
    ("strict_verdict", "strict_beyond") against the paired noise alone."""
    loss = {c: f["loss"] for c, f in classes.items()}
    strict = attack_verdict(kept_out, loss, {c: f["strict_tolerance"] for c, f in classes.items()})
    return {**attack_verdict(kept_out, loss, {c: f["tolerance"] for c, f in classes.items()}),
            "strict_verdict": strict["verdict"], "strict_beyond": strict["beyond_tolerance"]}


def attack_verdict(kept_out: bool, loss: dict[str, dict[str, float]], tolerance: dict[str, dict[str, float]]
                   ) -> dict:
    """"kept out" when every hostile delta was rejected; else "bounded" when no class lost more than its
    tolerance in any figure (a NaN figure, a class without validation objects, is not judged), else "gets
    through", with the classes and figures beyond."""
    beyond = sorted(f"{c} {figure}" for c, figures in loss.items() for figure, value in figures.items()
                    if value > tolerance[c][figure])
    verdict = "kept out" if kept_out else ("gets through" if beyond else "bounded")
    return {"verdict": verdict, "beyond_tolerance": beyond}


def losses_against(predictions: list[dict], reference: list[dict], targets: list[dict], classes: list[str],
                   threshold: float, samples: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per class, what the tutor whose detections are ``predictions`` lost against ``reference``'s (AP, and recall
    at ``threshold``; positive: lost), and each loss's paired bootstrap std on the validation images."""
    from evaluation.ap import ap_by_name, bootstrap_ap_drop, bootstrap_recall_drop, recall_at

    ids = [CLASS_INDEX[c] for c in classes]
    ap_ref, ap_att = ap_by_name(reference, targets, classes)[0], ap_by_name(predictions, targets, classes)[0]
    rec_ref, rec_att = (recall_at(p, targets, ids, threshold) for p in (reference, predictions))
    ap_std = bootstrap_ap_drop(reference, predictions, targets, ids, samples=samples, seed=seed)
    rec_std = bootstrap_recall_drop(reference, predictions, targets, ids, threshold, samples=samples, seed=seed)
    return {c: {"loss": {"ap": ap_ref[c] - ap_att[c], "recall": rec_ref[i] - rec_att[i]},
                "noise": {"ap": ap_std[i], "recall": rec_std[i]}} for c, i in zip(classes, ids)}


def lesser_loss(tables: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict]]:
    """Per class and figure, the smallest loss over the references (``tables``: reference name -> ``losses_against``'s
    table), with its noise and the reference's name: an attack is judged against the worst outcome it may
    legitimately cause (the honest clients alone, or all eight honest)."""
    out: dict[str, dict[str, dict]] = {}
    for name, table in tables.items():
        for c, figures in table.items():
            for figure, loss in figures["loss"].items():
                best = out.setdefault(c, {"loss": {}, "noise": {}, "reference": {}})
                if figure not in best["loss"] or loss < best["loss"][figure]:
                    best["loss"][figure], best["noise"][figure] = loss, figures["noise"][figure]
                    best["reference"][figure] = name
    return out


def class_losses(predictions: list[dict], references: dict[str, list[dict]], own: list[str], before: list[dict],
                 targets: list[dict], classes: list[str], policy, seed: int,
                 choice_noise: dict[str, dict[str, dict]] | None = None) -> dict:
    """Per validation class, what the attack's deployed tutor (``predictions``) lost, AP and recall at the operating
    threshold, with each loss's bootstrap std and tolerance (``judged``): against the lesser of the
    ``references`` (the all-honest run's tutor, the one with the hostile deltas kept out), and for the classes
    only the hostile clients hold (``own``) against the tutor ``before`` the run."""
    settings = (policy.operating_threshold, policy.bootstrap_samples, seed)
    others = [c for c in classes if c not in own]
    table = lesser_loss({name: losses_against(predictions, reference, targets, others, *settings)
                         for name, reference in references.items()})
    if own:
        table.update({c: {**f, "reference": {"ap": "before", "recall": "before"}}
                      for c, f in losses_against(predictions, before, targets, own, *settings).items()})
    return judged({c: table[c] for c in classes}, choice_noise or {}, policy)


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


def tutor_figures(history: list[dict]) -> dict:
    """The tutor's per-class validation AP and recall at the operating threshold, before and after the run."""
    if not history:
        return {}
    return {"ap_before": history[0]["ap"], "ap_after": history[-1]["ap"],
            "recall_before": history[0].get("recall", {}), "recall_after": history[-1].get("recall", {}),
            "f1_before": history[0].get("f1", {}), "f1_after": history[-1].get("f1", {})}


def class_loss(tutor: dict, honest_tutor: dict) -> dict:
    """Per class, what the attack cost the tutor beside the all-honest run (positive: lost): AP, and recall and
    F1 at the operating threshold after the run, and the largest of each with its class."""
    out = {}
    for figure in ("ap", "recall", "f1"):
        after, honest_after = tutor.get(f"{figure}_after", {}), honest_tutor.get(f"{figure}_after", {})
        loss = {c: honest_after[c] - after[c] for c in honest_after
                if c in after and math.isfinite(honest_after[c]) and math.isfinite(after[c])}
        worst = max(loss, key=loss.get) if loss else ""
        out[figure] = loss
        out[f"worst_{figure}"] = {"class": worst, "loss": loss.get(worst, math.nan)}
    return out


def honest_rejected(recorder, hostile: list[int]) -> list[dict]:
    """Every honest delta a run rejected: client, round and the gate's reason."""
    return [{"client": d.client, "round": d.round, "reason": d.reason}
            for d in recorder.decisions if d.client not in hostile and not d.accepted]


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
    # per delta as well as per client: a client "rejected" was rejected in every round; a missing reply counts as
    # a delta kept out
    sent = session.config.rounds * len(hostile)
    accepted_hostile_deltas = sum(1 for d in recorder.decisions if d.accepted and d.client in hostile)
    return {"rejected": sum(1 for c in hostile if c not in accepted), "hostile": len(hostile),
            "hostile_deltas": sent, "hostile_deltas_rejected": sent - accepted_hostile_deltas,
            "honest_accepted": sum(1 for c in honest_clients if c in accepted), "honest": len(honest_clients),
            # per delta: a client accepted in round 1 and rejected in round 2 counts as accepted above
            "honest_deltas": sum(1 for d in recorder.decisions if d.client not in hostile),
            "honest_deltas_rejected": honest_rejected(recorder, hostile),
            "protected_ap_drop": drop, "honest_gain": gain,
            "honest_gain_ratio": gain / baseline_gain if baseline_gain else math.nan,
            "finished": run["finished"], "seconds": run["seconds"],
            "reasons": {d.client: d.reason for d in recorder.decisions if d.client in hostile},  # the last round's
            "hostile_decisions": [{"client": d.client, "round": d.round, "accepted": d.accepted, "reason": d.reason}
                                  for d in recorder.decisions if d.client in hostile],
            # every delta's cosine with its direction reference (the peers' median), hostile and honest: how far the
            # direction gate's chance threshold sits below each
            "cosine": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "cosine": d.cosine}
                       for d in recorder.decisions],
            "operating_point": {d.client: operating_figures(d) for d in recorder.decisions},
            "tutor_recall": history[-1].get("recall", {}) if history else {},
            "tutor": tutor_figures(history),
            "claims": {d.client: d.claims for d in recorder.decisions if d.claims},
            # every claim the dilution check left out, every round (``claims`` keeps the last round's verdicts)
            "diluting": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "class": c,
                          "verdict": v} for d in recorder.decisions for c, v in (d.claims or {}).items()
                         if "dilutes" in v],
            "weights_used": {d.client: d.weight_used for d in recorder.decisions if d.client in hostile},
            # every round's rows scaled down by the per-row bound, hostile and honest alike
            "row_clip": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "factors": d.row_clip}
                         for d in recorder.decisions if d.row_clip],
            "row_share": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "shares": d.row_share}
                          for d in recorder.decisions if d.row_share],
            # every accepted delta's class rows as sent, for the classes it is merged into (the row bound's inputs)
            "row_norm": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "norms": d.row_norm}
                         for d in recorder.decisions if d.row_norm],
            # every accepted delta the round-relative clip scaled down (its whole delta, its own classes' rows too)
            "clip": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "factor": d.clip_factor}
                     for d in recorder.decisions if d.accepted and d.clip_factor < 1],
            # every claim's row, on its own, against the tutor's top scores of its class (strategies.verify.row_score_shift)
            "claim_shift": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "claims": d.claims,
                             "positive": d.claim_shift, "negative": d.claim_shift_negative}
                            for d in recorder.decisions if d.claim_shift],
            # the harm gate's figures: each delta's leave-one-out harm to the merge's recall and the round's threshold
            "harm": [{"client": d.client, "round": d.round, "hostile": d.client in hostile, "accepted": d.accepted,
                      "harm": d.harm, "threshold": d.harm_threshold} for d in recorder.decisions if d.harm],
            # the server's calibration after each merge (--calibrate f1): the bias shifts it made and the F1s
            "calibration": [{"round": h["round"], **h["calibration"]} for h in history if "calibration" in h],
            # per round and class: the merged row's size, the mean size of the rows it averages (counted whole) and
            # the plain weighted mean's size (below the mean size by what dilution and the rows' disagreement cost)
            "merged_rows": [{"round": h["round"], "rows": h["merged_rows"]} for h in history if "merged_rows" in h],
            "failures": [f["reason"][:200] for f in recorder.failures]}


def largest_loss(classes: dict, figure: str) -> str:
    """The class that lost most in ``figure`` ("ap" or "recall"), as "class loss / tolerance" in points."""
    judged = {c: f for c, f in classes.items() if math.isfinite(f["loss"][figure])}
    if not judged:
        return "-"
    c = max(judged, key=lambda k: judged[k]["loss"][figure])
    return f"{c} {100 * judged[c]['loss'][figure]:.1f} / {100 * judged[c]['tolerance'][figure]:.1f}"


def f1_beside(out: dict, attack: dict, c: str) -> float:
    """How class ``c``'s F1 at the operating threshold moved (points; positive: up) against the reference its
    recall loss was judged against: a recall lost with F1 held is the calibration trading recall for precision
    along the class's curve, one lost with F1 is a class the tutor detects worse (NaN: not recorded)."""
    reference = attack.get("classes", {}).get(c, {}).get("reference", {}).get("recall")
    after = attack.get("tutor", {}).get("f1_after", {}).get(c, math.nan)
    if reference == "before":
        then = attack.get("tutor", {}).get("f1_before", {}).get(c, math.nan)
    else:  # a reference run's summary sits under its name ("all honest" -> "all_honest")
        then = out.get(str(reference).replace(" ", "_"), {}).get("tutor", {}).get("f1_after", {}).get(c, math.nan)
    return 100 * (after - then)


def beyond_text(out: dict, attack: dict) -> str:
    """What got through, each recall loss with its class's F1 move beside it ("car recall, F1 +0.9")."""
    items = []
    for item in attack["beyond_tolerance"]:
        c, _, figure = item.partition(" ")
        move = f1_beside(out, attack, c) if figure == "recall" else math.nan
        items.append(item + (f", F1 {move:+.1f}" if math.isfinite(move) else ""))
    return "; ".join(items)


def verdict_table(out: dict) -> str:
    """The benchmark's verdicts as a markdown table: per attack, what was kept out and, per figure, the class
    closest to (or furthest beyond) its tolerance."""
    lines = [f"`{out['command']}`", "",
             f"all honest: clients' gain {out['all_honest']['gain_of_the_honest_clients']:.1f}; "
             f"hostile kept out: honest gain ratio {out['hostile_kept_out']['honest_gain_ratio']:.2f}; "
             f"honest deltas rejected: all honest {honest_rejections(out['all_honest'])}, "
             f"hostile kept out {honest_rejections(out['hostile_kept_out'])}; "
             f"classes only the hostile clients hold (judged against the tutor before the run): "
             f"{', '.join(out['hostile_only_classes']) or 'none'}", "",
             "| attack | verdict | hostile rejected: clients (every round) / deltas | honest accepted: clients / "
             "deltas | "
             "honest gain ratio | AP: class loss / tolerance (points) | recall at the threshold: class loss / tolerance "
             "| strict verdict (recall's paired noise alone) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, a in out["attacks"].items():
        verdict = a["verdict"] + (f" ({beyond_text(out, a)})" if a["beyond_tolerance"] else "")
        deltas = (f" / {a['hostile_deltas_rejected']}/{a['hostile_deltas']}" if "hostile_deltas" in a else "")
        lines.append(f"| {name} | {verdict} | {a['rejected']}/{a['hostile']}{deltas} | "
                     f"{a['honest_accepted']}/{a['honest']}{honest_deltas(a)} | "
                     f"{a['honest_gain_ratio']:.2f} | {largest_loss(a['classes'], 'ap')} | "
                     f"{largest_loss(a['classes'], 'recall')} | {strict_text(a)} |")
    return "\n".join(lines) + "\n"


def strict_text(attack: dict) -> str:
    """The verdict against the paired noise alone, with what it finds beyond ("-" in files judged before it)."""
    if "strict_verdict" not in attack:
        return "-"
    beyond = attack.get("strict_beyond", [])
    return attack["strict_verdict"] + (f" ({'; '.join(beyond)})" if beyond else "")


def honest_deltas(summary: dict) -> str:
    """" / accepted/sent" honest deltas of a run's summary ("" for summaries written before they were counted)."""
    if "honest_deltas" not in summary:
        return ""
    sent = summary["honest_deltas"]
    return f" / {sent - len(summary['honest_deltas_rejected'])}/{sent}"


def honest_rejections(summary: dict) -> str:
    """The honest deltas a run rejected, as "none" or "client c round r (reason), ..." ("?" for older summaries)."""
    if "honest_deltas_rejected" not in summary:
        return "?"
    return ", ".join(f"client {r['client']} round {r['round']} ({r['reason']})"
                     for r in summary["honest_deltas_rejected"]) or "none"


def hostile_problem(hostile: list[int], num_clients: int) -> str:
    """Why ``--hostile`` cannot be run with ``num_clients`` clients ("" when it can)."""
    outside = sorted({c for c in hostile if not 0 <= c < num_clients})
    if outside:
        return f"--hostile {' '.join(map(str, outside))}: partition ids run from 0 to {num_clients - 1}"
    if len(set(hostile)) != len(hostile):
        return "--hostile names a client twice"
    if len(set(hostile)) >= num_clients:
        return f"--hostile names all {num_clients} clients: the benchmark measures what honest clients keep"
    return ""


def chain_record(session) -> dict:
    """The manufacturer's weights the bench ran on (fingerprints) and the CPU that ran it: the same seed builds
    another chain on another CPU model, and the reference runs differ with it."""
    from models.compute import cpu_model
    from models.io import state_fingerprint

    return {**{role: state_fingerprint(getattr(session.chain, role).state_dict())
               for role in CHAIN_ROLES}, "cpu": cpu_model()}


def as_json(value) -> str:
    """A value as the bench file writes it (tuples as lists, NaN as NaN): what is compared with the file's."""
    return json.dumps(value, sort_keys=True, default=str)


def resume_problem(earlier: dict, config: dict, hostile: list[int]) -> str:
    """Why a bench file cannot be continued with these settings ("": it can): its attacks were judged
    against reference runs of its own settings and hostile clients."""
    if "attacks" not in earlier or "config" not in earlier:
        return "is not a bench file (no attacks or config)"
    if earlier.get("hostile_clients") != hostile:
        return f"has hostile clients {earlier.get('hostile_clients')}, not {hostile}: write to another --out"
    # where the cache lives changes no figure (the chain is checked by its fingerprints)
    differ = sorted(k for k in set(config) | set(earlier["config"])
                    if k != "cache_dir" and as_json(config.get(k)) != as_json(earlier["config"].get(k)))
    if differ:
        return f"was run with other settings ({', '.join(differ)}): write to another --out"
    return ""


def references_problem(earlier: dict, now: dict) -> str:
    """Why this invocation's reference runs do not stand for the file's ("": they match): the attacks it holds
    were judged against its own all-honest and kept-out tutors, so the new ones must be judged against the same."""
    for name in ("all_honest", "hostile_kept_out"):
        if as_json(now[name]["tutor"]) != as_json(earlier.get(name, {}).get("tutor")):
            return f"holds another {name.replace('_', ' ')} tutor than this machine's run (other arithmetic)"
    return ""


def write_bench(out: dict, path: Path) -> None:
    """The bench file and its verdict table beside it (``.md``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str))
    path.with_suffix(".md").write_text(verdict_table(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.byzantine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", type=checked_attack, default=list(ATTACKS),
                        help=f"attacks, each a name ({', '.join(ATTACKS)}) or family:strength for "
                             f"{', '.join(STRENGTHS)}")
    parser.add_argument("--hostile", type=int, nargs="+", default=[0, 1], help="partition ids of the hostile clients")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a round trip waits for replies")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--scenario", default=RunConfig().scenario,
                        help="scenario name in data/scenarios/ or a YAML path (default: the run's, %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/byzantine.json"))
    parser.add_argument("--resume", action="store_true",
                        help="go on with --out: its attacks are kept and skipped, the reference runs are made again "
                             "and must match its own (the same settings, chain and machine's arithmetic)")
    parser.add_argument("--operating-tolerance", type=float, default=math.inf,
                        help="the verification's operating-point gate (inf: recorded only, the default)")
    parser.add_argument("--operating-harm", type=float, default=math.inf,
                        help="the harm gate's floor: a delta's leave-one-out cost to a class's recall in the merge "
                             "(inf: off, the default)")
    # the merge's claim rule, bounds and calibration: the run's settings, with their defaults and help
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for name in MERGE_SETTINGS:
        f, default = fields[name], getattr(RunConfig(), name)
        kind = {"choices": choices_of(f)} if choices_of(f) else {"type": float}
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument(f"--{name.replace('_', '-')}", default=default, **kind,
                            help=f"{f.metadata['help']} (default: the run's, {shown})")
    args = parser.parse_args(argv)
    from protocol.config import NO_SPREAD, ConfigError, resolve_run_config
    from session.workspace import Session

    torch.set_num_threads(1)  # the server's work is small; leave the cores to the clients
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        parser.error(f"--timeout must be a finite number of seconds > 0, got {args.timeout:g}")
    settings = {"profile": args.profile, "scenario": args.scenario, "rounds": args.rounds, "operating-tolerance": args.operating_tolerance,
                "operating-harm": args.operating_harm, **NO_SPREAD,  # as measured; spread never touches a delta
                **{name.replace("_", "-"): getattr(args, name) for name in MERGE_SETTINGS}}
    try:
        config = replace(resolve_run_config(settings), timeout_s=args.timeout)
    except ConfigError as err:
        parser.error(str(err))
    problem = hostile_problem(args.hostile, config.num_clients)
    if problem:
        parser.error(problem)
    earlier = None
    if args.resume:
        try:
            earlier = json.loads(args.out.read_text()) if args.out.exists() else None
        except (OSError, ValueError) as err:
            parser.error(f"--resume: {args.out} cannot be read ({err})")
        problem = resume_problem(earlier, config.to_dict(), args.hostile) if earlier else ""
        if problem:
            parser.error(f"--resume: {args.out} {problem}")
    session = Session.open(config)
    chain = chain_record(session)
    if earlier and {role: earlier.get("chain", {}).get(role) for role in CHAIN_ROLES} != {
            role: chain[role] for role in CHAIN_ROLES}:
        parser.error(f"--resume: {args.out} was measured on another chain ({earlier.get('chain')}; this machine "
                     f"builds {chain}): write to another --out")
    honest_clients = [c for c in range(config.num_clients) if c not in args.hostile]
    from strategies.ledger import Recorder
    from strategies.server_app import default_policy, make_strategy

    policy = default_policy(session)
    start = make_strategy("diredi", session, Recorder("diredi"))
    before, _ = deployed_predictions(start)  # the tutor before the run
    classes = list(start.validator.classes)
    del start
    base = run_attack(session, "none", args.hostile, args.timeout, choice_noise=True)
    own = hostile_only_classes(session, args.hostile)
    # the outcomes an attack may legitimately cause: all eight honest, or the hostile deltas kept out (rejected NaN)
    kept_out = run_attack(session, "nan", args.hostile, args.timeout, choice_noise=True)
    targets = base["deployed"][1]
    references = {"all honest": base["deployed"][0], "hostile kept out": kept_out["deployed"][0]}
    choice_noise = {"all honest": base["choice_noise"], "hostile kept out": kept_out["choice_noise"]}
    base_gain = honest_gains(session, base["recorder"].records, honest_clients)  # the same clients, all honest
    if base["recorder"].failures:  # every attack is judged against this run: one that lost clients misleads
        print(f"WARNING: the all-honest run lost {len(base['recorder'].failures)} client replies "
              f"({base['recorder'].failures[0]['reason']}); a larger --timeout or a quieter machine", flush=True)
    for name, run in (("all honest", base), ("hostile kept out", kept_out)):
        rejected = honest_rejected(run["recorder"], [] if run is base else args.hostile)
        if rejected:  # every attack is judged against these runs: say when they lost an honest delta
            print(f"{name}: honest deltas rejected: {honest_rejections({'honest_deltas_rejected': rejected})}",
                  flush=True)
    command = "python -m bench.byzantine " + " ".join(argv if argv is not None else sys.argv[1:])
    out = {"command": command, "config": config.to_dict(), "hostile_clients": args.hostile, "chain": chain,
           "claimed_class": claimed_class(session, args.hostile), "hostile_only_classes": own,
           "all_honest": {**summarise(session, base, [], None), "gain_of_the_honest_clients": base_gain,
                          "operating_noise": base["choice_noise"]},
           "hostile_kept_out": {**summarise(session, kept_out, args.hostile, base_gain),
                                "operating_noise": kept_out["choice_noise"]}, "attacks": {}}
    if earlier:
        problem = references_problem(earlier, out)
        if problem:
            print(f"--resume: {args.out} {problem}: nothing written", flush=True)
            return 2
        out = {**earlier, "resumed": [*earlier.get("resumed", []), command]}
        for name, run in (("all_honest", base), ("hostile_kept_out", kept_out)):  # the same tutors (checked above)
            out[name] = {**out[name], "operating_noise": run["choice_noise"]}
        for a in out["attacks"].values():  # judged again against the tolerance this code counts
            if a.get("classes"):
                a["classes"] = judged(a["classes"], choice_noise, policy)
                a.update(verdicts(a["rejected"] == a["hostile"], a["classes"]))
        write_bench(out, args.out)
        print("--resume: judged again: " + "; ".join(
            f"{name} {a['verdict']} (strict: {a.get('strict_verdict', a['verdict'])})"
            for name, a in out["attacks"].items()), flush=True)
        done = [a for a in args.attacks if a in out["attacks"]]
        if done:
            print(f"--resume: already measured in {args.out}, skipped: {' '.join(done)}", flush=True)
    for attack in (a for a in args.attacks if a not in out["attacks"]):
        run = kept_out if attack == "nan" else run_attack(session, attack, args.hostile, args.timeout)
        out["attacks"][attack] = a = summarise(session, run, args.hostile, base_gain)
        a["class_loss"] = class_loss(a["tutor"], out["all_honest"]["tutor"])
        a["classes"] = (class_losses(run["deployed"][0], references, own, before, targets, classes, policy,
                                     config.seed, choice_noise) if run["finished"] else {})
        a.update(verdicts(a["rejected"] == a["hostile"], a["classes"]))
        write_bench(out, args.out)
        print(f"{attack}: {a['verdict']} {beyond_text(out, a)}; hostile rejected {a['rejected']}/{a['hostile']}, honest accepted "
              f"{a['honest_accepted']}/{a['honest']} clients{honest_deltas(a)} deltas, protected drop {a['protected_ap_drop']:.2f}, "
              f"honest gain ratio {a['honest_gain_ratio']:.2f}, worst AP loss {a['class_loss']['worst_ap']}, "
              f"worst recall loss {a['class_loss']['worst_recall']}, worst F1 loss {a['class_loss']['worst_f1']}, "
              f"finished {a['finished']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
