"""Where models train and evaluate (``models.compute.placed_on``): on the block's device, with the models
back where they were afterwards; the client actors' GPU share (``sim.federation.client_gpus``). The GPU
cases run where torch sees CUDA (``bench/gpu_check.sh`` runs this file on a GPU machine)."""

import json

import pytest
import torch
from torch import nn

from clients.app import client_device
from data.voc import CLASS_INDEX
from distill.rd import ClientTraining, direct_training
from evaluation.ap import per_class_ap
from models.compute import placed_on, work_device
from models.ladder import build_model, get_profile
from sim.federation import client_gpus, ray_init_args

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="torch sees no CUDA device"))]


def tiny_data(n: int = 8, size: int = 64) -> list[tuple[torch.Tensor, dict]]:
    """Images with one box each, of aeroplane or person."""
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(3, size, size, generator=generator),
             {"boxes": torch.tensor([[8.0 + i, 8.0, 40.0 + i, 44.0]]),
              "labels": torch.tensor([CLASS_INDEX["aeroplane" if i % 2 else "person"]]),
              "difficult": torch.tensor([False])})
            for i in range(n)]


def test_work_device_is_the_block_s_device_else_the_model_s():
    model = nn.Linear(2, 2)
    assert work_device(model) == torch.device("cpu")
    with placed_on("meta"):
        assert work_device(model) == torch.device("meta")
        with placed_on(None):
            assert work_device(model) == torch.device("cpu")
    assert work_device(model) == torch.device("cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_training_and_evaluation_in_a_block_run_on_its_device_and_leave_the_models_where_they_were(device):
    edge = build_model("smoke", "edge", seed=0).eval()
    settings = ClientTraining.from_profile(get_profile("smoke"))
    with placed_on(device):
        trained, report = direct_training(edge, tiny_data(), 3, settings, seed=0, proximal_mu=0.1)
        ap, summary = per_class_ap(trained, tiny_data(4), ["aeroplane", "person"])
    assert report.device.startswith(device) and len(report.losses) == 3
    assert all(p.device.type == "cpu" for model in (edge, trained) for p in model.state_dict().values())
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, edge.state_dict()[n])]
    assert changed and set(ap) == {"aeroplane", "person"} and summary["npos.person"] == 2
    assert 0.0 <= summary["mAP"] <= 1.0


def test_client_actors_share_the_gpus_evenly_and_ask_for_none_without_one():
    assert client_gpus(0, 8) == 0.0
    assert client_gpus(1, 8) == 0.125
    assert client_gpus(2, 1) == 1.0  # at most one GPU per actor
    assert client_gpus(1, 0) == 1.0


def test_a_local_ray_instance_counts_the_gpus_and_a_joined_cluster_counts_its_own():
    assert ray_init_args(None, quiet=True, environ={}, gpus=1)["num_gpus"] == 1
    assert ray_init_args(None, quiet=True, environ={})["num_gpus"] == 0
    assert "num_gpus" not in ray_init_args("10.0.0.1:6379", quiet=True, environ={}, gpus=1)


def test_a_client_trains_on_the_cpu_unless_the_run_names_a_gpu_and_stops_with_one_line_when_it_sees_none():
    assert client_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert client_device("cuda:0") == torch.device("cuda")  # Ray shows an actor its share as "cuda"
    else:
        with pytest.raises(RuntimeError, match="sees no CUDA device") as err:
            client_device("cuda")
        assert "\n" not in str(err.value)


def test_a_timing_run_of_the_chain_trains_each_stage_the_steps_asked_and_is_cached_apart(smoke_cache, tmp_path, capsys):
    """``bench.chain --steps N`` (the GPU check's paper-profile timing) trains N steps a stage, on its
    own cache keys; a second call reuses them; 0 steps stop with one line."""
    from bench.chain import main

    args = ["--profile", "smoke", "--steps", "2", "--device", "cpu", "--threads", "1", "--cache", str(smoke_cache)]
    assert main([*args, "--out", str(tmp_path / "first.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "second.json")]) == 0
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert {stage: report["iters"] for stage, report in first["stages"].items()} == dict.fromkeys(
        ("teacher", "distill_a", "distill_b"), 2)
    assert first["device"] == "cpu" and all(report["reused_cache"] for report in second["stages"].values())
    assert not any(report["reused_cache"] for report in first["stages"].values())  # not the profile's chain
    with pytest.raises(SystemExit):
        main([*args[:2], "--steps", "0"])
    assert "--steps must be at least 1" in capsys.readouterr().err


def test_the_cpu_model_is_read_from_the_machine():
    """A study's chain.json records the make that built its chain (experiments.compare.check_chain)."""
    from models.compute import _cpuinfo, cpu_model

    model = cpu_model()
    assert isinstance(model, str) and model and "\n" not in model
    names = _cpuinfo("model name")
    assert model.startswith(names[0] if names else model)
    if _cpuinfo("cpu family"):  # the numbers tell apart two models of one name (they build two chains)
        assert f"family {_cpuinfo('cpu family')[0]}, model {_cpuinfo('model')[0]})" in model
    assert _cpuinfo("no such field") == []
