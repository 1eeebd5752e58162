"""PASCAL VOC detection evaluation (AP at IoU 0.5, mAP, precision / recall / F1).

The rules follow the VOC devkit (the README, "Evaluation"):

* IoU uses the VOC "+1" pixel convention (see ``voc_iou``).
* For one class, detections from all images are sorted by descending score.  Each one looks at
  the ground truths of its image and takes the one with the highest IoU.  It is a true positive
  when that IoU is strictly greater than the threshold and the ground truth is neither
  ``difficult`` nor already matched; a match to a ``difficult`` object is ignored (neither TP nor
  FP); a match to an already matched object, or IoU <= threshold, is a false positive.
* Positives (the recall denominator) exclude difficult objects.
* VOC2007 AP is the 11-point interpolated AP; VOC2010+ AP is the area under the monotone
  (right-to-left maximum) precision envelope.

Box convention
--------------
The detector and the targets use torchvision's 0-based continuous ``xyxy`` pixel coordinates.
The VOC devkit stores 1-based *inclusive* integer pixel boxes, so a box from column ``x1`` to
column ``x2`` is ``x2 - x1 + 1`` pixels wide.  IoU is invariant to translating both boxes, so the
0-based vs 1-based offset does not matter; what matters is the width/height.  With
``plus_one=True`` (default) we add 1 to every width and height - of both boxes and of their
intersection - exactly as the devkit does, whatever the coordinates' origin.  With
``plus_one=False`` widths are the plain ``x2 - x1`` (the COCO / torchvision convention).

Everything here is numpy, except ``evaluate_model`` which runs a torch model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

from data.voc import collate_detection

# The VOC2007 recall points 0.0, 0.1, ..., 1.0, generated the way the reference does
# (``np.arange(0., 1.1, 0.1)``).  Note that 0.3, 0.6 and 0.7 come out one ulp above the
# decimal value (e.g. 0.30000000000000004), so a recall of exactly 3/10 does not reach "0.3".
VOC07_RECALL_POINTS = np.arange(0.0, 1.1, 0.1)


# --------------------------------------------------------------------------------------------
# Formulas
# --------------------------------------------------------------------------------------------


def box_extent(low: np.ndarray, high: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """Width (or height) of boxes spanning ``low..high``: ``high - low (+ 1)``."""
    return high - low + (1.0 if plus_one else 0.0)


def voc_iou(box: np.ndarray, boxes: np.ndarray, plus_one: bool = True) -> np.ndarray:
    """IoU of one ``xyxy`` box against ``boxes`` [K, 4]; returns [K].

    With ``plus_one`` widths and heights are ``x2 - x1 + 1`` (VOC devkit convention).
    A non-overlapping pair gives 0.
    """
    box = np.asarray(box, dtype=np.float64).reshape(4)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    inter_w = np.maximum(
        box_extent(np.maximum(box[0], boxes[:, 0]), np.minimum(box[2], boxes[:, 2]), plus_one), 0.0
    )
    inter_h = np.maximum(
        box_extent(np.maximum(box[1], boxes[:, 1]), np.minimum(box[3], boxes[:, 3]), plus_one), 0.0
    )
    intersection = inter_w * inter_h
    area_box = box_extent(box[0], box[2], plus_one) * box_extent(box[1], box[3], plus_one)
    area_boxes = box_extent(boxes[:, 0], boxes[:, 2], plus_one) * box_extent(
        boxes[:, 1], boxes[:, 3], plus_one
    )
    union = area_box + area_boxes - intersection
    return np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)


def eleven_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2007 AP: mean over t in {0, 0.1, ..., 1} of max precision at recall >= t (0 if none)."""
    total = 0.0
    for t in VOC07_RECALL_POINTS:
        reached = recall >= t
        total += float(np.max(precision[reached])) if np.any(reached) else 0.0
    return total / len(VOC07_RECALL_POINTS)


def area_under_envelope_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC2010+ AP: area under the precision envelope (precision made non-increasing in recall)."""
    padded_recall = np.concatenate(([0.0], recall, [1.0]))
    envelope = np.concatenate(([0.0], precision, [0.0]))
    # Right-to-left running maximum: precision at r becomes the best precision at recall >= r.
    envelope = np.maximum.accumulate(envelope[::-1])[::-1]
    # Sum rectangle areas where recall steps up.
    steps = np.nonzero(padded_recall[1:] != padded_recall[:-1])[0]
    return float(np.sum((padded_recall[steps + 1] - padded_recall[steps]) * envelope[steps + 1]))


def average_precision(recall, precision, use_07_metric: bool) -> float:
    """AP from a precision/recall curve (detections in descending score order)."""
    recall = np.asarray(recall, dtype=np.float64).reshape(-1)
    precision = np.asarray(precision, dtype=np.float64).reshape(-1)
    if use_07_metric:
        return eleven_point_ap(recall, precision)
    return area_under_envelope_ap(recall, precision)


def precision_recall_f1(tp: int, fp: int, npos: int) -> tuple[float, float, float]:
    """Precision TP/(TP+FP), recall TP/npos and F1 = 2PR/(P+R) (paper eq. 11); 0 where undefined."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / npos if npos > 0 else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f1)


# --------------------------------------------------------------------------------------------
# Matching for one class
# --------------------------------------------------------------------------------------------

# Outcome of one detection.
TRUE_POSITIVE, FALSE_POSITIVE, IGNORED = 1, 0, -1


def count_positives(ground_truths: Mapping[Hashable, tuple]) -> int:
    """Number of non-difficult ground-truth objects."""
    return int(sum(np.count_nonzero(~np.asarray(diff, dtype=bool)) for _, diff in ground_truths.values()))


def match_detections(
    detections: Sequence[tuple],
    ground_truths: Mapping[Hashable, tuple],
    iou_thresh: float = 0.5,
    plus_one: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy VOC matching of one class's detections.

    Returns ``(scores, outcomes)`` in descending score order (stable for ties), where each
    outcome is TRUE_POSITIVE, FALSE_POSITIVE or IGNORED (best match is a difficult object).
    """
    rows = {image_id: row for row, image_id in enumerate(ground_truths)}
    gt_boxes, gt_difficult, gt_count = _pad_ground_truths(list(ground_truths.values()))
    images = np.array([rows.get(image_id, -1) for image_id, _, _ in detections], dtype=np.int64)
    scores = np.array([float(score) for _, score, _ in detections], dtype=np.float64)
    boxes = np.array([np.asarray(box, dtype=np.float64).reshape(4) for _, _, box in detections],
                     dtype=np.float64).reshape(-1, 4)
    order, outcomes = _match_arrays(images, scores, boxes, gt_boxes, gt_difficult, gt_count, iou_thresh, plus_one)
    return scores[order], outcomes


def _pad_ground_truths(per_image: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[(boxes [K_i, 4], difficult [K_i])]`` -> boxes [M, K, 4], difficult [M, K], counts [M] (K = max K_i;
    rows past an image's count are padding)."""
    counts = np.array([len(np.asarray(diff).reshape(-1)) for _, diff in per_image], dtype=np.int64)
    width = int(counts.max()) if len(counts) else 0
    boxes = np.zeros((len(per_image), width, 4), dtype=np.float64)
    difficult = np.zeros((len(per_image), width), dtype=bool)
    for row, (b, d) in enumerate(per_image):
        boxes[row, :counts[row]] = np.asarray(b, dtype=np.float64).reshape(-1, 4)
        difficult[row, :counts[row]] = np.asarray(d, dtype=bool).reshape(-1)
    return boxes, difficult, counts


def _match_arrays(images: np.ndarray, scores: np.ndarray, boxes: np.ndarray, gt_boxes: np.ndarray,
                  gt_difficult: np.ndarray, gt_count: np.ndarray, iou_thresh: float,
                  plus_one: bool) -> tuple[np.ndarray, np.ndarray]:
    """``match_detections`` on arrays, all detections at once: (ranking order [D], outcomes [D] in that order).

    images [D]: each detection's row of the ground-truth arrays (-1: its image has none); scores [D];
    boxes [D, 4]; gt_boxes [M, K, 4], gt_difficult [M, K], gt_count [M] (``_pad_ground_truths``).
    The greedy loop's outcome, without the loop: a detection's best ground truth (first maximum IoU,
    from ``voc_iou``'s formula element by element) does not depend on the others; a detection above the
    threshold whose best is not difficult is a true positive exactly when it is the first such
    detection of that ground truth in the ranking, since only those mark a ground truth matched.
    """
    order = np.argsort(-scores, kind="stable")
    outcomes = np.full(len(order), FALSE_POSITIVE, dtype=np.int64)
    if len(order) == 0 or gt_boxes.shape[1] == 0:
        return order, outcomes
    rows = images[order]
    has_gt = rows >= 0
    rows = np.where(has_gt, rows, 0)
    has_gt &= gt_count[rows] > 0
    det = boxes[order][:, None, :]  # [D, 1, 4] against [D, K, 4]
    gts = gt_boxes[rows]
    inter_w = np.maximum(box_extent(np.maximum(det[..., 0], gts[..., 0]), np.minimum(det[..., 2], gts[..., 2]),
                                    plus_one), 0.0)
    inter_h = np.maximum(box_extent(np.maximum(det[..., 1], gts[..., 1]), np.minimum(det[..., 3], gts[..., 3]),
                                    plus_one), 0.0)
    intersection = inter_w * inter_h
    area_det = box_extent(det[..., 0], det[..., 2], plus_one) * box_extent(det[..., 1], det[..., 3], plus_one)
    area_gts = box_extent(gts[..., 0], gts[..., 2], plus_one) * box_extent(gts[..., 1], gts[..., 3], plus_one)
    union = area_det + area_gts - intersection
    ious = np.where(union > 0, intersection / np.where(union > 0, union, 1.0), 0.0)
    # Padding never wins the argmax: voc_iou's figures are >= 0 (a NaN box gives 0, not NaN).
    ious[np.arange(gts.shape[1])[None, :] >= gt_count[rows][:, None]] = -1.0
    best = np.argmax(ious, axis=1)
    above = has_gt & (ious[np.arange(len(order)), best] > iou_thresh)
    difficult = gt_difficult[rows, best]
    outcomes[above & difficult] = IGNORED
    candidates = np.nonzero(above & ~difficult)[0]  # in ranking order
    _, first = np.unique(rows[candidates] * gt_boxes.shape[1] + best[candidates], return_index=True)
    outcomes[candidates[first]] = TRUE_POSITIVE
    return order, outcomes


def precision_recall_curve(outcomes: np.ndarray, npos: int) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative recall and precision over ranked outcomes (ignored detections dropped)."""
    kept = outcomes[outcomes != IGNORED]
    tp = np.cumsum(kept == TRUE_POSITIVE)
    fp = np.cumsum(kept == FALSE_POSITIVE)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, 1)
    return recall, precision


def class_ap(
    detections: Sequence[tuple],
    ground_truths: Mapping[Hashable, tuple],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    *,
    score_thresh: float | None = None,
    plus_one: bool = True,
) -> tuple[float, dict]:
    """VOC AP of ONE class.

    ``detections``: list of ``(image_id, score, box_xyxy)``.
    ``ground_truths``: ``image_id -> (boxes [K, 4], difficult bool [K])``; images without
    objects of this class may be absent.

    Returns ``(ap, counts)``: ``ap`` is NaN when the class has no non-difficult object.
    ``counts`` has ``tp``, ``fp`` (among detections with score >= ``score_thresh``, or all
    when it is None; ignored detections count as neither) and ``npos``.
    """
    npos = count_positives(ground_truths)
    scores, outcomes = match_detections(detections, ground_truths, iou_thresh, plus_one)
    return _ap_and_counts(scores, outcomes, npos, use_07_metric, score_thresh)


def _ap_and_counts(scores: np.ndarray, outcomes: np.ndarray, npos: int, use_07_metric: bool,
                   score_thresh: float | None) -> tuple[float, dict]:
    """``class_ap``'s result from ranked scores and outcomes (``match_detections``)."""
    if npos == 0:
        ap = math.nan
    else:
        recall, precision = precision_recall_curve(outcomes, npos)
        ap = average_precision(recall, precision, use_07_metric)
    counted = outcomes if score_thresh is None else outcomes[scores >= score_thresh]
    counts = {
        "tp": int(np.count_nonzero(counted == TRUE_POSITIVE)),
        "fp": int(np.count_nonzero(counted == FALSE_POSITIVE)),
        "npos": npos,
    }
    return ap, counts


# --------------------------------------------------------------------------------------------
# Whole data set
# --------------------------------------------------------------------------------------------


def nan_mean(values: Iterable[Any]) -> float:
    """Mean of the values that are numbers and finite (NaN AP = class absent from the shard; None =
    no value); NaN when there are none. The one NaN-skipping mean of the project."""
    kept = []
    for v in values:
        try:
            if v is not None and math.isfinite(float(v)):
                kept.append(float(v))
        except (TypeError, ValueError):
            pass
    return sum(kept) / len(kept) if kept else math.nan


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass
class EvalResult:
    """Per-class AP, mAP and micro precision/recall/F1 at a score threshold."""

    ap: dict[int, float]
    mAP: float
    precision: float
    recall: float
    f1: float
    tp: int = 0
    fp: int = 0
    npos: dict[int, int] = field(default_factory=dict)
    class_tp: dict[int, int] = field(default_factory=dict)  # per class, at the score threshold
    class_fp: dict[int, int] = field(default_factory=dict)

    def to_dict(self, class_names: Sequence[str] | Mapping[int, str] | None = None) -> dict[str, Any]:
        """JSON-friendly dict; NaN becomes None.  ``class_names`` maps a class id to its name
        (a sequence indexed by class id, or a mapping); ids without a name keep the id."""

        def name(class_id: int) -> str:
            if class_names is None:
                return str(class_id)
            if isinstance(class_names, Mapping):
                return str(class_names.get(class_id, class_id))
            if 0 <= class_id < len(class_names):
                return str(class_names[class_id])
            return str(class_id)

        return {
            "mAP": _json_number(self.mAP),
            "precision": float(self.precision),
            "recall": float(self.recall),
            "f1": float(self.f1),
            "tp": int(self.tp),
            "fp": int(self.fp),
            "ap": {name(c): _json_number(v) for c, v in self.ap.items()},
            "npos": {name(c): int(v) for c, v in self.npos.items()},
        }


def _to_numpy(value, dtype=None, shape_tail: tuple = ()) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value, dtype=dtype)
    if shape_tail:
        array = array.reshape((-1,) + shape_tail)
    else:
        array = array.reshape(-1)
    return array


def _image_key(target: Mapping, index: int) -> Hashable:
    if "image_id" not in target:
        return index
    image_id = target["image_id"]
    if hasattr(image_id, "detach"):
        image_id = image_id.detach().cpu().reshape(-1).tolist()
        image_id = image_id[0] if len(image_id) == 1 else tuple(image_id)
    elif isinstance(image_id, np.ndarray):
        image_id = image_id.reshape(-1).tolist()
        image_id = image_id[0] if len(image_id) == 1 else tuple(image_id)
    return image_id


def _flatten(predictions: Sequence[Mapping], targets: Sequence[Mapping], unique_ids: bool = True) -> tuple[dict, dict]:
    """Every detection and every ground truth of a data set as flat arrays, in image order and, within
    an image, in the order given: detections {image [D], scores [D] float64, boxes [D, 4] float64,
    labels [D]} and ground truths {image [G], boxes [G, 4], labels [G], difficult [G]}. With
    ``unique_ids``, raises on a repeated image_id."""
    seen_keys: set = set()
    det = {"image": [], "scores": [], "boxes": [], "labels": []}
    gt = {"image": [], "boxes": [], "labels": [], "difficult": []}
    for index, (prediction, target) in enumerate(zip(predictions, targets)):
        if unique_ids:
            key = _image_key(target, index)
            if key in seen_keys:
                raise ValueError(f"duplicate image_id {key!r}")
            seen_keys.add(key)
        labels = _to_numpy(target["labels"], np.int64)
        gt["image"].append(np.full(len(labels), index, dtype=np.int64))
        gt["boxes"].append(_to_numpy(target["boxes"], np.float64, (4,)))
        gt["labels"].append(labels)
        gt["difficult"].append(_to_numpy(target["difficult"], bool) if "difficult" in target
                               else np.zeros(len(labels), dtype=bool))
        scores = _to_numpy(prediction["scores"], np.float64)
        det["image"].append(np.full(len(scores), index, dtype=np.int64))
        det["scores"].append(scores)
        det["boxes"].append(_to_numpy(prediction["boxes"], np.float64, (4,)))
        det["labels"].append(_to_numpy(prediction["labels"], np.int64))
    empty = {"image": np.zeros(0, np.int64), "scores": np.zeros(0), "boxes": np.zeros((0, 4)),
             "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)}
    return ({k: np.concatenate(v) if v else empty[k] for k, v in det.items()},
            {k: np.concatenate(v) if v else empty[k] for k, v in gt.items()})


def _class_outcomes(det: dict, gt: dict, num_images: int, class_id: int, iou_thresh: float,
                    plus_one: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """One class's VOC matching over ``_flatten``'s arrays: (ranking order of the class's detections,
    their outcomes in that order, the class's number of positives)."""
    mine = gt["labels"] == class_id
    images, difficult = gt["image"][mine], gt["difficult"][mine]
    # Each image holding the class is a row of the padded ground truths, its objects in target order.
    with_gt, first, counts = np.unique(images, return_index=True, return_counts=True)
    row_of_image = np.full(num_images, -1, dtype=np.int64)
    row_of_image[with_gt] = np.arange(len(with_gt))
    rows = row_of_image[images]
    column = np.arange(len(images)) - first[rows]
    width = int(counts.max()) if len(counts) else 0
    gt_boxes = np.zeros((len(with_gt), width, 4), dtype=np.float64)
    gt_difficult = np.zeros((len(with_gt), width), dtype=bool)
    gt_boxes[rows, column] = gt["boxes"][mine]
    gt_difficult[rows, column] = difficult
    ours = det["labels"] == class_id
    order, outcomes = _match_arrays(row_of_image[det["image"][ours]], det["scores"][ours], det["boxes"][ours],
                                    gt_boxes, gt_difficult, counts.astype(np.int64), iou_thresh, plus_one)
    return order, outcomes, int(np.count_nonzero(~difficult))


def evaluate_detections(
    predictions: Sequence[Mapping],
    targets: Sequence[Mapping],
    class_ids: Sequence[int],
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    score_thresh: float = 0.3,
    *,
    plus_one: bool = True,
) -> EvalResult:
    """VOC evaluation of per-image predictions against targets (aligned by list position).

    AP uses ALL detections given.  Precision/recall/F1 are micro-averaged over ``class_ids``
    using the detections with score >= ``score_thresh`` (the greedy matching of those is the
    same as in the full ranking, since lower-scored detections are matched later).
    Labels not in ``class_ids`` are ignored.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    class_ids = [int(c) for c in class_ids]
    det, gt = _flatten(predictions, targets)
    ap: dict[int, float] = {}
    npos: dict[int, int] = {}
    tp_total = fp_total = 0
    class_tp: dict[int, int] = {}
    class_fp: dict[int, int] = {}
    for c in class_ids:
        order, outcomes, positives = _class_outcomes(det, gt, len(targets), c, iou_thresh, plus_one)
        ap[c], counts = _ap_and_counts(det["scores"][det["labels"] == c][order], outcomes, positives,
                                       use_07_metric, score_thresh)
        npos[c], class_tp[c], class_fp[c] = counts["npos"], counts["tp"], counts["fp"]
        tp_total += counts["tp"]
        fp_total += counts["fp"]

    precision, recall, f1 = precision_recall_f1(tp_total, fp_total, sum(npos.values()))
    return EvalResult(
        ap=ap,
        mAP=nan_mean(ap.values()),
        precision=precision,
        recall=recall,
        f1=f1,
        tp=tp_total,
        fp=fp_total,
        npos=npos,
        class_tp=class_tp,
        class_fp=class_fp,
    )


# --------------------------------------------------------------------------------------------
# Running a torch detection model
# --------------------------------------------------------------------------------------------




MODEL_SCORE_THRESH = 0.5  # P/R/F1 of a model: measured on the cpu teacher, best F1 of 0.3/0.4/0.5/0.6 (0.53)


def predict(model, dataset_or_loader, batch_size: int = 16, device=None) -> tuple[list[dict], list[dict]]:
    """Every image's detections ({boxes, scores, labels} on the CPU) and its target, in data order.
    Runs on ``device`` (None: ``models.compute.work_device``, the enclosing ``placed_on`` block's
    device, else the model's); the model is moved there for the call, and its device and
    train/eval mode are restored afterwards."""
    import torch
    from torch.utils.data import DataLoader

    from models.compute import model_device, work_device

    home = model_device(model)
    device = torch.device(device) if device is not None else work_device(model)

    if isinstance(dataset_or_loader, DataLoader):
        loader = dataset_or_loader
    else:
        loader = DataLoader(
            dataset_or_loader, batch_size=batch_size, shuffle=False, collate_fn=collate_detection
        )

    predictions: list[dict] = []
    targets: list[dict] = []
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        with torch.inference_mode():
            for images, batch_targets in loader:
                if isinstance(batch_targets, Mapping):
                    raise TypeError(
                        "targets came batched into one dict; collate to a list of dicts "
                        "(e.g. DataLoader(..., collate_fn=collate_detection))"
                    )
                if isinstance(images, torch.Tensor):
                    images = list(images.unbind(0))
                images = [image.to(device) for image in images]
                outputs = model(images)
                for output in outputs:
                    predictions.append({k: output[k].detach().cpu() for k in ("boxes", "scores", "labels")})
                targets.extend(batch_targets)
    finally:
        model.to(home)
        model.train(was_training)

    return predictions, targets


def evaluate_model(
    model,
    dataset_or_loader,
    class_ids: Sequence[int],
    batch_size: int = 16,
    score_thresh: float = MODEL_SCORE_THRESH,
    device=None,
    *,
    iou_thresh: float = 0.5,
    use_07_metric: bool = False,
    plus_one: bool = False,
) -> EvalResult:
    """Run a torchvision detection model over a data set and evaluate it the VOC way.

    ``plus_one`` defaults to False here because ``data.voc.VOCDetection`` already turns the devkit's
    inclusive 1-based boxes into continuous ``(xmin - 1, ymin - 1, xmax, ymax)`` boxes whose width
    includes the devkit's "+1"; adding it again would widen every box by a pixel.

    ``dataset_or_loader`` yields ``(image FloatTensor[3, H, W], target dict)`` items (a Dataset),
    or ``(images, targets)`` batches (a DataLoader, e.g. with ``collate_detection``).
    Runs on ``device`` (``predict``).
    AP uses every detection the model returns, so it is bounded by the model's own
    post-processing (e.g. FCOS ``score_thresh`` / ``detections_per_img``).
    The model's train/eval mode is restored afterwards.
    """
    predictions, targets = predict(model, dataset_or_loader, batch_size, device)
    return evaluate_detections(
        predictions,
        targets,
        class_ids,
        iou_thresh=iou_thresh,
        use_07_metric=use_07_metric,
        score_thresh=score_thresh,
        plus_one=plus_one,
    )


# Per-class counts at the operating point travel in the summary as "<count>.<class>" (flat numbers:
# Flower's MetricRecord holds nothing else); ``evaluation.metrics.operating_point`` reads them back.
OP_COUNTS = ("tp", "fp", "npos")


def per_class_ap(model, dataset, class_names: Iterable[str], batch_size: int = 16,
                 score_thresh: float = MODEL_SCORE_THRESH) -> tuple[dict[str, float], dict[str, float]]:
    """AP per VOC class name of ``model`` on ``dataset``, and {precision, recall, f1, mAP} (eq. 11)
    with each class's true / false positives at the score threshold (the operating point) and its
    positives ("tp.<class>", "fp.<class>", "npos.<class>"). AP does not depend on the threshold."""
    return ap_by_name(*predict(model, dataset, batch_size), class_names, score_thresh)


def ap_by_name(predictions: Sequence[Mapping], targets: Sequence[Mapping], class_names: Iterable[str],
               score_thresh: float = MODEL_SCORE_THRESH) -> tuple[dict[str, float], dict[str, float]]:
    """``per_class_ap`` on detections already made (``predict``), with ``evaluate_model``'s settings."""
    from data.voc import CLASS_INDEX

    names = list(class_names)
    result = evaluate_detections(predictions, targets, [CLASS_INDEX[c] for c in names],
                                 score_thresh=score_thresh, plus_one=False)
    ap = {name: float(result.ap[CLASS_INDEX[name]]) for name in names}
    summary = {"precision": result.precision, "recall": result.recall, "f1": result.f1, "mAP": result.mAP}
    for count, values in zip(OP_COUNTS, (result.class_tp, result.class_fp, result.npos)):
        summary.update({f"{count}.{name}": values[CLASS_INDEX[name]] for name in names})
    return ap, {k: float(v) for k, v in summary.items()}


def _ranked_outcomes(det: dict, gt: dict, num_images: int, class_id: int,
                     iou_thresh: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's detections over a data set (``_flatten``'s arrays), ranked by score: (image index,
    outcome) of each kept (not ignored) detection, and each image's number of positives. VOC matching
    is greedy within an image in score order, so a detection's outcome does not depend on the other images."""
    order, outcomes, _ = _class_outcomes(det, gt, num_images, class_id, iou_thresh, plus_one=False)
    images = det["image"][det["labels"] == class_id][order]
    mine = (gt["labels"] == class_id) & ~gt["difficult"]
    positives = np.bincount(gt["image"][mine], minlength=num_images).astype(np.int64)
    kept = outcomes != IGNORED
    return images[kept], outcomes[kept], positives


def _resampled_ap(images: np.ndarray, outcomes: np.ndarray, copies: np.ndarray, npos: int) -> float:
    """Area-under-envelope AP when image i appears ``copies[i]`` times: the copies of one detection
    share its score and outcome, so they are one step of the cumulative counts."""
    weight = copies[images]
    tp = np.cumsum(weight * (outcomes == TRUE_POSITIVE))
    fp = np.cumsum(weight * (outcomes == FALSE_POSITIVE))
    return area_under_envelope_ap(tp / npos, tp / np.maximum(tp + fp, 1))


def bootstrap_ap_drop(before: Sequence[Mapping], after: Sequence[Mapping], targets: Sequence[Mapping],
                      class_ids: Sequence[int], samples: int = 200, seed: int = 0) -> dict[int, float]:
    """Standard deviation of AP(before) - AP(after) per class over ``samples`` bootstrap resamples of
    the images (paired: both models' detections of the same resampled images), i.e. how much an
    AP drop measured on this image set moves by chance. ``before`` / ``after``: ``predict`` outputs
    of the two models on the same ``targets``; AP as ``ap_by_name`` computes it (IoU 0.5, area
    under the envelope, continuous boxes). Each detection is matched once; a resample only
    reweights the ranked outcomes (milliseconds per resample)."""
    if not (len(before) == len(after) == len(targets)):
        raise ValueError(f"{len(before)}, {len(after)} and {len(targets)} predictions/targets: not aligned")
    rng = np.random.default_rng(seed)
    n = len(targets)
    (det_before, gt), (det_after, _) = _flatten(before, targets, False), _flatten(after, targets, False)
    ranked = {int(c): (_ranked_outcomes(det_before, gt, n, int(c)), _ranked_outcomes(det_after, gt, n, int(c)))
              for c in class_ids}
    drops: dict[int, list[float]] = {c: [] for c in ranked}
    for _ in range(samples):
        copies = np.bincount(rng.integers(0, n, size=n), minlength=n)
        for c, ((images_b, outcomes_b, positives), (images_a, outcomes_a, _)) in ranked.items():
            npos = int(copies @ positives)
            if npos > 0:
                drops[c].append(_resampled_ap(images_b, outcomes_b, copies, npos)
                                - _resampled_ap(images_a, outcomes_a, copies, npos))
    return {c: float(np.std(values, ddof=1)) if len(values) > 1 else math.nan for c, values in drops.items()}


def _counts_at(det: dict, gt: dict, num_images: int, class_id: int,
               score_thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's true and false positives among its detections scoring at least ``score_thresh``, and its
    (non-difficult) positives, per image ([num_images] each; a match to a difficult object counts neither way).
    Lower-scored detections are matched after these, so the matching of the kept ones is the full ranking's."""
    order, outcomes, _ = _class_outcomes(det, gt, num_images, class_id, 0.5, plus_one=False)
    ours = det["labels"] == class_id
    images, above = det["image"][ours][order], det["scores"][ours][order] >= score_thresh
    mine = (gt["labels"] == class_id) & ~gt["difficult"]
    return (np.bincount(images[above & (outcomes == TRUE_POSITIVE)], minlength=num_images).astype(np.int64),
            np.bincount(images[above & (outcomes == FALSE_POSITIVE)], minlength=num_images).astype(np.int64),
            np.bincount(gt["image"][mine], minlength=num_images).astype(np.int64))


def counts_at(predictions: Sequence[Mapping], targets: Sequence[Mapping], class_ids: Sequence[int],
              score_thresh: float = MODEL_SCORE_THRESH) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per class and image, what ``f1_at`` and ``recall_at`` count at ``score_thresh``: (true positives, false
    positives, non-difficult positives), each [num_images]. Summed over a resample of the images (weighted by
    copies) they give that resample's precision, recall and F1."""
    det, gt = _flatten(predictions, targets, False)
    return {int(c): _counts_at(det, gt, len(targets), int(c), score_thresh) for c in class_ids}


def recall_at(predictions: Sequence[Mapping], targets: Sequence[Mapping], class_ids: Sequence[int],
              score_thresh: float = MODEL_SCORE_THRESH) -> dict[int, float]:
    """Per class, the share of its (non-difficult) objects found by a detection scoring at least
    ``score_thresh`` (IoU 0.5, VOC matching): the recall a product sees at its operating threshold,
    which average precision does not (a shift of every score of a class leaves its AP unchanged).
    NaN for a class without positives."""
    return {c: float(hits.sum() / positives.sum()) if positives.sum() else math.nan
            for c, (hits, _, positives) in counts_at(predictions, targets, class_ids, score_thresh).items()}


def f1_at(predictions: Sequence[Mapping], targets: Sequence[Mapping], class_ids: Sequence[int],
          score_thresh: float = MODEL_SCORE_THRESH) -> dict[int, float]:
    """Per class, eq. 11's F1 of the detections scoring at least ``score_thresh`` (IoU 0.5, VOC matching as
    ``recall_at``; a match to a difficult object counts neither way). 0 for a class without positives or
    without a true positive."""
    return {c: precision_recall_f1(int(tp.sum()), int(fp.sum()), int(positives.sum()))[2]
            for c, (tp, fp, positives) in counts_at(predictions, targets, class_ids, score_thresh).items()}


def bootstrap_recall_drop(before: Sequence[Mapping], after: Sequence[Mapping], targets: Sequence[Mapping],
                          class_ids: Sequence[int], score_thresh: float = MODEL_SCORE_THRESH, samples: int = 200,
                          seed: int = 0) -> dict[int, float]:
    """``bootstrap_ap_drop`` for ``recall_at``: the standard deviation of recall(before) - recall(after)
    per class over paired bootstrap resamples of the images."""
    if not (len(before) == len(after) == len(targets)):
        raise ValueError(f"{len(before)}, {len(after)} and {len(targets)} predictions/targets: not aligned")
    rng = np.random.default_rng(seed)
    n = len(targets)
    (det_before, gt), (det_after, _) = _flatten(before, targets, False), _flatten(after, targets, False)
    counts = {int(c): (_counts_at(det_before, gt, n, int(c), score_thresh)[::2],
                       _counts_at(det_after, gt, n, int(c), score_thresh)[::2]) for c in class_ids}
    drops: dict[int, list[float]] = {c: [] for c in counts}
    for _ in range(samples):
        copies = np.bincount(rng.integers(0, n, size=n), minlength=n)
        for c, ((hits_b, positives), (hits_a, _)) in counts.items():
            npos = int(copies @ positives)
            if npos > 0:
                drops[c].append(float(copies @ hits_b - copies @ hits_a) / npos)
    return {c: float(np.std(values, ddof=1)) if len(values) > 1 else math.nan for c, values in drops.items()}


def bootstrap_mean_ap_change(before: Sequence[Mapping], after: Sequence[Mapping], targets: Sequence[Mapping],
                             class_ids: Sequence[int], samples: int = 200, seed: int = 0) -> float:
    """Standard deviation of the mean over ``class_ids`` of AP(after) - AP(before) over ``samples``
    paired bootstrap resamples of the images (``bootstrap_ap_drop``'s resampling, one resample shared by
    every class): how much a client's knowledge gain, measured on this image set, moves by chance.
    A class without positives in a resample is left out of that resample's mean."""
    if not (len(before) == len(after) == len(targets)):
        raise ValueError(f"{len(before)}, {len(after)} and {len(targets)} predictions/targets: not aligned")
    rng = np.random.default_rng(seed)
    n = len(targets)
    (det_before, gt), (det_after, _) = _flatten(before, targets, False), _flatten(after, targets, False)
    ranked = [(_ranked_outcomes(det_before, gt, n, int(c)), _ranked_outcomes(det_after, gt, n, int(c)))
              for c in class_ids]
    means = []
    for _ in range(samples):
        copies = np.bincount(rng.integers(0, n, size=n), minlength=n)
        changes = []
        for (images_b, outcomes_b, positives), (images_a, outcomes_a, _) in ranked:
            npos = int(copies @ positives)
            if npos > 0:
                changes.append(_resampled_ap(images_a, outcomes_a, copies, npos)
                               - _resampled_ap(images_b, outcomes_b, copies, npos))
        if changes:
            means.append(float(np.mean(changes)))
    return float(np.std(means, ddof=1)) if len(means) > 1 else math.nan
