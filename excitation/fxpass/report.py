"""The record of what a pass changed: every rewritten site and every activation left alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from .rules import RULES

__all__ = ["Site", "Unhandled", "Report"]

# Every kind in report order; ReLU and 2-D max-pool are always counted (the classic pair).
_KINDS = [kind for rule in RULES.values() for kind in rule.kinds]
_ALWAYS_COUNTED = ("relu", "max_pool2d")


@dataclass(frozen=True)
class Site:
    """One rewritten call site.

    Attributes
    ----------
    name : str
        Module path for module calls (``"layer1.0.relu"``; a module called three
        times gives three sites with the same name), else the FX node name.
    node : str
        The FX node name the site had in the graph that was excited (the traced
        model, ``ep.module()``, dynamo's graph); unique per site and stable when
        re-exciting.  ``temps`` accepts it.
    kind : str
        The op kind: a kind of the activation table (:data:`excitation.spec.ACTIVATIONS`:
        ``"relu"``, ``"hardtanh"`` (ReLU6 too), ``"silu"``, ``"max_pool2d"``, ...),
        ``"layer_norm"``, ``"softmax"``, ``"scaled_dot_product_attention"``,
        ``"multihead_attention"`` or ``"attention_function"`` (e.g. Swin's ``shifted_window_attention``).
    form : str
        How the original called it: ``"module"``, ``"function"``, ``"method"``,
        ``"aten"``, or ``"excited"`` (an existing surrogate that was re-tempered).
    temp : float or None
        The temperature of this site's backward (``None`` for rules without one:
        ``layer_norm``, ``attention``).
    gate : str or None
        The ReLU gate (``None`` for other sites).
    inplace : bool
        Whether the original call was in place.
    rule : str
        The rule that rewrote it (a key of :data:`excitation.RULES`).
    fused : str or None
        For a ReLU fused with the BatchNorm before it (``excite(..., fuse=True)``,
        the default): that BatchNorm's module path, with ``" + add"`` when a
        residual sum between them was fused too.  ``None`` for an unfused site.
    pool_backward : str or None
        For a max-pool site, what its backward differentiates: ``"soft"`` (the soft
        pool) or ``"weights"`` (its softmax weights held constant).  ``None`` elsewhere.
    """

    name: str
    node: str
    kind: str
    form: str
    temp: Optional[float]
    gate: Optional[str] = None
    inplace: bool = False
    rule: str = "relu"
    fused: Optional[str] = None
    pool_backward: Optional[str] = None


@dataclass(frozen=True)
class Unhandled:
    """An activation-like call the pass left unchanged (its backward stays vanilla).

    ``reason`` is ``"no rule"`` (nothing covers it), ``"rule off"`` (its rule was
    not selected in ``rules=``), ``"decomposed"`` (a rule's op that ``run_decompositions``
    broke into primitives: excite before decomposing) or ``"smooth"`` (sigmoid, tanh:
    no hard gate to soften, so kept vanilla by design; listed in :attr:`Report.smooth`).
    """

    name: str
    op: str
    reason: str = "no rule"


@dataclass
class Report:
    """What :func:`excitation.excite` did to a model.  ``print(report)`` summarises it."""

    sites: List[Site] = field(default_factory=list)
    unhandled: List[Unhandled] = field(default_factory=list)
    temp: float = 0.3
    pool_temp: float = 0.3
    gate: str = "sigmoid"
    #: The rules that applied, with their default temperatures.
    rules: Dict[str, Optional[float]] = field(default_factory=dict)
    #: Smooth activations (sigmoid, tanh) kept vanilla by design.
    smooth: List[Unhandled] = field(default_factory=list)
    #: What the ReLU sites keep for their backward ("exact", "bfloat16" or "uint8").
    saved: str = "exact"
    #: The preset the options started from (``excitation.PRESETS``), and the pool backward used.
    preset: str = "paper"
    pool_backward: str = "soft"

    def counts(self) -> Dict[str, int]:
        """Rewritten sites per kind, e.g. ``{"relu": 49, "max_pool2d": 1}``.

        ``relu`` and ``max_pool2d`` are always listed; other kinds when present.
        """
        counts = Counter(site.kind for site in self.sites)
        return {kind: counts.get(kind, 0) for kind in _KINDS if kind in _ALWAYS_COUNTED or counts.get(kind)}

    def rule_counts(self) -> Dict[str, int]:
        """Rewritten sites per rule, e.g. ``{"relu": 16, "max_pool": 1, "gelu": 12}``."""
        return dict(Counter(site.rule for site in self.sites))

    def unhandled_counts(self) -> Dict[str, int]:
        """Number of activation-like sites left alone, per op name."""
        return dict(Counter(item.op for item in self.unhandled))

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        parts = [f"{n} {kind}" for kind, n in self.counts().items()]
        temps = sorted({site.temp for site in self.sites if site.temp is not None})
        temp_text = (
            f"temp {self.temp:g}, pool_temp {self.pool_temp:g}"
            if len(temps) <= 2
            else f"temps {temps[0]:g}..{temps[-1]:g} over {len(temps)} values"
        )
        pool = "" if not any(site.rule == "max_pool" for site in self.sites) else f", pool backward {self.pool_backward}"
        lines = [f"excitation: rewrote {', '.join(parts)} sites (preset {self.preset}: gate {self.gate}, {temp_text}{pool})"]
        fused = sum(site.fused is not None for site in self.sites)
        if fused:
            lines.append(f"  {fused} ReLU sites fused with the BatchNorm before them (they save what vanilla saves)")
        if self.unhandled:
            left = ", ".join(f"{op} x{n}" for op, n in sorted(self.unhandled_counts().items()))
            lines.append(f"  left alone (vanilla backward): {left}")
        else:
            lines.append("  left alone: no other activation sites")
        if self.smooth:
            smooth = ", ".join(f"{op} x{n}" for op, n in sorted(Counter(s.op for s in self.smooth).items()))
            lines.append(f"  smooth, vanilla by design: {smooth}")
        if not self.sites:
            lines.append("  nothing was rewritten: this model's pullback equals its vanilla gradient")
        return "\n".join(lines)
