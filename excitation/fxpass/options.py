"""The options of an excitation pass, resolved once into one frozen, hashable object.

Every entry point (:func:`excitation.excite`, :func:`~excitation.pullback`,
:func:`~excitation.pullbacks`, :func:`~excitation.ascend`, :func:`~excitation.calibrate`,
:func:`~excitation.backend`, ``extract``, ``evaluate``) takes ``options=Options(...)`` or the
same choices as keywords; the keywords are sugar for :meth:`Options.build`.  Inside the
library only an :class:`Options` travels, and it is the key of the cache of prepared modules.

>>> import excitation
>>> options = excitation.Options.build("semantic", temp=0.5)
>>> options.preset, options.temp, options.gate, options.pool_backward
('semantic', 0.5, 'normal_cdf', 'weights')
>>> options == excitation.Options.build(preset="semantic", temp=0.5)
True
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from ..gates import check_saved, check_temp
from ..presets import resolve_preset
from .rules import RulesSpec, resolve_rules

__all__ = ["Options", "TempsSpec", "options_from"]

#: Per-site temperatures: ``{site name or node name: temp}``, or a callable that gets a
#: :class:`excitation.Site` (its default temp filled in) and returns a temp, or ``None`` to keep it.
TempsSpec = Union[Mapping[str, float], Callable[[Any], Optional[float]], None]

# The keyword form of every field, in Options.build's order.
_KEYWORDS = ("preset", "temp", "pool_temp", "gate", "pool_backward", "temps", "rules", "saved", "fuse")


@dataclass(frozen=True)
class Options:
    """Every choice of an excitation pass, checked and resolved.

    Build one with :meth:`build` (which applies the preset and checks every value); the
    fields are then the values the pass uses.

    Attributes
    ----------
    preset : str
        The preset the defaults came from (:data:`excitation.PRESETS`).
    temp : float
        The ReLU family's temperature.
    pool_temp : float
        The max-pool temperature.
    gate : str
        The ReLU gate (:data:`excitation.GATES`).
    pool_backward : str
        What a max-pool's backward differentiates (``"soft"`` or ``"weights"``).
    rules : tuple or None
        The ``rules=`` choice, frozen: ``None``, the rule names, or a mapping's sorted
        ``(name, temp | bool)`` pairs; :attr:`active_rules` resolves it.
    temps : tuple, callable or None
        Per-site temperatures: a mapping, frozen as sorted ``(key, temp)`` pairs, or a callable.
    saved : str
        What a ReLU site keeps for its backward (``"exact"``, ``"bfloat16"``, ``"uint8"``).
    fuse : bool
        Fuse BatchNorm -> ReLU chains.
    """

    preset: str = "paper"
    temp: float = 0.3
    pool_temp: float = 0.3
    gate: str = "sigmoid"
    pool_backward: str = "soft"
    rules: Union[None, Tuple[str, ...], Tuple[Tuple[str, Union[float, bool, None]], ...]] = None
    temps: Union[None, Tuple[Tuple[str, float], ...], Callable[[Any], Optional[float]]] = None
    saved: str = "exact"
    fuse: bool = True

    @classmethod
    def build(
        cls,
        preset: Optional[str] = None,
        *,
        temp: Optional[float] = None,
        pool_temp: Optional[float] = None,
        gate: Optional[str] = None,
        pool_backward: Optional[str] = None,
        temps: TempsSpec = None,
        rules: RulesSpec = None,
        saved: str = "exact",
        fuse: bool = True,
    ) -> "Options":
        """The options from a preset and explicit choices (explicit ones win); every value is checked.

        Raises
        ------
        ValueError, TypeError
            A value that is not valid, named with the fix.
        """
        name, temp_value, pool_value, gate_value, pool_backward_value = resolve_preset(
            preset, temp=temp, pool_temp=pool_temp, gate=gate, pool_backward=pool_backward
        )
        if not isinstance(fuse, bool):
            raise TypeError(f"fuse must be True or False, got {fuse!r} ({type(fuse).__name__}).")
        resolve_rules(rules, temp_value, pool_value)  # refuses bad rules
        return cls(name, temp_value, pool_value, gate_value, pool_backward_value, _freeze_rules(rules),
                   _freeze_temps(temps), check_saved(saved), fuse)

    @property
    def active_rules(self) -> Dict[str, Optional[float]]:
        """``{rule name: temperature or None}`` for every rule that applies."""
        rules = self.rules
        if rules and isinstance(rules[0], tuple):
            rules = dict(rules)
        return resolve_rules(rules, self.temp, self.pool_temp)

    def keywords(self) -> Dict[str, Any]:
        """The keywords that :meth:`build` takes to make these options again."""
        rules = dict(self.rules) if self.rules and isinstance(self.rules[0], tuple) else self.rules
        return {"preset": self.preset, "temp": self.temp, "pool_temp": self.pool_temp, "gate": self.gate,
                "pool_backward": self.pool_backward, "temps": self.temps_spec, "rules": rules, "saved": self.saved,
                "fuse": self.fuse}

    def replace(self, **changes: Any) -> "Options":
        """These options with some choices changed, checked again (``options.replace(temp=0.5)``)."""
        unknown = set(changes) - set(_KEYWORDS)
        if unknown:
            raise TypeError(f"Options has no field {sorted(unknown)}; its fields are {', '.join(_KEYWORDS)}.")
        return Options.build(**{**self.keywords(), **changes})

    @property
    def temps_spec(self) -> TempsSpec:
        """:attr:`temps` as the pass reads it: a dict, a callable or ``None``."""
        return dict(self.temps) if isinstance(self.temps, tuple) else self.temps



def _freeze_rules(rules: RulesSpec) -> Union[None, Tuple[str, ...], Tuple[Tuple[str, Union[float, bool, None]], ...]]:
    if rules is None:
        return None
    if isinstance(rules, Mapping):
        return tuple(sorted(rules.items()))
    return tuple(rules)


def _freeze_temps(temps: TempsSpec) -> Union[None, Tuple[Tuple[str, float], ...], Callable[[Any], Optional[float]]]:
    if temps is None or callable(temps):
        return temps
    if not isinstance(temps, Mapping):
        raise TypeError(
            f"temps must be a mapping {{site name: temp}}, a callable(site) -> temp, or None; "
            f"got {type(temps).__name__}."
        )
    return tuple(sorted((str(key), check_temp(value, argument=f"temps[{key!r}]")) for key, value in temps.items()))


@functools.lru_cache(maxsize=256)
def _build_cached(chosen: Tuple[Tuple[str, Any], ...]) -> Options:
    # Entry points build their options on every call: a cached prepare() must stay cheap.
    return Options.build(**dict(chosen))


def options_from(options: Optional[Options], **keywords: Any) -> Options:
    """``options`` if given (then no keyword may be), else :meth:`Options.build` of the keywords.

    Entry points call this once: their keywords are sugar for an :class:`Options`.
    """
    given = {key: value for key, value in keywords.items() if value is not None and key in _KEYWORDS
             and not (key == "saved" and value == "exact") and not (key == "fuse" and value is True)}
    if options is None:
        chosen = tuple((key, value) for key, value in keywords.items() if key in _KEYWORDS)
        try:
            return _build_cached(chosen)
        except TypeError:  # an unhashable choice (a dict of temps or rules): build it every time
            return Options.build(**dict(chosen))
    if not isinstance(options, Options):
        raise TypeError(f"options must be an excitation.Options (Options.build(...)), got {type(options).__name__}.")
    if given:
        raise ValueError(
            f"pass either options= or the keywords {sorted(given)}, not both; "
            f"options.replace(...) or Options.build(...) makes the options you want."
        )
    return options
