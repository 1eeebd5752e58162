"""Backbone / neck / head parts and the neck+head knowledge math of the paper.

Eq. (9):  delta = nh(T2) - gamma * nh(T1)         -> ``knowledge_delta``
Eq. (10): nh(tutor') = nh(tutor) + beta * delta   -> ``substitute``

Everything here is a pure function on name -> tensor mappings (state dicts), with no Flower import.
"""

from __future__ import annotations

import copy
import math

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

Delta = Mapping[str, Tensor]  # a weight delta: parameter name -> change (eq. 9)

# Parameter name prefixes of the three parts of every ladder model (torchvision FCOS layout).
PART_PREFIXES: dict[str, str] = {
    "backbone": "backbone.body.",
    "neck": "backbone.fpn.",
    "head": "head.",
}
KNOWLEDGE_PARTS = ("neck", "head")


class ArchitectureMismatch(ValueError):
    """Two weight sets that should share an architecture do not."""


def part_of(name: str) -> str:
    """The part ('backbone' | 'neck' | 'head') a parameter name belongs to."""
    for part, prefix in PART_PREFIXES.items():
        if name.startswith(prefix):
            return part
    raise ValueError(f"parameter {name!r} belongs to no known part (prefixes: {list(PART_PREFIXES.values())})")


def split_parameters(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Partitions a model's named parameters into {'backbone', 'neck', 'head'}.

    Raises ValueError if a parameter belongs to no part, so the partition is always exact.
    """
    parts: dict[str, dict[str, Tensor]] = {p: {} for p in PART_PREFIXES}
    for name, param in model.named_parameters():
        parts[part_of(name)][name] = param
    return parts


# The FCOS classification layer: weight [num_classes, C, 3, 3], bias [num_classes], one anchor per
# location, so row c along dim 0 belongs to (VOC) class c and to no other.
CLASS_ROW_PARAMS = ("head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias")


def with_class_rows(model: nn.Module, source: nn.Module, class_ids: Sequence[int]) -> nn.Module:
    """A copy of ``model`` whose classification-layer rows of ``class_ids`` are ``source``'s: those
    classes score as ``source`` scores them, given the features ``model``'s tower computes."""
    out = copy.deepcopy(model)
    if class_ids:
        rows = torch.as_tensor(list(class_ids), dtype=torch.long)
        state, theirs = out.state_dict(), source.state_dict()
        with torch.no_grad():
            for name in CLASS_ROW_PARAMS:
                state[name][rows] = theirs[name][rows]
    return out


def interpolate_weights(old: Mapping[str, Tensor], new: Mapping[str, Tensor], share: float,
                        new_rows: Sequence[int] = ()) -> dict[str, Tensor]:
    """``old + share x (new - old)`` for every floating-point tensor of two state dicts of one architecture
    (weights and BatchNorm statistics); integer tensors (BatchNorm's step count) are ``new``'s. ``share``
    1 gives ``new``, 0 ``old``. The classification layer's rows of the classes ``new_rows`` (label
    indices) are ``new``'s whole."""
    check_same_architecture(old, new)
    out = {k: torch.lerp(old[k], v, share) if v.is_floating_point() else v.clone() for k, v in new.items()}
    if new_rows:
        rows = torch.as_tensor(list(new_rows), dtype=torch.long)
        for name in CLASS_ROW_PARAMS:
            if name in out:
                out[name][rows] = new[name][rows]
    return out


def part_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The modules holding each part, e.g. to freeze the backbone or put it in eval mode."""
    return {"backbone": model.backbone.body, "neck": model.backbone.fpn, "head": model.head}


def neck_head(weights: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """nh(model): detached copies of the neck and head parameters, keyed by full name.

    Accepts a model or a state dict. FCOS keeps no buffers in the neck or head, so parameters are
    the whole of that knowledge.
    """
    if isinstance(weights, nn.Module):
        items = weights.named_parameters()
    else:
        items = weights.items()
    return {name: t.detach().clone() for name, t in items if part_of(name) in KNOWLEDGE_PARTS}


def check_same_architecture(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "weights") -> None:
    """Raises ArchitectureMismatch naming the first differing key, shape or dtype."""
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise ArchitectureMismatch(
            f"{what}: key sets differ (only in first: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"only in second: {extra[:3]}{'...' if len(extra) > 3 else ''})")
    for name in a:
        if a[name].shape != b[name].shape:
            raise ArchitectureMismatch(f"{what}: {name} has shape {tuple(a[name].shape)} vs {tuple(b[name].shape)}")
        if a[name].dtype != b[name].dtype:
            raise ArchitectureMismatch(f"{what}: {name} has dtype {a[name].dtype} vs {b[name].dtype}")


def knowledge_delta(nh_tutor1: Mapping[str, Tensor], nh_tutor2: Mapping[str, Tensor],
                    gamma: float = 1.0) -> dict[str, Tensor]:
    """Eq. (9): the customer's knowledge, delta = nh(T2) - gamma * nh(T1) (the paper uses gamma = 1)."""
    check_same_architecture(nh_tutor1, nh_tutor2, "tutor 1 vs tutor 2 neck/head")
    return {name: nh_tutor2[name] - gamma * nh_tutor1[name] for name in nh_tutor1}


def substitute(nh_tutor: Mapping[str, Tensor], delta: Mapping[str, Tensor], beta: float = 1.0) -> dict[str, Tensor]:
    """Eq. (10): nh(updated tutor) = nh(tutor) + beta * delta (the paper uses beta = 1)."""
    check_same_architecture(nh_tutor, delta, "tutor neck/head vs delta")
    return {name: nh_tutor[name] + beta * delta[name] for name in nh_tutor}


def load_neck_head(model: nn.Module, nh: Mapping[str, Tensor]) -> nn.Module:
    """Writes neck/head weights into ``model`` in place (the backbone is untouched); returns it."""
    current = neck_head(model)
    check_same_architecture(current, nh, "model neck/head vs given neck/head")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in nh.items():
            params[name].copy_(value)
    return model


def inherit_neck_head(student: nn.Module, teacher: nn.Module | Mapping[str, Tensor]) -> list[str]:
    """FGD's "inheriting": copies the teacher's neck/head layers into ``student`` where shapes allow.

    A student layer (the parameters of one module, e.g. a conv's weight and bias) is overwritten
    with exact copies of the teacher's layer of the same name when every one of its tensors exists
    in the teacher with the same shape; other layers (and the whole backbone) keep their
    initialisation. With equal FPN widths that is the whole head up to the student's head depth and
    the FPN's 3x3 output convs; the FPN's lateral 1x1 convs only when both backbone bodies give the
    same channel counts. Returns the parameter names copied, in the student's order.
    """
    source = neck_head(teacher)
    params = {n: p for n, p in student.named_parameters() if part_of(n) in KNOWLEDGE_PARTS}
    layers: dict[str, list[str]] = {}
    for name in params:
        layers.setdefault(name.rsplit(".", 1)[0], []).append(name)
    copied = []
    with torch.no_grad():
        for names in layers.values():
            if all(n in source and source[n].shape == params[n].shape for n in names):
                for n in names:
                    params[n].copy_(source[n].to(params[n].device, params[n].dtype))
                copied.extend(names)
    return copied


def delta_norm(delta: Mapping[str, Tensor]) -> float:
    """Global L2 norm of a delta (all tensors flattened together)."""
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in delta.values())))


def clip_delta(delta: Delta, max_norm: float = math.inf) -> tuple[dict[str, Tensor], float]:
    """The delta scaled to global L2 norm at most ``max_norm``, and the factor it was scaled by.

    Why: a boosted delta (a poisoned update multiplied up to outweigh the honest ones) keeps its
    direction but not its size; clipping leaves honest deltas below the bound untouched. Returns
    (clipped, factor) with factor = min(1, max_norm / norm): 1.0 (and the same tensors) when the
    delta is within the bound, when ``max_norm`` is inf (clipping off) or when the delta is all zeros.
    """
    if not max_norm > 0:  # also rejects NaN
        raise ValueError(f"max_norm must be > 0 (inf: no clipping), got {max_norm}")
    norm = delta_norm(delta) if math.isfinite(max_norm) else 0.0
    if norm <= max_norm:
        return dict(delta), 1.0
    factor = max_norm / norm
    return {name: value * factor for name, value in delta.items()}, factor
