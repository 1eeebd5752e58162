"""Tests for distill/fgd.py (FGD: focal and global distillation on FPN features)."""

from collections import OrderedDict

import numpy as np
import pytest
import torch

from distill.fgd import (
    FGDConfig,
    FGDLoss,
    GcBlock,
    channel_attention,
    foreground_masks,
    spatial_attention,
)


def _feats(n, c, sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, c, h, h, generator=g) for h in sizes]


# ------------------------------------------------------------------------------------------------
# masks
# ------------------------------------------------------------------------------------------------
def test_box_to_cells_floor_ceil_and_at_least_one_cell():
    # stride 8: x 3..20 -> cells [0, ceil(2.5)=3); y 5..9 -> cells [0, ceil(1.125)=2): 3 x 2 cells
    fg, bg = foreground_masks([torch.tensor([[3.0, 5.0, 20.0, 9.0]])], (4, 4), 8)
    exp = torch.zeros(4, 4)
    exp[0:2, 0:3] = 1 / 6
    assert torch.allclose(fg[0], exp)
    # a degenerate box (zero width/height) still covers one cell; a box past the border is clamped
    fg, _ = foreground_masks([torch.tensor([[9.0, 9.0, 9.0, 9.0], [20.0, 20.0, 100.0, 100.0]])], (4, 4), 8)
    assert fg[0, 1, 1] == 1.0
    assert torch.allclose(fg[0, 2:, 2:], torch.full((2, 2), 0.25))
    assert (fg[0] > 0).sum() == 5


@pytest.mark.parametrize("order", [0, 1])
def test_smaller_box_wins_on_overlap(order):
    big = [0.0, 0.0, 32.0, 32.0]  # 4x4 cells at stride 8 -> 1/16
    small = [8.0, 8.0, 24.0, 24.0]  # 2x2 cells -> 1/4
    boxes = torch.tensor([big, small] if order == 0 else [small, big])
    fg, bg = foreground_masks([boxes], (6, 6), 8)
    assert torch.allclose(fg[0, 1:3, 1:3], torch.full((2, 2), 0.25))
    ring = fg[0, :4, :4].clone()
    ring[1:3, 1:3] = 1 / 16
    assert torch.allclose(ring, torch.full((4, 4), 1 / 16))
    assert torch.all(bg[0, :4, :4] == 0)


def test_background_normalisation():
    boxes = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4), torch.tensor([[8.0, 8.0, 32.0, 24.0]])]
    fg, bg = foreground_masks(boxes, (5, 5), 8)
    assert fg.shape == bg.shape == (3, 5, 5)
    for i in range(3):
        assert torch.isclose(bg[i].sum(), torch.tensor(1.0))
        assert torch.all((bg[i] > 0) == (fg[i] == 0))  # bg exactly where there is no box
    assert torch.allclose(bg[0][bg[0] > 0], torch.full((21,), 1 / 21))
    assert torch.all(fg[1] == 0) and torch.allclose(bg[1], torch.full((5, 5), 1 / 25))
    assert (fg[2] > 0).sum() == 6 and torch.allclose(bg[2][bg[2] > 0], torch.full((19,), 1 / 19))
    # the whole map covered by a box: no background at all
    fg, bg = foreground_masks([torch.tensor([[0.0, 0.0, 40.0, 40.0]])], (5, 5), 8)
    assert torch.all(bg == 0) and torch.allclose(fg, torch.full((1, 5, 5), 1 / 25))


# ------------------------------------------------------------------------------------------------
# loss values
# ------------------------------------------------------------------------------------------------
def test_identical_features_give_exactly_zero():
    feats = _feats(2, 16, (8, 4), seed=0)
    boxes = [torch.tensor([[0.0, 0.0, 20.0, 30.0]]), torch.tensor([[10.0, 4.0, 60.0, 50.0], [0.0, 0.0, 8.0, 8.0]])]
    loss = FGDLoss(16, 16, num_levels=2)
    out = loss(feats, [f.clone() for f in feats], boxes, strides=(8, 16))
    assert set(out) == {"fgd_focal", "fgd_attention", "fgd_global", "fgd", "distill"}
    for k, v in out.items():
        assert v.dim() == 0
        assert v.item() == 0.0, k


def test_foreground_perturbation_costs_more_than_background():
    # Teacher features of constant magnitude (random signs) make both teacher attentions exactly 1
    # everywhere, so the only difference between a perturbation inside the box and the same one in
    # the background is the per-pixel mask weight: alpha * (1 / box area in cells) on the foreground
    # vs beta * (1 / number of background cells) on the background. With the defaults alpha = 2 beta
    # and a 4x4-cell box on a 16x16 map (240 background cells), one foreground cell weighs
    # 1.6e-3/16 = 1e-4 against 8e-4/240 = 3.3e-6 for a background cell: 30x. (A box covering more
    # than ~2/3 of the map would flip this: the background weight grows as the background shrinks.)
    g = torch.Generator().manual_seed(1)
    C, H = 8, 16
    t = torch.where(torch.rand(1, C, H, H, generator=g) > 0.5, 1.0, -1.0)
    boxes = [torch.tensor([[32.0, 32.0, 64.0, 64.0]])]  # stride 8 -> cells 4..7 x 4..7
    cfg = FGDConfig()
    loss = FGDLoss(C, C, num_levels=1, config=cfg)
    delta = 0.3 * torch.randn(1, C, 2, 2, generator=g)

    def focal_with_patch(y, x):
        s = t.clone()
        s[:, :, y : y + 2, x : x + 2] += delta  # same perturbation, same area (2x2 cells)
        return loss([s], [t], boxes, strides=[8])["fgd_focal"].item()

    assert loss([t.clone()], [t], boxes, strides=[8])["fgd_focal"].item() == 0.0
    inc_fg = focal_with_patch(5, 5)  # inside the box
    inc_bg = focal_with_patch(11, 11)  # background
    assert inc_fg > 10 * inc_bg
    expected_ratio = (cfg.alpha / 16) / (cfg.beta / (H * H - 16))
    assert inc_fg / inc_bg == pytest.approx(expected_ratio, rel=1e-5)


def _np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _np_gcblock(x, wk, bk, w1, b1, ln_g, ln_b, w2, b2, eps=1e-5):
    """R(F) for one image, x [C, H, W], written out in numpy."""
    C, H, W = x.shape
    flat = x.reshape(C, H * W)
    p = _np_softmax(wk @ flat + bk)  # [HW]
    ctx = flat @ p  # [C]
    h = w1 @ ctx + b1  # [mid]
    h = (h - h.mean()) / np.sqrt(h.var() + eps) * ln_g + ln_b
    out = w2 @ np.maximum(h, 0.0) + b2  # [C]
    return x + out[:, None, None]


def test_hand_computed_tiny_case():
    # N=1, C=2, H=W=2, stride 8; the box maps to cells x in [1, 2), y in [0, 1): the single cell (0, 1).
    S = np.array([[[1.0, -2.0], [0.5, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]])
    T = np.array([[[0.5, -1.0], [1.5, 2.0]], [[0.0, 0.5], [-2.5, 1.0]]])
    box = torch.tensor([[8.5, 0.2, 15.9, 7.0]], dtype=torch.float64)
    cfg = FGDConfig(temp=0.5, alpha=2.0, beta=0.5, gamma=0.25, lambda_=0.1)

    torch.manual_seed(0)
    loss = FGDLoss(2, 2, num_levels=1, config=cfg).double()
    # give both global-context blocks a non-trivial last conv so R is not the identity
    for blk in (loss.student_blocks[0], loss.teacher_blocks[0]):
        torch.nn.init.normal_(blk.conv2.weight)
        torch.nn.init.normal_(blk.conv2.bias)
        torch.nn.init.normal_(blk.norm.weight)
    out = loss([torch.tensor(S[None])], [torch.tensor(T[None])], [box], strides=[8])

    # ---- by hand ----
    fg = np.array([[0.0, 1.0], [0.0, 0.0]])  # one-cell box: scale mask 1/1
    bg = np.array([[1.0, 0.0], [1.0, 1.0]]) / 3  # three background cells

    def sp(F):
        return 4 * _np_softmax(np.abs(F).mean(0).ravel() / cfg.temp).reshape(2, 2)

    def ch(F):
        return 2 * _np_softmax(np.abs(F).mean((1, 2)) / cfg.temp)

    w = sp(T)[None] * ch(T)[:, None, None]
    d2 = (S - T) ** 2
    focal = cfg.alpha * (fg[None] * w * d2).sum() + cfg.beta * (bg[None] * w * d2).sum()
    attn = cfg.gamma * (np.abs(ch(S) - ch(T)).sum() + np.abs(sp(S) - sp(T)).sum())

    def params(blk):
        return [
            blk.conv_mask.weight.detach().numpy().reshape(-1),
            blk.conv_mask.bias.detach().numpy()[0],
            blk.conv1.weight.detach().numpy()[:, :, 0, 0],
            blk.conv1.bias.detach().numpy(),
            blk.norm.weight.detach().numpy().reshape(-1),
            blk.norm.bias.detach().numpy().reshape(-1),
            blk.conv2.weight.detach().numpy()[:, :, 0, 0],
            blk.conv2.bias.detach().numpy(),
        ]

    Rs = _np_gcblock(S, *params(loss.student_blocks[0]))
    Rt = _np_gcblock(T, *params(loss.teacher_blocks[0]))
    glob = cfg.lambda_ * ((Rs - Rt) ** 2).sum()
    assert not np.allclose(Rs, S)  # the block really did something

    assert out["fgd_focal"].item() == pytest.approx(focal, rel=1e-10)
    assert out["fgd_attention"].item() == pytest.approx(attn, rel=1e-10)
    assert out["fgd_global"].item() == pytest.approx(glob, rel=1e-10)
    assert out["fgd"].item() == pytest.approx(focal + attn + glob, rel=1e-10)


def test_attention_maps_have_mean_one():
    f = _feats(3, 5, (6,), seed=2)[0]
    a_s, a_c = spatial_attention(f, 0.8), channel_attention(f, 0.8)
    assert a_s.shape == (3, 6, 6) and a_c.shape == (3, 5)
    assert torch.allclose(a_s.mean((1, 2)), torch.ones(3)) and torch.allclose(a_c.mean(1), torch.ones(3))


def test_batch_normalisation_is_per_image():
    # duplicating the batch must not change the loss (everything is divided by N)
    s, t = _feats(1, 8, (8,), seed=3), _feats(1, 8, (8,), seed=4)
    boxes = [torch.tensor([[4.0, 4.0, 30.0, 40.0]])]
    loss = FGDLoss(8, 8, 1)
    one = loss(s, t, boxes, [8])
    two = loss([s[0].repeat(2, 1, 1, 1)], [t[0].repeat(2, 1, 1, 1)], boxes * 2, [8])
    for k in one:
        assert two[k].item() == pytest.approx(one[k].item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------
# module structure, gradients, input checks
# ------------------------------------------------------------------------------------------------
def test_align_only_when_channels_differ():
    same = FGDLoss(64, 64, num_levels=3)
    assert same.align is None
    assert not any("align" in n for n, _ in same.named_parameters())

    diff = FGDLoss(32, 64, num_levels=3)
    assert diff.align is not None and len(diff.align) == 3
    x = torch.randn(2, 32, 8, 8)
    assert diff.align[1](x).shape == (2, 64, 8, 8)
    assert len(diff.student_blocks) == len(diff.teacher_blocks) == 3
    assert diff.student_blocks[0].channels == 64


def test_gradients_reach_student_and_blocks_not_teacher():
    s = [f.requires_grad_() for f in _feats(2, 32, (8, 4), seed=5)]
    t = [f.requires_grad_() for f in _feats(2, 64, (8, 4), seed=6)]
    boxes = [torch.tensor([[0.0, 0.0, 24.0, 24.0]]), torch.tensor([[16.0, 8.0, 64.0, 40.0]])]
    loss = FGDLoss(32, 64, num_levels=2)
    out = loss(s, t, boxes, strides=[8, 16])
    assert all(v.item() > 0 for v in out.values())
    out["fgd"].backward()
    for f in s:
        assert f.grad is not None and f.grad.abs().sum() > 0
    for f in t:
        assert f.grad is None
    for conv in loss.align:
        assert conv.weight.grad.abs().sum() > 0
    # with the zero-initialised last conv, the first gradient reaches only conv2 of each block
    for blk in list(loss.student_blocks) + list(loss.teacher_blocks):
        assert blk.conv2.weight.grad.abs().sum() > 0


def test_dict_input_same_as_list():
    s, t = _feats(2, 16, (8, 4), seed=7), _feats(2, 16, (8, 4), seed=8)
    boxes = [torch.tensor([[0.0, 0.0, 24.0, 24.0]]), torch.zeros(0, 4)]
    loss = FGDLoss(16, 16, 2)
    a = loss(s, t, boxes, [8, 16])
    b = loss(OrderedDict(zip("01", s)), OrderedDict(zip("01", t)), boxes, [8, 16])
    for k in a:
        assert torch.equal(a[k], b[k])


def test_shape_mismatch_raises():
    loss = FGDLoss(16, 16, 1)
    boxes = [torch.zeros(0, 4)] * 2
    with pytest.raises(ValueError, match="H, W"):
        loss([torch.randn(2, 16, 8, 8)], [torch.randn(2, 16, 8, 6)], boxes, [8])
    with pytest.raises(ValueError, match="batch"):
        loss([torch.randn(2, 16, 8, 8)], [torch.randn(3, 16, 8, 8)], boxes, [8])
    with pytest.raises(ValueError, match="levels"):
        loss([torch.randn(2, 16, 8, 8)] * 2, [torch.randn(2, 16, 8, 8)] * 2, boxes, [8, 16])


def test_gcblock_starts_as_identity():
    blk = GcBlock(12)
    x = torch.randn(3, 12, 5, 7)
    assert torch.equal(blk(x), x)
    assert blk.mid_channels == 8  # max(8, 12 // 2)
