"""Where a client's step goes, and what a faster frozen tutor forward would give.

    python -m bench.frozen_forward --threads 1

A Distill C step runs the (frozen) tutor forward and trains the edge; a direct-training step only
trains the edge, so at equal client steps DiReDi's client work is dearer by the tutor's forward. This
times, on one real batch of client 0 of the run in ``--run`` (one thread, as a client actor):

* ``distill_c_step_ms``: one Distill C step split into data, transform, tutor forward (no grad), edge
  forward, detection loss, distillation loss, backward, optimiser step (median of ``--steps``);
* ``distill_c_s``: a client's whole Distill C with the tutor's body as the project runs it, with the
  ResNet stem's max pool on torch's NCHW kernel (as before ``models.ladder.MaxPoolChannelsLast``) and
  scripted for inference (the fastest way below), to see how much of each isolated gain survives
  inside the training loop, and whether the trained edge stays the same bits;
* ``tutor_forward_ms``: the tutor's neck features by ways of running a frozen network for inference:
  eager (what the project runs: the stem's max pool computed in channels-last layout, exact), eager
  with the NCHW max pool (what it ran before), BatchNorm folded into the convolutions (``torch.fx``
  fuse), channels-last memory layout, both, and TorchScript ``freeze`` + ``optimize_for_inference``
  (deprecated since torch 2.9); with each the largest absolute difference from eager (only the NCHW
  pool is bit-identical; each other way would change the trained weights by rounding).

Writes the key ``frozen_forward`` of ``experiments/results/cost.json`` (other keys kept).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

import distill.trainer as trainer
from bench.run_folder import add_run_arguments, open_run, write_cost_keys
from distill.fgd import make_distill_loss
from distill.rd import distill_c, distill_c_phase
from models.ladder import STRIDES, MaxPoolChannelsLast, detection_losses, neck_features


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def distill_c_step_ms(tutor, edge, dataset, settings, steps: int) -> dict[str, float]:
    """Milliseconds per part of a Distill C step (the trainer's own step, taken apart)."""
    phase = distill_c_phase(settings, seed=0)
    student = copy.deepcopy(edge).train()
    distiller = make_distill_loss(phase.distill_loss, student.backbone.out_channels, tutor.backbone.out_channels,
                                  len(STRIDES), phase.fgd, phase.pkd_weight)
    params = list(student.parameters()) + list(distiller.parameters())
    optimizer = trainer.make_optimizer(params, phase)
    generator = torch.Generator().manual_seed(0)
    batches = trainer.infinite_batches(dataset, phase.batch_size, generator)
    parts: dict[str, list[float]] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        parts.setdefault(name, []).append(now - since)
        return now

    for _ in range(steps + 3):  # the first 3 warm up
        t = time.perf_counter()
        images, targets = trainer._prepare(next(batches), phase, generator)
        t = lap("data", t)
        image_list, targets = student.transform(images, targets)
        t = lap("transform", t)
        with torch.no_grad():
            teacher_feats = neck_features(tutor, image_list.tensors)
        t = lap("tutor_forward", t)
        feats = neck_features(student, image_list.tensors)
        t = lap("edge_forward", t)
        det = sum(detection_losses(student, image_list, targets, feats).values())
        t = lap("detection_loss", t)
        raw = distiller(feats, teacher_feats, [x["boxes"] for x in targets], STRIDES)["distill"]
        t = lap("distillation_loss", t)
        optimizer.zero_grad(set_to_none=True)
        (det + raw).backward()
        t = lap("backward", t)
        torch.nn.utils.clip_grad_norm_(params, max_norm=phase.clip_norm)
        optimizer.step()
        lap("optimiser_step", t)
    out = {name: 1000 * statistics.median(values[3:]) for name, values in parts.items()}
    out["total"] = sum(out.values())
    return out


class _PoolAsLeaf(torch.fx.Tracer):
    """Traces a body for ``fuse`` with the stem's max pool as one call (its layout choice branches)."""

    def is_leaf_module(self, module, name) -> bool:
        return isinstance(module, MaxPoolChannelsLast) or super().is_leaf_module(module, name)


def folded(module):
    """A copy of ``module`` with every BatchNorm folded into the convolution before it."""
    module = copy.deepcopy(module)
    return fuse(torch.fx.GraphModule(module, _PoolAsLeaf().trace(module)), no_trace=True)


def with_nchw_pool(model):
    """A copy of ``model`` whose ResNet stem pools with torch's own (NCHW) max-pool kernel."""
    model = copy.deepcopy(model)
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, MaxPoolChannelsLast):
                setattr(module, name, nn.MaxPool2d(child.kernel_size, child.stride, child.padding,
                                                   child.dilation, child.return_indices, child.ceil_mode))
    return model


def tutor_forward_ms(tutor, images: torch.Tensor, repeats: int) -> dict[str, dict[str, float]]:
    """The tutor's neck features, eager and by five other ways, with their deviation."""
    backbone = tutor.backbone.eval()
    channels_last = images.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = list(backbone(images).values())
        last = copy.deepcopy(backbone).to(memory_format=torch.channels_last)
        ways = {"eager": (backbone, images), "eager_nchw_pool": (with_nchw_pool(backbone), images),
                "bn_folded": (folded(backbone), images), "channels_last": (last, channels_last),
                "bn_folded_channels_last": (folded(backbone).to(memory_format=torch.channels_last), channels_last),
                "torchscript_optimize_for_inference": (scripted_body(backbone, images), images)}
        out = {}
        for name, (module, x) in ways.items():
            features = list(module(x).values())
            out[name] = {"ms": median_ms(lambda m=module, x=x: m(x), repeats),
                         "max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(reference, features))}
    return out


def scripted_body(body, images: torch.Tensor):
    with torch.no_grad():
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(copy.deepcopy(body).eval(), images,
                                                                                 strict=False)))


def distill_c_seconds(tutor, edge, dataset, settings, images: torch.Tensor, repeats: int) -> dict:
    """Seconds of one client's whole Distill C (the run's steps) with the tutor's body as the project
    runs it, with the NCHW stem pool and scripted for inference, interleaved ``repeats`` times; and
    whether each trained edge equals the project's."""
    scripted = copy.deepcopy(tutor)
    scripted.backbone.body = scripted_body(tutor.backbone.body, images)
    teachers = {"eager": tutor, "eager_nchw_pool": with_nchw_pool(tutor),
                "torchscript_optimize_for_inference": scripted}
    seconds: dict[str, list[float]] = {name: [] for name in teachers}
    edges = {}
    for _ in range(repeats):
        for name, teacher in teachers.items():
            start = time.perf_counter()
            edges[name], _ = distill_c(edge, teacher, dataset, settings, seed=0)
            seconds[name].append(time.perf_counter() - start)
    same = {name: all(torch.equal(a, b) for a, b in zip(edges["eager"].state_dict().values(),
                                                         edges[name].state_dict().values()))
            for name in teachers if name != "eager"}
    return {"steps": settings.redistill_iters, **{name: statistics.median(v) for name, v in seconds.items()},
            "trained_edge_identical_to_eager": same}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frozen_forward", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--steps", type=int, default=20, help="Distill C steps timed")
    parser.add_argument("--repeats", type=int, default=15, help="timed forwards per way")
    parser.add_argument("--loop-repeats", type=int, default=2, help="whole Distill C runs per way, interleaved")
    args = parser.parse_args(argv)
    config, session, run = open_run(args.run, args.threads)
    tutor, edge = session.chain.tutor.eval(), session.chain.edge
    dataset = session.workspace.client_train(0)
    settings = config.client_training()
    images = tutor.transform([dataset[i][0] for i in range(settings.batch_size)], None)[0].tensors
    result = {"command": f"python -m bench.frozen_forward --run {args.run} --threads {args.threads} "
                         f"--steps {args.steps} --repeats {args.repeats} --loop-repeats {args.loop_repeats}",
              "batch": list(images.shape),
              "distill_c_step_ms": distill_c_step_ms(tutor, edge, dataset, settings, args.steps),
              "tutor_forward_ms": tutor_forward_ms(tutor, images, args.repeats),
              "distill_c_s": distill_c_seconds(tutor, edge, dataset, settings, images, args.loop_repeats)}
    write_cost_keys(args.out, {"frozen_forward": result})
    print(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
