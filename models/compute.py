"""How the detectors' arithmetic runs: the backbone body's precision, its tensor layout, and the
device training and evaluation run on.

Both are settings of execution, not of the model. They change no weight's dtype: parameters,
gradients, optimiser state, losses, deltas, verification and AP stay float32 whatever is set; only
the body's convolutions run in bfloat16 under ``torch.autocast`` (``models.ladder.LadderBody``),
and their outputs are float32 again before the neck.

* ``precision``: "float32" | "bfloat16" | "auto". bfloat16 applies to the bodies where it pays: the
  ResNet bodies (dense 3x3 convolutions, which oneDNN runs in bfloat16 on CPUs with AVX-512 BF16 or
  AMX). MobileNetV2's depthwise convolutions have no faster bfloat16 kernel there (an edge training
  step took longer in bfloat16 than in float32, ``python -m bench.step_time``), so the edge's body
  stays float32. "auto": bfloat16 where the CPU (or a CUDA device) supports it, else float32.
* ``channels_last``: the body's input is made channels-last (NHWC), so every convolution, norm and
  pooling after it runs in that layout (oneDNN's preferred one on the CPU).

The setting is a context, like ``torch.autocast`` itself and the thread count: a run enters it once
(``computing``) around the work that must honour it, and every model forward inside picks it up.
The device is a context too (``placed_on``): models live on the CPU between phases (weights travel
as CPU tensors), and ``distill.trainer.train`` and ``evaluation.ap.predict`` move a model to the
block's device for their work and back afterwards (``work_device``; outside a block: where the model is).
"""

from __future__ import annotations

import contextvars
import functools
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("float32", "bfloat16", "auto")
LAYOUTS = ("nchw", "channels-last")


@dataclass(frozen=True)
class Compute:
    precision: str = "float32"  # PRECISIONS; "auto" is resolved per process (``resolved``)
    layout: str = "nchw"  # LAYOUTS

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")

    @property
    def is_default(self) -> bool:
        return self == FLOAT32

    def resolved(self, device: str = "cpu") -> "Compute":
        """The same setting with "auto" replaced by what this machine supports."""
        if self.precision != "auto":
            return self
        return Compute("bfloat16" if supports_bfloat16(device) else "float32", self.layout)

    @property
    def body_dtype(self) -> torch.dtype | None:
        """The autocast dtype of a body that has fast bfloat16 kernels (None: float32 as stored)."""
        if self.precision == "auto":
            raise ValueError("resolve precision 'auto' first (Compute.resolved)")
        return torch.bfloat16 if self.precision == "bfloat16" else None

    def to_dict(self) -> dict:
        return {"precision": self.precision, "layout": self.layout}


FLOAT32 = Compute()
_current: contextvars.ContextVar[Compute] = contextvars.ContextVar("compute", default=FLOAT32)


def current_compute() -> Compute:
    """The setting the models run under here (``FLOAT32`` outside any ``computing`` block)."""
    return _current.get()


@contextmanager
def computing(compute: Compute, device: str = "cpu"):
    """Runs the block with ``compute`` ("auto" resolved for ``device``), then restores the previous one."""
    token = _current.set(compute.resolved(device))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


_placement: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar("placement", default=None)


@contextmanager
def placed_on(device: str | torch.device | None):
    """Runs the block's training and evaluation on ``device`` (None: each model where it is)."""
    token = _placement.set(torch.device(device) if device is not None else None)
    try:
        yield
    finally:
        _placement.reset(token)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where ``model``'s weights are (the CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def work_device(model: torch.nn.Module) -> torch.device:
    """Where ``model`` trains and evaluates: the enclosing ``placed_on`` block's device, else its own."""
    placed = _placement.get()
    return placed if placed is not None else model_device(model)


def supports_bfloat16(device: str = "cpu") -> bool:
    """Whether ``device`` has native bfloat16 arithmetic: a CUDA device that reports it, or a CPU with
    AVX-512 BF16 or AMX (read from torch's CPU probe, else from /proc/cpuinfo's flags)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return _cpu_has_bfloat16()


@functools.cache
def _cpu_has_bfloat16() -> bool:
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    if probes:
        return any(p() for p in probes)
    flags = {flag for line in _cpuinfo("flags") for flag in line.split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def cpu_model() -> str:
    """This machine's CPU model, with its family and model numbers where /proc/cpuinfo has them: float32 kernels
    differ by the CPU's make and model, so the same seed trains other weights on another (two AMD EPYCs named
    alike, of family 25 models 1 and 17, build two chains: README, "Profiles and costs")."""
    names = _cpuinfo("model name")
    if not names:
        return platform.processor() or platform.machine() or "unknown"
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    return f"{names[0]} (family {family[0]}, model {model[0]})" if family and model else names[0]


def _cpuinfo(field: str) -> list[str]:
    """The values of ``field`` in /proc/cpuinfo, one per processor (none where the file does not exist)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field]
