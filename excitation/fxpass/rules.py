"""The rules: which backward each kind of site gets, and how users choose among them.

A *rule* is a family of sites with one backward (``"relu"``, ``"max_pool"``,
``"attention"``, ...).  The activation rules come from the activation table
(:mod:`excitation.spec`); LayerNorm, RMSNorm and attention, which rewrite more than one
element-wise op, are declared here.  ``excite(model, rules=...)`` picks the rules that apply;
:data:`DEFAULT_RULES` is all of them.  Every rule is forward-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..errors import with_suggestions
from ..gates import check_temp
from ..presets import PRESETS
from ..spec import ACTIVATIONS, RULE_BACKWARDS

__all__ = ["Rule", "RULES", "DEFAULT_RULES", "RulesSpec", "resolve_rules"]


@dataclass(frozen=True)
class Rule:
    """One backward rule.

    Attributes
    ----------
    name : str
        What ``rules=`` calls it.
    kinds : tuple of str
        The site kinds (``Site.kind``) it covers.
    default_temp : float, "temp", "pool_temp" or None
        Its temperature: a number, the ``temp`` / ``pool_temp`` argument of
        :func:`excitation.excite`, or ``None`` for rules without one.
    backward : str
        The backward, in one line.
    """

    name: str
    kinds: Tuple[str, ...]
    default_temp: Union[float, str, None]
    backward: str


def _activation_rules() -> Tuple[Rule, ...]:
    """One rule per ``rule`` of the activation table, its kinds in table order."""
    kinds: Dict[str, List[str]] = {}
    for spec in ACTIVATIONS:
        if spec.variant_of is None:
            kinds.setdefault(spec.rule, []).append(spec.kind)
    first = {name: next(spec for spec in ACTIVATIONS if spec.rule == name) for name in kinds}
    return tuple(Rule(name, tuple(kinds[name]), first[name].temp, RULE_BACKWARDS[name]) for name in kinds)


#: Every rule by name, in the order reports list them: the activation table's, then the norms and attention.
RULES: Dict[str, Rule] = {
    rule.name: rule
    for rule in (
        *_activation_rules(),
        Rule("layer_norm", ("layer_norm",), None, "mean and variance held constant: grad * weight * rstd"),
        Rule("rms_norm", ("rms_norm",), None, "root mean square held constant: grad * weight * rstd"),
        Rule("attention", ("softmax", "scaled_dot_product_attention", "multihead_attention", "attention_function"),
             None, "attention weights held constant: gradient flows through the values only"),
    )
}

#: The rules ``excite`` applies unless told otherwise: all of them.
DEFAULT_RULES: Tuple[str, ...] = tuple(RULES)

#: ``None`` (all rules), names of the rules to apply, or ``{name: temp | True | False}``
#: (start from all rules; ``False`` switches one off, a number sets its temperature).
RulesSpec = Union[None, Iterable[str], Mapping[str, Union[float, bool, None]]]

KIND_TO_RULE: Dict[str, str] = {kind: rule.name for rule in RULES.values() for kind in rule.kinds}
KIND_TO_RULE.update({spec.kind: spec.rule for spec in ACTIVATIONS})  # op kinds too (gelu_tanh)


def _check_names(names: Iterable[str]) -> None:
    unknown = [name for name in names if name not in RULES]
    if unknown:
        raise ValueError(f"rules names unknown rules: {with_suggestions(unknown, RULES)}. Known rules: {', '.join(RULES)}.")


def resolve_rules(rules: RulesSpec, temp: float, pool_temp: float) -> Dict[str, Optional[float]]:
    """``{rule name: temperature or None}`` for every rule that applies."""
    defaults: Dict[str, Optional[float]] = {}
    for rule in RULES.values():
        value = rule.default_temp
        defaults[rule.name] = temp if value == "temp" else pool_temp if value == "pool_temp" else value
    if rules is None:
        return defaults
    if isinstance(rules, str):
        raise TypeError(
            f"rules={rules!r} is a string; pass a list of rule names, e.g. rules=[{rules!r}], "
            f"or a mapping such as rules={{{rules!r}: False}} to switch one off."
        )
    if isinstance(rules, Mapping):
        _check_names(rules)
        active = dict(defaults)
        for name, value in rules.items():
            if value is False or value is None:
                active.pop(name)
            elif value is True:
                continue
            elif RULES[name].default_temp is None:
                raise ValueError(f"rule {name!r} has no temperature; use True or False for it, not {value!r}.")
            else:
                active[name] = check_temp(value, argument=f"rules[{name!r}]")
        return active
    try:
        names = list(rules)
    except TypeError:
        raise TypeError(
            f"rules must be None, a list of rule names or a mapping {{name: temp | True | False}}, "
            f"got {type(rules).__name__}."
        ) from None
    _check_names(names)
    return {name: defaults[name] for name in RULES if name in names}


def _sites_text(rule: str) -> str:
    if rule in _STRUCTURAL_SITES:
        return _STRUCTURAL_SITES[rule]
    return "; ".join(spec.sites for spec in ACTIVATIONS if spec.rule == rule and spec.sites)


_STRUCTURAL_SITES = {
    "layer_norm": "`nn.LayerNorm`, `F.layer_norm` (so ConvNeXt's `LayerNorm2d`), ATen `layer_norm`",
    "rms_norm": "`nn.RMSNorm`, `F.rms_norm`, ATen `rms_norm`; the hand-written `x * rsqrt(mean(x ** 2) + eps)` of "
                "Llama, Qwen, Gemma and T5 and ImageGPT's `x / sqrt(...)`, held at their root",
    "attention": "`nn.MultiheadAttention`, `F.scaled_dot_product_attention`, `F.multi_head_attention_forward`, "
                 "torchvision's `shifted_window_attention` (Swin), any softmax whose output feeds a matmul "
                 "(MaxViT, hand-written attention)",
}


def _temp_text(default_temp: Union[float, str, None]) -> str:
    if default_temp is None:
        return "none"
    if default_temp in ("temp", "pool_temp"):
        values = ", ".join(f"{name} {getattr(preset, str(default_temp)):g}" for name, preset in PRESETS.items())
        return f"`{default_temp}` ({values})"
    return f"{default_temp:g}"


def rules_table() -> str:
    """The rule table the documentation shows: every rule, its sites, backward and default temperature."""
    lines = ["| rule | sites | backward (forward unchanged) | default temp |", "|---|---|---|---|"]
    for rule in RULES.values():
        lines.append(f"| `{rule.name}` | {_sites_text(rule.name)} | `{rule.backward}` | {_temp_text(rule.default_temp)} |")
    return "\n".join(lines)
