"""LayerNorm and RMSNorm with their statistics held constant in the backward.

Forward: ``aten.native_layer_norm``, the kernel ``F.layer_norm`` reaches (bit-exact).
Backward: ``y = (x - mean) * rstd * weight + bias`` differentiated with ``mean``
and ``rstd`` treated as constants, so ``dx = grad * weight * rstd``: the
normalisation acts as the per-sample linear map it is at the input, and the
gradient is not projected off the mean and the normalised input (which is what
re-centres and flattens vanilla LayerNorm gradients).  Parameter gradients are
the exact ones (they do not depend on how the statistics are treated).

RMSNorm (``nn.RMSNorm``, ``F.rms_norm``; Llama's and Qwen's hand-written ``x * rsqrt(mean(x^2) + eps)``)
is held the same way: ``y = x * rstd * weight`` with ``rstd`` constant, so ``dx = grad * weight * rstd``.
The hand-written form is rewritten at its ``rsqrt`` (or the ``sqrt`` it divides by), whose value
:func:`held_rsqrt` (:func:`held_sqrt`) computes and whose gradient it withholds.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .reference import flush_subnormal
from .registry import define_surrogate_op

__all__ = ["surrogate_layer_norm", "surrogate_native_layer_norm", "layer_norm_constant_stats_backward",
           "surrogate_rms_norm", "rms_norm_constant_rms_backward", "held_rsqrt", "held_sqrt"]


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


# ------------------------------------------------------------------ RMSNorm
def _rstd(x: Tensor, normalized_dims: int, eps: Optional[float]) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last ``normalized_dims`` dimensions, as ``torch.rms_norm`` computes it."""
    dims = tuple(range(x.dim() - normalized_dims, x.dim()))
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return torch.rsqrt(wide.pow(2).mean(dims, keepdim=True) + eps)


def rms_norm_constant_rms_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], normalized_dims: int,
                                   eps: Optional[float], needs_weight: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of RMSNorm w.r.t. ``(x, weight)`` with the RMS held constant: ``dx = grad * weight * rstd``."""
    rstd = _rstd(x, normalized_dims, eps)
    scaled = grad * weight if weight is not None else grad
    dx = (scaled * rstd).to(x.dtype)
    dweight = None
    if needs_weight:
        batch_dims = tuple(range(x.dim() - normalized_dims))
        dweight = (grad * (x * rstd).to(grad.dtype)).sum(batch_dims).to(weight.dtype)
    return flush_subnormal(dx), dweight


def _rms_forward(x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: Optional[float]) -> Tensor:
    return torch.rms_norm(x, normalized_shape, weight, eps)


def _rms_setup_context(ctx, inputs, output) -> None:
    x, normalized_shape, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.normalized_dims, ctx.eps = len(normalized_shape), eps


def _rms_backward(ctx, grad: Tensor):
    x, weight = ctx.saved_tensors
    dx, dweight = rms_norm_constant_rms_backward(grad, x, weight, ctx.normalized_dims, ctx.eps,
                                                 ctx.needs_input_grad[2])
    return dx, None, dweight, None


_rms_norm = define_surrogate_op("surrogate_rms_norm", _rms_forward, setup_context=_rms_setup_context,
                                backward=_rms_backward)


def surrogate_rms_norm(
    input: Tensor,
    normalized_shape: "List[int] | int",
    weight: Optional[Tensor] = None,
    eps: Optional[float] = None,
) -> Tensor:
    """``F.rms_norm`` bit for bit; its backward holds the RMS constant."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else [int(s) for s in normalized_shape]
    return _rms_norm(input, shape, weight, None if eps is None else float(eps))


def held_rsqrt(input: Tensor) -> Tensor:
    """``torch.rsqrt(input)`` with no gradient: the RMS of a hand-written RMSNorm, held constant."""
    return torch.rsqrt(input).detach()


def held_sqrt(input: Tensor) -> Tensor:
    """``torch.sqrt(input)`` with no gradient: the RMS of an RMSNorm written ``x / sqrt(mean(x^2) + eps)`` (ImageGPT)."""
    return torch.sqrt(input).detach()
