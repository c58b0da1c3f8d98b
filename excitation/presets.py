"""Named rule sets: the seed paper's defaults and the author's later ("semantic") ones.

A preset fixes the four choices the papers differ in: the ReLU gate, its temperature,
the max-pool temperature and what the max-pool backward differentiates.  Every other
rule keeps its published default in both (SiLU ``sigmoid(z / 1.6)``, GELU ``Phi(z / 1.0)``,
LayerNorm statistics and attention weights held constant); ``rules=`` still re-tempers them.

* ``"paper"`` (the default): *Excitation pullbacks* as first published: ReLU gate
  ``sigmoid(z / 0.3)``; max-pool backward = the gradient of soft pooling
  ``sum_w softmax(x_w / 0.3) x_w``.
* ``"semantic"``: the later code (arXiv 2507.22832, "Pulling Back the Curtain on Deep
  Networks", repository 314-Foundation/SemanticPullbacks, ``lib/surrogates.py`` and
  ``lib/defaults.py``): ReLU gate ``Phi(z / 0.6)``; max-pool backward through the softmax
  weights only, the weights held constant (``dx_w = g * softmax(x / 0.3)_w``).

Explicit arguments win over the preset: ``excite(model, preset="semantic", temp=0.5)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .errors import with_suggestions
from .gates import check_gate, check_temp

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "POOL_BACKWARDS", "resolve_preset", "check_pool_backward"]

#: What a max-pool's backward differentiates: ``"soft"`` the whole soft pool
#: ``sum_w softmax(x_w / temp) x_w``; ``"weights"`` the same with its softmax weights held constant.
POOL_BACKWARDS = ("soft", "weights")


@dataclass(frozen=True)
class Preset:
    """One named set of defaults for :func:`excitation.excite`.

    Attributes
    ----------
    name : str
        What ``preset=`` calls it.
    gate : str
        The ReLU gate (:data:`excitation.GATES`).
    temp : float
        Temperature of the ReLU gate (and of the other ReLU-family rules).
    pool_temp : float
        Temperature of the max-pool softmax.
    pool_backward : {"soft", "weights"}
        See :data:`POOL_BACKWARDS`.
    source : str
        Where it was published.
    """

    name: str
    gate: str
    temp: float
    pool_temp: float
    pool_backward: str
    source: str

    def describe(self) -> str:
        pool = "soft-pool gradient" if self.pool_backward == "soft" else "softmax weights held constant"
        gate = {"sigmoid": "sigmoid", "normal_cdf": "Phi"}[self.gate]
        return f"{self.name}: ReLU {gate}(z / {self.temp:g}), max-pool {pool} at {self.pool_temp:g}"


#: Every preset by name.
PRESETS: Dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset("paper", "sigmoid", 0.3, 0.3, "soft", "Excitation Pullbacks (314-Foundation/ExcitationPullbacks)"),
        Preset("semantic", "normal_cdf", 0.6, 0.3, "weights",
               "Pulling Back the Curtain on Deep Networks, arXiv 2507.22832 (314-Foundation/SemanticPullbacks)"),
    )
}

#: The preset used when none is named.
DEFAULT_PRESET = "paper"


def check_pool_backward(value: object) -> str:
    """Return ``value`` if it names a pool backward, else raise a ``ValueError`` listing them."""
    if value not in POOL_BACKWARDS:
        raise ValueError(
            f"pool_backward={value!r} is not known; use 'soft' (the gradient of soft pooling, the paper's) or "
            f"'weights' (softmax weights held constant, the later 'semantic' rule set)."
        )
    return str(value)


def resolve_preset(
    preset: Optional[str] = None,
    *,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
) -> Tuple[str, float, float, str, str]:
    """``(preset name, temp, pool_temp, gate, pool_backward)``: the preset's values, explicit arguments winning.

    With ``preset`` unnamed and ``temp`` given, ``pool_temp`` follows ``temp`` (as it always has);
    a named preset keeps its own pool temperature unless ``pool_temp`` is given.
    """
    name = DEFAULT_PRESET if preset is None else preset
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset={preset!r} is not known: {with_suggestions([preset], PRESETS)}. "
                         f"Known presets: {', '.join(PRESETS)}.")
    chosen = PRESETS[name]
    temp_value = chosen.temp if temp is None else check_temp(temp)
    if pool_temp is not None:
        pool_value = check_temp(pool_temp, argument="pool_temp")
    elif preset is None and temp is not None:
        pool_value = temp_value
    else:
        pool_value = chosen.pool_temp
    gate_value = chosen.gate if gate is None else check_gate(gate)
    pool_backward_value = chosen.pool_backward if pool_backward is None else check_pool_backward(pool_backward)
    return name, temp_value, pool_value, gate_value, pool_backward_value
