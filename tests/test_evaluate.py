"""Tests for evaluation/ap.py (VOC-exact detection evaluation)."""

from __future__ import annotations

import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch

from data.voc import collate_detection
from evaluation.ap import (
    VOC07_RECALL_POINTS,
    EvalResult,
    average_precision,
    class_ap,
    counts_at,
    evaluate_detections,
    evaluate_model,
    f1_at,
    precision_recall_f1,
    recall_at,
    voc_iou,
)

# --------------------------------------------------------------------------------------------
# IoU
# --------------------------------------------------------------------------------------------


def test_voc_iou_plus_one_convention():
    gt = np.array([[0, 0, 9, 9]], dtype=float)  # 10 x 10 pixels under the +1 convention
    assert voc_iou(np.array([0, 0, 9, 9]), gt)[0] == 1.0
    # Half of the columns: 5 x 10 = 50 pixels inside a 100-pixel box -> exactly 0.5.
    assert voc_iou(np.array([0, 0, 4, 9]), gt)[0] == 0.5
    # Without +1: 4 x 9 = 36 over 9 x 9 = 81.
    assert voc_iou(np.array([0, 0, 4, 9]), gt, plus_one=False)[0] == pytest.approx(36 / 81)
    # Adjacent pixel ranges (9 | 10) do not overlap.
    assert voc_iou(np.array([10, 0, 19, 9]), gt)[0] == 0.0
    # Shifted by one column: intersection 9 x 10 = 90, union 100 + 100 - 90 = 110.
    assert voc_iou(np.array([1, 0, 10, 9]), gt)[0] == pytest.approx(90 / 110)
    # Vectorised against several boxes.
    many = voc_iou(np.array([0, 0, 9, 9]), np.array([[0, 0, 9, 9], [50, 50, 60, 60]]))
    np.testing.assert_array_equal(many, [1.0, 0.0])


# --------------------------------------------------------------------------------------------
# Hand-computed case with a difficult object
# --------------------------------------------------------------------------------------------


def hand_case():
    """Two images, three ground truths (one difficult), five detections.

    image "a": gt1 = (0,0,9,9)             non-difficult
               gt2 = (20,20,29,29)         difficult
    image "b": gt3 = (0,0,9,9)             non-difficult          -> npos = 2

    detections (score order):
      0.95 a (20,20,29,29)  IoU 1 with difficult gt2          -> ignored
      0.90 a (0,0,9,9)      IoU 1 with gt1                    -> TP
      0.80 a (1,0,10,9)     IoU 90/110 with gt1, already used -> FP (duplicate)
      0.70 b (0,0,3,9)      IoU 40/100 = 0.4 with gt3         -> FP (below IoU)
      0.60 b (0,0,9,9)      IoU 1 with gt3                    -> TP
    """
    ground_truths = {
        "a": (np.array([[0, 0, 9, 9], [20, 20, 29, 29]], dtype=float), np.array([False, True])),
        "b": (np.array([[0, 0, 9, 9]], dtype=float), np.array([False])),
    }
    detections = [
        ("b", 0.70, np.array([0, 0, 3, 9])),
        ("a", 0.90, np.array([0, 0, 9, 9])),
        ("b", 0.60, np.array([0, 0, 9, 9])),
        ("a", 0.95, np.array([20, 20, 29, 29])),
        ("a", 0.80, np.array([1, 0, 10, 9])),
    ]
    return detections, ground_truths


def test_class_ap_hand_computed_with_difficult():
    detections, ground_truths = hand_case()
    # Ranked outcomes without the ignored one: TP, FP, FP, TP
    #   recall    = 1/2, 1/2, 1/2, 2/2
    #   precision = 1/1, 1/2, 1/3, 2/4
    # All-point (VOC2010+): envelope = 1, 1/2, 1/2, 1/2
    #   AP = (0.5 - 0) * 1 + (1.0 - 0.5) * 0.5 = 0.75
    # 11-point (VOC07): t = 0, .1, .2, .3, .4, .5 -> max precision at recall >= t is 1  (6 points)
    #                   t = .6, .7, .8, .9, 1   -> max precision at recall >= t is 0.5 (5 points)
    #   AP = (6 * 1 + 5 * 0.5) / 11 = 8.5 / 11
    ap, counts = class_ap(detections, ground_truths, use_07_metric=False)
    assert ap == 0.75
    assert counts == {"tp": 2, "fp": 2, "npos": 2}

    ap07, counts07 = class_ap(detections, ground_truths, use_07_metric=True)
    assert ap07 == 8.5 / 11
    assert counts07 == counts

    # Counts at a score threshold: 0.95 (ignored), 0.90 (TP), 0.80 (FP).
    _, at_thresh = class_ap(detections, ground_truths, score_thresh=0.75)
    assert at_thresh == {"tp": 1, "fp": 1, "npos": 2}


def test_difficult_rules_matter_in_hand_case():
    detections, ground_truths = hand_case()
    # If the difficult object were an ordinary one (npos = 3, the 0.95 detection a TP):
    # outcomes TP, TP, FP, FP, TP; recall 1/3, 2/3, 2/3, 2/3, 1; precision 1, 1, 2/3, 1/2, 3/5
    # all-point AP = 2/3 * 1 + 1/3 * 3/5 = 13/15.
    not_difficult = {k: (b, np.zeros_like(d)) for k, (b, d) in ground_truths.items()}
    ap, counts = class_ap(detections, not_difficult)
    assert counts["npos"] == 3
    assert ap == pytest.approx(13 / 15, abs=1e-15)


def test_strict_iou_threshold():
    ground_truths = {0: (np.array([[0, 0, 9, 9]], dtype=float), np.array([False]))}
    # IoU exactly 0.5 with the +1 convention (50 / 100): not > 0.5 -> false positive.
    at_half = [(0, 0.9, np.array([0, 0, 4, 9]))]
    ap, counts = class_ap(at_half, ground_truths)
    assert ap == 0.0
    assert counts == {"tp": 0, "fp": 1, "npos": 1}
    # One more column: 60 / 100 -> true positive.
    above = [(0, 0.9, np.array([0, 0, 5, 9]))]
    ap, counts = class_ap(above, ground_truths)
    assert ap == 1.0
    assert counts == {"tp": 1, "fp": 0, "npos": 1}


def test_class_without_positives_is_nan_and_no_detections_is_zero():
    only_difficult = {0: (np.array([[0, 0, 9, 9]], dtype=float), np.array([True]))}
    ap, counts = class_ap([(0, 0.5, np.array([0, 0, 9, 9]))], only_difficult)
    assert math.isnan(ap)
    assert counts == {"tp": 0, "fp": 0, "npos": 0}  # the detection hit a difficult object

    ap, counts = class_ap([], {})
    assert math.isnan(ap)

    one_gt = {0: (np.array([[0, 0, 9, 9]], dtype=float), np.array([False]))}
    for use_07 in (False, True):
        ap, counts = class_ap([], one_gt, use_07_metric=use_07)
        assert ap == 0.0
        assert counts == {"tp": 0, "fp": 0, "npos": 1}


def test_average_precision_curves():
    # Perfect ranking reaching full recall.
    assert average_precision([0.5, 1.0], [1.0, 1.0], use_07_metric=False) == 1.0
    assert average_precision([0.5, 1.0], [1.0, 1.0], use_07_metric=True) == 1.0
    # Empty curve.
    assert average_precision([], [], use_07_metric=False) == 0.0
    assert average_precision([], [], use_07_metric=True) == 0.0
    # Recall exactly 3/10 does not reach the reference's 0.1 * 3 = 0.30000000000000004 point.
    assert VOC07_RECALL_POINTS[3] > 0.3
    # recall 0.3 at precision 1: points t = 0, .1, .2 count -> 3/11.
    assert average_precision([0.3], [1.0], use_07_metric=True) == 3 / 11
    assert average_precision([0.3], [1.0], use_07_metric=False) == pytest.approx(0.3)


# --------------------------------------------------------------------------------------------
# Precision / recall / F1 and the whole-data-set evaluation
# --------------------------------------------------------------------------------------------


def test_precision_recall_f1_known_and_zero_safe():
    p, r, f1 = precision_recall_f1(tp=3, fp=1, npos=6)
    assert (p, r) == (0.75, 0.5)
    assert f1 == pytest.approx(2 * 0.75 * 0.5 / 1.25)  # 0.6
    assert precision_recall_f1(0, 0, 0) == (0.0, 0.0, 0.0)
    assert precision_recall_f1(0, 5, 3) == (0.0, 0.0, 0.0)


def same_values(a: dict, b: dict) -> bool:
    """Equal dicts of floats, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def hand_case_as_images():
    """The hand case as class 1 in per-image dicts, plus class 2 (one FP detection, no ground
    truth -> NaN AP) and class 3 (one object, no detection -> AP 0)."""
    predictions = [
        {  # image a
            "boxes": torch.tensor([[0, 0, 9, 9], [20, 20, 29, 29], [1, 0, 10, 9], [40, 40, 60, 60]], dtype=torch.float32),
            "scores": torch.tensor([0.90, 0.95, 0.80, 0.50]),
            "labels": torch.tensor([1, 1, 1, 2]),
        },
        {  # image b (numpy works too)
            "boxes": np.array([[0, 0, 3, 9], [0, 0, 9, 9]], dtype=np.float32),
            "scores": np.array([0.70, 0.60]),
            "labels": np.array([1, 1]),
        },
    ]
    targets = [
        {
            "boxes": torch.tensor([[0, 0, 9, 9], [20, 20, 29, 29], [70, 70, 90, 90]], dtype=torch.float32),
            "labels": torch.tensor([1, 1, 3]),
            "difficult": torch.tensor([False, True, False]),
            "image_id": torch.tensor([7]),
        },
        {
            "boxes": torch.tensor([[0, 0, 9, 9]], dtype=torch.float32),
            "labels": torch.tensor([1]),
            "difficult": torch.tensor([False]),
            "image_id": 8,
        },
    ]
    return predictions, targets


def test_evaluate_detections_hand_case_and_nan_class():
    predictions, targets = hand_case_as_images()
    result = evaluate_detections(predictions, targets, class_ids=[1, 2, 3], score_thresh=0.3)
    assert isinstance(result, EvalResult)
    assert result.ap[1] == 0.75
    assert math.isnan(result.ap[2])
    assert result.ap[3] == 0.0
    # mAP is the mean over classes with positives: (0.75 + 0) / 2.
    assert result.mAP == 0.375
    # Micro P/R at 0.3: class 1 TP 2, FP 2; class 2 FP 1; npos 2 + 0 + 1 = 3.
    assert (result.tp, result.fp) == (2, 3)
    assert result.precision == pytest.approx(2 / 5)
    assert result.recall == pytest.approx(2 / 3)
    assert result.f1 == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))

    # A higher threshold keeps 0.95 (ignored), 0.90 (TP), 0.80 (FP) only.
    high = evaluate_detections(predictions, targets, class_ids=[1, 2, 3], score_thresh=0.75)
    assert (high.tp, high.fp) == (1, 1)
    assert same_values(high.ap, result.ap)  # AP does not depend on score_thresh

    result07 = evaluate_detections(predictions, targets, class_ids=[1, 2, 3], use_07_metric=True)
    assert result07.ap[1] == 8.5 / 11

    as_dict = result.to_dict(["bg", "cat", "dog", "cow"])
    assert as_dict["ap"] == {"cat": 0.75, "dog": None, "cow": 0.0}
    assert as_dict["mAP"] == 0.375
    json.dumps(as_dict)  # JSON-friendly (no NaN)
    assert result.to_dict({1: "cat"})["ap"] == {"cat": 0.75, "2": None, "3": 0.0}

    # Classes outside class_ids are ignored; only-NaN evaluation gives NaN mAP.
    only2 = evaluate_detections(predictions, targets, class_ids=[2])
    assert math.isnan(only2.mAP)


def test_missing_image_id_uses_index_and_duplicates_rejected():
    predictions, targets = hand_case_as_images()
    for t in targets:
        t.pop("image_id")
        t.pop("difficult")  # absent -> nothing difficult
    result = evaluate_detections(predictions, targets, class_ids=[1])
    assert result.npos[1] == 3
    dup = [dict(t, image_id=1) for t in targets]
    with pytest.raises(ValueError):
        evaluate_detections(predictions, dup, class_ids=[1])


# --------------------------------------------------------------------------------------------
# Cross-check against torchmetrics (pycocotools backend)
# --------------------------------------------------------------------------------------------


def random_case(seed: int, integer_boxes: bool, num_images=24, num_classes=3):
    """Seeded multi-class data, no difficult objects.

    Ground truths sit in separate cells of a 4 x 4 grid (128 px), so their pixel ranges never
    overlap: a detection can then reach IoU >= 0.5 with at most one ground truth, which makes
    VOC's "best ground truth, FP if already taken" and COCO's "best untaken ground truth" agree.
    Detections are jittered copies of objects (some with the wrong label) plus random boxes.
    Boxes are integers, or multiples of 1/8 (exact in float32, which torchmetrics uses).
    """
    rng = np.random.default_rng(seed)
    step = 1.0 if integer_boxes else 0.125
    predictions, targets = [], []
    for _ in range(num_images):
        cells = rng.choice(16, size=rng.integers(1, 7), replace=False)
        gt_boxes, gt_labels = [], []
        for cell in cells:
            cx, cy = 32 * (cell % 4), 32 * (cell // 4)
            x1, y1 = cx + 2 + rng.integers(0, 8), cy + 2 + rng.integers(0, 8)
            x2, y2 = cx + 29 - rng.integers(0, 8), cy + 29 - rng.integers(0, 8)
            gt_boxes.append([x1, y1, x2, y2])
            gt_labels.append(int(rng.integers(1, num_classes + 1)))
        gt_boxes = np.array(gt_boxes, dtype=np.float64)
        det_boxes, det_labels = [], []
        for box, label in zip(gt_boxes, gt_labels):
            for _ in range(rng.integers(0, 4)):
                jitter = np.round(rng.normal(0.0, 4.0, size=4) / step) * step
                det_boxes.append(box + jitter)
                det_labels.append(label if rng.random() < 0.8 else int(rng.integers(1, num_classes + 1)))
        for _ in range(rng.integers(0, 4)):
            xy = np.round(rng.uniform(0, 100, size=2) / step) * step
            wh = np.round(rng.uniform(4, 28, size=2) / step) * step
            det_boxes.append(np.concatenate([xy, xy + wh]))
            det_labels.append(int(rng.integers(1, num_classes + 1)))
        det_boxes = np.array(det_boxes, dtype=np.float64).reshape(-1, 4)
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2] + 1)  # keep boxes proper
        predictions.append({"boxes": det_boxes, "labels": np.array(det_labels, dtype=np.int64)})
        targets.append({"boxes": gt_boxes, "labels": np.array(gt_labels, dtype=np.int64)})

    # Distinct scores, exact in float32: a random permutation of k / total.
    total = sum(len(p["boxes"]) for p in predictions)
    scores = (rng.permutation(total) + 1).astype(np.float64) / 1024.0
    offset = 0
    for p in predictions:
        p["scores"] = scores[offset : offset + len(p["boxes"])]
        offset += len(p["boxes"])
    return predictions, targets


def drop_near_half_iou(predictions, targets, plus_one):
    """Remove detections whose IoU with any ground truth is within 1e-6 of 0.5: VOC matches at
    IoU > 0.5, pycocotools at IoU >= 0.5, and exact ties would be decided differently."""
    cleaned = []
    for p, t in zip(predictions, targets):
        keep = [
            not np.any(np.abs(voc_iou(box, t["boxes"], plus_one=plus_one) - 0.5) < 1e-6) for box in p["boxes"]
        ]
        keep = np.array(keep, dtype=bool)
        cleaned.append({k: v[keep] for k, v in p.items()})
    return cleaned


def torchmetrics_ap_per_class(predictions, targets, shift_one: bool):
    """11-point AP at IoU 0.5 per class from torchmetrics.  With ``shift_one`` the boxes are given
    as (x1, y1, x2 + 1, y2 + 1), so COCO's width x2 - x1 equals VOC's x2 - x1 + 1."""
    from torchmetrics.detection import MeanAveragePrecision

    def shifted(boxes):
        boxes = np.array(boxes, dtype=np.float64)
        if shift_one:
            boxes[:, 2:] += 1.0
        return torch.tensor(boxes, dtype=torch.float32)

    metric = MeanAveragePrecision(
        box_format="xyxy",
        iou_type="bbox",
        iou_thresholds=[0.5],
        rec_thresholds=VOC07_RECALL_POINTS.tolist(),
        max_detection_thresholds=[1, 10, 100],
        class_metrics=True,
        backend="pycocotools",
    )
    metric.update(
        [
            {
                "boxes": shifted(p["boxes"]),
                "scores": torch.tensor(p["scores"], dtype=torch.float32),
                "labels": torch.tensor(p["labels"]),
            }
            for p in predictions
        ],
        [{"boxes": shifted(t["boxes"]), "labels": torch.tensor(t["labels"])} for t in targets],
    )
    out = metric.compute()
    classes = out["classes"].reshape(-1).tolist()
    return dict(zip(classes, out["map_per_class"].reshape(-1).tolist())), float(out["map"])


@pytest.mark.parametrize(
    "seed,integer_boxes,plus_one",
    [(0, True, True), (1, True, True), (2, False, False), (3, False, False)],
)
def test_eleven_point_matches_torchmetrics(seed, integer_boxes, plus_one):
    pytest.importorskip("pycocotools")
    pytest.importorskip("torchmetrics")
    predictions, targets = random_case(seed, integer_boxes)
    predictions = drop_near_half_iou(predictions, targets, plus_one)
    ours = evaluate_detections(predictions, targets, class_ids=[1, 2, 3], use_07_metric=True, plus_one=plus_one)
    theirs, their_map = torchmetrics_ap_per_class(predictions, targets, shift_one=plus_one)

    assert sorted(theirs) == [1, 2, 3]
    for c in (1, 2, 3):
        # torchmetrics is float32 at its output; the AP values agree to float32 precision.
        assert ours.ap[c] == pytest.approx(theirs[c], abs=1e-6), (c, ours.ap[c], theirs[c])
        assert 0.0 < ours.ap[c] < 1.0  # a non-trivial curve
    assert ours.mAP == pytest.approx(their_map, abs=1e-6)


# --------------------------------------------------------------------------------------------
# evaluate_model on a tiny, untrained FCOS
# --------------------------------------------------------------------------------------------


class TinyBackbone(torch.nn.Module):
    """Two strided convs (strides 8 and 16) and an FPN with 32 channels."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=8, padding=1), torch.nn.ReLU())
        self.down = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU())
        from torchvision.ops import FeaturePyramidNetwork

        self.fpn = FeaturePyramidNetwork([16, 32], 32)
        self.out_channels = 32

    def forward(self, x):
        c3 = self.stem(x)
        c4 = self.down(c3)
        return self.fpn(OrderedDict([("p3", c3), ("p4", c4)]))


def tiny_fcos():
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    torch.manual_seed(0)
    anchors = AnchorGenerator(((8,), (16,)), ((1.0,), (1.0,)))
    return FCOS(
        TinyBackbone(),
        num_classes=3,
        min_size=64,
        max_size=64,
        anchor_generator=anchors,
        score_thresh=0.0,  # untrained: keep every candidate so the evaluation has work to do
        detections_per_img=20,
    )


def tiny_dataset(n=5):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        image = torch.rand(3, 64, 64, generator=g)
        target = {
            "boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [30.0, 20.0, 60.0, 50.0]]),
            "labels": torch.tensor([i % 3, (i + 1) % 3]),
            "difficult": torch.tensor([False, i == 0]),
        }
        items.append((image, target))
    return items


def test_evaluate_model_tiny_fcos_runs_and_restores_mode():
    model = tiny_fcos()
    model.train()
    dataset = tiny_dataset()
    result = evaluate_model(model, dataset, class_ids=[0, 1, 2], batch_size=2, score_thresh=0.05)
    assert model.training  # mode restored
    for value in result.ap.values():
        assert 0.0 <= value <= 1.0
    assert 0.0 <= result.mAP <= 1.0
    for value in (result.precision, result.recall, result.f1):
        assert 0.0 <= value <= 1.0
    assert sum(result.npos.values()) == 9  # 10 objects, one difficult

    # A DataLoader yielding lists works too, and eval mode is kept when it was eval.
    from torch.utils.data import DataLoader

    model.eval()
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    again = evaluate_model(model, loader, class_ids=[0, 1, 2], score_thresh=0.05)
    assert not model.training
    assert same_values(again.ap, result.ap)


class OracleDetector(torch.nn.Module):
    """Returns each image's ground truth (the image's index is written in pixel [0, 0, 0])."""

    def __init__(self, dataset):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.answers = [target for _, target in dataset]

    def forward(self, images):
        assert not self.training and torch.is_inference_mode_enabled()
        outputs = []
        for image in images:
            target = self.answers[int(image[0, 0, 0].item())]
            outputs.append(
                {"boxes": target["boxes"], "scores": torch.full((len(target["boxes"]),), 0.9), "labels": target["labels"]}
            )
        return outputs


def test_evaluate_model_keeps_image_order():
    dataset = tiny_dataset(7)
    for index, (image, _) in enumerate(dataset):
        image[0, 0, 0] = index
    model = OracleDetector(dataset)
    result = evaluate_model(model, dataset, class_ids=[0, 1, 2], batch_size=3, device=None)
    assert model.training
    assert result.ap == {0: 1.0, 1: 1.0, 2: 1.0}
    assert (result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0)
    assert result.fp == 0  # the detection of the difficult object is ignored


def test_bootstrap_ap_drop_is_zero_for_identical_models_and_grows_with_disagreement():
    from evaluation.ap import bootstrap_ap_drop

    rng = np.random.default_rng(0)
    targets, good, noisy = [], [], []
    for i in range(40):
        x, y = (float(v) for v in rng.uniform(0, 40, size=2))
        box = torch.tensor([[x, y, x + 20, y + 20]])
        targets.append({"boxes": box, "labels": torch.tensor([3]), "image_id": i})
        good.append({"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([3])})
        # the second model misses every third object: its AP is lower by an amount that depends on the images
        miss = i % 3 == 0
        noisy.append({"boxes": box + (30.0 if miss else 0.0), "scores": torch.tensor([0.9]), "labels": torch.tensor([3])})
    same = bootstrap_ap_drop(good, good, targets, [3], samples=50, seed=0)
    assert same[3] == 0.0
    differ = bootstrap_ap_drop(good, noisy, targets, [3], samples=50, seed=0)
    assert 0.01 < differ[3] < 0.3
    assert bootstrap_ap_drop(good, noisy, targets, [3], samples=50, seed=0) == differ  # seeded
    with pytest.raises(ValueError, match="not aligned"):
        bootstrap_ap_drop(good, noisy[:-1], targets, [3])


def test_body_feature_cache_gives_the_full_models_detections_for_any_neck_head():
    from evaluation.features import EvaluationFeatures, FeaturesTooLarge
    from evaluation.ap import predict
    from models.ladder import build_model
    from models.parts import load_neck_head, neck_head

    tutor = build_model("smoke", "tutor", seed=0)
    dataset = [(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)),
                {"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([i % 20]),
                 "difficult": torch.tensor([False])}) for i in range(7)]
    cache = EvaluationFeatures(tutor, dataset, batch_size=3)
    assert cache.nbytes > 0
    # a candidate: same body, another neck/head (as after eq. 10)
    candidate = build_model("smoke", "tutor", seed=1)
    candidate.backbone.body.load_state_dict(tutor.backbone.body.state_dict())
    load_neck_head(candidate, {k: v * 1.5 for k, v in neck_head(candidate).items()})
    for model in (tutor, candidate):
        model.score_thresh = 0.0  # untrained: keep every candidate box so there is something to compare
    for model in (tutor, candidate):
        expected, targets = predict(model, dataset, batch_size=3)
        got, got_targets = cache.predict(model)
        assert got_targets == targets
        for e, g in zip(expected, got, strict=True):
            for key in ("boxes", "scores", "labels"):
                assert torch.equal(e[key], g[key])
    assert sum(len(p["scores"]) for p in cache.predict(candidate)[0]) > 0  # the comparison had detections to compare
    with pytest.raises(ValueError, match="body differs"):
        cache.predict(build_model("smoke", "tutor", seed=2))
    with pytest.raises(FeaturesTooLarge):
        EvaluationFeatures(tutor, dataset, batch_size=3, max_bytes=1000)


def test_bootstrap_ap_drop_equals_evaluating_every_resample_in_full():
    """The fast bootstrap (match once, reweight per resample) against the definition: evaluate
    both models on every resampled image list (copies given their own ids), same resamples."""
    from evaluation.ap import bootstrap_ap_drop, evaluate_detections

    rng = np.random.default_rng(3)

    def boxes_near(centres: np.ndarray, spread: float) -> torch.Tensor:
        xy = centres + rng.normal(0, spread, size=centres.shape)
        return torch.tensor(np.concatenate([xy, xy + 20], axis=1), dtype=torch.float32).reshape(-1, 4)

    targets, before, after = [], [], []
    for i in range(30):
        k = int(rng.integers(1, 4))
        centres = rng.uniform(0, 40, size=(k, 2))
        labels = torch.tensor(rng.integers(0, 3, size=k), dtype=torch.int64)
        targets.append({"boxes": boxes_near(centres, 0.0), "labels": labels,
                        "difficult": torch.tensor(rng.random(k) < 0.15)})
        for model in (before, after):  # detections near the objects (some duplicates, some wrong labels)
            pick = rng.integers(0, k, size=int(rng.integers(0, 5)))
            model.append({"boxes": boxes_near(centres[pick], 4.0),
                          "scores": torch.tensor(rng.random(len(pick)), dtype=torch.float32),
                          "labels": torch.where(torch.tensor(rng.random(len(pick)) < 0.8), labels[pick],
                                                torch.tensor(rng.integers(0, 3, size=len(pick))))})
    fast = bootstrap_ap_drop(before, after, targets, [0, 1, 2], samples=40, seed=7)

    draw = np.random.default_rng(7)
    drops = {c: [] for c in (0, 1, 2)}
    for _ in range(40):
        pick = draw.integers(0, len(targets), size=len(targets))
        resampled = [{**targets[i], "image_id": position} for position, i in enumerate(pick)]
        ap_b = evaluate_detections([before[i] for i in pick], resampled, [0, 1, 2], plus_one=False).ap
        ap_a = evaluate_detections([after[i] for i in pick], resampled, [0, 1, 2], plus_one=False).ap
        for c in drops:
            if math.isfinite(ap_b[c]) and math.isfinite(ap_a[c]):
                drops[c].append(ap_b[c] - ap_a[c])
    for c in drops:
        assert fast[c] > 0
        assert fast[c] == pytest.approx(float(np.std(drops[c], ddof=1)), abs=1e-12)


def test_f1_at_the_threshold_counts_the_detections_above_it_with_difficult_matches_ignored():
    """The hand case as per-image dicts (class 3): above 0.75 one TP (0.90), one duplicate FP (0.80) and the
    difficult match (0.95) ignored -> P = R = F1 = 0.5; above 0.5 two TP and two FP -> P 0.5, R 1, F1 2/3."""
    def box(*xyxy):
        return np.array(xyxy, dtype=float)

    targets = [{"boxes": np.stack([box(0, 0, 9, 9), box(20, 20, 29, 29)]), "labels": np.array([3, 3]),
                "difficult": np.array([False, True]), "image_id": "a"},
               {"boxes": np.stack([box(0, 0, 9, 9)]), "labels": np.array([3]), "difficult": np.array([False]),
                "image_id": "b"}]
    predictions = [{"boxes": np.stack([box(20, 20, 29, 29), box(0, 0, 9, 9), box(1, 0, 10, 9)]),
                    "scores": np.array([0.95, 0.90, 0.80]), "labels": np.array([3, 3, 3])},
                   {"boxes": np.stack([box(0, 0, 3, 9), box(0, 0, 9, 9)]), "scores": np.array([0.70, 0.60]),
                    "labels": np.array([3, 3])}]
    assert f1_at(predictions, targets, [3], 0.75)[3] == pytest.approx(0.5)
    assert f1_at(predictions, targets, [3], 0.5)[3] == pytest.approx(2 / 3)
    assert recall_at(predictions, targets, [3], 0.5)[3] == pytest.approx(1.0)
    assert f1_at(predictions, targets, [3, 7], 0.99) == {3: 0.0, 7: 0.0}  # nothing above; a class without objects
    # the same matching counted per image: summed, precision, recall and F1 of the whole set
    tp, fp, positives = counts_at(predictions, targets, [3], 0.5)[3]
    assert tp.tolist() == [1, 1] and fp.tolist() == [1, 1] and positives.tolist() == [1, 1]
    assert precision_recall_f1(int(tp.sum()), int(fp.sum()), int(positives.sum()))[2] == pytest.approx(2 / 3)
    tp, fp, positives = counts_at(predictions, targets, [3], 0.75)[3]
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 0]  # the difficult match counts neither way
