"""LayerNorm with its statistics held constant in the backward.

Forward: ``aten.native_layer_norm``, the kernel ``F.layer_norm`` reaches (bit-exact).
Backward: ``y = (x - mean) * rstd * weight + bias`` differentiated with ``mean``
and ``rstd`` treated as constants, so ``dx = grad * weight * rstd``: the
normalisation acts as the per-sample linear map it is at the input, and the
gradient is not projected off the mean and the normalised input (which is what
re-centres and flattens vanilla LayerNorm gradients).  Parameter gradients are
the exact ones (they do not depend on how the statistics are treated).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import flush_subnormal
from .registry import define_surrogate_op

__all__ = ["surrogate_layer_norm", "surrogate_native_layer_norm", "layer_norm_constant_stats_backward"]


def layer_norm_constant_stats_backward(
    grad: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, normalized_dims: int,
    needs_weight: bool, needs_bias: bool,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of LayerNorm w.r.t. ``(x, weight, bias)`` with ``mean``/``rstd`` held constant."""
    dx = grad * rstd
    if weight is not None:
        dx = dx * weight
    batch_dims = tuple(range(x.dim() - normalized_dims))
    dweight = (grad * ((x - mean) * rstd)).sum(batch_dims) if needs_weight else None
    dbias = grad.sum(batch_dims) if needs_bias else None
    return flush_subnormal(dx.to(x.dtype)), dweight, dbias


def _forward(
    x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    out, mean, rstd = torch.ops.aten.native_layer_norm(x, normalized_shape, weight, bias, eps)
    return out, mean, rstd


def _setup_context(ctx, inputs, output) -> None:
    x, normalized_shape, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.normalized_dims = len(normalized_shape)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad: Tensor, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = layer_norm_constant_stats_backward(
        grad, x, weight, mean, rstd, ctx.normalized_dims, ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    )
    return dx, None, dweight, dbias, None


_layer_norm = define_surrogate_op("surrogate_layer_norm", _forward, setup_context=_setup_context, backward=_backward)


def surrogate_layer_norm(
    input: Tensor,
    normalized_shape: "List[int] | int",
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tensor:
    """``F.layer_norm`` bit for bit; its backward holds mean and variance constant."""
    return surrogate_native_layer_norm(input, normalized_shape, weight, bias, eps)[0]


def surrogate_native_layer_norm(
    input: Tensor,
    normalized_shape: "List[int] | int",
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``aten.native_layer_norm``'s ``(out, mean, rstd)`` bit for bit (decomposed / core-ATen graphs hold it)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]
    return _layer_norm(input, shape, weight, bias, float(eps))
