"""strategies.aggregate: the merge rules (weighted mean, trimmed mean, TIES, Multi-Krum, the class-aware
merge) and the bounds on influence (clips, weight caps, class-row clips), on hand-made deltas."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.aggregate import CLASS_ROW_PARAMS, aggregate, class_aware_merge, ties_merge, trimmed_mean, weighted_mean


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


CLS_W, CLS_B = CLASS_ROW_PARAMS  # weight [num_classes, ...], bias [num_classes]; here 3 classes


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


def three_clients():
    """Three hand-made deltas over 3 classes; client 0 trained {0}, client 1 {0, 1}, client 2 {1}."""
    d0 = {CLS_W: rows([1, 2], [10, 10], [5, 5]), CLS_B: t(1, 7, 3), "neck": t(2, 0)}
    d1 = {CLS_W: rows([3, 4], [2, 4], [9, 9]), CLS_B: t(4, 2, 8), "neck": t(4, 8)}
    d2 = {CLS_W: rows([100, 100], [6, 8], [7, 7]), CLS_B: t(50, 5, 9), "neck": t(8, 4)}
    return [d0, d1, d2], [1, 2, 1], [{0}, {0, 1}, {1}]


def test_weighted_mean_of_known_deltas():
    deltas = [{"a": t(1.0, 2.0), "b": t(0.0)}, {"a": t(3.0, 6.0), "b": t(4.0)}]
    out = weighted_mean(deltas, [1, 3])
    assert torch.allclose(out["a"], t(2.5, 5.0))
    assert torch.allclose(out["b"], t(3.0))
    assert torch.allclose(aggregate(deltas, None, "weighted")["a"], t(2.0, 4.0))  # equal weights


def test_weighted_mean_rejects_bad_weights():
    deltas = [{"a": t(1.0)}, {"a": t(2.0)}]
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(deltas, [0, 0])
    with pytest.raises(ValueError, match="weights"):
        weighted_mean(deltas, [1, -1])
    with pytest.raises(ValueError, match="2 weights for 1"):
        weighted_mean(deltas[:1], [1, 1])


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    deltas = [{"a": t(1.0, -100.0)}, {"a": t(2.0, 5.0)}, {"a": t(100.0, 7.0)}, {"a": t(3.0, 6.0)}]
    out = trimmed_mean(deltas, trim_fraction=0.25)  # drops 1 value at each end per coordinate
    assert torch.allclose(out["a"], t(2.5, 5.5))
    assert torch.allclose(trimmed_mean(deltas, 0.0)["a"], t(26.5, -20.5))
    with pytest.raises(ValueError):
        trimmed_mean(deltas, 0.5)


def test_ties_merge_on_a_hand_made_case():
    # keep_fraction 0.5 keeps the 2 largest of 4 entries per delta.
    d1 = {"a": t(4.0, 0.1, -3.0, 0.2)}  # keeps 4, -3
    d2 = {"a": t(2.0, 0.3, 5.0, -0.1)}  # keeps 2, 5
    d3 = {"a": t(-1.0, -6.0, 0.1, 0.0)}  # keeps -1, -6
    out = ties_merge([d1, d2, d3], keep_fraction=0.5)["a"]
    # coord 0: 4 + 2 - 1 > 0 -> "+", mean of (4, 2) = 3; coord 1: only -6 survives -> -6;
    # coord 2: -3 + 5 > 0 -> "+", only 5 agrees -> 5; coord 3: nothing survives -> 0.
    assert torch.allclose(out, t(3.0, -6.0, 5.0, 0.0))
    # Weights move both the election and the mean: d1 heavy makes coord 2 negative.
    weighted = ties_merge([d1, d2, d3], weights=[10, 1, 1], keep_fraction=0.5)["a"]
    assert torch.allclose(weighted, t((40 + 2) / 11, -6.0, -3.0, 0.0))


def test_aggregate_names_unknown_methods():
    with pytest.raises(ValueError, match="unknown aggregation method 'median'.*weighted, trimmed, ties"):
        aggregate([{"a": t(1.0)}], None, "median")
    with pytest.raises(ValueError, match="different keys"):
        aggregate([{"a": t(1.0)}, {"b": t(1.0)}], None, "weighted")


def test_class_aware_merge_of_hand_made_deltas():
    deltas, weights, classes = three_clients()
    out = class_aware_merge(deltas, weights, classes, shared="weighted")
    assert set(out) == {CLS_W, CLS_B, "neck"}
    # class 0: clients 0 (w 1) and 1 (w 2) -> (1*d0 + 2*d1) / 3; client 2's 100s stay out.
    # class 1: clients 1 (w 2) and 2 (w 1) -> (2*d1 + 1*d2) / 3; client 0's 10s stay out.
    # class 2: nobody trained it -> 0, whatever the clients drifted there.
    assert torch.allclose(out[CLS_W], rows([7 / 3, 10 / 3], [10 / 3, 16 / 3], [0, 0]))
    assert torch.allclose(out[CLS_B], t(3, 3, 0))
    # shared tensor, weighted over all clients: (1*[2, 0] + 2*[4, 8] + 1*[8, 4]) / 4.
    assert torch.allclose(out["neck"], t(4.5, 5.0))
    # "trimmed" ignores weights: with nothing trimmed the shared tensor is the plain mean;
    # the class rows do not depend on the shared rule.
    trimmed = class_aware_merge(deltas, weights, classes, shared="trimmed", trim_fraction=0.0)
    assert torch.allclose(trimmed["neck"], t(14 / 3, 4.0))
    assert torch.allclose(trimmed[CLS_W], out[CLS_W]) and torch.allclose(trimmed[CLS_B], out[CLS_B])
    assert torch.equal(deltas[0][CLS_W], rows([1, 2], [10, 10], [5, 5]))  # inputs untouched


def test_class_aware_merge_keeps_a_one_class_delta_at_full_strength():
    zero = {CLS_W: torch.zeros(3, 2), CLS_B: torch.zeros(3), "neck": t(0, 0)}
    only_class_1 = {CLS_W: rows([0, 0], [6, -3], [0, 0]), CLS_B: t(0, 9, 0), "neck": t(0, 0)}
    deltas = [only_class_1, dict(zero), dict(zero)]
    classes = [{1}, {0}, {0, 2}]
    out = class_aware_merge(deltas, None, classes, shared="weighted")
    # the other classes' rows stay as they were: nobody changed them
    assert torch.equal(out[CLS_W][[0, 2]], torch.zeros(2, 2))
    assert torch.equal(out[CLS_B][[0, 2]], torch.zeros(2))
    # the touched row is client 0's row, not a third of it (which a plain mean would give)
    assert torch.allclose(out[CLS_W][1], t(6, -3)) and torch.allclose(out[CLS_B][1], t(9))
    assert torch.allclose(weighted_mean(deltas)[CLS_W][1], t(2, -1))
    # drift on class 1's row from a client that never trained class 1 is not mixed in
    drifting = dict(zero, **{CLS_W: rows([0, 0], [-50, 50], [0, 0]), CLS_B: t(0, -50, 0)})
    out = class_aware_merge([only_class_1, drifting, dict(zero)], None, classes, shared="weighted")
    assert torch.allclose(out[CLS_W][1], t(6, -3)) and torch.allclose(out[CLS_B][1], t(9))


def test_class_aware_merge_scale_and_untrained_rows():
    deltas, weights, classes = three_clients()
    base = class_aware_merge(deltas, weights, classes, shared="weighted")
    half = class_aware_merge(deltas, weights, classes, shared="weighted", scale=0.5)
    for name in base:
        assert torch.allclose(half[name], 0.5 * base[name]), name
    assert torch.allclose(half["neck"], t(2.25, 2.5))  # shared tensors are scaled too
    # every client drifted on class 2's row, none trained it -> 0 (also after scaling)
    assert all(d[CLS_B][2] != 0 for d in deltas)
    assert torch.equal(half[CLS_W][2], torch.zeros(2)) and half[CLS_B][2] == 0
    # only clients of weight 0 trained class 0 -> nobody with a say taught it -> 0
    zero_weight = class_aware_merge(deltas, [1, 0, 1], [{1}, {0}, {1}], shared="weighted")
    assert torch.allclose(zero_weight[CLS_B], t(0, 6, 0))  # class 1: (7 + 5) / 2


def test_class_aware_merge_rejects_bad_inputs():
    deltas, weights, classes = three_clients()
    for scale in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="scale must be finite and positive"):
            class_aware_merge(deltas, weights, classes, scale=scale)
    with pytest.raises(ValueError, match="client_classes has 2 entries for 3 deltas"):
        class_aware_merge(deltas, weights, classes[:2])
    with pytest.raises(ValueError, match=r"client_classes\[2\] has class indices \[3\] outside \[0, 3\)"):
        class_aware_merge(deltas, weights, [{0}, {1}, {1, 3}])
    with pytest.raises(ValueError, match=r"client_classes\[0\] has class indices \[-1\]"):
        class_aware_merge(deltas, weights, [{-1}, {1}, {1}])
    with pytest.raises(ValueError, match=r"client_classes\[1\] must hold integer class indices"):
        class_aware_merge(deltas, weights, [{0}, {0.5}, {1}])
    with pytest.raises(ValueError, match="shared must be one of weighted, trimmed, ties, krum, got 'class_aware'"):
        class_aware_merge(deltas, weights, classes, shared="class_aware")
    with pytest.raises(ValueError, match="2 weights for 3 deltas"):
        class_aware_merge(deltas, [1, 1], classes)


def test_class_aware_merge_without_a_classification_layer_merges_everything_as_shared():
    deltas, weights, classes = three_clients()
    no_bias = [{CLS_W: d[CLS_W], "neck": d["neck"]} for d in deltas]  # a class-row tensor is missing
    out = class_aware_merge(no_bias, weights, classes, shared="weighted", scale=2.0)
    expected = weighted_mean(no_bias, weights)
    assert set(out) == {CLS_W, "neck"}
    assert torch.allclose(out[CLS_W], 2.0 * expected[CLS_W])  # row 0 includes client 2's 100s
    assert torch.allclose(out["neck"], 2.0 * expected["neck"])


def test_clip_class_rows_bounds_each_row_by_its_contributors_median():
    from strategies.aggregate import clip_class_rows, row_norms

    honest = [{CLS_W: rows([0.3, 0.4], [0, 0], [1, 0]), CLS_B: t(0, 0, 0), "neck": t(5, 5)} for _ in range(3)]
    # a hidden edit: class 0's bias lowered by 10, the rest as honest as its peers
    edited = {CLS_W: rows([0.3, 0.4], [0, 0], [1, 0]), CLS_B: t(-10, 0, 0), "neck": t(5, 5)}
    deltas = honest + [edited]
    members = [{0, 2}, {0, 2}, {0, 2}, {0, 2}]
    assert row_norms(honest[0]) == pytest.approx([0.5, 0.0, 1.0])
    clipped, factors = clip_class_rows(deltas, members, multiple=4.0)
    # class 0: honest rows have norm 0.5, so the edited row (norm ~10.01) is scaled to 4 x 0.5 = 2
    assert factors[:3] == [{}, {}, {}] and set(factors[3]) == {0}
    assert row_norms(clipped[3])[0] == pytest.approx(2.0)
    assert torch.equal(clipped[3][CLS_W][2], edited[CLS_W][2]) and torch.equal(clipped[3]["neck"], edited["neck"])
    for a, b in zip(clipped[:3], honest):  # honest rows untouched, inputs not modified
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert edited[CLS_B][0] == -10
    # a row counts only its contributors: with client 3 alone on class 0, nothing bounds its row
    alone, factors = clip_class_rows(deltas, [{2}, {2}, {2}, {0, 2}], multiple=4.0)
    assert factors == [{}, {}, {}, {}] and torch.equal(alone[3][CLS_B], edited[CLS_B])
    # the larger of two contributors is bounded by the smaller one (the low median)
    _, factors = clip_class_rows([honest[0], edited], [{0}, {0}], multiple=4.0)
    assert set(factors[1]) == {0} and factors[0] == {}
    # off (inf) returns the deltas as they are; bad inputs say what is wrong
    same, factors = clip_class_rows(deltas, members)
    assert factors == [{}] * 4 and torch.equal(same[3][CLS_B], edited[CLS_B])
    with pytest.raises(ValueError, match="members has 3 entries for 4 deltas"):
        clip_class_rows(deltas, members[:3], multiple=4.0)
    with pytest.raises(ValueError, match=">= 1"):
        clip_class_rows(deltas, members, multiple=0.5)


def test_the_row_bound_by_influence_counts_the_weight_a_row_is_merged_with():
    from strategies.aggregate import bound_influence, clip_class_rows, row_norms

    honest = [{CLS_W: rows([0.3, 0.4], [0, 0], [1, 0]), CLS_B: t(0, 0, 0), "neck": t(5, 5)} for _ in range(3)]
    edited = {CLS_W: rows([0.3, 0.4], [0, 0], [1, 0]), CLS_B: t(-1.5, 0, 0), "neck": t(5, 5)}  # class-0 row norm ~1.58
    deltas, members = honest + [edited], [{0, 2}] * 4
    # by norm alone the edit is within 4 x 0.5; sent with 4 x the median weight its influence is 12.6 x the median's
    assert clip_class_rows(deltas, members, multiple=4.0)[1][3] == {}
    clipped, factors = clip_class_rows(deltas, members, multiple=4.0, weights=[10, 10, 10, 40])
    assert set(factors[3]) == {0} and 40 * row_norms(clipped[3])[0] == pytest.approx(4 * 10 * 0.5)
    assert factors[:3] == [{}, {}, {}]
    # bound_influence caps the claim first (1e12 -> 4 x the median, 40) and bounds the row with that weight
    bounded = bound_influence(deltas, [1.0] * 4, [10, 10, 10, 1e12], members, row_multiple=4.0, weight_multiple=4.0,
                              row_influence=True)
    assert bounded.weights == [10, 10, 10, 40] and bounded.row_factors[3][0] == pytest.approx(factors[3][0])
    plain = bound_influence(deltas, [1.0] * 4, [10, 10, 10, 1e12], members, row_multiple=4.0, weight_multiple=4.0)
    assert plain.row_factors[3] == {}
    with pytest.raises(ValueError, match="3 weights for 4 deltas"):
        clip_class_rows(deltas, members, multiple=4.0, weights=[1, 1, 1])


def test_aggregate_routes_class_aware():
    deltas, weights, classes = three_clients()
    out = aggregate(deltas, weights, "class_aware", client_classes=classes, shared="weighted", scale=0.5)
    expected = class_aware_merge(deltas, weights, classes, shared="weighted", scale=0.5)
    assert set(out) == set(expected)
    for name in expected:
        assert torch.allclose(out[name], expected[name]), name
    assert torch.allclose(out[CLS_B], t(1.5, 1.5, 0))
    with pytest.raises(ValueError, match="'class_aware' needs client_classes"):
        aggregate(deltas, weights, "class_aware", shared="weighted")


def test_clip_delta_scales_only_deltas_beyond_the_bound():
    from strategies.aggregate import clip_delta

    delta = {"a": t(3.0, 0.0), "b": t(4.0)}  # global norm 5
    clipped, factor = clip_delta(delta, 1.0)
    assert factor == pytest.approx(0.2)
    assert torch.allclose(clipped["a"], t(0.6, 0.0)) and torch.allclose(clipped["b"], t(0.8))
    assert torch.equal(delta["a"], t(3.0, 0.0))  # the input is not modified
    same, factor = clip_delta(delta, 5.0)  # within the bound: untouched
    assert factor == 1.0 and same["a"] is delta["a"]
    assert clip_delta(delta, math.inf)[1] == 1.0  # the default: clipping off
    assert clip_delta({"a": torch.zeros(2)}, 1.0)[1] == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_delta(delta, 0.0)


def test_cap_weights_cuts_an_inflated_claim_to_a_multiple_of_the_median():
    from strategies.aggregate import cap_weights

    capped, cap = cap_weights([500, 480, 1e12], 4.0)
    assert cap == 2000.0 and capped == [500.0, 480.0, 2000.0]
    honest = [460.0, 600.0, 512.0, 530.0, 488.0, 575.0, 470.0, 599.0]  # the default run's range
    assert cap_weights(honest, 4.0)[0] == honest  # does not bind on an honest round
    capped, cap = cap_weights([500, 1e12], 4.0)  # a liar among two cannot raise its own cap (low median)
    assert cap == 2000.0 and capped == [500.0, 2000.0]
    capped, cap = cap_weights([0, 0, 500, 1e12, 480], 4.0)  # zero claims do not pull the cap down
    assert cap == 2000.0 and capped == [0.0, 0.0, 500.0, 2000.0, 480.0]
    assert cap_weights([500, 1e12], math.inf) == ([500.0, 1e12], math.inf)  # inf: no cap
    with pytest.raises(ValueError, match="multiple"):
        cap_weights([1.0], 0.5)


def test_multi_krum_leaves_out_the_far_off_deltas_whole():
    from strategies.aggregate import multi_krum

    honest = [{"w": torch.tensor([1.0 + 0.1 * i, 2.0])} for i in range(5)]
    hostile = [{"w": torch.tensor([50.0, -40.0])}, {"w": torch.tensor([-60.0, 30.0])}]
    merged = multi_krum([*honest, *hostile], num_malicious=2)  # keeps 5: the honest ones
    assert torch.allclose(merged["w"], torch.tensor([1.2, 2.0]))
    krum = multi_krum([*honest, *hostile], num_malicious=2, num_selected=1)  # plain Krum: the most central
    assert torch.allclose(krum["w"], torch.tensor([1.2, 2.0]))
    weighted = multi_krum([*honest, *hostile], [1, 1, 1, 1, 6, 100, 100], num_malicious=2)
    assert torch.allclose(weighted["w"], torch.tensor([(1.0 + 1.1 + 1.2 + 1.3 + 6 * 1.4) / 10, 2.0]))
    assert torch.allclose(aggregate([*honest, *hostile], None, "krum")["w"], merged["w"])  # default f: (7-3)//2
    with pytest.raises(ValueError, match="num_malicious"):
        multi_krum(honest, num_malicious=5)
    classes = [{0}, {0}, {1}, {1}, {1}]
    shared_krum = aggregate(honest, None, "class_aware", client_classes=classes, shared="krum")
    assert set(shared_krum) == {"w"}


def test_bound_influence_clips_a_boosted_delta_and_caps_a_claimed_weight_relative_to_the_round():
    from strategies.aggregate import bound_influence

    honest = [{"w": torch.full((4,), v)} for v in (1.0, 1.1, 0.9)]
    boosted = {"w": torch.full((4,), 50.0)}
    deltas = [*honest, boosted]
    norms = [float(d["w"].norm()) for d in deltas]
    bounded = bound_influence(deltas, norms, [100, 120, 110, 4000], [set()] * 4, clip_multiple=4.0,
                              weight_multiple=4.0)
    low_median = sorted(norms)[1]  # the low median of four
    assert bounded.clip_factors[:3] == [1.0, 1.0, 1.0]
    assert float(bounded.deltas[3]["w"].norm()) == pytest.approx(4.0 * low_median)
    assert bounded.weights[:3] == [100, 120, 110] and bounded.weights[3] == bounded.weight_cap == 4.0 * 110
    assert torch.equal(bounded.deltas[0]["w"], honest[0]["w"])  # an honest delta is untouched
    off = bound_influence(deltas, norms, [100, 120, 110, 4000], [set()] * 4)  # every bound off (inf)
    assert off.clip_factors == [1.0] * 4 and off.weights == [100, 120, 110, 4000]


def test_the_share_trimmed_mean_counts_each_delta_by_its_share():
    from strategies.aggregate import share_trimmed_mean

    torch.manual_seed(0)
    deltas = [{"w": torch.randn(6, 3), "b": torch.randn(4)} for _ in range(8)]
    plain = trimmed_mean(deltas, 0.2)
    equal = share_trimmed_mean(deltas, [0.5] * 8, 0.2)  # equal shares are whole deltas
    assert all(torch.allclose(plain[k], equal[k], atol=1e-6) for k in plain)
    assert all(torch.equal(plain[k], trimmed_mean(deltas, 0.2, shares=[1.0] * 8)[k]) for k in plain)
    # by hand: values 0..4 (one per delta), shares 1,1,1,1,0 scaled to sum 5 -> lengths 1.25 each for 0..3;
    # one unit cut at each end keeps 0.25 of value 0, 1.25 of 1, 1.25 of 2, 0.25 of 3 over length 3
    row = [{"w": torch.tensor([float(v)])} for v in range(5)]
    by_hand = (0.25 * 0 + 1.25 * 1 + 1.25 * 2 + 0.25 * 3) / 3.0
    assert float(share_trimmed_mean(row, [1, 1, 1, 1, 0], 0.2)["w"]) == pytest.approx(by_hand)
    # a near-zero delta of share 0.02 no longer pulls the middle towards 0
    honest = [{"w": torch.tensor([v])} for v in (1.0, 1.1, 0.9, 1.05, 0.95, 1.0)]
    clipped = [{"w": torch.tensor([0.0])}] * 2
    whole = float(trimmed_mean([*honest, *clipped], 0.2)["w"])
    scaled = float(trimmed_mean([*honest, *clipped], 0.2, shares=[1.0] * 6 + [0.02] * 2)["w"])
    assert whole == pytest.approx(5.0 / 6.0, abs=0.02) and scaled == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="non-negative"):
        trimmed_mean(row, 0.2, shares=[1, 1, 1, 1, -1])


def test_a_clipped_delta_counts_by_the_share_the_clip_kept():
    """clip_shares: the clipped delta's weight in the merge is its capped claim x its clip factor, and it
    reaches a class's row with that weight: one honest client and one clipped client of a class no longer
    halve the row."""
    from strategies.aggregate import bound_influence

    honest = [{"w": torch.full((4,), v), "head.classification_head.cls_logits.weight": torch.zeros(2, 3),
               "head.classification_head.cls_logits.bias": torch.zeros(2)} for v in (1.0, 1.1, 0.9)]
    honest[0]["head.classification_head.cls_logits.bias"] = torch.tensor([0.0, 2.0])  # the one client of class 1
    hostile = {"w": torch.full((4,), -50.0), "head.classification_head.cls_logits.weight": torch.zeros(2, 3),
               "head.classification_head.cls_logits.bias": torch.tensor([0.0, -50.0])}
    deltas = [*honest, hostile]
    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in d.values())) for d in deltas]
    members = [{0, 1}, {0}, {0}, {0, 1}]
    kwargs = dict(clip_multiple=2.0, weight_multiple=2.0, row_influence=False)
    shared = bound_influence(deltas, norms, [100, 100, 100, 1e12], members, clip_shares=True, **kwargs)
    whole = bound_influence(deltas, norms, [100, 100, 100, 1e12], members, **kwargs)
    factor = shared.clip_factors[3]
    assert factor < 0.1 and shared.clip_factors[:3] == [1.0, 1.0, 1.0] == shared.shares[:3]
    assert shared.capped == whole.capped == [100, 100, 100, 200] and shared.shares[3] == factor
    assert shared.weights == pytest.approx([100, 100, 100, 200 * factor]) and whole.weights == whole.capped
    assert whole.shares == [1.0] * 4

    def class_one_bias(bounded):
        merged = aggregate(bounded.deltas, bounded.weights, "class_aware", client_classes=members,
                           shared="weighted", shares=bounded.shares)
        return float(merged["head.classification_head.cls_logits.bias"][1])

    clipped_bias = float(shared.deltas[3]["head.classification_head.cls_logits.bias"][1])
    assert class_one_bias(whole) == pytest.approx((100 * 2.0 + 200 * clipped_bias) / 300, rel=1e-5)
    assert class_one_bias(shared) == pytest.approx((100 * 2.0 + 200 * factor * clipped_bias) / (100 + 200 * factor),
                                                   rel=1e-5)
    assert abs(class_one_bias(shared) - 2.0) < abs(class_one_bias(whole) - 2.0) / 3


def test_a_delta_the_norm_clip_cut_does_not_set_the_row_bound_of_its_peers():
    """Two contributors to class 1's row: an honest one and one whose delta the norm clip cuts to under 2 %.
    Its remnant row must not set the row's median (4 x a remnant would cut the honest row to almost nothing):
    the honest row is merged whole, the remnant is still bounded by the honest row's median."""
    from strategies.aggregate import bound_influence, clip_class_rows

    rows = ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias")

    def delta(shared, row):
        return {"w": torch.full((4,), shared), rows[0]: torch.zeros(2, 3), rows[1]: torch.tensor([0.0, row])}

    deltas = [delta(0.1, 1.0), delta(0.5, 0.0), delta(0.5, 0.0), delta(-100.0, 1.0)]
    norms = [math.sqrt(sum(float(t.pow(2).sum()) for t in d.values())) for d in deltas]
    members = [{1}, set(), set(), {1}]
    bounded = bound_influence(deltas, norms, [10] * 4, members, clip_multiple=2.5, row_multiple=4.0,
                              row_influence=True, clip_shares=True)
    assert bounded.clip_factors[3] < 0.02 and bounded.row_factors[0] == {}  # the honest row whole
    assert torch.equal(bounded.deltas[0][rows[1]], deltas[0][rows[1]])
    # without the rule the remnant sets the low median of two and the honest row is cut
    _, factors = clip_class_rows(bounded.deltas, members, 4.0, weights=bounded.weights)
    assert factors[0][1] < 0.01
    with pytest.raises(ValueError, match="setters"):
        clip_class_rows(deltas, members, 4.0, setters=[True])


def test_a_tiny_row_does_not_set_the_row_bound_with_the_round_floor():
    """Class 1's row has two contributors, an honest one (row 1.0) and one that sends it at 1 % (0.01); three
    other deltas merge class 0's row (0.5 each). Without a floor the tiny row sets the low median of two and the
    honest row is cut to 4 x 0.01; with the round's floor (4 x the median of every merged row, 0.5) it stays whole,
    and a large row (10.0) on a class of few contributors is still bounded."""
    from strategies.aggregate import bound_influence, clip_class_rows

    def delta(row0, row1):
        return {CLASS_ROW_PARAMS[0]: torch.zeros(2, 3), CLASS_ROW_PARAMS[1]: torch.tensor([row0, row1])}

    deltas = [delta(0.0, 1.0), delta(0.0, 0.01), delta(0.5, 0.0), delta(0.5, 0.0), delta(0.5, 0.0)]
    members = [{1}, {1}, {0}, {0}, {0}]
    _, factors = clip_class_rows(deltas, members, 4.0)
    assert factors[0] == {1: pytest.approx(0.04)}
    out, factors = clip_class_rows(deltas, members, 4.0, round_floor=True)
    assert factors == [{}] * 5 and torch.equal(out[0][CLASS_ROW_PARAMS[1]], deltas[0][CLASS_ROW_PARAMS[1]])
    large = [*deltas[:4], delta(0.5, 10.0)]
    _, factors = clip_class_rows(large, [*members[:4], {0, 1}], 4.0, round_floor=True)
    # the rows merged: 1.0, 0.01, 10.0 (class 1) and 0.5 x 3 (class 0): the floor is 4 x 0.5 = 2.0; class 1's own
    # median is 1.0 (4.0 allowed), so the large row is cut to 4.0
    assert factors[4] == {1: pytest.approx(0.4)} and factors[0] == {}
    # through bound_influence, with weights: the same floor on influences
    bounded = bound_influence(deltas, [1.0] * 5, [10] * 5, members, row_multiple=4.0, row_influence=True,
                              row_floor=True)
    assert bounded.row_factors == [{}] * 5


def test_a_tiny_row_counts_by_its_size_and_does_not_cut_its_peer_with_the_kind_floor():
    """Class 1 (a class the tutor learns) has two contributors: an honest row (1.0) and one sent at 1 % (0.01)
    with four times the weight; three deltas merge class 0 (a known class, rows 0.05) and two more class 2
    (learned, rows 0.8 and 1.2). Counted whole, the tiny row dilutes the honest one to about a fifth and, as the
    low median of two, cuts it to 4 x 0.01; with the kind floor (4 x the median learned row, 0.8) the honest row is
    not cut, and with row shares the tiny row counts as 4 x 0.01 / 0.8 = 5 % of a row, so class 1's merged row keeps
    over 95 % of the honest one. The known rows, far smaller than the learned ones, are measured against their own
    kind and count whole."""
    from strategies.aggregate import bound_influence, kind_medians, row_shares, tiny_row_floors

    def delta(row0, row1, row2):
        return {CLASS_ROW_PARAMS[0]: torch.zeros(3, 2), CLASS_ROW_PARAMS[1]: torch.tensor([row0, row1, row2])}

    deltas = [delta(0.0, 1.0, 0.0), delta(0.0, 0.01, 0.0), delta(0.05, 0.0, 0.0), delta(0.05, 0.0, 0.0),
              delta(0.05, 0.0, 0.0), delta(0.0, 0.0, 0.8), delta(0.0, 0.0, 1.2)]
    members = [{1}, {1}, {0}, {0}, {0}, {2}, {2}]
    weights = [100, 400, 100, 100, 100, 100, 100]
    kinds = [0, 1, 1]
    assert kind_medians([[0.05 * (c == 0) for c in range(3)]], {0: [0], 1: [], 2: []}, kinds) == {
        0: pytest.approx(0.05), 1: 0.0, 2: 0.0}
    shares = row_shares(deltas, members, tiny_row_floors(deltas, members, 4.0, kinds))
    assert shares[1] == {1: pytest.approx(4 * 0.01 / 0.8)} and all(s == {} for i, s in enumerate(shares) if i != 1)
    # one kind for every class: the known rows set a median of 0.05 and the tiny row counts 0.8 of a row
    assert row_shares(deltas, members, tiny_row_floors(deltas, members, 4.0))[1] == {1: pytest.approx(0.8)}
    assert tiny_row_floors(deltas, members, math.inf, kinds) == {}
    assert row_shares(deltas, members, {}) == [{}] * 7

    def class_one(bounded):
        merged = aggregate(bounded.deltas, bounded.weights, "class_aware", client_classes=members, shared="weighted",
                           row_shares=bounded.row_shares)
        return float(merged[CLASS_ROW_PARAMS[1]][1])

    options = dict(row_multiple=4.0, weight_multiple=4.0, row_influence=True, row_kinds=kinds)
    plain = bound_influence(deltas, [1.0] * 7, weights, members, **options)
    assert plain.row_factors[0] == {1: pytest.approx(0.16)}  # 4 x (400 x 0.01) / (100 x 1.0)
    assert class_one(plain) == pytest.approx((100 * 0.16 + 400 * 0.01) / 500)
    guarded = bound_influence(deltas, [1.0] * 7, weights, members, kind_floor=True, tiny_rows=True, **options)
    assert guarded.row_factors[0] == {} and guarded.row_shares[1] == shares[1]
    assert class_one(guarded) == pytest.approx((100 * 1.0 + 400 * 0.05 * 0.01) / (100 + 400 * 0.05))
    assert class_one(guarded) > 0.8
    # the shares alone (no kind floor): the tiny row takes part in the row's median at the size it counts for
    # (a quarter of the learned median, 0.2, at its weight 400: 80 against the honest 100), so the honest row is
    # not cut, and the bound does not rise above 4 x that
    shared = bound_influence(deltas, [1.0] * 7, weights, members, tiny_rows=True, **options)
    assert shared.row_factors[0] == {} and class_one(shared) == pytest.approx(class_one(guarded))
    big = [*deltas[:1], delta(0.0, 10.0, 0.0), *deltas[2:]]  # a large row beside the honest one is still cut
    assert bound_influence(big, [1.0] * 7, [100] * 7, members, tiny_rows=True, **options).row_factors[1] == {
        1: pytest.approx(0.4)}
    # an honest round (no row far below its kind) is merged exactly as without the rules
    honest = [deltas[0], delta(0.0, 0.9, 0.0), *deltas[2:]]
    a = bound_influence(honest, [1.0] * 7, [100] * 7, members, **options)
    b = bound_influence(honest, [1.0] * 7, [100] * 7, members, kind_floor=True, tiny_rows=True, **options)
    assert b.row_shares == [{}] * 7 and b.row_factors == a.row_factors
    with pytest.raises(ValueError, match="row shares"):
        aggregate(deltas, None, "class_aware", client_classes=members, row_shares=[{}])
    with pytest.raises(ValueError, match="kinds"):
        tiny_row_floors(deltas, members, 4.0, [0, 1])


def test_restored_rows_keep_their_rows_mean_size_and_nothing_else_moves():
    """Two clients teach class 1 with rows of size 1 that point different ways (orthogonal): their mean has size
    0.71, restored it has size 1 and the mean's direction. Rows that agree are left bit-identical (no factor), as
    are the classes not named and every shared tensor; the target counts each row by its weight and row share, so
    a row counted as 5 % of a row barely lowers it."""
    from strategies.aggregate import mean_row_norms, restore_row_sizes, row_mean_factors, row_norms

    def delta(w1, b1, shared):
        w = torch.zeros(3, 2)
        w[1] = torch.tensor(w1)
        w[0] = torch.tensor([0.3, -0.4])
        return {CLS_W: w, CLS_B: torch.tensor([0.1, b1, 0.0]), "neck": torch.full((4,), shared)}

    apart = [delta([1.0, 0.0], 0.0, 1.0), delta([0.0, 1.0], 0.0, 3.0)]
    members = [{0, 1}, {1}]
    plain = class_aware_merge(apart, [1.0, 1.0], members, shared="weighted")
    restored = class_aware_merge(apart, [1.0, 1.0], members, shared="weighted", restore_rows=[1])
    assert row_norms(plain)[1] == pytest.approx(math.sqrt(0.5))
    assert row_norms(restored)[1] == pytest.approx(1.0)
    assert torch.allclose(restored[CLS_W][1], plain[CLS_W][1] * math.sqrt(2))  # the same direction
    assert torch.equal(restored[CLS_W][0], plain[CLS_W][0]) and torch.equal(restored["neck"], plain["neck"])
    assert torch.equal(restored[CLS_B], plain[CLS_B])  # both biases 0: class 1's stays 0, class 0 not named
    # rows that agree in direction: the mean already has their mean size, nothing is scaled
    agree = [delta([1.0, 0.0], 0.5, 1.0), delta([2.0, 0.0], 1.0, 3.0)]
    same = class_aware_merge(agree, [1.0, 3.0], members, shared="weighted")
    assert all(torch.equal(a, b) for a, b in zip(
        same.values(), class_aware_merge(agree, [1.0, 3.0], members, shared="weighted", restore_rows=[1]).values()))
    # the target: each row's size by its factor in the mean (weight x row share, normalised over the row's deltas)
    factors = row_mean_factors([1.0, 3.0], members, 3, [{}, {1: 0.05}])
    assert factors[0] == {0: 1.0} and factors[1] == {0: pytest.approx(1 / 1.15), 1: pytest.approx(0.15 / 1.15)}
    assert 2 not in factors  # nobody teaches class 2
    sizes = mean_row_norms(apart, factors)
    assert sizes[1] == pytest.approx(1.0) and sizes[0] == pytest.approx(math.hypot(0.5, 0.1))
    # a tiny row (counted as 5 % of a row) beside a whole one: the whole row alone sets the size
    from strategies.aggregate import size_setting_factors

    tiny = [delta([1.0, 0.0], 0.0, 1.0), delta([0.0, 0.01], 0.0, 3.0)]
    kept = class_aware_merge(tiny, [1.0, 3.0], members, shared="weighted", row_shares=[{}, {1: 0.05}],
                             restore_rows=[1])
    assert row_norms(kept)[1] == pytest.approx(1.0)
    assert size_setting_factors(factors, [{}, {1: 0.05}]) == {0: {0: 1.0}, 1: {0: 1.0}}
    assert size_setting_factors(factors, [{1: 0.5}, {1: 0.05}])[1] == factors[1]  # all partial: as they were
    _, scaled = restore_row_sizes(plain, {1: 1.0, 0: 0.0})
    assert scaled == {1: pytest.approx(math.sqrt(2))}  # never scaled down
    zero = {CLS_W: torch.zeros(3, 2), CLS_B: torch.zeros(3)}
    assert restore_row_sizes(zero, {1: 1.0}) == (zero, {})  # a zero row has no direction to scale


def test_a_clipped_delta_counts_in_its_class_rows_by_its_share_twice_when_sized():
    """Delta B, twice the clip norm, is cut to half. Counted as half a delta (clip share), its half-size row takes a
    third of class 1's mean beside A's whole row (A's part 0.67); sized, it counts there as half of a half (its
    rows are half their size), so A's part is 0.8. The shared tensor counts B as half either way, and an unclipped
    round is merged exactly as without the rule."""
    from strategies.aggregate import bound_influence

    def delta(row, shared):
        return {CLS_W: torch.tensor([[0.0, 0.0], row, [0.0, 0.0]]), CLS_B: torch.zeros(3), "neck": torch.tensor([shared])}

    deltas = [delta([1.0, 0.0], 1.0), delta([0.0, 4.0], 0.0)]
    members = [{1}, {1}]
    norms = [math.sqrt(2), 4.0]

    def merged(**options):
        b = bound_influence(deltas, norms, [1.0, 1.0], members, clip_norm=2.0, clip_shares=True, **options)
        return b, aggregate(b.deltas, b.weights, "class_aware", client_classes=members, shared="weighted",
                            row_shares=b.row_shares)

    scaled, plain = merged()
    sized, kept = merged(clipped_rows_sized=True)
    assert scaled.clip_factors == [1.0, pytest.approx(0.5)]
    assert scaled.row_shares == [{}, {}] and sized.row_shares == [{}, {1: pytest.approx(0.5)}]
    assert torch.allclose(plain[CLS_W][1], torch.tensor([1.0, 1.0]) / 1.5)
    assert torch.allclose(kept[CLS_W][1], torch.tensor([1.0, 0.5]) / 1.25)
    assert torch.equal(plain["neck"], kept["neck"])  # the shared layers count B as a quarter in both
    whole = [delta([1.0, 0.0], 1.0), delta([0.0, 1.0], 1.0)]
    a = bound_influence(whole, norms, [1.0, 1.0], members, clip_norm=2.0, clip_shares=True)
    b = bound_influence(whole, norms, [1.0, 1.0], members, clip_norm=2.0, clip_shares=True, clipped_rows_sized=True)
    assert a.row_shares == b.row_shares == [{}, {}]
