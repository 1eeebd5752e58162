"""Balanced distillation, PKD, inheriting, Distill C's default and devices."""

import pytest
import torch
from torch.utils.data import Subset

import distill.rd as rd
from distill.fgd import PKDLoss, pkd_level_loss, standardize_channels
from distill.trainer import KDRecipe, LossBalance, Phase, resolve_device, to_device, train
from models.ladder import build_model, get_profile
from models.parts import inherit_neck_head, neck_head, split_parameters
from session.workspace import prepare


@pytest.fixture(scope="module")
def ws(smoke_cache):
    return prepare("smoke", "exp1", num_clients=1, seed=0, cache_dir=smoke_cache)


# -- PKD -----------------------------------------------------------------------------------------
def test_pkd_is_one_minus_pearson_and_scale_free():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(4, 8, 6, 6, generator=g)
    s = 0.5 * t + torch.randn(4, 8, 6, 6, generator=g)
    loss = pkd_level_loss(s, t)
    # 1 - Pearson r per channel over (N, H, W), averaged over channels.
    sc, tc = s.transpose(0, 1).reshape(8, -1), t.transpose(0, 1).reshape(8, -1)
    r = torch.stack([torch.corrcoef(torch.stack([a, b]))[0, 1] for a, b in zip(sc, tc)])
    assert loss.item() == pytest.approx(float(1 - r.mean()), abs=1e-4)
    # Multiplying the student's features by 1000 leaves the loss where it was; FGD's would grow 1e6x.
    assert pkd_level_loss(1000 * s + 3, t).item() == pytest.approx(loss.item(), abs=1e-4)
    assert pkd_level_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert pkd_level_loss(-t, t).item() == pytest.approx(2.0, abs=1e-4)


def test_standardized_channels_have_zero_mean_unit_variance():
    x = 7 + 3 * torch.randn(2, 5, 4, 4)
    z = standardize_channels(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(5), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(5), atol=1e-4)


def test_pkd_loss_aligns_channels_and_weights_levels():
    loss = PKDLoss(4, 8, num_levels=2, weight=6.0)
    s = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    t = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4)]
    out = loss(s, t)
    assert out["distill"] is out["pkd"]
    expected = 6.0 * sum(pkd_level_loss(loss.align[i](s[i]), t[i]) for i in range(2))
    assert out["distill"].item() == pytest.approx(expected.item(), rel=1e-5)


# -- the balance setting ---------------------------------------------------------------------------
def test_loss_balance_modes():
    fixed = LossBalance("fixed", 1.0)
    assert fixed.update(2.0, 500.0) == 1.0
    calibrated = LossBalance("calibrated", 0.5)
    assert calibrated.update(2.0, 500.0) == pytest.approx(0.5 * 2.0 / 500.0)
    assert calibrated.update(1.0, 100.0) == pytest.approx(0.5 * 2.0 / 500.0)  # held from step 0
    auto = LossBalance("auto", 1.0, momentum=0.0)  # no smoothing: exactly det / raw every step
    assert auto.update(2.0, 500.0) == pytest.approx(2.0 / 500.0)
    assert auto.update(1.0, 100.0) == pytest.approx(1.0 / 100.0)
    with pytest.raises(ValueError, match="unknown balance"):
        LossBalance("loud", 1.0)


def _kd_report(ws, **fields):
    data = Subset(ws.chain_data().presumed_train, range(16))
    teacher = build_model("smoke", "teacher", seed=0)
    student = build_model("smoke", "tutor", seed=1)
    phase = Phase("kd", iters=6, batch_size=8, lr=1e-3, optimizer="adamw", hflip=False, **fields)
    return train(student, data, phase, teacher=teacher, progress=False)


def test_balance_sets_the_reported_ratio(ws):
    fixed = _kd_report(ws, distill_loss="fgd", balance="fixed")
    calibrated = _kd_report(ws, distill_loss="fgd", balance="calibrated", target_ratio=0.05)
    auto = _kd_report(ws, distill_loss="fgd", balance="auto", target_ratio=0.05)
    assert len(auto.det_losses) == len(auto.distill_losses) == 6
    # The first step's term is exactly target x the detection loss for calibrated and auto ...
    for report in (calibrated, auto):
        assert report.distill_losses[0] / report.det_losses[0] == pytest.approx(0.05, rel=1e-4)
    # ... while the fixed (paper) weights give whatever the raw loss is.
    assert fixed.distill_losses[0] / fixed.det_losses[0] != pytest.approx(0.05, rel=0.05)
    # auto holds the ratio near its target through the phase.
    assert 0.02 < auto.balance()["loss_ratio_end"] < 0.1
    summary = auto.summary()
    assert {"det_loss_start", "distill_loss_end", "loss_ratio_start", "loss_ratio_end"} <= set(summary)


# -- inheriting ------------------------------------------------------------------------------------
def test_inheriting_copies_the_teachers_neck_head_exactly():
    profile = get_profile("cpu")
    teacher = build_model(profile, "teacher", seed=0)
    tutor = build_model(profile, "tutor", seed=1)
    copied = inherit_neck_head(tutor, teacher)
    t_nh, s_nh = neck_head(teacher), neck_head(tutor)
    # Same FPN width and body: the whole neck and the tutor's whole (shallower) head come over.
    assert set(copied) == set(s_nh)
    for name in copied:
        assert torch.equal(s_nh[name], t_nh[name]), name
    # The backbone is never inherited.
    t_body = split_parameters(teacher)["backbone"]
    s_body = split_parameters(tutor)["backbone"]
    assert not all(torch.equal(s_body[n], t_body[n]) for n in s_body)

    edge = build_model(profile, "edge", seed=2)
    before = neck_head(edge)
    copied = inherit_neck_head(edge, tutor)
    after = neck_head(edge)
    # The edge's lateral 1x1 convs read MobileNetV2 channels: not copyable; its 3x3 FPN convs and head are.
    assert not any(".inner_blocks." in n for n in copied)
    assert any(".layer_blocks." in n for n in copied) and "head.classification_head.cls_logits.weight" in copied
    for name in after:
        expected = s_nh[name] if name in copied else before[name]
        assert torch.equal(after[name], expected), name


def test_default_recipe_inherits_and_balances():
    recipe = KDRecipe()
    assert recipe.inherit and recipe.balance in ("calibrated", "auto")


# -- Distill C ---------------------------------------------------------------------------------------
def test_distill_c_default_uses_labels_plus_distillation(ws, monkeypatch):
    settings = rd.ClientTraining.from_profile(get_profile("smoke"), redistill_iters=2)
    seen = {}
    real_train = rd.train

    def spy(student, dataset, phase, teacher=None, **kw):
        seen["phase"], seen["teacher"] = phase, teacher
        return real_train(student, dataset, phase, teacher=teacher, **kw)

    monkeypatch.setattr(rd, "train", spy)
    edge, tutor = build_model("smoke", "edge", seed=2), build_model("smoke", "tutor", seed=1)
    data = Subset(ws.client_train(0), range(16))
    _, report = rd.distill_c(edge, tutor, data, settings, seed=0)
    phase = seen["phase"]
    assert seen["teacher"] is tutor
    assert phase.targets == "labels" and phase.label_weight > 0 and phase.distill_weight > 0
    assert len(report.distill_losses) == 2 and all(x > 0 for x in report.distill_losses)
    assert all(x > 0 for x in report.det_losses)


# -- devices ---------------------------------------------------------------------------------------
def test_resolve_device_and_batch_moves_with_the_model():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            resolve_device("cuda")
    images, targets = to_device([torch.zeros(3, 8, 8)], [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}],
                                torch.device("cpu"))
    assert images[0].device.type == "cpu" and targets[0]["boxes"].device.type == "cpu"


def test_training_runs_on_the_students_device(ws):
    device = resolve_device("auto")
    data = Subset(ws.chain_data().presumed_train, range(8))
    teacher = build_model("smoke", "teacher", seed=0)  # left on the CPU: train() moves it
    student = build_model("smoke", "tutor", seed=1).to(device)
    report = train(student, data, Phase("kd", iters=2, batch_size=4, hflip=False), teacher=teacher, progress=False)
    assert report.device == str(device)
    assert next(teacher.parameters()).device == next(student.parameters()).device


# -- the ablation harness ----------------------------------------------------------------------------
def test_ablation_harness_writes_the_links_json(tmp_path, smoke_cache):
    import json

    from experiments import ablate

    out = tmp_path / "results"
    code = ablate.main(["--profile", "smoke", "--sections", "links", "--out", str(out),
                        "--cache", str(smoke_cache), "--device", "cpu", "--threads", "1", "--quiet"])
    assert code == 0
    links = json.loads((out / "ablation.json").read_text())["links"]
    assert set(links) == {"distill_a", "distill_b", "distill_c"}
    for row in links.values():
        assert 0.0 <= row["kd_mAP"] <= 100.0 and 0.0 <= row["labels_only_mAP"] <= 100.0
        assert row["steps"] >= 1 and row["loss_ratio_start"] > 0 and row["loss_ratio_end"] > 0
    assert "| distill_c |" in (out / "ablation.md").read_text()


@pytest.mark.slow
def test_a_new_kd_recipe_reuses_the_cached_teacher(tmp_path):
    from distill.chain import manufacturer_chain
    from distill.trainer import PAPER_FGD

    ws = prepare("smoke", "exp1", num_clients=1, seed=0, cache_dir=tmp_path)
    s = ws.scenario
    args = (ws.profile, ws.chain_data(), s.teacher_classes, s.presumed_classes, 0, tmp_path / "chain")
    first = manufacturer_chain(*args, progress=False)
    second = manufacturer_chain(*args, progress=False, recipe=PAPER_FGD)
    assert second.stages["teacher"].reused and second.stages["teacher"].key == first.stages["teacher"].key
    assert not second.stages["distill_a"].reused and second.stages["distill_a"].key != first.stages["distill_a"].key
    third = manufacturer_chain(*args, progress=False, recipe=PAPER_FGD)
    assert all(stage.reused for stage in third.stages.values())
