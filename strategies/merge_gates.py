"""Gates on the round's merge rather than on one delta (``DiReDiStrategy.aggregate_train`` runs them after
the per-delta gates and the bounds): at the operating threshold one honest delta alone moves several
classes' recall by tens of points, so what a delta does is judged inside the merge of the round.

``protected_appeal`` judges a delta that failed the protected gate applied whole to the tutor again inside the
merge, where it has its share of the weight (``protected_scope`` "merge");
``operating_point_merge`` bounds what the merge may cost a guarded class (``operating_tolerance``);
``harm_merge`` rejects a delta whose leave-one-out cost to a class stands out from its peers'
(``operating_harm``). The rules are the pure functions of ``strategies.verify``; these loops only
evaluate merges on the validation set (``CandidateValidator``) and mark the decisions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

from torch import Tensor

from strategies.validator import CandidateValidator
from strategies.verify import (Decision, guarded_classes, harm_threshold, leave_one_out_harm, operating_harm_check,
                               operating_point_check, protected_check)

log = logging.getLogger(__name__)

Merge = Callable[[list[int]], Mapping[str, Tensor]]  # indices of accepted deltas -> their merged delta


def protected_appeal(validator: CandidateValidator, server_round: int, accepted: list, appellants: list,
                     merged: Callable[[list], Mapping[str, Tensor]]) -> list:
    """The protected gate inside the round's merge (``protected_scope`` "merge"). The gate judges each delta
    applied whole to the tutor, where the merge gives it its share of the weight: an honest delta that alone
    costs a protected class a little more than the tolerance is harmless in the merge (README, "Verification
    gates"). Each appellant (a ``(delta, decision)`` the protected gate alone rejected) is accepted when the
    round's merge of the accepted deltas with it (``merged``: the list's merged delta, bounded as every merge)
    keeps every protected class within the gate's tolerance of the tutor (``protected_check``, noise of that
    merge's candidate); appellants are tried one at a time in the order given, each on top of those already
    admitted, so together they cannot cost more than one tolerance. The decisions record the merge's figures
    (``appeal``). Returns the accepted ``(delta, decision)`` list, appellants admitted appended."""
    for delta, decision in appellants:
        trial = [*accepted, (delta, decision)]
        merge = merged(trial)
        before, (after, _) = validator.tutor_ap(), validator.candidate_ap(merge)
        noise = validator.candidate_noise(merge, server_round)
        ok, reason, figures = protected_check(before, after, validator.policy, noise)
        decision.appeal = {"accepted": ok, "ap_after": figures["ap_after"], "noise": figures["noise"],
                           "tolerance": figures["tolerance"], "deltas": len(trial)}
        if ok:
            decision.accepted, decision.rejected_by = True, []
            decision.reason = f"{decision.reason}; inside the round's merge of {len(trial)}: {reason}"
            log.info("round %d client %d: accepted inside the round's merge (%s)", server_round, decision.client,
                     reason)
            accepted = trial
        else:
            decision.reason = f"{decision.reason}; inside the round's merge of {len(trial)} too: {reason}"
    return accepted


def operating_point_merge(validator: CandidateValidator, server_round: int, kept: list[int], merge: Merge,
                          decisions: list[Decision]) -> list[int]:
    """The operating-point gate, on the round's merge: one client's delta alone lowers several classes'
    recall at the threshold by 10-65 points even when honest (RD's Tutor 2 sees few of them), while the
    merge of honest deltas moves them by about 10 (README, "Verification at the operating point"). So
    the merged candidate is checked (``operating_point_check`` with ``operating_figures``' tolerance);
    while it fails, the delta whose leave-one-out merge leaves the least excess drop is rejected
    (``rejected_by`` "operating"). Returns the indices (into ``decisions``) still accepted."""
    def excess(indices: list[int]) -> tuple[bool, str, float]:
        figures = validator.operating_figures(merge(indices), server_round)
        return operating_point_check(figures["recall_before"], figures["recall_after"],
                                     figures["recall_tolerance"])

    ok, reason, _ = excess(kept)
    while not ok:
        if len(kept) == 1:
            worst = kept[0]
        else:
            worst = min(kept, key=lambda i: (excess([j for j in kept if j != i])[2], i))
        reject(decisions[worst], "operating", f"the round's merge: {reason}; without this delta it improves most")
        kept = [i for i in kept if i != worst]
        if not kept:
            break
        ok, reason, _ = excess(kept)
    return kept


def harm_merge(validator: CandidateValidator, server_round: int, kept: list[int], merge: Merge,
               decisions: list[Decision]) -> list[int]:
    """The harm gate, relative to the round: each delta's leave-one-out harm to every guarded class's
    recall in the round's merge (``leave_one_out_harm``) against what the round's deltas make ordinary
    (``harm_threshold``). The delta furthest beyond is rejected (``rejected_by`` "harm") and the round
    is measured again without it, so a second delta of the same kind is no longer masked by the first;
    it stops when none is beyond or fewer than 3 deltas are left. Each decision records its first
    measured harm. Costs one validation of a merge per delta and pass (about 0.8 s each on one thread).
    Returns the indices (into ``decisions``) still accepted."""
    def recall_of(indices: list[int]) -> dict[str, float]:
        _, predictions = validator.candidate_ap(merge(indices))
        return validator.recall(predictions)

    validator.tutor_ap()
    guarded = [c for c in guarded_classes(validator.tutor_recall, validator.policy)
               if c in validator.tutor_recall]
    while len(kept) >= 3:
        merged = recall_of(kept)
        harms = leave_one_out_harm(merged, [recall_of([j for j in kept if j != i]) for i in kept], guarded)
        thresholds = {c: harm_threshold([h.get(c, math.nan) for h in harms], validator.policy.operating_harm,
                                        validator.policy.noise_z) for c in guarded}
        verdicts = [operating_harm_check(h, thresholds) for h in harms]
        for i, harm in zip(kept, harms):
            if not decisions[i].harm:  # the first pass: every accepted delta measured against all the others
                decisions[i].harm, decisions[i].harm_threshold = harm, dict(thresholds)
        worst = max(range(len(kept)), key=lambda k: (verdicts[k][2], -k))
        ok, reason, _ = verdicts[worst]
        if ok:
            break
        reject(decisions[kept[worst]], "harm", f"{reason}; the round's other deltas do not")
        kept = [i for j, i in enumerate(kept) if j != worst]
    return kept


def reject(decision: Decision, gate: str, reason: str) -> None:
    """Marks an accepted delta rejected by a merge gate, with the reason, and logs it."""
    decision.accepted = False
    decision.rejected_by = [*decision.rejected_by, gate]
    decision.reason = reason
    log.warning("round %d client %d: rejected by the %s gate (%s)", decision.round, decision.client, gate, reason)
