"""Surrogates for the ReLU relatives: ReLU6/Hardtanh, LeakyReLU, SiLU, GELU, Hardswish, Hardsigmoid,
ELU/CELU/SELU, Mish and timm's hard_mish.

One op, ``excitation::surrogate_activation(z, kind, temp, params)``, covers them
all: its forward calls the very ATen op the model called (so it is bit-exact),
and its backward is ``grad * gate(z / temp)`` with the gate of
:data:`excitation.gates.ACTIVATION_GATES` for that kind.  The per-kind Python
functions below are what an excited graph calls, so it reads like the model.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import ACTIVATION_GATES, leaky_relu_gate
from .reference import flush_subnormal, gated_backward
from .registry import define_surrogate_op

__all__ = [
    "surrogate_hardtanh",
    "surrogate_leaky_relu",
    "surrogate_silu",
    "surrogate_gelu",
    "surrogate_hardswish",
    "surrogate_hardsigmoid",
    "surrogate_elu",
    "surrogate_celu",
    "surrogate_selu",
    "surrogate_mish",
    "surrogate_hard_mish",
    "surrogate_prelu",
    "prelu_backward",
    "activation_forward",
    "surrogate_activation_backward",
]


def activation_forward(z: Tensor, kind: str, params: List[float]) -> Tensor:
    """The original activation, computed by the same ATen op the model's call reaches."""
    if kind == "hardtanh":
        return F.hardtanh(z, params[0], params[1])
    if kind == "leaky_relu":
        return F.leaky_relu(z, params[0])
    if kind == "silu":
        return F.silu(z)
    if kind == "gelu":
        return F.gelu(z)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if kind == "hardswish":
        return F.hardswish(z)
    if kind == "hardsigmoid":
        return F.hardsigmoid(z)
    if kind == "elu":
        # aten.elu's full form: F.elu is (alpha, 1, 1); core-ATen graphs decompose SELU into it.
        return torch.ops.aten.elu.default(z, params[0], params[1], params[2])
    if kind == "celu":
        return F.celu(z, params[0])
    if kind == "selu":
        return F.selu(z)
    if kind == "mish":
        return F.mish(z)
    if kind == "hard_mish":
        # timm.layers.hard_mish, operation for operation (so the same bits): 0.5 * x * (x + 2).clamp(0, 2).
        return 0.5 * z * (z + 2).clamp(min=0, max=2)
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {sorted(ACTIVATION_GATES)}.")


def surrogate_activation_backward(grad: Tensor, z: Tensor, kind: str, temp: float, params: List[float]) -> Tensor:
    """``grad * gate(z, temp, *params)``, gate floored at 2^-64 and result flushed (:func:`.reference.gated_backward`).

    The gate is computed in at least float32.  SiLU's and GELU's gates are the ReLU rule's own
    (``sigmoid(z / temp)``, ``Phi(z / temp)``), so they take its fast paths (C kernel, fused
    ``softplus_backward``): at batch 1 each small pass is host time, and the contract's six per
    site were most of efficientnet's and convnext's extra time in the zoo (measured in docs/design-measurements.md).
    """
    from .ops import native_activation_backward, relu_gate_backward  # ops imports this module's siblings

    fast = native_activation_backward(grad, z, kind, temp, params)
    if fast is not None:
        return fast
    relu_gate = _RELU_GATE_OF.get(kind)
    # float64 keeps the contract: the fast path's softplus_backward returns the gate 1 past
    # z / temp > 20 (off by e^-20 ~ 2e-9, below float32's resolution but not float64's).
    if relu_gate is not None and z.dtype != torch.float64:
        return relu_gate_backward(grad, z, temp, relu_gate)
    compute = z.to(torch.promote_types(z.dtype, torch.float32))
    return gated_backward(grad, ACTIVATION_GATES[kind](compute, temp, *params))


# Kinds whose gate is exactly a ReLU gate of :data:`excitation.gates.GATES` (see ACTIVATION_GATES).
_RELU_GATE_OF = {"silu": "sigmoid", "gelu": "normal_cdf", "gelu_tanh": "normal_cdf"}


def _forward(z: Tensor, kind: str, temp: float, params: List[float]) -> Tensor:
    return activation_forward(z, kind, params)


def _setup_context(ctx, inputs, output) -> None:
    z, kind, temp, params = inputs
    ctx.save_for_backward(z)
    ctx.kind, ctx.temp, ctx.params = kind, temp, params


def _backward(ctx, grad: Tensor):
    (z,) = ctx.saved_tensors
    return surrogate_activation_backward(grad, z, ctx.kind, ctx.temp, ctx.params), None, None, None


_surrogate_activation = define_surrogate_op(
    "surrogate_activation", _forward, setup_context=_setup_context, backward=_backward
)


def surrogate_hardtanh(input: Tensor, min_val: float = -1.0, max_val: float = 1.0, temp: float = 0.3) -> Tensor:
    """``F.hardtanh`` (and ReLU6 = ``hardtanh(z, 0, 6)``); backward ``grad * hardtanh_gate``."""
    return _surrogate_activation(input, "hardtanh", float(temp), [float(min_val), float(max_val)])


def surrogate_leaky_relu(input: Tensor, negative_slope: float = 0.01, temp: float = 0.3) -> Tensor:
    """``F.leaky_relu``; backward ``grad * (a + (1 - a) * sigmoid(z / temp))``."""
    return _surrogate_activation(input, "leaky_relu", float(temp), [float(negative_slope)])


def surrogate_silu(input: Tensor, temp: float = 1.6) -> Tensor:
    """``F.silu``; backward ``grad * sigmoid(z / temp)`` (published default temp 1.6)."""
    return _surrogate_activation(input, "silu", float(temp), [])


def surrogate_gelu(input: Tensor, approximate: str = "none", temp: float = 1.0) -> Tensor:
    """``F.gelu``; backward ``grad * Phi(z / temp)`` (published default temp 1.0)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}.")
    return _surrogate_activation(input, "gelu" if approximate == "none" else "gelu_tanh", float(temp), [])


def surrogate_hardswish(input: Tensor, temp: float = 1.6) -> Tensor:
    """``F.hardswish``; backward ``grad * hardsigmoid(z / temp)``."""
    return _surrogate_activation(input, "hardswish", float(temp), [])


def surrogate_hardsigmoid(input: Tensor, temp: float = 0.3) -> Tensor:
    """``F.hardsigmoid``; backward ``grad * hardtanh_gate(z + 3, temp, 0, 6) / 6``."""
    return _surrogate_activation(input, "hardsigmoid", float(temp), [])


def surrogate_elu(
    input: Tensor, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0, temp: float = 0.3
) -> Tensor:
    """``aten.elu(z, alpha, scale, input_scale)`` (``F.elu`` is ``(alpha, 1, 1)``); backward ``grad * elu_gate``.

    ``elu_gate = scale * (s + (1 - s) * alpha * input_scale * exp(input_scale * min(z, 0)))``, ``s = sigmoid(z / temp)``.
    """
    return _surrogate_activation(input, "elu", float(temp), [float(alpha), float(scale), float(input_scale)])


def surrogate_celu(input: Tensor, alpha: float = 1.0, temp: float = 0.3) -> Tensor:
    """``F.celu``; backward ``grad * (s + (1 - s) * exp(min(z, 0) / alpha))``, ``s = sigmoid(z / temp)``."""
    return _surrogate_activation(input, "celu", float(temp), [float(alpha)])


def surrogate_selu(input: Tensor, temp: float = 0.3) -> Tensor:
    """``F.selu``; backward ``grad * scale * (s + (1 - s) * alpha * exp(min(z, 0)))``, ``s = sigmoid(z / temp)``."""
    return _surrogate_activation(input, "selu", float(temp), [])


def surrogate_mish(input: Tensor, temp: float = 1.6) -> Tensor:
    """``F.mish``; backward ``grad * tanh(softplus(z / temp))`` (SiLU's default temp 1.6)."""
    return _surrogate_activation(input, "mish", float(temp), [])


def surrogate_hard_mish(input: Tensor, temp: float = 1.6) -> Tensor:
    """timm's ``hard_mish`` (``0.5 * z * clamp(z + 2, 0, 2)``); backward ``grad * clamp(z / (2 temp) + 1, 0, 1)``."""
    return _surrogate_activation(input, "hard_mish", float(temp), [])


# ---------------------------------------------------------------- PReLU
# A learned slope is a tensor (a parameter), so PReLU has its own op: the weight's gradient
# must reach it, and it is the exact one (it does not depend on the input's backward).


def _channel_slope(weight: Tensor, z: Tensor) -> Tensor:
    """``weight`` shaped to broadcast as ``F.prelu`` does: one slope, or one per channel (dim 1; dim 0 of a 1-D input)."""
    if weight.numel() == 1:
        return weight.reshape(())
    shape = [1] * z.dim()
    shape[1 if z.dim() >= 2 else 0] = weight.numel()
    return weight.reshape(shape)


def prelu_backward(
    grad: Tensor, z: Tensor, weight: Tensor, temp: float, needs_weight: bool
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(dz, dweight)``: ``dz = grad * (a + (1 - a) * sigmoid(z / temp))`` (the LeakyReLU rule with the learned
    slope ``a``, which may be negative; sigmoid floored, result flushed); ``dweight`` is torch's exact one, ``sum(grad * min(z, 0))`` per slope."""
    compute = z.to(torch.promote_types(z.dtype, torch.float32))
    slope = _channel_slope(weight, z).to(compute.dtype)
    # Not gated_backward: a learned slope may be negative, and its floor (gate < 2^-64 -> 0) would zero it.
    # The sigmoid inside the gate is floored already; the product is flushed.
    dz = flush_subnormal((grad * leaky_relu_gate(compute, temp, slope)).to(grad.dtype))
    if not needs_weight:
        return dz, None
    per_element = grad * torch.where(z > 0, torch.zeros((), dtype=z.dtype, device=z.device), z)
    if weight.numel() == 1:
        dweight = per_element.sum().reshape(weight.shape)
    else:
        channel = 1 if z.dim() >= 2 else 0
        dweight = per_element.sum([d for d in range(z.dim()) if d != channel]).reshape(weight.shape)
    return dz, dweight.to(weight.dtype)


def _prelu_forward(z: Tensor, weight: Tensor, temp: float) -> Tensor:
    return F.prelu(z, weight)


def _prelu_setup_context(ctx, inputs, output) -> None:
    z, weight, temp = inputs
    ctx.save_for_backward(z, weight)
    ctx.temp = temp


def _prelu_backward(ctx, grad: Tensor):
    z, weight = ctx.saved_tensors
    dz, dweight = prelu_backward(grad, z, weight, ctx.temp, ctx.needs_input_grad[1])
    return dz, dweight, None


_surrogate_prelu = define_surrogate_op(
    "surrogate_prelu", _prelu_forward, setup_context=_prelu_setup_context, backward=_prelu_backward
)


def surrogate_prelu(input: Tensor, weight: Tensor, temp: float = 0.3) -> Tensor:
    """``F.prelu(z, a)``; backward ``grad * (a + (1 - a) * sigmoid(z / temp))``, the weight's gradient exact."""
    return _surrogate_prelu(input, weight, float(temp))
