"""Distillation of a detector's class scores: soft targets for the classes a client keeps.

FGD (``distill.fgd``) distils neck features; nothing in it holds the classification layer, which a
client's labels alone then train. The teacher's class scores hold it directly. An FCOS head scores
every location for every class with its own sigmoid, so the soft target of class k at location a is
the teacher's sigmoid there, and the loss is the binary KL divergence between the two Bernoulli
distributions, summed over the distilled classes and locations and divided by the teacher's total
score mass on them (at least 1): about one unit per object the teacher sees, as FCOS's focal loss
divides by its number of foreground locations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def class_score_distillation(student_logits: Tensor, teacher_logits: Tensor, classes: Tensor) -> Tensor:
    """Binary KL of the student's class scores from the teacher's, on ``classes``.

    Args:
        student_logits, teacher_logits: [N, A, K] class logits of the same locations (FCOS heads of
            the same strides and anchors; ``head(features)["cls_logits"]``).
        classes: label indices (long, [C]) whose scores are distilled.
    Returns:
        a scalar, 0 when the student's scores equal the teacher's.
    """
    s = student_logits[..., classes].float()
    t = torch.sigmoid(teacher_logits[..., classes].float())
    # KL(t || sigmoid(s)) = BCE(s, t) - H(t); H(t) does not depend on the student
    bce = F.binary_cross_entropy_with_logits(s, t, reduction="sum")
    entropy = F.binary_cross_entropy(t, t, reduction="sum")
    return (bce - entropy) / t.sum().clamp(min=1.0)
