"""One trainer for every phase: direct training, KD (big teaches small) and RD (small teaches big).

The loss of one step is the paper's eq. (8) in general form:

    L = label_weight * L_det(student, targets) + distill_weight * L_FGD(student, teacher)

* direct training: no teacher (distill_weight unused), targets are the data's labels;
* KD (Distill A / B / C): a larger teacher, label_weight 1 as in FGD;
* RD (tutor 1 / tutor 2): the small edge model is the teacher, label_weight close to 0.

``targets`` may also be the teacher's own detections ("pseudo labels"), so a student can learn a
detection head from a teacher without ever seeing the data's labels (a Distill C option).

L_FGD is any feature-distillation loss of ``distill.fgd`` (``Phase.distill_loss``: FGD or PKD), and
its weight relative to the detection loss is a setting (``Phase.balance``), see :class:`LossBalance`.
Every step records the detection loss and the weighted distillation term separately; their ratio
(distillation term / unweighted detection loss) is what the phase reports.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from distill.fgd import FGDConfig, make_distill_loss
from distill.scores import class_score_distillation
from models.compute import model_device, work_device
from models.io import save_weights
from models.ladder import STRIDES, detection_losses, neck_features
from models.parts import part_modules

if TYPE_CHECKING:
    from distill.body_memo import BodyMemo


# A field added after the chain's cache keys were fixed: ``Phase.to_dict`` (a cache key's part) leaves it
# out while it holds its default, so every cache built before it keeps its key.
LATER = {"later": True}


@dataclass
class Phase:
    """Everything that determines one training phase (and nothing that does not)."""

    name: str
    iters: int
    batch_size: int
    lr: float = 0.01
    optimizer: str = "sgd"  # "sgd" (momentum 0.9) or "adamw"
    label_weight: float = 1.0  # eq. (8): weight of the detector's own loss
    distill_weight: float = 1.0  # eq. (8): weight of the distillation loss (needs a teacher)
    distill_loss: str = "fgd"  # "fgd" (the paper's, eqs. 3-6) or "pkd" (standardised features)
    balance: str = "fixed"  # "fixed" | "calibrated" | "auto": see LossBalance
    target_ratio: float = 1.0  # calibrated / auto: distillation term / detection loss
    fgd: FGDConfig = field(default_factory=FGDConfig)
    pkd_weight: float = 6.0  # PKD loss weight (the PKD paper uses 6-10 per level)
    clip_norm: float = 35.0  # gradient clipping, as every FGD reference config
    freeze: tuple[str, ...] = ()  # parts kept fixed: any of "backbone", "neck", "head"
    targets: str = "labels"  # "labels" (the data's) or "teacher" (teacher detections, score >= pseudo_thresh)
    pseudo_thresh: float = 0.4
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 (needs reference weights)
    warmup_iters: int = 50
    weight_decay: float = 1e-4
    hflip: bool = True
    seed: int = 0
    # BatchNorm layers keep their running statistics (eval mode) while the weights train: a client's
    # few hundred images in batches of 8 would otherwise replace the statistics the model was trained with.
    freeze_norm: bool = field(default=False, metadata=LATER)
    # Label-skew-aware training (fedavg_ls): the model's label indices (``data.voc.CLASS_INDEX``, the
    # classification layer's rows) whose class scores train; every other class's score gets no gradient
    # and its rows of the classification layer stay as they were (``ClassMask``). None: every class trains.
    trained_classes: tuple[int, ...] | None = field(default=None, metadata=LATER)
    # Soft targets of the teacher's class scores (``distill.scores``) on these label indices, added to
    # the loss with this weight (needs a teacher with the student's strides). 0: off.
    score_weight: float = field(default=0.0, metadata=LATER)
    score_classes: tuple[int, ...] = field(default=(), metadata=LATER)

    def to_dict(self) -> dict:
        out = asdict(self)
        for f in fields(self):
            if f.metadata.get("later") and getattr(self, f.name) == f.default:
                del out[f.name]
        return out


@dataclass(frozen=True)
class KDRecipe:
    """How a larger model teaches a smaller one (Distill A, B and C): the settings the README measures.

    distill_loss: "fgd" (the paper's FGD, eqs. 3-6) or "pkd" (standardised features).
    balance / target_ratio: see :class:`LossBalance`.
    inherit: the student starts from its teacher's neck and head where shapes allow.
    """

    distill_loss: str = "pkd"
    balance: str = "auto"
    target_ratio: float = 1.0
    inherit: bool = True

    def phase_fields(self) -> dict:
        return {"distill_loss": self.distill_loss, "balance": self.balance, "target_ratio": self.target_ratio}

    def to_dict(self) -> dict:
        return asdict(self)


PAPER_FGD = KDRecipe(distill_loss="fgd", balance="fixed", target_ratio=1.0, inherit=False)  # as the paper


@dataclass
class PhaseReport:
    name: str
    iters: int
    seconds: float
    peak_rss_mb: float  # peak resident memory of this process up to the phase's end (CPU)
    peak_cuda_mb: float
    first_loss: float
    last_loss: float  # mean over the last 10% of steps
    losses: list[float]
    det_losses: list[float] = field(default_factory=list)  # unweighted detection loss per step
    distill_losses: list[float] = field(default_factory=list)  # distillation term as in the loss
    device: str = "cpu"
    score_losses: list[float] = field(default_factory=list)  # class-score distillation, unweighted
    # CPU seconds of this process (all its threads) over the phase: the work, whatever else shares the
    # machine; ``seconds`` is wall time and grows with the machine's load
    cpu_seconds: float = float("nan")

    def _head_tail(self, values: list[float]) -> tuple[float, float]:
        """Mean of the first and of the last 10% of steps (NaN when empty)."""
        if not values:
            return float("nan"), float("nan")
        k = max(len(values) // 10, 1)
        return sum(values[:k]) / k, sum(values[-k:]) / k

    def balance(self) -> dict:
        """Detection loss, distillation term and their ratio at the start and the end of the phase."""
        det0, det1 = self._head_tail(self.det_losses)
        dis0, dis1 = self._head_tail(self.distill_losses)
        ratio = lambda d, x: d / x if x == x and x > 0 and d == d else float("nan")  # noqa: E731
        return {"det_loss_start": det0, "det_loss_end": det1, "distill_loss_start": dis0,
                "distill_loss_end": dis1, "loss_ratio_start": ratio(dis0, det0), "loss_ratio_end": ratio(dis1, det1)}

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("losses", "det_losses", "distill_losses")}
        return {**out, **self.balance()}


@contextmanager
def torch_threads(n: int):
    """Runs the block with ``n`` torch intra-op threads, then restores the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def lr_factor(step: int, phase: Phase) -> float:
    """The learning rate at ``step`` as a fraction of ``phase.lr``: linear warm-up, then cosine decay
    to zero (applied by torch's ``LambdaLR``)."""
    warm = min(phase.warmup_iters, max(phase.iters // 5, 1))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(phase.iters - warm, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def infinite_batches(dataset: Dataset, batch_size: int, generator: torch.Generator):
    """Yields lists of (image, target) forever, reshuffling each epoch with ``generator``."""
    n = len(dataset)
    if n == 0:
        raise ValueError("cannot train on an empty data set")
    while True:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield [dataset[i] for i in order[start:start + batch_size]]


def _flip(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


def _prepare(batch, phase: Phase, generator: torch.Generator):
    images, targets = [], []
    for image, target in batch:
        target = {"boxes": target["boxes"].float(), "labels": target["labels"].long()}
        if phase.hflip and torch.rand((), generator=generator) < 0.5:
            image, target = _flip(image, target)
        images.append(image)
        targets.append(target)
    return images, targets


@torch.no_grad()
def teacher_detections(teacher: nn.Module, image_list, score_thresh: float,
                       feats: list[Tensor] | None = None) -> list[dict]:
    """The teacher's detections on transformed images, as training targets in the same coordinates.

    ``feats``: the teacher's neck features of these images, if already computed.
    """
    feats = neck_features(teacher, image_list.tensors) if feats is None else feats
    head_outputs = teacher.head(feats)
    anchors = teacher.anchor_generator(image_list, feats)
    counts = [f.size(2) * f.size(3) for f in feats]
    split = {k: list(v.split(counts, dim=1)) for k, v in head_outputs.items()}
    split_anchors = [list(a.split(counts)) for a in anchors]
    dets = teacher.postprocess_detections(split, split_anchors, image_list.image_sizes)
    out = []
    for d in dets:
        keep = d["scores"] >= score_thresh
        boxes = d["boxes"][keep]
        valid = (boxes[:, 2] > boxes[:, 0] + 1) & (boxes[:, 3] > boxes[:, 1] + 1)
        out.append({"boxes": boxes[valid], "labels": d["labels"][keep][valid]})
    return out


def combined_loss(det_loss: Tensor, distill_loss: Tensor | None, label_weight: float, distill_weight: float,
                  balance_weight: float = 1.0) -> Tensor:
    """Eq. (8): ``label_weight * L_det + distill_weight * w * L_distill`` (``w`` from ``LossBalance``;
    eq. 7's RD term and Distill A/B/C's KD term are both ``L_distill``; without one, the label term)."""
    if distill_loss is None:
        return label_weight * det_loss
    return label_weight * det_loss + distill_weight * balance_weight * distill_loss


def proximal_term(model: nn.Module, reference: dict[str, Tensor]) -> Tensor:
    """FedProx: 0.5 * ||w - w_ref||^2 over the trainable parameters."""
    terms = [((p - reference[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad]
    return 0.5 * torch.stack(terms).sum()


BALANCES = ("fixed", "calibrated", "auto")


class LossBalance:
    """The weight multiplying the raw distillation loss, per ``Phase.balance``.

    * ``fixed``: 1 (the raw loss times ``distill_weight``: FGD exactly as the paper uses it);
    * ``calibrated``: set once, on the first step, so the term equals ``target_ratio`` x the detection
      loss there; then held fixed (the loss's own decay shows);
    * ``auto``: every step, ``target_ratio`` x EMA(detection) / EMA(raw distillation), so the term stays
      at ``target_ratio`` x the detection loss throughout (the EMA, momentum 0.9, damps batch noise).

    The weight is a number (no gradient flows through it); ``distill_weight`` still multiplies it.
    """

    def __init__(self, mode: str, target_ratio: float, momentum: float = 0.9) -> None:
        if mode not in BALANCES:
            raise ValueError(f"unknown balance {mode!r}; expected one of {', '.join(BALANCES)}")
        if not target_ratio > 0:
            raise ValueError(f"target_ratio must be > 0, got {target_ratio}")
        self.mode, self.target, self.momentum = mode, float(target_ratio), momentum
        self.det = self.raw = None
        self.weight = 1.0

    def update(self, det_loss: float, raw_distill: float) -> float:
        if self.mode == "fixed":
            return 1.0
        if self.det is None:
            self.det, self.raw = det_loss, raw_distill
        elif self.mode == "auto":
            m = self.momentum
            self.det, self.raw = m * self.det + (1 - m) * det_loss, m * self.raw + (1 - m) * raw_distill
        else:  # calibrated: the first step's figures only
            return self.weight
        self.weight = self.target * self.det / max(self.raw, 1e-12)
        return self.weight


def resolve_device(name: str | None) -> torch.device:
    """``--device`` value -> torch.device; None/"auto": cuda when available, else cpu."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not str(name).startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N or auto")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    return torch.device(name)


def to_device(images: list[Tensor], targets: list[dict], device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Moves a batch (images and target tensors) to ``device``."""
    return ([im.to(device, non_blocking=True) for im in images],
            [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets])


def make_optimizer(params: list[nn.Parameter], phase: Phase) -> torch.optim.Optimizer:
    if phase.optimizer == "sgd":
        return torch.optim.SGD(params, lr=phase.lr, momentum=0.9, weight_decay=phase.weight_decay)
    if phase.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=phase.lr, weight_decay=phase.weight_decay)
    raise ValueError(f"phase {phase.name}: unknown optimizer {phase.optimizer!r}; expected 'sgd' or 'adamw'")


class ClassMask:
    """Trains only the class scores of ``classes`` (label indices) of an FCOS model, while installed.

    A forward hook on ``model.head.classification_head`` (its output: logits [N, sum HWA, K], column k =
    label k, as torchvision's FCOS loss and post-processing index them) returns
    ``torch.where(mask, logits, logits.detach())``: the other classes' logits still enter the loss (the
    focal loss sees every score) but pass no gradient back, to the classification layer or to anything
    below it, so they are neither pushed up nor down. Their rows of the classification layer
    (``cls_logits`` weight and bias) then get zero gradient; ``after_step`` also puts those rows back as
    they were, because decoupled weight decay (AdamW, and SGD's decay term) would shrink them anyway.
    ``remove`` takes the hook off.
    """

    def __init__(self, model: nn.Module, classes: tuple[int, ...]) -> None:
        head = model.head.classification_head
        self.layer = head.cls_logits
        num_classes = self.layer.out_channels // head.num_anchors
        if head.num_anchors != 1:
            raise ValueError("ClassMask expects one anchor per location (FCOS): logits rows are classes")
        bad = [c for c in classes if not 0 <= int(c) < num_classes]
        if bad or not classes:
            raise ValueError(f"trained classes {list(classes)} are not label indices 0..{num_classes - 1}")
        self.trained = torch.zeros(num_classes, dtype=torch.bool, device=self.layer.weight.device)
        self.trained[list(classes)] = True
        self.others = (~self.trained).nonzero().flatten()
        self.kept = {name: p.detach()[self.others].clone() for name, p in self.layer.named_parameters()}
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, logits: Tensor) -> Tensor:
        return torch.where(self.trained, logits, logits.detach())

    @torch.no_grad()
    def after_step(self) -> None:
        for name, p in self.layer.named_parameters():
            p[self.others] = self.kept[name]

    def remove(self) -> None:
        self.handle.remove()


def set_frozen(model: nn.Module, parts: tuple[str, ...]) -> None:
    modules = part_modules(model)
    unknown = set(parts) - set(modules)
    if unknown:
        raise ValueError(f"cannot freeze unknown parts {sorted(unknown)}; parts are {sorted(modules)}")
    for name, module in modules.items():
        for p in module.parameters():
            p.requires_grad_(name not in parts)


def train(student: nn.Module, dataset: Dataset, phase: Phase, teacher: nn.Module | None = None,
          reference: dict[str, Tensor] | None = None, checkpoint: str | Path | None = None,
          progress: bool = True, body_memo: BodyMemo | None = None) -> PhaseReport:
    """Trains ``student`` in place for ``phase.iters`` steps; returns timing, memory and losses.

    Runs on ``models.compute.work_device`` (the enclosing ``placed_on`` block's device, else the
    student's): the student, the teacher and the reference are moved there for the phase and the models
    back where they were after it; batches are moved per step.

    Args:
        dataset: yields (image Tensor[3,H,W] in [0,1], target dict with boxes [K,4] xyxy, labels [K]).
        teacher: the distillation source (any ladder model with the same strides), or None.
        reference: FedProx reference weights (name -> tensor), needed when ``phase.proximal_mu > 0``.
        checkpoint: where to save the trained student (safetensors), if given.
        body_memo: frozen backbone-body outputs shared with another phase (``distill.body_memo``), used
            for the model whose body it holds when that body is frozen here (the teacher, or a student
            with ``"backbone"`` in ``phase.freeze``).
    """
    use_distill = teacher is not None and phase.distill_weight > 0
    if phase.targets == "teacher" and teacher is None:
        raise ValueError(f"phase {phase.name}: targets='teacher' needs a teacher model")
    if phase.proximal_mu > 0 and reference is None:
        raise ValueError(f"phase {phase.name}: proximal_mu > 0 needs reference weights")
    use_scores = phase.score_weight > 0
    if use_scores and (teacher is None or not phase.score_classes):
        raise ValueError(f"phase {phase.name}: score_weight > 0 needs a teacher and score_classes")
    device = work_device(student)
    homes = [(model, model_device(model)) for model in (student, teacher) if model is not None]
    for model, _ in homes:
        model.to(device)
    if reference is not None:
        reference = {name: value.to(device) for name, value in reference.items()}
    generator = torch.Generator().manual_seed(phase.seed)
    torch.manual_seed(phase.seed)

    set_frozen(student, phase.freeze)
    distiller = None
    balance = LossBalance(phase.balance, phase.target_ratio)
    if use_distill:
        distiller = make_distill_loss(phase.distill_loss, student.backbone.out_channels,
                                      teacher.backbone.out_channels, len(STRIDES), phase.fgd,
                                      phase.pkd_weight).to(device)
        teacher.eval()
    frozen_bodies = ([student] if "backbone" in phase.freeze else []) + ([teacher] if teacher is not None else [])
    memo_model = next((m for m in frozen_bodies if body_memo is not None and body_memo.serves(m)), None)

    def features(model: nn.Module, x: Tensor) -> list[Tensor]:
        return body_memo.neck_features(model, x) if model is memo_model else neck_features(model, x)

    params = [p for p in student.parameters() if p.requires_grad] + (list(distiller.parameters()) if distiller else [])
    optimizer = make_optimizer(params, phase)

    student.train()
    if "backbone" in phase.freeze:  # frozen BatchNorm statistics must not drift either
        part_modules(student)["backbone"].eval()
    if phase.freeze_norm:
        for module in student.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    class_mask = ClassMask(student, phase.trained_classes) if phase.trained_classes is not None else None
    score_classes = torch.tensor(phase.score_classes, dtype=torch.long, device=device)
    score_losses: list[float] = []
    losses: list[float] = []
    det_losses: list[float] = []
    distill_losses: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    batches = infinite_batches(dataset, phase.batch_size, generator)
    bar = tqdm(range(phase.iters), desc=phase.name, disable=not progress, leave=False, dynamic_ncols=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, phase))
    try:
        for step in bar:
            images, targets = _prepare(next(batches), phase, generator)
            images, targets = to_device(images, targets, device)
            image_list, targets = student.transform(images, targets)
            teacher_feats = None
            if teacher is not None and (distiller is not None or phase.targets == "teacher" or use_scores):
                with torch.no_grad():  # computed once, used for pseudo labels and for distillation
                    teacher_feats = features(teacher, image_list.tensors)
            if phase.targets == "teacher":
                targets = teacher_detections(teacher, image_list, phase.pseudo_thresh, teacher_feats)
            feats = features(student, image_list.tensors)
            head_outputs = student.head(feats)
            det = sum(detection_losses(student, image_list, targets, feats, head_outputs).values())
            raw, weight = None, 1.0
            if distiller is not None:
                boxes = [t["boxes"] for t in targets]
                raw = distiller(feats, teacher_feats, boxes, STRIDES)["distill"]
                weight = balance.update(float(det.detach()), float(raw.detach()))
                distill_losses.append(float(phase.distill_weight * weight * raw.detach()))
            loss = combined_loss(det, raw, phase.label_weight, phase.distill_weight, weight)
            det_losses.append(float(det.detach()))
            if use_scores:
                with torch.no_grad():  # the class scores only: the box branch's tower is not needed here
                    teacher_logits = teacher.head.classification_head(teacher_feats)
                score = class_score_distillation(head_outputs["cls_logits"], teacher_logits, score_classes)
                score_losses.append(float(score.detach()))
                loss = loss + phase.score_weight * score
            if phase.proximal_mu > 0:
                loss = loss + phase.proximal_mu * proximal_term(student, reference)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"phase {phase.name}: loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_norm=phase.clip_norm)
            optimizer.step()
            if class_mask is not None:
                class_mask.after_step()
            schedule.step()
            losses.append(float(loss.detach()))
            if step % 10 == 0:
                post = {"det": f"{det_losses[-1]:.3f}"}
                if distill_losses:
                    post["distill"] = f"{distill_losses[-1]:.3f}"
                bar.set_postfix(post)
    finally:
        if class_mask is not None:
            class_mask.remove()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    for model, home in homes:
        model.to(home)
    set_frozen(student, ())  # leave every parameter trainable again for whoever uses it next
    student.eval()
    tail = losses[-max(len(losses) // 10, 1):] if losses else [float("nan")]
    report = PhaseReport(
        name=phase.name, iters=phase.iters, seconds=seconds, cpu_seconds=cpu_seconds, peak_rss_mb=peak_rss_mb(),
        peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0,
        first_loss=losses[0] if losses else float("nan"), last_loss=sum(tail) / len(tail), losses=losses,
        det_losses=det_losses, distill_losses=distill_losses, device=str(device), score_losses=score_losses)
    if checkpoint is not None:
        save_weights(student, checkpoint, metadata={"phase": phase.name})
    return report
