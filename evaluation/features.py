"""Detections of many neck/head variants of one detector, with its frozen body run once.

Verification evaluates a candidate tutor per client delta, and every candidate differs from the
tutor only in its neck and head (eq. 10): the backbone body is frozen for the whole federation.
``EvaluationFeatures`` runs the body over a data set once and keeps its feature maps; ``predict``
then runs only the rest of torchvision's FCOS inference path (FPN, head, anchors, box decoding,
NMS) for each candidate, and gives the same detections as ``evaluation.ap.predict``, bit for bit.

What ``predict`` does differently from torchvision's path, each with the same result:

* the body check compares the candidate's body tensors with the cached body's bit by bit (a
  memory compare of its 44 MB, a few times cheaper than hashing them, ``body_fingerprint``);
* anchors are computed once per padded batch shape and anchor setting (all they depend on);
* the boxes of a batch's candidates are decoded and clipped in one call (elementwise arithmetic:
  the same figures as per image and level);
* NMS stops once it has ``detections_per_img`` boxes (``batched_nms_first``): greedy NMS decides a
  box from the higher-scored boxes only, so the first boxes it keeps among the top-scored prefix
  are the first it keeps among all (full NMS took a quarter of the replay's time: about 600
  candidates per image, 350 kept, of which the first 100 are found among the top 200 or so).

Memory: the body's output maps of every image (``nbytes``); at the cpu profile's 128 px, about
0.23 MB per image (448 validation images: about 100 MB). The cache also holds references to the
body's tensors (no copy) for the check.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from data.voc import collate_detection
from models.compute import current_compute
from models.io import body_fingerprint

# torchvision.ops.batched_nms runs one NMS per class above this many box coordinates on the CPU
# (torchvision 0.29, _batched_nms_vanilla) and the offset-coordinates NMS below it.
_VANILLA_NMS_ABOVE = 4000


def _bits(t: Tensor) -> Tensor:
    """``t``'s storage as integers, so that equality is bit equality (NaN == NaN, -0.0 != 0.0)."""
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


class FeaturesTooLarge(MemoryError):
    """The body's features of a data set would not fit the memory allowed for them."""


def batched_nms_first(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, count: int) -> Tensor:
    """``torchvision.ops.batched_nms(boxes, scores, labels, iou_threshold)[:count]``, without running NMS
    past the ``count``-th kept box.

    boxes [N, 4], scores [N], labels [N] -> int64 indices [<= count], by decreasing score.
    Greedy NMS keeps or drops a box by the boxes ranked above it only, so NMS over the ``p``
    top-scored boxes keeps exactly the boxes that full NMS keeps among them; when that is at least
    ``count`` boxes, they are the answer (else ``p`` doubles). The boxes are offset per class as
    ``batched_nms`` does, by the maximum over all N boxes, so every IoU is computed from the same
    floats; the ranking is the same stable sort that torchvision's NMS kernel does.
    """
    if boxes.numel() > _VANILLA_NMS_ABOVE or boxes.device.type != "cpu":  # another path: torchvision's own
        return box_ops.batched_nms(boxes, scores, labels, iou_threshold)[:count]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    # As torchvision.ops.boxes._batched_nms_coordinate_trick.
    offsets = labels.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    order = scores.sort(stable=True, descending=True)[1]
    prefix = 2 * count
    while True:
        top = order[:prefix]
        keep = top[box_ops.nms(boxes_for_nms[top], scores[top], iou_threshold)]
        if len(keep) >= count or prefix >= len(order):
            return keep[:count]
        prefix *= 2


def fcos_detections(model: nn.Module, head_outputs: dict[str, list[Tensor]], anchors: list[Tensor],
                    image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """``model.postprocess_detections`` (torchvision's FCOS) with the same detections, faster.

    head_outputs: {cls_logits, bbox_regression, bbox_ctrness} -> per level [N, HW_l, C | 4 | 1];
    anchors: per level [HW_l, 4], the same for every image of the batch.
    Scores, thresholds and top-k run per image and level exactly as torchvision runs them (ties and
    vectorised kernels see the same tensors); the kept boxes of the whole batch are decoded and
    clipped together; NMS stops at ``detections_per_img`` boxes (``batched_nms_first``).
    """
    num_levels = len(anchors)
    picked = []  # per image: (scores, labels, regression rows, anchor rows), each cat over levels
    for index in range(len(image_sizes)):
        scores, labels, regression, anchor_rows = [], [], [], []
        for level in range(num_levels):
            logits = head_outputs["cls_logits"][level][index]
            num_classes = logits.shape[-1]
            scores_per_level = torch.sqrt(torch.sigmoid(logits)
                                          * torch.sigmoid(head_outputs["bbox_ctrness"][level][index])).flatten()
            keep_idxs = scores_per_level > model.score_thresh
            scores_per_level = scores_per_level[keep_idxs]
            topk_idxs = torch.where(keep_idxs)[0]
            scores_per_level, idxs = scores_per_level.topk(min(model.topk_candidates, topk_idxs.size(0)))
            topk_idxs = topk_idxs[idxs]
            anchor_idxs = torch.div(topk_idxs, num_classes, rounding_mode="floor")
            scores.append(scores_per_level)
            labels.append(topk_idxs % num_classes)
            regression.append(head_outputs["bbox_regression"][level][index][anchor_idxs])
            anchor_rows.append(anchors[level][anchor_idxs])
        picked.append((torch.cat(scores), torch.cat(labels), torch.cat(regression), torch.cat(anchor_rows)))
    counts = [len(p[0]) for p in picked]
    boxes = model.box_coder.decode(torch.cat([p[2] for p in picked]), torch.cat([p[3] for p in picked]))
    if len(set(image_sizes)) == 1:
        per_image = box_ops.clip_boxes_to_image(boxes, image_sizes[0]).split(counts)
    else:
        per_image = [box_ops.clip_boxes_to_image(b, size) for b, size in zip(boxes.split(counts), image_sizes)]
    detections = []
    for (scores, labels, _, _), image_boxes in zip(picked, per_image):
        keep = batched_nms_first(image_boxes, scores, labels, model.nms_thresh, model.detections_per_img)
        detections.append({"boxes": image_boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return detections


class EvaluationFeatures:
    """The body's feature maps of every image of an evaluation set, in data order, for detectors sharing
    ``model``'s body (many candidates evaluated on one set; ``distill.body_memo.BodyMemo`` is the other
    cache of body outputs: per image, for the batches of a client's training phases).

    Args:
        model: a torchvision FCOS (``models.ladder.build_model``); only its transform and body are used.
        dataset: (image, target) items, evaluated in data order.
        batch_size: images per batch (the same batches are replayed by ``predict``).
        max_bytes: ``FeaturesTooLarge`` is raised (after the first batch) when the whole set's
            features would take more memory than this.
    """

    def __init__(self, model: nn.Module, dataset, batch_size: int = 16, max_bytes: int = 2 * 10**9) -> None:
        self.fingerprint = body_fingerprint(model)
        self.compute = current_compute()  # the body's outputs depend on its precision and layout
        # The body's own tensors (no copy) and their version counters: an in-place change shows.
        self._body = {k: v.detach() for k, v in model.backbone.body.state_dict().items()}
        self._versions = {k: v._version for k, v in self._body.items()}
        self._anchors: dict[tuple, list[Tensor]] = {}
        self.batches: list[tuple] = []  # (image sizes, padded batch shape, original sizes, body features)
        self.targets: list[dict] = []
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_detection)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for images, targets in loader:
                    images = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
                    original = [tuple(image.shape[-2:]) for image in images]
                    image_list, _ = model.transform(images, None)
                    body = model.backbone.body(image_list.tensors)
                    self.batches.append((image_list.image_sizes, image_list.tensors.shape, original,
                                         OrderedDict((k, v.clone()) for k, v in body.items())))
                    self.targets.extend(targets)
                    if len(self.batches) == 1 and self.nbytes * len(loader) > max_bytes:
                        raise FeaturesTooLarge(f"the body's features of {len(dataset)} images would take about "
                                               f"{self.nbytes * len(loader) / 1e6:.0f} MB (limit {max_bytes / 1e6:.0f} MB)")
        finally:
            model.train(was_training)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for *_, body in self.batches for t in body.values())

    def same_body(self, model: nn.Module) -> bool:
        """Whether ``model``'s body holds, bit for bit, the weights and buffers the features came from."""
        state = model.backbone.body.state_dict()
        if state.keys() != self._body.keys():
            return False
        if any(v._version != self._versions[k] for k, v in self._body.items()):
            # the cached body was changed in place since: only the hash of the original is left
            return body_fingerprint(model) == self.fingerprint
        for name, tensor in state.items():
            ours = self._body[name]
            if tensor.data_ptr() == ours.data_ptr() and tensor.shape == ours.shape and tensor.stride() == ours.stride():
                continue  # the very same tensor
            if tensor.shape != ours.shape or tensor.dtype != ours.dtype or not torch.equal(_bits(tensor), _bits(ours)):
                return False
        return True

    def _batch_anchors(self, model: nn.Module, image_sizes, shape, features: list[Tensor]) -> list[Tensor]:
        """One image's anchors per level (every image of a padded batch has the same), computed once
        per anchor generator setting, batch shape and feature map sizes."""
        generator = model.anchor_generator
        key = (tuple(generator.sizes), tuple(generator.aspect_ratios), tuple(shape[-2:]),
               tuple(tuple(f.shape[-2:]) for f in features), features[0].dtype)
        if key not in self._anchors:
            # The anchor generator reads only the padded batch's size, dtype and device.
            images = ImageList(torch.empty((1, *shape[1:]), dtype=features[0].dtype), image_sizes[:1])
            anchors = generator(images, [f[:1] for f in features])[0]
            self._anchors[key] = list(anchors.split([f.size(2) * f.size(3) for f in features]))
        return self._anchors[key]

    def class_patches(self, model: nn.Module) -> dict[str, Tensor]:
        """What feeds each class's row of the classification layer where the model scores that class highest.

        Per validation image and class c: the location (any FPN level) of the image's top class-c logit,
        and there the 3x3 patch of the classification tower's output that row c of ``cls_logits``
        [K, C, 3, 3] reads. A change (dW_c, db_c) of that row moves that logit by patch . dW_c + db_c,
        linear in the patch, so the mean over images needs only the mean patch. Returns
        ``positive`` [K, C*9]: the mean patch over the images whose targets hold class c (the
        detection a product would fire for them), ``negative`` [K, C*9]: over the other images (its
        top false alarm), and their image counts [K] (a class without images has zeros)."""
        if not self.same_body(model):
            raise ValueError("this model's backbone body differs from the one the features were computed with")
        head = model.head.classification_head
        rows = head.cls_logits.out_channels
        sums = {"positive": None, "negative": None}
        counts = {"positive": torch.zeros(rows), "negative": torch.zeros(rows)}
        targets = iter(self.targets)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for _, _, _, body in self.batches:
                    towers = [head.conv(x) for x in model.backbone.fpn(body).values()]  # [B, C, H, W] per level
                    logits = torch.cat([head.cls_logits(t).flatten(2) for t in towers], dim=2)  # [B, K, N]
                    patches = torch.cat([nn.functional.unfold(t, 3, padding=1) for t in towers], dim=2)  # [B, C*9, N]
                    top = logits.argmax(dim=2)  # [B, K]
                    at_top = patches.gather(2, top.unsqueeze(1).expand(-1, patches.size(1), -1)).transpose(1, 2)
                    holds = torch.zeros(top.shape, dtype=torch.bool)  # [B, K]
                    for b in range(top.size(0)):
                        labels = next(targets)["labels"].long()
                        holds[b, labels[(labels >= 0) & (labels < rows)]] = True
                    for name, mask in (("positive", holds), ("negative", ~holds)):
                        added = (at_top.float() * mask.unsqueeze(2)).sum(0)  # [K, C*9]
                        sums[name] = added if sums[name] is None else sums[name] + added
                        counts[name] += mask.sum(0)
        finally:
            model.train(was_training)
        out = {f"{name}_count": counts[name] for name in counts}
        for name, total in sums.items():
            out[name] = total / counts[name].clamp(min=1).unsqueeze(1)
        return out

    def predict(self, model: nn.Module) -> tuple[list[dict], list[dict]]:
        """``evaluation.ap.predict(model, dataset)`` for a model with the cached body."""
        if not self.same_body(model):
            raise ValueError("this model's backbone body differs from the one the features were computed with")
        if current_compute() != self.compute:
            raise ValueError(f"the features were computed with {self.compute}, this model runs with {current_compute()}")
        predictions: list[dict] = []
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for image_sizes, shape, original, body in self.batches:
                    features = list(model.backbone.fpn(body).values())
                    head_outputs = model.head(features)
                    per_level = [f.size(2) * f.size(3) for f in features]
                    split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
                    anchors = self._batch_anchors(model, image_sizes, shape, features)
                    for d, size, size_original in zip(fcos_detections(model, split_outputs, anchors, image_sizes),
                                                      image_sizes, original):
                        # GeneralizedRCNNTransform.postprocess: a ratio of 1 leaves every box as it is
                        boxes = d["boxes"] if tuple(size) == tuple(size_original) else resize_boxes(
                            d["boxes"], size, size_original)
                        predictions.append({"boxes": boxes.cpu(), "scores": d["scores"].cpu(),
                                            "labels": d["labels"].cpu()})
        finally:
            model.train(was_training)
        return predictions, list(self.targets)
