"""Surrogates for the ReLU relatives: every gated kind of :data:`excitation.spec.ACTIVATIONS`, and PReLU.

One op, ``excitation::surrogate_activation(z, kind, temp, params)``, covers every kind
the table gives a forward and a gate: its forward calls the very ATen op the model
called (so it is bit-exact), and its backward is ``grad * gate(z, temp, *params)``.
The per-kind Python functions (``surrogate_hardtanh``, ``surrogate_silu``, ...) are
made from the table too; they are what an excited graph calls, so it reads like the model.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import leaky_relu_gate
from ..presets import DEFAULT_PRESET
from ..spec import ACTIVATIONS, RULE_BACKWARDS, SPECS, ActivationSpec, spec_temp
from . import native
from .dispatch import (NATIVE_ACTIVATION_KINDS, RAW_CALL_RUNTIMES, activation_backward_path, backward_runtime, device_type,
                       triton_available)
from .ops import native_activation_backward, run_relu_backward
from .reference import flush_subnormal, gated_backward
from .registry import define_surrogate_op

__all__ = [
    "SURROGATES",
    "surrogate_prelu",
    "prelu_backward",
    "activation_forward",
    "surrogate_activation_backward",
]


def _spec(kind: str) -> ActivationSpec:
    spec = SPECS.get(kind)
    if spec is None or spec.forward is None:
        known = sorted(k for k, s in SPECS.items() if s.forward is not None)
        raise ValueError(f"unknown activation kind {kind!r}; expected one of {known}.")
    return spec


def activation_forward(z: Tensor, kind: str, params: List[float]) -> Tensor:
    """The original activation, computed by the same ATen op the model's call reaches."""
    return _spec(kind).forward(z, *params)


def surrogate_activation_backward(grad: Tensor, z: Tensor, kind: str, temp: float, params: List[float]) -> Tensor:
    """``grad * gate(z, temp, *params)``, gate floored at 2^-64 and result flushed (:func:`.reference.gated_backward`).

    The gate is computed in at least float32.  Kinds whose gate is a ReLU gate (SiLU's
    ``sigmoid(z / temp)``, GELU's ``Phi(z / temp)``: ``ActivationSpec.relu_gate``) take the ReLU
    rule's fast paths (C kernel, fused ``softplus_backward``): at batch 1 each small pass is host
    time, and the contract's six per site were most of efficientnet's and convnext's extra time in
    the zoo (measured in docs/design-measurements.md).
    """
    spec = _spec(kind)
    runtime = backward_runtime(grad, z)
    path = activation_backward_path(
        runtime, device_type(z), z.dtype, kind, spec.relu_gate,
        # Only kinds with a C path ask whether the C kernels take these tensors.
        runtime in RAW_CALL_RUNTIMES and (kind in NATIVE_ACTIVATION_KINDS or spec.relu_gate is not None)
        and grad.shape == z.shape and native.supports(grad, z) and native.available(),
        triton=z.is_cuda and triton_available(), grad_mode=torch.is_grad_enabled(),
    )
    if path == "c":
        return native_activation_backward(grad, z, kind, temp, params)
    if path.startswith("relu:"):
        return run_relu_backward(path[len("relu:"):], grad, z, temp, spec.relu_gate)
    compute = z.to(torch.promote_types(z.dtype, torch.float32))
    return gated_backward(grad, spec.gate(compute, temp, *params))


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


def _make_surrogate(spec: ActivationSpec) -> Callable[..., Tensor]:
    """``surrogate_<kind>(input, *params, temp=<default>)``: the op's forward, the kind's gated backward.

    Written as source and compiled, as ``dataclasses`` does for ``__init__``: Python binds the
    arguments (a site's call costs what a hand-written function's does) and the function has
    the table's signature, which fx prints and ``inspect`` reads.
    """
    names = [name for name, _ in spec.params]
    function_name = f"surrogate_{spec.kind}"
    if not all(name.isidentifier() for name in (function_name, *names)):
        raise ValueError(f"activation kind {spec.kind!r}: kind and parameter names must be identifiers.")
    if spec.encode is None:
        floats = ", ".join(f"float({name})" for name in names)
        body = f"return _op(input, {spec.kind!r}, float(temp), [{floats}])"
    else:
        arguments = ", ".join(f"{name!r}: {name}" for name in names)
        body = f"kind, params = _encode({{{arguments}}})\n    return _op(input, kind, float(temp), params)"
    source = f"def {function_name}({', '.join(['input', *names, 'temp'])}):\n    {body}\n"
    namespace: Dict[str, Any] = {"_op": _surrogate_activation, "_encode": spec.encode}
    exec(source, namespace)  # noqa: S102 - source built above from the table's identifiers
    surrogate = namespace[function_name]
    surrogate.__defaults__ = (*(default for _, default in spec.params), spec_temp(spec, DEFAULT_PRESET))
    surrogate.__module__ = __name__
    surrogate.__doc__ = (
        f"The {spec.kind} activation, forward unchanged; backward ``{RULE_BACKWARDS[spec.rule]}`` "
        f"(rule ``{spec.rule}``, default temp {spec_temp(spec, DEFAULT_PRESET):g})."
    )
    return surrogate


#: The surrogate function of every gated site kind (:data:`excitation.spec.ACTIVATIONS`), by kind.
SURROGATES: Dict[str, Callable[..., Tensor]] = {
    spec.kind: _make_surrogate(spec) for spec in ACTIVATIONS if spec.forward is not None and spec.variant_of is None
}
# Module attributes, so that pickled and printed graphs name them (surrogate_hardtanh, ...).
globals().update({function.__name__: function for function in SURROGATES.values()})


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
