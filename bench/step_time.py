"""Seconds per training step of each model of a profile (labels-only step, synthetic batch).

    python -m bench.step_time --profile cpu --threads 2

Prints parameter counts and the median of --steps timed steps after --warmup untimed ones.
"""

import argparse
import statistics
import time

import torch

from models.ladder import ROLES, build_model, count_parameters, get_profile


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    batch = args.batch_size or profile.budget.batch_size
    size = profile.image_size
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(batch)]
    targets = [{"boxes": torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.8]]) * size,
                "labels": torch.tensor([i % 20, (i + 7) % 20])} for i in range(batch)]
    print(f"profile {profile.name}: {size}px, batch {batch}, {args.threads} torch threads")
    print("| model | body | params (M) | s/step |")
    print("|---|---|---|---|")
    for role in ROLES:
        model = build_model(profile, role, seed=0).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        times = []
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            loss = sum(model(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        spec = profile.spec(role)
        print(f"| {role} | {spec.body} | {count_parameters(model) / 1e6:.2f} | {statistics.median(times):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
