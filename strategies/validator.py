"""The manufacturer's validation set as the DiReDi server uses it: the figures every gate reads.

``CandidateValidator`` evaluates the tutor and each delta's candidate tutor (eq. 10 applied to the
current tutor) on the manufacturer's validation set, and caches what it can:

- the tutor's frozen body's features of the validation images, computed once (a candidate differs
  from the tutor only in neck/head, so only its neck/head runs per candidate);
- per tutor version: the tutor's AP, detections and recall at the operating threshold; each
  candidate's AP and detections (keyed by the delta's fingerprint, so a delta screened on arrival is
  not evaluated again when the round is verified); the bootstrap noise of each candidate's drop per
  class and round; the tutor's class patches for ``row_score_shift``.

``tutor_changed`` drops everything that belongs to the tutor that was (after a merge); ``reset`` also
drops the feature cache (after a restore). The gates themselves are pure functions in
``strategies.verify``; this object only supplies their inputs.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor, nn

from data.voc import CLASS_INDEX
from distill.trainer import torch_threads
from evaluation.ap import (ap_by_name, bootstrap_ap_drop, bootstrap_recall_drop, counts_at, f1_at, precision_recall_f1,
                           predict, recall_at)
from evaluation.features import EvaluationFeatures, FeaturesTooLarge
from models.io import state_fingerprint
from models.parts import load_neck_head, neck_head, substitute
from strategies.calibrate import shift_class_biases
from protocol.wire import EDGE_CHECK, encode
from strategies.verify import VerificationPolicy, guarded_classes, row_score_shift

log = logging.getLogger(__name__)

# Every validation (the tutor's, each candidate's) runs on one torch thread: it runs beside the client
# actors, which hold every core (``strategies.exchange``), and a fixed thread count keeps its figures
# bit-identical however the replies' arrival interleaves with it (CPU reductions split by thread count).
VALIDATION_THREADS = 1
# The calibration search's detections keep every box that can count at the operating threshold, with no cap
# per image or level (``operating_model``)
UNCAPPED = 10**9
# Validation images per batch of the body's cached features: the neck/head convolutions of a candidate
# run on small maps (16x16 and less at 128 px), where a larger batch costs less per image (0.91 -> 0.84 s
# per candidate on 448 images, one thread; the same detections, bit for bit, as with 16 per batch).
VALIDATION_BATCH = 64


@dataclass
class EdgeVerdict:
    """The manufacturer's verdict on one client's re-distilled edge (``DiReDiStrategy.check_edge``)."""

    deploy: bool
    reason: str
    figures: dict  # strategies.verify.deploy_check's: {"ap_before" (the reference), "ap_after", "noise", "tolerance"}
    val_map: float = math.nan  # the candidate edge's validation mAP over the manufacturer's classes
    seconds: float = 0.0

    def metrics(self) -> dict[str, float]:
        """"edge-check.*" metrics for the client's record (finite values only)."""
        out = {"deployed": float(self.deploy), "seconds": self.seconds, "val-map": self.val_map}
        for name, key in (("ap_before", "ap-reference"), ("ap_after", "ap-candidate"), ("noise", "noise"),
                          ("tolerance", "tolerance")):
            out.update({f"{key}.{c}": v for c, v in self.figures.get(name, {}).items()})
        return {k: v for k, v in encode(EDGE_CHECK, out).items() if math.isfinite(v)}


class CandidateValidator:
    """Validation figures of the tutor and of each delta's candidate tutor (see the module docstring).

    Args:
        tutor: the server's tutor (the same object the strategy updates in place).
        validation_data, validation_classes: the manufacturer's validation set and its classes.
        policy: the verification policy (bootstrap samples, ``noise_z``, the operating threshold, the
            protected and guarded classes).
        beta: eq. 10's substitution factor (a candidate is the tutor plus beta x the delta).
        seed: the run's seed; a round's bootstrap draws use ``seed + round``.
    """

    def __init__(self, tutor: nn.Module, validation_data, validation_classes: Iterable[str],
                 policy: VerificationPolicy, beta: float, seed: int) -> None:
        self.tutor, self.validation_data = tutor, validation_data
        self.classes = list(validation_classes)
        self.policy, self.beta, self.seed = policy, beta, seed
        self.targets: list[dict] = []  # the validation images' ground truth (set by the first evaluation)
        self.features: EvaluationFeatures | None = None  # the tutor body's features of the validation images
        self._features_tried = False  # False until the feature cache was built (or found too large)
        self.tutor_changed()

    def tutor_changed(self) -> None:
        """Forget every figure of the tutor that was (its AP, the candidates made from it, their noise)."""
        self._tutor_ap: dict[str, float] | None = None
        self.tutor_recall: dict[str, float] = {}  # recall at the operating threshold (with the tutor's AP)
        self.tutor_predictions: list[dict] = []
        self._candidates: dict[str, tuple[dict[str, float], list[dict]]] = {}  # delta fingerprint -> (AP, detections)
        self._noise: dict[tuple[str, int], dict[str, float]] = {}  # (delta fingerprint, round) -> bootstrap std
        self._class_patches: dict[str, Tensor] | None = None  # the tutor's, for row_score_shift

    def reset(self) -> None:
        """``tutor_changed``, and the body's feature cache too (the tutor's weights were loaded anew)."""
        self.tutor_changed()
        self.features, self._features_tried = None, False

    # -- the tutor and its candidates ---------------------------------------------------------

    def tutor_ap(self) -> dict[str, float]:
        """Per-class validation AP of the current tutor (evaluated once per tutor version)."""
        if self._tutor_ap is None:
            self._tutor_ap, self.tutor_predictions = self.validate(self.tutor)
            self.tutor_recall = self.recall(self.tutor_predictions)
        return self._tutor_ap

    def candidate_ap(self, delta: Mapping[str, Tensor]) -> tuple[dict[str, float], list[dict]]:
        """Validation AP and detections of the candidate tutor eq. 10 makes of ``delta``; each delta is
        evaluated once per tutor version (the strategy's ``screen`` may have done it on arrival)."""
        key = state_fingerprint(delta)
        if key not in self._candidates:
            self._candidates[key] = self.validate(self.tutor_with(substitute(neck_head(self.tutor), delta, self.beta)))
        return self._candidates[key]

    def candidate_noise(self, delta: Mapping[str, Tensor], server_round: int,
                        classes: Iterable[str] = ()) -> dict[str, float]:
        """How much the candidate's AP change on each protected class (and each of ``classes``, a client's
        claims) moves by chance on the validation images (bootstrap std; empty when ``noise_z`` is 0). Once
        per candidate and class, like ``candidate_ap``: it depends only on the two tutors' detections and
        the round's seed, so the strategy's ``screen`` computes it on arrival instead of after the last reply."""
        wanted = [c for c in dict.fromkeys((*self.policy.protected_classes, *classes)) if c in CLASS_INDEX]
        if not (self.policy.noise_z > 0 and wanted):
            return {}
        known = self._noise.setdefault((state_fingerprint(delta), server_round), {})
        missing = [c for c in wanted if c not in known]
        if missing:
            self.tutor_ap()  # the tutor's detections, which the drop is measured from
            _, predictions = self.candidate_ap(delta)
            std = bootstrap_ap_drop(self.tutor_predictions, predictions, self.targets,
                                    [CLASS_INDEX[c] for c in missing], samples=self.policy.bootstrap_samples,
                                    seed=self.seed + server_round)
            known.update({c: std[CLASS_INDEX[c]] for c in missing})
        return {c: known[c] for c in wanted}

    def paired_noise(self, before: list[dict], after: list[dict], name: str, server_round: int) -> float:
        """The bootstrap std of class ``name``'s AP difference between two candidates' detections of the validation
        images (paired, the round's draws; NaN without ``noise_z`` or without validation positives)."""
        if not (self.policy.noise_z > 0 and name in CLASS_INDEX):
            return math.nan
        self.tutor_ap()  # the targets
        std = bootstrap_ap_drop(before, after, self.targets, [CLASS_INDEX[name]],
                                samples=self.policy.bootstrap_samples, seed=self.seed + server_round)
        return std[CLASS_INDEX[name]]

    def shifted_figures(self, shifts: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
        """Validation F1 and recall at the operating threshold of each class in ``shifts``, for the tutor whose
        classification bias of each such class is moved by its shift (``strategies.calibrate``), from the
        detections of the ``operating_model``: each class's figures depend on its own shift alone."""
        counts = {c: [int(n.sum()) for n in found] for c, found in self.shifted_counts(shifts).items()}
        return ({c: precision_recall_f1(tp, fp, positives)[2] for c, (tp, fp, positives) in counts.items()},
                {c: tp / positives if positives else math.nan for c, (tp, _, positives) in counts.items()})

    def shifted_counts(self, shifts: Mapping[str, float]) -> dict[str, tuple]:
        """``shifted_figures``' detections counted per image (``evaluation.ap.counts_at``: true positives, false
        positives, positives at the operating threshold) for each class in ``shifts``: what a bootstrap replay
        of the calibration's choice resamples (``strategies.calibrate.offset_choice_noise``)."""
        self.tutor_ap()  # builds the feature cache and the targets
        moved = shift_class_biases(neck_head(self.tutor), {CLASS_INDEX[c]: s for c, s in shifts.items() if s})
        predictions = self.predictions(self.operating_model(moved))
        found = counts_at(predictions, self.targets, [CLASS_INDEX[c] for c in shifts], self.policy.operating_threshold)
        return {c: found[CLASS_INDEX[c]] for c in shifts}

    def operating_model(self, nh: Mapping[str, Tensor]) -> nn.Module:
        """The tutor with neck/head ``nh`` whose detections are every box scoring at least the operating threshold,
        with no cap per image (``detections_per_img``) or per level (``topk_candidates``).

        Why: the calibration search moves every class at once (``strategies.calibrate.search_shifts``) and reads
        each class's F1 as if that class alone had moved. With the caps, a shift of +3 logits for all classes
        floods each image with more than 100 boxes above the threshold and crowds out a class's own: after
        round 2 of an all-honest bench run cat's recall at 0.5 measured 20 % with every class at +3 and 76 %
        as deployed (cat at +3, the others at their own offsets), and the search chose +3 for an F1 of 0.23
        the deployed tutor does not have (0.10). A box below the threshold counts for neither F1 nor recall there
        and cannot suppress one above it in NMS (greedy, by score), so without the caps each class's figures at
        the threshold are those of the class alone, and those of the deployed tutor wherever fewer than 100
        boxes an image pass the threshold."""
        model = self.tutor_with(nh)
        model.score_thresh = max(model.score_thresh, self.policy.operating_threshold - 1e-6)
        model.detections_per_img = model.topk_candidates = UNCAPPED
        return model

    def deployed(self, offsets: Mapping[str, float]) -> tuple[dict[str, float], list[dict]]:
        """Validation AP and detections of the tutor as deployed with per-class score ``offsets`` (logits added
        to those classes' biases; ``--calibrate f1-offsets``): the tutor's own without any."""
        moved = {CLASS_INDEX[c]: s for c, s in offsets.items() if s}
        if not moved:
            return dict(self.tutor_ap()), self.tutor_predictions
        return self.validate(self.tutor_with(shift_class_biases(neck_head(self.tutor), moved)))

    def operating_figures(self, delta: Mapping[str, Tensor], server_round: int) -> dict[str, dict[str, float]]:
        """The operating point of the candidate tutor of ``delta`` (one client's, or a merge; ``Decision``'s
        recall_* fields): every validation class's recall at the threshold for the current tutor and the
        candidate, and for the guarded classes (``strategies.verify.guarded_classes``) the drop's bootstrap
        std (with ``noise_z``) and the drop allowed."""
        self.tutor_ap()
        _, predictions = self.candidate_ap(delta)
        before, after = self.tutor_recall, self.recall(predictions)
        guarded = [c for c in guarded_classes(before, self.policy) if c in before]
        noise = {}
        if self.policy.noise_z > 0 and guarded:
            std = bootstrap_recall_drop(self.tutor_predictions, predictions, self.targets,
                                        [CLASS_INDEX[c] for c in guarded], self.policy.operating_threshold,
                                        samples=self.policy.bootstrap_samples, seed=self.seed + server_round)
            noise = {c: std[CLASS_INDEX[c]] for c in guarded}
        return {"recall_before": dict(before), "recall_after": after, "recall_noise": noise,
                "recall_tolerance": {c: self.policy.recall_tolerance(noise.get(c, math.nan)) for c in guarded}}

    def claim_shifts(self, delta: Mapping[str, Tensor], claims: Iterable[str]) -> dict[str, dict[str, float]]:
        """Per claimed class, how the delta's own row of it moves the tutor's top score of that class on the
        validation images holding it and on the others (``row_score_shift``); empty without claims or
        without the validation feature cache. Recorded under every claim rule; the "lifting" rule leaves out
        a claim whose row lowers its class where the class is (``earned_claims``)."""
        claims = list(claims)
        if not claims:
            return {}
        if self._class_patches is None:
            self.tutor_ap()  # builds the validation feature cache
            if self.features is None:
                return {}
            with torch_threads(VALIDATION_THREADS):
                self._class_patches = self.features.class_patches(self.tutor)
        patches = self._class_patches
        out = {"claim_shift": {}, "claim_shift_negative": {}}
        for name, key in (("claim_shift", "positive"), ("claim_shift_negative", "negative")):
            for c in claims:
                i = CLASS_INDEX[c]
                counted = float(patches[f"{key}_count"][i]) > 0
                out[name][c] = row_score_shift(delta, i, patches[key][i]) if counted else math.nan
        return out

    def tutor_with(self, nh: Mapping[str, Tensor]) -> nn.Module:
        """The tutor with neck/head ``nh``; it shares the tutor's frozen body (eq. 10 and calibration change
        only neck/head): no 44 MB copy."""
        body = self.tutor.backbone.body
        shared = {id(t): t for t in (*body.parameters(), *body.buffers())}
        return load_neck_head(copy.deepcopy(self.tutor, shared), nh)

    # -- evaluation ---------------------------------------------------------------------------

    def validate(self, model: nn.Module) -> tuple[dict[str, float], list[dict]]:
        """Per-class AP of ``model`` (the tutor or a candidate: the tutor's body) on the validation set,
        and its detections (``predictions``)."""
        predictions = self.predictions(model)
        return ap_by_name(predictions, self.targets, self.classes)[0], predictions

    def predictions(self, model: nn.Module) -> list[dict]:
        """``model``'s detections on the validation set (the tutor's body). The body's features are computed
        once, at the calling thread count (the strategy's ``start`` builds them before round 1's clients start)."""
        if not self._features_tried:
            self._features_tried = True
            try:
                self.features = EvaluationFeatures(self.tutor, self.validation_data, batch_size=VALIDATION_BATCH)
                log.info("validation features of the tutor's body cached: %.0f MB", self.features.nbytes / 1e6)
            except FeaturesTooLarge as too_large:
                log.info("validation features not cached (%s): every candidate runs its body", too_large)
        with torch_threads(VALIDATION_THREADS):
            if self.features is not None:
                predictions, self.targets = self.features.predict(model)
            else:
                predictions, self.targets = predict(model, self.validation_data)
        return predictions

    def validate_edge(self, edge: nn.Module) -> tuple[dict[str, float], list[dict]]:
        """Per-class validation AP of an edge (its own body, so no feature cache) and its detections."""
        with torch_threads(VALIDATION_THREADS):
            predictions, self.targets = predict(edge, self.validation_data)
        return ap_by_name(predictions, self.targets, self.classes)[0], predictions

    def protected_drop_noise(self, reference: list[dict], predictions: list[dict], server_round: int) -> dict[str, float]:
        """Bootstrap std of the AP drop from ``reference``'s detections to ``predictions``' on each protected
        class (empty when ``noise_z`` is 0 or nothing is protected): the edge check's noise."""
        if not (self.policy.noise_z > 0 and self.policy.protected_classes):
            return {}
        ids = [CLASS_INDEX[c] for c in self.policy.protected_classes]
        std = bootstrap_ap_drop(reference, predictions, self.targets, ids, samples=self.policy.bootstrap_samples,
                                seed=self.seed + server_round)
        return {c: std[CLASS_INDEX[c]] for c in self.policy.protected_classes}

    def f1(self, predictions: list[dict]) -> dict[str, float]:
        """Eq. 11's F1 at the operating threshold per validation class of detections on the validation set."""
        found = f1_at(predictions, self.targets, [CLASS_INDEX[c] for c in self.classes], self.policy.operating_threshold)
        return {c: found[CLASS_INDEX[c]] for c in self.classes}

    def recall(self, predictions: list[dict]) -> dict[str, float]:
        """Recall at the operating threshold per validation class of detections on the validation set."""
        ids = [CLASS_INDEX[c] for c in self.classes]
        found = recall_at(predictions, self.targets, ids, self.policy.operating_threshold)
        return {c: found[CLASS_INDEX[c]] for c in self.classes}
