"""The run configuration: one frozen record of everything that decides a run's numbers.

Both entry points resolve it with the same function and then do the same work:

    python -m sim.run --clients 8 ...          ->  resolve_run_config({"num-clients": 8, ...})
    flwr run . --run-config "num-clients=8"    ->  resolve_run_config(context.run_config)

``resolve_run_config`` checks every value (``ConfigError`` names the key), fills what is left at
0 / "" from the profile (``models.ladder.PROFILES``, the one place per-profile values live) and
makes paths absolute. Every message to a client carries ``config.to_record()``; the client reads
it back with ``RunConfig.from_record`` and rebuilds its data and settings from it. The keys are the
field names with "-" for "_", the same in ``pyproject.toml``'s ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import dataclasses
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
DEFAULT_METHODS = ("diredi", "fedavg", "fedprox", "local", "oracle")  # sim.run's default: 10 minutes warm
FEDERATED = ("diredi", "fedavg", "fedavg_ls", "fedavg_ft", "fedprox", "fedavgm", "fedadam")  # run on Flower
DIRECT_FEDERATED = FEDERATED[1:]  # the federated methods whose clients train the edge on their labels
TUTOR1_MODES = ("shared", "per-client")
AGGREGATION_METHODS = ("weighted", "trimmed", "ties", "krum", "class_aware")  # strategies.aggregate.aggregate
REDISTILL_SIDES = ("client", "server")
DELTA_PRECISIONS = ("float16", "float32")  # how a client's delta travels (the server reads either)
DIRECTION_REFERENCES = ("peers", "server")  # the direction gate's reference (strategies.verify)
BODY_CACHES = ("round", "run")  # how long a client keeps the tutor body's outputs (distill.body_memo)
EDGE_CHECKS = ("off", "on")  # the manufacturer's check of each re-distilled edge before it is deployed
SPREAD_MODES = ("off", "on")  # the server's edge, distilled from the updated tutor, as Distill C's start
CLAIM_RULES = ("trusted", "earned", "improving", "lifting")  # how the class-aware merge takes a client's trained classes (strategies.verify)


# Fields added after runs were recorded: ``to_dict`` leaves them out while they hold their default, so
# a run without them writes the config.json it wrote before they existed (and --resume, which
# compares config.json's "run" with ``to_dict``, still accepts the older run folders).
LATER_FIELDS = ("dp_clip", "dp_noise", "dp_delta", "replicate", "direct_lr", "server_momentum", "fedadam_eta",
                "fedadam_tau", "precision", "layout", "body_cache", "redistill_score_weight", "edge_check",
                "spread", "operating_tolerance", "claims", "clip_multiple", "row_multiple",
                "operating_threshold", "eval_every", "redistill_lr")


def evaluation_round(server_round: int, rounds: int, every: int) -> bool:
    """Whether round ``server_round`` of ``rounds`` ends with an evaluation on the clients' test shards:
    every ``every``-th round and always the last (so a run's final figures never depend on ``every``)."""
    return every <= 1 or server_round % every == 0 or server_round >= rounds


class ConfigError(ValueError):
    """A setting that cannot be used; ``key`` is its run-config key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True)
class RunConfig:
    profile: str = "cpu"  # smoke | cpu | paper (models.ladder.PROFILES)
    scenario: str = "default8"  # a name in data/scenarios/ or a YAML path
    data: str = "synth"  # synth (generated, VOC layout) | voc (read from voc_root)
    voc_root: str = ""
    num_clients: int = 8  # under `flwr run`, 0 means as many as the federation has nodes
    fraction: float = 1.0  # share of the clients sampled per round (seeded), every federated method
    rounds: int = 2  # the warm default run (5 methods, 8 clients, cpu profile) within 10 minutes on 2 cores
    # Clients evaluate their edge on their test shard after every eval_every-th round and after the last
    # (``evaluates_after``); 1: every round. The rounds between have records without AP (costs only).
    eval_every: int = 1
    methods: tuple[str, ...] = DEFAULT_METHODS
    seed: int = 0  # the data: shards and the manufacturer chain (and, with replicate 0, the training seeds)
    # A study's replicate: changes every training seed, the clients' data order and the client sampling,
    # never the data, shards or manufacturer chain (``training_seed``). 0: the training seeds are ``seed``.
    replicate: int = 0
    device: str = "auto"  # where the manufacturer chain trains; the federation runs on the CPU
    # How the models compute, chain included (models.compute): the ResNet bodies' precision
    # (float32 | bfloat16 | auto: bfloat16 where the machine has it) and the tensor layout
    # (nchw | channels-last). Weights, deltas, losses and AP are float32 whatever these are.
    precision: str = "float32"
    layout: str = "nchw"
    # How long a DiReDi client with a state folder keeps its tutor body's outputs per image
    # (distill.body_memo): "round" (Tutor 2's, for its Distill C) | "run" (every phase's, on its disk
    # from round to round). The same figures either way; "run" costs disk and saves body passes.
    body_cache: str = "round"
    cache_dir: str = ".cache"
    tutor1: str = "shared"  # Tutor 1 computed once per round on the server, or on every client
    redistill: str = "client"  # Distill C on each client (its own edge) or once on the server
    aggregation: str = "class_aware"  # AGGREGATION_METHODS; default chosen in experiments/results/merge.md
    beta: float = 1.0  # eq. (10): the tutor moves by beta x the merged delta (the merge scale)
    fedprox_mu: float = 0.01
    direct_lr: float = 0.0  # client lr of the federated direct-training baselines; 0: the profile's lr
    server_momentum: float = 0.9  # fedavgm: Flower's FedAvgM server momentum (server lr 1)
    # fedadam: Flower's FedAdam server learning rate. Adam's normalised step moves each parameter by about
    # eta per round; one client's 60 steps move a parameter by 6.6e-3 on average (measured on client 0
    # from the manufacturer's edge), so 3e-3 moves the global edge about as far as FedAvg's mean. Not tuned.
    fedadam_eta: float = 3e-3
    fedadam_tau: float = 1e-3  # fedadam: its adaptivity (Reddi et al. 2021)
    rd_iters: int = 0  # RD steps per tutor per round; 0: the profile's round budget
    redistill_iters: int = 0  # Distill C steps per round; 0: the profile's
    redistill_lr: float = 0.0  # a client's Distill C learning rate; 0: the profile's lr (as direct training's)
    # a client's Distill C: weight of the tutor's class scores on its kept presumed classes as soft
    # targets (distill.scores; experiments/results/edge_protection.md). 0: off, the paper's Distill C.
    redistill_score_weight: float = 0.0
    # "on": a client's re-distilled edge is deployed only if the manufacturer's validation set shows its
    # protected classes within the verification's tolerance of the manufacturer's edge; otherwise the
    # client keeps the edge it deployed before (strategies.diredi; client re-distillation only)
    edge_check: str = "off"
    # "on": each round the server distils the updated tutor into an edge of its own on the manufacturer's
    # images (no labels: the tutor's outputs are the targets) and a client's Distill C starts from that
    # edge instead of its own, so the classes other clients taught the tutor can reach it (DiReDi,
    # client re-distillation; strategies.diredi, distill.rd.spread_distill)
    spread: str = "off"
    batch_size: int = 0  # batch of every client phase; 0: the profile's
    # steps per round of the federated direct-training baselines' clients (FedAvg family, FedProx); 0: as
    # many as a DiReDi client (2 x rd + redistill). local and oracle always take a DiReDi client's steps.
    direct_iters: int = 0
    delta_precision: str = "float16"  # the uploaded delta's dtype (experiments/results/delta_precision.json)
    delta_topk: float = 1.0  # share of each delta tensor's largest entries uploaded (1: all; residual kept)
    norm_factor: float = 1.0  # verification: delta norm bound = norm_factor x the tutor's neck/head norm
    protected_tolerance: float = 0.05  # verification: largest AP drop allowed on a protected class
    noise_z: float = 3.0  # verification: ... or noise_z x the drop's bootstrap std, if larger (0: no bootstrap)
    kept_tolerance: float = math.inf  # verification: largest mean AP drop over the presumed classes (inf: recorded only)
    # the operating point: the score a product reports detections from; eq. 11's precision, recall and F1 (every
    # client's records, the chain's table) and the verification's recall are measured at it (AP is not)
    operating_threshold: float = 0.5
    # verification: largest recall drop at the operating threshold on a guarded class, or noise_z x its
    # bootstrap std if larger (strategies.verify.operating_point_check; inf: recorded only)
    operating_tolerance: float = math.inf
    direction_z: float = 4.0  # verification: cosine with the reference update >= direction_z / sqrt(d) (0: off)
    direction_reference: str = "peers"  # verification: "peers" (median of the round's other deltas) | "server"
    clip_norm: float = math.inf  # merge: accepted deltas clipped to this L2 norm (inf: no clipping)
    weight_cap: float = 4.0  # merge: claimed weights capped at weight_cap x the round's median claim (inf: no cap)
    clip_multiple: float = math.inf  # merge: accepted deltas clipped to clip_multiple x the round's median norm (inf: off)
    # merge: each accepted delta's classification rows of class c clipped to row_multiple x the median row-c
    # norm of the deltas merged into row c (inf: off)
    row_multiple: float = math.inf
    # merge: "trusted" takes each client's trained classes as it reports them for the class-aware merge's
    # rows; "earned" only those its candidate tutor improves (or, if no claimer improves, holds) on validation;
    # "improving" only those it improves (a class no claimer improves keeps its rows)
    claims: str = "trusted"
    timeout_s: float = 0.0  # one round trip; 0: sized from the profile's step time
    # local differential privacy of each client's delta (protocol.privacy; off by default): clip to L2
    # norm dp_clip, add N(0, (dp_noise x dp_clip)^2) per coordinate; epsilon accounted at dp_delta
    dp_clip: float = math.inf  # inf: no clipping
    dp_noise: float = 0.0  # the noise multiplier sigma; 0: no noise (> 0 needs a finite dp_clip)
    dp_delta: float = 1e-5  # the delta of the (epsilon, delta) clients report

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
            if f.name in LATER_FIELDS and value == f.default:
                continue
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, float) and not math.isfinite(value):
                value = str(value)  # "inf": JSON has no infinity (the results writer would make it null)
            elif f.name in ("scenario", "cache_dir", "voc_root") and value and Path(value).is_absolute():
                path = Path(value)
                value = str(path.relative_to(here)) if path.is_relative_to(here) else value
            out[f.name] = value
        return out

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
    def federated_methods(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m in FEDERATED)

    def get_profile(self):
        from models.ladder import get_profile

        return get_profile(self.profile)

    def rd_settings(self):
        """The clients' training settings (``distill.rd.RDSettings``) for this run."""
        from distill.rd import RDSettings

        return RDSettings.from_profile(self.get_profile(), rd_iters=self.rd_iters,
                                       redistill_iters=self.redistill_iters, batch_size=self.batch_size,
                                       beta=self.beta, redistill_score_weight=self.redistill_score_weight,
                                       redistill_lr=self.redistill_lr)

    def compute(self):
        """How the models compute (``models.compute.Compute``; "auto" is resolved where it runs)."""
        from models.compute import Compute

        return Compute(self.precision, self.layout)

    def run_name(self) -> str:
        sampled = f"-f{self.fraction:g}" if self.fraction < 1 else ""
        return (f"{Path(self.scenario).stem}-{self.profile}-{self.data}-c{self.num_clients}{sampled}"
                f"-r{self.rounds}-s{self.seed}" + (f"-rep{self.replicate}" if self.replicate else ""))


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

    from models.ladder import PROFILES

    if config.profile not in PROFILES:
        raise ConfigError("profile", f"unknown profile {config.profile!r}; choose from {', '.join(PROFILES)}")
    profile = PROFILES[config.profile]
    methods = config.methods
    unknown_methods = [m for m in methods if m not in METHODS]
    if not methods or unknown_methods:
        raise ConfigError("methods", f"unknown {unknown_methods or 'empty list'}; choose from {','.join(METHODS)}")
    methods = tuple(m for m in METHODS if m in methods)  # one order everywhere
    for name, low in (("num_clients", 1), ("rounds", 1), ("eval_every", 1), ("rd_iters", 0), ("redistill_iters", 0),
                      ("batch_size", 0), ("direct_iters", 0), ("replicate", 0)):  # 0: "the profile's"
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
                        ("timeout_s", config.timeout_s)):
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(_key(name), f"must be a finite number >= 0, got {value}")
    # inf switches each of these off; NaN is never a setting
    if not config.kept_tolerance >= 0:
        raise ConfigError("kept-tolerance", f"must be a number >= 0 (inf: never reject), got {config.kept_tolerance}")
    if not 0.05 <= config.operating_threshold < 1:  # FCOS keeps detections from score 0.05 (models.ladder)
        raise ConfigError("operating-threshold", f"must be a number in [0.05, 1), got {config.operating_threshold}")
    if not config.operating_tolerance >= 0:
        raise ConfigError("operating-tolerance",
                          f"must be a number >= 0 (inf: never reject), got {config.operating_tolerance}")
    if not config.clip_norm > 0:
        raise ConfigError("clip-norm", f"must be a number > 0 (inf: no clipping), got {config.clip_norm}")
    if not config.weight_cap >= 1:
        raise ConfigError("weight-cap", f"must be a number >= 1 (inf: no cap), got {config.weight_cap}")
    if not config.clip_multiple >= 1:
        raise ConfigError("clip-multiple", f"must be a number >= 1 (inf: no clipping), got {config.clip_multiple}")
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
    from models.compute import LAYOUTS, PRECISIONS

    choices = {"data": ("synth", "voc"), "tutor1": TUTOR1_MODES, "redistill": REDISTILL_SIDES,
               "delta_precision": DELTA_PRECISIONS, "direction_reference": DIRECTION_REFERENCES,
               "precision": PRECISIONS, "layout": LAYOUTS, "body_cache": BODY_CACHES,
               "edge_check": EDGE_CHECKS, "spread": SPREAD_MODES, "claims": CLAIM_RULES}
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            raise ConfigError(_key(name), f"{getattr(config, name)!r} is not one of {', '.join(allowed)}")
    if config.edge_check == "on" and config.redistill != "client":
        raise ConfigError("edge-check", "checks the edges clients re-distil; it needs --redistill client")
    if config.spread == "on" and config.redistill != "client":
        raise ConfigError("spread", "starts the clients' Distill C from the server's edge; it needs --redistill client")
    if config.aggregation not in AGGREGATION_METHODS:
        raise ConfigError("aggregation", f"{config.aggregation!r} is not one of {', '.join(AGGREGATION_METHODS)}")

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
    resolved = replace(config, methods=methods, voc_root=voc_root, device=device,
                       scenario=str(Path(scenario.source).resolve()),
                       cache_dir=str(Path(config.cache_dir).expanduser().resolve()),
                       rd_iters=rd_iters, redistill_iters=redistill_iters, batch_size=batch_size,
                       direct_iters=direct_iters)
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
