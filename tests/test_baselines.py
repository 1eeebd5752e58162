"""The FedAvg family's new baselines: fedavgm, fedadam, fedavg_ls and fedavg_ft.

* the label-skew mask of fedavg_ls (``distill.trainer.ClassMask``), without Flower;
* ``make_strategy`` builds each with the configured hyperparameters;
* FedAvgM / FedAdam step only the parameters and keep the BatchNorm buffers as FedAvg averages them,
  and their server-optimiser state survives a checkpoint (fake replies, no Flower runtime);
* one smoke Flower simulation of all four methods (2 clients, 1 round).
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from data.voc import CLASS_INDEX
from data.workspace import prepare
from distill.rd import RDSettings, direct_training
from distill.trainer import ClassMask
from models.ladder import build_model, detection_losses, get_profile, neck_features
from protocol.config import resolve_run_config
from protocol.wire import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID

CLS = "head.classification_head.cls_logits"
NEW = ("fedavgm", "fedadam", "fedavg_ls", "fedavg_ft")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("baselines-cache")


@pytest.fixture(scope="module")
def ws(cache):
    return prepare("smoke", "default8", num_clients=2, seed=0, cache_dir=cache)


# -- (a) fedavg_ls: only the client's own classes' scores train ---------------------------------------


def own_classes(ws, partition: int) -> tuple[int, ...]:
    return tuple(CLASS_INDEX[c] for c in ws.clients[partition].train_classes)


def test_the_client_data_holds_only_its_own_labels_in_the_models_label_space(ws):
    """The mask indexes logits by label: a client's training labels are its classes' CLASS_INDEX."""
    data, own = ws.client_train(0), set(own_classes(ws, 0))
    labels = {int(label) for i in range(len(data)) for label in data[i][1]["labels"]}
    assert labels and labels <= own
    model = build_model("smoke", "edge")
    assert model.head.classification_head.cls_logits.out_channels == len(CLASS_INDEX)


def test_class_mask_stops_the_gradient_of_the_other_classes_scores(ws):
    data = ws.client_train(0)
    model = build_model("smoke", "edge", seed=0).train()
    own = own_classes(ws, 0)
    others = [c for c in range(len(CLASS_INDEX)) if c not in own]
    images, targets = zip(*[data[i] for i in range(4)])
    targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    mask = ClassMask(model, own)
    try:
        image_list, targets = model.transform(list(images), targets)
        sum(detection_losses(model, image_list, targets, neck_features(model, image_list.tensors)).values()).backward()
    finally:
        mask.remove()
    layer = model.head.classification_head.cls_logits
    for grad in (layer.weight.grad, layer.bias.grad):
        assert torch.count_nonzero(grad[others]) == 0
        assert all(torch.count_nonzero(grad[c]) > 0 for c in own)
    assert not model.head.classification_head._forward_hooks  # removed


def test_label_skew_training_leaves_the_other_classes_rows_unchanged(ws):
    data = ws.client_train(0)
    edge = build_model("smoke", "edge", seed=0)
    settings = RDSettings.from_profile(get_profile("smoke"))
    own = own_classes(ws, 0)
    others = [c for c in range(len(CLASS_INDEX)) if c not in own]
    before = {k: v.clone() for k, v in edge.state_dict().items()}
    masked, _ = direct_training(edge, data, 3, settings, seed=0, trained_classes=own)
    plain, _ = direct_training(edge, data, 3, settings, seed=0)
    for suffix in ("weight", "bias"):
        key = f"{CLS}.{suffix}"
        assert torch.equal(masked.state_dict()[key][others], before[key][others])  # neither up nor down
        assert all(not torch.equal(masked.state_dict()[key][c], before[key][c]) for c in own)  # trained
        assert not torch.equal(plain.state_dict()[key][others], before[key][others])  # without the mask they move
    assert not masked.head.classification_head._forward_hooks
    # the rest of the model trains as usual
    assert not torch.equal(masked.state_dict()["head.regression_head.bbox_reg.weight"],
                           before["head.regression_head.bbox_reg.weight"])
