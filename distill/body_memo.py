"""The frozen tutor body's outputs of batches that two of a client's phases both run.

RD Tutor 2 trains the tutor's neck/head on its frozen backbone body, and Distill C runs the updated
tutor (the same body) as its teacher. Both walk the client's data in the same order (``distill.rd``),
so Distill C's first ``rd_iters`` batches are Tutor 2's and the body would compute the same outputs
twice. ``BodyMemo`` keeps them: Tutor 2 records the body's outputs per batch, Distill C looks each of
its batches up and runs the body only on a miss.

A batch is found by the bytes of its input, the body's weights (``body_key``), the thread count and the
compute setting (``models.compute``), so a hit returns exactly what the body would compute (its forward
is deterministic for the same input bits, weights, threads and setting: BatchNorm in eval mode, no
dropout): reusing it changes no figure. A
batch of 8 at 128 px holds 1.8 MB of body outputs in the cpu profile; Tutor 2's 12 batches 22 MB.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from torch import Tensor, nn

from models.compute import current_compute
from models.io import body_fingerprint


def input_key(x: Tensor) -> str:
    """The memo key of an input batch: its shape, dtype, bytes, the torch thread count and the compute
    setting (``models.compute``: the body's precision and layout change its outputs)."""
    digest = hashlib.sha1(x.detach().cpu().contiguous().numpy().tobytes())
    compute = current_compute()
    return (f"{tuple(x.shape)}:{x.dtype}:{torch.get_num_threads()}:{compute.precision}:{compute.layout}:"
            f"{digest.hexdigest()}")


class BodyMemo:
    """Backbone-body outputs per input batch, for one body (``body_key``, ``body_fingerprint``).

    ``recording``: whether ``body_outputs`` stores what it computes (Tutor 2) or only reads (Distill C).
    """

    def __init__(self, body_key: str, recording: bool = True) -> None:
        self.body_key = body_key
        self.recording = recording
        self.outputs: dict[str, OrderedDict[str, Tensor]] = {}
        self.hits = 0

    @classmethod
    def for_model(cls, model: nn.Module, recording: bool = True) -> "BodyMemo":
        return cls(body_fingerprint(model), recording)

    def serves(self, model: nn.Module) -> bool:
        """Whether ``model``'s body is the one these outputs came from."""
        return body_fingerprint(model) == self.body_key

    def body_outputs(self, model: nn.Module, x: Tensor) -> OrderedDict[str, Tensor]:
        """``model.backbone.body(x)`` (no gradient: the body is frozen), from the memo when it holds x."""
        key = input_key(x)
        if key in self.outputs:
            self.hits += 1
            return self.outputs[key]
        with torch.no_grad():
            out = model.backbone.body(x)
        if self.recording:
            self.outputs[key] = out
        return out

    def neck_features(self, model: nn.Module, x: Tensor) -> list[Tensor]:
        """``models.ladder.neck_features(model, x)`` with the body's outputs from ``body_outputs``."""
        return list(model.backbone.fpn(self.body_outputs(model, x)).values())

    # -- to and from a flat tensor dict (clients.store keeps it between a client's two messages) --

    def to_tensors(self) -> dict[str, Tensor]:
        return {f"{key}|{level}": t.contiguous() for key, out in self.outputs.items() for level, t in out.items()}

    @classmethod
    def from_tensors(cls, body_key: str, tensors: dict[str, Tensor], recording: bool = False) -> "BodyMemo":
        memo = cls(body_key, recording)
        for name in sorted(tensors, key=lambda n: (n.rsplit("|", 1)[0], int(n.rsplit("|", 1)[1]))):
            key, level = name.rsplit("|", 1)  # the body's levels in order: "0", "1", "2"
            memo.outputs.setdefault(key, OrderedDict())[level] = tensors[name]
        return memo
