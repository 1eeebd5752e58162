"""Reusing work across verification candidates gives the same figures as doing it all again:
the frozen body's features (evaluation.features), the shortened NMS, and VOC matching on arrays
(evaluation.ap)."""

import copy

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from evaluation.ap import class_ap, evaluate_detections, match_detections, predict, voc_iou
from evaluation.features import EvaluationFeatures, batched_nms_first, fcos_detections
from models.ladder import build_model
from models.parts import load_neck_head, neck_head


def _boxes(n: int, generator: torch.Generator, clusters: int = 0) -> torch.Tensor:
    """n boxes in a 64 px square, crowded so that NMS has work to do; with ``clusters``, near copies
    of that many boxes (NMS then keeps few of the top-scored ones and must look further down)."""
    if clusters:
        centres = torch.rand(clusters, 2, generator=generator) * 40
        xy = centres[torch.randint(0, clusters, (n,), generator=generator)] + torch.rand(n, 2, generator=generator)
        wh = 15 + torch.rand(n, 2, generator=generator)
    else:
        xy = torch.rand(n, 2, generator=generator) * 40
        wh = 4 + torch.rand(n, 2, generator=generator) * 20
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize("clusters", [0, 12])
@pytest.mark.parametrize("n", [0, 1, 37, 400, 999, 1000, 1001, 1500])
def test_nms_that_stops_at_count_keeps_what_full_nms_keeps_first(n, clusters):
    generator = torch.Generator().manual_seed(n)
    boxes = _boxes(n, generator, clusters)
    scores = torch.rand(n, generator=generator).mul(20).round().div(20)  # many ties
    labels = torch.randint(0, 3, (n,), generator=generator)
    full = batched_nms(boxes, scores, labels, 0.6)
    for count in (1, 5, 12, 30, 100, n + 5):
        assert torch.equal(batched_nms_first(boxes, scores, labels, 0.6, count), full[:count])


def _mixed_images() -> list:
    """Images of other sizes than the smoke profile's 64 px: resized, padded, clipped per image."""
    sizes = [(64, 64), (48, 64), (32, 32), (64, 40), (50, 50), (64, 64), (30, 60)]
    return [(torch.rand(3, h, w, generator=torch.Generator().manual_seed(i)),
             {"boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]), "labels": torch.tensor([i % 20]),
              "difficult": torch.tensor([False]), "image_id": f"im{i}"}) for i, (h, w) in enumerate(sizes)]


def _score_quantile(model, images, q: float) -> float:
    """The score (FCOS: sqrt(class x centerness)) that a fraction q of the model's candidates stay under."""
    model.eval()  # in train mode the body's BatchNorm statistics would move
    with torch.inference_mode():
        image_list, _ = model.transform(images, None)
        head = model.head(list(model.backbone(image_list.tensors).values()))
    return float(torch.quantile(torch.sqrt(torch.sigmoid(head["cls_logits"]) * torch.sigmoid(head["bbox_ctrness"])), q))


# (share of candidates kept by the score threshold, detections per image): over 1000 candidates
# (torchvision's per-class NMS), a few hundred (NMS stops early), fewer than 2 x the count, and
# counts that make the shortened NMS grow its prefix.
_SETTINGS = ((1.0, 100), (1.0, 7), (0.2, 100), (0.2, 7), (0.1, 100), (0.05, 3), (0.01, 100))


def test_fcos_detections_equal_torchvisions_postprocess():
    model = build_model("smoke", "tutor", seed=3).eval()
    load_neck_head(model, {k: v * 1.7 for k, v in neck_head(model).items()})
    images = [image for image, _ in _mixed_images()]
    with torch.inference_mode():
        image_list, _ = model.transform(images, None)
        features = list(model.backbone(image_list.tensors).values())
        head_outputs = model.head(features)
        anchors = model.anchor_generator(image_list, features)
    per_level = [f.size(2) * f.size(3) for f in features]
    split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
    for share, per_image in _SETTINGS:
        score_thresh = 0.0 if share == 1.0 else _score_quantile(model, images, 1.0 - share)
        model.score_thresh, model.detections_per_img = score_thresh, per_image
        expected = model.postprocess_detections(split_outputs, [list(a.split(per_level)) for a in anchors],
                                                image_list.image_sizes)
        got = fcos_detections(model, split_outputs, list(anchors[0].split(per_level)), image_list.image_sizes)
        assert len(got) == len(expected)
        for e, g in zip(expected, got):
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(e[key], g[key]), (score_thresh, per_image, key)


def test_body_feature_cache_equals_the_full_model_on_images_of_other_sizes():
    tutor = build_model("smoke", "tutor", seed=0)
    dataset = _mixed_images()
    cache = EvaluationFeatures(tutor, dataset, batch_size=4)
    candidate = copy.deepcopy(tutor)
    load_neck_head(candidate, {k: v * 1.5 for k, v in neck_head(candidate).items()})
    images = [image for image, _ in dataset]
    for share, per_image in _SETTINGS:
        for model in (tutor, candidate):
            model.score_thresh = 0.0 if share == 1.0 else _score_quantile(model, images, 1.0 - share)
            model.detections_per_img = per_image
            expected, targets = predict(model, dataset, batch_size=4)
            got, got_targets = cache.predict(model)
            assert got_targets == targets
            for e, g in zip(expected, got, strict=True):
                for key in ("boxes", "scores", "labels"):
                    assert torch.equal(e[key], g[key])


def test_body_check_is_bitwise_and_sees_in_place_changes():
    tutor = build_model("smoke", "tutor", seed=0)
    dataset = _mixed_images()[:2]
    cache = EvaluationFeatures(tutor, dataset, batch_size=2)
    assert cache.same_body(tutor)  # the very tensors
    assert cache.same_body(copy.deepcopy(tutor))  # equal copies
    other = copy.deepcopy(tutor)
    with torch.no_grad():
        next(other.backbone.body.parameters()).view(-1)[0] += 1e-6
    assert not cache.same_body(other)
    negative_zero = copy.deepcopy(tutor)
    with torch.no_grad():  # -0.0 == 0.0 for torch.equal; the check compares bits, as the hash did
        next(tutor.backbone.body.parameters()).view(-1)[0] = 0.0
        next(negative_zero.backbone.body.parameters()).view(-1)[0] = -0.0
    assert not EvaluationFeatures(tutor, dataset, batch_size=2).same_body(negative_zero)
    cache = EvaluationFeatures(tutor, dataset, batch_size=2)
    original = copy.deepcopy(tutor)
    # The cached model's own body changes in place: the check falls back to the hash taken at build time.
    with torch.no_grad():
        next(tutor.backbone.body.parameters()).view(-1)[0] += 1.0
    assert not cache.same_body(tutor)
    assert cache.same_body(original)
    with pytest.raises(ValueError, match="body differs"):
        cache.predict(tutor)


# --- VOC matching on arrays against the greedy loop it replaces ------------------------------


def _greedy_reference(detections, ground_truths, iou_thresh=0.5, plus_one=True):
    """The devkit's loop, one detection at a time (evaluation.ap before it matched on arrays)."""
    scores = np.array([float(s) for _, s, _ in detections], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    matched = {k: np.zeros(len(np.asarray(d).reshape(-1)), dtype=bool) for k, (_, d) in ground_truths.items()}
    outcomes = np.empty(len(order), dtype=np.int64)
    for rank, index in enumerate(order):
        image_id, _, box = detections[index]
        outcomes[rank] = 0
        if image_id not in ground_truths:
            continue
        gt_boxes, difficult = ground_truths[image_id]
        gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
        if len(gt_boxes) == 0:
            continue
        ious = voc_iou(np.asarray(box), gt_boxes, plus_one=plus_one)
        best = int(np.argmax(ious))
        if not ious[best] > iou_thresh:
            continue
        if bool(np.asarray(difficult, dtype=bool).reshape(-1)[best]):
            outcomes[rank] = -1
        elif not matched[image_id][best]:
            matched[image_id][best] = True
            outcomes[rank] = 1
    return scores[order], outcomes


@pytest.mark.parametrize("seed", range(40))
def test_matching_on_arrays_equals_the_greedy_loop(seed):
    rng = np.random.default_rng(seed)
    images = [f"im{i}" for i in range(int(rng.integers(1, 6)))]
    ground_truths = {}
    for image_id in images[: int(rng.integers(0, len(images) + 1))]:
        k = int(rng.integers(0, 4))
        xy = rng.integers(0, 30, (k, 2)).astype(float)
        ground_truths[image_id] = (np.concatenate([xy, xy + rng.integers(1, 20, (k, 2))], 1),
                                   rng.random(k) < 0.3)
    detections = []
    for _ in range(int(rng.integers(0, 40))):
        image_id = images[int(rng.integers(0, len(images)))]
        gt = ground_truths.get(image_id, (np.zeros((0, 4)), None))[0]
        if len(gt) and rng.random() < 0.6:  # near a ground truth: duplicates, difficult hits
            box = gt[int(rng.integers(0, len(gt)))] + rng.integers(-3, 4, 4)
        else:
            xy = rng.integers(0, 30, 2).astype(float)
            box = np.concatenate([xy, xy + rng.integers(0, 20, 2)])
        detections.append((image_id, round(float(rng.random()), 1), box))  # ties
    for plus_one in (True, False):
        expected = _greedy_reference(detections, ground_truths, 0.5, plus_one)
        got = match_detections(detections, ground_truths, 0.5, plus_one)
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    # the whole data set path (evaluate_detections) against class_ap on the same detections
    class_id = 3
    targets = [{"boxes": torch.tensor(ground_truths.get(i, (np.zeros((0, 4)),))[0], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.full((len(ground_truths.get(i, (np.zeros((0, 4)),))[0]),), class_id),
                "difficult": torch.tensor(ground_truths[i][1] if i in ground_truths else np.zeros(0, bool)),
                "image_id": i} for i in images]
    predictions = [{"boxes": torch.tensor(np.array([b for j, _, b in detections if j == i]).reshape(-1, 4),
                                          dtype=torch.float32),
                    "scores": torch.tensor([s for j, s, _ in detections if j == i], dtype=torch.float32),
                    "labels": torch.full((sum(j == i for j, _, _ in detections),), class_id)} for i in images]
    result = evaluate_detections(predictions, targets, [class_id], plus_one=False)
    as_float32 = [(i, float(np.float32(s)), np.asarray(b, dtype=np.float32).astype(np.float64))
                  for image_id in images for i, s, b in detections if i == image_id]  # in image order, as there
    gt32 = {i: (np.asarray(b, dtype=np.float32).astype(np.float64), d) for i, (b, d) in ground_truths.items()}
    ap, counts = class_ap(as_float32, gt32, plus_one=False, score_thresh=0.3)
    assert (result.ap[class_id] == ap) or (np.isnan(ap) and np.isnan(result.ap[class_id]))
    assert (result.tp, result.fp, result.npos[class_id]) == (counts["tp"], counts["fp"], counts["npos"])


# --- RD's tutor copies share the frozen body ---------------------------------------------------


def test_rd_tutors_share_the_frozen_body_and_learn_exactly_as_with_full_copies(smoke_cache):
    from session.workspace import prepare
    from distill.rd import ClientTraining, client_delta, reverse_distill_tutor1, reverse_distill_tutor2

    ws = prepare("smoke", "default8", num_clients=1, seed=0, cache_dir=smoke_cache)
    data = ws.client_train(0)
    tutor, edge = build_model("smoke", "tutor", seed=1).eval(), build_model("smoke", "edge", seed=2).eval()
    body_before = {k: v.clone() for k, v in tutor.backbone.body.state_dict().items()}
    results = {}
    for frozen in (True, False):
        settings = ClientTraining(rd_iters=3, redistill_iters=2, batch_size=4, freeze_backbone=frozen)
        t1, r1 = reverse_distill_tutor1(tutor, edge, data, settings, seed=5)
        t2, r2 = reverse_distill_tutor2(tutor, t1, edge, data, settings, seed=5)
        shares = [a.data_ptr() == b.data_ptr() for a, b in zip(tutor.backbone.body.parameters(),
                                                                 t2.backbone.body.parameters())]
        assert all(shares) if frozen else not any(shares)
        assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(neck_head(tutor).values(), neck_head(t1).values()))
        assert all(p.requires_grad for p in tutor.parameters())  # as before training
        results[frozen] = (r1.losses, r2.losses, client_delta(t1, t2, settings))
        if frozen:  # the tutor's body (and its BatchNorm statistics) came through untouched
            assert all(torch.equal(v, body_before[k]) for k, v in tutor.backbone.body.state_dict().items())
    # The same learning as with full copies: compare with RD on deep copies made by hand.
    settings = ClientTraining(rd_iters=3, redistill_iters=2, batch_size=4)
    from distill.rd import tutor1_phase, tutor2_phase
    from distill.trainer import train
    t1 = copy.deepcopy(tutor)
    r1 = train(t1, data, tutor1_phase(settings, 5), teacher=edge, progress=False)
    t2 = copy.deepcopy(t1)
    r2 = train(t2, data, tutor2_phase(settings, 5), teacher=edge, progress=False)
    losses1, losses2, delta = results[True]
    assert (losses1, losses2) == (r1.losses, r2.losses)
    assert all(torch.equal(delta[k], v) for k, v in client_delta(t1, t2, settings).items())


def test_class_patches_give_each_rows_top_score_on_the_images_that_hold_its_class():
    """EvaluationFeatures.class_patches: a row change equal to the row itself moves the mean top logit by
    the mean top logit (checked against the full model's head on the same batches); a bias-only edit of
    -0.5 moves it by exactly -0.5, on the images holding the class and on the others."""
    from strategies.verify import row_score_shift
    from models.parts import CLASS_ROW_PARAMS

    tutor = build_model("smoke", "tutor", seed=0)
    dataset = _mixed_images()  # image i holds class i % 20 only
    cache = EvaluationFeatures(tutor, dataset, batch_size=3)
    patches = cache.class_patches(tutor)
    tutor.eval()
    with torch.inference_mode():
        tops = []
        for start in range(0, len(dataset), 3):
            images = [image for image, _ in dataset[start:start + 3]]
            image_list, _ = tutor.transform(images, None)
            tops.append(tutor.head(list(tutor.backbone(image_list.tensors).values()))["cls_logits"].amax(dim=1))
        top = torch.cat(tops)  # [images, K]: each image's top logit per class
    weight, bias = (dict(tutor.named_parameters())[name].detach() for name in CLASS_ROW_PARAMS)
    itself = {CLASS_ROW_PARAMS[0]: weight, CLASS_ROW_PARAMS[1]: bias}
    for c in (0, 3, 7):
        holds = torch.tensor([target["labels"][0].item() == c for _, target in dataset])
        assert int(patches["positive_count"][c]) == int(holds.sum()) and int(patches["negative_count"][c]) == 7 - int(holds.sum())
        if holds.any():
            assert row_score_shift(itself, c, patches["positive"][c]) == pytest.approx(float(top[holds, c].mean()), abs=1e-4)
        assert row_score_shift(itself, c, patches["negative"][c]) == pytest.approx(float(top[~holds, c].mean()), abs=1e-4)
        edit = {CLASS_ROW_PARAMS[0]: torch.zeros_like(weight), CLASS_ROW_PARAMS[1]: torch.zeros_like(bias)}
        edit[CLASS_ROW_PARAMS[1]][c] = -0.5
        assert row_score_shift(edit, c, patches["negative"][c]) == pytest.approx(-0.5)
    assert row_score_shift({}, 0, patches["positive"][0]) != row_score_shift({}, 0, patches["positive"][0])  # NaN
