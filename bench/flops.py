"""FLOPs of a step as torch counts them (``torch.utils.flop_counter``), with a grouped convolution's
backward counted right.

torch's count of ``convolution_backward`` swaps the weight's first two dimensions to describe the
gradient of the input, which for a grouped convolution divides by the wrong channel count: a
depthwise 3x3 convolution of 64 channels on 8 x 64 x 32 x 32 is 9.4 MFLOP forward and 18.9 MFLOP
backward, and torch counts 613 MFLOP backward (the group count, 64, too many for the input's
gradient). The edge's MobileNetV2 body is depthwise throughout, so torch's count made an edge training
step 9.1 GFLOP where it is 3.2. Here a convolution's backward is its forward's count once for the
input's gradient and once for the weight's, each when asked for (exact for every grouping; the bias
is ignored, as torch ignores it).

    python -m bench.flops --profile cpu     # forward FLOPs per image of each model, by part (cost.json)
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the forward's count per gradient computed (input, weight)."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(step) -> int:
    """The FLOPs of running ``step()`` once (2 per multiply-add; convolutions and matrix products)."""
    mapping = {torch.ops.aten.convolution_backward: conv_backward_flop}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step()
    return counter.get_total_flops()


PARTS = ("body", "fpn", "classification_head", "regression_head")


def forward_flops_by_part(model, images: list[torch.Tensor]) -> dict[str, int]:
    """FLOPs of one forward pass of a torchvision FCOS on ``images``, by part: the backbone's body, its
    FPN, and the head's classification and regression branches (box decoding and NMS do no
    convolutions or matrix products, so they count nothing)."""
    batched = model.transform(images)[0].tensors
    with torch.no_grad():
        body_out = model.backbone.body(batched)
        levels = list(model.backbone.fpn(body_out).values())
        return {"body": count_flops(lambda: model.backbone.body(batched)),
                "fpn": count_flops(lambda: model.backbone.fpn(body_out)),
                "classification_head": count_flops(lambda: model.head.classification_head(levels)),
                "regression_head": count_flops(lambda: model.head.regression_head(levels))}


def main(argv=None) -> int:
    """Where each model's forward FLOPs go; writes ``flops_by_part`` of the cost file."""
    import argparse
    import sys
    from pathlib import Path

    from bench.run_folder import COST_FILE, write_cost_keys
    from bench.step_time import synthetic_batch
    from models.ladder import ROLES, build_model, get_profile

    parser = argparse.ArgumentParser(description="Forward FLOPs per image of each model, by part.")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--out", default=str(COST_FILE), help="cost file to write ('' to write nothing)")
    args = parser.parse_args(argv)
    profile = get_profile(args.profile)
    batch = profile.rounds.batch_size
    images, _ = synthetic_batch(profile.image_size, batch)
    rows = {}
    print(f"profile {profile.name}, {profile.image_size} px: forward MFLOP per image (share)")
    print("| model | total | " + " | ".join(PARTS) + " |")
    print("|---|---|" + "---|" * len(PARTS))
    for role in ROLES:
        parts = forward_flops_by_part(build_model(profile, role, seed=0).eval(), images)
        total = sum(parts.values())
        rows[role] = {"mflop_per_image": round(total / batch / 1e6, 1),
                      "share": {k: round(v / total, 3) for k, v in parts.items()}}
        print(f"| {role} | {total / batch / 1e6:.0f} | "
              + " | ".join(f"{v / batch / 1e6:.0f} ({v / total:.0%})" for v in parts.values()) + " |")
    if args.out:
        write_cost_keys(Path(args.out), {"flops_by_part": {
            "command": " ".join(["python -m bench.flops", *(sys.argv[1:] if argv is None else argv)]),
            "profile": profile.name, "image_size": profile.image_size, "rows": rows}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
