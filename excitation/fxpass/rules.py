"""The rules: which backward each kind of site gets, and how users choose among them.

A *rule* is a family of sites with one backward (``"relu"``, ``"max_pool"``,
``"attention"``, ...).  ``excite(model, rules=...)`` picks the rules that apply;
:data:`DEFAULT_RULES` is all of them.  Every rule is forward-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

from ..errors import with_suggestions
from ..gates import check_temp

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


_POOL_KINDS = ("max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d")

#: Every rule by name, in the order reports list them.
RULES: Dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("relu", ("relu",), "temp", "grad * sigmoid(z / temp)  or  grad * Phi(z / temp)"),
        Rule("hardtanh", ("hardtanh",), "temp",
             "grad * (sigmoid((z - lo) / temp) - sigmoid((z - hi) / temp))"),
        Rule("leaky_relu", ("leaky_relu",), "temp", "grad * (a + (1 - a) * sigmoid(z / temp))"),
        Rule("prelu", ("prelu",), "temp", "grad * (a + (1 - a) * sigmoid(z / temp)), a the learned slope"),
        Rule("elu", ("elu", "celu", "selu"), "temp",
             "grad * scale * (s + (1 - s) * alpha * k * exp(k * min(z, 0))), s = sigmoid(z / temp)"),
        Rule("silu", ("silu",), 1.6, "grad * sigmoid(z / temp)"),
        Rule("mish", ("mish",), 1.6, "grad * tanh(softplus(z / temp))"),
        Rule("gelu", ("gelu",), 1.0, "grad * Phi(z / temp)"),
        Rule("hardswish", ("hardswish",), 1.6, "grad * hardsigmoid(z / temp)"),
        Rule("hard_mish", ("hard_mish",), 1.6, "grad * clamp(z / (2 temp) + 1, 0, 1)"),
        Rule("hardsigmoid", ("hardsigmoid",), "temp",
             "grad * (sigmoid((z + 3) / temp) - sigmoid((z - 3) / temp)) / 6"),
        Rule("max_pool", _POOL_KINDS, "pool_temp", "gradient of sum_w softmax(x_w / temp) x_w per window"),
        Rule("layer_norm", ("layer_norm",), None, "mean and variance held constant: grad * weight * rstd"),
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


_SITES_TEXT = {
    "relu": "`nn.ReLU`, `F.relu(_)`, `torch.relu(_)`, `.relu(_)()`, ATen `relu(_)`; gate `sigmoid` or "
            "`normal_cdf` (`gate=`)",
    "hardtanh": "`nn.ReLU6` (= `Hardtanh(0, 6)`), `nn.Hardtanh`, `F.relu6`, `F.hardtanh(_)`, ATen `hardtanh(_)`, `relu6`",
    "leaky_relu": "`nn.LeakyReLU`, `F.leaky_relu(_)`, ATen `leaky_relu(_)`",
    "prelu": "`nn.PReLU` (one slope or one per channel; timm's `PReLU`), `F.prelu`, `torch.prelu`, ATen `prelu`; "
             "the slope's own gradient stays exact",
    "elu": "`nn.ELU` / `nn.CELU` / `nn.SELU`, `F.elu(_)` / `F.celu(_)` / `F.selu(_)`, `torch.selu(_)` / "
           "`torch.celu(_)`, ATen `elu(_)` / `celu(_)` / `selu(_)`; `scale, alpha, k` = `1, alpha, 1` (ELU), "
           "`1, alpha, 1/alpha` (CELU), `1.0507, 1.6733, 1` (SELU)",
    "silu": "`nn.SiLU`, `F.silu`, ATen `silu(_)`",
    "mish": "`nn.Mish`, `F.mish(_)`, ATen `mish(_)` (what timm's `get_act_layer('mish')` gives)",
    "gelu": "`nn.GELU` (both approximations), `F.gelu`, ATen `gelu(_)`",
    "hardswish": "`nn.Hardswish`, `F.hardswish`, ATen `hardswish(_)`",
    "hard_mish": "timm's `hard_mish` / `HardMish`: the traced `0.5 * x * (x + 2).clamp(0, 2)` (out of place; "
                 "timm's in-place form is reported as `clamp`)",
    "hardsigmoid": "`nn.Hardsigmoid`, `F.hardsigmoid`, ATen `hardsigmoid(_)`",
    "max_pool": "`nn.MaxPool1d/2d/3d`, `nn.AdaptiveMaxPool1d/2d/3d`, their `F.` / `torch.` / ATen forms",
    "layer_norm": "`nn.LayerNorm`, `F.layer_norm` (so ConvNeXt's `LayerNorm2d`), ATen `layer_norm`",
    "attention": "`nn.MultiheadAttention`, `F.scaled_dot_product_attention`, `F.multi_head_attention_forward`, "
                 "torchvision's `shifted_window_attention` (Swin), any softmax whose output feeds a matmul "
                 "(MaxViT, hand-written attention)",
}


def rules_table() -> str:
    """The rule table the documentation shows: every rule, its sites, backward and default temperature."""
    lines = ["| rule | sites | backward (forward unchanged) | default temp |", "|---|---|---|---|"]
    for rule in RULES.values():
        named = {"temp": "`temp` (0.3)", "pool_temp": "`pool_temp` (= `temp`)", None: "none"}
        temp = named[rule.default_temp] if rule.default_temp in named else f"{rule.default_temp:g}"
        lines.append(f"| `{rule.name}` | {_SITES_TEXT[rule.name]} | `{rule.backward}` | {temp} |")
    return "\n".join(lines)
