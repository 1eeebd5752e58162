"""Seconds, FLOPs and achieved FLOP/s of each model's steps, per compute setting (``models.compute``).

    python -m bench.step_time --profile cpu --threads 1 --repeats 3

For each model of the profile and each setting (float32 / bfloat16 x NCHW / channels-last; bfloat16
only where the CPU has it), on a synthetic batch of the profile's round batch size:

* ``train``: one labels-only training step (forward, backward, AdamW), as direct training and the
  chain's teacher run it;
* ``frozen``: the body and neck's forward without gradient, as RD and Distill C run their frozen
  teachers (the tutor's body) and as evaluation runs every model.

FLOPs are torch's count with a grouped convolution's backward counted right (``bench.flops``:
convolutions and matrix products, 2 per multiply-add, backward included); they do not depend on the
setting. GFLOP/s is that count over the
median seconds of ``--steps`` timed steps (after ``--warmup``), the best of ``--repeats`` rounds of
all settings interleaved. The core's peaks are measured the same way on a 1024 x 1024 matrix product
(float32, and bfloat16 where supported), the most this machine's kernels get from ``--threads``
threads. Writes the key ``step_time`` of ``experiments/results/cost.json`` (other keys kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.flops import count_flops
from bench.run_folder import COST_FILE, write_cost_keys
from models.compute import Compute, computing, supports_bfloat16
from models.ladder import ROLES, build_model, count_parameters, get_profile, neck_features


def settings() -> list[Compute]:
    precisions = ["float32"] + (["bfloat16"] if supports_bfloat16("cpu") else [])
    return [Compute(p, layout) for p in precisions for layout in ("nchw", "channels-last")]


def synthetic_batch(size: int, batch: int) -> tuple[list[torch.Tensor], list[dict]]:
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]) * size,
                "labels": torch.tensor([i % 20, (i + 7) % 20])} for i in range(batch)]
    return images, targets


def step_fn(profile, role: str, kind: str, images, targets):
    """A fresh model of ``role`` and the function running one ``kind`` step of it."""
    model = build_model(profile, role, seed=0)
    if kind == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model, step
    model.eval()
    batched = model.transform(images)[0].tensors

    def step():
        with torch.no_grad():
            neck_features(model, batched)
    return model, step


def median_seconds(step, warmup: int, steps: int) -> float:
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_peak(dtype: torch.dtype, n: int = 1024, steps: int = 20) -> float:
    """GFLOP/s of an n x n matrix product in ``dtype``: the most the kernels get from these threads."""
    a, b = torch.rand(n, n).to(dtype), torch.rand(n, n).to(dtype)
    seconds = median_seconds(lambda: a @ b, warmup=3, steps=steps)
    return 2 * n**3 / seconds / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="default: the profile's round batch size")
    parser.add_argument("--roles", default=",".join(ROLES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every setting, interleaved; best kept")
    parser.add_argument("--out", default=str(COST_FILE), help="cost file to write ('' to write nothing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    batch = args.batch_size or profile.rounds.batch_size
    images, targets = synthetic_batch(profile.image_size, batch)
    roles = [r for r in args.roles.split(",") if r]
    cases = [(role, kind) for role in roles for kind in ("train", "frozen")]
    peaks = {"float32": gemm_peak(torch.float32)}
    if supports_bfloat16("cpu"):
        peaks["bfloat16"] = gemm_peak(torch.bfloat16)
    flops, params, seconds = {}, {}, {}
    for role, kind in cases:
        model, step = step_fn(profile, role, kind, images, targets)
        flops[role, kind], params[role] = count_flops(step), count_parameters(model)
    for _ in range(args.repeats):
        for role, kind in cases:
            for compute in settings():
                with computing(compute):
                    _, step = step_fn(profile, role, kind, images, targets)
                    s = median_seconds(step, args.warmup, args.steps)
                key = (role, kind, compute.precision, compute.layout)
                seconds[key] = min(seconds.get(key, s), s)
    rows = []
    for (role, kind, precision, layout), s in seconds.items():
        gflops = flops[role, kind] / 1e9
        rows.append({"role": role, "body": profile.spec(role).body, "params_m": round(params[role] / 1e6, 2),
                     "step": kind, "precision": precision, "layout": layout, "gflop": round(gflops, 2),
                     "s": round(s, 4), "gflop_per_s": round(gflops / s, 1)})
    print(f"profile {profile.name}: {profile.image_size}px, batch {batch}, {args.threads} torch threads; "
          f"1024x1024 matrix product: " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    print("| model | body | step | precision | layout | GFLOP | s/step | GFLOP/s | vs float32 NCHW |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = seconds[r["role"], r["step"], "float32", "nchw"]
        print(f"| {r['role']} | {r['body']} | {r['step']} | {r['precision']} | {r['layout']} | {r['gflop']:.2f} | "
              f"{r['s']:.3f} | {r['gflop_per_s']:.0f} | {base / r['s']:.2f}x |")
    if args.out:
        write_cost_keys(Path(args.out), {"step_time": {
            "command": " ".join(["python -m bench.step_time", *(sys.argv[1:] if argv is None else argv)]),
            "profile": profile.name, "image_size": profile.image_size, "batch": batch, "threads": args.threads,
            "peak_gflop_per_s": {k: round(v, 1) for k, v in peaks.items()}, "rows": rows}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
