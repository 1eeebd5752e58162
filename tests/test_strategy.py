"""Aggregation rules, verification rules, and the DiReDi strategy's verify-and-merge step on
hand-made replies (no Flower runtime, no Ray)."""

from __future__ import annotations

import math
import time

import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from torch.utils.data import Dataset

from distill.rd import RDSettings
from distill.trainer import Phase, train
from models.ladder import build_model, get_profile
from models.parts import neck_head
from strategies.aggregate import aggregate, ties_merge, trimmed_mean, weighted_mean
from protocol.wire import DELTA, METRICS, NUM_EXAMPLES, PARTITION_ID, decode, encode
from strategies.diredi import DiReDiStrategy
from strategies.verify import Decision, VerificationPolicy, protected_check, structural_check

PERSON = 14  # VOC index of the protected class used below


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# -- aggregation ---------------------------------------------------------------------------------


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


# -- verification rules ------------------------------------------------------------------------------


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
    assert figures == {"ap_before": {"person": 0.60, "bus": 0.40}, "ap_after": {"person": 0.56, "bus": 0.41}}
    ok, reason, _ = protected_check(before, {"person": 0.50, "bus": 0.40}, policy)
    assert not ok and "person" in reason and "bus" not in reason
    ok, reason, _ = protected_check(before, {"person": float("nan"), "bus": 0.40}, policy)
    assert not ok  # a class that had an AP and lost it entirely
    ok, reason, _ = protected_check({"person": float("nan"), "bus": 0.4}, {"person": 0.0, "bus": 0.4}, policy)
    assert ok and "not checkable" in reason and "person" in reason


def test_decision_to_dict_and_metric_codec():
    d = Decision(client=3, round=2, accepted=False, reason="x", norm=1.5, ap_before={"person": 0.5})
    assert d.to_dict()["client"] == 3 and d.to_dict()["ap_before"] == {"person": 0.5}
    metrics = MetricRecord({**encode("ap-before", {"cat": 0.25, "person": 0.5}), "other": 1})
    assert decode(metrics, "ap-before") == {"cat": 0.25, "person": 0.5}


# -- the strategy's verify-and-merge step on crafted replies ---------------------------------------


class Squares(Dataset):
    """Red squares labelled "person" on dark noise: a tutor learns them in a few dozen steps."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = torch.rand(3, 64, 64, generator=g) * 0.2
            side = int(torch.randint(14, 30, (1,), generator=g))
            x, y = (int(v) for v in torch.randint(0, 64 - side, (2,), generator=g))
            image[0, y:y + side, x:x + side] = 0.9
            box = torch.tensor([[x, y, x + side, y + side]], dtype=torch.float32)
            self.items.append((image, {"boxes": box, "labels": torch.tensor([PERSON]), "image_id": f"{seed}-{i}"}))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def trained_tutor():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: one thread is fastest and immune to a busy machine
    try:
        tutor = build_model("smoke", "tutor", seed=0)
        train(tutor, Squares(64, 0), Phase("person", iters=80, batch_size=8, lr=0.01, warmup_iters=5), progress=False)
        yield tutor
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def strategy(trained_tutor):
    import copy

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",))
    return DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                          ["person"], RDSettings.from_profile(get_profile("smoke")), policy)


def reply(partition: int, delta: dict | None, num_examples: float = 10) -> Message:
    """A reply as node 100 + partition would send it (metadata set by hand: no Flower runtime here)."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=100 + partition, dst_node_id=0,
                        reply_to_message_id="instruction", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type="train")
    content = RecordDict({METRICS: MetricRecord({PARTITION_ID: partition, NUM_EXAMPLES: num_examples})})
    if delta is not None:
        content[DELTA] = ArrayRecord({k: v.clone() for k, v in delta.items()})
    return Message(content=content, metadata=metadata)


def zeros_like_nh(model):
    return {k: torch.zeros_like(v) for k, v in neck_head(model).items()}


def test_trained_tutor_detects_the_protected_class(strategy):
    assert strategy.tutor_validation_ap()["person"] > 0.3  # else the erasure test below proves nothing


def test_tutor_unchanged_when_every_delta_is_rejected(strategy):
    before = {k: v.clone() for k, v in strategy.tutor.state_dict().items()}
    nan_delta = zeros_like_nh(strategy.tutor)
    nan_delta["head.classification_head.cls_logits.bias"][0] = float("nan")
    huge = {k: torch.full_like(v, 10.0) for k, v in neck_head(strategy.tutor).items()}
    wrong_shape = zeros_like_nh(strategy.tutor)
    wrong_shape["head.classification_head.cls_logits.bias"] = torch.zeros(3)
    replies = [reply(0, nan_delta), reply(1, huge), reply(2, wrong_shape), reply(3, None),
               reply(4, zeros_like_nh(strategy.tutor), num_examples=float("nan"))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics["accepted"] == 0 and metrics["rejected"] == 5
    for name, value in strategy.tutor.state_dict().items():
        assert torch.equal(value, before[name]), name
    reasons = {d.client: d.reason for d in strategy.recorder.decisions}
    assert "non-finite" in reasons[0] and "exceeds the bound" in reasons[1] and "shape" in reasons[2]
    assert "no delta" in reasons[3] and "weight" in reasons[4]
    assert not any(d.accepted for d in strategy.recorder.decisions)


def test_delta_erasing_a_protected_class_is_rejected(strategy):
    seen = strategy.recorder.decisions
    erase = zeros_like_nh(strategy.tutor)
    erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0  # person never scores again
    harmless = zeros_like_nh(strategy.tutor)
    harmless["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    before_nh = neck_head(strategy.tutor)
    arrays, metrics = strategy.aggregate_train(1, [reply(0, erase), reply(1, harmless)])
    assert metrics["accepted"] == 1 and metrics["rejected"] == 1
    decisions = {d.client: d for d in seen}
    assert not decisions[0].accepted and "protected class lost: person" in decisions[0].reason
    assert decisions[0].ap_after["person"] < decisions[0].ap_before["person"] - 0.05
    assert decisions[1].accepted
    # Only the harmless delta reached the tutor (beta = 1, one accepted delta: its own value).
    after_nh = neck_head(strategy.tutor)
    assert torch.allclose(after_nh["backbone.fpn.inner_blocks.0.0.bias"],
                          before_nh["backbone.fpn.inner_blocks.0.0.bias"] + 1e-4)
    assert torch.equal(after_nh["head.classification_head.cls_logits.bias"],
                       before_nh["head.classification_head.cls_logits.bias"])
    assert arrays is not None and set(arrays.keys()) == set(strategy.tutor.state_dict())


def test_accepted_deltas_are_merged_by_weight(strategy):
    name = "backbone.fpn.inner_blocks.0.0.bias"
    d1, d2 = zeros_like_nh(strategy.tutor), zeros_like_nh(strategy.tutor)
    d1[name] += 1e-3
    d2[name] += 5e-3
    before = neck_head(strategy.tutor)[name]
    _, metrics = strategy.aggregate_train(1, [reply(1, d2, num_examples=30), reply(0, d1, num_examples=10)])
    assert metrics["accepted"] == 2
    expected = before + (10 * 1e-3 + 30 * 5e-3) / 40
    assert torch.allclose(neck_head(strategy.tutor)[name], expected, atol=1e-7)
    assert [d.client for d in strategy.recorder.decisions] == [0, 1]  # sorted by partition, not arrival
    assert math.isclose(strategy.recorder.decisions[1].weight, 30.0)
