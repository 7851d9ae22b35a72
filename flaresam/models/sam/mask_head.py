"""The per-pixel stages of SAM's mask decoder, run channels-last: the same modules, fewer memory passes.

After the two-way transformer, every box prompt goes through two small
``nn.Sequential`` stacks on a grid up to 256 x 256: ``output_upscaling``
(2 x 2 transposed convolution, ``LayerNorm2d``, GELU, another 2 x 2 transposed
convolution, GELU) and HQ-SAM's ``embedding_maskfeature`` (3 x 3 convolution,
``LayerNorm2d``, GELU, 3 x 3 convolution). They are memory-bound: the package's
``LayerNorm2d`` makes six passes over the tensor (mean, subtract, square, mean,
divide, scale), and a 2 x 2 stride-2 transposed convolution is a matrix product
that the generic kernel runs with a scatter. :func:`run_stack` runs the same
modules with the same weights, keeping the tensor channels-last:

* ``LayerNorm2d`` -> one ``F.layer_norm`` over the (contiguous) channel axis;
* a 2 x 2 stride-2 ``ConvTranspose2d`` -> one matrix product whose result,
  viewed as [N, 2H, 2W, C], is already channels-last;
* anything else -> the module itself (convolutions accept channels-last input).

The result equals the stock stack to float rounding (``tests/test_sam.py``)
and is used for training and prediction alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flaresam.models.sam.upstream import Upstream


def _layer_norm_2d(x: torch.Tensor, norm: Upstream) -> torch.Tensor:
    """The package's ``LayerNorm2d`` (per pixel over channels, biased variance) as one fused op."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps)
    return y.permute(0, 3, 1, 2)


def _is_2x2_upsampler(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.ConvTranspose2d) and m.kernel_size == (2, 2) and m.stride == (2, 2) and m.padding == (0, 0)
        and m.output_padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1
    )


def _upsample_2x2(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """out[n, o, 2i + a, 2j + b] = sum_c x[n, c, i, j] W[c, o, a, b] + bias[o], as one matrix product."""
    n, c, h, w = x.shape
    o = conv.weight.shape[1]
    weight = conv.weight.permute(0, 2, 3, 1).reshape(c, 4 * o)  # [c, (a, b, o)]
    y = x.permute(0, 2, 3, 1).reshape(n * h * w, c) @ weight
    y = y.view(n, h, w, 2, 2, o).permute(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, o)
    if conv.bias is not None:
        y = y + conv.bias.to(y.dtype)  # under autocast y is bf16: keep it so, as the stock kernel does
    return y.permute(0, 3, 1, 2)  # NCHW view of channels-last memory


def run_stack(stack: Upstream, x: torch.Tensor) -> torch.Tensor:
    """``stack(x)`` for the decoder's upscaling and mask-feature stacks, channels-last."""
    for m in stack:
        if type(m).__name__ == "LayerNorm2d" and hasattr(m, "eps"):
            x = _layer_norm_2d(x, m)
        elif _is_2x2_upsampler(m):
            x = _upsample_2x2(x, m)
        else:
            x = m(x)
    return x
