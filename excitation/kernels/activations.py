"""Surrogates for the ReLU relatives: ReLU6/Hardtanh, LeakyReLU, SiLU, GELU, Hardswish, Hardsigmoid.

One op, ``excitation::surrogate_activation(z, kind, temp, params)``, covers them
all: its forward calls the very ATen op the model called (so it is bit-exact),
and its backward is ``grad * gate(z / temp)`` with the gate of
:data:`excitation.gates.ACTIVATION_GATES` for that kind.  The per-kind Python
functions below are what an excited graph calls, so it reads like the model.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import ACTIVATION_GATES
from .reference import gated_backward
from .registry import define_surrogate_op

__all__ = [
    "surrogate_hardtanh",
    "surrogate_leaky_relu",
    "surrogate_silu",
    "surrogate_gelu",
    "surrogate_hardswish",
    "surrogate_hardsigmoid",
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
    raise ValueError(f"unknown activation kind {kind!r}; expected one of {sorted(ACTIVATION_GATES)}.")


def surrogate_activation_backward(grad: Tensor, z: Tensor, kind: str, temp: float, params: List[float]) -> Tensor:
    """``grad * gate(z, temp, *params)``, gate floored at 2^-64 and result flushed (:func:`.reference.gated_backward`).

    The gate is computed in at least float32.
    """
    compute = z.to(torch.promote_types(z.dtype, torch.float32))
    return gated_backward(grad, ACTIVATION_GATES[kind](compute, temp, *params))


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
