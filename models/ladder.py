"""The FCOS model ladder: teacher > tutor > edge, for each profile.

Every model is a torchvision ``FCOS`` whose parameters fall into three named parts
(see ``models.parts``): backbone (``backbone.body.*``), neck (``backbone.fpn.*``, a 3-level FPN
with strides 8/16/32 as in FCOS-Lite) and head (``head.*``). All models share the 20-class VOC
label space, so two models of the same role always have the same neck/head shapes.

No weights are ever downloaded: bodies are built with ``weights=None``; a local safetensors file
may be loaded with ``models.io.load_weights``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v2, resnet
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock

from models.compute import current_compute

NUM_CLASSES = 20  # the VOC label space; every model predicts all 20 classes
ROLES = ("teacher", "tutor", "edge")
STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one rung of the ladder."""

    body: str  # resnet18 | resnet34 | resnet50 | resnet101 | mobilenet_v2
    fpn_channels: int  # neck width; multiple of 32 (the head's GroupNorm uses 32 groups)
    head_convs: int  # convs per head branch (torchvision default 4; FCOS-Lite uses fewer)
    width_mult: float = 1.0  # MobileNetV2 only


@dataclass(frozen=True)
class TrainBudget:
    """Iterations and batch size of each training phase of a profile."""

    batch_size: int
    teacher_iters: int  # teacher trained on labels
    distill_iters: int  # Distill A and Distill B (KD)
    rd_iters: int  # reverse distillation per tutor
    redistill_iters: int  # Distill C
    lr: float = 2e-3  # AdamW, every phase
    optimizer: str = "adamw"  # measured: AdamW 0.158 vs SGD 0.125 val mAP after 400 edge iterations


@dataclass(frozen=True)
class RoundBudget:
    """A federated round's client work: smaller than the Table III experiments' (``TrainBudget``) so
    the default 8-client run with five methods fits minutes on 2 cores."""

    rd_iters: int  # RD steps per tutor per round
    redistill_iters: int  # Distill C steps per round
    batch_size: int


@dataclass(frozen=True)
class Profile:
    """Every per-profile value of the project: models, training budgets, synthetic data size."""

    name: str
    image_size: int  # square input size; the FCOS transform is set not to rescale
    anchor_sizes: tuple[int, int, int]  # FCOS scale ranges per level: [0,4a0],[4a1,8a1],[4a2,inf)
    teacher: ModelSpec
    tutor: ModelSpec
    edge: ModelSpec
    budget: TrainBudget  # the manufacturer's chain and the Table III experiments
    rounds: RoundBudget  # one federated round
    synthetic_images: int  # generated images when a scenario does not say otherwise
    synthetic_image_size: int  # their side in pixels
    seconds_per_step: float  # a pessimistic 1-thread training step at batch 8 (sizes round timeouts)

    def spec(self, role: str) -> ModelSpec:
        if role not in ROLES:
            raise ValueError(f"unknown model role {role!r}; expected one of {', '.join(ROLES)}")
        return getattr(self, role)

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    # Tiny: tests run a whole phase in seconds.
    "smoke": Profile(
        name="smoke",
        image_size=64,
        anchor_sizes=(4, 8, 16),
        teacher=ModelSpec("mobilenet_v2", fpn_channels=32, head_convs=2, width_mult=0.5),
        tutor=ModelSpec("mobilenet_v2", fpn_channels=32, head_convs=1, width_mult=0.35),
        edge=ModelSpec("mobilenet_v2", fpn_channels=32, head_convs=1, width_mult=0.25),
        budget=TrainBudget(batch_size=8, teacher_iters=6, distill_iters=4, rd_iters=3, redistill_iters=3),
        rounds=RoundBudget(rd_iters=2, redistill_iters=2, batch_size=4),
        synthetic_images=400, synthetic_image_size=64, seconds_per_step=0.2,
    ),
    # Default: sized for 2 CPU cores (see the step timings in the README).
    "cpu": Profile(
        name="cpu",
        image_size=128,
        anchor_sizes=(4, 8, 16),
        # One FPN width (64) down the ladder, so each student can inherit its teacher's neck and head
        # where the shapes agree (models.parts.inherit_neck_head).
        teacher=ModelSpec("resnet18", fpn_channels=64, head_convs=3),
        tutor=ModelSpec("resnet18", fpn_channels=64, head_convs=2),
        edge=ModelSpec("mobilenet_v2", fpn_channels=64, head_convs=1, width_mult=0.5),
        budget=TrainBudget(batch_size=16, teacher_iters=1200, distill_iters=900, rd_iters=150,
                           redistill_iters=150),
        # Two rounds of 12 RD + 36 Distill C steps: the most that keeps the warm default run (five
        # methods, 8 clients) in about 10 minutes on 2 cores (README, "Results of the default run");
        # clients keep their edge across rounds, so Distill C adds up (one round of 30 steps leaves
        # the edge at 0 AP on new classes, 90 give 16-28: experiments/results/distill_c.md).
        rounds=RoundBudget(rd_iters=12, redistill_iters=36, batch_size=8),
        synthetic_images=4000, synthetic_image_size=128, seconds_per_step=2.0,
    ),
    # The paper's section IV-A: ResNet-101 / ResNet-50 / MobileNetV2 FCOS, FPN 256, strides 8/16/32.
    "paper": Profile(
        name="paper",
        image_size=512,
        anchor_sizes=(8, 16, 32),
        teacher=ModelSpec("resnet101", fpn_channels=256, head_convs=4),
        tutor=ModelSpec("resnet50", fpn_channels=256, head_convs=4),
        edge=ModelSpec("mobilenet_v2", fpn_channels=256, head_convs=2, width_mult=1.0),
        budget=TrainBudget(batch_size=16, teacher_iters=60000, distill_iters=60000, rd_iters=20000,
                           redistill_iters=12000),
        rounds=RoundBudget(rd_iters=2000, redistill_iters=1200, batch_size=8),
        # The paper profile is meant for real VOC; the synthetic data is only a stand-in.
        synthetic_images=8000, synthetic_image_size=320, seconds_per_step=30.0,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; expected one of {', '.join(PROFILES)}")
    return PROFILES[name]


class NoExtraLevels(ExtraFPNBlock):
    """Keeps the FPN at exactly the returned levels (P3-P5); torchvision would add a max-pool P6."""

    def forward(self, results, x, names):
        return results, names


class MaxPoolChannelsLast(nn.MaxPool2d):
    """``nn.MaxPool2d`` with the same outputs, bit for bit, computed faster on the CPU when no
    gradient flows through it (a frozen body: the tutor in RD, Distill C and evaluation).

    torch's CPU max pooling of a contiguous (NCHW) tensor is far slower than of a channels-last one:
    the tutor's forward at batch 8 on one thread takes 95.6 ms with torch's pool and 84.7 ms with
    this one (``python -m bench.frozen_forward``). A maximum is exact, so the values are the same
    in either layout; the output is made NCHW-contiguous again, so every later layer runs as before.
    With a gradient the standard kernel runs: the two kernels' backward passes may send the gradient
    of a tied window (ReLU zeros) to different elements, and training must stay as it was.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or (x.requires_grad and torch.is_grad_enabled()):
            return super().forward(x)
        if x.is_contiguous(memory_format=torch.channels_last):  # already the fast layout: keep it
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class LadderBody(IntermediateLayerGetter):
    """The backbone body (``backbone.body``): torchvision's ``IntermediateLayerGetter`` run under the
    current ``models.compute`` setting. Same modules and state-dict keys; with the default setting
    (float32, NCHW) its forward is the getter's, unchanged.

    ``bfloat16_pays``: whether this body runs in bfloat16 when the setting asks for it (ResNet bodies;
    not MobileNetV2, see ``models.compute``). Its outputs are float32 either way.
    """

    def __init__(self, model: nn.Module, return_layers: dict[str, str], bfloat16_pays: bool) -> None:
        super().__init__(model, return_layers)
        self.bfloat16_pays = bfloat16_pays

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        compute = current_compute()
        if compute.layout == "channels-last" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = compute.body_dtype if self.bfloat16_pays else None
        if dtype is None:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=dtype):
            out = super().forward(x)
        return OrderedDict((name, t.float()) for name, t in out.items())


def _fast_stem_pool(pool: nn.MaxPool2d) -> MaxPoolChannelsLast:
    return MaxPoolChannelsLast(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                               pool.return_indices, pool.ceil_mode)


_RESNETS = {"resnet18": resnet.resnet18, "resnet34": resnet.resnet34,
            "resnet50": resnet.resnet50, "resnet101": resnet.resnet101}


def _body_and_channels(spec: ModelSpec) -> tuple[nn.Module, dict[str, str], list[int]]:
    """Backbone body, the layers to return (strides 8/16/32) and their channel counts."""
    if spec.body in _RESNETS:
        net = _RESNETS[spec.body](weights=None)
        return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
        channels = [net.layer2[-1].conv1.in_channels, net.layer3[-1].conv1.in_channels,
                    net.layer4[-1].conv1.in_channels]
        if spec.body in ("resnet50", "resnet101"):  # bottleneck blocks: output = 4 x planes
            channels = [net.layer2[-1].conv3.out_channels, net.layer3[-1].conv3.out_channels,
                        net.layer4[-1].conv3.out_channels]
        # Drop the classifier so the body holds only what the detector uses.
        del net.fc
        net.maxpool = _fast_stem_pool(net.maxpool)  # same values, a faster frozen forward
        return net, return_layers, channels
    if spec.body == "mobilenet_v2":
        features = mobilenet_v2(weights=None, width_mult=spec.width_mult).features
        # Blocks whose output has stride 8, 16 and 32 are the first strided block of each stage.
        strided = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)]
        picked = strided[1:4]  # strides 8, 16, 32
        return_layers = {str(i): str(level) for level, i in enumerate(picked)}
        channels = [features[i].out_channels for i in picked]
        # Keep only the blocks up to the stride-32 output: later ones would be dead weight.
        features = features[: picked[-1] + 1]
        return features, return_layers, channels
    raise ValueError(f"unknown backbone body {spec.body!r}; expected one of "
                     f"{', '.join([*_RESNETS, 'mobilenet_v2'])}")


def build_model(profile: Profile | str, role: str, num_classes: int = NUM_CLASSES,
                weights_path: str | Path | None = None, seed: int | None = None) -> FCOS:
    """Builds the FCOS detector of ``role`` (teacher | tutor | edge) for ``profile``.

    With ``seed`` the initial weights are reproducible. ``weights_path`` loads a local safetensors
    file (full model state) produced by ``models.io.save_weights``.
    """
    profile = get_profile(profile) if isinstance(profile, str) else profile
    spec = profile.spec(role)
    if spec.fpn_channels % 32:
        raise ValueError(f"fpn_channels must be a multiple of 32 (GroupNorm(32)), got {spec.fpn_channels}")
    if seed is not None:
        torch.manual_seed(seed)
    body, return_layers, channels = _body_and_channels(spec)
    backbone = BackboneWithFPN(body, return_layers, channels, spec.fpn_channels,
                               extra_blocks=NoExtraLevels())
    backbone.body = LadderBody(body, return_layers, bfloat16_pays=spec.body in _RESNETS)
    anchors = AnchorGenerator(tuple((a,) for a in profile.anchor_sizes), ((1.0,),) * 3)
    head = FCOSHead(spec.fpn_channels, num_anchors=1, num_classes=num_classes, num_convs=spec.head_convs)
    model = FCOS(backbone, num_classes, min_size=profile.image_size, max_size=profile.image_size,
                 anchor_generator=anchors, head=head, score_thresh=0.05, detections_per_img=100)
    if weights_path is not None:
        from models.io import load_weights

        load_weights(model, weights_path)
    return model


def build_to_load(profile: Profile | str, role: str, state: dict[str, Tensor]) -> FCOS:
    """The model of ``role`` holding ``state`` (a full state dict), built without drawing random
    initial weights that ``state`` would overwrite: a client builds a tutor for every message, and its
    random initialisation took 0.1 s of the 0.11 s. Every parameter and buffer is in the state dict
    (strict loading checks it), so nothing is left uninitialised.
    """
    with torch.device("meta"):
        model = build_model(profile, role)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state)
    return model


def neck_features(model: FCOS, batched_images: Tensor) -> list[Tensor]:
    """FPN (neck) outputs for already transformed images.

    Args:
        batched_images: Tensor[N, 3, H, W] as produced by ``model.transform`` (``.tensors``).
    Returns:
        [P3, P4, P5]: Tensor[N, C_fpn, H/8, W/8], [.., H/16, W/16], [.., H/32, W/32].
    """
    return list(model.backbone(batched_images).values())


def detection_losses(model: FCOS, image_list, targets: list[dict], features: list[Tensor],
                     head_outputs: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """FCOS training losses (classification, bbox_regression, bbox_ctrness) from given features.

    Same computation as ``FCOS.forward`` in training mode, split out so a distillation step can
    reuse the neck features it already computed (and the head's outputs, when it has them).
    """
    head_outputs = model.head(features) if head_outputs is None else head_outputs
    anchors = model.anchor_generator(image_list, features)
    num_anchors_per_level = [f.size(2) * f.size(3) for f in features]
    return model.compute_loss(targets, head_outputs, anchors, num_anchors_per_level)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
