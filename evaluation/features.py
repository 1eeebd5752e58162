"""Detections of many neck/head variants of one detector, with its frozen body run once.

Verification evaluates a candidate tutor per client delta, and every candidate differs from the
tutor only in its neck and head (eq. 10): the backbone body is frozen for the whole federation.
``BodyFeatureCache`` runs the body over a data set once and keeps its feature maps; ``predict``
then runs only the rest of torchvision's FCOS inference path (FPN, head, anchors, box decoding,
NMS) for each candidate, and gives the same detections as ``evaluation.ap.predict``.

Memory: the body's output maps of every image (``nbytes``); at the cpu profile's 128 px, about
0.23 MB per image (448 validation images: about 100 MB).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from data.voc import collate_detection
from models.io import state_fingerprint


def body_fingerprint(model: nn.Module) -> str:
    """A hash of the backbone body's weights and buffers: which body the cached features came from."""
    return state_fingerprint(model.backbone.body.state_dict())


class FeaturesTooLarge(MemoryError):
    """The body's features of a data set would not fit the memory allowed for them."""


class BodyFeatureCache:
    """The body's feature maps of every image of ``dataset`` for detectors sharing ``model``'s body.

    Args:
        model: a torchvision FCOS (``models.ladder.build_model``); only its transform and body are used.
        dataset: (image, target) items, evaluated in data order.
        batch_size: images per batch (the same batches are replayed by ``predict``).
        max_bytes: ``FeaturesTooLarge`` is raised (after the first batch) when the whole set's
            features would take more memory than this.
    """

    def __init__(self, model: nn.Module, dataset, batch_size: int = 16, max_bytes: int = 2 * 10**9) -> None:
        self.fingerprint = body_fingerprint(model)
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

    def predict(self, model: nn.Module) -> tuple[list[dict], list[dict]]:
        """``evaluation.ap.predict(model, dataset)`` for a model with the cached body."""
        from torchvision.models.detection.image_list import ImageList

        if body_fingerprint(model) != self.fingerprint:
            raise ValueError("this model's backbone body differs from the one the features were computed with")
        predictions: list[dict] = []
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for image_sizes, shape, original, body in self.batches:
                    features = list(model.backbone.fpn(body).values())
                    head_outputs = model.head(features)
                    # The anchor generator reads only the padded batch's size, dtype and device.
                    images = ImageList(torch.empty(shape, dtype=features[0].dtype), image_sizes)
                    anchors = model.anchor_generator(images, features)
                    per_level = [f.size(2) * f.size(3) for f in features]
                    split_outputs = {k: list(v.split(per_level, dim=1)) for k, v in head_outputs.items()}
                    split_anchors = [list(a.split(per_level)) for a in anchors]
                    detections = model.postprocess_detections(split_outputs, split_anchors, image_sizes)
                    detections = model.transform.postprocess(detections, image_sizes, original)
                    predictions.extend({k: d[k].detach().cpu() for k in ("boxes", "scores", "labels")}
                                       for d in detections)
        finally:
            model.train(was_training)
        return predictions, list(self.targets)
