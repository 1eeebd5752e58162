"""The DiReDi server strategy on Flower's Message API.

One round (``DiReDiStrategy.start``):

1. ``configure_train`` -> "train" to every sampled node: the tutor (its full weights only to a node
   that has not received a tutor yet, afterwards its neck/head: eq. 10 never changes the body) (or, with
   ``share_tutor1``, Tutor 1 computed once on the server from public presumed data, as long as
   every client holds the server's edge: after client-side Distill C each client's edge is its
   own, and so is its Tutor 1), the edge weights (only to nodes that do not hold their own edge
   yet) and the run configuration;
2. clients run dual-tutor reverse distillation and reply the neck/head delta + metrics;
3. ``aggregate_train``: read -> verify -> bound -> merge -> apply. Each delta is verified (structure,
   norm, candidate tutor per class on the manufacturer's validation set, protected classes; the figures
   come from ``strategies.validator.CandidateValidator``, the gates from ``strategies.verify``), the
   accepted ones are bounded and merged (``strategies.aggregate``) and the tutor moves by beta * merged
   delta (eq. 10);
4. re-distillation (Distill C) from the updated tutor: ``redistill="client"`` sends "train.distill"
   (each client distils its own edge on its own data and keeps it); ``redistill="server"`` distils
   one edge on the server from public presumed data and sends it out with "evaluate"; with the edge
   check (client re-distillation), each "train.distill" reply carries the client's new edge, the server
   evaluates it on the validation set as it arrives (``check_edge``) and an "evaluate" message tells the
   client to deploy it or to keep its earlier edge (``configure_deploy``); with spread
   (``spread_data``), the server first distils the updated tutor into an edge of its own on the
   manufacturer's images (``distill.rd.spread_distill``) and each client's Distill C starts from it;
5. one record per client (``strategies.ledger.Recorder``): AP of its edge on its test shard before
   the round and after Distill C, bytes, seconds per phase, memory, and the verification verdict.

Why ``start`` is overridden: Flower's loop has one client step per phase (train, then evaluate),
and the array ``aggregate_train`` returns becomes the next global model. DiReDi has two client
steps per round (RD, then Distill C) and two server models (tutor and edge). Overriding ``start``
keeps ``aggregate_train`` a pure "verify and merge" hook (testable with hand-made replies, no grid)
and makes the second round trip an explicit step instead of a side effect hidden in a hook.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from torch import Tensor, nn

from data.voc import CLASS_INDEX, VOC_CLASSES
from distill.body_memo import BodyMemo
from distill.rd import ClientTraining, distill_c, reverse_distill_tutor1, server_reference_update, spread_distill
from evaluation.ap import nan_mean
from models.parts import CLASS_ROW_PARAMS, clip_delta, load_neck_head, neck_head, substitute
from protocol.config import CALIBRATIONS
from protocol.wire import (AFTER, AP_AFTER, AP_BEFORE, BEFORE, CONFIG, DELTA, DEPLOY_EDGE, DISTILL, DIREDI_WORK,
                           EDGE, EVALUATE, EDGE_SOURCE, METHOD, METRICS, NUM_EXAMPLES, PARTITION_ID, SERVER,
                           SERVER_ROUND, SPREAD_EDGE, TRAIN, TRAINED, TUTOR, TUTOR1, WORK, MalformedDelta, TutorRecords,
                           decode, encode, state_record, unpack_delta, work_seed)
from report.checkpoint import prefixed, unprefixed
from strategies.aggregate import (AGGREGATION_METHODS, aggregate, bound_influence, mean_row_norms, mean_rows,
                                  norm_cap, row_mean_factors, row_norms, size_setting_factors)
from strategies.calibrate import calibrated_classes, moved, offset_search, search_shifts, shift_class_biases
from strategies.exchange import exchange
from strategies.ledger import ClientSampler, Clock, Recorder, RoundLedger
from strategies.merge_gates import harm_merge, operating_point_merge, protected_appeal
from strategies.validator import CandidateValidator, EdgeVerdict
from strategies.verify import (Decision, VerificationPolicy, deploy_check, direction_check, diluting_claimer,
                               earned_claims, kept_check, peer_reference, protected_check, safe_norm,
                               stricter_claim_figures, structural_check)

log = logging.getLogger(__name__)


class DiReDiStrategy(Strategy):
    """Holds the tutor and the edge; verifies, merges and re-distils (see the module docstring).

    Args:
        tutor, edge: the manufacturer's models (changed in place as rounds go).
        validation_data, validation_classes: the manufacturer's validation set and the classes it
            is evaluated on (never a client's data).
        settings: RD / Distill C settings (beta of eq. 10, iterations for the server-side phases).
        policy: verification policy (default: no norm bound, no protected classes).
        presumed_data: the manufacturer's public presumed data; needed by ``share_tutor1`` and
            ``redistill="server"``.
        aggregation, aggregation_options: one of ``AGGREGATION_METHODS`` ("weighted", "trimmed", "ties",
            "krum", "class_aware") and its options (``strategies.aggregate.aggregate``). The class's
            default, "weighted", is the plain merge for direct use; a run's default is "class_aware"
            (``RunConfig.aggregation``, chosen in experiments/results/merge.md).
        redistill: "client" (each client distils its own edge on its data) or "server".
        edge_check: with client re-distillation, each client's re-distilled edge comes back (the
            edge's 1.7 MB in the cpu profile) and is deployed only when its protected classes' AP on the
            validation set stays within the policy's tolerance of the manufacturer's edge
            (``check_edge``); otherwise the client keeps the edge it deployed before.
        spread_data: with client re-distillation, the manufacturer's images on which the server
            distils the updated tutor into an edge of its own each round (``spread_edge``, starting from
            the manufacturer's edge; the images' labels are not used), which every "train.distill"
            carries as the start of the client's Distill C (the edge's 1.7 MB down). None: off.
        spread_iters: the server's distillation steps per round into that edge (0: as many as a
            client's Distill C, ``settings.redistill_iters``).
        spread_memo: the server keeps the tutor body's outputs on the spread images from round to round
            (``distill.body_memo``; no round changes the tutor's body), in memory: fewer body passes, the
            same figures, about 0.23 MB per image and flip in the cpu profile.
        num_nodes, fraction: the federation's nodes, and the share of them sampled each round.
        recorder: where records, decisions and failures go (``strategies.ledger.Recorder``).
        reference_fn: ``reference_fn(tutor)`` -> the server's own reference update for the direction
            check (``strategies.verify.direction_check``), asked once per tutor version. None (the
            default): the policy's ``direction_reference`` decides: "peers" (``peer_reference``),
            "server" (``server_reference_update`` on ``presumed_data``), "" no direction check (the
            decisions record NaN).
    """

    method = "diredi"

    def __init__(self, tutor: nn.Module, edge: nn.Module, validation_data, validation_classes: Iterable[str],
                 settings: ClientTraining, policy: VerificationPolicy | None = None, *, presumed_data=None,
                 share_tutor1: bool = False, aggregation: str = "weighted",
                 aggregation_options: Mapping[str, Any] | None = None, redistill: str = "client",
                 edge_check: bool = False, spread_data=None, spread_iters: int = 0, spread_memo: bool = False,
                 calibrate: str = "off", calibrate_reach: float = 3.0, num_nodes: int = 1,
                 fraction: float = 1.0, seed: int = 0,
                 recorder: Recorder | None = None,
                 reference_fn: Callable[[nn.Module], Mapping[str, Tensor] | None] | None = None) -> None:
        if aggregation not in AGGREGATION_METHODS:
            raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {', '.join(AGGREGATION_METHODS)}")
        if calibrate not in CALIBRATIONS:
            raise ValueError(f"calibrate must be one of {', '.join(CALIBRATIONS)}, got {calibrate!r}")
        if redistill not in ("client", "server"):
            raise ValueError(f"redistill must be 'client' or 'server', got {redistill!r}")
        if edge_check and redistill != "client":
            raise ValueError("edge_check checks the edges clients re-distil: it needs redistill='client'")
        if spread_data is not None and redistill != "client":
            raise ValueError("spread starts the clients' Distill C from the server's edge: it needs redistill='client'")
        if (share_tutor1 or redistill == "server" or (policy and policy.direction_reference == "server")) \
                and presumed_data is None:
            raise ValueError("share_tutor1, redistill='server' and a server reference need the manufacturer's "
                             "presumed_data")
        self.tutor, self.edge = tutor.eval(), edge.eval()
        self.validation_data, self.validation_classes = validation_data, list(validation_classes)
        self.settings = settings
        # Every validation figure the gates read (the tutor's and each candidate's, cached per tutor version)
        self.validator = CandidateValidator(self.tutor, validation_data, self.validation_classes,
                                            policy or VerificationPolicy(), settings.beta, seed)
        self.presumed_data = presumed_data
        self.share_tutor1, self.redistill, self.edge_check = share_tutor1, redistill, edge_check
        self.spread_data, self.spread_iters = spread_data, spread_iters
        self.spread_edge = copy.deepcopy(edge).eval() if spread_data is not None else None
        self.spread_memo = BodyMemo.for_model(self.tutor) if spread_data is not None and spread_memo else None
        self.aggregation, self.aggregation_options = aggregation, dict(aggregation_options or {})
        self.calibrate, self.calibrate_reach = calibrate, calibrate_reach
        self._calibration: dict | None = None  # the last merge's calibration, for the tutor's history
        self._merged_rows: dict | None = None  # the last merge's class-row sizes, for the tutor's history
        self.offsets: dict[str, float] = {}  # f1-offsets: the deployed tutor's per-class score offsets (logits)
        self.num_nodes, self.seed = num_nodes, seed
        self.sampler = ClientSampler(num_nodes, fraction, seed)  # also the node id -> partition id map
        self.recorder = recorder or Recorder(self.method)
        self.ledger: RoundLedger | None = None  # the round in progress
        self._accepted = 0  # accepted deltas of the round in progress
        self._screen_seconds: dict[int, tuple[float, float]] = {}  # node -> (wall, cpu) its candidate took on arrival
        self._summary_due: int | None = None  # the round whose updated tutor is still to be recorded
        self.reference_fn = reference_fn  # the direction check's reference (None: the policy decides)
        self._reference: Mapping[str, Tensor] | None = None  # the server's reference for the current tutor ...
        self._reference_asked = False  # ... once asked (reference_delta)
        self._shared_tutor1: tuple[int, nn.Module] | None = None  # (round, the server's Tutor 1 of that round)
        self._nodes_with_edge: set[int] = set()  # nodes that keep their own edge (client re-distillation)
        self._nodes_with_body: set[int] = set()  # nodes that hold the tutor's backbone body (it never changes)
        self._restored_partitions: dict[str, list[int]] | None = None  # a checkpoint's, until mapped to nodes
        self.checkpoint_fn: Callable[[int, dict[str, Tensor], dict], Any] | None = None  # called after each round
        # Tutor 1 emulates the edge it is computed from: one shared Tutor 1 serves while every client
        # still holds the server's edge; once clients have re-distilled their own, each computes its own.
        self._client_edges_changed = False
        # The edge check: the manufacturer's edge's validation AP and detections (its reference), and
        # this round's verdict on each client's re-distilled edge (node -> EdgeVerdict)
        self._edge_reference: tuple[dict[str, float], list[dict]] | None = None
        self._edge_verdicts: dict[int, EdgeVerdict] = {}

    @property
    def policy(self) -> VerificationPolicy:
        return self.validator.policy

    @policy.setter
    def policy(self, policy: VerificationPolicy) -> None:
        self.validator.policy = policy

    # -- Flower hooks ---------------------------------------------------------------------------

    def summary(self) -> None:
        log.info("DiReDi: aggregation %s %s, redistill on the %s, shared tutor 1 %s, beta %s, policy %s",
                 self.aggregation, self.aggregation_options, self.redistill, self.share_tutor1,
                 self.settings.beta, self.policy)

    def _config(self, config: ConfigRecord, server_round: int, edge_source: str) -> ConfigRecord:
        return ConfigRecord({**dict(config), METHOD: self.method, WORK: DIREDI_WORK, SERVER_ROUND: server_round,
                             EDGE_SOURCE: edge_source})

    def _open_round(self, server_round: int) -> RoundLedger:
        if self.ledger is None or self.ledger.server_round != server_round:
            self.ledger, self._accepted = RoundLedger(server_round), 0
        return self.ledger

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """"train" to each sampled node. ``arrays`` is unused: the strategy holds its models."""
        ledger = self._open_round(server_round)
        if self._restored_partitions is not None:  # resumed: node ids are new in every run, partitions are not
            self._map_restored_partitions(self.sampler.identities(grid))
        nodes = self.sampler.nodes(grid, server_round)
        cfg = self._config(config, server_round, "stored" if self.redistill == "client" else "received")
        tutors = {}  # record name -> the model it carries (full to a node's first message, then neck/head)
        if self.share_tutor1 and not self._client_edges_changed:
            clock = Clock()
            tutor1, _ = reverse_distill_tutor1(self.tutor, self.edge, self.presumed_data, self.settings,
                                               seed=work_seed(self.seed, server_round, SERVER))
            self._shared_tutor1 = (server_round, tutor1)  # the server's reference update starts from it too
            # One Tutor 1 serves every client: its cost is shared among them in the records.
            ledger.charge("server_tutor1", clock, len(nodes))
            tutors[TUTOR1] = tutor1
            if not self.settings.t2_from_t1:  # tutor 2 then starts from the tutor itself
                tutors[TUTOR] = self.tutor
        else:
            tutors[TUTOR] = self.tutor
        as_sent = {name: TutorRecords(model) for name, model in tutors.items()}
        edge_record = state_record(self.edge)
        messages = []
        for node in nodes:
            content = RecordDict({CONFIG: cfg, **{name: records.for_node(node, self._nodes_with_body)
                                                  for name, records in as_sent.items()}})
            if self.redistill == "server" or node not in self._nodes_with_edge:
                content[EDGE] = edge_record
            messages.append(Message(content=content, message_type=TRAIN, dst_node_id=node))
        return ledger.count_down(messages)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Verifies every delta, merges the accepted ones and updates the tutor (eq. 10).

        Returns the tutor's full weights and {received, accepted, rejected}; the tutor is unchanged
        (and None is returned for the arrays) when no delta is accepted.
        """
        ledger = self._open_round(server_round)
        replies = list(replies)
        ok = self.recorder.split(replies, "train", server_round)
        self.recorder.fail_unanswered(ledger, replies, "train")
        if not self.recorder.tutor_history:
            self.recorder.tutor_history.append(self._tutor_summary(0))
        # 1. read every delta, then verify each (the direction check's references need all of them)
        read = [self._timed_read(reply) for reply in ok]
        references = self._references(server_round, [delta for delta, _, _ in read])  # before any verify_seconds
        decisions, accepted, appellants = [], [], []  # (delta, decision): accepted, and rejected by the protected gate alone
        claimed_by: dict[int, set[str]] = {}  # partition id -> the classes it says it trained
        for reply, (delta, problem, read_seconds), reference in zip(ok, read, references):
            metrics = reply.content[METRICS]
            clock = Clock()
            claims = [name for name in decode(metrics, TRAINED) if name in CLASS_INDEX]
            decision = self.verify(delta, int(metrics[PARTITION_ID]), server_round,
                                   weight=float(metrics.get(NUM_EXAMPLES, math.nan)), problem=problem,
                                   reference=reference, claims=claims)
            entry = ledger.count_up(reply)
            self._nodes_with_body.add(entry.node)  # it received the full tutor once and keeps the body
            self.sampler.learn(entry.node, int(metrics[PARTITION_ID]))
            # reading the delta, screening its candidate on arrival and verifying it: (wall, cpu) each
            spent = zip(clock.seconds(), read_seconds, self._screen_seconds.pop(entry.node, (0.0, 0.0)))
            entry.verify_seconds, entry.verify_cpu_seconds = (sum(parts) for parts in spent)
            entry.train, entry.decision = dict(metrics), decision
            decisions.append(decision)
            claimed_by[decision.client] = set(claims)
            if decision.accepted:
                accepted.append((delta, decision))
            elif decision.rejected_by == ["protected"]:
                appellants.append((delta, decision))
        # 2-3. claims and bounds (``bounded_merge``); with protected_scope "merge", a delta the protected gate
        # rejected alone is judged again inside the round's merge (strategies.merge_gates.protected_appeal)
        if appellants and self.policy.protected_scope == "merge":
            accepted = protected_appeal(self.validator, server_round, accepted, appellants,
                                        lambda pairs: self.bounded_merge(pairs, claimed_by)(list(range(len(pairs)))))
        merge = self.bounded_merge(accepted, claimed_by, record=True)
        accepted_decisions = [decision for _, decision in accepted]
        for decision in accepted_decisions:
            if decision.weight_used < decision.weight:
                log.warning("round %d client %d: claimed weight %.4g capped at %.4g", server_round,
                            decision.client, decision.weight, decision.weight_used)
        # 4. the merge's operating point, then the merge itself and eq. 10
        kept = list(range(len(accepted)))
        if kept and math.isfinite(self.policy.operating_tolerance):
            kept = operating_point_merge(self.validator, server_round, kept, merge, accepted_decisions)
        if len(kept) >= 3 and math.isfinite(self.policy.operating_harm):
            kept = harm_merge(self.validator, server_round, kept, merge, accepted_decisions)
        for decision in decisions:  # logged once complete (the verification log is written as it goes)
            self.recorder.decide(decision)
        self._accepted = len(kept)
        summary = MetricRecord({"received": len(ok), "accepted": len(kept), "rejected": len(ok) - len(kept)})
        if not kept:
            log.warning("round %d: no delta accepted; the tutor is unchanged", server_round)
            self.recorder.tutor_history.append(self._tutor_summary(server_round))
            return None, summary
        load_neck_head(self.tutor, substitute(neck_head(self.tutor), merge(kept), self.settings.beta))
        self.validator.tutor_changed()  # every cached figure belongs to the tutor that was
        if self.calibrate in ("f1", "f1-learnt"):  # 5. the server sets the merged tutor's operating point
            self._calibrate_tutor(server_round)  # (strategies.calibrate; f1-offsets: in record_tutor)
        self._reference, self._reference_asked = None, False
        # The paper's "updated tutor", per round: evaluated by ``record_tutor``, which ``start`` runs
        # while the clients re-distil (nothing in this round needs it before).
        self._summary_due = server_round
        return state_record(self.tutor), summary

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """"evaluate" with the server's edge to this round's participants (server re-distillation)."""
        return self._to_participants(server_round, EVALUATE, self._config(config, server_round, "received"),
                                     EDGE, self.edge)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Stores each client's evaluation of the re-distilled edge (ap-after)."""
        return self._collect_after(server_round, replies, "evaluate")

    # -- the second client step: Distill C ---------------------------------------------------

    def configure_distill(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """"train.distill" with the updated tutor (with spread, also the server's edge) to the participants."""
        spread = {SPREAD_EDGE: state_record(self.spread_edge)} if self.spread_edge is not None else {}
        return self._to_participants(server_round, DISTILL, self._config(config, server_round, "stored"),
                                     TUTOR, TutorRecords(self.tutor), extra=spread)

    def distil_spread_edge(self, server_round: int) -> nn.Module:
        """Spread: the server's edge distilled from the updated tutor on the manufacturer's images
        (``distill.rd.spread_distill``, on every class the validation set holds)."""
        edge, _ = spread_distill(self.spread_edge, self.tutor, self.spread_data, self.settings,
                                 seed=work_seed(self.seed, server_round, SERVER),
                                 classes=tuple(CLASS_INDEX[c] for c in self.validation_classes),
                                 iters=self.spread_iters, body_memo=self.spread_memo)
        return edge.eval()

    def _to_participants(self, server_round: int, message_type: str, config: ConfigRecord, name: str,
                         model: "nn.Module | TutorRecords",
                         extra: Mapping[str, ArrayRecord] | None = None) -> list[Message]:
        """One message with ``model`` under ``name`` (and ``extra``'s records) to every node that trained
        this round (bytes counted)."""
        ledger = self._open_round(server_round)
        full = state_record(model) if isinstance(model, nn.Module) else None

        def record(node: int) -> ArrayRecord:
            return full if full is not None else model.for_node(node, self._nodes_with_body)

        return ledger.count_down(Message(content=RecordDict({CONFIG: config, name: record(entry.node),
                                                             **(extra or {})}),
                                         message_type=message_type, dst_node_id=entry.node)
                                 for entry in ledger.trained)

    def aggregate_distill(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._collect_after(server_round, replies, "distill")

    def redistill_edges(self, server_round: int, grid: Grid, config: ConfigRecord, timeout: float) -> None:
        """Distill C from the updated tutor, on the clients or on the server (see the class doc).

        Skipped when no delta was accepted: the tutor holds nothing new, so every edge stays as
        it was (its ap_after is its ap_before).
        """
        ledger = self._open_round(server_round)
        trained = ledger.trained
        if not trained:
            return
        if self.redistill == "client":  # every node that answered "train" now keeps an edge of its own
            self._nodes_with_edge.update(entry.node for entry in trained)
        if self._accepted == 0:
            for entry in trained:
                entry.after = {**encode(AP_AFTER, decode(entry.train, AP_BEFORE)),
                               **encode(AFTER, decode(entry.train, BEFORE))}
            return
        if self.redistill == "client":
            self._edge_verdicts = {}
            if self.spread_edge is not None:
                clock = Clock()
                self.spread_edge = self.distil_spread_edge(server_round)
                ledger.charge("server_spread", clock, len(trained))
            replies = exchange(grid, self.configure_distill(server_round, config), timeout, meanwhile=self.record_tutor,
                               on_reply=self.check_edge if self.edge_check else None)
            self.aggregate_distill(server_round, replies)
            if self.edge_check:  # each client deploys its new edge or keeps its earlier one, then evaluates it
                messages = self.configure_deploy(server_round, config)
                self._collect_after(server_round, exchange(grid, messages, timeout), "deploy",
                                    expected={m.metadata.dst_node_id for m in messages})
            self._client_edges_changed = True
        else:
            clock = Clock()
            self.edge, _ = distill_c(self.edge, self.tutor, self.presumed_data, self.settings,
                                     seed=work_seed(self.seed, server_round, SERVER))
            self.edge.eval()
            ledger.charge("server_distill_c", clock, len(trained))
            messages = self.configure_evaluate(server_round, ArrayRecord(), config, grid)
            self.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))

    # -- the edge check: the manufacturer's gate before a client deploys its re-distilled edge ------

    def edge_reference(self) -> tuple[dict[str, float], list[dict]]:
        """The manufacturer's edge's validation AP and detections, the edge check's reference (computed
        once: with client re-distillation the server's edge never changes)."""
        if self._edge_reference is None:
            self._edge_reference = self.validator.validate_edge(self.edge)
        return self._edge_reference

    def _received_edge(self, reply: Message) -> nn.Module:
        """The edge in a "train.distill" reply, in the manufacturer's edge's architecture (strict loading:
        a missing, extra or misshapen tensor raises)."""
        if EDGE not in reply.content.array_records:
            raise KeyError("the reply holds no edge")
        candidate = copy.deepcopy(self.edge)
        candidate.load_state_dict(reply.content.array_records[EDGE].to_torch_state_dict(), strict=True)
        return candidate.eval()

    def check_edge(self, reply: Message) -> None:
        """On a "train.distill" reply's arrival (while other clients still distil): its edge's
        validation AP against the manufacturer's edge on the protected classes (``deploy_check``), with
        the drop's bootstrap noise as the tutor's check uses it. The verdict waits for ``configure_deploy``."""
        if reply.has_error():
            return
        node, start = reply.metadata.src_node_id, time.perf_counter()
        try:
            candidate = self._received_edge(reply)
        except (KeyError, RuntimeError, ValueError) as problem:
            self._edge_verdicts[node] = EdgeVerdict(False, f"edge not readable: {problem}", {})
            return
        reference_ap, reference_predictions = self.edge_reference()
        ap, predictions = self.validator.validate_edge(candidate)
        server_round = self.ledger.server_round if self.ledger is not None else 0
        noise = self.validator.protected_drop_noise(reference_predictions, predictions, server_round)
        ok, reason, figures = deploy_check(reference_ap, ap, self.policy, noise)
        self._edge_verdicts[node] = EdgeVerdict(ok, reason, figures, nan_mean(ap.values()),
                                                time.perf_counter() - start)

    def configure_deploy(self, server_round: int, config: ConfigRecord) -> list[Message]:
        """"evaluate" with the verdict (``DEPLOY_EDGE`` 1 or 0) to every node whose "train.distill" reply
        came; the verdict's figures join the node's record. A node whose reply held no readable edge
        keeps its earlier edge."""
        ledger = self._open_round(server_round)
        messages = []
        for entry in ledger.trained:
            if not entry.redistilled:
                continue
            verdict = self._edge_verdicts.pop(entry.node, None) or EdgeVerdict(False, "no edge came back", {})
            log.log(logging.INFO if verdict.deploy else logging.WARNING, "round %d client %s: edge %s (%s)",
                    server_round, entry.train[PARTITION_ID], "deployed" if verdict.deploy else "KEPT AS BEFORE",
                    verdict.reason)
            entry.after = {**(entry.after or {}), **verdict.metrics()}
            cfg = ConfigRecord({**dict(self._config(config, server_round, "stored")), DEPLOY_EDGE: int(verdict.deploy)})
            messages.append(Message(content=RecordDict({CONFIG: cfg}), message_type=EVALUATE, dst_node_id=entry.node))
        return ledger.count_down(messages)

    # -- the round loop -----------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int = 1,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None, start_round: int = 1) -> Result:
        """Runs DiReDi rounds ``start_round`` .. ``num_rounds`` (``start_round`` > 1 after ``restore``).
        ``initial_arrays`` is ignored (the strategy holds the tutor and edge); ``train_config`` holds
        the run configuration every client needs; ``timeout`` bounds each round trip (RD, then
        Distill C). After each round, ``checkpoint_fn(round, *self.checkpoint())`` when set."""
        self.summary()
        config = train_config if train_config is not None else ConfigRecord()
        result = Result(arrays=state_record(self.tutor))
        for server_round in range(start_round, num_rounds + 1):
            log.info("DiReDi round %d/%d", server_round, num_rounds)
            # The tutor's own validation AP: in round 1 with the body's features of the validation images,
            # built here while no client works (later rounds: done while the clients re-distilled).
            self.validator.tutor_ap()
            messages = self.configure_train(server_round, result.arrays, config, grid)
            # While the clients train, each delta's candidate tutor is evaluated as its reply arrives.
            replies = exchange(grid, messages, timeout, on_reply=self.screen)
            arrays, summary = self.aggregate_train(server_round, replies)
            if not self.ledger.trained:
                raise RuntimeError(f"round {server_round}: no client returned a delta ({len(replies)} replies "
                                   f"of {len(messages)}): {self.recorder.failure_reasons(server_round) or 'timed out'}")
            if arrays is not None:
                result.arrays = arrays
            result.train_metrics_clientapp[server_round] = summary
            self.redistill_edges(server_round, grid, config, timeout)
            self.record_tutor()
            self.recorder.close_round(self.ledger)
            if self.checkpoint_fn is not None:
                self.checkpoint_fn(server_round, *self.checkpoint())
        return result

    def final_models(self, result: Result) -> dict[str, dict[str, Tensor]]:
        """The models a finished run keeps (``strategies.server_app.MethodResult``): the tutor, and the
        server's edge when the server re-distils it (with client re-distillation every client has its own)."""
        edge = {"edge_state": self.edge.state_dict()} if self.redistill == "server" else {}
        return {"tutor_state": self.tutor.state_dict(), **edge}

    # -- checkpoint and resume ----------------------------------------------------------------

    def checkpoint(self) -> tuple[dict[str, Tensor], dict]:
        """The state the next round needs (``report.checkpoint``): tutor and edge (and the spread edge),
        which clients (by partition) hold the tutor's body and an edge of their own, and the tutor's history."""
        def partitions(nodes: set[int]) -> list[int]:
            return sorted(self.sampler.partition_of(n) for n in nodes)

        meta = {"partitions_with_body": partitions(self._nodes_with_body),
                "partitions_with_edge": partitions(self._nodes_with_edge),
                "client_edges_changed": self._client_edges_changed, "tutor_history": self.recorder.tutor_history,
                "offsets": dict(self.offsets)}
        spread = prefixed("spread", self.spread_edge.state_dict()) if self.spread_edge is not None else {}
        models = {**prefixed("tutor", self.tutor.state_dict()), **prefixed("edge", self.edge.state_dict())}
        return {**models, **spread}, meta

    def restore(self, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> None:
        """Back to a ``checkpoint``; the next ``configure_train`` maps its partitions to this run's nodes."""
        self.tutor.load_state_dict(unprefixed("tutor", tensors))
        self.edge.load_state_dict(unprefixed("edge", tensors))
        if self.spread_edge is not None:
            self.spread_edge.load_state_dict(unprefixed("spread", tensors))
        self._restored_partitions = {k: list(meta[k]) for k in ("partitions_with_body", "partitions_with_edge")}
        self._client_edges_changed = bool(meta["client_edges_changed"])
        self.recorder.tutor_history = list(meta["tutor_history"])
        self.offsets = dict(meta.get("offsets", {}))  # (checkpoints before f1-offsets have none)
        self.validator.reset()
        self._reference, self._reference_asked = None, False

    def _map_restored_partitions(self, identities: Mapping[int, int]) -> None:
        holders = self._restored_partitions
        self._nodes_with_body = {n for n, p in identities.items() if p in holders["partitions_with_body"]}
        self._nodes_with_edge = {n for n, p in identities.items() if p in holders["partitions_with_edge"]}
        self._restored_partitions = None

    # -- verification -------------------------------------------------------------------------

    def bounded_merge(self, accepted: list, claimed_by: Mapping[int, set[str]],
                      record: bool = False) -> Callable[[list[int]], dict[str, Tensor]]:
        """Steps 2 and 3 of ``aggregate_train`` over ``accepted`` ((delta, decision) pairs; ``claimed_by``: each
        client's claimed classes): claims earned, not trusted (each class's rows from the claimers whose
        candidates improve it, or, when none does, hold it; under "improving" nobody's: ``earned_claims``), then
        bounded influence (``strategies.aggregate.bound_influence``; class rows are bounded among the deltas they
        are merged from: class-aware, the claimers; any other rule, every accepted delta). With the policy's
        ``dilution_check`` "on", a learned class's claim that only holds is also left out where its row dilutes the
        class (``dilution_checked``). Returns the merge of any subset (indices into ``accepted``); ``record``: the
        decisions keep the claim verdicts and bounds."""
        decisions = [decision for _, decision in accepted]
        claimed = [claimed_by.get(d.client, set()) for d in decisions]
        if self.policy.claims != "trusted":
            # a claim is earned by the delta as sent and as merged: one the norm clip cuts is judged again as
            # clipped (its candidate evaluated on validation) and the stricter verdict stands (stricter_claim_figures)
            cap = norm_cap([d.norm for d in decisions], self.policy.clip_norm, self.policy.clip_multiple)
            gains, noise, shifts = ([d.claim_gain for d in decisions], [d.claim_noise for d in decisions],
                                    [d.claim_shift for d in decisions])
            # (the lifting rule's row shifts stand as sent: clipping scales a row, not the sign of its shift)
            for i, (delta, decision) in enumerate(accepted):
                if decision.claim_gain and decision.norm > cap:
                    clipped, _ = clip_delta(delta, cap)
                    merged_gain, merged_noise, _ = self.claim_figures(clipped, list(decision.claim_gain),
                                                                      decision.round)
                    gains[i], noise[i] = stricter_claim_figures((gains[i], noise[i]), (merged_gain, merged_noise),
                                                                self.policy)
                    if record:
                        decision.claim_gain_clipped, decision.claim_noise_clipped = merged_gain, merged_noise
            claimed, verdicts = earned_claims(gains, noise, self.policy, shifts)
            diluting: list[dict[str, tuple[float, float]]] = [{} for _ in accepted]
            if self.policy.dilution_check == "on" and self.aggregation == "class_aware":
                claimed, diluting = self.dilution_checked(accepted, claimed, verdicts)
            if record:
                for decision, names, verdict, rises in zip(decisions, claimed, verdicts, diluting):
                    decision.claims = {c: v if c in names else
                                       f"{v}, dilutes (+{rises[c][0]:.4f} AP left out, noise {rises[c][1]:.4f})"
                                       if c in rises else f"{v}, dropped" for c, v in verdict.items()}
        return self._merge_of(accepted, claimed, record)

    def dilution_checked(self, accepted: list, claimed: list[set[str]], verdicts: list[dict[str, str]]
                         ) -> tuple[list[set[str]], list[dict[str, tuple[float, float]]]]:
        """``claimed`` without the claims that dilute their class (``policy.dilution_check``): for each class the tutor
        learns from clients whose counted claimers all merely hold it (``earned_claims``' "holds": none improves
        it), the round's merge is evaluated on validation with every claimer's row of it and with each claimer's
        left out (the rest of the merge as it is); the claimer whose absence raises the class's AP most beyond
        noise (``strategies.verify.diluting_claimer``) loses that claim, and the class is checked again among the
        rest. Returns (the claims kept, per delta {class: (the AP rise without its row, that rise's noise)} for
        the claims dropped)."""
        claimed = [set(names) for names in claimed]
        found: list[dict[str, tuple[float, float]]] = [{} for _ in accepted]
        every = list(range(len(accepted)))
        known = {*self.policy.kept_classes, *self.policy.protected_classes}
        server_round = accepted[0][1].round if accepted else 0
        for name in (c for c in VOC_CLASSES if c not in known):
            while True:
                holders = [i for i, names in enumerate(claimed) if name in names]
                if len(holders) < 2 or any(verdicts[i].get(name) != "holds" for i in holders):
                    break
                merged_ap, merged = self.validator.candidate_ap(self._merge_of(accepted, claimed)(every))
                without_ap, noise = [], []
                for i in holders:
                    fewer = [names - {name} if j == i else names for j, names in enumerate(claimed)]
                    ap, predictions = self.validator.candidate_ap(self._merge_of(accepted, fewer)(every))
                    without_ap.append(float(ap.get(name, math.nan)))
                    noise.append(self.validator.paired_noise(merged, predictions, name, server_round))
                k = diluting_claimer(float(merged_ap.get(name, math.nan)), without_ap, noise, self.policy.noise_z)
                if k is None:
                    break
                claimed[holders[k]].discard(name)
                found[holders[k]][name] = (without_ap[k] - float(merged_ap[name]), noise[k])
        return claimed, found

    def _merge_of(self, accepted: list, claimed: list[set[str]], record: bool = False
                  ) -> Callable[[list[int]], dict[str, Tensor]]:
        """Step 3 of ``aggregate_train``: the bounded merge of ``accepted`` whose class rows come from ``claimed``
        (each delta's classes, as the claim rule left them); ``bounded_merge`` says what it bounds."""
        decisions = [decision for _, decision in accepted]
        class_ids = [{CLASS_INDEX[name] for name in names} for names in claimed]  # each delta's merged classes
        every = set(range(len(CLASS_INDEX)))
        members = class_ids if self.aggregation == "class_aware" else [every] * len(accepted)
        known = {*self.policy.kept_classes, *self.policy.protected_classes}
        kinds = [int(name not in known) for name in VOC_CLASSES]  # 0: the tutor knows the class, 1: it learns it
        bounded = bound_influence([delta for delta, _ in accepted], [d.norm for d in decisions],
                                  [d.weight for d in decisions], members, clip_norm=self.policy.clip_norm,
                                  clip_multiple=self.policy.clip_multiple, row_multiple=self.policy.row_multiple,
                                  weight_multiple=self.policy.weight_cap,
                                  row_influence=self.policy.row_bound == "influence",
                                  row_floor=self.policy.row_reference == "row-or-round", row_kinds=kinds,
                                  kind_floor=self.policy.row_reference == "row-or-kind",
                                  tiny_rows=self.policy.row_share == "scaled",
                                  clip_shares=self.policy.clip_share in ("scaled", "sized"),
                                  clipped_rows_sized=self.policy.clip_share == "sized")
        if record:
            for i, decision in enumerate(decisions):
                decision.clip_factor = bounded.clip_factors[i]
                decision.row_clip = {VOC_CLASSES[c]: f for c, f in bounded.row_factors[i].items()}
                decision.row_share = {VOC_CLASSES[c]: f for c, f in bounded.row_shares[i].items()}
                norms = row_norms(accepted[i][0]) if all(n in accepted[i][0] for n in CLASS_ROW_PARAMS) else []
                decision.row_norm = {VOC_CLASSES[c]: norms[c] for c in sorted(members[i]) if c < len(norms)}
                decision.weight_used, decision.weight_cap = bounded.capped[i], bounded.weight_cap

        def merge(kept: list[int]) -> dict[str, Tensor]:
            options = dict(self.aggregation_options)
            if self.aggregation == "class_aware":  # each class's rows from the clients whose labels hold it
                options["client_classes"] = [class_ids[i] for i in kept]
            if self.aggregation in ("class_aware", "trimmed"):  # the trimmed mean counts a clipped delta by its share
                options["shares"] = [bounded.shares[i] for i in kept]
            if self.aggregation == "class_aware":
                options["row_shares"] = [bounded.row_shares[i] for i in kept]
                if self.policy.row_size == "learned":  # a class a few clients teach keeps its rows' size
                    options["restore_rows"] = [c for c, kind in enumerate(kinds) if kind == 1]
            merged = aggregate([bounded.deltas[i] for i in kept], [bounded.weights[i] for i in kept],
                               self.aggregation, **options)
            if record and self.aggregation == "class_aware" and all(n in merged for n in CLASS_ROW_PARAMS):
                # the merged rows' sizes beside their rows' mean size (the last merge made is the round's)
                factors = row_mean_factors([bounded.weights[i] for i in kept], options["client_classes"],
                                           len(VOC_CLASSES), options["row_shares"])
                rows = [bounded.deltas[i] for i in kept]
                means = mean_row_norms(rows, size_setting_factors(factors, options["row_shares"]))
                sizes, plain = row_norms(merged), row_norms(mean_rows(rows, factors))
                # size: as merged; mean_size: its rows' mean size (those counted whole); plain_size: the weighted
                # mean's own (below mean_size by what the rows' disagreement and any partial row cost it)
                self._merged_rows = {VOC_CLASSES[c]: {"size": sizes[c], "mean_size": m, "plain_size": plain[c]}
                                     for c, m in means.items()}
            return merged

        return merge

    def verify(self, delta: Mapping[str, Tensor] | None, client: int, server_round: int,
               weight: float = 1.0, problem: str | None = None,
               reference: Mapping[str, Tensor] | None | bool = False, claims: Iterable[str] = ()) -> Decision:
        """Structure, norm and weight first (a malformed delta goes no further); then every other gate,
        each recording its figure: the candidate tutor's per-class validation AP on the protected
        classes and on average over the kept classes, and the direction (when there is a reference:
        ``reference``, or when it is False, the server's own, ``reference_delta``). Accepted only when
        every gate passes; ``rejected_by`` names the gates that failed, the reason says why. Under the
        "earned" claim rule the candidate's AP gain (and its noise) on each of ``claims`` is recorded for
        the merge (``aggregate_train``)."""
        if delta is None:
            return Decision(client, server_round, False,
                            f"structure: {problem or 'the reply holds no delta array record'}",
                            weight=weight, rejected_by=["structure"])
        norm = safe_norm(delta)
        ok, reason = structural_check(delta, neck_head(self.tutor), self.policy.norm_bound)
        if not ok:
            return Decision(client, server_round, False, f"structure: {reason}", norm=norm, weight=weight,
                            rejected_by=["structure"])
        if not (math.isfinite(weight) and weight >= 0):
            return Decision(client, server_round, False, f"invalid aggregation weight {weight!r}", norm=norm,
                            weight=weight, rejected_by=["weight"])
        validator = self.validator
        before = validator.tutor_ap()
        after, _ = validator.candidate_ap(delta)
        claims = list(claims) if self.policy.claims != "trusted" else []
        noise = validator.candidate_noise(delta, server_round, claims)
        claim_gain, claim_noise, shifts = self.claim_figures(delta, claims, server_round)
        ok, reason, figures = protected_check(before, after, self.policy, noise)
        outcomes = [("protected", ok, reason)]  # (gate, ok, reason) of every active gate after structure
        kept_ok, kept_reason, kept = kept_check(before, after, self.policy)
        if math.isfinite(self.policy.kept_tolerance):  # at inf the gate only records the drop
            outcomes.append(("kept", kept_ok, kept_reason))
        recall = validator.operating_figures(delta, server_round)  # recorded; the gate checks the merge
        cosine = math.nan
        if reference is False:
            reference = self.reference_delta(server_round)
        if reference is not None:
            ok, reason, cosine = direction_check(delta, reference, self.policy.min_cosine,
                                                 self.policy.direction_scope)
            outcomes.append(("direction", ok, reason))
        failed = [(gate, why) for gate, passed, why in outcomes if not passed]
        reason = "; ".join(why for _, why in failed) if failed else "; ".join(why for _, _, why in outcomes)
        return Decision(client, server_round, not failed, reason, norm=norm, ap_before=figures["ap_before"],
                        ap_after=figures["ap_after"], val_map_before=nan_mean(before.values()),
                        val_map_after=nan_mean(after.values()), weight=weight, noise=figures["noise"],
                        tolerance=figures["tolerance"], rejected_by=[gate for gate, _ in failed],
                        kept_drop=kept["mean_drop"], cosine=cosine, claim_gain=claim_gain,
                        claim_noise=claim_noise, **shifts, **recall)

    def claim_figures(self, delta: Mapping[str, Tensor], claims: list[str], server_round: int
                      ) -> tuple[dict[str, float], dict[str, float], dict[str, dict[str, float]]]:
        """What ``earned_claims`` judges ``delta``'s claims by: per claimed class its candidate tutor's validation
        AP gain over the tutor, the gain's bootstrap std, and its row's score shifts (``claim_shifts``)."""
        validator = self.validator
        before, (after, _) = validator.tutor_ap(), validator.candidate_ap(delta)
        noise = validator.candidate_noise(delta, server_round, claims)
        gain = {c: float(after.get(c, math.nan)) - float(before.get(c, math.nan)) for c in claims}
        return gain, {c: noise.get(c, math.nan) for c in claims}, validator.claim_shifts(delta, claims)

    def screen(self, reply: Message) -> None:
        """The costly part of verifying a reply, done as soon as it arrives (``strategies.exchange``):
        its candidate tutor's validation AP and the noise of its protected-class drops. Nothing is decided here: ``aggregate_train`` verifies every
        reply in full (the direction check needs all of the round's deltas) and finds this work done. A
        reply that cannot be read or fails the structure check is left to it to reject with its reason."""
        if reply.has_error():
            return
        clock = Clock()
        try:
            delta = self._read_delta(reply)
        except MalformedDelta:
            return
        if delta is None or not structural_check(delta, neck_head(self.tutor), self.policy.norm_bound)[0]:
            return
        self.validator.candidate_ap(delta)
        if self.ledger is not None:
            claims = decode(reply.content[METRICS], TRAINED) if self.policy.claims != "trusted" else ()
            self.validator.candidate_noise(delta, self.ledger.server_round, claims)
        self._screen_seconds[reply.metadata.src_node_id] = clock.seconds()

    def record_tutor(self) -> None:
        """Appends the updated tutor's validation AP to its history, once per round (see aggregate_train)."""
        if self._summary_due is not None:
            if self.calibrate == "f1-offsets":  # nothing sent depends on the offsets: off the clients' path
                self._calibrate_tutor(self._summary_due)
            self.recorder.tutor_history.append(self._tutor_summary(self._summary_due))
            self._summary_due = None

    def _references(self, server_round: int, deltas: list[Mapping[str, Tensor] | None]) -> list:
        """Each delta's direction reference: with ``policy.direction_reference == "peers"`` (and no
        ``reference_fn``) the median of the round's other well-formed deltas (None for a malformed
        delta, or with fewer than 2 peers: no check), else the server's reference for all."""
        if self.reference_fn is not None or self.policy.direction_reference != "peers":
            reference = self.reference_delta(server_round)
            return [reference] * len(deltas)
        shapes = neck_head(self.tutor)
        well_formed = [i for i, d in enumerate(deltas)
                       if d is not None and structural_check(d, shapes, self.policy.norm_bound)[0]]
        peers = [deltas[i] for i in well_formed]
        references: list = [None] * len(deltas)
        for position, i in enumerate(well_formed):
            references[i] = peer_reference(peers, position)
        return references

    def reference_delta(self, server_round: int = 0) -> Mapping[str, Tensor] | None:
        """The server's reference update for the current tutor (computed once per tutor version, so
        once per round): ``reference_fn``'s, else with ``policy.direction_reference == "server"`` the
        server's own (``server_reference_update``, its seconds shared among the round's clients in
        the records); None when neither."""
        if not self._reference_asked:
            self._reference_asked = True
            if self.reference_fn is not None:
                self._reference = self.reference_fn(self.tutor)
            elif self.policy.direction_reference == "server":
                clock = Clock()
                tutor1 = self._shared_tutor1[1] if self._shared_tutor1 and self._shared_tutor1[0] == server_round else None
                self._reference = server_reference_update(self.tutor, self.edge, self.presumed_data, self.settings,
                                                          work_seed(self.seed, server_round, SERVER), tutor1)
                if self.ledger is not None and self.ledger.nodes:
                    self.ledger.charge("server_reference", clock, len(self.ledger.nodes))
        return self._reference

    def _calibrate_tutor(self, server_round: int) -> None:
        """Moves each class's classification bias of the merged tutor to its shift of best validation F1 at the
        operating threshold; the tutor's history records the shifts and each class's F1 before and after."""
        clock = Clock()
        classes = calibrated_classes(self.calibrate, self.validator.classes,
                                     (*self.policy.kept_classes, *self.policy.protected_classes))
        searched: dict[str, dict[float, list[float]]] = {}  # per class: offset (or shift) -> [F1, recall]

        def f1_of(shifts: Mapping[str, float]) -> dict[str, float]:
            f1, recall = self.validator.shifted_figures(shifts)
            for c, s in shifts.items():
                searched.setdefault(c, {}).setdefault(float(s), [float(f1[c]), float(recall[c])])
            return f1

        if self.calibrate == "f1-offsets":  # the weights stay as merged; the offsets change
            offsets, shifts, table = offset_search(f1_of, classes, self.offsets, reach=self.calibrate_reach)
            self.offsets = moved(offsets)
        else:
            shifts, table = search_shifts(f1_of, classes, reach=self.calibrate_reach)
            load_neck_head(self.tutor, shift_class_biases(neck_head(self.tutor),
                                                          {CLASS_INDEX[c]: s for c, s in moved(shifts).items()}))
            self.validator.tutor_changed()
        seconds = clock.seconds()[0]
        # F1 before and after as the search measured them (the history's "f1" is the calibrated tutor's own);
        # "search": per class, every [offset (f1-offsets; else the shift), F1, recall] measured, so that another
        # choice of operating point can be judged from a run's records
        self._calibration = {"shift": moved(shifts), "f1_before": {c: t[0.0] for c, t in table.items()},
                             "f1_after": {c: table[c][shifts[c]] for c in table}, "seconds": seconds,
                             "search": {c: [[offset, *figures] for offset, figures in sorted(searched[c].items())]
                                        for c in table}}
        if self.calibrate == "f1-offsets":  # searched while the clients distil: nothing to charge them
            self._calibration["offsets"] = dict(self.offsets)
        elif self.ledger is not None and self.ledger.nodes:  # the clients wait for it: each record carries its share
            self.ledger.charge("server_calibration", clock, len(self.ledger.nodes))
        log.info("round %d: calibration moved %s (%.1f s)", server_round,
                 ", ".join(f"{c} {s:+.2f}" for c, s in moved(shifts).items()) or "nothing",
                 self._calibration["seconds"])

    # -- helpers ------------------------------------------------------------------------------

    def _tutor_summary(self, server_round: int) -> dict:
        # The tutor as deployed: with f1-offsets its weights plus the offsets (the weights' own AP beside)
        ap, predictions = self.validator.deployed(self.offsets)
        summary = {"round": server_round, "ap": dict(ap), "mAP": nan_mean(ap.values()),
                   "recall": self.validator.recall(predictions),  # at the operating threshold, as eq. 11's F1
                   "f1": self.validator.f1(predictions)}
        if self.calibrate == "f1-offsets":
            summary["ap_weights"] = dict(self.validator.tutor_ap())
        if self._calibration is not None and server_round > 0:
            summary["calibration"], self._calibration = self._calibration, None
        if self._merged_rows is not None and server_round > 0:
            summary["merged_rows"], self._merged_rows = self._merged_rows, None
        if self.spread_edge is not None:  # what the clients' Distill C starts from: where spread is lost
            spread_ap = self.validator.validate_edge(self.spread_edge)[0]
            summary["spread_edge"] = {"ap": dict(spread_ap), "mAP": nan_mean(spread_ap.values())}
        return summary

    def _timed_read(self, reply: Message) -> tuple[dict[str, Tensor] | None, str | None, tuple[float, float]]:
        """(delta or None, the problem that made it unreadable or None, (wall, cpu) seconds reading took)."""
        clock = Clock()
        try:
            delta, problem = self._read_delta(reply), None
        except MalformedDelta as err:  # e.g. sparse indices outside the tensor
            delta, problem = None, str(err)
        return delta, problem, clock.seconds()

    def _read_delta(self, reply: Message) -> dict[str, Tensor] | None:
        """The reply's delta in float32 (dense, whatever precision or sparsity it travelled in)."""
        if DELTA not in reply.content.array_records:
            return None
        shapes = {name: value.shape for name, value in neck_head(self.tutor).items()}
        return unpack_delta(reply.content.array_records[DELTA], shapes)

    def _collect_after(self, server_round: int, replies: Iterable[Message], step: str,
                       expected: set[int] | None = None) -> MetricRecord | None:
        """Each reply's metrics join its node's "after" (the deploy step's to those of its Distill C);
        ``expected``: the nodes asked in this step (None: those without "after" yet)."""
        ledger = self._open_round(server_round)
        replies = list(replies)
        ok = self.recorder.split(replies, step, server_round)
        for reply in ok:
            if reply.metadata.src_node_id not in ledger.nodes:
                continue
            entry = ledger.count_up(reply)
            entry.after, entry.redistilled = {**(entry.after or {}), **dict(reply.content[METRICS])}, True
        answered = {reply.metadata.src_node_id for reply in replies}
        for entry in ledger.trained:  # a node whose reply never came (past the timeout) is a failure too
            asked = entry.after is None if expected is None else entry.node in expected
            if asked and entry.node not in answered:
                self.recorder.fail(server_round, step, entry.node, "no reply within the round's timeout")
        return MetricRecord({"replies": len(ok)})
