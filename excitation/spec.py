"""The activation table: one entry per kind of activation site, and everything derives from it.

An :class:`ActivationSpec` declares what the library knows of one kind of
activation (ReLU, its relatives and the max-pools):

* its rule (what ``excite(rules=...)`` calls it) and its default temperature;
* every way a model may call it: module classes, ``torch`` / ``torch.nn.functional``
  functions, tensor methods, in-place variants and ATen overloads, with how their
  arguments bind;
* its exact forward and its gate (for kinds run by the shared ``surrogate_activation`` op);
* the text the documentation shows.

The site matcher (:mod:`excitation.fxpass.sites`), the surrogate functions
(:mod:`excitation.kernels.activations`), the TorchScript lowering, the dynamo path's
census, the rule table (:data:`excitation.RULES`) and the rules page of the docs
read this table; none of them lists kinds of its own.  Adding a gated activation is
one entry here, a gate in :mod:`excitation.gates` if it is new, and its tests.

Rules that are not element-wise activations (LayerNorm, RMSNorm, attention) rewrite several
ops together and are declared in :mod:`excitation.fxpass.rules`.

Why one module: the table is the single place a kind is declared; split, a kind's forms, forward
and gate would again live apart, which is what the table exists to prevent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import gates
from .presets import PRESETS

__all__ = [
    "Form", "ModuleForm", "ActivationSpec", "ACTIVATIONS", "SPECS", "GATED_KINDS", "RULE_BACKWARDS", "spec_temp", "op_arguments",
]

aten = torch.ops.aten

#: ``(name, default)`` pairs: a callable's parameters in order, the first always called ``input``.
Params = Tuple[Tuple[str, Any], ...]


@dataclass(frozen=True)
class Form:
    """Callables that compute one activation, and how their arguments bind.

    Attributes
    ----------
    targets : tuple
        Functions or ATen overload packets / overloads; for :attr:`ActivationSpec.methods`, method names.
    params : tuple of (name, default), optional
        The parameters as the callable declares them; ``None`` reads an ATen overload's schema.
    inplace : bool, optional
        Whether the call writes its input; ``None`` reads the bound ``inplace`` argument.
    fixed : mapping
        Arguments the callable implies (``F.relu6`` is ``hardtanh`` with ``min_val=0, max_val=6``).
    applies : callable, optional
        ``applies(bound arguments) -> bool``: the call is a site only where this holds
        (``F.rrelu`` only with ``training=False``, when it is deterministic).
    """

    targets: Tuple[Any, ...]
    params: Optional[Params] = None
    inplace: Optional[bool] = False
    fixed: Mapping[str, Any] = field(default_factory=dict)
    applies: Optional[Callable[[Dict[str, Any]], bool]] = None


@dataclass(frozen=True)
class ModuleForm:
    """An ``nn.Module`` class (matched exactly, not its subclasses) and the attributes that are its arguments."""

    type: type
    attributes: Tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    #: ``applies(module) -> bool``: a site only where this holds (``nn.RReLU`` only in eval mode).
    applies: Optional[Callable[[nn.Module], bool]] = None


@dataclass(frozen=True)
class ActivationSpec:
    """One kind of activation site: its rule, its forms, its forward and gate, its docs.

    Attributes
    ----------
    kind : str
        The site kind (``Site.kind``) and the ``kind`` argument of ``excitation::surrogate_activation``.
    rule : str
        The rule it belongs to (a key of :data:`excitation.RULES`).
    temp : float, "temp" or "pool_temp"
        Its default temperature: a number, or the preset's ReLU / max-pool temperature.
    params : tuple of (name, default)
        The op's constants, in the order the forward and the gate take them after ``z``
        (and ``temp``).  The surrogate function takes them as arguments after the input.
    forward : callable, optional
        ``forward(z, *params)``: the op itself, computed by the ATen op the model reaches
        (so the surrogate's forward is bit-exact).  ``None`` for kinds with their own
        surrogate op (ReLU, PReLU, the max-pools).
    gate : callable, optional
        ``gate(z, temp, *params)``: the factor the backward multiplies the gradient by.
    encode : callable, optional
        ``encode(arguments) -> (op kind, float params)`` where an argument is not a float
        (GELU's ``approximate`` selects the ``gelu_tanh`` kind).
    variant_of : str, optional
        Set for an op kind that is no site kind of its own but another kind's variant
        (``gelu_tanh``, which ``gelu``'s :attr:`encode` selects).
    relu_gate : str, optional
        Set where the gate is exactly a ReLU gate of :data:`excitation.gates.GATES`
        (SiLU's ``sigmoid(z / temp)``), so ReLU's fast backward kernels serve it.
    functions, methods, modules
        Every way a model may call it (see :class:`Form`, :class:`ModuleForm`).
    backward : str
        The rule's backward in one line (the first entry of a rule speaks for it).
    sites : str
        The forms, as the rules page of the docs lists them.
    """

    kind: str
    rule: str
    temp: Union[float, str]
    params: Params = ()
    forward: Optional[Callable[..., Tensor]] = None
    gate: Optional[Callable[..., Tensor]] = None
    encode: Optional[Callable[[Mapping[str, Any]], Tuple[str, List[float]]]] = None
    relu_gate: Optional[str] = None
    variant_of: Optional[str] = None
    functions: Tuple[Form, ...] = ()
    methods: Tuple[Form, ...] = ()
    modules: Tuple[ModuleForm, ...] = ()
    backward: str = ""
    sites: str = ""


def _aten(*names: str) -> Tuple[Any, ...]:
    """Each ATen packet named, and its ``.default`` overload (graphs hold either)."""
    found: List[Any] = []
    for name in names:
        packet = getattr(aten, name)
        found += [packet, packet.default]
    return tuple(found)


def _eval_mode(bound: Dict[str, Any]) -> bool:
    return bound.get("training") is False


_UNARY: Params = (("input", None), ("inplace", False))
_ONE: Params = (("input", None),)
_HARDTANH: Params = (("input", None), ("min_val", -1.0), ("max_val", 1.0), ("inplace", False))
_LEAKY: Params = (("input", None), ("negative_slope", 0.01), ("inplace", False))
_ALPHA: Params = (("input", None), ("alpha", 1.0), ("inplace", False))
_THRESHOLD: Params = (("input", None), ("threshold", None), ("value", None), ("inplace", False))
_RRELU: Params = (("input", None), ("lower", 1.0 / 8), ("upper", 1.0 / 3), ("training", False), ("inplace", False))
_TORCH_RRELU: Params = (("input", None), ("lower", 1.0 / 8), ("upper", 1.0 / 3), ("training", False),
                        ("generator", None))
_POOL: Params = (("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1),
                 ("ceil_mode", False), ("return_indices", False))
_ATEN_POOL: Params = _POOL[:6]
_ADAPTIVE: Params = (("input", None), ("output_size", None), ("return_indices", False))
_POOL_ATTRIBUTES = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_INDICES = {"return_indices": True}


def _pool_forms(dims: int) -> Tuple[Form, ...]:
    name = f"max_pool{dims}d"
    forms = [
        Form((getattr(F, name),), _POOL, False),
        Form((getattr(F, f"_{name}"),), _POOL, False, {"return_indices": False}),
        Form((getattr(F, f"{name}_with_indices"),), _POOL, False, _INDICES),
        Form((getattr(torch, name), *_aten(name)), _ATEN_POOL, False),
        Form(_aten(f"{name}_with_indices"), _ATEN_POOL, False, _INDICES),
    ]
    if hasattr(torch, f"{name}_with_indices"):
        forms.append(Form((getattr(torch, f"{name}_with_indices"),), _ATEN_POOL, False, _INDICES))
    return tuple(forms)


def _adaptive_forms(dims: int) -> Tuple[Form, ...]:
    name = f"adaptive_max_pool{dims}d"
    forms = [
        Form((getattr(F, name), getattr(F, f"_{name}")), _ADAPTIVE, False),
        Form((getattr(F, f"{name}_with_indices"),), _ADAPTIVE, False, _INDICES),
        Form(_aten(name), _ADAPTIVE[:2], False, _INDICES),  # the ATen op returns (values, indices)
    ]
    if hasattr(torch, name):
        forms.append(Form((getattr(torch, name),), _ADAPTIVE[:2], False, _INDICES))
    return tuple(forms)


def _gelu_kind(arguments: Mapping[str, Any]) -> Tuple[str, List[float]]:
    approximate = arguments.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}.")
    return ("gelu" if approximate == "none" else "gelu_tanh"), []


def _hard_mish(z: Tensor) -> Tensor:
    # timm.layers.hard_mish, operation for operation (so the same bits).
    return 0.5 * z * (z + 2).clamp(min=0, max=2)


def _gelu_new(z: Tensor, c: float, k: float, p: float) -> Tensor:
    # GPT-2's gelu_new (transformers' NewGELUActivation), operation for operation (so the same bits).
    return 0.5 * z * (1.0 + torch.tanh(c * (z + k * torch.pow(z, p))))


def _gelu_new_gate(z: Tensor, temp: float, c: float, k: float, p: float) -> Tensor:
    return gates.normal_cdf_gate(z, temp)


def _quick_gelu(z: Tensor, a: float) -> Tensor:
    # transformers' QuickGELUActivation (CLIP), operation for operation (so the same bits).
    return z * torch.sigmoid(a * z)


def _quick_gelu_gate(z: Tensor, temp: float, a: float) -> Tensor:
    return gates.sigmoid_gate(a * z, temp)


#: Every activation kind, in the order reports and the docs list them.
ACTIVATIONS: Tuple[ActivationSpec, ...] = (
    ActivationSpec(
        "relu", "relu", "temp",
        functions=(
            Form((F.relu,), _UNARY, None),
            Form((F.relu_, torch.relu_, *_aten("relu_")), _ONE, True),
            Form((torch.relu, *_aten("relu")), _ONE, False),
        ),
        methods=(Form(("relu",), _ONE, False), Form(("relu_",), _ONE, True)),
        modules=(ModuleForm(nn.ReLU),),
        backward="grad * sigmoid(z / temp)  or  grad * Phi(z / temp)",
        sites="`nn.ReLU`, `F.relu(_)`, `torch.relu(_)`, `.relu(_)()`, ATen `relu(_)`; gate `sigmoid` or "
              "`normal_cdf` (`gate=`)",
    ),
    ActivationSpec(
        "hardtanh", "hardtanh", "temp", (("min_val", -1.0), ("max_val", 1.0)),
        forward=lambda z, lo, hi: F.hardtanh(z, lo, hi), gate=gates.hardtanh_gate,
        functions=(
            Form((F.hardtanh,), _HARDTANH, None),
            Form((F.hardtanh_,), _HARDTANH[:3], True),
            Form((F.relu6,), _UNARY, None, {"min_val": 0.0, "max_val": 6.0}),
            Form(_aten("hardtanh")),
            Form(_aten("hardtanh_"), inplace=True),
            Form(_aten("relu6"), fixed={"min_val": 0.0, "max_val": 6.0}),
        ),
        modules=(ModuleForm(nn.Hardtanh, ("min_val", "max_val")),
                 ModuleForm(nn.ReLU6, ("min_val", "max_val"))),
        backward="grad * (sigmoid((z - lo) / temp) - sigmoid((z - hi) / temp))",
        sites="`nn.ReLU6` (= `Hardtanh(0, 6)`), `nn.Hardtanh`, `F.relu6`, `F.hardtanh(_)`, ATen `hardtanh(_)`, "
              "`relu6`",
    ),
    ActivationSpec(
        "leaky_relu", "leaky_relu", "temp", (("negative_slope", 0.01),),
        forward=lambda z, a: F.leaky_relu(z, a), gate=gates.leaky_relu_gate,
        functions=(
            Form((F.leaky_relu,), _LEAKY, None),
            Form((F.leaky_relu_,), _LEAKY[:2], True),
            Form(_aten("leaky_relu")),
            Form(_aten("leaky_relu_"), inplace=True),
        ),
        modules=(ModuleForm(nn.LeakyReLU, ("negative_slope",)),),
        backward="grad * (a + (1 - a) * sigmoid(z / temp))",
        sites="`nn.LeakyReLU`, `F.leaky_relu(_)`, ATen `leaky_relu(_)`",
    ),
    ActivationSpec(
        "rrelu", "rrelu", "temp", (("lower", 1.0 / 8), ("upper", 1.0 / 3)),
        forward=lambda z, lower, upper: F.rrelu(z, lower, upper, training=False),
        gate=lambda z, temp, lower, upper: gates.leaky_relu_gate(z, temp, (lower + upper) / 2),
        functions=(
            Form((F.rrelu,), _RRELU, None, applies=_eval_mode),
            Form((F.rrelu_,), _RRELU[:4], True, applies=_eval_mode),
            Form((torch.rrelu, *_aten("rrelu")), _TORCH_RRELU, False, applies=_eval_mode),
            Form(_aten("rrelu_"), _TORCH_RRELU, True, applies=_eval_mode),
        ),
        modules=(ModuleForm(nn.RReLU, ("lower", "upper"), applies=lambda module: not module.training),),
        backward="grad * (a + (1 - a) * sigmoid(z / temp)), a = (lower + upper) / 2 (eval mode)",
        sites="`nn.RReLU` in eval mode, `F.rrelu(_)` / `torch.rrelu(_)` / ATen `rrelu(_)` with `training=False` "
              "(a LeakyReLU of slope `(lower + upper) / 2`); in training mode its slopes are random and it is "
              "reported, not rewritten",
    ),
    ActivationSpec(
        "threshold", "threshold", "temp", (("threshold", 0.0), ("value", 0.0)),
        forward=lambda z, threshold, value: F.threshold(z, threshold, value),
        gate=gates.threshold_gate,
        functions=(
            Form((F.threshold,), _THRESHOLD, None),
            Form((F.threshold_, torch.threshold_, *_aten("threshold_")), _THRESHOLD[:3], True),
            Form((torch.threshold, *_aten("threshold")), _THRESHOLD[:3], False),
        ),
        modules=(ModuleForm(nn.Threshold, ("threshold", "value")),),
        backward="grad * sigmoid((z - threshold) / temp)",
        sites="`nn.Threshold`, `F.threshold(_)`, `torch.threshold(_)`, ATen `threshold(_)`",
    ),
    ActivationSpec(
        "prelu", "prelu", "temp",
        functions=(Form((F.prelu, torch.prelu, *_aten("prelu")), (("input", None), ("weight", None))),),
        methods=(Form(("prelu",), (("input", None), ("weight", None))),),
        modules=(ModuleForm(nn.PReLU),),
        backward="grad * (a + (1 - a) * sigmoid(z / temp)), a the learned slope",
        sites="`nn.PReLU` (one slope or one per channel; timm's `PReLU`), `F.prelu`, `torch.prelu`, ATen `prelu`; "
              "the slope's own gradient stays exact",
    ),
    ActivationSpec(
        "elu", "elu", "temp", (("alpha", 1.0), ("scale", 1.0), ("input_scale", 1.0)),
        # aten.elu's full form: F.elu is (alpha, 1, 1); core-ATen graphs decompose SELU into it.
        forward=lambda z, alpha, scale, input_scale: aten.elu.default(z, alpha, scale, input_scale),
        gate=gates.elu_gate,
        functions=(
            Form((F.elu,), _ALPHA, None),
            Form((F.elu_,), _ALPHA[:2], True),
            Form(_aten("elu")),
            Form(_aten("elu_"), inplace=True),
        ),
        modules=(ModuleForm(nn.ELU, ("alpha",)),),
        backward="grad * scale * (s + (1 - s) * alpha * k * exp(k * min(z, 0))), s = sigmoid(z / temp)",
        sites="`nn.ELU` / `nn.CELU` / `nn.SELU`, `F.elu(_)` / `F.celu(_)` / `F.selu(_)`, `torch.selu(_)` / "
              "`torch.celu(_)`, ATen `elu(_)` / `celu(_)` / `selu(_)`; `scale, alpha, k` = `1, alpha, 1` (ELU), "
              "`1, alpha, 1/alpha` (CELU), `1.0507, 1.6733, 1` (SELU)",
    ),
    ActivationSpec(
        "celu", "elu", "temp", (("alpha", 1.0),),
        forward=lambda z, alpha: F.celu(z, alpha),
        gate=lambda z, temp, alpha: gates.elu_gate(z, temp, alpha, 1.0, 1.0 / alpha),
        functions=(
            Form((F.celu,), _ALPHA, None),
            Form((torch.celu,), _ALPHA[:2], False),
            Form((F.celu_,), _ALPHA[:2], True),  # F.celu_ is torch.celu_
            Form(_aten("celu")),
            Form(_aten("celu_"), inplace=True),
        ),
        modules=(ModuleForm(nn.CELU, ("alpha",)),),
    ),
    ActivationSpec(
        "selu", "elu", "temp",
        forward=lambda z: F.selu(z),
        # Literals, not SELU_ALPHA / SELU_SCALE: this runs in a backward, where dynamo (dynamic=True)
        # would make module-level floats symbolic inputs (see gates.traced_constant).
        gate=lambda z, temp: gates.elu_gate(
            z, temp, 1.6732632423543772848170429916717, 1.0507009873554804934193349852946, 1.0),
        functions=(
            Form((F.selu,), _UNARY, None),
            Form((torch.selu,), _ONE, False),
            Form((F.selu_,), _ONE, True),  # F.selu_ is torch.selu_
            Form(_aten("selu")),
            Form(_aten("selu_"), inplace=True),
        ),
        modules=(ModuleForm(nn.SELU),),
    ),
    ActivationSpec(
        "silu", "silu", 1.6, forward=lambda z: F.silu(z), gate=gates.sigmoid_gate, relu_gate="sigmoid",
        functions=(Form((F.silu,), _UNARY, None), Form(_aten("silu")), Form(_aten("silu_"), inplace=True)),
        modules=(ModuleForm(nn.SiLU),),
        backward="grad * sigmoid(z / temp)",
        sites="`nn.SiLU`, `F.silu`, ATen `silu(_)`",
    ),
    ActivationSpec(
        "mish", "mish", 1.6, forward=lambda z: F.mish(z), gate=gates.mish_gate,
        functions=(Form((F.mish,), _UNARY, None), Form(_aten("mish")), Form(_aten("mish_"), inplace=True)),
        modules=(ModuleForm(nn.Mish),),
        backward="grad * tanh(softplus(z / temp))",
        sites="`nn.Mish`, `F.mish(_)`, ATen `mish(_)` (what timm's `get_act_layer('mish')` gives)",
    ),
    ActivationSpec(
        "gelu", "gelu", 1.0, (("approximate", "none"),),
        forward=lambda z: F.gelu(z), gate=gates.normal_cdf_gate, encode=_gelu_kind, relu_gate="normal_cdf",
        functions=(Form((F.gelu,), (("input", None), ("approximate", "none"))),
                   Form(_aten("gelu")), Form(_aten("gelu_"), inplace=True)),
        modules=(ModuleForm(nn.GELU, ("approximate",)),),
        backward="grad * Phi(z / temp)",
        sites="`nn.GELU` (both approximations), `F.gelu`, ATen `gelu(_)`",
    ),
    # GELU's tanh approximation: the same rule and gate, its own forward; reached through gelu's encode.
    ActivationSpec(
        "gelu_tanh", "gelu", 1.0, forward=lambda z: F.gelu(z, approximate="tanh"), gate=gates.normal_cdf_gate,
        relu_gate="normal_cdf", variant_of="gelu",
    ),
    # GPT-2's gelu_new is an expression, not a call: fxpass.sites recognises its shape.
    ActivationSpec(
        "gelu_new", "gelu", 1.0, (("c", 0.7978845608028654), ("k", 0.044715), ("p", 3.0)),
        forward=_gelu_new, gate=_gelu_new_gate, relu_gate="normal_cdf",
        sites="Hugging Face's `gelu_new` / `NewGELUActivation` (GPT-2): the traced "
              "`0.5 * x * (1 + tanh(c * (x + k * x ** p)))`",
    ),
    # CLIP's quick_gelu, z * sigmoid(1.702 z), is an expression too: its gate is the sigmoid, softened.
    ActivationSpec(
        "quick_gelu", "gelu", 1.0, (("a", 1.702),), forward=_quick_gelu, gate=_quick_gelu_gate,
        backward="", sites="Hugging Face's `quick_gelu` / `QuickGELUActivation` (CLIP): the traced "
                           "`x * sigmoid(a * x)`, gate `sigmoid(a * z / temp)`",
    ),
    ActivationSpec(
        "hardswish", "hardswish", 1.6, forward=lambda z: F.hardswish(z), gate=gates.hard_sigmoid_gate,
        functions=(Form((F.hardswish,), _UNARY, None), Form(_aten("hardswish")),
                   Form(_aten("hardswish_"), inplace=True)),
        modules=(ModuleForm(nn.Hardswish),),
        backward="grad * hardsigmoid(z / temp)",
        sites="`nn.Hardswish`, `F.hardswish`, ATen `hardswish(_)`",
    ),
    # timm's hard_mish is an expression, not a call: fxpass.sites recognises its shape.
    ActivationSpec(
        "hard_mish", "hard_mish", 1.6, forward=_hard_mish, gate=gates.hard_mish_gate,
        backward="grad * clamp(z / (2 temp) + 1, 0, 1)",
        sites="timm's `hard_mish` / `HardMish`: the traced `0.5 * x * (x + 2).clamp(0, 2)` (out of place; "
              "timm's in-place form is reported as `clamp`)",
    ),
    ActivationSpec(
        "hardsigmoid", "hardsigmoid", "temp", forward=lambda z: F.hardsigmoid(z), gate=gates.hardsigmoid_unit_gate,
        functions=(Form((F.hardsigmoid,), _UNARY, None), Form(_aten("hardsigmoid")),
                   Form(_aten("hardsigmoid_"), inplace=True)),
        modules=(ModuleForm(nn.Hardsigmoid),),
        backward="grad * (sigmoid((z + 3) / temp) - sigmoid((z - 3) / temp)) / 6",
        sites="`nn.Hardsigmoid`, `F.hardsigmoid`, ATen `hardsigmoid(_)`",
    ),
    *(ActivationSpec(
        f"max_pool{d}d", "max_pool", "pool_temp", functions=_pool_forms(d),
        modules=(ModuleForm(getattr(nn, f"MaxPool{d}d"), _POOL_ATTRIBUTES),),
        backward="gradient of sum_w softmax(x_w / temp) x_w per window" if d == 1 else "",
        sites="`nn.MaxPool1d/2d/3d`, `nn.AdaptiveMaxPool1d/2d/3d`, their `F.` / `torch.` / ATen forms" if d == 1 else "",
    ) for d in (1, 2, 3)),
    *(ActivationSpec(
        f"adaptive_max_pool{d}d", "max_pool", "pool_temp", functions=_adaptive_forms(d),
        modules=(ModuleForm(getattr(nn, f"AdaptiveMaxPool{d}d"), ("output_size", "return_indices")),),
    ) for d in (1, 2, 3)),
)

#: Every activation kind by name.
SPECS: Dict[str, ActivationSpec] = {spec.kind: spec for spec in ACTIVATIONS}

#: Each rule's backward in one line, as its first entry states it.
RULE_BACKWARDS: Dict[str, str] = {}
for _spec in ACTIVATIONS:
    RULE_BACKWARDS.setdefault(_spec.rule, _spec.backward)

#: The kinds the shared ``excitation::surrogate_activation`` op runs (those with a forward and a gate).
GATED_KINDS: Tuple[str, ...] = tuple(spec.kind for spec in ACTIVATIONS if spec.forward is not None)


def spec_temp(spec: ActivationSpec, preset: str) -> float:
    """The default temperature of ``spec``'s sites under the preset named ``preset``."""
    if spec.temp == "temp":
        return PRESETS[preset].temp
    if spec.temp == "pool_temp":
        return PRESETS[preset].pool_temp
    return float(spec.temp)


def op_arguments(kind: str, arguments: Mapping[str, Any]) -> Tuple[str, List[float]]:
    """``(op kind, params)`` for ``excitation::surrogate_activation`` from a site's named constants."""
    spec = SPECS[kind]
    if spec.encode is not None:
        return spec.encode(arguments)
    return kind, [float(arguments.get(name, default)) for name, default in spec.params]
