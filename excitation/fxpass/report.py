"""The record of what a pass changed: every rewritten site and every activation left alone."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["Site", "Unhandled", "Report"]

_KIND_LABELS = {"relu": "ReLU", "max_pool2d": "max-pool"}


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
        ``"relu"`` or ``"max_pool2d"``.
    form : str
        How the original called it: ``"module"``, ``"function"``, ``"method"``,
        ``"aten"``, or ``"excited"`` (an existing surrogate that was re-tempered).
    temp : float
        The temperature of this site's backward.
    gate : str or None
        The ReLU gate (``None`` for max-pool sites).
    inplace : bool
        Whether the original call was in place.
    """

    name: str
    node: str
    kind: str
    form: str
    temp: float
    gate: Optional[str] = None
    inplace: bool = False


@dataclass(frozen=True)
class Unhandled:
    """An activation-like call the pass left unchanged (its backward stays vanilla)."""

    name: str
    op: str


@dataclass
class Report:
    """What :func:`excitation.excite` did to a model.  ``print(report)`` summarises it."""

    sites: List[Site] = field(default_factory=list)
    unhandled: List[Unhandled] = field(default_factory=list)
    temp: float = 0.3
    pool_temp: float = 0.3
    gate: str = "sigmoid"

    def counts(self) -> Dict[str, int]:
        """Number of rewritten sites per kind, e.g. ``{"relu": 49, "max_pool2d": 1}``."""
        counts = Counter(site.kind for site in self.sites)
        return {kind: counts.get(kind, 0) for kind in _KIND_LABELS}

    def unhandled_counts(self) -> Dict[str, int]:
        """Number of activation-like sites left alone, per op name."""
        return dict(Counter(item.op for item in self.unhandled))

    def __len__(self) -> int:
        return len(self.sites)

    def __str__(self) -> str:
        counts = self.counts()
        parts = [f"{counts[kind]} {label}" for kind, label in _KIND_LABELS.items()]
        temps = sorted({site.temp for site in self.sites})
        temp_text = (
            f"temp {self.temp:g}, pool_temp {self.pool_temp:g}"
            if len(temps) <= 2
            else f"temps {temps[0]:g}..{temps[-1]:g} over {len(temps)} values"
        )
        lines = [f"excitation: rewrote {' and '.join(parts)} sites (gate {self.gate}, {temp_text})"]
        if self.unhandled:
            left = ", ".join(f"{op} x{n}" for op, n in sorted(self.unhandled_counts().items()))
            lines.append(f"  left alone (vanilla backward): {left}")
        else:
            lines.append("  left alone: no other activation sites")
        if not self.sites:
            lines.append("  nothing was rewritten: this model's pullback equals its vanilla gradient")
        return "\n".join(lines)
