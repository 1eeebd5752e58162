"""Model ladder parts and the neck/head knowledge math (eqs. 9 and 10)."""

import pytest
import torch

from models.io import CorruptWeights, load_weights, save_weights
from torch import nn

from models.ladder import (PROFILES, ROLES, MaxPoolChannelsLast, build_model, build_to_load, detection_losses,
                          get_profile, neck_features)
from models.parts import (ArchitectureMismatch, knowledge_delta, load_neck_head, neck_head, part_of,
                          split_parameters, substitute)


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("role", ROLES)
def test_parts_partition_parameters_exactly(profile, role):
    model = build_model(profile, role)
    parts = split_parameters(model)
    names = [n for n, _ in model.named_parameters()]
    flat = [n for part in parts.values() for n in part]
    assert sorted(flat) == sorted(names)  # every parameter in exactly one part
    assert all(len(parts[p]) > 0 for p in ("backbone", "neck", "head"))
    # Buffers (BatchNorm statistics) live only in the backbone, so a neck/head delta is parameters only.
    assert all(part_of(n) == "backbone" for n, _ in model.named_buffers())


def test_ladder_capacity_and_feature_shapes():
    for name in ("smoke", "cpu", "paper"):
        sizes = [sum(p.numel() for p in build_model(name, r).parameters()) for r in ROLES]
        assert sizes[0] > sizes[1] > sizes[2], (name, sizes)
    profile = get_profile("smoke")
    model = build_model(profile, "edge", seed=0)
    images = [torch.rand(3, profile.image_size, profile.image_size) for _ in range(2)]
    image_list, _ = model.transform(images)
    feats = neck_features(model, image_list.tensors)
    s = profile.image_size
    assert [tuple(f.shape) for f in feats] == [(2, 32, s // 8, s // 8), (2, 32, s // 16, s // 16), (2, 32, s // 32, s // 32)]


def test_detection_losses_match_fcos_forward():
    model = build_model("smoke", "tutor", seed=0).train()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([3])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 60.0]]), "labels": torch.tensor([7])}]
    torch.manual_seed(0)
    expected = model(images, targets)
    image_list, t = model.transform(images, targets)
    ours = detection_losses(model, image_list, t, neck_features(model, image_list.tensors))
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key])


def test_build_is_seeded_and_unknown_names_fail():
    a, b = build_model("smoke", "edge", seed=3), build_model("smoke", "edge", seed=3)
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")
    with pytest.raises(ValueError, match="unknown model role"):
        build_model("smoke", "student")


def test_fast_stem_pool_gives_the_same_values_and_gradients():
    # ReLU zeros make tied windows: the case where two pooling kernels could disagree.
    x = torch.relu(torch.randn(2, 8, 17, 16, generator=torch.Generator().manual_seed(0)))
    fast, plain = MaxPoolChannelsLast(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    with torch.no_grad():  # the channels-last path
        out = fast(x)
        assert out.is_contiguous() and torch.equal(out, plain(x))
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(a).square().sum().backward()
    plain(b).square().sum().backward()
    assert torch.equal(a.grad, b.grad)
    body = build_model("cpu", "tutor").backbone.body  # a ResNet body: its stem uses it
    assert isinstance(body.maxpool, MaxPoolChannelsLast)


@pytest.mark.parametrize("role", ROLES)
def test_build_to_load_equals_build_then_load(role):
    reference = build_model("smoke", role, seed=3).eval()
    loaded = build_to_load("smoke", role, reference.state_dict()).eval()
    images = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(reference(images)[0].values(), loaded(images)[0].values()))
    with pytest.raises(RuntimeError, match="Missing key"):  # a partial state is refused, not left random
        build_to_load("smoke", role, neck_head(reference))


def test_delta_substitution_round_trip():
    """Applying nh(B) - nh(A) to A gives B's neck/head, and leaves A's backbone alone."""
    a, b = build_model("smoke", "tutor", seed=1), build_model("smoke", "tutor", seed=2)
    delta = knowledge_delta(neck_head(a), neck_head(b))
    updated = substitute(neck_head(a), delta, beta=1.0)
    load_neck_head(a, updated)
    for name, value in neck_head(b).items():
        torch.testing.assert_close(dict(a.named_parameters())[name], value, rtol=0, atol=1e-6)
    backbone_a = split_parameters(a)["backbone"]
    backbone_b = split_parameters(b)["backbone"]
    assert any(not torch.equal(backbone_a[n], backbone_b[n]) for n in backbone_a)


def test_substitution_factor_scales_delta():
    a = neck_head(build_model("smoke", "tutor", seed=1))
    delta = {k: torch.ones_like(v) for k, v in a.items()}
    half = substitute(a, delta, beta=0.5)
    for k in a:
        torch.testing.assert_close(half[k], a[k] + 0.5)
    zero = knowledge_delta(a, a)
    assert all(torch.count_nonzero(v) == 0 for v in zero.values())


def test_architecture_mismatch_is_a_clear_error():
    tutor = neck_head(build_model("smoke", "tutor"))
    edge = neck_head(build_model("smoke", "edge"))  # same keys, narrower FPN inputs
    teacher = neck_head(build_model("smoke", "teacher"))  # more head convs: other keys
    with pytest.raises(ArchitectureMismatch, match="has shape"):
        knowledge_delta(tutor, edge)
    with pytest.raises(ArchitectureMismatch, match="key sets differ"):
        knowledge_delta(tutor, teacher)
    partial = dict(list(tutor.items())[1:])
    with pytest.raises(ArchitectureMismatch, match="key sets differ"):
        substitute(tutor, partial)
    with pytest.raises(ArchitectureMismatch):
        load_neck_head(build_model("smoke", "edge"), teacher)


def test_safetensors_round_trip_and_corruption(tmp_path):
    model = build_model("smoke", "edge", seed=5)
    path = save_weights(model, tmp_path / "edge.safetensors")
    other = load_weights(build_model("smoke", "edge", seed=6), path)
    for (n, x), (_, y) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(x, y), n
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CorruptWeights, match="unreadable"):
        load_weights(model, path)
    save_weights(build_model("smoke", "tutor"), tmp_path / "tutor.safetensors")
    with pytest.raises(CorruptWeights, match="has shape"):
        load_weights(model, tmp_path / "tutor.safetensors")
    save_weights(build_model("smoke", "teacher"), tmp_path / "teacher.safetensors")
    with pytest.raises(CorruptWeights, match="does not fit"):
        load_weights(model, tmp_path / "teacher.safetensors")


def test_with_class_rows_takes_only_the_named_classes_rows_and_leaves_both_models():
    from models.parts import CLASS_ROW_PARAMS, with_class_rows

    a, b = build_model("smoke", "edge", seed=1), build_model("smoke", "edge", seed=2)
    before_a = {k: v.clone() for k, v in a.state_dict().items()}
    out = with_class_rows(a, b, [3, 7]).state_dict()
    for name, value in out.items():
        if name in CLASS_ROW_PARAMS:
            assert torch.equal(value[[3, 7]], b.state_dict()[name][[3, 7]])
            rest = [c for c in range(value.shape[0]) if c not in (3, 7)]
            assert torch.equal(value[rest], before_a[name][rest])
        else:
            assert torch.equal(value, before_a[name]), name
    assert all(torch.equal(v, before_a[k]) for k, v in a.state_dict().items())  # a copy: a is unchanged
    assert all(torch.equal(x, y) for x, y in zip(with_class_rows(a, b, []).state_dict().values(), before_a.values()))


def test_interpolate_weights_moves_floats_part_way_and_takes_the_new_step_count():
    from models.parts import interpolate_weights

    old = build_model("smoke", "edge", seed=0).state_dict()
    new = build_model("smoke", "edge", seed=1).state_dict()
    new["backbone.body.0.1.num_batches_tracked"] = torch.tensor(7)
    half = interpolate_weights(old, new, 0.5)
    assert half.keys() == new.keys()
    for k, v in new.items():
        if v.is_floating_point():
            assert torch.allclose(half[k], (old[k] + v) / 2, atol=1e-6)
        else:
            assert torch.equal(half[k], v)
    assert all(torch.equal(interpolate_weights(old, new, 1.0)[k], v) for k, v in new.items())
    assert all(torch.equal(interpolate_weights(old, new, 0.0)[k], old[k]) for k, v in new.items() if v.is_floating_point())
    with pytest.raises(ArchitectureMismatch):
        interpolate_weights(old, build_model("smoke", "tutor", seed=0).state_dict(), 0.5)


def test_interpolate_weights_keeps_the_named_class_rows_of_the_new_weights():
    from models.parts import CLASS_ROW_PARAMS, interpolate_weights

    old = build_model("smoke", "edge", seed=0).state_dict()
    new = build_model("smoke", "edge", seed=1).state_dict()
    half = interpolate_weights(old, new, 0.5, new_rows=[3, 7])
    for name in CLASS_ROW_PARAMS:
        assert torch.equal(half[name][[3, 7]], new[name][[3, 7]])
        assert torch.allclose(half[name][[0, 5]], (old[name][[0, 5]] + new[name][[0, 5]]) / 2, atol=1e-6)
    neck = "backbone.fpn.inner_blocks.0.0.weight"
    assert torch.allclose(half[neck], (old[neck] + new[neck]) / 2, atol=1e-6)
