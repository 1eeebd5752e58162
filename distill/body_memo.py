"""The frozen tutor body's outputs per image, for a client's phases that run the same body.

RD Tutor 1 and Tutor 2 train the tutor's neck/head on its frozen backbone body, and Distill C runs the
updated tutor (the same body: eq. 10 moves only neck/head) as its teacher. Every image is resized to
the profile's square and the only augmentation is a horizontal flip, so the body's output for an
(image, flip) pair never changes within a run. ``BodyMemo`` keeps those outputs per image: a phase
looks up each image of its batch and runs the body only on the images it does not hold.

Two lifetimes (``RunConfig.body_cache``):

* ``round`` (default): Tutor 2 records, Distill C reads. Distill C draws the client's data in Tutor 2's
  order, so its first ``rd_iters`` batches are Tutor 2's (a quarter of its body passes).
* ``run``: every phase records and the client keeps what it computed on its disk from round to round
  (``clients.store``), so from about the fifth round on the body runs on hardly any image
  (``bench.feature_reuse``, ``across_rounds``). About 0.23 MB per (image, flip) in the cpu profile,
  up to about 290 MB per client in the default scenario.

A hit returns exactly what the body would compute. An image is found by its input's bytes, the body's
weights (``body_key``), the thread count and the compute setting (``models.compute``), and the body's
forward is deterministic for the same bits (BatchNorm in eval mode, no dropout). Images of one batch
do not influence each other, and a batch of two or more gives each image the same bits as a batch of
eight (a batch of one runs other kernels: ``tests/test_distill.py`` checks both on the machine that
runs the tests). So the images a batch misses run as a batch of at least two (one missing image runs
with a neighbour), and a batch of one never uses the memo: reusing it changes no figure.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor, nn

from models.compute import current_compute
from models.io import body_fingerprint

Levels = OrderedDict[str, Tensor]  # one image's body outputs, level name -> [C, H, W]


def input_key(x: Tensor) -> str:
    """The memo key of an input: its shape, dtype, bytes, the torch thread count and the compute
    setting (``models.compute``: the body's precision and layout change its outputs)."""
    digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes())
    compute = current_compute()
    return (f"{tuple(x.shape)}:{x.dtype}:{torch.get_num_threads()}:{compute.precision}:{compute.layout}:"
            f"{digest.hexdigest()}")


def image_keys(x: Tensor) -> list[str]:
    """The memo key of each image of a batch ``x`` [N, C, H, W]."""
    return [input_key(x[i:i + 1]) for i in range(x.shape[0])]


class BodyMemo:
    """Backbone-body outputs per image, for one body (``body_key``, ``body_fingerprint``).

    ``recording``: whether ``body_outputs`` keeps what it computes (in ``outputs``) or only reads.
    ``earlier``: a lookup of outputs kept on disk by earlier messages (key -> levels or None;
    ``clients.store.open_body_cache``); what it serves is not kept again.
    """

    def __init__(self, body_key: str, recording: bool = True,
                 earlier: Callable[[str], Levels | None] | None = None) -> None:
        self.body_key = body_key
        self.recording = recording
        self.earlier = earlier
        self.outputs: dict[str, Levels] = {}
        self.hits = 0  # batches served whole
        self.images_served = 0
        self.images_computed = 0

    @classmethod
    def for_model(cls, model: nn.Module, recording: bool = True) -> "BodyMemo":
        return cls(body_fingerprint(model), recording)

    def serves(self, model: nn.Module) -> bool:
        """Whether ``model``'s body is the one these outputs came from."""
        return body_fingerprint(model) == self.body_key

    def _find(self, key: str) -> Levels | None:
        found = self.outputs.get(key)
        if found is None and self.earlier is not None:
            found = self.earlier(key)
        return found

    def body_outputs(self, model: nn.Module, x: Tensor) -> OrderedDict[str, Tensor]:
        """``model.backbone.body(x)`` (no gradient: the body is frozen), with the images the memo holds
        served from it."""
        if x.shape[0] < 2:  # a batch of one computes other bits than the batches the memo holds
            with torch.no_grad():
                return model.backbone.body(x)
        keys = image_keys(x)
        rows = [self._find(key) for key in keys]
        missing = [i for i, row in enumerate(rows) if row is None]
        run = sorted({missing[0], (missing[0] + 1) % len(keys)}) if len(missing) == 1 else missing
        if run:
            with torch.no_grad():
                out = model.backbone.body(x[run])
            for j, i in enumerate(run):
                if rows[i] is None:
                    rows[i] = OrderedDict((level, t[j]) for level, t in out.items())
                    if self.recording:
                        self.outputs[keys[i]] = rows[i]
            if len(run) == len(keys):  # nothing served: the batch's own tensors, no copy
                self.images_computed += len(keys)
                return out
        self.hits += not missing
        self.images_served += len(keys) - len(missing)
        self.images_computed += len(run)
        # in the memory format the body would have returned (channels-last: the layers after it keep it)
        fmt = torch.channels_last if current_compute().layout == "channels-last" else torch.contiguous_format
        return OrderedDict((level, torch.stack([row[level].to(x.device) for row in rows])
                            .contiguous(memory_format=fmt)) for level in rows[0])

    def neck_features(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """``models.ladder.neck_features(model, x)`` with the body's outputs from ``body_outputs``."""
        return list(model.backbone.fpn(self.body_outputs(model, x)).values())

    # -- to and from a flat tensor dict (clients.store keeps it on the client's disk) --

    def to_tensors(self) -> dict[str, Tensor]:
        """The recorded outputs as "key|level" -> tensor (each its own contiguous copy, on the CPU)."""
        return {f"{key}|{level}": t.cpu().contiguous().clone() for key, out in self.outputs.items()
                for level, t in out.items()}

    @classmethod
    def from_tensors(cls, body_key: str, tensors: dict[str, Tensor], recording: bool = False) -> "BodyMemo":
        memo = cls(body_key, recording)
        for name in sorted(tensors, key=split_name):
            key, level = split_name(name)
            memo.outputs.setdefault(key, OrderedDict())[level] = tensors[name]
        return memo


def split_name(name: str) -> tuple[str, str]:
    """"key|level" -> (key, level), in the body's level order when sorted ("0", "1", "2")."""
    key, level = name.rsplit("|", 1)
    return key, level
