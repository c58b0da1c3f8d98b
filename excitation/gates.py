"""Excitation gates: the soft replacements for ReLU's hard ``1[z > 0]``.

A gate maps a pre-activation ``z`` and a temperature ``temp`` to a number in
``[0, 1]``.  The surrogate ReLU backward multiplies the incoming gradient by
it.  ``temp -> 0`` recovers the hard gate (the vanilla gradient); large
``temp`` approaches ``1/2`` everywhere (a linearised network, up to scale).

This module is pure math on tensors.  It knows nothing of ``torch.library``
or FX, so it can serve as the readable reference for every fused kernel.
"""

from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import Tensor

__all__ = ["GATES", "sigmoid_gate", "normal_cdf_gate", "check_gate", "check_temp"]


def sigmoid_gate(z: Tensor, temp: float) -> Tensor:
    """``sigmoid(z / temp)``: the derivative of ``temp * softplus(z / temp)``."""
    return torch.sigmoid(z / temp)


def normal_cdf_gate(z: Tensor, temp: float) -> Tensor:
    """``Phi(z / temp)``: the standard normal CDF, the derivative of a Gaussian-smoothed ReLU."""
    return torch.special.ndtr(z / temp)


#: Every gate by name.  ``excite(gate=...)`` accepts these keys.
GATES: Dict[str, Callable[[Tensor, float], Tensor]] = {
    "sigmoid": sigmoid_gate,
    "normal_cdf": normal_cdf_gate,
}


def check_gate(gate: object, *, argument: str = "gate") -> str:
    """Return ``gate`` if it names a known gate, else raise a ``ValueError`` listing them."""
    if not isinstance(gate, str) or gate not in GATES:
        valid = ", ".join(repr(name) for name in GATES)
        raise ValueError(f"{argument}={gate!r} is not a known gate; use one of {valid}.")
    return gate


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
