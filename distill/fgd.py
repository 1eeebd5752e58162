"""Focal and Global Distillation (FGD) for detectors, on FPN features.

Yang et al., "Focal and Global Knowledge Distillation for Detectors", CVPR 2022; used by DiReDi
(section II-B, eqs. 3-6) for every distillation step. Written from the paper's formulas and the
reference FCOS weights; one function per equation term:

* :func:`foreground_masks`  -- binary foreground mask M, scale mask S and the background mask (eq. 3)
* :func:`spatial_attention`, :func:`channel_attention` -- attention masks A^S and A^C (eqs. 1-2 of FGD)
* :func:`focal_loss`        -- feature part of the focal distillation loss (eq. 3)
* :func:`attention_loss`    -- attention-imitation part of the focal loss (eq. 3, gamma term)
* :class:`GcBlock`          -- global context block R(F) (eq. 5)
* :func:`global_loss`       -- global distillation loss (eqs. 4-5)
* :class:`FGDLoss`          -- the sum over FPN levels (eq. 6 without the detector's own loss)

Beside FGD, a magnitude-invariant feature loss (PKD, Cao et al., NeurIPS 2022):

* :func:`standardize_channels` -- each channel to zero mean / unit variance over (N, H, W)
* :func:`pkd_level_loss`      -- MSE of standardised features / 2, i.e. 1 - Pearson r per level
* :class:`PKDLoss`            -- the weighted sum over FPN levels

FGD's terms grow with the square of the feature magnitude, so features of a very different scale
than the reference's make it swamp the detector's loss; PKD is bounded in [0, 2] per level.

Shapes: N batch, C channels (teacher channels after alignment), H x W one FPN level.

Strides: the caller passes one stride per FPN level. For a torchvision ``FCOS`` whose anchor
generator is ``AnchorGenerator(sizes=((8,), (16,), (32,)), ...)`` the three FPN levels (P3, P4, P5)
have strides 8, 16 and 32 (torchvision's default 5-level FCOS: 8, 16, 32, 64, 128). Boxes must be in
the coordinates of the images the backbone sees, i.e. the targets *after* ``model.transform``
(resized; padding only adds cells at the bottom/right and does not move boxes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FGDConfig",
    "foreground_masks",
    "spatial_attention",
    "channel_attention",
    "focal_loss",
    "attention_loss",
    "GcBlock",
    "global_loss",
    "FGDLoss",
    "standardize_channels",
    "pkd_level_loss",
    "PKDLoss",
    "make_distill_loss",
]


@dataclass
class FGDConfig:
    """FGD hyperparameters; defaults are the reference FCOS values (RetinaNet: 0.5, 1e-3, 5e-4, 5e-4, 5e-6).

    temp: temperature of the attention softmaxes.
    alpha / beta: weights of the foreground / background feature imitation (eq. 3).
    gamma: weight of the attention imitation (eq. 3).
    lambda_: weight of the global (relation) loss (eq. 4).
    """

    temp: float = 0.8
    alpha: float = 1.6e-3
    beta: float = 8e-4
    gamma: float = 8e-4
    lambda_: float = 8e-6


# ------------------------------------------------------------------------------------------------
# masks (eq. 3: M, S and the background normalisation)
# ------------------------------------------------------------------------------------------------
def foreground_masks(
    boxes_per_image: Sequence[Tensor],
    feat_hw: tuple[int, int],
    stride: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Foreground (binary x scale) and normalised background masks of one FPN level.

    Args:
        boxes_per_image: N tensors [K_i, 4], boxes ``x1, y1, x2, y2`` in input-to-backbone pixels
            (K_i may be 0).
        feat_hw: (H, W) of the feature map.
        stride: pixels per feature cell at this level.
        device: device of the masks (default: that of the first box tensor, else CPU).

    Returns:
        fg [N, H, W]: inside a box ``1 / (h_cells * w_cells)`` of that box (M * S); where boxes
            overlap the smaller box wins (the max of 1/area); 0 outside boxes.
        bg [N, H, W]: ``1 / (number of background cells)`` where no box, 0 on the foreground; an
            image without boxes is all background (each cell 1/(H*W)). If boxes cover the whole map
            bg is all 0.

    A box is mapped to the half-open cell range ``[floor(x1/stride), ceil(x2/stride))`` (same for y),
    clamped to the map and always at least one cell wide and high.
    """
    H, W = int(feat_hw[0]), int(feat_hw[1])
    if device is None:
        device = boxes_per_image[0].device if len(boxes_per_image) > 0 else "cpu"
    work = torch.promote_types(dtype, torch.float32)  # at least fp32 for the cell arithmetic
    ys = torch.arange(H, device=device, dtype=work)
    xs = torch.arange(W, device=device, dtype=work)
    fgs, bgs = [], []
    for boxes in boxes_per_image:
        fg = torch.zeros(H, W, device=device, dtype=work)
        b = torch.as_tensor(boxes).to(device=device, dtype=work).reshape(-1, 4)
        if b.shape[0] > 0:
            b = b / float(stride)
            x0 = b[:, 0].floor().clamp(0, W - 1)
            y0 = b[:, 1].floor().clamp(0, H - 1)
            x1 = torch.maximum(b[:, 2].ceil().clamp(max=W), x0 + 1)
            y1 = torch.maximum(b[:, 3].ceil().clamp(max=H), y0 + 1)
            inside = (
                (ys[None, :, None] >= y0[:, None, None])
                & (ys[None, :, None] < y1[:, None, None])
                & (xs[None, None, :] >= x0[:, None, None])
                & (xs[None, None, :] < x1[:, None, None])
            )  # [K, H, W]
            inv_area = 1.0 / ((x1 - x0) * (y1 - y0))  # [K]
            fg = (inside.to(work) * inv_area[:, None, None]).amax(dim=0)
        bg = (fg == 0).to(work)
        n_bg = bg.sum()
        if n_bg > 0:
            bg = bg / n_bg
        fgs.append(fg)
        bgs.append(bg)
    if not fgs:
        empty = torch.zeros(0, H, W, device=device, dtype=dtype)
        return empty, empty.clone()
    return torch.stack(fgs).to(dtype), torch.stack(bgs).to(dtype)


# ------------------------------------------------------------------------------------------------
# attention (FGD eqs. 1-2; DiReDi's A^S and A^C)
# ------------------------------------------------------------------------------------------------
def spatial_attention(feat: Tensor, temp: float) -> Tensor:
    """A^S(F) = H*W * softmax_hw( mean_c |F| / temp ).  feat [N, C, H, W] -> [N, H, W] (mean 1)."""
    N, _, H, W = feat.shape
    g = feat.abs().mean(dim=1).reshape(N, H * W)
    return (H * W * F.softmax(g / temp, dim=1)).reshape(N, H, W)


def channel_attention(feat: Tensor, temp: float) -> Tensor:
    """A^C(F) = C * softmax_c( mean_hw |F| / temp ).  feat [N, C, H, W] -> [N, C] (mean 1)."""
    C = feat.shape[1]
    g = feat.abs().mean(dim=(2, 3))
    return C * F.softmax(g / temp, dim=1)


# ------------------------------------------------------------------------------------------------
# focal distillation (eq. 3)
# ------------------------------------------------------------------------------------------------
def focal_loss(
    s: Tensor,
    t: Tensor,
    fg: Tensor,
    bg: Tensor,
    t_spatial: Tensor,
    t_channel: Tensor,
    alpha: float,
    beta: float,
) -> Tensor:
    """Feature-imitation part of eq. 3, weighted by the teacher's attention.

    ``(alpha * sum(fg * A_S^T * A_C^T * (S - T)^2) + beta * sum(bg * A_S^T * A_C^T * (S - T)^2)) / N``

    Args:
        s, t: student (aligned) and teacher features [N, C, H, W].
        fg, bg: masks [N, H, W] from :func:`foreground_masks`.
        t_spatial: teacher spatial attention [N, H, W]; t_channel: teacher channel attention [N, C].
    Returns: scalar.
    """
    N = s.shape[0]
    w = t_spatial[:, None, :, :] * t_channel[:, :, None, None]  # [N, C, H, W]
    d2 = w * (s - t).pow(2)
    fg_loss = (fg[:, None, :, :] * d2).sum()
    bg_loss = (bg[:, None, :, :] * d2).sum()
    return (alpha * fg_loss + beta * bg_loss) / N


def attention_loss(
    s_spatial: Tensor,
    s_channel: Tensor,
    t_spatial: Tensor,
    t_channel: Tensor,
    gamma: float,
) -> Tensor:
    """Attention-imitation part of eq. 3: ``gamma * (sum|A_C^S - A_C^T| + sum|A_S^S - A_S^T|) / N``.

    s_spatial, t_spatial [N, H, W]; s_channel, t_channel [N, C]. Returns: scalar.
    """
    N = s_spatial.shape[0]
    l_c = (s_channel - t_channel).abs().sum()
    l_s = (s_spatial - t_spatial).abs().sum()
    return gamma * (l_c + l_s) / N


# ------------------------------------------------------------------------------------------------
# global distillation (eqs. 4-5)
# ------------------------------------------------------------------------------------------------
class GcBlock(nn.Module):
    """Global context block (eq. 5): ``R(F) = F + W_v2(ReLU(LN(W_v1(context))))``.

    ``context = sum_hw softmax_hw(W_k F) * F`` with ``W_k`` a 1x1 conv C -> 1, so context is [N, C, 1, 1]
    and the added term is broadcast over H x W. Bottleneck ``C_mid = max(min_mid, C // reduction)``;
    LayerNorm over [C_mid, 1, 1]. The last conv is zero-initialised, so a fresh block is the identity.

    Shapes: [N, C, H, W] -> [N, C, H, W].
    """

    def __init__(self, channels: int, reduction: int = 2, min_mid: int = 8) -> None:
        super().__init__()
        mid = max(int(min_mid), int(channels) // int(reduction))
        self.channels = int(channels)
        self.mid_channels = mid
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.conv1 = nn.Conv2d(channels, mid, kernel_size=1)
        self.norm = nn.LayerNorm([mid, 1, 1])
        self.conv2 = nn.Conv2d(mid, channels, kernel_size=1)
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def context(self, x: Tensor) -> Tensor:
        """[N, C, H, W] -> [N, C, 1, 1]: attention-pooled global context."""
        N, C, H, W = x.shape
        attn = F.softmax(self.conv_mask(x).reshape(N, 1, H * W), dim=2)  # [N, 1, HW]
        ctx = torch.bmm(x.reshape(N, C, H * W), attn.transpose(1, 2))  # [N, C, 1]
        return ctx.reshape(N, C, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.norm(self.conv1(self.context(x)))))


def global_loss(s: Tensor, t: Tensor, s_block: GcBlock, t_block: GcBlock, lambda_: float) -> Tensor:
    """Eq. 4: ``lambda * sum((R_s(S) - R_t(T))^2) / N``.  s, t [N, C, H, W]; returns a scalar."""
    N = s.shape[0]
    return lambda_ * (s_block(s) - t_block(t)).pow(2).sum() / N


# ------------------------------------------------------------------------------------------------
# the whole loss (eq. 6 without the detector's own loss)
# ------------------------------------------------------------------------------------------------
def _as_list(feats: Sequence[Tensor] | Mapping[str, Tensor]) -> tuple[list[Tensor], list | None]:
    if isinstance(feats, Mapping):
        return list(feats.values()), list(feats.keys())
    return list(feats), None


class FGDLoss(nn.Module):
    """FGD loss summed over FPN levels.

    Trainable parts (optimise them together with the student): per level an ``align`` 1x1 conv
    (student -> teacher channels, only when the channel counts differ; otherwise ``self.align`` is
    None), a student :class:`GcBlock` and a teacher :class:`GcBlock` (both on teacher channels).

    Args:
        student_channels, teacher_channels: FPN channels of student and teacher.
        num_levels: number of FPN levels distilled.
        config: hyperparameters (default :class:`FGDConfig`).

    ``forward(student_feats, teacher_feats, boxes_per_image, strides)``:
        student_feats: L tensors [N, C_s, H_l, W_l] (list/tuple, or a dict such as the OrderedDict a
            torchvision FPN returns; values are taken in order).
        teacher_feats: L tensors [N, C_t, H_l, W_l]; detached here, the teacher gets no gradients.
        boxes_per_image: N tensors [K_i, 4], xyxy in input-to-backbone pixels.
        strides: L strides (e.g. 8, 16, 32 for P3-P5).
    Returns dict of scalars: ``fgd_focal``, ``fgd_attention``, ``fgd_global`` and their sum ``fgd``.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        num_levels: int,
        config: FGDConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config if config is not None else FGDConfig()
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.num_levels = int(num_levels)
        if self.num_levels < 1:
            raise ValueError(f"FGD: num_levels must be >= 1, got {num_levels}")
        if self.student_channels != self.teacher_channels:
            self.align: nn.ModuleList | None = nn.ModuleList(
                nn.Conv2d(self.student_channels, self.teacher_channels, kernel_size=1)
                for _ in range(self.num_levels)
            )
        else:
            self.align = None
        self.student_blocks = nn.ModuleList(GcBlock(self.teacher_channels) for _ in range(self.num_levels))
        self.teacher_blocks = nn.ModuleList(GcBlock(self.teacher_channels) for _ in range(self.num_levels))

    def forward(
        self,
        student_feats: Sequence[Tensor] | Mapping[str, Tensor],
        teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
        boxes_per_image: Sequence[Tensor],
        strides: Sequence[float],
    ) -> dict[str, Tensor]:
        s_list, s_keys = _as_list(student_feats)
        t_list, t_keys = _as_list(teacher_feats)
        if s_keys is not None and t_keys is not None and s_keys != t_keys:
            raise ValueError(f"FGD: student and teacher feature keys differ: {s_keys} vs {t_keys}")
        L = self.num_levels
        if len(s_list) != L or len(t_list) != L or len(strides) != L:
            raise ValueError(
                f"FGD: expected {L} levels, got {len(s_list)} student, {len(t_list)} teacher, "
                f"{len(strides)} strides"
            )
        cfg = self.config
        focal = attn = glob = None
        for lvl, (s, t, stride) in enumerate(zip(s_list, t_list, strides)):
            if s.dim() != 4 or t.dim() != 4:
                raise ValueError(
                    f"FGD level {lvl}: features must be [N, C, H, W], got {tuple(s.shape)}, {tuple(t.shape)}"
                )
            if s.shape[0] != t.shape[0] or s.shape[-2:] != t.shape[-2:]:
                raise ValueError(
                    f"FGD level {lvl}: student {tuple(s.shape)} and teacher {tuple(t.shape)} differ in "
                    "batch size or H, W (they must see the same input images at the same stride)"
                )
            if s.shape[1] != self.student_channels or t.shape[1] != self.teacher_channels:
                raise ValueError(
                    f"FGD level {lvl}: expected {self.student_channels} student / {self.teacher_channels} "
                    f"teacher channels, got {s.shape[1]} / {t.shape[1]}"
                )
            if len(boxes_per_image) != s.shape[0]:
                raise ValueError(f"FGD: {len(boxes_per_image)} box lists for a batch of {s.shape[0]}")
            t = t.detach()
            if self.align is not None:
                s = self.align[lvl](s)
            fg, bg = foreground_masks(boxes_per_image, s.shape[-2:], stride, device=s.device, dtype=s.dtype)
            t_sp, t_ch = spatial_attention(t, cfg.temp), channel_attention(t, cfg.temp)
            s_sp, s_ch = spatial_attention(s, cfg.temp), channel_attention(s, cfg.temp)
            l_f = focal_loss(s, t, fg, bg, t_sp, t_ch, cfg.alpha, cfg.beta)
            l_a = attention_loss(s_sp, s_ch, t_sp, t_ch, cfg.gamma)
            l_g = global_loss(s, t, self.student_blocks[lvl], self.teacher_blocks[lvl], cfg.lambda_)
            focal = l_f if focal is None else focal + l_f
            attn = l_a if attn is None else attn + l_a
            glob = l_g if glob is None else glob + l_g
        return {"fgd_focal": focal, "fgd_attention": attn, "fgd_global": glob, "fgd": focal + attn + glob,
                "distill": focal + attn + glob}


# ------------------------------------------------------------------------------------------------
# PKD: a scale-free alternative (Pearson correlation of standardised features)
# ------------------------------------------------------------------------------------------------
def standardize_channels(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """Each channel to zero mean, unit variance over (N, H, W).  [N, C, H, W] -> [N, C, H, W]."""
    mean = feat.mean(dim=(0, 2, 3), keepdim=True)
    std = feat.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    return (feat - mean) / (std + eps)


def pkd_level_loss(s: Tensor, t: Tensor) -> Tensor:
    """PKD on one level: ``mean((std(S) - std(T))^2) / 2`` = 1 - mean per-channel Pearson r.

    s, t [N, C, H, W] (same shape); returns a scalar in [0, 2].
    """
    return (standardize_channels(s) - standardize_channels(t)).pow(2).mean() / 2


class PKDLoss(nn.Module):
    """PKD summed over FPN levels, ``weight * sum_l pkd_level_loss(align_l(S_l), T_l)``.

    Same call signature and result keys as :class:`FGDLoss` (``boxes_per_image`` and ``strides`` are
    accepted and unused: PKD imitates the whole map). Returns ``{"pkd": ..., "distill": ...}``.
    """

    def __init__(self, student_channels: int, teacher_channels: int, num_levels: int,
                 weight: float = 6.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.num_levels = int(num_levels)
        self.align: nn.ModuleList | None = None
        if int(student_channels) != int(teacher_channels):
            self.align = nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
                                       for _ in range(self.num_levels))

    def forward(self, student_feats, teacher_feats, boxes_per_image=None, strides=None) -> dict[str, Tensor]:
        s_list, _ = _as_list(student_feats)
        t_list, _ = _as_list(teacher_feats)
        if len(s_list) != self.num_levels or len(t_list) != self.num_levels:
            raise ValueError(f"PKD: expected {self.num_levels} levels, got {len(s_list)} student, "
                             f"{len(t_list)} teacher")
        total = None
        for lvl, (s, t) in enumerate(zip(s_list, t_list)):
            if self.align is not None:
                s = self.align[lvl](s)
            if s.shape != t.shape:
                raise ValueError(f"PKD level {lvl}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
            term = pkd_level_loss(s, t.detach())
            total = term if total is None else total + term
        total = self.weight * total
        return {"pkd": total, "distill": total}


def make_distill_loss(kind: str, student_channels: int, teacher_channels: int, num_levels: int,
                      fgd_config: FGDConfig | None = None, pkd_weight: float = 6.0) -> nn.Module:
    """The feature-distillation loss named ``kind`` ("fgd" | "pkd"); its result has key ``distill``."""
    if kind == "fgd":
        return FGDLoss(student_channels, teacher_channels, num_levels, fgd_config)
    if kind == "pkd":
        return PKDLoss(student_channels, teacher_channels, num_levels, pkd_weight)
    raise ValueError(f"unknown distillation loss {kind!r}; expected 'fgd' or 'pkd'")
