"""One client's DiReDi work, without Flower: dual-tutor reverse distillation, the knowledge delta,
and re-distillation (Distill C) of the edge model from an updated tutor.

    Tutor 1 = RD(edge -> tutor) on presumed data             (emulates the edge)
    Tutor 2 = RD(edge -> tutor) on kept presumed + private    (emulates what the customer wants)
    delta   = nh(T2) - nh(T1)                                 eq. (9)
    tutor'  = tutor with nh + beta * delta                    eq. (10)
    edge'   = Distill C(tutor' -> edge) on the client's data

Design choices the paper leaves open are fields of ``ClientTraining``; the README reports the
measurements behind the defaults.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace

from torch import Tensor, nn
from torch.utils.data import Dataset

from distill.body_memo import BodyMemo
from distill.fgd import FGDConfig
from distill.trainer import KDRecipe, Phase, PhaseReport, train
from models.ladder import Profile
from models.parts import knowledge_delta, load_neck_head, neck_head, substitute


_KD = KDRecipe()


@dataclass(frozen=True)
class ClientTraining:
    """How a client trains in a round: DiReDi's RD (Tutor 1, Tutor 2) and Distill C, and the direct
    training of the baselines (``lr``, ``optimizer``, ``batch_size``); from the profile's round budget
    (``from_profile``) and the run configuration (``RunConfig.client_training``)."""

    rd_iters: int
    redistill_iters: int
    batch_size: int
    lr: float = 2e-3  # Distill C and direct training (the profile's lr)
    optimizer: str = "adamw"
    # Reverse distillation (tutor 1, tutor 2): its own optimiser, because the delta is the
    # difference of two trainings and an optimiser that moves every weight by about its lr per
    # step (AdamW) writes undirected noise into it. Measured on Exp 1 (manufacturer's validation
    # set): SGD gave a delta 8x smaller in norm with more new-class AP and no loss on the presumed
    # classes (README, "RD levers").
    rd_optimizer: str = "sgd"
    rd_lr: float = 0.01
    t2_from_t1: bool = True  # T2 starts from T1, so the delta holds only what T2 added
    freeze_backbone: bool = True  # the delta is neck/head only; a moving backbone would not transfer
    t1_label_weight: float = 0.1  # eq. (8) alpha for tutor 1: close to 0, trust the edge
    t2_label_weight: float = 1.0  # eq. (8) alpha for tutor 2: the customer's labels teach the new classes
    rd_distill_weight: float = 1.0  # eq. (8) beta for both tutors
    # RD's balance: the distillation term is held at rd_target_ratio x the (unweighted) detection
    # loss, so with t1_label_weight 0.1 the edge's features weigh 10x the labels in tutor 1.
    rd_distill_loss: str = _KD.distill_loss
    rd_balance: str = _KD.balance
    rd_target_ratio: float = 1.0
    beta: float = 1.0  # eq. (10) substitution factor (the paper: 1)
    gamma: float = 1.0  # eq. (9) subtraction factor (the paper: 1)
    # Distill C (the paper): from the deployed edge, on kept public + private data, the tutor's
    # distillation loss plus the detector's loss on the client's labels. "teacher": the tutor's
    # detections replace the labels (the edge then never sees a label).
    redistill_targets: str = "labels"
    redistill_distill_loss: str = _KD.distill_loss
    redistill_balance: str = _KD.balance
    # Distill C's distillation term at 4x the detection loss (Distill A/B: 1x). Chosen on the
    # manufacturer's validation set after round 1 (experiments/results/distill_c_ratio.md): at 72
    # steps it gives the edge more of its new classes (car 23.0 -> 26.2, dog 8.4 -> 13.5) and keeps
    # the presumed classes as well (26.4 -> 28.0, 34.0 -> 33.6).
    redistill_target_ratio: float = 4.0
    redistill_lr: float = 0.0  # Distill C's learning rate; 0: ``lr`` (the profile's, as direct training's)
    redistill_temp: float = 1.5  # the paper's re-distillation temperature (FGD's attention softmax)
    # Distill C and direct training on a client: BatchNorm keeps the edge's running statistics
    # (distill.trainer.Phase.freeze_norm) instead of re-estimating them from the client's small batches.
    client_freeze_norm: bool = False
    # Distill C: weight of the tutor's class scores on the client's kept presumed classes as soft targets
    # (distill.scores), which FGD's feature terms leave untouched. 0: off (the paper's Distill C).
    redistill_score_weight: float = 0.0

    @classmethod
    def from_profile(cls, profile: Profile, **overrides) -> "ClientTraining":
        b = profile.budget
        return replace(cls(rd_iters=b.rd_iters, redistill_iters=b.redistill_iters, batch_size=b.batch_size,
                           lr=b.lr, optimizer=b.optimizer), **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


def _frozen(settings: ClientTraining) -> tuple[str, ...]:
    return ("backbone",) if settings.freeze_backbone else ()


def _tutor_copy(tutor: nn.Module, settings: ClientTraining) -> nn.Module:
    """A copy of ``tutor`` to train by RD. With the backbone frozen the copy shares the tutor's body
    tensors instead of copying them (RD never changes them: no gradient, BatchNorm in eval mode), which
    saves a body's worth of memory per tutor (44 MB in the cpu profile; a client holds three). The
    copy's body is the tutor's: writing into it would write into the tutor."""
    if not settings.freeze_backbone:
        return copy.deepcopy(tutor)
    body = tutor.backbone.body
    memo = {id(t): t for t in [*body.parameters(), *body.buffers()]}
    return copy.deepcopy(tutor, memo)


def _rd_phase(name: str, settings: ClientTraining, label_weight: float, seed: int) -> Phase:
    """Eq. (8) for one tutor: label_weight * L_det + rd_distill_weight * (balanced) L_distill(edge)."""
    return Phase(name, iters=settings.rd_iters, batch_size=settings.batch_size, lr=settings.rd_lr,
                 optimizer=settings.rd_optimizer, label_weight=label_weight,
                 distill_weight=settings.rd_distill_weight, distill_loss=settings.rd_distill_loss,
                 balance=settings.rd_balance, target_ratio=settings.rd_target_ratio,
                 freeze=_frozen(settings), seed=seed)


def reverse_distill_tutor1(tutor: nn.Module, edge: nn.Module, presumed: Dataset, settings: ClientTraining,
                           seed: int, progress: bool = False,
                           body_memo: BodyMemo | None = None) -> tuple[nn.Module, PhaseReport]:
    """Tutor 1: a copy of the tutor that learns from the edge on presumed data (it shares the tutor's
    frozen body, ``_tutor_copy``). ``body_memo``: that body's outputs kept across rounds, if any."""
    t1 = _tutor_copy(tutor, settings)
    return t1, train(t1, presumed, tutor1_phase(settings, seed), teacher=edge, progress=progress,
                     body_memo=body_memo)


def reverse_distill_tutor2(tutor: nn.Module, tutor1: nn.Module, edge: nn.Module, client_data: Dataset,
                           settings: ClientTraining, seed: int, progress: bool = False,
                           body_memo: BodyMemo | None = None) -> tuple[nn.Module, PhaseReport]:
    """Tutor 2: learns from the edge on the client's kept presumed + private data, with its labels.
    ``body_memo`` (recording) keeps its frozen body's outputs for Distill C, which draws the same batches."""
    t2 = _tutor_copy(tutor1 if settings.t2_from_t1 else tutor, settings)
    return t2, train(t2, client_data, tutor2_phase(settings, seed), teacher=edge, progress=progress,
                     body_memo=body_memo)


def tutor1_phase(settings: ClientTraining, seed: int) -> Phase:
    """Tutor 1's phase (``reverse_distill_tutor1``)."""
    return _rd_phase("RD tutor 1", settings, settings.t1_label_weight, seed)


def tutor2_phase(settings: ClientTraining, seed: int) -> Phase:
    """Tutor 2's phase (``reverse_distill_tutor2``)."""
    return _rd_phase("RD tutor 2", settings, settings.t2_label_weight, seed + 1)


def client_delta(tutor1: nn.Module, tutor2: nn.Module, settings: ClientTraining) -> dict[str, Tensor]:
    """Eq. (9) on the two tutors: the only thing that leaves the client."""
    return knowledge_delta(neck_head(tutor1), neck_head(tutor2), gamma=settings.gamma)


def server_reference_update(tutor: nn.Module, edge: nn.Module, presumed_data: Dataset, settings: ClientTraining,
                            seed: int, tutor1: nn.Module | None = None) -> dict[str, Tensor]:
    """FLTrust's root-data update for the server's direction check (``strategies.verify.direction_check``):
    the server runs a client's RD round on its own public presumed data (Tutor 1 from ``edge``, unless the
    round's shared ``tutor1`` is given, then Tutor 2) and returns the neck/head delta a client would send
    (eq. 9).

    An honest client's delta carries the same distillation toward the edge on the kept classes plus
    its own classes, so it points partly along this update; a sign-flipped delta points against it
    and a random one nowhere (``experiments/results/direction.md``)."""
    if tutor1 is None:
        tutor1, _ = reverse_distill_tutor1(tutor, edge, presumed_data, settings, seed=seed)
    tutor2, _ = reverse_distill_tutor2(tutor, tutor1, edge, presumed_data, settings, seed=seed)
    return client_delta(tutor1, tutor2, settings)


def updated_tutor(tutor: nn.Module, delta: dict[str, Tensor], beta: float) -> nn.Module:
    """Eq. (10): a copy of ``tutor`` whose neck/head moved by beta * delta."""
    return load_neck_head(copy.deepcopy(tutor), substitute(neck_head(tutor), delta, beta))


def distill_c(edge: nn.Module, tutor: nn.Module, client_data: Dataset, settings: ClientTraining, seed: int,
              progress: bool = False, body_memo: BodyMemo | None = None,
              kept_classes: tuple[int, ...] = ()) -> tuple[nn.Module, PhaseReport]:
    """Re-distillation: a copy of the deployed edge fine-tuned from the (updated) tutor on the client's
    kept public + private images: the tutor's distillation loss plus the detector's loss on the
    client's labels (or, with ``redistill_targets="teacher"``, on the tutor's detections).
    ``body_memo``: Tutor 2's body outputs (the same body), served for the batches both phases draw.
    ``kept_classes``: the client's kept presumed classes (label indices; with ``--spread-scores others`` also
    other clients' classes), whose tutor scores are soft targets when ``settings.redistill_score_weight`` > 0."""
    student = copy.deepcopy(edge)
    return student, train(student, client_data, distill_c_phase(settings, seed, kept_classes), teacher=tutor,
                          progress=progress, body_memo=body_memo)


def distill_c_lr(lr: float, server_round: int, schedule: str) -> float:
    """Distill C's learning rate in ``server_round`` (1-based): ``lr`` every round (constant), or
    ``lr / sqrt(round)`` (inverse-sqrt: SGD's classic decay, so that late rounds, which restart from an
    edge that already holds the client's classes, move it less; no horizon to know in advance)."""
    if schedule == "constant" or server_round <= 1:
        return lr
    if schedule == "inverse-sqrt":
        return lr / math.sqrt(server_round)
    raise ValueError(f"unknown Distill C learning-rate schedule {schedule!r}")


def distill_c_phase(settings: ClientTraining, seed: int, kept_classes: tuple[int, ...] = ()) -> Phase:
    """Distill C's phase (``distill_c``): the tutor's distillation loss plus the detector's loss.

    It draws the client's data in Tutor 2's order (the same seed, the same batch size and flips), so
    its first ``rd_iters`` batches are Tutor 2's and the frozen body's outputs of them are computed once
    (``distill.body_memo``): 12 of Distill C's 36 tutor body passes in the cpu profile. Its own order
    (seed + 2) until the cost issue; which order it draws moves the figures only as another seed would."""
    return Phase("Distill C", iters=settings.redistill_iters, batch_size=settings.batch_size,
                 lr=settings.redistill_lr or settings.lr,
                 optimizer=settings.optimizer, targets=settings.redistill_targets,
                 distill_loss=settings.redistill_distill_loss, balance=settings.redistill_balance,
                 target_ratio=settings.redistill_target_ratio, fgd=FGDConfig(temp=settings.redistill_temp),
                 freeze_norm=settings.client_freeze_norm, seed=tutor2_phase(settings, seed).seed,
                 score_weight=settings.redistill_score_weight if kept_classes else 0.0,
                 score_classes=tuple(kept_classes) if settings.redistill_score_weight else ())


def spread_distill(edge: nn.Module, tutor: nn.Module, images: Dataset, settings: ClientTraining, seed: int,
                   classes: tuple[int, ...], score_weight: float = 4.0, iters: int = 0,
                   progress: bool = False, body_memo: BodyMemo | None = None) -> tuple[nn.Module, PhaseReport]:
    """Spread: a copy of the server's edge distilled from the updated tutor on the manufacturer's images,
    with the tutor as the only teacher (the images' labels are not used).

    The manufacturer's presumed data holds no object of a class a client added, so Distill C on it
    (``redistill="server"``) teaches the edge that such objects are background. Here the images are the
    manufacturer's teacher-class images (they show those objects) and the targets are the tutor's:
    its detections above ``settings``' pseudo-label threshold for the detector's loss, its neck features
    (FGD, as Distill C) and its class scores on ``classes`` (label indices; ``distill.scores``) with
    ``score_weight``. The scores carry what the tutor learned below the pseudo-label threshold, where a
    new class sits for several rounds. ``iters`` steps (0: as many as Distill C), in its own data order
    (seed + 5). ``body_memo``: the tutor body's outputs on these images, kept across rounds by the server
    (no round changes the tutor's body; ``distill.body_memo``)."""
    student = copy.deepcopy(edge)
    phase = spread_phase(settings, seed, classes, score_weight, iters)
    return student, train(student, images, phase, teacher=tutor, progress=progress, body_memo=body_memo)


def spread_phase(settings: ClientTraining, seed: int, classes: tuple[int, ...], score_weight: float = 4.0,
                 iters: int = 0) -> Phase:
    """Spread's phase (``spread_distill``): Distill C's, on the tutor's targets, in its own data order."""
    return replace(distill_c_phase(settings, seed), name="spread", targets="teacher", seed=seed + 5,
                   iters=iters or settings.redistill_iters, score_weight=score_weight, score_classes=tuple(classes))


def direct_training(edge: nn.Module, client_data: Dataset, iters: int, settings: ClientTraining, seed: int,
                    proximal_mu: float = 0.0, progress: bool = False,
                    trained_classes: tuple[int, ...] | None = None) -> tuple[nn.Module, PhaseReport]:
    """The baseline: a copy of the edge trained on the client's labels (the paper's "Training" rows).

    ``trained_classes`` (label indices, ``data.voc.CLASS_INDEX``): only these classes' scores train, the
    other classes' are neither pushed up nor down (``distill.trainer.ClassMask``; fedavg_ls)."""
    student = copy.deepcopy(edge)
    reference = {n: p.detach().clone() for n, p in edge.named_parameters()} if proximal_mu > 0 else None
    phase = Phase("direct training", iters=iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, proximal_mu=proximal_mu, freeze_norm=settings.client_freeze_norm,
                  seed=seed + 3, trained_classes=tuple(trained_classes) if trained_classes is not None else None)
    return student, train(student, client_data, phase, reference=reference, progress=progress)


def fine_tune(edge: nn.Module, client_data: Dataset, settings: ClientTraining, seed: int,
              progress: bool = False) -> tuple[nn.Module, PhaseReport]:
    """FedAvg+FT (fedavg_ft): a copy of the received global edge trained on the client's labels for as
    many steps as Distill C (``settings.redistill_iters``) at the profile's lr, in its own data order
    (seed + 4: not the order of the round's direct training, seed + 3)."""
    student = copy.deepcopy(edge)
    phase = Phase("fine-tune", iters=settings.redistill_iters, batch_size=settings.batch_size, lr=settings.lr,
                  optimizer=settings.optimizer, freeze_norm=settings.client_freeze_norm, seed=seed + 4)
    return student, train(student, client_data, phase, progress=progress)
