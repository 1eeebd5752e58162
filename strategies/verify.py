"""Verification rules for a client's neck/head delta (pure functions, no Flower).

The gates:

1. ``structural_check``: the delta has exactly the tutor's neck/head keys, shapes and dtypes, only
   finite values, and a global L2 norm within the policy's bound (a scaled or random update is
   caught here without evaluating anything); a delta that fails it goes no further;
2. ``protected_check``: the candidate tutor (tutor + beta * delta) evaluated per class on the
   manufacturer's validation set must not lose more than ``protected_tolerance`` AP (absolute AP
   points: 0.05 = 5 points) on any protected class, compared with the current tutor;
3. ``kept_check``: the candidate's mean AP drop over the ``kept_classes`` (the presumed classes)
   must not exceed ``kept_tolerance`` (default inf: recorded, never rejects);
4. ``direction_check``: the cosine between the delta and a reference update must reach
   ``min_cosine``. The reference (``direction_reference``) is either "peers", the coordinate-wise
   median of the round's other well-formed deltas (``peer_reference``; the default), or "server",
   the server's own RD update on its public presumed data (FLTrust, Cao et al. 2021;
   ``distill.rd.server_reference_update``). The default threshold is ``chance_cosine``: what
   a random direction does not reach by chance. Measured (``experiments/results/direction.md``):
   honest deltas score 0.14-0.38 against their peers in rounds 1 and 2, sign-flipped ones as much
   below zero, random ones at most 0.006 against a threshold of 0.007; against the server's update,
   honest deltas score 0.09-0.26 in round 1 but down to 0.004 in round 2 (each client's Tutor 1
   then follows its own re-distilled edge, which the server does not have), so "server" is not
   the default.

At the operating point (recall at the score threshold a product reports from), two gates look at the
round's merge rather than at one delta, since one honest delta alone moves several classes' recall by
tens of points: ``operating_point_check`` bounds what the merge may cost a guarded class
(``operating_tolerance``), and ``operating_harm_check`` rejects a delta whose leave-one-out harm to a
class (``leave_one_out_harm``) is beyond what the round's other deltas do to it (``harm_threshold``,
``operating_harm``): a tolerance set by the round's own movement, not a fixed one.

Beside the gates, ``earned_claims`` decides which of an accepted delta's class claims the
class-aware merge takes (the policy's ``claims = "earned"``, ``"improving"`` or ``"lifting"``, the last with
``row_score_shift``; claims are dropped, never deltas).

Gates 2-4 all run on a well-formed delta and each records its figure, so the log shows how every
gate scored honest and hostile deltas alike. Every outcome becomes a ``Decision`` with its reason,
the gates that rejected it and their figures, so the verification log says why. The merge-time
bounds on an accepted delta (``clip_norm``, ``clip_multiple``, ``row_multiple``, ``weight_cap``:
``models.parts.clip_delta``, ``median_cap``, ``clip_class_rows`` and ``cap_weights`` in
``strategies.aggregate``) are recorded in its Decision as well.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from models.parts import CLASS_ROW_PARAMS, delta_norm
from protocol.config import DIRECTION_REFERENCES, DIRECTION_SCOPES  # the one list: the run configuration validates it too


@dataclass(frozen=True)
class VerificationPolicy:
    norm_bound: float = math.inf  # max global L2 norm of a delta
    protected_tolerance: float = 0.05  # max allowed AP drop (absolute) on a protected class
    protected_classes: tuple[str, ...] = ()
    # > 0: a protected class may also drop by up to noise_z x the drop's own noise (the paired
    # bootstrap standard deviation over the validation images, strategies.validator): a drop that
    # chance alone produces is not evidence of harm.
    noise_z: float = 0.0
    bootstrap_samples: int = 200
    # "delta": a delta that fails the protected gate applied whole to the tutor is rejected (eq. 10 per delta);
    # "merge": it is judged again inside the round's merge (strategies.merge_gates.protected_appeal)
    protected_scope: str = "delta"
    # The candidate may lose at most kept_tolerance AP on average over these classes (inf: recorded only).
    # A delta can stay within the protected tolerance on every protected class and still erode the rest.
    kept_classes: tuple[str, ...] = ()
    kept_tolerance: float = math.inf
    # Direction check against a reference update: "" (none, unless the strategy is given a
    # reference_fn), "peers" or "server" (see the module doc). 0 is FLTrust's rule: an update
    # pointing away from the reference is not trusted; relative_to(direction_z=z) sets chance_cosine.
    min_cosine: float = 0.0
    direction_reference: str = ""
    # "all": the cosine over every neck/head tensor; "shared": over all but the class rows (``direction_tensors``)
    direction_scope: str = "all"
    # Bounded influence at merge time (strategies.aggregate): accepted deltas are clipped to this
    # global L2 norm (inf: off) and each claimed weight is capped at weight_cap x the round's
    # (low) median claimed weight (inf: off).
    clip_norm: float = math.inf
    weight_cap: float = 4.0
    # The operating point (eq. 11's score threshold): AP does not see a shift of a class's scores, a
    # product does. The round's merge may lower a guarded class's recall at operating_threshold
    # (protected, kept, and every other class the tutor detects at the threshold) by at most
    # max(operating_tolerance, noise_z x the drop's bootstrap std); while it does, the delta without
    # which the merge improves most is rejected (strategies.merge_gates; inf: recorded per delta only).
    operating_threshold: float = 0.5
    operating_tolerance: float = math.inf
    # The harm gate, relative to the round: a delta whose leave-one-out harm to a guarded class's recall at
    # the threshold in the round's merge exceeds max(operating_harm, the round's median harm + noise_z x
    # their robust spread) is rejected (``harm_threshold``; strategies.merge_gates; inf: off). It needs 3 deltas.
    operating_harm: float = math.inf
    # Class claims (the class-aware merge takes class c's row from the clients that say they trained c):
    # "trusted" takes every claim; "earned" (``earned_claims``) only claims whose candidate tutor improves
    # class c on validation by more than max(claim_margin, noise_z x the bootstrap std), or, when no
    # claimer of c does, claims that do not lower it by more than that. One margin both ways, the
    # protected tolerance's 5 points: a change smaller than the loss we let pass is not a gain either
    # (a smaller margin hands a kept class's row to one client: README, "Claims that must be earned").
    # "improving": only claims that improve their class count; a class no claimer improves keeps its rows.
    # "lifting": "earned", and a claim whose own row lowers its class's top scores on the validation images
    # that hold the class (``row_score_shift`` < 0) never counts, improving or not.
    claims: str = "trusted"
    claim_margin: float = 0.05
    # Merge-time clipping relative to the round: accepted deltas clipped to clip_multiple x the round's
    # (low) median accepted norm (inf: off), on top of the absolute clip_norm.
    clip_multiple: float = math.inf
    # "scaled": a delta the clip cut to a fraction f of its norm counts as f of a delta in the merge's means
    # (strategies.aggregate.bound_influence); "whole": as a whole one
    clip_share: str = "whole"  # "sized": scaled, and in class rows by f twice (bound_influence(clipped_rows_sized=))
    # Merge-time clipping per class row: each accepted delta's classification rows of class c clipped to
    # row_multiple x the (low) median row-c norm of the deltas whose rows count for c (inf: off).
    row_multiple: float = math.inf
    # "influence": the row bound applies to weight x row norm (``strategies.aggregate.clip_class_rows``)
    row_bound: str = "norm"
    # "row-or-round": row c's bound is at least row_multiple x the median of every row merged in the round
    # (strategies.aggregate.clip_class_rows(round_floor=True)); "row-or-kind": at least row_multiple x the median
    # row of its kind (as row_share's; clip_class_rows(kinds=)); "row": row c's own contributors' median alone
    row_reference: str = "row"
    # "scaled": a class row sent at less than 1/row_multiple of the round's median row of its kind (classes the
    # tutor knows: kept and protected; the others) counts in its row's mean as that fraction of a row
    # (strategies.aggregate.row_shares) and in the row bound's median as a row of 1/row_multiple of that median
    # (tiny_row_floors); "whole": as a whole one
    row_share: str = "whole"
    # "learned": each merged row of a class the tutor learns from clients keeps the mean size of the rows it
    # averages that count whole (strategies.aggregate.restore_row_sizes); "mean": the weighted mean as it is
    row_size: str = "mean"
    # "on": a class the tutor learns from clients whose claimers all merely hold it is merged without each claimer
    # whose row, left out, raises the class's validation AP beyond noise_z x the noise (``diluting_claimer``)
    dilution_check: str = "off"

    def _beyond_noise(self, floor: float, noise: float) -> float:
        return max(floor, self.noise_z * noise) if self.noise_z > 0 and math.isfinite(noise) else floor

    def recall_tolerance(self, noise: float = math.nan) -> float:
        """The largest recall drop at the operating threshold allowed on a guarded class whose measured
        drop has standard deviation ``noise``."""
        return self._beyond_noise(self.operating_tolerance, noise)

    def claim_threshold(self, noise: float = math.nan) -> float:
        """The AP change on a claimed class, up or down, that counts as improving or harming it when the
        change has standard deviation ``noise``."""
        return self._beyond_noise(self.claim_margin, noise)

    def tolerance(self, noise: float = math.nan) -> float:
        """The largest drop allowed on a protected class whose measured drop has standard deviation ``noise``."""
        return self._beyond_noise(self.protected_tolerance, noise)

    @classmethod
    def relative_to(cls, reference_nh: Mapping[str, Tensor], norm_factor: float = 1.0, direction_z: float = 0.0,
                    direction_reference: str = "peers", direction_scope: str = "all",
                    **fields) -> "VerificationPolicy":
        """A policy whose norm bound is ``norm_factor`` times the norm of the tutor's own neck/head:
        an update larger than the weights it changes is not a plausible fine-tuning delta. With
        ``direction_z`` > 0 the direction check runs against ``direction_reference`` and needs a
        cosine of at least ``chance_cosine`` over the neck/head's weights."""
        if direction_z > 0:
            if direction_reference not in DIRECTION_REFERENCES:
                raise ValueError(f"direction_reference must be one of {', '.join(DIRECTION_REFERENCES)}, "
                                 f"got {direction_reference!r}")
            compared = direction_tensors(reference_nh, direction_scope)
            dimensions = sum(v.numel() for v in compared.values())
            fields.update(direction_reference=direction_reference, direction_scope=direction_scope,
                          min_cosine=chance_cosine(dimensions, direction_z))
        return cls(norm_bound=norm_factor * delta_norm(reference_nh), **fields)


@dataclass
class Decision:
    """The verdict on one client's delta in one round."""

    client: int  # partition id
    round: int
    accepted: bool
    reason: str
    norm: float = math.nan
    ap_before: dict[str, float] = field(default_factory=dict)  # protected classes, current tutor
    ap_after: dict[str, float] = field(default_factory=dict)  # protected classes, candidate tutor
    val_map_before: float = math.nan  # mAP over all validation classes, current tutor
    val_map_after: float = math.nan  # mAP over all validation classes, candidate tutor
    weight: float = math.nan  # aggregation weight the client claimed (e.g. num-examples)
    noise: dict[str, float] = field(default_factory=dict)  # protected classes: bootstrap std of the drop
    tolerance: dict[str, float] = field(default_factory=dict)  # protected classes: the drop allowed
    rejected_by: list[str] = field(default_factory=list)  # the gates that failed (empty when accepted)
    kept_drop: float = math.nan  # mean AP drop over the kept classes (NaN: not evaluated)
    cosine: float = math.nan  # cosine with the direction gate's reference update (NaN: no reference)
    clip_factor: float = math.nan  # accepted: the factor its delta was scaled by before merging (1: not clipped)
    weight_used: float = math.nan  # accepted: the weight the merge used, the claimed weight capped
    weight_cap: float = math.nan  # accepted: the round's cap on claimed weights (inf: no cap)
    # The operating point: recall at the policy's threshold on every validation class, current tutor and
    # candidate; the guarded classes' bootstrap std of the drop and the drop allowed
    recall_before: dict[str, float] = field(default_factory=dict)
    recall_after: dict[str, float] = field(default_factory=dict)
    recall_noise: dict[str, float] = field(default_factory=dict)
    recall_tolerance: dict[str, float] = field(default_factory=dict)
    # The harm gate (``operating_harm``): per guarded class, how much this delta lowers the round's merge's
    # recall (``leave_one_out_harm``, the first pass over the round's accepted deltas) and the harm allowed
    harm: dict[str, float] = field(default_factory=dict)
    harm_threshold: dict[str, float] = field(default_factory=dict)
    # Class claims: per claimed class, the candidate's validation AP gain over the tutor, the gain's bootstrap
    # std, and the verdict of ``earned_claims`` ("improves", "holds", "harms", "unchecked"; with "dropped"
    # appended when the merge left the claim out); empty under the "trusted" rule.
    claim_gain: dict[str, float] = field(default_factory=dict)
    claim_noise: dict[str, float] = field(default_factory=dict)
    # A delta the merge's norm clip cut: the same gains and noise of the delta as clipped; each claim's verdict
    # is the stricter of these and the figures as sent (``stricter_claim_figures``); empty when merged whole
    claim_gain_clipped: dict[str, float] = field(default_factory=dict)
    claim_noise_clipped: dict[str, float] = field(default_factory=dict)
    claims: dict[str, str] = field(default_factory=dict)
    row_clip: dict[str, float] = field(default_factory=dict)  # accepted: per class, the factor its rows were scaled by (only those < 1)
    row_share: dict[str, float] = field(default_factory=dict)  # accepted: per class, how much of a row its row counted as (< 1 only)
    # accepted: per class its rows are merged into, their L2 norm as sent (weights and bias; before any bound), so
    # that another reference for the row bound can be judged from a run's records
    row_norm: dict[str, float] = field(default_factory=dict)
    # Per claimed class, how the delta's own row of that class moves the tutor's top score of it (logit) on
    # the validation images holding the class ("positive") and on the others ("negative"): ``row_score_shift``
    claim_shift: dict[str, float] = field(default_factory=dict)
    claim_shift_negative: dict[str, float] = field(default_factory=dict)
    # protected_scope "merge": a delta that failed the protected gate alone, judged again inside the round's
    # merge (``protected_appeal``): the protected classes' AP of the merge with it, the drops allowed, the verdict
    appeal: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def safe_norm(delta: Mapping[str, Tensor]) -> float:
    """Global L2 norm; NaN when the delta holds non-float or non-finite values."""
    try:
        return delta_norm(delta)
    except (RuntimeError, TypeError):
        return math.nan


def structural_check(delta: Mapping[str, Tensor], reference_nh: Mapping[str, Tensor],
                     norm_bound: float = math.inf) -> tuple[bool, str]:
    """Keys, shapes and dtypes equal to the tutor's neck/head; all finite; L2 norm <= ``norm_bound``."""
    missing, extra = sorted(set(reference_nh) - set(delta)), sorted(set(delta) - set(reference_nh))
    if missing:
        return False, f"missing {len(missing)} neck/head tensors (e.g. {missing[0]})"
    if extra:
        return False, f"{len(extra)} tensors that are not the tutor's neck/head (e.g. {extra[0]})"
    for name, ref in reference_nh.items():
        value = delta[name]
        if not isinstance(value, Tensor):
            return False, f"{name} is a {type(value).__name__}, not a tensor"
        if value.shape != ref.shape:
            return False, f"{name} has shape {tuple(value.shape)}, the tutor's is {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return False, f"{name} has dtype {value.dtype}, the tutor's is {ref.dtype}"
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            return False, f"{name} holds {bad} non-finite values (NaN/Inf)"
    norm = delta_norm(delta)
    if not norm <= norm_bound:
        return False, f"norm {norm:.4g} exceeds the bound {norm_bound:.4g}"
    return True, "structure ok"


def protected_check(ap_before: Mapping[str, float], ap_after: Mapping[str, float],
                    policy: VerificationPolicy, noise: Mapping[str, float] | None = None) -> tuple[bool, str, dict]:
    """Rejects when a protected class's AP drops by more than ``policy.tolerance(noise[class])``.

    A protected class without a finite AP before (no positives in the validation set) cannot be
    checked and is skipped (named in the reason); one that had an AP and now has none fails.
    Returns (ok, reason, figures) with figures = {"ap_before", "ap_after", "noise", "tolerance"},
    each {class: value} over the protected classes.
    """
    noise = noise or {}
    before = {c: float(ap_before.get(c, math.nan)) for c in policy.protected_classes}
    after = {c: float(ap_after.get(c, math.nan)) for c in policy.protected_classes}
    tolerance = {c: policy.tolerance(float(noise.get(c, math.nan))) for c in policy.protected_classes}
    figures = {"ap_before": before, "ap_after": after, "tolerance": tolerance,
               "noise": {c: float(noise.get(c, math.nan)) for c in policy.protected_classes}}
    unchecked, failures = [], []
    for c in policy.protected_classes:
        if not math.isfinite(before[c]):
            unchecked.append(c)
            continue
        drop = before[c] - after[c] if math.isfinite(after[c]) else math.inf
        if drop > tolerance[c]:
            failures.append(f"{c} AP {before[c]:.3f} -> {after[c]:.3f} (drop {drop:.3f} > {tolerance[c]:.3f}"
                            + (f", noise {noise[c]:.3f}" if c in noise else "") + ")")
    if failures:
        return False, "protected class lost: " + "; ".join(failures), figures
    checked = [f"{c} {before[c]:.3f} -> {after[c]:.3f}" for c in policy.protected_classes if c not in unchecked]
    reason = ("protected classes kept" + (f": {', '.join(checked)}" if checked else "")
              if policy.protected_classes else "no protected classes")
    if unchecked:
        reason += f" (not checkable, no validation positives: {', '.join(unchecked)})"
    return True, reason, figures


def deploy_check(reference_ap: Mapping[str, float], candidate_ap: Mapping[str, float],
                 policy: VerificationPolicy, noise: Mapping[str, float] | None = None) -> tuple[bool, str, dict]:
    """The edge check: a client's re-distilled edge may be deployed when no protected class's validation
    AP lies more than ``policy.tolerance(noise[class])`` below the manufacturer's edge's.

    The same gate and tolerance as the tutor's protected check, with one difference: the reference is
    the manufacturer's own edge, not the edge the client deployed last round, so small drops cannot add
    up round after round. Returns ``protected_check``'s (ok, reason, figures); "ap_before" is the
    reference's AP, "ap_after" the candidate's."""
    return protected_check(reference_ap, candidate_ap, policy, noise)


def kept_check(ap_before: Mapping[str, float], ap_after: Mapping[str, float],
               policy: VerificationPolicy) -> tuple[bool, str, dict]:
    """Rejects when the mean AP drop over ``policy.kept_classes`` exceeds ``policy.kept_tolerance``.

    Why a mean beside the protected gate: the protected gate looks at a few named classes, one by
    one; a delta can stay inside its tolerance there and still wear every other presumed class down
    a little. The mean over all kept classes catches that slow erosion, and averaging keeps one
    noisy class from deciding alone. A class without a finite AP before (no validation positives)
    is skipped; one that had an AP and has none after counts as an infinite drop (as in
    ``protected_check``). Returns (ok, reason, figures) with figures = {"mean_drop", "drops"}
    ({class: before - after} over the checked classes; mean_drop NaN when none could be checked).
    """
    drops = {}
    for c in policy.kept_classes:
        before, after = float(ap_before.get(c, math.nan)), float(ap_after.get(c, math.nan))
        if math.isfinite(before):
            drops[c] = before - after if math.isfinite(after) else math.inf
    mean_drop = sum(drops.values()) / len(drops) if drops else math.nan
    figures = {"mean_drop": mean_drop, "drops": drops}
    if mean_drop > policy.kept_tolerance:  # False for NaN: nothing checkable rejects nothing
        return False, (f"kept classes lost: mean AP drop {mean_drop:.3f} > {policy.kept_tolerance:.3f} "
                       f"over {len(drops)} classes"), figures
    if not policy.kept_classes:
        return True, "no kept classes", figures
    if not drops:
        return True, "kept classes not checkable (no validation positives)", figures
    return True, f"kept classes: mean AP drop {mean_drop:.3f} <= {policy.kept_tolerance:.3f}", figures


def claim_verdict(gain: float, noise: float, policy: VerificationPolicy) -> str:
    """One claim on validation: "improves" (an AP gain beyond the policy's claim threshold), "harms" (a drop
    beyond it), "holds" (neither) or "unchecked" (no finite gain: the class has no validation positives)."""
    if not math.isfinite(gain):
        return "unchecked"
    threshold = policy.claim_threshold(noise)
    if gain > threshold:
        return "improves"
    return "harms" if -gain > threshold else "holds"


VERDICT_RANK = {"harms": 0, "holds": 1, "unchecked": 1, "improves": 2}  # the stricter verdict ranks lower


def stricter_claim_figures(sent: tuple[Mapping[str, float], Mapping[str, float]],
                           merged: tuple[Mapping[str, float], Mapping[str, float]], policy: VerificationPolicy
                           ) -> tuple[dict[str, float], dict[str, float]]:
    """Per claim, the (gain, noise) of the delta as sent or of the delta as merged (clipped), whichever gives the
    stricter ``claim_verdict``: a claim harms if either harms and improves only if both improve.

    Why both: judged on what it sent, a hostile delta whose other edits the norm clip then cuts can earn a claim
    its merged remnant no longer carries (it "improves" dog, then counts as one of two with 2 % of its row);
    judged on the remnant alone, a false claim whose edit harms its class as sent shrinks below the claim margin
    and "holds", and counts (README, "Claims judged on the delta as merged")."""
    gains, noise = {}, {}
    for c in sent[0]:
        options = [(sent[0][c], sent[1].get(c, math.nan)), (merged[0].get(c, math.nan), merged[1].get(c, math.nan))]
        gains[c], noise[c] = min(options, key=lambda o: VERDICT_RANK[claim_verdict(o[0], o[1], policy)])
    return gains, noise


def earned_claims(gains: Sequence[Mapping[str, float]], noise: Sequence[Mapping[str, float]],
                  policy: VerificationPolicy, shifts: Sequence[Mapping[str, float]] | None = None
                  ) -> tuple[list[set[str]], list[dict[str, str]]]:
    """Which of the round's class claims take part in each class's row of the class-aware merge.

    ``gains[i]`` maps every class delta i claims to trained to its candidate tutor's validation AP
    minus the tutor's (NaN: not checkable), ``noise[i]`` to that gain's bootstrap std. A claim is not
    trusted, it is earned: class c's row comes from the claimers whose candidates improve c
    (``claim_verdict``); when none does (a class the tutor already knows well, as the kept presumed
    classes), from the claimers whose candidates hold it. A claim that harms its class never counts.
    So a client that claims a class it did not train, with a small edit of that row and its weight at
    the cap, dilutes nothing while an honest client improves the class; what it loses is its own say
    on that row. Claims on a class no validation image holds stay as made (nothing to check them
    against). Under the policy's ``claims = "improving"`` holding is not enough: a class no claimer
    improves keeps its rows this round (nobody takes part in them), so an edit that holds a settled
    class's AP while it shifts the class's scores never reaches the merge. Under ``claims = "lifting"``,
    ``shifts[i]`` maps each claimed class to ``row_score_shift`` of delta i's own row on the validation
    images holding the class: a claim below 0 is "lowers" and never counts (a row edited down to
    lower a settled class's scores, whose AP it leaves alone). Since the merged row is a weighted mean of
    the counted rows, and the shift is linear in the row, the merged row then cannot lower that mean
    either (to first order: the merge also moves the features the row reads). A NaN shift (no
    validation image holds the class) checks nothing. Returns (earned class names per delta,
    {class: verdict} per delta).
    """
    if len(gains) != len(noise):
        raise ValueError(f"{len(gains)} gains for {len(noise)} noise maps: give one of each per delta")
    if policy.claims == "lifting" and (shifts is None or len(shifts) != len(gains)):
        raise ValueError("the lifting rule needs one map of row shifts per delta (row_score_shift)")
    verdicts = [{c: claim_verdict(float(g), float(n.get(c, math.nan)), policy) for c, g in gain.items()}
                for gain, n in zip(gains, noise)]
    if policy.claims == "lifting":
        verdicts = [{c: "lowers" if float(shift.get(c, math.nan)) < 0 else v for c, v in verdict.items()}
                    for verdict, shift in zip(verdicts, shifts)]
    improved = {c for v in verdicts for c, verdict in v.items() if verdict == "improves"}
    settled = ("unchecked",) if policy.claims == "improving" else ("holds", "unchecked")
    counted = [{c for c, verdict in v.items() if verdict in (("improves",) if c in improved else settled)}
               for v in verdicts]
    return counted, verdicts


def diluting_claimer(ap_merged: float, ap_without: Sequence[float], noise: Sequence[float], z: float
                     ) -> int | None:
    """Which claimer of a class row dilutes it, if any: ``ap_without[i]`` is the class's validation AP when
    claimer i's row is left out of the merged row (everything else merged as before), ``ap_merged`` the AP
    with every claimer's row, ``noise[i]`` the paired bootstrap std of that difference. The claimer whose
    absence raises the AP most, when the rise exceeds ``z`` x its noise; None when no rise does (or when a
    figure is not finite: a class no validation image holds checks nothing).

    Why: where no claimer improves a class by the claim margin, every claim that holds it counts
    (``earned_claims``), and a mean of rows lets one shrunk or weak row beside an honest one pull the
    merged row down with it (the bench's ``tiny_claim:0.25``: a hostile row at a quarter of its size,
    large enough to count whole, beside one honest claimer). Left out, such a row raises its class on the
    manufacturer's validation set; an honest row among honest ones, whose mean is what the merge wants,
    rarely does beyond noise."""
    if not math.isfinite(ap_merged):
        return None
    rises = [(float(without) - ap_merged, i) for i, without in enumerate(ap_without)
             if math.isfinite(float(without)) and math.isfinite(float(noise[i]))
             and float(without) - ap_merged > z * float(noise[i])]
    return max(rises)[1] if rises else None


def row_score_shift(delta: Mapping[str, Tensor], class_id: int, patch: Tensor,
                    row_params: Sequence[str] = CLASS_ROW_PARAMS) -> float:
    """How the delta's row ``class_id`` of the classification layer alone moves a class score: the mean
    logit change patch . dW_c + db_c at the locations whose mean input is ``patch`` [C*9]
    (``evaluation.features.EvaluationFeatures.class_patches``: where the tutor scores the class highest).
    A client that trained on a class raises its score where the class is; a row edited down (a false
    claim's) lowers it, whatever the class's AP does. NaN when the delta lacks the row."""
    weight, bias = (delta.get(name) for name in row_params)
    if weight is None or bias is None or not 0 <= class_id < weight.size(0):
        return math.nan
    return float(patch.float() @ weight[class_id].float().flatten() + bias[class_id].float())


def guarded_classes(recall_before: Mapping[str, float], policy: VerificationPolicy) -> tuple[str, ...]:
    """The classes the operating-point gate guards: the protected and the kept classes, and every other
    class the current tutor detects at the threshold (recall above 0: what it learned from clients)."""
    named = (*policy.protected_classes, *policy.kept_classes)
    learned = (c for c, r in recall_before.items() if c not in named and math.isfinite(r) and r > 0)
    return tuple(dict.fromkeys((*named, *learned)))


def operating_point_check(recall_before: Mapping[str, float], recall_after: Mapping[str, float],
                          tolerance: Mapping[str, float]) -> tuple[bool, str, float]:
    """Rejects when a class of ``tolerance`` (the guarded ones, with the recall drop each may take) loses
    more of its recall at the operating threshold. A class without a finite recall before (no validation
    positives) is skipped; one that had a recall and has none after loses all of it. Returns (ok, reason,
    excess): excess sums each class's drop beyond its tolerance (0 when ok)."""
    failures, excess = [], 0.0
    for c, allowed in tolerance.items():
        before, after = float(recall_before.get(c, math.nan)), float(recall_after.get(c, math.nan))
        if not math.isfinite(before):
            continue
        drop = before - after if math.isfinite(after) else before
        if drop > allowed:
            failures.append(f"{c} recall {before:.3f} -> {after:.3f} (drop {drop:.3f} > {allowed:.3f})")
            excess += drop - allowed
    if failures:
        return False, "operating point lost: " + "; ".join(failures), excess
    return True, f"operating point kept on {len(tolerance)} classes", 0.0


def leave_one_out_harm(recall_merged: Mapping[str, float], recall_without: Sequence[Mapping[str, float]],
                       classes: Sequence[str]) -> list[dict[str, float]]:
    """How much each delta of a merge costs each of ``classes`` at the operating threshold: the recall of
    the merge without delta i minus the merge's own (``recall_without[i]``; positive: delta i lowers
    the class). A class without a finite recall in both is left out of that delta's figures."""
    harms = []
    for without in recall_without:
        figures = {}
        for c in classes:
            merged, other = float(recall_merged.get(c, math.nan)), float(without.get(c, math.nan))
            if math.isfinite(merged) and math.isfinite(other):
                figures[c] = other - merged
        harms.append(figures)
    return harms


def harm_threshold(harms: Sequence[float], floor: float, z: float) -> float:
    """The harm to one class that the round's deltas make ordinary: the round's median harm plus z
    robust standard deviations (1.4826 x the median absolute deviation), and never below ``floor``.
    The median holds as long as most deltas are honest; an honest round that moves a class as a whole
    raises its median, not one delta's harm above it."""
    values = [h for h in harms if math.isfinite(h)]
    if not values:
        return floor
    median = statistics.median(values)
    spread = 1.4826 * statistics.median(abs(h - median) for h in values)
    return max(floor, median + z * spread)


def operating_harm_check(harm: Mapping[str, float], thresholds: Mapping[str, float]) -> tuple[bool, str, float]:
    """Rejects a delta whose harm (``leave_one_out_harm``) to a class exceeds that class's threshold
    (``harm_threshold``). Returns (ok, reason, excess): excess sums the harms beyond their thresholds."""
    failures, excess = [], 0.0
    for c, allowed in thresholds.items():
        h = float(harm.get(c, math.nan))
        if math.isfinite(h) and h > allowed:
            failures.append(f"{c} recall -{h:.3f} in the merge (> {allowed:.3f})")
            excess += h - allowed
    if failures:
        return False, "costs the merge's operating point: " + "; ".join(failures), excess
    return True, f"operating harm within the round's on {len(thresholds)} classes", 0.0


def cosine_score(delta: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """Cosine similarity of two updates, each flattened over the tensors both hold.

    FLTrust's trust score: an honest client's update points roughly the way the server's own update
    on clean data does, a poisoned or sign-flipped one does not, whatever its size. 0.0 when either
    side is all zeros or they share no tensor (no direction to compare); computed in float64.
    """
    shared = [name for name in reference if name in delta]
    if not shared:
        return 0.0
    a = torch.cat([delta[name].detach().reshape(-1).double() for name in shared])
    b = torch.cat([reference[name].detach().reshape(-1).double() for name in shared])
    norm_a, norm_b = float(a.norm()), float(b.norm())
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(a @ b) / (norm_a * norm_b)


def peer_reference(deltas: Sequence[Mapping[str, Tensor]], leave_out: int, min_peers: int = 2
                   ) -> dict[str, Tensor] | None:
    """The coordinate-wise median of ``deltas`` without the one at ``leave_out``; None with fewer
    than ``min_peers`` others.

    Why the median of the others: clients who learn different classes still share much of their
    update (the same distillation toward the edge on the kept classes), so an honest delta points
    along its peers' median while a sign-flipped one points against it and a random one nowhere.
    Leaving the delta out keeps it from voting for itself; the median keeps a minority of hostile
    deltas, however large, from steering the reference.
    """
    others = [d for i, d in enumerate(deltas) if i != leave_out]
    if len(others) < min_peers:
        return None
    return {name: torch.stack([d[name].float() for d in others]).median(dim=0).values for name in deltas[leave_out]}


def chance_cosine(dimensions: int, z: float) -> float:
    """``z / sqrt(dimensions)``: a cosine a random direction exceeds only with the normal tail's
    chance at ``z`` (z = 4: about 3e-5).

    Why: the cosine of a uniformly random direction in d dimensions with any fixed vector has mean 0
    and standard deviation 1/sqrt(d). A threshold at z of those separates "points somewhere along the
    reference" from "no direction at all" without being tuned to any client's delta.
    """
    if dimensions < 1:
        raise ValueError(f"dimensions must be at least 1, got {dimensions}")
    return z / math.sqrt(dimensions)


def direction_tensors(update: Mapping[str, Tensor], scope: str = "all") -> dict[str, Tensor]:
    """The tensors of ``update`` the direction gate compares: every one ("all"), or all but the classification
    layer's class rows ("shared").

    Why "shared": the class rows carry most of a delta's norm and are where honest clients of different
    classes disagree (each raises its own classes); their cosine with the peers' median ranges from -0.31 to
    +0.35 between honest deltas, while the layers every client trains score 0.36-0.62. A delta whose rows
    oppose its peers' can cancel a body that agrees with them (heldout8's client 0 in round 2 with clients 1
    and 3 silent: 0.0002 overall, 0.366 without its rows; README, "A false rejection with two clients
    silent"). The class-aware merge bounds the rows on their own (claims, the row bound)."""
    if scope not in DIRECTION_SCOPES:
        raise ValueError(f"direction scope must be one of {', '.join(DIRECTION_SCOPES)}, got {scope!r}")
    return {k: v for k, v in update.items() if scope == "all" or k not in CLASS_ROW_PARAMS}


def direction_check(delta: Mapping[str, Tensor], reference: Mapping[str, Tensor],
                    min_cosine: float = 0.0, scope: str = "all") -> tuple[bool, str, float]:
    """Rejects a delta whose cosine with the reference update (its peers' or the server's) over the tensors of
    ``scope`` (``direction_tensors``) is below ``min_cosine`` (or not a number). Returns (ok, reason, score)."""
    score = cosine_score(direction_tensors(delta, scope), direction_tensors(reference, scope))
    if not score >= min_cosine:
        return False, f"direction: cosine {score:.3f} with the reference < {min_cosine:.3f}", score
    return True, f"direction: cosine {score:.3f} >= {min_cosine:.3f}", score
