"""Max-pool surrogates beyond the 2-D fast path: 1-D, 3-D and adaptive (1/2/3-D) max-pooling.

Forward: the very ATen op the model called (values and indices bit-exact).
Backward: the soft-pool gradient of :func:`.reference.soft_max_pool_windows_backward`,
which gathers windows explicitly.  2-D regular pools keep the faster strided-view
path of :func:`excitation.kernels.surrogate_max_pool2d`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .ops import NO_POOL_ARG_GRADS, pool_forward, pool_setup_context, pool_arguments  # the 2-D op's: same arguments
from .reference import (
    adaptive_pool_windows,
    pool_windows,
    soft_max_pool_windows_backward,
)
from .registry import define_surrogate_op

__all__ = ["surrogate_max_pool", "surrogate_adaptive_max_pool"]

aten = torch.ops.aten
IntOrTuple = Union[int, Sequence[int]]

_ADAPTIVE = {1: aten.adaptive_max_pool1d, 2: aten.adaptive_max_pool2d, 3: aten.adaptive_max_pool3d}


# ------------------------------------------------------------------ regular pools
def _pool_backward(ctx, grad: Tensor, _grad_indices: Optional[Tensor]):
    (x,) = ctx.saved_tensors
    kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward = ctx.pool_args
    dims = len(kernel_size)
    windows = [
        pool_windows(x.shape[-dims + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
        for i in range(dims)
    ]
    return soft_max_pool_windows_backward(grad, x, windows, temp, pool_backward), *NO_POOL_ARG_GRADS


_max_pool = define_surrogate_op(
    "surrogate_max_pool", pool_forward, setup_context=pool_setup_context, backward=_pool_backward
)


def _pool_dims(size: Optional[IntOrTuple], dims: Optional[int]) -> int:
    """The pool's spatial rank: ``dims`` if given, else the length of a tuple ``size``."""
    if dims in (1, 2, 3):
        return int(dims)
    if dims is None and isinstance(size, (list, tuple)) and len(size) in (1, 2, 3) and len(size) > 1:
        return len(size)
    raise ValueError(f"cannot tell the pool's rank from {size!r}; pass dims=1, 2 or 3.")


def surrogate_max_pool(
    x: Tensor,
    kernel_size: IntOrTuple,
    stride: Optional[IntOrTuple] = None,
    padding: IntOrTuple = 0,
    dilation: IntOrTuple = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    temp: float = 0.3,
    dims: Optional[int] = None,
    pool_backward: str = "soft",
):
    """``F.max_pool{1,3}d`` bit for bit, with the soft-pool backward at ``temp``.

    ``dims`` (1, 2 or 3) is the pool's spatial rank; it is needed when ``kernel_size`` is an int.
    ``pool_backward`` as for :func:`excitation.kernels.surrogate_max_pool2d`.
    """
    dims = _pool_dims(kernel_size, dims)
    arguments = pool_arguments(kernel_size, stride, padding, dilation, dims)
    out, indices = _max_pool(x, *arguments, bool(ceil_mode), float(temp), pool_backward)
    return (out, indices) if return_indices else out


# ----------------------------------------------------------------- adaptive pools
def _adaptive_forward(x: Tensor, output_size: List[int], temp: float, pool_backward: str) -> Tuple[Tensor, Tensor]:
    out, indices = _ADAPTIVE[len(output_size)](x, output_size)
    return out, indices


def _adaptive_setup_context(ctx, inputs, output) -> None:
    x, output_size, temp, pool_backward = inputs
    ctx.save_for_backward(x)
    ctx.args = (output_size, temp, pool_backward)
    ctx.mark_non_differentiable(output[1])


def _adaptive_backward(ctx, grad: Tensor, _grad_indices: Optional[Tensor]):
    (x,) = ctx.saved_tensors
    output_size, temp, pool_backward = ctx.args
    dims = len(output_size)
    windows = [adaptive_pool_windows(x.shape[-dims + i], output_size[i]) for i in range(dims)]
    return soft_max_pool_windows_backward(grad, x, windows, temp, pool_backward), None, None, None


_adaptive_max_pool = define_surrogate_op(
    "surrogate_adaptive_max_pool",
    _adaptive_forward,
    setup_context=_adaptive_setup_context,
    backward=_adaptive_backward,
)


def surrogate_adaptive_max_pool(
    x: Tensor, output_size: IntOrTuple, return_indices: bool = False, temp: float = 0.3, dims: Optional[int] = None,
    pool_backward: str = "soft",
):
    """``F.adaptive_max_pool{1,2,3}d`` bit for bit, with the soft-pool backward at ``temp``.

    ``output_size`` entries may be ``None`` (keep that input size), as in torch.
    """
    dims = _pool_dims(output_size, dims)
    sizes = [output_size] * dims if isinstance(output_size, int) or output_size is None else list(output_size)
    if len(sizes) == 1:
        sizes = sizes * dims
    sizes = [int(x.shape[-dims + i]) if s is None else int(s) for i, s in enumerate(sizes)]
    out, indices = _adaptive_max_pool(x, sizes, float(temp), pool_backward)
    return (out, indices) if return_indices else out
