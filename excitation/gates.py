"""Excitation gates: the soft replacements for ReLU's hard ``1[z > 0]``.

A gate maps a pre-activation ``z`` and a temperature ``temp`` to a number in
``[0, 1]``.  The surrogate ReLU backward multiplies the incoming gradient by
it.  ``temp -> 0`` recovers the hard gate (the vanilla gradient); large
``temp`` approaches ``1/2`` everywhere (a linearised network, up to scale).

Every gate here is exactly 0 where it would be below :data:`GATE_FLOOR` (2^-64), and never
evaluates an exponential that underflows.

This module is pure math on tensors.  It knows nothing of ``torch.library``
or FX, so it can serve as the readable reference for every fused kernel.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

__all__ = [
    "GATE_FLOOR",
    "GATE_CODES",
    "SAVED_MODES",
    "GATES",
    "sigmoid_gate",
    "normal_cdf_gate",
    "hardtanh_gate",
    "leaky_relu_gate",
    "threshold_gate",
    "hard_sigmoid_gate",
    "hardsigmoid_unit_gate",
    "elu_gate",
    "mish_gate",
    "hard_mish_gate",
    "SELU_ALPHA",
    "SELU_SCALE",
    "check_gate",
    "check_saved",
    "check_temp",
]


#: A gate below this is exactly 0.  Why: a soft gate of a strongly negative pre-activation underflows
#: into subnormal floats, which cost a microcode assist per element on many x86 cores, and gates this
#: small change no explanation (kernels/reference.py has the whole contract).
GATE_FLOOR = 2.0**-64
#: Each gate's code in the compiled kernels: ``GATE_SIGMOID`` / ``GATE_NORMAL_CDF`` in
#: ``kernels/csrc/excitation_cpu.c`` and the ``GATE`` argument of the Triton kernels.
GATE_CODES = {"sigmoid": 0, "normal_cdf": 1}
#: What a surrogate ReLU keeps for its backward: the pre-activation (``"exact"``), or
#: the gate itself, already evaluated, in 2 bytes (``"bfloat16"``) or 1 byte (``"uint8"``,
#: steps of 1/255).  Vanilla's in-place ReLU keeps nothing beyond its output, so the
#: pre-activation is the whole memory overhead of a pullback; the compact gates cut it
#: to a half or a quarter (errors measured in docs/performance).
SAVED_MODES = ("exact", "bfloat16", "uint8")
#: ``sigmoid(u) < GATE_FLOOR`` exactly when ``u`` is below this (``-ln(2^64 - 1)``).
SIGMOID_FLOOR_LOGIT = -math.log(2.0**64 - 1.0)
#: ``Phi(u) < GATE_FLOOR`` exactly when ``u`` is below this (``scipy.special.ndtri(2**-64)``).
NORMAL_CDF_FLOOR_LOGIT = -9.080155124873613


def traced_constant(value: float) -> Callable[[], float]:
    """A reader of ``value`` that ``torch.compile`` treats as a constant.

    Why: under ``torch.compile(dynamic=True)`` dynamo makes every module-level float it reads a
    symbolic input, and (torch 2.14) it cannot lift such an input into the traced backward of an
    ``autograd.Function`` ("lift_tracked_freevar_to_input should not be called on root
    SubgraphTracer").  Code that runs inside a surrogate's backward reads its float constants
    through one of these.
    """

    @torch.compiler.assume_constant_result
    def read() -> float:
        return value

    return read


gate_floor = traced_constant(GATE_FLOOR)
sigmoid_floor_logit = traced_constant(SIGMOID_FLOOR_LOGIT)
normal_cdf_floor_logit = traced_constant(NORMAL_CDF_FLOOR_LOGIT)


def _sigmoid(u: Tensor) -> Tensor:
    """``sigmoid(u)``, 0 below the floor; the clamp keeps the exponential from underflowing (sigmoid(-64) is normal)."""
    return torch.where(u < sigmoid_floor_logit(), 0.0, torch.sigmoid(u.clamp_min(-64.0)))


def sigmoid_gate(z: Tensor, temp: float) -> Tensor:
    """``sigmoid(z / temp)``: the derivative of ``temp * softplus(z / temp)`` (0 where below 2^-64)."""
    return _sigmoid(z / temp)


def normal_cdf_gate(z: Tensor, temp: float) -> Tensor:
    """``Phi(z / temp)``: the standard normal CDF, the derivative of a Gaussian-smoothed ReLU (0 where below 2^-64).

    Written as ``erfc(-u / sqrt 2) / 2``, accurate to float precision in the tail, not as
    ``torch.special.ndtr``: torch 2.14's ndtr is ``(1 + erf(u / sqrt 2)) / 2``, whose sum cancels to
    exactly 0 below u = -5.9 in float32 (-8.3 in float64), so the floor at 2^-64 would never be
    reached and the C kernel, accurate there, would disagree.  The clamp keeps erfc normal.
    -1/sqrt 2 is a literal: a module-level float becomes symbolic under
    ``torch.compile(dynamic=True)`` (see :func:`traced_constant`).
    """
    u = z / temp
    phi = 0.5 * torch.special.erfc(u.clamp_min(-12.0) * -0.7071067811865476)
    return torch.where(u < normal_cdf_floor_logit(), 0.0, phi)


#: Every gate by name.  ``excite(gate=...)`` accepts these keys.
GATES: Dict[str, Callable[[Tensor, float], Tensor]] = {
    "sigmoid": sigmoid_gate,
    "normal_cdf": normal_cdf_gate,
}


def hardtanh_gate(z: Tensor, temp: float, min_val: float = 0.0, max_val: float = 6.0) -> Tensor:
    """``sigmoid((z - min_val)/temp) - sigmoid((z - max_val)/temp)``: a soft window for clipped ReLUs.

    The derivative of the soft clamp ``min_val + temp*softplus((z - min_val)/temp)
    - temp*softplus((z - max_val)/temp)``, so, as for ReLU, the pullback is the
    gradient of a smooth stand-in network (ReLU6 is ``hardtanh(z, 0, 6)``).  It
    differs from the product ``sigmoid((z - lo)/t) * sigmoid((hi - z)/t)`` by at
    most about ``exp(-(hi - lo)/t)`` (2e-9 for ReLU6 at t = 0.3).  ``temp -> 0``
    gives the vanilla ``1[min_val < z < max_val]``.
    """
    return _sigmoid((z - min_val) / temp) - _sigmoid((z - max_val) / temp)


def leaky_relu_gate(z: Tensor, temp: float, negative_slope: float = 0.01) -> Tensor:
    """``a + (1 - a) * sigmoid(z / temp)``: the sigmoid gate, lifted to LeakyReLU's floor ``a``."""
    return negative_slope + (1.0 - negative_slope) * _sigmoid(z / temp)


def threshold_gate(z: Tensor, temp: float, threshold: float = 0.0, value: float = 0.0) -> Tensor:
    """``sigmoid((z - threshold) / temp)``: the ReLU gate moved to ``nn.Threshold``'s step (``value`` plays no part).

    ``threshold(z, th, value)`` passes ``z`` above ``th`` and is the constant ``value`` below it, so
    its derivative is ``1[z > th]``: ReLU's hard gate moved to ``th``.  This is the derivative of
    ``th + temp * softplus((z - th) / temp)``.
    """
    return _sigmoid((z - threshold) / temp)


def hard_sigmoid_gate(z: Tensor, temp: float) -> Tensor:
    """``hardsigmoid(z / temp) = clamp(z / (6 temp) + 1/2, 0, 1)``, the gate of Hardswish.

    Hardswish is ``z * hardsigmoid(z)``; like SiLU (``z * sigmoid(z)``, backward
    ``sigmoid(z / temp)``) it is read as a gated linear unit whose gate is
    softened by ``temp``.  ``temp = 1`` is the unit's own gate.
    """
    return torch.clamp(z / (6.0 * temp) + 0.5, 0.0, 1.0)


def hardsigmoid_unit_gate(z: Tensor, temp: float) -> Tensor:
    """``hardtanh_gate(z + 3, temp, 0, 6) / 6``: Hardsigmoid is ``relu6(z + 3) / 6``, a clipped ReLU."""
    return hardtanh_gate(z + 3.0, temp, 0.0, 6.0) / 6.0


def _floored_exp(w: Tensor) -> Tensor:
    """``exp(w)``, exactly 0 for ``w < -64`` (far below :data:`GATE_FLOOR`): no subnormal exponential."""
    return torch.where(w < -64.0, 0.0, torch.exp(w.clamp_min(-64.0)))


def elu_gate(z: Tensor, temp: float, alpha: float = 1.0, scale: float = 1.0, input_scale: float = 1.0) -> Tensor:
    """``scale * (s + (1 - s) * alpha * input_scale * exp(input_scale * min(z, 0)))``, ``s = sigmoid(z / temp)``.

    ELU's derivative is ``scale * (1[z > 0] + 1[z <= 0] * alpha * input_scale * exp(input_scale * z))``
    (``aten.elu(z, alpha, scale, input_scale)``; CELU is ``(alpha, 1, 1 / alpha)``, SELU
    ``(1.6733, 1.0507, 1)``).  The hard switch between its two slopes is softened with the
    sigmoid gate of the ReLU (and LeakyReLU) rule, so ``temp -> 0`` gives the vanilla gradient.
    The negative branch's slope is held at its value at 0 for ``z > 0`` (``exp(min(z, 0))``):
    continued as ``exp(z)`` it would grow without bound and, for ``temp >= 1``, outweigh the
    vanishing ``1 - s``.  So the gate always lies between the two slopes of the unit.
    """
    s = _sigmoid(z / temp)
    negative = alpha * input_scale * _floored_exp(input_scale * z.clamp_max(0.0))
    return scale * (s + (1.0 - s) * negative)


def mish_gate(z: Tensor, temp: float) -> Tensor:
    """``tanh(softplus(z / temp))``, the gate of Mish ``z * tanh(softplus(z))`` (0 where below 2^-64).

    As for SiLU (``z * sigmoid(z)``, backward ``sigmoid(z / temp)``), the backward is the
    unit's own gate, softened by ``temp``; ``temp = 1`` is Mish's gate.  For very negative
    ``u = z / temp`` the gate is ``e^u`` to first order, so it crosses the floor where the
    sigmoid does.
    """
    u = z / temp
    return torch.where(u < sigmoid_floor_logit(), 0.0, torch.tanh(torch.nn.functional.softplus(u.clamp_min(-64.0))))


def hard_mish_gate(z: Tensor, temp: float) -> Tensor:
    """``clamp(z / (2 temp) + 1, 0, 1)``, the gate of timm's hard_mish ``z * clamp(z + 2, 0, 2) / 2``.

    Hard Mish is ``z * clamp(z / 2 + 1, 0, 1)``, a gated unit like Hardswish
    (``z * clamp(z / 6 + 1/2, 0, 1)``, backward ``hardsigmoid(z / temp)``); ``temp = 1`` is its own gate.
    """
    return torch.clamp(z / (2.0 * temp) + 1.0, 0.0, 1.0)


#: SELU's constants (``F.selu``, Klambauer et al. 2017): ``selu(z) = SELU_SCALE * elu(z, SELU_ALPHA)``.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def check_gate(gate: object, *, argument: str = "gate") -> str:
    """Return ``gate`` if it names a known gate, else raise a ``ValueError`` listing them."""
    if not isinstance(gate, str) or gate not in GATES:
        valid = ", ".join(repr(name) for name in GATES)
        raise ValueError(f"{argument}={gate!r} is not a known gate; use one of {valid}.")
    return gate


def check_saved(saved: object) -> str:
    """Return ``saved`` if it names what a surrogate ReLU may keep for its backward, else raise."""
    if saved not in SAVED_MODES:
        raise ValueError(
            f"saved={saved!r} is not known; use 'exact' (the pre-activation, default), 'bfloat16' or "
            f"'uint8' (the gate itself in 2 or 1 bytes: less memory, a small measured error)."
        )
    return str(saved)


def check_temp(temp: object, *, argument: str = "temp") -> float:
    """Return ``temp`` as a float if it is a finite positive real number, else raise.

    ``bool`` is refused on purpose: ``temp=True`` is always a mistake.
    """
    if isinstance(temp, Tensor) and temp.numel() == 1 and not temp.dtype.is_complex:
        temp = temp.item()
    if isinstance(temp, bool) or not isinstance(temp, (int, float)):
        raise TypeError(
            f"{argument} must be a positive float, got {type(temp).__name__} {temp!r}; "
            f"pass a number such as {argument}=0.3."
        )
    value = float(temp)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"{argument} must be finite and > 0, got {value!r}; small values approach the vanilla "
            f"gradient, large ones a linearised network (the default is 0.3)."
        )
    return value
