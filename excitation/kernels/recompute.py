"""``RecomputedConv2d``: a convolution that ``torch.compile`` recomputes in the backward.

Why: where a ReLU feeds only a max-pool, compiled vanilla keeps 1.25 bytes per element
(a bool mask and int8 pool offsets) and no float, while an exact pullback needs the
pre-activation ``z`` (4 bytes).  The only way below that is to keep neither and recompute
``z`` from the convolution's input, which the convolution's own backward keeps anyway.
That pays only where the convolution is cheap: an image stem with 3 input channels and a
3x3 kernel costs 27 multiply-adds per output, about what the elementwise passes around it
cost: compiled vgg11_bn keeps close to vanilla's saved bytes with the recompute, in the same
time, same result bit for bit (measured in docs/design-measurements.md).

The 7x7 RGB stem of ResNet, GoogLeNet and DenseNet (147 per output) is recomputed too: the
compiled CPU backward runs the C kernels (:mod:`.compiled`), whose savings leave the time for
it; with Inductor's own backward loops instead, the same recompute shows in compiled resnet50's
time (saved bytes and times per model in docs/design-measurements.md).

:func:`excitation.fxpass.recompute.recompute_cheap_convolutions` gives this class to the
excited model's own clones of such convolutions (never to the user's modules); the
``"excitation"`` backend tags the same convolutions in dynamo's graphs
(:func:`excitation.fxpass.lowering.lower`).  Outside
``torch.compile`` it is exactly ``nn.Conv2d``.
"""

from __future__ import annotations

import math

import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .dispatch import recompute_in_backward

__all__ = ["RecomputedConv2d", "RECOMPUTE_MAX_MACS", "cheap_to_recompute"]

#: A convolution is recomputed only if each output costs at most this many multiply-adds
#: (``in_channels / groups * prod(kernel_size)``): 27 for an RGB stem's 3x3 kernel, 147 for
#: the 7x7 RGB stem of ResNet, GoogLeNet and DenseNet; a 3x3 convolution over 64 channels (576,
#: GoogLeNet's second pooled ReLU) is not.
RECOMPUTE_MAX_MACS = 160


def cheap_to_recompute(module: nn.Module) -> bool:
    """``module`` is a plain ``nn.Conv2d`` (or one of ours) costing at most :data:`RECOMPUTE_MAX_MACS` per output."""
    if type(module) not in (nn.Conv2d, RecomputedConv2d):
        return False
    return module.in_channels // module.groups * math.prod(module.kernel_size) <= RECOMPUTE_MAX_MACS


class RecomputedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output (and what the graph computes from it) ``torch.compile`` recomputes in the backward.

    Under dynamo the call runs in a non-reentrant ``torch.utils.checkpoint`` region, whose
    ops the partitioner must recompute; the fused BatchNorm -> ReLU after it is then
    recomputed from it too, since nothing else keeps ``z``.
    """

    def forward(self, input: Tensor) -> Tensor:
        if recompute_in_backward(input):
            return checkpoint(super().forward, input, use_reentrant=False)
        return super().forward(input)
