"""strategies.verify: each verification gate as a pure function on hand-made deltas and figures."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import MetricRecord

from protocol.wire import decode, encode
from strategies.verify import Decision, VerificationPolicy, deploy_check, protected_check, structural_check


@pytest.fixture(scope="module")
def reference():
    return {"head.w": torch.zeros(2, 3), "backbone.fpn.b": torch.zeros(3)}


def test_structural_check_accepts_a_well_formed_delta(reference):
    delta = {"head.w": torch.full((2, 3), 0.1), "backbone.fpn.b": torch.zeros(3)}
    assert structural_check(delta, reference, norm_bound=1.0) == (True, "structure ok")


@pytest.mark.parametrize("delta, reason", [
    ({"head.w": torch.full((2, 3), float("nan")), "backbone.fpn.b": torch.zeros(3)}, "non-finite"),
    ({"head.w": torch.zeros(3, 2), "backbone.fpn.b": torch.zeros(3)}, "shape"),
    ({"head.w": torch.full((2, 3), 1e3), "backbone.fpn.b": torch.zeros(3)}, "exceeds the bound"),
    ({"head.w": torch.zeros(2, 3, dtype=torch.float64), "backbone.fpn.b": torch.zeros(3)}, "dtype"),
    ({"head.w": torch.zeros(2, 3)}, "missing"),
    ({"head.w": torch.zeros(2, 3), "backbone.fpn.b": torch.zeros(3), "backbone.body.x": torch.zeros(1)},
     "not the tutor's neck/head"),
])
def test_structural_check_rejects_with_a_reason(reference, delta, reason):
    ok, why = structural_check(delta, reference, norm_bound=10.0)
    assert not ok and reason in why


def test_protected_check_tolerance():
    policy = VerificationPolicy(norm_bound=1.0, protected_tolerance=0.05, protected_classes=("person", "bus"))
    before = {"person": 0.60, "bus": 0.40, "cat": 0.1}
    ok, reason, figures = protected_check(before, {"person": 0.56, "bus": 0.41, "cat": 0.0}, policy)
    assert ok, reason  # a 0.04 drop is within tolerance; cat is not protected
    assert {k: figures[k] for k in ("ap_before", "ap_after", "tolerance")} == {
        "ap_before": {"person": 0.60, "bus": 0.40}, "ap_after": {"person": 0.56, "bus": 0.41},
        "tolerance": {"person": 0.05, "bus": 0.05}}
    ok, reason, _ = protected_check(before, {"person": 0.50, "bus": 0.40}, policy)
    assert not ok and "person" in reason and "bus" not in reason
    ok, reason, _ = protected_check(before, {"person": float("nan"), "bus": 0.40}, policy)
    assert not ok  # a class that had an AP and lost it entirely
    ok, reason, _ = protected_check({"person": float("nan"), "bus": 0.4}, {"person": 0.0, "bus": 0.4}, policy)
    assert ok and "not checkable" in reason and "person" in reason


def test_noise_calibrated_tolerance():
    """With noise_z, a drop within noise_z standard deviations of its own noise is chance, not harm."""
    policy = VerificationPolicy(protected_tolerance=0.02, protected_classes=("person",), noise_z=2.0)
    before, after = {"person": 0.60}, {"person": 0.55}  # a 0.05 drop
    ok, reason, figures = protected_check(before, after, policy, noise={"person": 0.03})
    assert ok and figures["tolerance"]["person"] == pytest.approx(0.06), reason
    ok, reason, _ = protected_check(before, after, policy, noise={"person": 0.01})  # tolerance = the 0.02 floor
    assert not ok and "noise 0.010" in reason
    ok, _, _ = protected_check(before, after, policy)  # no noise measured: the absolute tolerance alone
    assert not ok
    assert VerificationPolicy(protected_tolerance=0.05).tolerance(0.5) == 0.05  # noise_z 0: noise ignored


def test_decision_to_dict_and_metric_codec():
    d = Decision(client=3, round=2, accepted=False, reason="x", norm=1.5, ap_before={"person": 0.5})
    assert d.to_dict()["client"] == 3 and d.to_dict()["ap_before"] == {"person": 0.5}
    metrics = MetricRecord({**encode("ap-before", {"cat": 0.25, "person": 0.5}), "other": 1})
    assert decode(metrics, "ap-before") == {"cat": 0.25, "person": 0.5}


def test_a_delta_travels_in_half_precision_and_is_verified_as_float32():
    from protocol.wire import pack_delta, unpack_delta
    from strategies.verify import structural_check

    reference = {"head.w": torch.zeros(64, 32), "head.b": torch.zeros(64)}
    delta = {"head.w": torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 1e-3, "head.b": torch.ones(64)}
    half, full = pack_delta(delta, "float16"), pack_delta(delta, "float32")
    assert half.count_bytes() < 0.6 * full.count_bytes()
    back = unpack_delta(half)
    assert all(v.dtype == torch.float32 for v in back.values())
    assert all(torch.allclose(back[k], delta[k], rtol=1e-3, atol=1e-7) for k in delta)
    assert structural_check(back, reference) == (True, "structure ok")
    # a dtype that is no precision of a float delta is left for verification to reject
    ints = unpack_delta(pack_delta({"head.w": torch.zeros(64, 32, dtype=torch.int32), "head.b": torch.zeros(64)}))
    ok, reason = structural_check(ints, reference)
    assert not ok and "dtype torch.int32" in reason


def test_kept_check_rejects_a_mean_drop_beyond_the_tolerance():
    from strategies.verify import kept_check

    policy = VerificationPolicy(kept_classes=("cat", "dog", "bus"), kept_tolerance=0.03)
    before = {"cat": 0.50, "dog": 0.40, "bus": float("nan"), "person": 0.9}  # bus: no validation positives
    ok, reason, figures = kept_check(before, {"cat": 0.48, "dog": 0.38, "person": 0.0}, policy)
    assert ok and figures["mean_drop"] == pytest.approx(0.02), reason  # person is not a kept class
    assert set(figures["drops"]) == {"cat", "dog"}
    ok, reason, figures = kept_check(before, {"cat": 0.45, "dog": 0.37}, policy)  # each drop small, mean 0.04
    assert not ok and "kept classes lost" in reason and figures["mean_drop"] == pytest.approx(0.04)
    ok, _, figures = kept_check(before, {"cat": 0.50, "dog": float("nan")}, policy)  # dog lost its AP
    assert not ok and figures["drops"]["dog"] == math.inf
    # the default tolerance (inf) records the drop and never rejects
    ok, _, figures = kept_check(before, {"cat": 0.0, "dog": 0.0}, VerificationPolicy(kept_classes=("cat", "dog")))
    assert ok and figures["mean_drop"] == pytest.approx(0.45)
    ok, reason, figures = kept_check({"bus": float("nan")}, {"bus": 0.0}, policy)
    assert ok and "not checkable" in reason and math.isnan(figures["mean_drop"])


def test_cosine_score_and_direction_check():
    from strategies.verify import cosine_score, direction_check

    g = torch.Generator().manual_seed(0)
    reference = {"a": torch.randn(400, generator=g), "b": torch.randn(20, 30, generator=g)}
    flipped = {k: -v for k, v in reference.items()}
    assert cosine_score(reference, reference) == pytest.approx(1.0)
    assert cosine_score({k: 3 * v for k, v in reference.items()}, reference) == pytest.approx(1.0)  # size-blind
    assert cosine_score(flipped, reference) == pytest.approx(-1.0)
    random_delta = {"a": torch.randn(400, generator=g), "b": torch.randn(20, 30, generator=g)}
    assert abs(cosine_score(random_delta, reference)) < 0.15  # 1000 dims: std 1/sqrt(1000) ~ 0.03
    assert cosine_score({k: torch.zeros_like(v) for k, v in reference.items()}, reference) == 0.0
    assert cosine_score({"other": torch.ones(3)}, reference) == 0.0  # no shared tensor
    assert cosine_score({"a": reference["a"]}, reference) == pytest.approx(1.0)  # over the shared keys only
    assert direction_check(reference, reference, 0.0)[0]
    ok, reason, score = direction_check(flipped, reference, min_cosine=0.0)
    assert not ok and score == pytest.approx(-1.0) and reason.startswith("direction:")


def test_chance_cosine_bounds_random_directions():
    """z / sqrt(d): random directions in d dimensions stay under it (z = 4: about 3e-5 each side),
    and the policy built with direction_z sets it and asks for the server's own reference."""
    from strategies.verify import chance_cosine, cosine_score

    d = 20_000
    bound = chance_cosine(d, 4.0)
    assert bound == pytest.approx(4.0 / math.sqrt(d))
    generator = torch.Generator().manual_seed(0)
    fixed = {"w": torch.randn(d, generator=generator)}
    scores = [cosine_score({"w": torch.randn(d, generator=generator)}, fixed) for _ in range(200)]
    assert max(abs(s) for s in scores) < bound
    assert 0.5 / math.sqrt(d) < float(torch.tensor(scores).std()) < 1.5 / math.sqrt(d)
    with pytest.raises(ValueError):
        chance_cosine(0, 4.0)
    nh = {"a": torch.ones(10, 10), "b": torch.ones(44)}
    policy = VerificationPolicy.relative_to(nh, direction_z=4.0)
    assert policy.direction_reference == "peers" and policy.min_cosine == pytest.approx(4.0 / math.sqrt(144))
    off = VerificationPolicy.relative_to(nh)
    assert off.direction_reference == "" and off.min_cosine == 0.0
    with pytest.raises(ValueError, match="direction_reference"):
        VerificationPolicy.relative_to(nh, direction_z=4.0, direction_reference="oracle")


def test_peer_reference_is_the_median_of_the_others():
    from strategies.verify import peer_reference

    deltas = [{"w": torch.tensor([1.0, 10.0])}, {"w": torch.tensor([2.0, -5.0])}, {"w": torch.tensor([3.0, 0.0])},
              {"w": torch.tensor([100.0, 1.0])}]
    assert torch.equal(peer_reference(deltas, 3)["w"], torch.tensor([2.0, 0.0]))  # 100 does not vote for itself
    assert torch.equal(peer_reference(deltas, 0)["w"], torch.tensor([3.0, 0.0]))  # a large outlier moves it little
    assert peer_reference(deltas[:2], 0) is None  # one peer is no consensus


def test_deploy_check_bounds_the_drop_from_the_manufacturers_edge():
    policy = VerificationPolicy(protected_tolerance=0.05, protected_classes=("person",), noise_z=0.0)
    assert deploy_check({"person": 0.60}, {"person": 0.56}, policy)[0]
    ok, reason, figures = deploy_check({"person": 0.60}, {"person": 0.50}, policy)
    assert not ok and "person" in reason and figures["ap_before"] == {"person": 0.60}
    # a noisy validation set widens the tolerance to noise_z x the drop's bootstrap std, as for the tutor
    noisy = VerificationPolicy(protected_tolerance=0.05, protected_classes=("person",), noise_z=3.0)
    assert deploy_check({"person": 0.60}, {"person": 0.50}, noisy, {"person": 0.04})[0]
    assert not deploy_check({"person": 0.60}, {"person": float("nan")}, noisy, {"person": 0.04})[0]


def test_operating_point_check_and_guarded_classes():
    from strategies.verify import guarded_classes, operating_point_check

    policy = VerificationPolicy(protected_classes=("person",), kept_classes=("bus", "horse"), operating_tolerance=0.1,
                                noise_z=3.0)
    before = {"person": 0.8, "bus": 0.6, "horse": math.nan, "car": 0.2, "dog": 0.0}
    assert guarded_classes(before, policy) == ("person", "bus", "horse", "car")  # dog: not detected yet
    assert policy.recall_tolerance(0.01) == 0.1 and policy.recall_tolerance(0.05) == pytest.approx(0.15)
    tolerance = {c: 0.1 for c in guarded_classes(before, policy)}
    ok, reason, excess = operating_point_check(before, {"person": 0.75, "bus": 0.55, "car": 0.15}, tolerance)
    assert ok and "4 classes" in reason and excess == 0  # horse has no positives: skipped
    ok, reason, excess = operating_point_check(before, {"person": 0.75, "bus": 0.2, "car": 0.15}, tolerance)
    assert not ok and "bus recall 0.600 -> 0.200" in reason and "person" not in reason
    assert excess == pytest.approx(0.3)  # bus: 0.4 lost, 0.1 allowed
    ok, reason, excess = operating_point_check(before, {"person": math.nan, "bus": 0.6, "car": 0.2}, tolerance)
    assert not ok and "person" in reason and excess == pytest.approx(0.7)  # a vanished recall: all of it lost


def test_leave_one_out_harm_and_the_round_relative_threshold():
    from strategies.verify import harm_threshold, leave_one_out_harm, operating_harm_check

    merged = {"person": 0.5, "bus": 0.6, "horse": math.nan}
    without = [{"person": 0.5, "bus": 0.62}, {"person": 0.9, "bus": 0.58}, {"person": 0.48, "bus": math.nan}]
    harms = leave_one_out_harm(merged, without, ["person", "bus", "horse"])
    assert harms[0] == pytest.approx({"person": 0.0, "bus": 0.02})  # horse: no recall in the merge
    assert harms[1] == pytest.approx({"person": 0.4, "bus": -0.02})  # without delta 1, person recovers
    assert harms[2] == pytest.approx({"person": -0.02})  # bus unknown without it: left out
    # median 0.01, robust spread 1.4826 x 0.01: the round's harms make 0.01 + 3 x 0.0148 ordinary
    assert harm_threshold([0.0, 0.02, 0.4, -0.0], floor=0.0, z=3.0) == pytest.approx(0.01 + 3 * 1.4826 * 0.01)
    assert harm_threshold([0.0, 0.02, 0.4, 0.0], floor=0.1, z=3.0) == 0.1  # never below the floor
    assert harm_threshold([math.nan], floor=0.1, z=3.0) == 0.1
    # a round that moves a class as a whole: every delta's harm is alike, and none stands out
    alike = [0.30, 0.31, 0.29, 0.30]
    assert all(h <= harm_threshold(alike, floor=0.05, z=3.0) for h in alike)
    thresholds = {"person": 0.1, "bus": 0.1}
    assert operating_harm_check(harms[0], thresholds)[0]
    ok, reason, excess = operating_harm_check(harms[1], thresholds)
    assert not ok and "person recall -0.400" in reason and excess == pytest.approx(0.3)


def test_claim_verdicts_and_earned_claims_on_hand_made_gains():
    from strategies.verify import claim_verdict, earned_claims

    policy = VerificationPolicy(claims="earned", noise_z=3.0)  # the margin: 5 points, or 3 x the noise
    assert claim_verdict(0.20, 0.02, policy) == "improves"  # beyond 3 x 0.02
    assert claim_verdict(0.05, 0.02, policy) == "holds"  # a gain chance alone makes
    assert claim_verdict(0.04, 0.0, policy) == "holds"  # below the margin: not a gain worth a row of its own
    assert claim_verdict(-0.04, 0.0, policy) == "holds" and claim_verdict(-0.07, 0.0, policy) == "harms"
    assert claim_verdict(-0.07, 0.03, policy) == "holds"  # within 3 x its noise
    assert claim_verdict(math.nan, 0.01, policy) == "unchecked"
    # car: two honest clients improve it, a liar holds it -> the liar's claim is left out;
    # bus: nobody improves the well-known class -> every claimer that holds it; the one that harms never counts;
    # cow: no validation positives -> claims stay as made
    gains = [{"car": 0.30, "bus": 0.00}, {"car": 0.25, "bus": -0.01}, {"car": 0.001, "bus": -0.20, "cow": math.nan}]
    noise = [{"car": 0.03, "bus": 0.01}, {"car": 0.03, "bus": 0.01}, {"car": 0.03, "bus": 0.01, "cow": math.nan}]
    earned, verdicts = earned_claims(gains, noise, policy)
    assert earned == [{"car", "bus"}, {"car", "bus"}, {"cow"}]
    assert verdicts[2] == {"car": "holds", "bus": "harms", "cow": "unchecked"}
    # "improving": holding is not enough, so bus (improved by nobody) keeps its rows; the same verdicts
    strict, same = earned_claims(gains, noise, VerificationPolicy(claims="improving", noise_z=3.0))
    assert strict == [{"car"}, {"car"}, {"cow"}] and same == verdicts
    with pytest.raises(ValueError, match="one of each"):
        earned_claims(gains, noise[:2], policy)
    # "lifting": earned, and a row that lowers its class's top scores where the class is never counts. A
    # settled class (nobody improves truck) with two holders lifting it and a liar lowering it by 0.5: the
    # liar's claim is left out, which "earned" would count; an improving claim that lowers is left out too;
    # a NaN shift (no validation image holds the class) checks nothing
    lifting = VerificationPolicy(claims="lifting", noise_z=3.0)
    gains = [{"truck": 0.01, "car": 0.30}, {"truck": -0.01}, {"truck": 0.0, "car": 0.25, "cow": math.nan}]
    shifts = [{"truck": 0.4, "car": 1.2}, {"truck": 0.1}, {"truck": -0.5, "car": -0.01, "cow": math.nan}]
    noise = [{c: 0.01 for c in g} for g in gains]
    assert earned_claims(gains, noise, policy)[0] == [{"truck", "car"}, {"truck"}, {"truck", "car", "cow"}]
    counted, verdicts = earned_claims(gains, noise, lifting, shifts)
    assert counted == [{"truck", "car"}, {"truck"}, {"cow"}]
    assert verdicts[2] == {"truck": "lowers", "car": "lowers", "cow": "unchecked"}
    with pytest.raises(ValueError, match="row shifts"):
        earned_claims(gains, noise, lifting)


def test_the_shared_scope_judges_a_delta_by_the_layers_every_client_trains():
    """heldout8's client 0 in round 2 with two clients silent: its body agrees with its peers' median, its class
    rows (most of its norm) oppose it, and the two cancel (cosine 0.0002, rejected). Without the class rows
    ("shared") it passes; a delta whose body is flipped fails either way; the chance threshold counts only
    the tensors compared."""
    from models.parts import CLASS_ROW_PARAMS
    from strategies.verify import direction_check, direction_tensors

    g = torch.Generator().manual_seed(1)
    weight, bias = CLASS_ROW_PARAMS
    peers = {"body": torch.randn(3000, generator=g), weight: torch.randn(20, 50, generator=g),
             bias: torch.randn(20, generator=g)}
    body_agrees = {"body": 0.3 * peers["body"] + 0.1 * torch.randn(3000, generator=g)}
    rows_oppose = {weight: -1.5 * peers[weight], bias: -1.5 * peers[bias]}
    delta = {**body_agrees, **rows_oppose}
    policy = VerificationPolicy.relative_to(peers, direction_z=4.0)
    ok, reason, score = direction_check(delta, peers, policy.min_cosine)
    assert not ok and score < policy.min_cosine
    shared = VerificationPolicy.relative_to(peers, direction_z=4.0, direction_scope="shared")
    assert shared.min_cosine == pytest.approx(4.0 / math.sqrt(3000)) and shared.min_cosine > policy.min_cosine
    ok, _, score = direction_check(delta, peers, shared.min_cosine, "shared")
    assert ok and score > 0.9
    flipped_body = {**delta, "body": -peers["body"]}
    assert not direction_check(flipped_body, peers, shared.min_cosine, "shared")[0]
    assert set(direction_tensors(delta, "shared")) == {"body"} and direction_tensors(delta) == delta
    with pytest.raises(ValueError, match="direction scope"):
        direction_tensors(delta, "rows")


def test_direction_parts_splits_a_cosine_into_its_tensors():
    """bench.direction_parts: rows that oppose a body that agrees; the per-tensor terms sum to the whole."""
    from bench.direction_parts import parts
    from models.parts import CLASS_ROW_PARAMS

    weight, bias = CLASS_ROW_PARAMS
    reference = {"body": torch.ones(4), weight: torch.ones(2, 2), bias: torch.ones(2)}
    delta = {"body": torch.ones(4), weight: -torch.ones(2, 2), bias: -torch.ones(2)}
    figures = parts(delta, reference)
    assert figures["shared"] == pytest.approx(1.0) and figures["class_rows"] == pytest.approx(-1.0)
    assert figures["all"] == pytest.approx(-0.2) == sum(figures["terms"].values())
    assert figures["class_row_norm"] == pytest.approx(math.sqrt(6))


def test_the_diluting_claimer_is_the_one_whose_absence_raises_its_class_most_beyond_noise():
    from strategies.verify import diluting_claimer

    # claimer 1's row left out raises the class by 0.04 against noise 0.01: beyond z = 3; claimer 0's by 0.01
    assert diluting_claimer(0.20, [0.21, 0.24], [0.01, 0.01], 3.0) == 1
    # both beyond: the larger rise goes first
    assert diluting_claimer(0.20, [0.30, 0.25], [0.01, 0.01], 3.0) == 0
    # within noise, or lower without it: nobody dilutes (an honest pair's mean is what the merge wants)
    assert diluting_claimer(0.20, [0.22, 0.19], [0.01, 0.01], 3.0) is None
    # a figure that is not finite (no validation positives, no noise) checks nothing
    assert diluting_claimer(math.nan, [0.5, 0.5], [0.01, 0.01], 3.0) is None
    assert diluting_claimer(0.20, [math.nan, 0.5], [0.01, math.nan], 3.0) is None
