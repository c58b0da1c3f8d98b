"""The ReLU and 2-D max-pool surrogate ops, and the functions the rewritten graphs call.

Each op is registered by :func:`.registry.define_surrogate_op` in three mechanisms
(custom op for export / TorchScript / tracers, a ``setup_context`` twin for
``torch.func`` and ``torch.compile``, a classic Function for plain eager; the
registry's docstring says why, with measurements), all sharing one forward, one
``setup_context`` and one backward, whose math lives in :mod:`.reference`.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..gates import GATES
from .reference import (
    _SOFTPLUS_THRESHOLD,
    soft_max_pool2d_backward,
    soft_max_pool2d_backward_torch,
    surrogate_relu_backward,
)
from .registry import NAMESPACE, define_surrogate_op, functional_backward, recompute_in_backward

__all__ = ["surrogate_relu", "surrogate_max_pool2d", "NAMESPACE", "SAVED_MODES"]

#: What a surrogate ReLU keeps for its backward: the pre-activation (``"exact"``), or
#: the gate itself, already evaluated, in 2 bytes (``"bfloat16"``) or 1 byte (``"uint8"``,
#: steps of 1/255).  Vanilla's in-place ReLU keeps nothing beyond its output, so the
#: pre-activation is the whole memory overhead of a pullback; the compact gates cut it
#: to a half or a quarter (errors measured in the README, Performance).
SAVED_MODES = ("exact", "bfloat16", "uint8")

IntOrPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- ReLU
def _relu_forward(z: Tensor, temp: float, gate: str, saved: str = "exact") -> Tensor:
    """Forward: exactly ``torch.relu(z)``.  Backward: ``grad * gate(z / temp)``."""
    return torch.relu(z)


def _compact_gate(z: Tensor, temp: float, gate: str, saved: str) -> Tensor:
    """The gate evaluated in float32 and stored in 2 bytes (``"bfloat16"``) or as ``round(255 * gate)`` in 1.

    The sigmoid gate is one ``softplus_backward`` pass with a broadcast constant as its
    "gradient" (``scale * sigmoid(z / temp)``, no temporaries), so storing it costs 2-3
    passes instead of 3-5.
    """
    scale = 255.0 if saved == "uint8" else 1.0
    z32 = z.float()
    if gate == "sigmoid":
        value = torch.ops.aten.softplus_backward(
            z32.new_full((), scale).expand(z32.shape), z32, 1.0 / temp, _SOFTPLUS_THRESHOLD
        )
    else:
        value = GATES[gate](z32, temp).mul_(scale)
    return value.to(torch.bfloat16) if saved == "bfloat16" else value.round_().to(torch.uint8)


def _relu_setup_context(ctx, inputs, output) -> None:
    z, temp, gate, saved = inputs
    ctx.save_for_backward(z if saved == "exact" else _compact_gate(z, temp, gate, saved))
    ctx.temp, ctx.gate, ctx.saved = temp, gate, saved


def _relu_backward(ctx, grad: Tensor):
    (kept,) = ctx.saved_tensors
    if ctx.saved == "exact":
        return surrogate_relu_backward(grad, kept, ctx.temp, ctx.gate), None, None, None
    dz = grad * kept  # promotes the compact gate to grad's dtype
    if ctx.saved == "uint8":
        dz = dz * (1.0 / 255.0)
    return dz.to(grad.dtype), None, None, None


_call_surrogate_relu = define_surrogate_op(
    "surrogate_relu", _relu_forward, setup_context=_relu_setup_context, backward=_relu_backward
)


# ---------------------------------------------------------------------- max-pool
_MAX_POOL = {
    1: torch.ops.aten.max_pool1d_with_indices,
    2: torch.ops.aten.max_pool2d_with_indices,
    3: torch.ops.aten.max_pool3d_with_indices,
}


def _pool_forward(
    x: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str,
) -> Tuple[Tensor, Tensor]:
    """Forward of this op and of the 1-D / 3-D one (:mod:`.pooling`): exactly ``F.max_poolNd(..., return_indices=True)``
    (the ATen op's meta kernel is the fake).  Backward: soft-pool gradient (``pool_backward``: see
    :data:`excitation.presets.POOL_BACKWARDS`)."""
    return _MAX_POOL[len(kernel_size)](x, kernel_size, stride, padding, dilation, ceil_mode)


def _pool_setup_context(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward = inputs
    ctx.save_for_backward(x)
    ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward)
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op(f"{NAMESPACE}::soft_max_pool2d_backward", mutates_args=())
def _soft_max_pool2d_backward_op(
    grad: Tensor,
    x: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str,
) -> Tensor:
    """The plain-torch soft-pool backward as one opaque op: what compiled CPU graphs call.

    Inductor's own code for this backward (traced from the torch ops) is ~18x slower on the
    CPU than the eager implementation, which works over cache-sized chunks of planes
    (resnet50's stem pool at batch 8: 800-965 ms against 44-52 ms, 2-core box), so a
    compiled CPU graph calls the eager one as an extern kernel: compiled resnet50's
    pullback went from 1.11x to 1.02-1.03x of compiled vanilla, googlenet's from 1.88x to 1.14x.
    """
    return soft_max_pool2d_backward_torch(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward)


@_soft_max_pool2d_backward_op.register_fake
def _(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward):
    return x.new_empty(x.shape)  # contiguous, like the real result


@_soft_max_pool2d_backward_op.register_vmap
def _(info, in_dims, grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward):
    # Each plane is pooled on its own, so the vmapped dimension folds into the leading ones.
    def batched(tensor: Tensor, dim: Optional[int]) -> Tensor:
        if dim is None:
            return tensor.unsqueeze(0).expand(info.batch_size, *tensor.shape)
        return tensor.movedim(dim, 0)

    result = soft_max_pool2d_backward_torch(
        batched(grad, in_dims[0]), batched(x, in_dims[1]), kernel_size, stride, padding, dilation, ceil_mode, temp,
        pool_backward,
    )
    return result, 0


def _pool_backward(ctx, grad: Tensor, _grad_indices: Optional[Tensor]):
    (x,) = ctx.saved_tensors
    if x.device.type == "cpu" and torch.compiler.is_compiling():
        # A compiled CPU graph: ours as one extern call (see _soft_max_pool2d_backward_op).
        kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward = ctx.pool_args
        pool_args = (list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode, temp, pool_backward)
        return torch.ops.excitation.soft_max_pool2d_backward(grad, x, *pool_args), *_NO_POOL_ARG_GRADS
    dx = soft_max_pool2d_backward(grad, x, *ctx.pool_args, functional=functional_backward())
    return dx, *_NO_POOL_ARG_GRADS


# No gradient for kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward.
_NO_POOL_ARG_GRADS = (None,) * 7


_call_surrogate_max_pool2d = define_surrogate_op(
    "surrogate_max_pool2d", _pool_forward, setup_context=_pool_setup_context, backward=_pool_backward
)


# -------------------------------------------------------------------- dispatch
def surrogate_relu(z: Tensor, temp: float = 0.3, gate: str = "sigmoid", saved: str = "exact") -> Tensor:
    """ReLU whose forward is ``torch.relu(z)`` bit for bit and whose backward is ``grad * gate(z / temp)``.

    Parameters
    ----------
    z : Tensor
        Pre-activations, any shape, floating point.
    temp : float
        Gate temperature (> 0).  Small values approach the vanilla gradient.
    gate : str
        ``"sigmoid"`` (``sigmoid(z/temp)``, the derivative of ``temp*softplus(z/temp)``)
        or ``"normal_cdf"`` (``Phi(z/temp)``).
    saved : str
        What the backward keeps (see :data:`SAVED_MODES`): ``"exact"`` (the
        pre-activation), ``"bfloat16"`` or ``"uint8"`` (the evaluated gate, 2 or 1 byte).
    """
    if saved == "exact" and recompute_in_backward(z):
        # Compiled, keep z alone and recompute relu(z) in the backward.  Why: a convolution's
        # backward takes its input even when only the input gradient is wanted, so compiled
        # graphs keep every ReLU output that feeds one, and Inductor's partitioner will not
        # recompute relu(z) from z by itself (a value an extern kernel reads in the backward is
        # "materialized", so banned from recomputation): compiled resnet50 (batch 8, 2-core CPU)
        # kept z and relu(z), 692 MiB against vanilla's 382.  A non-reentrant checkpoint means
        # "recompute what is in here" under compile: 402 MiB, same time, same result.  Not for
        # compact gates: the region would recompute the gate from z, which they exist not to keep.
        return checkpoint(_call_surrogate_relu, z, temp, gate, saved, use_reentrant=False)
    return _call_surrogate_relu(z, temp, gate, saved)


def _tuple(value: IntOrPair, dims: int, name: str) -> List[int]:
    """An int or a 1- / ``dims``-long sequence as ``dims`` ints, as torch's pools accept them."""
    if isinstance(value, int):
        return [value] * dims
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"max_pool{dims}d {name} must be an int or {dims} ints, got {value!r}.")
    return values


def pool_arguments(
    kernel_size: IntOrPair, stride: Optional[IntOrPair], padding: IntOrPair, dilation: IntOrPair, dims: int
) -> Tuple[List[int], List[int], List[int], List[int]]:
    """Kernel, stride, padding and dilation as ``dims`` ints each, the way torch's pools read them.

    torch treats ``stride=None`` and ``stride=[]`` as "stride = kernel_size".
    """
    kernel = _tuple(kernel_size, dims, "kernel_size")
    no_stride = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    strides = kernel if no_stride else _tuple(stride, dims, "stride")
    return kernel, strides, _tuple(padding, dims, "padding"), _tuple(dilation, dims, "dilation")


def surrogate_max_pool2d(
    x: Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    temp: float = 0.3,
    pool_backward: str = "soft",
):
    """2-D max-pool whose forward equals ``F.max_pool2d`` bit for bit and whose backward is soft pooling's.

    The backward is the gradient of ``sum_w softmax(x_w / temp) * x_w`` over each
    window, positions outside the input excluded (``pool_backward="soft"``), or of the
    same sum with its softmax weights held constant (``"weights"``: ``g * softmax(x / temp)``).
    Arguments follow :func:`torch.nn.functional.max_pool2d`; ``temp`` is the softmax temperature.
    """
    args = (*pool_arguments(kernel_size, stride, padding, dilation, 2), bool(ceil_mode), temp, pool_backward)
    out, indices = _call_surrogate_max_pool2d(x, *args)
    return (out, indices) if return_indices else out
