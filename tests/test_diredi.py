"""The DiReDi strategy's verify-and-merge step, edge check and spread on hand-made replies and a tiny
trained tutor (no Flower runtime, no Ray)."""

from __future__ import annotations

import math
import time
from unittest import mock

import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from torch.utils.data import Dataset

from distill.rd import ClientTraining
from distill.trainer import Phase, train
from evaluation.ap import bootstrap_ap_drop
from models.ladder import build_model, get_profile
from models.parts import neck_head
from protocol.wire import DELTA, METRICS, NUM_EXAMPLES, PARTITION_ID, TRAINED, decode, encode
from strategies.diredi import DiReDiStrategy
from strategies.verify import VerificationPolicy

PERSON = 14  # VOC index of the protected class used below


def rows(*values):
    return torch.tensor(values, dtype=torch.float32)


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
                          ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)


def reply(partition: int, delta: dict | None, num_examples: float = 10, trained: tuple[str, ...] = ()) -> Message:
    """A reply as node 100 + partition would send it (metadata set by hand: no Flower runtime here)."""
    metadata = Metadata(run_id=1, message_id="", src_node_id=100 + partition, dst_node_id=0,
                        reply_to_message_id="instruction", group_id="1", created_at=time.time(), ttl=600.0,
                        message_type="train")
    content = RecordDict({METRICS: MetricRecord({PARTITION_ID: partition, NUM_EXAMPLES: num_examples,
                                                 **encode(TRAINED, dict.fromkeys(trained, 1))})})
    if delta is not None:
        content[DELTA] = ArrayRecord({k: v.clone() for k, v in delta.items()})
    return Message(content=content, metadata=metadata)


def zeros_like_nh(model):
    return {k: torch.zeros_like(v) for k, v in neck_head(model).items()}


@pytest.fixture(scope="module")
def trained_edge():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        edge = build_model("smoke", "edge", seed=1)
        train(edge, Squares(64, 0), Phase("person", iters=80, batch_size=8, lr=0.01, warmup_iters=5), progress=False)
        yield edge.eval()
    finally:
        torch.set_num_threads(threads)


def edge_reply(partition: int, edge: dict | None) -> Message:
    """A "train.distill" reply of node 100 + partition holding ``edge`` (its state dict) or no edge."""
    message = reply(partition, None)
    if edge is not None:
        message.content["edge"] = ArrayRecord({k: v.clone() for k, v in edge.items()})
    return message


def one_honest_two_liars(tutor, claims: str, honest: dict, edit: dict):
    """One class-aware round under claim rule ``claims``: client 0 claims person with ``honest`` and 10
    examples, clients 1 and 2 claim it with ``edit`` and 40 each; returns (strategy, decisions by client)."""
    import copy

    policy = VerificationPolicy(norm_bound=50.0, claims=claims, noise_z=3.0, bootstrap_samples=50)
    strategy = DiReDiStrategy(copy.deepcopy(tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              aggregation="class_aware")
    strategy.aggregate_train(1, [reply(0, honest, 10, ("person",)), reply(1, edit, 40, ("person",)),
                                 reply(2, edit, 40, ("person",))])
    return strategy, {d.client: d for d in strategy.recorder.decisions}


def test_trained_tutor_detects_the_protected_class(strategy):
    assert strategy.validator.tutor_ap()["person"] > 0.3  # else the erasure test below proves nothing


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


def test_a_client_whose_train_reply_never_came_is_recorded_as_a_failure(strategy):
    """Two nodes were asked (the ledger counted their messages), one answered within the timeout: the
    other is a failure of the round's "train" step, not silently left out."""
    ledger = strategy._open_round(1)
    ledger.node(100).bytes_down = ledger.node(101).bytes_down = 1000  # configure_train sent to nodes 100, 101
    arrays, metrics = strategy.aggregate_train(1, [reply(0, zeros_like_nh(strategy.tutor))])
    assert metrics["received"] == 1
    assert strategy.recorder.failures == [{"round": 1, "step": "train", "node": 101,
                                           "reason": "no reply within the round's timeout"}]


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


def test_class_aware_strategy_takes_each_class_row_from_the_clients_that_trained_it(trained_tutor):
    """The strategy reads each client's trained classes from its reply ("trained.<class>")."""
    import copy

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",))
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(8, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              aggregation="class_aware", aggregation_options={"shared": "weighted"})
    bias = "head.classification_head.cls_logits.bias"
    cat, dog = 7, 11  # VOC indices
    d_cat, d_dog = zeros_like_nh(strategy.tutor), zeros_like_nh(strategy.tutor)
    d_cat[bias][cat] = 0.3
    d_dog[bias][dog] = 0.2
    d_dog[bias][cat] = -5.0  # drift on a class this client never saw: not knowledge
    before = neck_head(strategy.tutor)[bias].clone()
    _, metrics = strategy.aggregate_train(1, [reply(0, d_cat, trained=("cat", "person")),
                                              reply(1, d_dog, trained=("dog", "person"))])
    assert metrics["accepted"] == 2
    moved = neck_head(strategy.tutor)[bias] - before
    assert torch.isclose(moved[cat], torch.tensor(0.3)) and torch.isclose(moved[dog], torch.tensor(0.2))
    others = [i for i in range(len(moved)) if i not in (cat, dog)]
    assert torch.count_nonzero(moved[others]) == 0


def test_a_learned_class_row_keeps_its_rows_size_under_row_size_learned(trained_tutor):
    """Two clients teach dog with rows of size 0.3 that point different ways: merged as a mean, dog's row has
    size 0.21; with row_size "learned" (dog is not a class the tutor knows) it keeps 0.3 and the mean's
    direction, while person (protected, known) is averaged as before. The history records each merged row's
    size beside its rows' mean size."""
    import copy

    weight = "head.classification_head.cls_logits.weight"
    dog, person = 11, 14
    deltas = [zeros_like_nh(trained_tutor), zeros_like_nh(trained_tutor)]
    for i, delta in enumerate(deltas):
        delta[weight][dog].view(-1)[i] = 0.3
        delta[weight][person].view(-1)[i] = 0.01
    moved = {}
    for size in ("mean", "learned"):
        policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",),
                                    row_size=size)
        strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(8, 1),
                                  ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                                  aggregation="class_aware", aggregation_options={"shared": "weighted"})
        before = neck_head(strategy.tutor)[weight].clone()
        _, metrics = strategy.aggregate_train(1, [reply(i, d, trained=("dog", "person")) for i, d in enumerate(deltas)])
        assert metrics["accepted"] == 2
        moved[size] = neck_head(strategy.tutor)[weight] - before
        strategy.record_tutor()
        rows = strategy.recorder.tutor_history[-1]["merged_rows"]
        assert rows["dog"]["mean_size"] == pytest.approx(0.3) and rows["dog"]["size"] == pytest.approx(
            float(moved[size][dog].norm()), rel=1e-4)
        assert rows["dog"]["plain_size"] == pytest.approx(0.3 / math.sqrt(2), rel=1e-4)
    assert float(moved["mean"][dog].norm()) == pytest.approx(0.3 / math.sqrt(2), rel=1e-4)
    assert float(moved["learned"][dog].norm()) == pytest.approx(0.3, rel=1e-4)
    assert torch.allclose(moved["learned"][dog], moved["mean"][dog] * math.sqrt(2), atol=1e-6)
    assert torch.equal(moved["learned"][person], moved["mean"][person])


def test_noise_calibrated_verification_records_the_noise_and_still_rejects_an_eraser(trained_tutor):
    import copy

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.02, protected_classes=("person",),
                                noise_z=2.0, bootstrap_samples=30)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)
    erase = zeros_like_nh(strategy.tutor)
    erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0
    harmless = zeros_like_nh(strategy.tutor)
    harmless["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    _, metrics = strategy.aggregate_train(1, [reply(0, erase), reply(1, harmless)])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert not decisions[0].accepted and decisions[1].accepted
    for d in decisions.values():  # every decision states the noise next to the drop it judged
        assert math.isfinite(d.noise["person"]) and d.tolerance["person"] >= 0.02
    assert decisions[1].noise["person"] < 0.01  # a change that moves nothing: (almost) no noise


def test_a_client_claiming_1e12_examples_no_longer_dominates_the_weighted_merge(trained_tutor):
    import copy
    import json

    from report.writer import json_line

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",),
                                weight_cap=4.0)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(8, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              aggregation="weighted")
    name = "backbone.fpn.inner_blocks.0.0.bias"
    honest_a, honest_b, liar = (zeros_like_nh(strategy.tutor) for _ in range(3))
    honest_a[name] += 1e-3
    honest_b[name] += 2e-3
    liar[name] -= 4e-3
    before = neck_head(strategy.tutor)[name].clone()
    _, metrics = strategy.aggregate_train(1, [reply(0, honest_a, num_examples=500),
                                              reply(1, honest_b, num_examples=480),
                                              reply(2, liar, num_examples=1e12)])
    assert metrics["accepted"] == 3
    moved = neck_head(strategy.tutor)[name] - before
    expected = (500 * 1e-3 + 480 * 2e-3 + 2000 * -4e-3) / 2980  # the liar counts 4 x the median (500)
    assert torch.allclose(moved, torch.full_like(moved, expected), atol=1e-7)
    # uncapped it would have been the liar's delta (-4e-3); capped, its share is 2000 / 2980
    assert (moved - (-4e-3)).abs().min() > 1e-3
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[2].weight == 1e12 and decisions[2].weight_used == 2000.0
    assert decisions[0].weight_used == 500.0 and all(d.weight_cap == 2000.0 for d in decisions.values())
    assert all(d.clip_factor == 1.0 for d in decisions.values())  # clipping off by default
    assert all(math.isnan(d.cosine) for d in decisions.values())  # no reference: direction check skipped
    line = json.loads(json_line(decisions[2].to_dict()))  # as verification.jsonl holds it
    assert line["weight_used"] == 2000.0 and line["weight_cap"] == 2000.0 and line["rejected_by"] == []


def test_strategy_clips_accepted_deltas_and_records_the_factor(trained_tutor):
    import copy

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",),
                                clip_norm=1e-3)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(8, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              aggregation="weighted")
    name = "backbone.fpn.inner_blocks.0.0.bias"
    small, boosted = zeros_like_nh(strategy.tutor), zeros_like_nh(strategy.tutor)
    small[name][0] = 5e-4
    boosted[name][1] = 1e-2  # norm 1e-2: clipped to 1e-3
    before = neck_head(strategy.tutor)[name].clone()
    strategy.aggregate_train(1, [reply(0, small), reply(1, boosted)])  # equal weights
    moved = neck_head(strategy.tutor)[name] - before
    assert moved[0].item() == pytest.approx(2.5e-4, abs=1e-8) and moved[1].item() == pytest.approx(5e-4, abs=1e-8)
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[0].clip_factor == 1.0 and decisions[1].clip_factor == pytest.approx(0.1)


def test_strategy_direction_and_kept_gates_name_themselves(trained_tutor):
    """With a reference, a sign-flipped delta is rejected by the direction gate; with a finite kept
    tolerance, a delta wearing down the kept classes is rejected by the kept gate; each decision
    carries every gate's figure."""
    import copy

    reference = zeros_like_nh(trained_tutor)
    reference["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    asked = []
    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",),
                                kept_classes=("person",), kept_tolerance=0.05, min_cosine=0.0)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              reference_fn=lambda tutor: asked.append(tutor) or reference)
    flipped = {k: -v for k, v in reference.items()}
    erase = zeros_like_nh(strategy.tutor)
    erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0
    erase["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4  # points the reference's way: only the AP gate can tell
    _, metrics = strategy.aggregate_train(1, [reply(0, reference), reply(1, flipped), reply(2, erase)])
    assert len(asked) == 1  # one reference per tutor version
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[0].accepted and decisions[0].rejected_by == [] and decisions[0].cosine == pytest.approx(1.0)
    assert not decisions[1].accepted and decisions[1].rejected_by == ["direction"]
    assert decisions[1].cosine == pytest.approx(-1.0) and "direction: cosine -1.000" in decisions[1].reason
    assert not decisions[2].accepted and decisions[2].rejected_by == ["kept"]  # protected tolerance is 1.0 here
    assert decisions[2].kept_drop > 0.05 and "kept classes lost" in decisions[2].reason
    assert metrics["accepted"] == 1
    strategy.aggregate_train(2, [reply(0, reference)])
    assert len(asked) == 2  # the tutor moved in round 1: a new reference for round 2


def test_default_verification_records_the_kept_drop_without_rejecting(strategy):
    """Kept classes with the default tolerance (inf): the mean drop is recorded, the verdict is the
    protected gate's alone, and a malformed delta names the structure gate."""
    import dataclasses

    strategy.policy = dataclasses.replace(strategy.policy, kept_classes=("person",), protected_tolerance=1.0)
    erase = zeros_like_nh(strategy.tutor)
    erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0
    nan_delta = zeros_like_nh(strategy.tutor)
    nan_delta["head.classification_head.cls_logits.bias"][0] = float("nan")
    strategy.aggregate_train(1, [reply(0, erase), reply(1, nan_delta)])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[0].accepted and decisions[0].kept_drop > 0.3 and "mean AP drop" not in decisions[0].reason
    assert not decisions[1].accepted and decisions[1].rejected_by == ["structure"]
    assert decisions[1].reason.startswith("structure:") and math.isnan(decisions[1].kept_drop)
    assert math.isnan(decisions[1].weight_used)  # never merged


def test_a_sparse_delta_is_merged_and_a_malformed_one_is_rejected_with_its_reason(strategy):
    from flwr.app import ArrayRecord

    from protocol.wire import pack_delta, top_k

    small = {k: 1e-4 * torch.ones_like(v) for k, v in neck_head(strategy.tutor).items()}
    small["head.classification_head.cls_logits.bias"][PERSON] = 1e-2  # the entry top-k must keep
    sent, _ = top_k(small, 0.01)
    good = reply(0, None)
    good.content[DELTA] = pack_delta(sent, "float16", sparse=True)
    bad = reply(1, None)
    arrays = dict(pack_delta(sent, sparse=True).to_torch_state_dict())
    name = "head.classification_head.cls_logits.bias"
    arrays[name + "@index"] = arrays[name + "@index"] + 10_000  # outside the tensor
    bad.content[DELTA] = ArrayRecord(arrays)
    before = neck_head(strategy.tutor)[name][PERSON].item()
    _, metrics = strategy.aggregate_train(1, [good, bad])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[0].accepted and not decisions[1].accepted
    assert "outside" in decisions[1].reason and decisions[1].rejected_by == ["structure"]
    # the sparse delta was read back and applied: person's bias moved by about 1e-2 (float16)
    assert neck_head(strategy.tutor)[name][PERSON].item() - before == pytest.approx(1e-2, rel=1e-3)


def test_server_reference_update_rejects_a_sign_flip_and_passes_its_own_direction(trained_tutor):
    """With the "server" reference and no reference_fn, the strategy computes its own update on its
    presumed data once per tutor version: the update itself passes the direction gate, its sign flip
    and a random delta of the same norm do not."""
    import copy

    from distill.rd import server_reference_update

    settings = ClientTraining.from_profile(get_profile("smoke"))
    presumed, edge = Squares(16, 3), build_model("smoke", "edge", seed=1)
    nh = neck_head(trained_tutor)
    policy = VerificationPolicy.relative_to(nh, norm_factor=1.0, direction_z=4.0, direction_reference="server",
                                            protected_tolerance=1.0, protected_classes=("person",))
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), edge, Squares(16, 1), ["person"], settings, policy,
                              presumed_data=presumed, aggregation="weighted")
    own = server_reference_update(trained_tutor, edge, presumed, settings, seed=5)
    assert set(own) == set(nh) and any(float(v.abs().max()) > 0 for v in own.values())
    reference = strategy.reference_delta(1)
    assert strategy.reference_delta(1) is reference  # computed once per tutor version
    generator = torch.Generator().manual_seed(1)
    random = {k: torch.randn(v.shape, generator=generator) for k, v in reference.items()}
    scale = math.sqrt(sum(float(v.pow(2).sum()) for v in reference.values()) /
                      sum(float(v.pow(2).sum()) for v in random.values()))
    random = {k: v * scale for k, v in random.items()}
    flipped = {k: -v for k, v in reference.items()}
    strategy.aggregate_train(1, [reply(0, dict(reference)), reply(1, flipped), reply(2, random)])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[0].accepted and decisions[0].cosine == pytest.approx(1.0)
    assert decisions[1].rejected_by == ["direction"] and decisions[2].rejected_by == ["direction"]
    assert abs(decisions[2].cosine) < policy.min_cosine
    with pytest.raises(ValueError, match="presumed_data"):
        DiReDiStrategy(copy.deepcopy(trained_tutor), edge, Squares(16, 1), ["person"], settings, policy)


def test_peer_direction_gate_keeps_out_a_sign_flip_and_random_deltas_of_a_minority(trained_tutor):
    """Six deltas sharing a direction (plus their own parts), one sign-flipped, one random with the
    same norm: the peers' median rejects the two by direction and accepts the six; a malformed delta
    takes no part in the others' references."""
    import copy

    nh = neck_head(trained_tutor)
    policy = VerificationPolicy.relative_to(nh, norm_factor=1.0, direction_z=4.0, protected_tolerance=1.0,
                                            protected_classes=("person",))
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(16, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy, aggregation="weighted")
    generator = torch.Generator().manual_seed(2)
    shared = {k: 1e-4 * torch.randn(v.shape, generator=generator) for k, v in nh.items()}
    honest = [{k: v + 1e-4 * torch.randn(v.shape, generator=generator) for k, v in shared.items()} for _ in range(6)]
    flipped = {k: -v for k, v in honest[0].items()}
    random = {k: 1.41e-4 * torch.randn(v.shape, generator=generator) for k, v in shared.items()}
    nan_delta = {k: v.clone() for k, v in honest[1].items()}
    nan_delta["head.classification_head.cls_logits.bias"][0] = float("nan")
    replies = [reply(i, d) for i, d in enumerate([*honest, flipped, random, nan_delta])]
    strategy.aggregate_train(1, replies)
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert all(decisions[i].accepted and decisions[i].cosine > 0.3 for i in range(6))
    assert decisions[6].rejected_by == ["direction"] and decisions[6].cosine < -0.3
    assert decisions[7].rejected_by == ["direction"] and abs(decisions[7].cosine) < policy.min_cosine
    assert decisions[8].rejected_by == ["structure"]


def test_screening_on_arrival_leaves_the_decisions_as_they_were_and_evaluates_each_candidate_once(trained_tutor):
    import copy

    erase = zeros_like_nh(trained_tutor)
    erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0
    harmless = zeros_like_nh(trained_tutor)
    harmless["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    nan_delta = zeros_like_nh(trained_tutor)
    nan_delta["head.classification_head.cls_logits.bias"][0] = float("nan")

    def replies():
        return [reply(0, erase), reply(1, harmless), reply(2, nan_delta), reply(3, None)]

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",),
                                noise_z=3.0, bootstrap_samples=20)

    def fresh():
        return DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)

    plain = fresh()
    plain.aggregate_train(1, replies())
    screened = fresh()
    screened._open_round(1)  # configure_train opens the round before the replies come
    evaluated, bootstraps = [], []
    validate = screened.validator.validate
    screened.validator.validate = lambda model: evaluated.append(model) or validate(model)
    with mock.patch("strategies.validator.bootstrap_ap_drop",
                    side_effect=lambda *a, **k: bootstraps.append(1) or bootstrap_ap_drop(*a, **k)):
        arrived = replies()
        for message in arrived:  # as strategies.exchange hands them over
            screened.screen(message)
        assert len(evaluated) == 3  # the tutor and the two well-formed candidates; NaN and no delta skipped
        assert len(bootstraps) == 2  # the noise of each well-formed candidate's drop, on arrival too
        screened.aggregate_train(1, arrived)
    assert len(evaluated) == 3 and len(bootstraps) == 2  # aggregate_train found both done
    keep = ("client", "accepted", "reason", "ap_before", "ap_after", "rejected_by", "noise", "tolerance")
    assert [{k: d.to_dict()[k] for k in keep} for d in screened.recorder.decisions] == \
           [{k: d.to_dict()[k] for k in keep} for d in plain.recorder.decisions]
    for name, value in screened.tutor.state_dict().items():
        assert torch.equal(value, plain.tutor.state_dict()[name]), name
    assert not screened.validator._candidates and not screened.validator._noise  # they belonged to the tutor before the merge


def test_the_updated_tutor_is_recorded_once_per_round(strategy):
    harmless = zeros_like_nh(strategy.tutor)
    harmless["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    strategy.aggregate_train(1, [reply(0, harmless)])
    assert [entry["round"] for entry in strategy.recorder.tutor_history] == [0]  # round 1's is due
    strategy.record_tutor()
    strategy.record_tutor()
    history = strategy.recorder.tutor_history
    assert [entry["round"] for entry in history] == [0, 1]
    assert history[1]["ap"] == strategy.validator.tutor_ap()


def test_the_edge_check_deploys_an_honest_edge_and_keeps_the_earlier_one_otherwise(trained_tutor, trained_edge,
                                                                                     monkeypatch):
    import copy

    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages are made outside a run
        monkeypatch.setattr(TaskIdentity, name, value)

    from protocol.wire import DEPLOY_EDGE, EDGE_CHECK

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",),
                                noise_z=3.0, bootstrap_samples=20)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), copy.deepcopy(trained_edge), Squares(32, 1), ["person"],
                              ClientTraining.from_profile(get_profile("smoke")), policy, edge_check=True)
    reference, _ = strategy.edge_reference()
    assert reference["person"] > 0.3  # else "erased" below proves nothing
    same = trained_edge.state_dict()
    erased = {k: v.clone() for k, v in same.items()}
    erased["head.classification_head.cls_logits.bias"][PERSON] = -30.0  # person never scores again
    misshapen = {**same, "head.classification_head.cls_logits.bias": torch.zeros(3)}
    replies = [edge_reply(0, same), edge_reply(1, erased), edge_reply(2, misshapen), edge_reply(3, None)]
    ledger = strategy._open_round(1)
    for message in replies:  # as the replies to "train.distill" arrive
        strategy.check_edge(message)
        entry = ledger.node(message.metadata.src_node_id)
        entry.train, entry.after, entry.redistilled = {PARTITION_ID: message.content[METRICS][PARTITION_ID]}, {}, True
    messages = strategy.configure_deploy(1, ConfigRecord({}))
    verdicts = {m.metadata.dst_node_id - 100: m.content["config"][DEPLOY_EDGE] for m in messages}
    assert verdicts == {0: 1, 1: 0, 2: 0, 3: 0}
    figures = {c: decode(ledger.nodes[100 + c].after, EDGE_CHECK) for c in range(4)}
    assert figures[0]["deployed"] == 1 and figures[0]["ap-candidate.person"] == figures[0]["ap-reference.person"]
    assert figures[1]["deployed"] == 0 and figures[1]["ap-candidate.person"] < reference["person"] - 0.05
    assert figures[1]["tolerance.person"] >= 0.05
    assert figures[2] == {"deployed": 0.0, "seconds": 0.0} and figures[3] == figures[2]  # unreadable, absent
    with pytest.raises(ValueError, match="redistill='client'"):
        DiReDiStrategy(copy.deepcopy(trained_tutor), copy.deepcopy(trained_edge), Squares(32, 1), ["person"],
                       ClientTraining.from_profile(get_profile("smoke")), policy, edge_check=True, redistill="server",
                       presumed_data=Squares(8, 2))


def test_spread_sends_the_servers_distilled_edge_with_distill_and_checkpoints_it(trained_tutor, trained_edge,
                                                                                monkeypatch):
    """With spread the server distils the updated tutor into an edge of its own (from the manufacturer's,
    which stays the edge check's reference) and every "train.distill" carries it, bytes counted; a
    checkpoint holds it and a restored strategy sends the same edge."""
    import copy

    from flwr.app import ConfigRecord
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # messages are made outside a run
        monkeypatch.setattr(TaskIdentity, name, value)

    from protocol.wire import SPREAD_EDGE

    def make(spread_data):
        return DiReDiStrategy(copy.deepcopy(trained_tutor), copy.deepcopy(trained_edge), Squares(32, 1), ["person"],
                              ClientTraining.from_profile(get_profile("smoke")), spread_data=spread_data)

    def distill_messages(strategy):
        ledger = strategy._open_round(1)
        for node in (100, 101):
            ledger.node(node).train = {PARTITION_ID: node - 100}
        return strategy.configure_distill(1, ConfigRecord({})), ledger

    plain_messages, plain_ledger = distill_messages(make(None))
    assert all(SPREAD_EDGE not in m.content.array_records for m in plain_messages)
    strategy = make(Squares(32, 2))
    strategy.spread_edge = strategy.distil_spread_edge(1)
    manufacturer = trained_edge.state_dict()
    assert all(torch.equal(v, strategy.edge.state_dict()[k]) for k, v in manufacturer.items())  # reference kept
    assert any(not torch.equal(v, manufacturer[k]) for k, v in strategy.spread_edge.state_dict().items())
    messages, ledger = distill_messages(strategy)
    edge_bytes = sum(v.numel() * v.element_size() for v in manufacturer.values())
    for m in messages:
        sent = m.content.array_records[SPREAD_EDGE].to_torch_state_dict()
        assert all(torch.equal(v, sent[k]) for k, v in strategy.spread_edge.state_dict().items())
    for node in (100, 101):
        assert ledger.nodes[node].bytes_down >= plain_ledger.nodes[node].bytes_down + edge_bytes
    # the tutor's history holds the spread edge's validation AP beside the tutor's (not without spread)
    summary = strategy._tutor_summary(1)
    assert set(summary["spread_edge"]["ap"]) == set(summary["ap"])
    assert summary["spread_edge"]["ap"] == strategy.validator.validate_edge(strategy.spread_edge)[0]
    assert "spread_edge" not in make(None)._tutor_summary(1)
    tensors, meta = strategy.checkpoint()
    restored = make(Squares(32, 2))
    restored.restore(tensors, meta)
    assert all(torch.equal(v, restored.spread_edge.state_dict()[k]) for k, v in strategy.spread_edge.state_dict().items())
    with pytest.raises(ValueError, match="redistill='client'"):
        DiReDiStrategy(copy.deepcopy(trained_tutor), copy.deepcopy(trained_edge), Squares(32, 1), ["person"],
                       ClientTraining.from_profile(get_profile("smoke")), redistill="server",
                       presumed_data=Squares(8, 2), spread_data=Squares(8, 2))


def test_recall_at_the_threshold_agrees_with_the_evaluations_counts(trained_tutor):
    from evaluation.ap import ap_by_name, bootstrap_recall_drop, predict, recall_at

    predictions, targets = predict(trained_tutor, Squares(32, 1))
    _, summary = ap_by_name(predictions, targets, ["person"])
    found = recall_at(predictions, targets, [PERSON])[PERSON]
    assert found == pytest.approx(summary["tp.person"] / summary["npos.person"]) and 0 < found <= 1
    assert recall_at(predictions, targets, [PERSON], score_thresh=1.01)[PERSON] == 0.0
    # the operating threshold is a setting: AP does not depend on it, eq. 11's counts do
    ap, strict = ap_by_name(predictions, targets, ["person"], score_thresh=0.8)
    assert ap == ap_by_name(predictions, targets, ["person"])[0]
    assert strict["tp.person"] / strict["npos.person"] == pytest.approx(recall_at(predictions, targets, [PERSON], 0.8)[PERSON])
    assert strict["tp.person"] < summary["tp.person"]
    assert bootstrap_recall_drop(predictions, predictions, targets, [PERSON], samples=20)[PERSON] == 0.0
    lowered = [{**p, "scores": p["scores"] * 0.5} for p in predictions]
    assert bootstrap_recall_drop(predictions, lowered, targets, [PERSON], samples=50)[PERSON] > 0


def test_a_delta_that_lowers_every_score_of_a_class_passes_the_ap_gate_and_not_the_operating_one(trained_tutor):
    """A shift of one class's scores keeps its ranking, so its AP; the product's threshold sees it. The gate
    checks the round's merge and rejects the delta without which the merge recovers; the honest ones stay."""
    import copy

    def make(operating_tolerance):
        policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",),
                                    operating_tolerance=operating_tolerance, noise_z=3.0, bootstrap_samples=50)
        return DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)

    shift = zeros_like_nh(trained_tutor)
    shift["head.classification_head.cls_logits.bias"][PERSON] = -3.0
    honest = zeros_like_nh(trained_tutor)
    honest["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
    replies = [reply(0, honest), reply(1, shift, num_examples=20), reply(2, honest)]
    strategy = make(0.1)
    arrays, metrics = strategy.aggregate_train(1, replies)
    decisions = {d.client: d for d in strategy.recorder.decisions}
    shifted = decisions[1]
    assert shifted.recall_before["person"] > 0.5  # else the shift proves nothing
    assert abs(shifted.ap_before["person"] - shifted.ap_after["person"]) <= 0.05  # AP barely moves ...
    assert shifted.recall_after["person"] < shifted.recall_before["person"] - 0.1  # ... recall at 0.5 does
    assert shifted.rejected_by == ["operating"] and "person recall" in shifted.reason
    assert decisions[0].accepted and decisions[2].accepted and metrics["accepted"] == 2
    assert set(decisions[0].recall_tolerance) == {"person"} and decisions[0].recall_tolerance["person"] >= 0.1
    assert strategy.validator.tutor_ap()["person"] == pytest.approx(shifted.ap_before["person"], abs=0.02)
    alone = make(0.1)  # a lone failing delta is rejected too: the tutor stays as it was
    arrays, metrics = alone.aggregate_train(1, [reply(1, shift)])
    assert arrays is None and metrics["accepted"] == 0
    recorded = make(math.inf)  # the default: recorded per delta, never rejected
    recorded.aggregate_train(1, replies)
    assert all(d.accepted for d in recorded.recorder.decisions)
    assert {d.client: d.recall_after for d in recorded.recorder.decisions}[1] == shifted.recall_after


def test_the_harm_gate_rejects_the_deltas_that_lower_a_class_beyond_their_peers(trained_tutor):
    """Two of five deltas lower every `person` score: each one's leave-one-out harm to the merge's recall
    stands out from its peers', the first rejected is measured away, and the second is then caught too.
    When every delta lowers the class alike, nobody stands out and nobody is rejected (what the round does
    as a whole is the merge gate's business)."""
    import copy

    def make():
        policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, protected_classes=("person",),
                                    operating_harm=0.02, noise_z=3.0, bootstrap_samples=20)
        return DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)

    def shifted(by):
        delta = zeros_like_nh(trained_tutor)
        delta["head.classification_head.cls_logits.bias"][PERSON] = by
        return delta

    honest = [zeros_like_nh(trained_tutor) for _ in range(3)]
    for k, delta in enumerate(honest):
        delta["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4 * (k + 1)
    strategy = make()
    _, metrics = strategy.aggregate_train(1, [reply(0, honest[0]), reply(1, shifted(-3.0)), reply(2, honest[1]),
                                              reply(3, shifted(-3.0)), reply(4, honest[2])])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert decisions[1].rejected_by == ["harm"] and decisions[3].rejected_by == ["harm"]
    assert "person recall" in decisions[1].reason and metrics["accepted"] == 3
    assert all(decisions[c].accepted for c in (0, 2, 4))
    assert decisions[1].harm["person"] > decisions[1].harm_threshold["person"] >= 0.02
    assert all(decisions[c].harm["person"] < 0.02 for c in (0, 2, 4))  # recorded for every accepted delta
    alike = make()
    _, metrics = alike.aggregate_train(1, [reply(k, shifted(-1.0)) for k in range(4)])
    assert metrics["accepted"] == 4 and all(not d.rejected_by for d in alike.recorder.decisions)


def person_lost_and_restored(tutor):
    """(the classification rows' names, a copy of ``tutor`` that has lost `person` (its row zeroed, its bias
    at -8), the delta that restores the row)."""
    import copy

    rows = ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias")
    damaged = copy.deepcopy(tutor)
    with torch.no_grad():
        damaged.head.classification_head.cls_logits.weight[PERSON] = 0.0
        damaged.head.classification_head.cls_logits.bias[PERSON] = -8.0
    honest = zeros_like_nh(damaged)
    for name in rows:
        honest[name][PERSON] = neck_head(tutor)[name][PERSON] - neck_head(damaged)[name][PERSON]
    return rows, damaged, honest


def test_a_false_claim_does_not_change_the_claimed_class_row(trained_tutor):
    """The tutor has lost `person`; an honest client brings it back, two liars claim it too with a small
    edit of its row and four times the weight. Trusted, their claims dilute the honest row to a fifth;
    earned, the merged row is the honest client's alone."""
    rows, damaged, honest = person_lost_and_restored(trained_tutor)
    edit = zeros_like_nh(damaged)
    edit[rows[1]][PERSON] = 0.1

    def run(claims):
        return one_honest_two_liars(damaged, claims, honest, edit)

    strategy, decisions = run("earned")
    assert all(d.accepted for d in decisions.values())  # no gate rejects them; the merge ignores their claim
    assert decisions[0].claims == {"person": "improves"} and decisions[0].claim_gain["person"] > 0.3
    assert decisions[1].claims == {"person": "holds, dropped"}
    # each claim's row on its own against the tutor's top person scores: the honest row lifts them (from
    # the bias of -8), the liars' bias edit moves them by its 0.1 exactly; every validation image here
    # holds person, so there is no image without it to score (NaN)
    assert decisions[0].claim_shift["person"] > 1.0
    assert decisions[1].claim_shift["person"] == pytest.approx(0.1)
    assert math.isnan(decisions[1].claim_shift_negative["person"])
    merged = neck_head(strategy.tutor)
    for name in rows:  # the honest client's row alone, at full strength
        assert torch.allclose(merged[name][PERSON], neck_head(trained_tutor)[name][PERSON], atol=1e-5)
    assert strategy.validator.tutor_ap()["person"] > 0.3
    trusting, decisions = run("trusted")
    assert decisions[1].claims == {} and decisions[1].claim_gain == {} and decisions[1].claim_shift == {}
    expected = neck_head(damaged)[rows[1]][PERSON] + (10 * honest[rows[1]][PERSON] + 80 * 0.1) / 90
    assert torch.allclose(neck_head(trusting.tutor)[rows[1]][PERSON], expected, atol=1e-5)


def test_a_claim_is_judged_on_the_delta_as_the_clip_merges_it(trained_tutor):
    """Three clients bring back the lost `person`; a fourth sends the same row beside an edit of another class's
    bias so large that the norm clip keeps 5 % of its delta. Sent whole, its candidate improves person as much
    as the others'; clipped, it barely moves it: its claim is judged again on the clipped delta and dropped, so
    it cannot dilute the honest row it shares (the person row merged is the honest one at full strength)."""
    import copy

    rows, damaged, honest = person_lost_and_restored(trained_tutor)
    loud = {name: tensor.clone() for name, tensor in honest.items()}
    loud[rows[1]][0] = -40.0 * float(torch.sqrt(sum(t.pow(2).sum() for t in honest.values())))  # no image holds class 0
    policy = VerificationPolicy(norm_bound=1e6, claims="earned", noise_z=3.0, bootstrap_samples=50, clip_multiple=2.5)
    strategy = DiReDiStrategy(copy.deepcopy(damaged), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                              aggregation="class_aware")
    strategy.aggregate_train(1, [reply(c, honest, 10, ("person",)) for c in range(3)]
                             + [reply(3, loud, 10, ("person",))])
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert all(d.accepted for d in decisions.values())
    assert decisions[3].clip_factor < 0.1 and all(decisions[c].clip_factor == 1.0 for c in range(3))
    assert decisions[0].claim_gain["person"] > 0.3  # as sent, the loud delta improves person as much
    assert decisions[3].claim_gain["person"] == pytest.approx(decisions[0].claim_gain["person"], abs=0.02)
    assert decisions[3].claim_gain_clipped["person"] < 0.05 and decisions[0].claim_gain_clipped == {}
    assert decisions[3].claims == {"person": "holds, dropped"} and decisions[0].claims == {"person": "improves"}
    merged = neck_head(strategy.tutor)
    for name in rows:
        assert torch.allclose(merged[name][PERSON], neck_head(trained_tutor)[name][PERSON], atol=1e-5)


def test_a_claim_stands_only_as_earned_by_the_delta_as_sent_and_as_merged():
    """The stricter verdict of the two: a false claim that harms its class as sent stays harmful when the clip
    shrinks its edit below the margin; a claim that improves as sent but holds as clipped holds."""
    from strategies.verify import claim_verdict, stricter_claim_figures

    policy = VerificationPolicy(claims="earned", claim_margin=0.05)
    sent = ({"car": -0.20, "dog": 0.30, "cat": 0.10}, {"car": 0.01, "dog": 0.01, "cat": 0.01})
    merged = ({"car": -0.02, "dog": 0.01, "cat": 0.09}, {"car": 0.01, "dog": 0.01, "cat": 0.01})
    gains, noise = stricter_claim_figures(sent, merged, policy)
    verdicts = {c: claim_verdict(gains[c], noise[c], policy) for c in gains}
    assert verdicts == {"car": "harms", "dog": "holds", "cat": "improves"}
    assert gains == {"car": -0.20, "dog": 0.01, "cat": 0.10}  # improves twice: the sent figure (the first)


def test_a_false_claim_that_lowers_a_settled_class_is_left_out_under_lifting(trained_tutor):
    """The tutor knows `person`; an honest client's person row is a small lift (+0.02 on the bias), two
    liars claim person with a bias edit of -0.1 and four times the weight. No claimer improves person, so
    earned claims count all three and the merged bias falls; under lifting the liars' rows lower person's
    top scores ("lowers") and the merged row is the honest client's alone."""
    bias = "head.classification_head.cls_logits.bias"
    honest, edit = zeros_like_nh(trained_tutor), zeros_like_nh(trained_tutor)
    honest[bias][PERSON], edit[bias][PERSON] = 0.02, -0.1

    def run(claims):
        strategy, decisions = one_honest_two_liars(trained_tutor, claims, honest, edit)
        return neck_head(strategy.tutor)[bias][PERSON], decisions

    start = neck_head(trained_tutor)[bias][PERSON]
    earned, decisions = run("earned")
    assert decisions[1].claims == {"person": "holds"}
    assert torch.allclose(earned, start + (10 * 0.02 - 80 * 0.1) / 90, atol=1e-5)
    lifting, decisions = run("lifting")
    assert decisions[0].claims == {"person": "holds"} and decisions[0].claim_shift["person"] == pytest.approx(0.02)
    assert decisions[1].claims == decisions[2].claims == {"person": "lowers, dropped"}
    assert torch.allclose(lifting, start + 0.02, atol=1e-5)


def test_median_cap_and_the_round_relative_clip(trained_tutor):
    import copy

    from strategies.aggregate import median_cap

    assert median_cap([0.2, 0.3, 0.25], 4.0) == pytest.approx(1.0)
    assert median_cap([0.2, 30.0], 4.0) == pytest.approx(0.8)  # the larger of two cannot raise its own cap
    assert median_cap([0.0, 0.0], 4.0) == math.inf and median_cap([0.2, 30.0], math.inf) == math.inf
    with pytest.raises(ValueError, match=">= 1"):
        median_cap([1.0], 0.5)

    def delta(scale):
        out = zeros_like_nh(trained_tutor)
        out["backbone.fpn.inner_blocks.0.0.bias"] += scale
        return out

    policy = VerificationPolicy(norm_bound=50.0, clip_multiple=4.0)
    strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                              ["person"], ClientTraining.from_profile(get_profile("smoke")), policy)
    replies = [reply(0, delta(1e-3)), reply(1, delta(1.2e-3)), reply(2, delta(1e-3)), reply(3, delta(0.1))]
    strategy.aggregate_train(1, replies)
    decisions = {d.client: d for d in strategy.recorder.decisions}
    assert [decisions[c].clip_factor for c in range(3)] == [1.0, 1.0, 1.0]  # honest: within 4 x the median
    median = decisions[0].norm  # the low median of the four norms
    assert decisions[3].accepted and decisions[3].clip_factor == pytest.approx(4 * median / decisions[3].norm, rel=1e-4)

    # clip_share "scaled": the clipped delta counts as the share f the clip kept, in a weighted mean and in the
    # class-aware merge's trimmed mean of the shared layers alike; its recorded weight stays its claim
    bias = "backbone.fpn.inner_blocks.0.0.bias"
    f = decisions[3].clip_factor
    for aggregation in ("weighted", "class_aware"):
        for share, expected in (("whole", (3.2e-3 + f * 0.1) / 4), ("scaled", (3.2e-3 + f * f * 0.1) / (3 + f))):
            strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1),
                                      Squares(32, 1), ["person"], ClientTraining.from_profile(get_profile("smoke")),
                                      VerificationPolicy(norm_bound=50.0, clip_multiple=4.0, clip_share=share),
                                      aggregation=aggregation)
            before = neck_head(strategy.tutor)[bias].clone()
            strategy.aggregate_train(1, replies)
            change = neck_head(strategy.tutor)[bias] - before
            assert torch.allclose(change, torch.full_like(change, expected), rtol=1e-4), (aggregation, share)
            assert [d.weight_used for d in strategy.recorder.decisions] == [10.0] * 4


def test_a_hidden_row_edit_is_bounded_by_the_rows_of_its_peers(trained_tutor):
    """Four clients claim `person`; one lowers person's bias by 0.5 inside a delta as honest as the others'.
    The whole-delta clip sees nothing unusual; the row clip scales its person rows to 4 x its peers'."""
    import copy

    bias = "head.classification_head.cls_logits.bias"

    def delta(person_bias):
        out = zeros_like_nh(trained_tutor)
        out["backbone.fpn.inner_blocks.0.0.bias"] += 0.1
        out[bias][PERSON] = person_bias
        return out

    def merged_person_bias(row_multiple):
        policy = VerificationPolicy(norm_bound=50.0, clip_multiple=4.0, row_multiple=row_multiple)
        strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1),
                                  Squares(32, 1), ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                                  aggregation="class_aware")
        before = float(neck_head(strategy.tutor)[bias][PERSON])
        strategy.aggregate_train(1, [reply(c, delta(0.01), 10, ("person",)) for c in range(3)]
                                 + [reply(3, delta(0.01 - 0.5), 10, ("person",))])
        decisions = {d.client: d for d in strategy.recorder.decisions}
        assert all(d.accepted and d.clip_factor == 1.0 for d in decisions.values())
        return float(neck_head(strategy.tutor)[bias][PERSON]) - before, decisions

    change, decisions = merged_person_bias(4.0)
    assert [decisions[c].row_clip for c in range(3)] == [{}, {}, {}]
    assert decisions[3].row_clip == {"person": pytest.approx(0.04 / 0.49, rel=1e-3)}
    # each delta's row norms as sent are recorded for the classes it is merged into (only person's row here)
    assert [decisions[c].row_norm for c in range(4)] == [{"person": pytest.approx(n, rel=1e-5)}
                                                         for n in (0.01, 0.01, 0.01, 0.49)]
    assert change == pytest.approx((3 * 0.01 - 0.04) / 4, abs=1e-6)
    unbounded, decisions = merged_person_bias(math.inf)
    assert decisions[3].row_clip == {} and unbounded == pytest.approx((3 * 0.01 - 0.49) / 4, abs=1e-6)


def calibrating_strategy(tutor, calibrate: str) -> DiReDiStrategy:
    """A strategy over a copy of ``tutor`` that protects person on the square images, with ``calibrate``."""
    import copy

    policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",))
    return DiReDiStrategy(copy.deepcopy(tutor), build_model("smoke", "edge", seed=1), Squares(32, 1), ["person"],
                          ClientTraining.from_profile(get_profile("smoke")), policy, calibrate=calibrate)


def test_the_calibration_search_reads_each_class_as_if_it_alone_had_moved(trained_tutor):
    """With one detection allowed per image, moving the other classes far up lets their boxes crowd out
    person's; the search's figures (``operating_model``: every box above the threshold, no cap) are person's
    own whatever the others do, and equal the capped tutor's where the cap crowds nothing."""
    from strategies.calibrate import shift_class_biases

    strategy = calibrating_strategy(trained_tutor, "f1")
    validator = strategy.validator
    strategy.tutor.detections_per_img = 1
    validator.tutor_changed()
    alone = validator.shifted_figures({"person": 3.0})
    nh = neck_head(strategy.tutor)
    bias = "head.classification_head.cls_logits.bias"
    every_class_up = shift_class_biases(nh, {c: 3.0 if c == PERSON else 10.0 for c in range(nh[bias].shape[0])})
    together = validator.recall(validator.predictions(validator.operating_model(every_class_up)))["person"]
    capped = validator.recall(validator.predictions(validator.tutor_with(every_class_up)))["person"]
    assert together == alone[1]["person"] > capped  # the cap crowds person out; the search's figures do not
    strategy.tutor.detections_per_img = 100
    validator.tutor_changed()
    assert validator.shifted_figures({"person": 0.0})[0]["person"] == validator.f1(validator.tutor_predictions)["person"]


def test_calibration_undoes_a_merged_shift_of_a_classs_scores_and_records_it(trained_tutor):
    """A delta that lowers every person score by 2 logits passes the AP gates and is merged; with
    calibrate="f1" the server moves person's bias back to the shift of best F1 at the threshold, so the
    tutor detects person at 0.5 as before; the tutor's history records the shift and the F1s."""
    def make(calibrate):
        return calibrating_strategy(trained_tutor, calibrate)

    shift = zeros_like_nh(trained_tutor)
    shift["head.classification_head.cls_logits.bias"][PERSON] = -2.0
    plain, calibrated, learnt_only = make("off"), make("f1"), make("f1-learnt")
    recall_before = plain.validator.tutor_ap() and plain.validator.tutor_recall["person"]
    assert recall_before > 0.5  # else the shift proves nothing
    for strategy in (plain, calibrated, learnt_only):
        arrays, metrics = strategy.aggregate_train(1, [reply(0, shift)])
        assert metrics["accepted"] == 1
        strategy.record_tutor()
    assert plain.validator.tutor_recall["person"] < recall_before - 0.3  # merged as it came
    assert calibrated.validator.tutor_recall["person"] >= recall_before - 0.05  # the operating point is back
    assert calibrated.validator.tutor_ap()["person"] == pytest.approx(plain.validator.tutor_ap()["person"], abs=0.02)
    record = calibrated.recorder.tutor_history[-1]["calibration"]
    assert record["shift"]["person"] >= 1.5 and record["f1_after"]["person"] > record["f1_before"]["person"]
    assert "calibration" not in plain.recorder.tutor_history[-1]
    # f1-learnt leaves the manufacturer's classes (person is protected) as the merge made them
    assert learnt_only.recorder.tutor_history[-1]["calibration"]["shift"] == {}
    assert learnt_only.validator.tutor_recall["person"] == pytest.approx(plain.validator.tutor_recall["person"])
    with pytest.raises(ValueError, match="calibrate"):
        make("platt")


def test_calibration_as_offsets_undoes_the_shift_for_the_deployed_tutor_and_leaves_the_weights_alone(trained_tutor):
    """calibrate="f1-offsets": the same shift of every person score is undone in the tutor as deployed (the
    history's recall at the threshold), while the weights sent to the clients and judged by the gates are the
    merge's exactly; the offsets go into the checkpoint, and the next round's search starts from them."""
    def make(calibrate):
        return calibrating_strategy(trained_tutor, calibrate)

    shift = zeros_like_nh(trained_tutor)
    shift["head.classification_head.cls_logits.bias"][PERSON] = -2.0
    plain, offsets = make("off"), make("f1-offsets")
    recall_before = plain.validator.tutor_ap() and plain.validator.tutor_recall["person"]
    assert recall_before > 0.5
    for strategy in (plain, offsets):
        assert strategy.aggregate_train(1, [reply(0, shift)])[1]["accepted"] == 1
        strategy.record_tutor()
    for name, value in plain.tutor.state_dict().items():  # the weights are the merge's, offsets or not
        assert torch.equal(value, offsets.tutor.state_dict()[name]), name
    deployed = offsets.recorder.tutor_history[-1]
    assert plain.recorder.tutor_history[-1]["recall"]["person"] < recall_before - 0.3
    assert deployed["recall"]["person"] >= recall_before - 0.05  # the deployed operating point is back
    assert offsets.offsets["person"] >= 1.5 and deployed["calibration"]["offsets"] == offsets.offsets
    assert deployed["ap_weights"]["person"] == plain.recorder.tutor_history[-1]["ap"]["person"]
    # the record keeps every [offset, F1, recall] the search measured: the chosen one is the deployed tutor's
    search = deployed["calibration"]["search"]["person"]
    assert [row[0] for row in search] == sorted({row[0] for row in search}) and len(search) >= 13
    chosen = [row for row in search if row[0] == offsets.offsets["person"]]
    assert len(chosen) == 1 and chosen[0][1] == deployed["calibration"]["f1_after"]["person"]
    assert chosen[0][2] == pytest.approx(deployed["recall"]["person"], abs=0.02)
    assert search[0][2] < chosen[0][2]  # at the lowest offset the shifted person scores are not found
    tensors, meta = offsets.checkpoint()
    resumed = make("f1-offsets")
    resumed.restore(tensors, meta)
    assert resumed.offsets == offsets.offsets
    # a round that changes nothing keeps the offsets: the search starts from them (no change is the best)
    assert resumed.aggregate_train(2, [reply(0, zeros_like_nh(trained_tutor))])[1]["accepted"] == 1
    resumed.record_tutor()
    assert resumed.offsets == offsets.offsets and resumed.recorder.tutor_history[-1]["calibration"]["shift"] == {}
    searched = [row[0] for row in resumed.recorder.tutor_history[-1]["calibration"]["search"]["person"]]
    assert min(searched) == offsets.offsets["person"] - 3 and max(searched) == offsets.offsets["person"] + 3


def test_a_delta_the_protected_gate_rejects_alone_is_judged_inside_the_merge(trained_tutor):
    """protected_scope "merge": an eraser with a small share of the round's weight cannot cost person anything
    inside the merge, so it is accepted there (and recorded); at its peers' share it is rejected there too."""
    import copy

    def run(scope, eraser_weight):
        policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=0.05, protected_classes=("person",),
                                    protected_scope=scope)
        strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1),
                                  Squares(32, 1), ["person"], ClientTraining.from_profile(get_profile("smoke")),
                                  policy, aggregation="weighted")
        erase = zeros_like_nh(strategy.tutor)
        erase["head.classification_head.cls_logits.bias"][PERSON] = -30.0
        harmless = zeros_like_nh(strategy.tutor)
        harmless["backbone.fpn.inner_blocks.0.0.bias"] += 1e-4
        person_before = strategy.validator.tutor_ap()["person"]
        peers = [reply(i, harmless, 1000.0) for i in (1, 2, 3)]  # (the weight cap: 4 x the round's low median)
        _, metrics = strategy.aggregate_train(1, [reply(0, erase, eraser_weight), *peers])
        strategy.validator.tutor_changed()
        return metrics, {d.client: d for d in strategy.recorder.decisions}, person_before, strategy

    metrics, decisions, _, _ = run("delta", 1.0)
    assert metrics["accepted"] == 3 and decisions[0].rejected_by == ["protected"] and not decisions[0].appeal
    metrics, decisions, person_before, strategy = run("merge", 1.0)  # 1/3001 of the merge: -0.01 logits
    assert metrics["accepted"] == 4 and decisions[0].accepted and decisions[0].rejected_by == []
    assert decisions[0].appeal["accepted"] and decisions[0].appeal["deltas"] == 4
    assert "inside the round's merge of 4" in decisions[0].reason
    assert decisions[0].ap_after["person"] < person_before - 0.05  # alone it erases person ...
    assert strategy.validator.tutor_ap()["person"] >= person_before - 0.05  # ... the merged tutor keeps it
    metrics, decisions, _, _ = run("merge", 1000.0)  # a quarter of the merge: -7.5 logits
    assert metrics["accepted"] == 3 and not decisions[0].accepted and decisions[0].rejected_by == ["protected"]
    assert decisions[0].appeal["accepted"] is False and "inside the round's merge of 4 too" in decisions[0].reason


def test_a_claim_whose_row_dilutes_a_learned_class_is_left_out_under_the_dilution_check(trained_tutor):
    """Two clients claim person, here a class the tutor learns (neither protected nor kept); both claims hold it
    (the claim margin is wide). Client 1's row scrambles person's ranking: averaged with client 0's it costs
    person AP; left out, person is client 0's alone. With the dilution check off the row is their mean; on, client
    1's claim is recorded as diluting and person's row is client 0's."""
    import copy

    weight, bias = "head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"
    honest, scrambling = zeros_like_nh(trained_tutor), zeros_like_nh(trained_tutor)
    honest[bias][PERSON] = 0.01
    generator = torch.Generator().manual_seed(0)
    scrambling[weight][PERSON] = torch.randn(scrambling[weight][PERSON].shape, generator=generator)
    moved, claims = {}, {}
    for check in ("off", "on"):
        policy = VerificationPolicy(norm_bound=50.0, protected_tolerance=1.0, claims="earned", claim_margin=1.0,
                                    noise_z=2.0, bootstrap_samples=30, dilution_check=check)
        strategy = DiReDiStrategy(copy.deepcopy(trained_tutor), build_model("smoke", "edge", seed=1), Squares(32, 1),
                                  ["person"], ClientTraining.from_profile(get_profile("smoke")), policy,
                                  aggregation="class_aware", aggregation_options={"shared": "weighted"})
        before = {name: neck_head(strategy.tutor)[name].clone() for name in (weight, bias)}
        _, metrics = strategy.aggregate_train(1, [reply(0, honest, trained=("person",)),
                                                  reply(1, scrambling, trained=("person",))])
        assert metrics["accepted"] == 2
        moved[check] = {name: neck_head(strategy.tutor)[name] - before[name] for name in (weight, bias)}
        claims[check] = {d.client: d.claims["person"] for d in strategy.recorder.decisions}
    assert claims["off"] == {0: "holds", 1: "holds"}
    assert torch.allclose(moved["off"][weight][PERSON], scrambling[weight][PERSON] / 2)
    assert claims["on"][0] == "holds" and claims["on"][1].startswith("holds, dilutes (+")
    assert torch.count_nonzero(moved["on"][weight][PERSON]) == 0
    assert torch.isclose(moved["on"][bias][PERSON], torch.tensor(0.01), atol=1e-6)
