"""The run configuration: one frozen record of everything that decides a run's numbers.

Both entry points resolve it with the same function and then do the same work:

    python -m sim.run --clients 8 ...          ->  resolve_run_config({"num-clients": 8, ...})
    flwr run . --run-config "num-clients=8"    ->  resolve_run_config(context.run_config)

``resolve_run_config`` checks every value (``ConfigError`` names the key), fills what is left at
0 / "" from the profile (``models.ladder.PROFILES``, the one place per-profile values live) and
makes paths absolute. Every message to a client carries ``config.to_record()``; the client reads
it back with ``RunConfig.from_record`` and rebuilds its data and settings from it. The keys are the
field names with "-" for "_", the same in ``pyproject.toml``'s ``[tool.flwr.app.config]``. Each field
is declared with ``setting``: its default, --help section, help line and choices, from which
``sim.run`` builds its flags. config.json lists every field; ``RunConfig.completed`` reads a field an
older run folder lacks as its default (each field added later defaults to what runs did before it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

# Every method, in the order of every table and plot. fedavgm / fedadam: Flower's FedAvgM (server
# momentum) and FedAdam; fedavg_ls: FedAvg whose clients train only the class scores their labels hold
# (label-skew aware); fedavg_ft: FedAvg's global edge fine-tuned on each client's data before it is
# evaluated (personalised FedAvg, "FedAvg+FT").
# (The FedAvg family first: a study run in parts finishes the methods its verdicts compare first.)
METHODS = ("diredi", "fedavg", "fedavg_ls", "fedavg_ft", "fedprox", "fedavgm", "fedadam", "local", "oracle")
DEFAULT_METHODS = ("diredi", "fedavg", "fedprox", "local", "oracle")  # sim.run's default: about 10 minutes warm
FEDERATED = ("diredi", "fedavg", "fedavg_ls", "fedavg_ft", "fedprox", "fedavgm", "fedadam")  # run on Flower
DIRECT_FEDERATED = FEDERATED[1:]  # the federated methods whose clients train the edge on their labels
TUTOR1_MODES = ("shared", "per-client")
AGGREGATION_METHODS = ("weighted", "trimmed", "ties", "krum", "class_aware")  # strategies.aggregate.aggregate
REDISTILL_SIDES = ("client", "server")
DELTA_PRECISIONS = ("float16", "float32")  # how a client's delta travels (the server reads either)
DIRECTION_REFERENCES = ("peers", "server")  # the direction gate's reference (strategies.verify)
DIRECTION_SCOPES = ("all", "shared")  # the tensors the direction gate compares (strategies.verify.direction_tensors)
BODY_CACHES = ("round", "run")  # how long a client keeps the tutor body's outputs (distill.body_memo)
EDGE_CHECKS = ("off", "on")  # the manufacturer's check of each re-distilled edge before it is deployed
SPREAD_MODES = ("off", "on")  # the server's edge, distilled from the updated tutor, as Distill C's start
SPREAD_ROWS = ("distilled", "server")  # with spread, where other clients' classes' rows come from after Distill C
SPREAD_SCORES = ("kept", "others")  # with spread, which classes' tutor scores are Distill C's soft targets
REDISTILL_LR_SCHEDULES = ("constant", "inverse-sqrt")  # distill.rd.distill_c_lr
SPREAD_AVERAGES = ("deployed", "server")  # with spread, the edge a client's re-distilled edge is averaged with
SPREAD_OWN_ROWS = ("server", "own")  # with spread, where Distill C's rows of the client's own new classes start
# With spread, the server's distillation steps per round into its edge as a multiple of a client's Distill C
# steps (--spread-iters 0): four times gave every figure better than once over three replicates and on
# heldout8 (README "The server's own distillation steps")
SPREAD_STEPS_PER_DISTILL_C = 4
# A DiReDi client deploys this share of its re-distilled edge (--edge-average 0, the default, with client
# re-distillation): README "All three together"
CLIENT_EDGE_AVERAGE = 0.5
# Distill C as the paper's (the profile's lr, no soft targets, the re-distilled edge deployed whole): the
# defaults until "All three together"; experiments whose results were measured so pin it (run-config keys)
PAPER_DISTILL_C = {"redistill-lr": 0.0, "redistill-score-weight": 0.0, "edge-average": 1.0}
# Without spread: the default until README "Spread at four times the steps against no spread"; experiments
# whose results were measured so pin it, as they pin PAPER_DISTILL_C
NO_SPREAD = {"spread": "off"}
# The merge before earned claims and the round-relative bounds became defaults (README "Earned claims and the
# round-relative bounds by default"): claims trusted, no clip relative to the round, no bound per class row
TRUSTED_MERGE = {"claims": "trusted", "clip-multiple": math.inf, "row-multiple": math.inf}
# What a run did before these settings existed or had today's defaults: config.json files written then
# lack the field, and read as this value (``RunConfig.completed``)
BEFORE_CHANGED = {**{key.replace("-", "_"): value for key, value in PAPER_DISTILL_C.items()},
                  **NO_SPREAD, "spread_rows": "distilled",
                  **{key.replace("-", "_"): "inf" if value == math.inf else value  # as config.json writes it
                     for key, value in TRUSTED_MERGE.items()},
                  "calibrate": "off", "protected_scope": "delta", "row_bound": "norm", "clip_share": "whole",
                  "row_reference": "row", "row_share": "whole", "row_size": "mean", "dilution_check": "off",
                  "calibrate_reach": 3.0, "direction_scope": "all"}
CLAIM_RULES = ("trusted", "earned", "improving", "lifting")  # how the class-aware merge takes a client's trained classes (strategies.verify)
PROTECTED_SCOPES = ("delta", "merge")  # where the protected gate judges a delta (strategies.merge_gates.protected_appeal)
ROW_BOUNDS = ("norm", "influence")  # what the per-class row bound compares (strategies.aggregate.clip_class_rows)
ROW_REFERENCES = ("row", "row-or-round", "row-or-kind")  # what sets the per-class row bound (strategies.aggregate.clip_class_rows)
CLIP_SHARES = ("whole", "scaled", "sized")  # how a clipped delta counts in the merge's means (strategies.aggregate.bound_influence)
ROW_SHARES = ("whole", "scaled")  # how a tiny class row counts in its row's mean (strategies.aggregate.row_shares)
ROW_SIZES = ("mean", "learned")  # the size of a merged class row (strategies.aggregate.restore_row_sizes)
DILUTION_CHECKS = ("off", "on")  # a learned class's holding claimers tested by leaving each out (strategies.verify.diluting_claimer)
CALIBRATIONS = ("off", "f1", "f1-learnt", "f1-offsets")  # the tutor's operating point after a merge (strategies.calibrate)


def evaluation_round(server_round: int, rounds: int, every: int) -> bool:
    """Whether round ``server_round`` of ``rounds`` ends with an evaluation on the clients' test shards:
    every ``every``-th round and always the last (so a run's final figures never depend on ``every``)."""
    return every <= 1 or server_round % every == 0 or server_round >= rounds


class ConfigError(ValueError):
    """A setting that cannot be used; ``key`` is its run-config key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


# --help's sections, by concern, in this order; every field names one (``setting``'s ``group``).
RUN, DATA, EVALUATION, OUTPUT = "the run", "data", "evaluation", "output, cache and resume"
CLIENTS, VERIFICATION, MERGE = "DiReDi's clients (RD and Distill C)", "DiReDi's verification", "DiReDi's merge"
BASELINES, COMPUTE, PRIVACY = "the baselines", "compute", "differential privacy on client deltas"
GROUPS = (RUN, DATA, EVALUATION, OUTPUT, CLIENTS, VERIFICATION, MERGE, BASELINES, COMPUTE, PRIVACY)


def _profiles() -> tuple[str, ...]:
    from models.ladder import PROFILES  # imported late: it loads torch, and this module must not

    return tuple(PROFILES)


def _precisions() -> tuple[str, ...]:
    from models.compute import PRECISIONS

    return PRECISIONS


def _layouts() -> tuple[str, ...]:
    from models.compute import LAYOUTS

    return LAYOUTS


def setting(default: Any, group: str, help: str, choices: tuple[str, ...] | Any = None) -> Any:
    """A ``RunConfig`` field with what the CLI shows for it (``sim.run`` builds its flags from these):
    its --help section, its help line (the default is added there) and, for a closed set of values,
    the choices (a tuple, or a function returning one where the set lives in a module that loads torch)."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "choices": choices})


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """The values a field may take, or None where any value of its type may be checked otherwise."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


@dataclass(frozen=True)
class RunConfig:
    profile: str = setting("cpu", RUN, "model sizes, image size and step budgets (models.ladder.PROFILES)",
                           _profiles)
    scenario: str = setting("default8", DATA, "scenario name in data/scenarios/ or a YAML path")
    data: str = setting("synth", DATA, "synth (generated, VOC layout) | voc (read from --voc-root)", ("synth", "voc"))
    voc_root: str = setting("", DATA, "VOCdevkit or VOC20xx folder (with --data voc)")
    num_clients: int = setting(8, RUN, "number of clients (under `flwr run`, 0: as many as the federation has nodes)")
    fraction: float = setting(1.0, RUN, "share of the clients sampled each round by every federated method, seeded")
    # 2: the warm default run (5 methods, 8 clients, cpu profile) in about 10 minutes on 2 cores
    rounds: int = setting(2, RUN, "federated rounds")
    # rounds between evaluations have records without AP (costs only); ``evaluates_after``
    eval_every: int = setting(1, EVALUATION, "clients evaluate their edge after every k-th round and after the "
                                             "last; the rounds between record costs only (1: every round)")
    methods: tuple[str, ...] = setting(DEFAULT_METHODS, RUN, f"comma-separated subset of {','.join(METHODS)}")
    seed: int = setting(0, RUN, "the data: shards and the manufacturer chain (and, with replicate 0, the "
                                "training seeds)")
    # never the data, shards or manufacturer chain (``training_seed``)
    replicate: int = setting(0, RUN, "a study's replicate: other training seeds, data order and client sampling "
                                     "on the same data, shards and chain (0: the training seeds are --seed)")
    device: str = setting("auto", COMPUTE, "cpu | cuda | cuda:N | auto (cuda when available): where the chain, "
                                           "the clients (a GPU share per client actor), the server's "
                                           "verification and local/oracle train and evaluate")
    # models.compute; weights, deltas, losses and AP are float32 whatever these are
    precision: str = setting("float32", COMPUTE, "the ResNet bodies' arithmetic, chain included: bfloat16 (autocast) "
                                                 "| float32 | auto (bfloat16 where the CPU has AVX-512 BF16 or AMX); "
                                                 "weights, deltas and AP stay float32", _precisions)
    layout: str = setting("nchw", COMPUTE, "tensor layout of every model's convolutions", _layouts)
    # distill.body_memo; "run" costs disk and saves body passes
    body_cache: str = setting("round", CLIENTS, "how long a DiReDi client keeps its tutor body's outputs per "
                                                "image: round (Tutor 2's, for its Distill C) | run (on its disk from "
                                                "round to round, and the server its outputs on the spread images in "
                                                "memory: fewer body passes, about 0.23 MB per image and flip in the "
                                                "cpu profile); the same figures either way", BODY_CACHES)
    cache_dir: str = setting(".cache", OUTPUT, "data and model cache")
    tutor1: str = setting("shared", CLIENTS, "Tutor 1 depends only on the edge and presumed data: compute it once "
                                             "on the server while every client holds the server's edge (shared), "
                                             "or always on every client", TUTOR1_MODES)
    redistill: str = setting("client", CLIENTS, "Distill C on each client (its own edge) or once on the server",
                             REDISTILL_SIDES)
    # default chosen in experiments/results/merge.md
    aggregation: str = setting("class_aware", MERGE, "how the accepted deltas are merged (strategies.aggregate)",
                               AGGREGATION_METHODS)
    beta: float = setting(1.0, MERGE, "eq. (10): the tutor moves by beta x the merged delta")
    fedprox_mu: float = setting(0.01, BASELINES, "FedProx's mu")
    direct_lr: float = setting(0.0, BASELINES, "client lr of the federated direct-training baselines (0: the "
                                               "profile's)")
    server_momentum: float = setting(0.9, BASELINES, "fedavgm: Flower's FedAvgM server momentum, server lr 1")
    # Adam's normalised step moves each parameter by about eta per round; one client's 60 steps move a
    # parameter by 6.6e-3 on average (measured on client 0 from the manufacturer's edge), so 3e-3 moves
    # the global edge about as far as FedAvg's mean. Not tuned.
    fedadam_eta: float = setting(3e-3, BASELINES, "fedadam: Flower's FedAdam server learning rate")
    fedadam_tau: float = setting(1e-3, BASELINES, "fedadam: its adaptivity (Reddi et al. 2021)")
    rd_iters: int = setting(0, CLIENTS, "RD steps per tutor per round (0: the profile's)")
    redistill_iters: int = setting(0, CLIENTS, "Distill C steps per round (0: the profile's)")
    # 3e-3: the lowest rate at which a new class shows after round 1 on the manufacturer's validation set
    # (experiments/results/distill_c_lr.md); with the next two settings, README "All three together"
    redistill_lr: float = setting(3e-3, CLIENTS, "a client's Distill C learning rate (0: the profile's lr, as "
                                                 "local training's)")
    # distill.rd.distill_c_lr; client re-distillation only
    redistill_lr_schedule: str = setting("constant", CLIENTS, "a client's Distill C learning rate by round: "
                                                             "constant, or inverse-sqrt (redistill-lr / sqrt(round): "
                                                             "the full rate in round 1, a quarter of it in round 16)",
                                         REDISTILL_LR_SCHEDULES)
    # distill.scores; experiments/results/edge_protection.md
    redistill_score_weight: float = setting(4.0, CLIENTS, "a client's Distill C also learns the tutor's class "
                                                          "scores on its kept presumed classes, with this weight "
                                                          "(0: off, the paper's Distill C)")
    # distill.rd.ClientTraining.redistill_target_ratio; chosen after round 1 (experiments/results/distill_c_ratio.md)
    redistill_ratio: float = setting(4.0, CLIENTS, "Distill C (a client's, or the server's with --redistill "
                                                   "server) holds its distillation term (the tutor's neck "
                                                   "features) at this multiple of its detection loss")
    # strategies.diredi; client re-distillation only
    edge_check: str = setting("off", CLIENTS, "on: the manufacturer checks each client's re-distilled edge on its "
                                              "validation set and the client deploys it only if its protected "
                                              "classes stay within the verification's tolerance of the "
                                              "manufacturer's edge, else keeps its earlier edge (DiReDi)", EDGE_CHECKS)
    # strategies.diredi, distill.rd.spread_distill; client re-distillation only
    spread: str = setting("on", CLIENTS, "on (the default): each round the server distils the updated tutor into "
                                         "an edge of its own on the manufacturer's images (the tutor's outputs as "
                                         "targets) and each client's Distill C starts from that edge, so classes "
                                         "other clients taught the tutor can reach it; with --redistill server "
                                         "there is no client Distill C and it resolves to off (DiReDi)",
                          SPREAD_MODES)
    # clients.app.distill, models.parts.with_class_rows; README "Spread"
    spread_rows: str = setting("server", CLIENTS, "with spread, the classification rows of the classes a "
                                                     "client neither trains nor dropped (other clients' classes): "
                                                     "as its Distill C leaves them (distilled) or the server's "
                                                     "spread edge's (server)", SPREAD_ROWS)
    # clients.app.distill, distill.scores; README "Spread"
    spread_scores: str = setting("kept", CLIENTS, "with spread, the classes whose tutor scores are soft targets "
                                                  "of a client's Distill C: its kept presumed classes (kept), or "
                                                  "also the classes it neither trains nor dropped (others)",
                                 SPREAD_SCORES)
    # clients.app.distill; README "A client's own classes from its own edge"
    spread_own_rows: str = setting("server", CLIENTS, "with spread, the classification rows of a client's own "
                                                      "new classes its Distill C starts from: the server's "
                                                      "spread edge's (server) or, once it has deployed an edge "
                                                      "of its own Distill C, that edge's (own)", SPREAD_OWN_ROWS)
    # clients.app.distill; README "Spread"
    spread_average: str = setting("deployed", CLIENTS, "with spread and an edge average, the edge a client's "
                                                       "re-distilled edge is averaged with: the edge it deployed "
                                                       "(deployed) or the server's spread edge its Distill C "
                                                       "started from (server)", SPREAD_AVERAGES)
    # strategies.diredi.distil_spread_edge
    spread_iters: int = setting(0, CLIENTS, "with spread, the server's distillation steps per round into its "
                                            "edge (0: four times a client's Distill C steps)")
    # clients.app.distill, models.parts.interpolate_weights; client re-distillation only
    edge_average: float = setting(0.0, CLIENTS, "a DiReDi client deploys this share of its re-distilled edge and "
                                                "keeps the rest of the edge it deployed before (weights averaged "
                                                "across rounds), but for the classification layer's rows of "
                                                "its own new classes and of the classes it dropped (1: the "
                                                "re-distilled edge as it is; 0: 0.5 with client "
                                                "re-distillation, 1 with server re-distillation)")
    batch_size: int = setting(0, CLIENTS, "batch size of every client phase (0: the profile's)")
    # local and oracle always take a DiReDi client's steps
    direct_iters: int = setting(0, BASELINES, "steps per round of the federated direct-training baselines' clients "
                                              "(0: as many as a DiReDi client, 2 x rd-iters + redistill-iters)")
    # experiments/results/delta_precision.json
    delta_precision: str = setting("float16", CLIENTS, "dtype of the uploaded neck/head delta", DELTA_PRECISIONS)
    delta_topk: float = setting(1.0, CLIENTS, "upload only this share of each delta tensor's largest entries; the "
                                              "rest is added to the client's next delta (1: all)")
    norm_factor: float = setting(1.0, VERIFICATION, "a delta's norm bound is this factor x the tutor's neck/head norm")
    protected_tolerance: float = setting(0.05, VERIFICATION, "the largest AP drop a delta may cost a protected class "
                                                             "on the validation set")
    noise_z: float = setting(3.0, VERIFICATION, "... or noise-z x the drop's bootstrap std, if larger (0: no "
                                                "bootstrap)")
    # strategies.merge_gates.protected_appeal
    protected_scope: str = setting("merge", VERIFICATION, "where the protected gate judges a delta: applied whole to "
                                                          "the tutor (delta), or, when it fails so, again inside the "
                                                          "round's merge, accepted if the merge with it keeps every "
                                                          "protected class within the tolerance (merge)",
                                   PROTECTED_SCOPES)
    kept_tolerance: float = setting(math.inf, VERIFICATION, "the largest mean AP drop over the presumed classes "
                                                            "(inf: recorded only)")
    # eq. 11's precision, recall and F1 (every client's records, the chain's table); AP does not move with it
    operating_threshold: float = setting(0.5, EVALUATION, "the score from which a product reports detections: eq. "
                                                          "11's precision, recall and F1 and the verification's "
                                                          "recall are measured there")
    # strategies.verify.operating_point_check
    operating_tolerance: float = setting(math.inf, VERIFICATION, "the recall at the operating threshold a delta may "
                                                                 "cost a guarded class (protected, kept and learnt) on "
                                                                 "the validation set, or noise-z x its bootstrap std "
                                                                 "if larger (inf: recorded only)")
    # strategies.verify.harm_threshold
    operating_harm: float = setting(math.inf, VERIFICATION, "the recall at the operating threshold one delta may "
                                                            "cost a guarded class in the round's merge (its "
                                                            "leave-one-out harm), or the round's median harm + "
                                                            "noise-z robust std if larger (inf: off)")
    direction_z: float = setting(4.0, VERIFICATION, "a delta's cosine with the reference update must reach "
                                                    "direction-z / sqrt(d) (0: off)")
    direction_reference: str = setting("peers", VERIFICATION, "the direction gate's reference: the median of the "
                                                              "round's other deltas (peers) or the server's own RD "
                                                              "update (server)", DIRECTION_REFERENCES)
    # strategies.verify.direction_tensors; README "A false rejection with two clients silent"
    direction_scope: str = setting("all", VERIFICATION, "what the direction gate compares: every neck/head tensor "
                                                        "(all), or all but the classification layer's class rows, "
                                                        "which the class-aware merge bounds on its own and where "
                                                        "honest clients of different classes disagree (shared)",
                                   DIRECTION_SCOPES)
    clip_norm: float = setting(math.inf, MERGE, "accepted deltas clipped to this L2 norm (inf: off)")
    # 2: every honest round kept here claims at most 1.28 x its low median (experiments.false_rejections;
    # README, "A weight cap an honest client meets")
    weight_cap: float = setting(2.0, MERGE, "a client's claimed example count capped at this multiple of the round's "
                                            "median claim (inf: off)")
    # 2.5: the largest honest norm kept here is 2.24 x its round's low median, 1.97 x at the default gates
    # (experiments.false_rejections; README, "Norm clip 2.5 by default"); 4 let a x100 delta's shared layers through
    clip_multiple: float = setting(2.5, MERGE, "accepted deltas clipped to this multiple of the round's median "
                                               "delta norm (inf: off)")
    # sized: README, "A clipped delta's rows by their size, by default" under "Under attack" (no honest delta kept
    # here was ever clipped, so honest merges are as under "scaled": "Claims judged on the delta as merged")
    clip_share: str = setting("sized", MERGE, "a delta the norm clip cut counts in the merge's means with its whole "
                                               "weight (whole) or as the share of it the clip kept: its weight x "
                                               "the clip's factor, in the trimmed mean that fraction of one delta "
                                               "(scaled), and in a class row's mean as that fraction of its "
                                               "share there, its rows being that fraction of their size (sized)",
                              CLIP_SHARES)
    row_multiple: float = setting(4.0, MERGE, "each accepted delta's classification rows of a class clipped to "
                                              "this multiple of the round's median change of that class's rows "
                                              "(inf: off)")
    # influence: README, "And the row bound by influence"
    row_bound: str = setting("influence", MERGE, "what the row bound compares: a delta's row change (norm) or "
                                                 "its weight in the merge x its row change (influence)", ROW_BOUNDS)
    # row: README, "Tiny rows counted by their size" under "Under attack" (row-or-kind stops tiny_claim on default8
    # and lets a false claim through on heldout8); scaled: README "Tiny rows and the search's reach by default"
    row_reference: str = setting("row", MERGE, "what sets the row bound: the median of the class row's own "
                                               "contributors (row), or the larger of that and the median of every "
                                               "row merged in the round (row-or-round) or of every row of its kind: "
                                               "classes the tutor knows, classes it learns (row-or-kind)",
                            ROW_REFERENCES)
    row_share: str = setting("scaled", MERGE, "a class row sent at less than 1/row-multiple of the round's median "
                                             "row of its kind counts in its row's mean whole (whole) or as that "
                                             "fraction of a row, and in the row bound's median as a row of "
                                             "1/row-multiple of that median (scaled)", ROW_SHARES)
    # README "Rows that keep their size" under "Under attack"
    row_size: str = setting("mean", MERGE, "a merged class row is its rows' weighted mean (mean), or, for each "
                                           "class the tutor learns from clients, that mean scaled up to the mean "
                                           "size of the rows it averages that count whole, so rows that point "
                                           "different ways, or a tiny one beside them, do not shrink it "
                                           "(learned)", ROW_SIZES)
    # README "Rows left out when they dilute" under "Under attack"
    dilution_check: str = setting("off", MERGE, "where every claimer of a class the tutor learns from clients only "
                                                "holds it (none improves it), merge its row from all of them (off) "
                                                "or without each claimer whose row, left out, raises the class's "
                                                "validation AP beyond noise-z x that rise's bootstrap std (on)",
                                  DILUTION_CHECKS)
    # strategies.verify
    claims: str = setting("earned", MERGE, "the class-aware merge takes a client's classes as it reports them "
                                           "(trusted) | only those its candidate tutor improves on the validation "
                                           "set, or holds when no claimer improves them (earned) | only those it "
                                           "improves (improving) | earned, and its own row of the class must not "
                                           "lower the tutor's top scores of the class on the validation images "
                                           "holding it (lifting)", CLAIM_RULES)
    # strategies.calibrate
    calibrate: str = setting("f1-offsets", MERGE, "after each merge the server moves each class's classification bias "
                                           "to the shift (a grid of logits) of best F1 at the operating threshold "
                                           "on the validation set (f1) | the same for the classes the tutor learnt "
                                           "from clients only, the manufacturer's presumed classes left as they "
                                           "are (f1-learnt) | the same shifts for every class, kept beside the "
                                           "tutor as its deployed operating point and never written into the "
                                           "weights the clients and the merge see (f1-offsets) | leaves the "
                                           "merged tutor as it is (off)",
                             CALIBRATIONS)
    # strategies.calibrate.extend_search; README "The offset search beyond its grid"; 8 since "Tiny rows and the
    # search's reach by default"
    calibrate_reach: float = setting(8.0, MERGE, "how far, in logits, one round's calibration search may move a "
                                                 "class's offset: past the grid's end (3) it follows a class whose "
                                                 "F1 is still rising there, or is 0 at every shift (3: the grid "
                                                 "alone)")
    timeout_s: float = setting(0.0, RUN, "seconds the server waits for one round trip with the clients (0: sized "
                                         "from the profile's step time)")
    # protocol.privacy: clip to L2 norm dp_clip, add N(0, (dp_noise x dp_clip)^2) per coordinate
    dp_clip: float = setting(math.inf, PRIVACY, "each client clips its delta to this L2 norm before upload (inf: "
                                                "off)")
    dp_noise: float = setting(0.0, PRIVACY, "Gaussian noise of std dp-noise x dp-clip per delta coordinate, on the "
                                            "client (0: off; needs --dp-clip); clients report the epsilon they spent")
    dp_delta: float = setting(1e-5, PRIVACY, "the delta of the (epsilon, delta) clients report")

    # -- codec to and from Flower's ConfigRecord / run config -------------------------------------

    def to_record(self) -> dict[str, Any]:
        """ConfigRecord values (empty strings are left out: Flower cannot count their bytes). A scenario
        shipped with the app goes by its name: each client reads its own copy, never the server's path."""
        from data.scenario import SCENARIO_DIR

        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = ",".join(value)
            if f.name == "scenario" and Path(value).parent == SCENARIO_DIR.resolve():
                value = Path(value).stem
            if value != "":
                out[_key(f.name)] = value
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "RunConfig":
        """The configuration in a ConfigRecord or run config; keys it does not know are ignored
        (messages add their own, e.g. "method" and "server-round")."""
        values = {}
        for f in fields(cls):
            key = _key(f.name)
            if key in record:
                values[f.name] = _coerce(f, record[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """For config.json and results files: paths inside the working directory are written relative
        to it, so a results file does not name this machine's folders."""
        here = Path.cwd().resolve()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # "inf": JSON has no infinity (the results writer would make it null)
            elif f.name in ("scenario", "cache_dir", "voc_root") and value and Path(value).is_absolute():
                path = Path(value)
                value = str(path.relative_to(here)) if path.is_relative_to(here) else value
            out[f.name] = value
        return out

    @staticmethod
    def completed(recorded: Mapping[str, Any]) -> dict[str, Any]:
        """A config.json's "run" (as read back) with every field it lacks at what that run did: its default, or
        for a setting whose default changed since, its value then (``BEFORE_CHANGED``). A ``spread_iters`` of 0
        with spread on can only come from a run made while 0 meant as many steps as Distill C (runs now record
        the resolved count, ``SPREAD_STEPS_PER_DISTILL_C`` times Distill C's), so it reads as that many. For
        comparing settings (``--resume``): an older run folder compares equal to the same settings today."""
        completed = {**json.loads(json.dumps(RunConfig().to_dict())), **BEFORE_CHANGED, **recorded}
        if completed["spread"] == "on" and not completed["spread_iters"]:  # made before 0 came to mean four times
            completed["spread_iters"] = completed["redistill_iters"]
        return completed

    @staticmethod
    def same_settings(recorded: Mapping[str, Any], run: Mapping[str, Any], diredi_ran: bool = True) -> bool:
        """Whether two config.json ``run`` entries (as read back) describe the same run, for ``--resume``:
        equal once completed, except where they keep the cache (its entries are keyed by content, so a
        moved cache, or one reached through a link, makes no other run). Without ``diredi_ran`` (the folder
        holds nothing of DiReDi), the settings only DiReDi reads may differ too (``diredi_only_settings``)."""
        first, second = RunConfig.completed(recorded), RunConfig.completed(run)
        for name in ("cache_dir", *(() if diredi_ran else diredi_only_settings())):
            first.pop(name), second.pop(name)
        return first == second

    # -- what the configuration implies ---------------------------------------------------------

    @property
    def training_seed(self) -> int:
        """The seed of every training, data order and client sample of the run: ``seed`` for replicate 0;
        each replicate adds a multiple of 1,000,003, which is 3 mod 10, so ``protocol.wire.work_seed``'s
        seeds (round x 100,000 + party x 10) of two replicates never coincide."""
        return self.seed + 1_000_003 * self.replicate

    @property
    def diredi_client_steps(self) -> int:
        """A DiReDi client's training steps per round (two RD tutors and Distill C): the budget of the
        local and oracle baselines (per client), so that they compare at equal client steps."""
        return 2 * self.rd_iters + self.redistill_iters

    def evaluates_after(self, server_round: int) -> bool:
        """Whether clients evaluate the edge a round ends with (``evaluation_round``)."""
        return evaluation_round(server_round, self.rounds, self.eval_every)

    def evaluates_before(self, server_round: int) -> bool:
        """Whether clients evaluate the edge a round starts from: in round 1 (the manufacturer's edge,
        every figure's start), and after an evaluated round (the same edge again: a client reads the
        figures it kept, ``clients.app._evaluate``)."""
        return server_round <= 1 or self.evaluates_after(server_round - 1)

    @property
    def edge_share(self) -> float:
        """The share of its re-distilled edge a DiReDi client deploys (``edge_average``, 0 resolved)."""
        return self.edge_average or (CLIENT_EDGE_AVERAGE if self.redistill == "client" else 1.0)

    @property
    def federated_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in FEDERATED)

    def get_profile(self):
        from models.ladder import get_profile

        return get_profile(self.profile)

    def client_training(self):
        """The clients' training settings (``distill.rd.ClientTraining``) for this run."""
        from distill.rd import ClientTraining

        return ClientTraining.from_profile(self.get_profile(), rd_iters=self.rd_iters,
                                           redistill_iters=self.redistill_iters, batch_size=self.batch_size,
                                           beta=self.beta, redistill_score_weight=self.redistill_score_weight,
                                           redistill_lr=self.redistill_lr,
                                           redistill_target_ratio=self.redistill_ratio)

    def compute(self):
        """How the models compute (``models.compute.Compute``; "auto" is resolved where it runs)."""
        from models.compute import Compute

        return Compute(self.precision, self.layout)

    def run_name(self) -> str:
        sampled = f"-f{self.fraction:g}" if self.fraction < 1 else ""
        return (f"{Path(self.scenario).stem}-{self.profile}-{self.data}-c{self.num_clients}{sampled}"
                f"-r{self.rounds}-s{self.seed}" + (f"-rep{self.replicate}" if self.replicate else ""))


# The settings of these groups are read by DiReDi only, but for SHARED_WITH_BASELINES: the local and oracle
# baselines take as many steps a round as a DiReDi client (rd_iters, redistill_iters) and every client trains
# in batches of batch_size. A run folder whose DiReDi has not run (or is redone) may change the others.
DIREDI_GROUPS = (CLIENTS, VERIFICATION, MERGE, PRIVACY)
SHARED_WITH_BASELINES = ("rd_iters", "redistill_iters", "batch_size")


def diredi_only_settings() -> tuple[str, ...]:
    """The ``RunConfig`` fields no method but DiReDi reads (``same_settings``)."""
    return tuple(f.name for f in fields(RunConfig)
                 if f.metadata["group"] in DIREDI_GROUPS and f.name not in SHARED_WITH_BASELINES)


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind.startswith("tuple"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(i.strip() for i in items if str(i).strip())
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value} is not a whole number")
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(_key(f.name), f"cannot read {value!r} as {kind} ({err})") from None


def resolve_run_config(raw: Mapping[str, Any] | RunConfig) -> RunConfig:
    """Checks every setting and fills the defaults that depend on others; the one function both
    entry points call. ``raw`` holds run-config keys ("num-clients" or "num_clients")."""
    if isinstance(raw, RunConfig):
        raw = raw.to_record()
    known = {_key(f.name) for f in fields(RunConfig)}
    given = {_key(str(k)): v for k, v in raw.items()}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(unknown[0], f"unknown setting; known: {', '.join(sorted(known))}")
    config = RunConfig.from_record(given)
    for f in fields(RunConfig):
        allowed = choices_of(f)
        if allowed is not None and getattr(config, f.name) not in allowed:
            raise ConfigError(_key(f.name), f"{getattr(config, f.name)!r} is not one of {', '.join(allowed)}")

    from models.ladder import PROFILES

    profile = PROFILES[config.profile]
    methods = config.methods
    unknown_methods = [m for m in methods if m not in METHODS]
    if not methods or unknown_methods:
        raise ConfigError("methods", f"unknown {unknown_methods or 'empty list'}; choose from {','.join(METHODS)}")
    methods = tuple(m for m in METHODS if m in methods)  # one order everywhere
    for name, low in (("num_clients", 1), ("rounds", 1), ("eval_every", 1), ("rd_iters", 0), ("redistill_iters", 0),
                      ("spread_iters", 0), ("batch_size", 0), ("direct_iters", 0), ("replicate", 0)):  # 0: "the profile's"
        if getattr(config, name) < low:
            raise ConfigError(_key(name), f"must be at least {low}, got {getattr(config, name)}")
    if not (math.isfinite(config.delta_topk) and 0 < config.delta_topk <= 1):
        raise ConfigError("delta-topk", f"must be in (0, 1], got {config.delta_topk}")
    if not (math.isfinite(config.fraction) and 0 < config.fraction <= 1):
        raise ConfigError("fraction", f"must be in (0, 1], got {config.fraction}")
    if not (math.isfinite(config.beta) and config.beta > 0):
        raise ConfigError("beta", f"must be a finite number > 0, got {config.beta}")
    for name, value in (("fedprox_mu", config.fedprox_mu), ("norm_factor", config.norm_factor),
                        ("direct_lr", config.direct_lr), ("redistill_lr", config.redistill_lr),
                        ("server_momentum", config.server_momentum),
                        ("fedadam_eta", config.fedadam_eta), ("fedadam_tau", config.fedadam_tau),
                        ("protected_tolerance", config.protected_tolerance), ("noise_z", config.noise_z),
                        ("direction_z", config.direction_z), ("redistill_score_weight", config.redistill_score_weight),
                        ("redistill_ratio", config.redistill_ratio),
                        ("timeout_s", config.timeout_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(_key(name), f"must be a finite number >= 0, got {value}")
    # inf switches each of these off; NaN is never a setting
    if not config.kept_tolerance >= 0:
        raise ConfigError("kept-tolerance", f"must be a number >= 0 (inf: never reject), got {config.kept_tolerance}")
    if not 0.05 <= config.operating_threshold < 1:  # FCOS keeps detections from score 0.05 (models.ladder)
        raise ConfigError("operating-threshold", f"must be a number in [0.05, 1), got {config.operating_threshold}")
    if not config.operating_harm >= 0:
        raise ConfigError("operating-harm", f"must be a number >= 0 (inf: off), got {config.operating_harm}")
    if not config.operating_tolerance >= 0:
        raise ConfigError("operating-tolerance",
                          f"must be a number >= 0 (inf: never reject), got {config.operating_tolerance}")
    if not config.clip_norm > 0:
        raise ConfigError("clip-norm", f"must be a number > 0 (inf: no clipping), got {config.clip_norm}")
    if not config.weight_cap >= 1:
        raise ConfigError("weight-cap", f"must be a number >= 1 (inf: no cap), got {config.weight_cap}")
    if not config.clip_multiple >= 1:
        raise ConfigError("clip-multiple", f"must be a number >= 1 (inf: no clipping), got {config.clip_multiple}")
    if not (math.isfinite(config.calibrate_reach) and config.calibrate_reach >= 3):
        raise ConfigError("calibrate-reach", f"must be a finite number >= 3 (3: the search's grid alone), got "
                                             f"{config.calibrate_reach}")
    if not config.row_multiple >= 1:
        raise ConfigError("row-multiple", f"must be a number >= 1 (inf: no clipping), got {config.row_multiple}")
    if not config.dp_clip > 0:
        raise ConfigError("dp-clip", f"must be a number > 0 (inf: no clipping), got {config.dp_clip}")
    if not (math.isfinite(config.dp_noise) and config.dp_noise >= 0):
        raise ConfigError("dp-noise", f"must be a finite number >= 0 (0: no noise), got {config.dp_noise}")
    if config.dp_noise > 0 and not math.isfinite(config.dp_clip):
        raise ConfigError("dp-noise", f"{config.dp_noise} needs a finite dp-clip (the noise std is dp-noise x dp-clip)")
    if not 0 < config.dp_delta < 1:
        raise ConfigError("dp-delta", f"must be in (0, 1), got {config.dp_delta}")
    if config.edge_check == "on" and config.redistill != "client":
        raise ConfigError("edge-check", "checks the edges clients re-distil; it needs --redistill client")
    if not 0 <= config.edge_average <= 1:
        raise ConfigError("edge-average", f"must be in (0, 1] (0: the default), got {config.edge_average}")
    if 0 < config.edge_average < 1 and config.redistill != "client":
        raise ConfigError("edge-average", "averages the edges clients re-distil; it needs --redistill client")
    # spread starts the clients' Distill C from the server's edge: without client re-distillation it is off
    config = replace(config, spread=config.spread if config.redistill == "client" else "off")
    if config.spread_scores == "others" and config.spread != "on":
        raise ConfigError("spread-scores", "adds the classes of other clients that spread brings; it needs --spread on")
    if config.spread_average == "server" and config.spread != "on":
        raise ConfigError("spread-average", "averages with the server's spread edge; it needs --spread on")
    if config.spread_average == "server" and config.edge_average == 1:
        raise ConfigError("spread-average", "sets the partner of the edge average; --edge-average 1 averages nothing")
    if config.spread_own_rows == "own" and config.spread != "on":
        raise ConfigError("spread-own-rows", "sets where Distill C starts from the server's spread edge; it needs "
                                             "--spread on")
    if config.spread_iters and config.spread != "on":
        raise ConfigError("spread-iters", "sets the server's spread distillation; it needs --spread on")

    voc_root = config.voc_root
    if config.data == "voc":
        if not voc_root or not Path(voc_root).expanduser().is_dir():
            raise ConfigError("voc-root", f"--data voc needs --voc-root pointing to an existing folder (got {voc_root or None})")
        voc_root = str(Path(voc_root).expanduser().resolve())
    elif voc_root:
        raise ConfigError("voc-root", "is only used with --data voc")

    from data.scenario import load_scenario
    from data.voc import DataError

    try:
        scenario = load_scenario(config.scenario)
    except (DataError, OSError) as err:
        raise ConfigError("scenario", str(err)) from None
    from distill.trainer import resolve_device

    try:
        device = str(resolve_device(config.device))
    except ValueError as err:
        raise ConfigError("device", str(err)) from None

    rounds_budget = profile.rounds
    rd_iters = config.rd_iters or rounds_budget.rd_iters
    redistill_iters = config.redistill_iters or rounds_budget.redistill_iters
    batch_size = config.batch_size or rounds_budget.batch_size
    direct_iters = config.direct_iters or 2 * rd_iters + redistill_iters
    spread_iters = config.spread_iters or (SPREAD_STEPS_PER_DISTILL_C * redistill_iters if config.spread == "on" else 0)
    resolved = replace(config, methods=methods, voc_root=voc_root, device=device, edge_average=config.edge_share,
                       scenario=str(Path(scenario.source).resolve()),
                       cache_dir=str(Path(config.cache_dir).expanduser().resolve()),
                       rd_iters=rd_iters, redistill_iters=redistill_iters, batch_size=batch_size,
                       direct_iters=direct_iters, spread_iters=spread_iters)
    if resolved.timeout_s == 0:
        resolved = replace(resolved, timeout_s=round_timeout(resolved))
    return resolved


def round_timeout(config: RunConfig, cpus: int | None = None) -> float:
    """A generous bound for one round trip: all of a round's client steps, run in waves of as many
    clients as there are CPUs, at the profile's pessimistic step time, times 3, plus 5 minutes."""
    import os

    steps = 2 * config.rd_iters + config.redistill_iters + config.direct_iters
    waves = math.ceil(max(config.num_clients, 1) / max(1, cpus or os.cpu_count() or 1))
    per_step = config.get_profile().seconds_per_step * config.batch_size / 8
    return float(round(3.0 * waves * (steps * per_step + 120.0) + 300.0))
