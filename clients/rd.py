"""One client's DiReDi work, without Flower: dual-tutor reverse distillation, the knowledge delta,
and re-distillation (Distill C) of the edge model from an updated tutor.

    Tutor 1 = RD(edge -> tutor) on presumed data             (emulates the edge)
    Tutor 2 = RD(edge -> tutor) on kept presumed + private    (emulates what the customer wants)
    delta   = nh(T2) - nh(T1)                                 eq. (9)
    tutor'  = tutor with nh + beta * delta                    eq. (10)
    edge'   = Distill C(tutor' -> edge) on the client's data

Design choices the paper leaves open are fields of ``RDSettings``; the README reports the
measurements behind the defaults.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace

from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.fgd import FGDConfig
from distill.trainer import Phase, PhaseReport, train
from models.ladder import Profile
from models.parts import knowledge_delta, load_neck_head, neck_head, substitute


@dataclass(frozen=True)
class RDSettings:
    rd_iters: int
    redistill_iters: int
    batch_size: int
    lr: float = 2e-3  # measured on Exp 1: lr/4 learnt cat to 3.2 AP in tutor 2, the full lr to 8.5
    optimizer: str = "adamw"
    t2_from_t1: bool = True  # T2 starts from T1, so the delta holds only what T2 added
    freeze_backbone: bool = True  # the delta is neck/head only; a moving backbone would not transfer
    t1_label_weight: float = 0.1  # eq. (8) alpha for tutor 1: close to 0, trust the edge
    t2_label_weight: float = 1.0  # eq. (8) alpha for tutor 2: the customer's labels teach the new classes
    rd_distill_weight: float = 1.0  # eq. (8) beta for both tutors
    beta: float = 1.0  # eq. (10) substitution factor (the paper: 1)
    gamma: float = 1.0  # eq. (9) subtraction factor (the paper: 1)
    redistill_targets: str = "teacher"  # Distill C learns the head from the tutor's detections, not labels
    redistill_temp: float = 1.5  # the paper's re-distillation temperature

    @classmethod
    def from_profile(cls, profile: Profile, **overrides) -> "RDSettings":
        b = profile.budget
        return replace(cls(rd_iters=b.rd_iters, redistill_iters=b.redistill_iters, batch_size=b.batch_size,
                           lr=b.lr, optimizer=b.optimizer), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _frozen(settings: RDSettings) -> tuple[str, ...]:
    return ("backbone",) if settings.freeze_backbone else ()


def reverse_distill_tutor1(tutor: nn.Module, edge: nn.Module, presumed: Dataset, settings: RDSettings,
                           seed: int, progress: bool = False) -> tuple[nn.Module, PhaseReport]:
    """Tutor 1: a copy of the tutor that learns from the edge on presumed data."""
    t1 = copy.deepcopy(tutor)
    phase = Phase("RD tutor 1", iters=settings.rd_iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, label_weight=settings.t1_label_weight,
                  distill_weight=settings.rd_distill_weight,
                  freeze=_frozen(settings), seed=seed)
    return t1, train(t1, presumed, phase, teacher=edge, progress=progress)


def reverse_distill_tutor2(tutor: nn.Module, tutor1: nn.Module, edge: nn.Module, client_data: Dataset,
                           settings: RDSettings, seed: int, progress: bool = False) -> tuple[nn.Module, PhaseReport]:
    """Tutor 2: learns from the edge on the client's kept presumed + private data, with its labels."""
    t2 = copy.deepcopy(tutor1 if settings.t2_from_t1 else tutor)
    phase = Phase("RD tutor 2", iters=settings.rd_iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, label_weight=settings.t2_label_weight,
                  distill_weight=settings.rd_distill_weight,
                  freeze=_frozen(settings), seed=seed + 1)
    return t2, train(t2, client_data, phase, teacher=edge, progress=progress)


def client_delta(tutor1: nn.Module, tutor2: nn.Module, settings: RDSettings) -> dict[str, Tensor]:
    """Eq. (9) on the two tutors: the only thing that leaves the client."""
    return knowledge_delta(neck_head(tutor1), neck_head(tutor2), gamma=settings.gamma)


def updated_tutor(tutor: nn.Module, delta: dict[str, Tensor], beta: float) -> nn.Module:
    """Eq. (10): a copy of ``tutor`` whose neck/head moved by beta * delta."""
    return load_neck_head(copy.deepcopy(tutor), substitute(neck_head(tutor), delta, beta))


def distill_c(edge: nn.Module, tutor: nn.Module, client_data: Dataset, settings: RDSettings, seed: int,
              progress: bool = False) -> tuple[nn.Module, PhaseReport]:
    """Re-distillation: a copy of the edge fine-tuned from the (updated) tutor on the client's images."""
    student = copy.deepcopy(edge)
    phase = Phase("Distill C", iters=settings.redistill_iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, targets=settings.redistill_targets,
                  fgd=FGDConfig(temp=settings.redistill_temp),
                  seed=seed + 2)
    return student, train(student, client_data, phase, teacher=tutor, progress=progress)


def direct_training(edge: nn.Module, client_data: Dataset, iters: int, settings: RDSettings, seed: int,
                    proximal_mu: float = 0.0, progress: bool = False) -> tuple[nn.Module, PhaseReport]:
    """The baseline: a copy of the edge trained on the client's labels (the paper's "Training" rows)."""
    student = copy.deepcopy(edge)
    reference = {n: p.detach().clone() for n, p in edge.named_parameters()} if proximal_mu > 0 else None
    phase = Phase("direct training", iters=iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, proximal_mu=proximal_mu, seed=seed + 3)
    return student, train(student, client_data, phase, reference=reference, progress=progress)
