"""The compute setting (models.compute): bfloat16 bodies where asked and supported, float32 where forced,
channels-last layout; weights, deltas, losses and AP float32 whatever the setting."""

import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from distill.body_memo import input_key
from distill.chain import stage_key
from distill.rd import ClientTraining, client_delta, reverse_distill_tutor1, reverse_distill_tutor2
from evaluation.ap import per_class_ap
from models.compute import FLOAT32, Compute, computing, current_compute, supports_bfloat16
from models.ladder import build_model, get_profile
from protocol.config import ConfigError, RunConfig, resolve_run_config

BF16 = Compute("bfloat16")
needs_bf16 = pytest.mark.skipif(not supports_bfloat16("cpu"), reason="this CPU has no AVX-512 BF16 / AMX")


def conv_dtypes(model: nn.Module, run) -> dict[str, set]:
    """The output dtypes of every convolution in the model's body and in its neck/head while ``run()``."""
    seen = {"body": set(), "rest": set()}
    hooks = [m.register_forward_hook(lambda mod, inp, out, part=part: seen[part].add(out.dtype))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
             for part in ["body" if name.startswith("backbone.body") else "rest"]]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def images(n: int = 2, size: int = 128) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, size, size, generator=generator) for _ in range(n)]


def test_float32_is_the_default_and_outside_any_block():
    assert current_compute() == FLOAT32 == RunConfig().compute()
    with computing(BF16):
        assert current_compute().precision in ("bfloat16",)
    assert current_compute() == FLOAT32


def test_auto_resolves_to_what_the_machine_has():
    expected = "bfloat16" if supports_bfloat16("cpu") else "float32"
    with computing(Compute("auto")) as resolved:
        assert resolved.precision == expected == current_compute().precision


@needs_bf16
def test_bfloat16_runs_the_resnet_body_only_and_hands_float32_on():
    tutor = build_model("cpu", "tutor", seed=0).eval()
    with torch.no_grad(), computing(BF16):
        seen = conv_dtypes(tutor, lambda: tutor(images()))
        detections = tutor(images())
    assert seen == {"body": {torch.bfloat16}, "rest": {torch.float32}}
    assert all(d["scores"].dtype == d["boxes"].dtype == torch.float32 for d in detections)
    edge = build_model("cpu", "edge", seed=0).eval()  # MobileNetV2: no faster bfloat16 kernels, kept float32
    with torch.no_grad(), computing(BF16):
        assert conv_dtypes(edge, lambda: edge(images())) == {"body": {torch.float32}, "rest": {torch.float32}}


def test_forced_float32_runs_float32_everywhere():
    tutor = build_model("cpu", "tutor", seed=0).eval()
    with torch.no_grad(), computing(Compute("float32")):
        assert conv_dtypes(tutor, lambda: tutor(images())) == {"body": {torch.float32}, "rest": {torch.float32}}


def test_the_default_forward_is_torchvisions_bit_for_bit():
    tutor = build_model("cpu", "tutor", seed=0).eval()
    plain = IntermediateLayerGetter(tutor.backbone.body, {"layer2": "0", "layer3": "1", "layer4": "2"})
    x = torch.stack(images())
    with torch.no_grad():
        ours, theirs = tutor.backbone.body(x), plain(x)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_channels_last_changes_the_layout_not_the_detections():
    edge = build_model("cpu", "edge", seed=0).eval()
    layouts = []
    first = next(m for m in edge.modules() if isinstance(m, nn.Conv2d))
    hook = first.register_forward_pre_hook(lambda mod, inp: layouts.append(
        inp[0].is_contiguous(memory_format=torch.channels_last)))
    x = torch.stack(images())
    with torch.no_grad():
        nchw = edge.backbone(x)
        with computing(Compute(layout="channels-last")):
            nhwc = edge.backbone(x)
    hook.remove()
    assert layouts == [False, True]
    assert all(torch.allclose(nchw[k], nhwc[k], atol=1e-4) for k in nchw)


@needs_bf16
def test_a_bfloat16_client_round_keeps_weights_deltas_and_ap_float32(smoke_cache):
    from session.workspace import prepare

    ws = prepare("smoke", "default8", num_clients=2, cache_dir=smoke_cache)
    profile = get_profile("cpu")  # a ResNet tutor, so bfloat16 really runs
    tutor, edge = build_model(profile, "tutor", seed=0), build_model(profile, "edge", seed=1)
    settings = ClientTraining(rd_iters=2, redistill_iters=1, batch_size=2)
    with computing(BF16):
        t1, report = reverse_distill_tutor1(tutor, edge, ws.client_presumed(0), settings, seed=0)
        t2, _ = reverse_distill_tutor2(tutor, t1, edge, ws.client_train(0), settings, seed=0)
        delta = client_delta(t1, t2, settings)
        ap, summary = per_class_ap(t2, ws.client_test(0), ws.eval_classes())
    assert all(p.dtype == torch.float32 for p in t2.parameters())
    assert all(t.dtype == torch.float32 for t in delta.values()) and any(t.abs().sum() > 0 for t in delta.values())
    assert all(isinstance(v, float) for v in ap.values()) and all(torch.isfinite(torch.tensor(report.losses)))


def test_the_setting_keys_the_chain_and_the_body_memo():
    parts = {"stage": "teacher", "seed": 0}
    assert stage_key({**parts, "compute": BF16.to_dict()}) != stage_key(parts)
    x = torch.stack(images(1))
    keys = {input_key(x)}
    for compute in (BF16, Compute(layout="channels-last")):
        with computing(compute):
            keys.add(input_key(x))
    assert len(keys) == 3


def test_bad_settings_are_refused_before_work():
    with pytest.raises(ConfigError, match="precision"):
        resolve_run_config({"precision": "float16"})
    with pytest.raises(ConfigError, match="layout"):
        resolve_run_config({"layout": "nhwc"})
    with pytest.raises(ValueError, match="precision"):
        Compute("half")


def test_flops_count_a_grouped_convolutions_backward_as_twice_its_forward():
    from bench.flops import count_flops

    for groups in (1, 4, 64):
        conv = nn.Conv2d(64, 64, 3, padding=1, groups=groups)
        x = torch.rand(2, 64, 16, 16, requires_grad=True)
        forward = 2 * 2 * 16 * 16 * 64 * (64 // groups) * 9  # 2 FLOPs per multiply-add
        assert count_flops(lambda: conv(x)) == forward
        assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward  # + input and weight gradients
        x.requires_grad_(False)  # the first layer: no input gradient
        assert count_flops(lambda: conv(x).sum().backward()) == 2 * forward


def test_the_forward_flops_by_part_add_up_to_the_whole_forward():
    from bench.flops import count_flops, forward_flops_by_part
    from models.ladder import build_model

    model = build_model("smoke", "edge", seed=0).eval()
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    parts = forward_flops_by_part(model, images)
    batched = model.transform(images)[0].tensors
    with torch.no_grad():
        whole = count_flops(lambda: model.head(list(model.backbone(batched).values())))
    assert set(parts) == {"body", "fpn", "classification_head", "regression_head"}
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) == whole
