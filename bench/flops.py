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
