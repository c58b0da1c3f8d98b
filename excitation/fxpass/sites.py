"""Matching: which FX nodes are sites of a rule, and what their arguments are.

Matching is kept apart from rewriting (see :mod:`.rewrite`).  A site can be an
``nn.Module`` call, a ``torch``/``torch.nn.functional`` call, a tensor method,
an ATen overload (graphs from ``torch.export`` or dynamo), or one of our own
surrogate calls (so that excite(excite(m)) re-tempers instead of double-wrapping).

Why one module: its length is the signature tables of every form (module, functional,
method, in-place, ATen, surrogate) of every rule, which the one matcher below reads together.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..kernels import (
    SURROGATES,
    ExcitedMultiheadAttention,
    freeze_attention,
    surrogate_adaptive_max_pool,
    held_rsqrt,
    held_sqrt,
    surrogate_layer_norm,
    surrogate_native_layer_norm,
    surrogate_max_pool,
    surrogate_max_pool2d,
    surrogate_prelu,
    surrogate_relu,
    surrogate_rms_norm,
    surrogate_scaled_dot_product_attention,
    surrogate_softmax,
)
from ..kernels.compiled import batch_norm_relu_with_c_backward, relu_with_c_backward
from ..kernels.fused import batch_norm_relu
from ..spec import ACTIVATIONS, GATED_KINDS, SPECS, Form
from .rules import KIND_TO_RULE

__all__ = [
    "SiteMatch", "match_site", "match_unhandled", "site_name", "surrogate_rule", "SITE_NAME_META", "SITE_NODE_META",
    "ACTIVATION_CALL_NAMES",
]

aten = torch.ops.aten

# ------------------------------------------------------------------- signatures
# Each entry: parameter names and defaults, as the callable itself declares them.
# Our own surrogate calls (what an excited graph holds).
SURROGATE_RELU_PARAMS = (("input", None), ("temp", 0.3), ("gate", "sigmoid"), ("saved", "exact"))
SURROGATE_POOL_PARAMS = (
    ("input", None), ("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
    ("return_indices", False), ("temp", 0.3), ("pool_backward", "soft"),
)


def _schema_params(op: Any) -> Tuple[Tuple[str, Any], ...]:
    """Parameter names and defaults of an ATen overload, first one called ``input``."""
    overload = op.default if isinstance(op, torch._ops.OpOverloadPacket) else op
    params = []
    for i, arg in enumerate(overload._schema.arguments):
        default = arg.default_value if arg.has_default_value() else None
        params.append(("input" if i == 0 else arg.name, default))
    return tuple(params)


#: ``target -> (kind, params, forced inplace or None, fixed arguments, applies or None)``.
_Entry = Tuple[str, Tuple[Tuple[str, Any], ...], Optional[bool], Dict[str, Any], Optional[Callable[..., bool]]]


def _entries(kind: str, forms: Sequence[Form], read_schema: bool = True) -> Dict[Any, _Entry]:
    table = {}
    for form in forms:
        for target in form.targets:
            params = form.params if form.params is not None or not read_schema else _schema_params(target)
            table[target] = (kind, params, form.inplace, dict(form.fixed), form.applies)
    return table


_LAYER_NORM = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))
_RMS_NORM = (("input", None), ("normalized_shape", None), ("weight", None), ("eps", None))
_SOFTMAX = (("input", None), ("dim", None), ("_stacklevel", 3), ("dtype", None))
_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))
_LAYER_NORM_FORMS = (
    Form((F.layer_norm, torch.layer_norm, aten.layer_norm, aten.layer_norm.default), _LAYER_NORM),
    # Core-ATen graphs (run_decompositions) hold the 3-output form and _softmax.
    Form((aten.native_layer_norm, aten.native_layer_norm.default), _LAYER_NORM, fixed={"native": True}),
)
_SOFTMAX_FORMS = (
    Form((aten._softmax, aten._softmax.default), (("input", None), ("dim", None), ("half_to_float", False))),
    Form((F.softmax, torch.softmax), _SOFTMAX),
    Form((aten.softmax, aten.softmax.int), (("input", None), ("dim", None), ("dtype", None))),
)
_SDPA_FORMS = (
    Form((F.scaled_dot_product_attention, aten.scaled_dot_product_attention,
          aten.scaled_dot_product_attention.default), _SDPA),
)

# Every function and ATen form of every rule: the activation table's, then LayerNorm's and attention's.
_FUNCTIONS: Dict[Any, _Entry] = {}
for _spec in ACTIVATIONS:
    _FUNCTIONS.update(_entries(_spec.kind, _spec.functions))
_FUNCTIONS.update(_entries("layer_norm", _LAYER_NORM_FORMS))
_FUNCTIONS.update(_entries("rms_norm", (Form((F.rms_norm, torch.rms_norm, aten.rms_norm, aten.rms_norm.default),
                                             _RMS_NORM),)))
_FUNCTIONS.update(_entries("softmax", _SOFTMAX_FORMS))
_FUNCTIONS.update(_entries("scaled_dot_product_attention", _SDPA_FORMS))

# Tensor methods: name -> entry.
_METHODS: Dict[str, _Entry] = {}
for _spec in ACTIVATIONS:
    _METHODS.update(_entries(_spec.kind, _spec.methods, read_schema=False))
_METHODS.update(_entries("softmax", (Form(("softmax",), _SOFTMAX),), read_schema=False))

# Module classes: type -> (kind, attributes passed as arguments, fixed arguments, applies or None).
_MODULES: Dict[type, Tuple[str, Tuple[str, ...], Dict[str, Any], Optional[Callable[[nn.Module], bool]]]] = {
    form.type: (spec.kind, form.attributes, dict(form.fixed), form.applies)
    for spec in ACTIVATIONS for form in spec.modules
}
_MODULES[nn.LayerNorm] = ("layer_norm", ("normalized_shape", "eps"), {}, None)
_MODULES[nn.RMSNorm] = ("rms_norm", ("normalized_shape", "eps"), {}, None)
_MODULES[nn.MultiheadAttention] = ("multihead_attention", (), {}, None)
_MODULES[ExcitedMultiheadAttention] = ("multihead_attention", (), {}, None)

# Functions fx keeps as leaves (``torch.fx.wrap``) that compute attention inside.
_ATTENTION_FUNCTIONS = {F.multi_head_attention_forward}
try:
    from torchvision.models.swin_transformer import shifted_window_attention

    _ATTENTION_FUNCTIONS.add(shifted_window_attention)
except ImportError:  # torchvision is optional for the pass itself
    pass

# Our own surrogate wrappers, re-matched so that excite(excite(m)) re-tempers.
_SURROGATE_KINDS: Dict[Callable, str] = {
    **{function: kind for kind, function in SURROGATES.items()},
    surrogate_prelu: "prelu",
    surrogate_layer_norm: "layer_norm",
    surrogate_native_layer_norm: "layer_norm",
    surrogate_rms_norm: "rms_norm",
    held_rsqrt: "rms_norm",
    held_sqrt: "rms_norm",
    surrogate_softmax: "softmax",
    surrogate_scaled_dot_product_attention: "scaled_dot_product_attention",
}
# The surrogate of each kind besides the gated activations, ReLU and the max-pools.
_OWN_SURROGATES: Dict[str, Callable] = {
    "prelu": surrogate_prelu,
    "layer_norm": surrogate_layer_norm,
    "rms_norm": surrogate_rms_norm,
    "softmax": surrogate_softmax,
    "scaled_dot_product_attention": surrogate_scaled_dot_product_attention,
}

# Every surrogate function -> its rule; the backend's C-backward lowering of a ReLU site too.
_SURROGATE_RULES: Dict[Callable, str] = {
    surrogate_relu: "relu",
    batch_norm_relu: "relu",
    relu_with_c_backward: "relu",
    batch_norm_relu_with_c_backward: "relu",
    surrogate_max_pool2d: "max_pool",
    surrogate_max_pool: "max_pool",
    surrogate_adaptive_max_pool: "max_pool",
    **{function: KIND_TO_RULE[kind] for function, kind in _SURROGATE_KINDS.items()},
}


def surrogate_rule(target: Any) -> Optional[str]:
    """The rule whose surrogate ``target`` is, or ``None`` if it is not one of ours."""
    try:
        return _SURROGATE_RULES.get(target)
    except TypeError:  # unhashable target
        return None


# Smooth activations: no hard gate to soften, kept vanilla by design (reported as such).
_SMOOTH_MODULES = (nn.Sigmoid, nn.Tanh, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink)
_SMOOTH_NAMES = frozenset("sigmoid tanh logsigmoid log_sigmoid softsign tanhshrink".split())
# Activation-like calls with a hard gate (or a max), reported where no rule's site took them: ops no
# rule covers, and covered ops in a form the table does not list (RReLU in training mode).
_UNHANDLED_MODULES = (
    nn.RReLU, nn.Softplus, nn.GLU, nn.Softshrink, nn.Hardshrink, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d,
    nn.LPPool1d, nn.LPPool2d,
)
_UNHANDLED_NAMES = frozenset(
    """prelu rrelu elu selu celu mish softplus threshold glu softshrink hardshrink
    fractional_max_pool2d fractional_max_pool3d lp_pool1d lp_pool2d rrelu_with_noise rrelu_with_noise_functional""".split()
)


# The unhandled ops the dynamo path's census counts: those that keep their name in dynamo's graph
# (F.lp_pool2d, say, is inlined into avg_pool2d and pow, so no graph node would answer its count).
_COUNTED_UNHANDLED = frozenset("rrelu rrelu_ softplus threshold threshold_ glu softshrink hardshrink".split())


def _call_names() -> frozenset:
    names = set(_COUNTED_UNHANDLED)
    for spec in ACTIVATIONS:
        names.update(form_target for form in spec.methods for form_target in form.targets)
        for form in spec.functions:
            names.update(getattr(target, "__name__", "") for target in form.targets
                         if not isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)))
    return frozenset(name.lstrip("_") for name in names if name)


#: The names of every activation-like ``torch`` / ``F`` / ``Tensor`` callable: the table's
#: forms and the unhandled ones.  The dynamo path counts calls to them.
ACTIVATION_CALL_NAMES = _call_names()
_MATMUL_TARGETS = {operator.matmul, torch.matmul, torch.bmm, torch.einsum, aten.matmul, aten.matmul.default,
                   aten.bmm, aten.bmm.default, aten.einsum, aten.einsum.default}


@dataclass
class SiteMatch:
    """One site of a rule, as found in a graph."""

    node: Node
    kind: str  # see excitation.fxpass.rules.RULES[...].kinds
    form: str  # "module", "function", "method", "aten" or "excited"
    input: Any
    inplace: bool = False
    # max_pool2d only: kernel_size, stride, padding, dilation, ceil_mode (values or Nodes).
    pool_args: Tuple[Any, ...] = ()
    # The call returns a tuple: a pool's (values, indices), native_layer_norm's (out, mean, rstd).
    returns_tuple: bool = False
    # Every other kind: the arguments of its surrogate besides the input and temp.
    params: Dict[str, Any] = field(default_factory=dict)
    # Nodes that only this site reads (hard_mish's 0.5 * x, clamp and add): erased with it.
    absorbed: Tuple[Node, ...] = ()

    @property
    def rule(self) -> str:
        return KIND_TO_RULE[self.kind]


def bind_arguments(params: Sequence[Tuple[str, Any]], args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
    bound = {name: default for name, default in params}
    for (name, _), value in zip(params, args):
        bound[name] = value
    for name, value in kwargs.items():
        if name == "self":
            name = "input"
        bound[name] = value
    return bound


SITE_NAME_META = "excitation_site"  # the site's name, kept across re-excitation
SITE_NODE_META = "excitation_node"  # the node name the site had in the user's graph
_SITE_MODULE_TYPES = frozenset(
    f"{t.__module__}.{t.__qualname__}" for t in _MODULES
)


def site_name(gm: GraphModule, node: Node) -> str:
    """A site's user-facing name: the module path for module calls, else the node name.

    A name given once is kept in ``node.meta`` so re-exciting keeps it.  Graphs from
    ``torch.export`` and dynamo record the calling module in ``nn_module_stack``;
    when that module is itself the site's module (ReLU, MaxPool2d, ...), its path is the name.
    """
    if SITE_NAME_META in node.meta:
        return node.meta[SITE_NAME_META]
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, module_type = list(stack.values())[-1]
        type_name = module_type if isinstance(module_type, str) else f"{module_type.__module__}.{module_type.__qualname__}"
        if type_name in _SITE_MODULE_TYPES and path:
            return normalise_path(path)
    return node.name


def normalise_path(path: str) -> str:
    # dynamo writes "L['self'].layer1[0].relu" style paths; export writes "layer1.0.relu".
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _pool_site(node: Node, form: str, bound: Dict[str, Any], returns_tuple: bool) -> SiteMatch:
    stride = bound["stride"]
    if isinstance(stride, (list, tuple)) and len(stride) == 0:
        stride = None  # aten's "[]" means "same as kernel_size"
    args = (bound["kernel_size"], stride, bound["padding"], bound["dilation"], bound["ceil_mode"])
    return SiteMatch(node, "max_pool2d", form, bound["input"], False, args, bool(returns_tuple))


def _feeds_matmul(node: Node, depth: int = 5) -> bool:
    """Whether ``node``'s output reaches a matmul / bmm / einsum within ``depth`` ops (attention weights)."""
    frontier = [node]
    for _ in range(depth):
        following = []
        for current in frontier:
            for user in current.users:
                if user.target in _MATMUL_TARGETS or (user.op == "call_method" and user.target in ("matmul", "bmm")):
                    return True
                following.append(user)
        frontier = following
    return False


def _general_site(node: Node, kind: str, form: str, bound: Dict[str, Any], inplace: bool) -> Optional[SiteMatch]:
    """A site of any kind but ReLU / 2-D max-pool, from its bound arguments."""
    if kind == "softmax" and not _feeds_matmul(node):
        return None  # a softmax that is not attention (e.g. class probabilities) is left alone
    if kind == "scaled_dot_product_attention":
        params = {k: v for k, v in bound.items() if k not in ("query",)}
        return SiteMatch(node, kind, form, bound["query"], params=params)
    if kind in GATED_KINDS:  # the op's own constants, as the table names them
        params = {name: bound[name] for name, _ in SPECS[kind].params if name in bound}
        return SiteMatch(node, kind, form, bound["input"], inplace, params=params)
    # temp and pool_backward come from the (re-)excitation's options, not from an earlier one.
    skip = ("input", "inplace", "temp", "pool_backward", "_stacklevel", "cudnn_enable")
    params = {k: v for k, v in bound.items() if k not in skip}
    if "half_to_float" in params:  # aten._softmax: a float32 result from a half input
        params["dtype"] = torch.float32 if params.pop("half_to_float") else None
    if params.pop("native", False):
        return SiteMatch(node, kind, form, bound["input"], inplace, params=params, returns_tuple=True)
    if kind.startswith("max_pool") or kind.startswith("adaptive_max_pool"):
        params["dims"] = int(kind[-2])
        if params.get("stride") in ([], ()):
            params["stride"] = None
    return SiteMatch(node, kind, form, bound["input"], inplace, params=params,
                     returns_tuple=bool(params.pop("return_indices", False)))


def _site(node: Node, kind: str, form: str, bound: Dict[str, Any], inplace: bool) -> Optional[SiteMatch]:
    """The site of ``kind`` at ``node`` from its bound arguments."""
    if kind == "relu":
        return SiteMatch(node, "relu", form, bound["input"], inplace)
    if kind == "max_pool2d":
        return _pool_site(node, form, bound, bool(bound.get("return_indices", False)))
    if kind == "softmax" and "dtype" not in bound:
        bound["dtype"] = None
    return _general_site(node, kind, form, bound, inplace)


def _bound_site(node: Node, form: str, entry: _Entry) -> Optional[SiteMatch]:
    """The site a function, ATen or method call is, from its table entry (``None`` where ``applies`` fails)."""
    kind, params, forced_inplace, fixed, applies = entry
    bound = bind_arguments(params, node.args, node.kwargs)
    bound.update(fixed)
    if applies is not None and not applies(bound):
        return None
    inplace = forced_inplace if forced_inplace is not None else bool(bound.get("inplace", False))
    return _site(node, kind, form, bound, inplace)


def _match_module(gm: GraphModule, node: Node) -> Optional[SiteMatch]:
    module = gm.get_submodule(node.target)
    entry = _MODULES.get(type(module))
    if entry is None:
        return None
    kind, attributes, fixed, applies = entry
    if applies is not None and not applies(module):
        return None
    if kind == "multihead_attention":
        form = "excited" if type(module) is ExcitedMultiheadAttention else "module"
        return SiteMatch(node, kind, form, node.args[0] if node.args else node.kwargs.get("query"))
    bound = {name: getattr(module, name) for name in attributes}
    bound.update(fixed)
    bound["input"] = node.args[0] if node.args else node.kwargs.get("input")
    if kind == "prelu":
        bound["weight"] = f"{node.target}.weight"  # read with a get_attr at the rewrite
    if kind in ("layer_norm", "rms_norm"):
        bound["weight"] = f"{node.target}.weight" if module.weight is not None else None
        if kind == "layer_norm":
            bound["bias"] = f"{node.target}.bias" if module.bias is not None else None
        bound["normalized_shape"] = list(module.normalized_shape)
    return _site(node, kind, "module", bound, bool(getattr(module, "inplace", False)))


def match_site(gm: GraphModule, node: Node) -> Optional[SiteMatch]:
    """Return a :class:`SiteMatch` if ``node`` is a site of any rule, else ``None``."""
    if node.op == "call_module":
        return _match_module(gm, node)
    if node.op == "call_method":
        entry = _METHODS.get(node.target)
        if entry is not None:
            return _bound_site(node, "method", entry)
        return _hard_mish_site(node, "method") or _gelu_new_site(node, "method") or _quick_gelu_site(node, "method") \
            or _rms_site(node, "method")
    if node.op != "call_function":
        return None
    target = node.target
    form = "aten" if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else "function"
    try:
        entry = _FUNCTIONS.get(target)
        surrogate_kind = _SURROGATE_KINDS.get(target)
    except TypeError:  # unhashable target
        return None
    if entry is not None:
        return _bound_site(node, form, entry)
    if target is surrogate_relu:
        bound = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
        return SiteMatch(node, "relu", "excited", bound["input"])
    if target is batch_norm_relu:
        # A fused BatchNorm -> ReLU site (fusion.py); its ReLU input is rebuilt when it is re-excited.
        return SiteMatch(node, "relu", "excited", None, params={"fused": True})
    if target is surrogate_max_pool2d:
        bound = bind_arguments(SURROGATE_POOL_PARAMS, node.args, node.kwargs)
        return _pool_site(node, "excited", bound, bound["return_indices"])
    if surrogate_kind is not None or target in (surrogate_max_pool, surrogate_adaptive_max_pool):
        bound = dict(inspect.signature(target).bind(*node.args, **node.kwargs).arguments)
        if target is surrogate_native_layer_norm:
            bound["native"] = True
        if surrogate_kind is None:
            dims = bound.get("dims")
            prefix = "max_pool" if target is surrogate_max_pool else "adaptive_max_pool"
            surrogate_kind = f"{prefix}{dims}d"
        bound = {("input" if k == "x" else k): v for k, v in bound.items()}
        return _general_site(node, surrogate_kind, "excited", bound, False)
    if target in _ATTENTION_FUNCTIONS or getattr(target, "__wrapped_original__", None) in _ATTENTION_FUNCTIONS:
        form = "excited" if hasattr(target, "__wrapped_original__") else "function"
        original = getattr(target, "__wrapped_original__", target)
        return SiteMatch(node, "attention_function", form, node.args[0] if node.args else None,
                         params={"function": original})
    return (_hard_mish_site(node, form) or _gelu_new_site(node, form) or _quick_gelu_site(node, form)
            or _rms_site(node, form))


# ------------------------------------------------------------ timm's hard_mish
# timm.layers.hard_mish is no op but an expression, ``0.5 * x * (x + 2).clamp(min=0, max=2)``; fx and
# dynamo record it as ``mul(mul(0.5, x), clamp(add(x, 2), 0, 2))`` (torch-level or ATen ops).
# Only that exact shape is a site (its surrogate recomputes it op for op: the same bits); any
# other use of a clamp stays a reported unhandled ``clamp``.
_MUL = {operator.mul, torch.mul, aten.mul, aten.mul.Tensor}
_ADD = {operator.add, torch.add, aten.add, aten.add.Tensor}
_CLAMP = {torch.clamp, torch.clip, aten.clamp, aten.clamp.default}


def _is_call(node: Any, functions: "set[Any]", method: str) -> bool:
    """``node`` calls one of ``functions`` or the tensor method ``method``."""
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target == method
    try:
        return node.op == "call_function" and node.target in functions
    except TypeError:  # unhashable target
        return False


def _is_number(value: Any, expected: float) -> bool:
    """``value`` is the Python number ``expected`` (not a bool, a tensor or a node)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected


def _operands(node: Node) -> Optional[Tuple[Any, Any]]:
    """The two operands of a binary call (positional, or ``other=``), else ``None``."""
    args = list(node.args) + [node.kwargs[k] for k in ("other",) if k in node.kwargs]
    return (args[0], args[1]) if len(args) == 2 and set(node.kwargs) <= {"other"} else None


def _half_of(node: Any) -> Optional[Node]:
    """``x`` if ``node`` is ``0.5 * x`` / ``x * 0.5`` with one user, else ``None``."""
    if not _is_call(node, _MUL, "mul") or len(node.users) != 1 or (pair := _operands(node)) is None:
        return None
    a, b = pair
    if isinstance(b, Node) and _is_number(a, 0.5):
        return b
    if isinstance(a, Node) and _is_number(b, 0.5):
        return a
    return None


def _clamp_0_2_of(node: Any) -> Optional[Node]:
    """``x`` if ``node`` is ``(x + 2).clamp(0, 2)`` (positional or keyword bounds) with one user, else ``None``."""
    if not _is_call(node, _CLAMP, "clamp") or len(node.users) != 1 or not node.args:
        return None
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    source = node.args[0]
    if not (_is_number(low, 0) and _is_number(high, 2)):
        return None
    if not _is_call(source, _ADD, "add") or len(source.users) != 1 or (pair := _operands(source)) is None:
        return None
    a, b = pair
    return a if isinstance(a, Node) and _is_number(b, 2) else None


def _hard_mish_site(node: Node, form: str) -> Optional[SiteMatch]:
    """A :class:`SiteMatch` if ``node`` is the final ``mul`` of timm's hard_mish, else ``None``."""
    if not _is_call(node, _MUL, "mul") or (pair := _operands(node)) is None:
        return None
    for half, clamp in (pair, pair[::-1]):
        x = _half_of(half)
        if x is not None and _clamp_0_2_of(clamp) is x:
            return SiteMatch(node, "hard_mish", form, x, absorbed=(half, clamp, clamp.args[0]))
    return None


# ------------------------------------------------------------ GPT-2's gelu_new
# transformers' NewGELUActivation is ``0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * pow(x, 3.0))))``, an
# expression like timm's hard_mish: only that shape is a site, with its constants carried to the surrogate,
# which recomputes it op for op.
_TANH = {torch.tanh, aten.tanh, aten.tanh.default}
_POW = {torch.pow, aten.pow, aten.pow.Tensor_Scalar}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scaled(node: Any, method: str = "mul") -> Optional[Tuple[float, Node]]:
    """``(c, x)`` if ``node`` is ``c * x`` / ``x * c`` (a Python number ``c``) with one user, else ``None``."""
    if not _is_call(node, _MUL, method) or len(node.users) != 1 or (pair := _operands(node)) is None:
        return None
    a, b = pair
    if _number(a) and isinstance(b, Node):
        return float(a), b
    if _number(b) and isinstance(a, Node):
        return float(b), a
    return None


def _gelu_new_inner(tanh: Any) -> Optional[Tuple[Node, Dict[str, float], Tuple[Node, ...]]]:
    """``(x, constants, nodes)`` if ``tanh`` is ``tanh(c * (x + k * pow(x, p)))`` with one user, else ``None``."""
    if not _is_call(tanh, _TANH, "tanh") or len(tanh.users) != 1 or len(tanh.args) != 1 or tanh.kwargs:
        return None
    outer = _scaled(tanh.args[0])
    if outer is None:
        return None
    c, total = outer
    if not _is_call(total, _ADD, "add") or len(total.users) != 1 or (pair := _operands(total)) is None:
        return None
    for x, cubic in (pair, pair[::-1]):
        inner = _scaled(cubic)
        if inner is None or not isinstance(x, Node):
            continue
        k, power = inner
        if (_is_call(power, _POW, "pow") and len(power.users) == 1 and len(power.args) == 2 and not power.kwargs
                and power.args[0] is x and _number(power.args[1])):
            return x, {"c": c, "k": k, "p": float(power.args[1])}, (tanh.args[0], total, cubic, power)
    return None


def _gelu_new_site(node: Node, form: str) -> Optional[SiteMatch]:
    """A :class:`SiteMatch` if ``node`` is the final ``mul`` of GPT-2's gelu_new, else ``None``."""
    if not _is_call(node, _MUL, "mul") or (pair := _operands(node)) is None:
        return None
    for half, one_plus in (pair, pair[::-1]):
        x = _half_of(half)
        if x is None or not _is_call(one_plus, _ADD, "add") or len(one_plus.users) != 1:
            continue
        operands = _operands(one_plus)
        if operands is None:
            continue
        for one, tanh in (operands, operands[::-1]):
            found = _gelu_new_inner(tanh) if _is_number(one, 1.0) else None
            if found is not None and found[0] is x:
                _, constants, nodes = found
                return SiteMatch(node, "gelu_new", form, x, params=constants,
                                 absorbed=(half, one_plus, tanh, *nodes))
    return None


_SIGMOID = {torch.sigmoid, aten.sigmoid, aten.sigmoid.default}


def _quick_gelu_site(node: Node, form: str) -> Optional[SiteMatch]:
    """A :class:`SiteMatch` if ``node`` is CLIP's quick_gelu ``x * sigmoid(a * x)`` (``a`` a number), else ``None``."""
    if not _is_call(node, _MUL, "mul") or (pair := _operands(node)) is None:
        return None
    for x, sigmoid in (pair, pair[::-1]):
        if not (isinstance(x, Node) and _is_call(sigmoid, _SIGMOID, "sigmoid") and len(sigmoid.users) == 1
                and len(sigmoid.args) == 1 and not sigmoid.kwargs):
            continue
        scaled = _scaled(sigmoid.args[0])
        if scaled is not None and scaled[1] is x:
            return SiteMatch(node, "quick_gelu", form, x, params={"a": scaled[0]},
                             absorbed=(sigmoid, sigmoid.args[0]))
    return None


# ------------------------------------------------------------ hand-written RMSNorm
# Llama's, Qwen's, Gemma's and T5's RMSNorm is an expression, ``x * rsqrt(mean(x^2, -1, keepdim=True) + eps)``;
# ImageGPT's divides, ``x / sqrt(mean(square(x), -1, keepdim=True) + eps)``.  The site is the ``rsqrt`` (``sqrt``)
# of a mean square plus a number, which :func:`held_rsqrt` (:func:`held_sqrt`) computes with no gradient.
_RSQRT = {torch.rsqrt, aten.rsqrt, aten.rsqrt.default}
_SQRT = {torch.sqrt, aten.sqrt, aten.sqrt.default}
_SQUARE = {torch.square, aten.square, aten.square.default}
_MEAN = {torch.mean, aten.mean, aten.mean.dim}


def _square_of(node: Any) -> bool:
    """``node`` is ``x ** 2`` / ``x.pow(2)`` / ``torch.square(x)`` / ``x * x`` of some ``x``."""
    if _is_call(node, _SQUARE, "square"):
        return True
    if _is_call(node, _POW, "pow") or (isinstance(node, Node) and node.op == "call_function"
                                      and node.target is operator.pow):
        return len(node.args) == 2 and _is_number(node.args[1], 2)
    if _is_call(node, _MUL, "mul") and (pair := _operands(node)) is not None:
        return isinstance(pair[0], Node) and pair[0] is pair[1]
    return False


def _mean_square(node: Any) -> bool:
    """``node`` is a mean over the last dimension(s), keeping them, of a square."""
    if not _is_call(node, _MEAN, "mean") or not node.args or not _square_of(node.args[0]):
        return False
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis"))
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return keepdim is True and all(isinstance(d, int) and d < 0 for d in dims) and bool(dims)


def _rms_site(node: Node, form: str) -> Optional[SiteMatch]:
    """A :class:`SiteMatch` if ``node`` is the ``rsqrt`` / ``sqrt`` of ``mean(x^2) + eps`` of an RMSNorm, else ``None``."""
    if _is_call(node, _RSQRT, "rsqrt"):
        held = "rsqrt"
    elif _is_call(node, _SQRT, "sqrt"):
        held = "sqrt"
    else:
        return None
    if len(node.args) != 1 or node.kwargs:
        return None
    total = node.args[0]
    if not _is_call(total, _ADD, "add") or (pair := _operands(total)) is None:
        return None
    for mean, eps in (pair, pair[::-1]):
        if _number(eps) and _mean_square(mean):
            return SiteMatch(node, "rms_norm", form, total, params={"held": held})
    return None


def surrogate_call(match: SiteMatch, temp: Optional[float], pool_backward: str = "soft") -> Tuple[Callable, Dict[str, Any]]:
    """The surrogate function for a general site and the keyword arguments it takes (besides the input)."""
    kind, params = match.kind, dict(match.params)
    if kind == "attention_function":
        return freeze_attention(params["function"]), {}
    if kind.startswith("max_pool") or kind.startswith("adaptive_max_pool"):
        params["return_indices"] = match.returns_tuple
        target = surrogate_max_pool if kind.startswith("max_pool") else surrogate_adaptive_max_pool
        extra = {"pool_backward": pool_backward} if pool_backward != "soft" else {}  # graphs stay as they were unless asked
        return target, {**params, "temp": temp, **extra}
    if kind == "layer_norm" and match.returns_tuple:  # the 3-output aten.native_layer_norm
        return surrogate_native_layer_norm, params
    if kind == "rms_norm" and "normalized_shape" not in params:  # the hand-written form, held at its (r)sqrt
        return (held_sqrt if params.get("held") == "sqrt" else held_rsqrt), {}
    target = SURROGATES.get(kind) or _OWN_SURROGATES[kind]
    if temp is not None:
        params["temp"] = temp
    return target, params


def _callable_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def _is_decomposed_silu(node: Node) -> bool:
    """``aten.mul(x, aten.sigmoid(x))``: what SiLU becomes in a core-ATen (decomposed) graph."""
    if node.target not in (aten.mul.Tensor, aten.mul) or len(node.args) != 2:
        return False
    a, b = node.args
    for gate, other in ((a, b), (b, a)):
        if isinstance(gate, Node) and gate.target in (aten.sigmoid.default, aten.sigmoid) and gate.args[0] is other:
            return True
    return False


def _is_decomposed_hardsigmoid(node: Node) -> bool:
    """``aten.clamp(x + 3, 0, 6)`` (or two clamps, as torch decomposes it): decomposed Hardsigmoid / Hardswish."""
    clamps = (aten.clamp.default, aten.clamp)
    if node.target not in clamps or len(node.args) < 3 or node.args[2] != 6:
        return False
    source = node.args[0]
    if node.args[1] is None and isinstance(source, Node) and source.target in clamps and source.args[1:2] == (0,):
        source = source.args[0]  # clamp(clamp(x + 3, 0), None, 6)
    elif node.args[1] != 0:
        return False
    return isinstance(source, Node) and source.target in (aten.add.Tensor, aten.add) and 3 in source.args[1:]


def _positive_switch(node: Node) -> Optional[Tuple[Node, Any]]:
    """``(x, other)`` if ``node`` is ``aten.where(x > 0, x, other)``, the shape decomposed PReLU / CELU take."""
    if node.target not in (aten.where.self, aten.where) or len(node.args) != 3:
        return None
    cond, x, other = node.args
    if isinstance(cond, Node) and cond.target in (aten.gt.Scalar, aten.gt) and cond.args == (x, 0):
        return x, other
    return None


def _decomposed_switch(node: Node) -> Optional[str]:
    """``"prelu"`` for ``where(x > 0, x, a * x)``, ``"celu"`` for ``where(x > 0, x, expm1(x / a) * a)``, else ``None``."""
    found = _positive_switch(node)
    if found is None:
        return None
    x, other = found
    if not (isinstance(other, Node) and other.target in (aten.mul.Tensor, aten.mul)):
        return None
    if x in other.args:
        return "prelu"
    if any(isinstance(a, Node) and a.target in (aten.expm1.default, aten.expm1) for a in other.args):
        return "celu"
    return None


def _is_decomposed_threshold(node: Node) -> bool:
    """``aten.where(x <= th, value, x)``: ``threshold`` (so ``nn.Threshold``) in a core-ATen graph."""
    if node.target not in (aten.where.self, aten.where) or len(node.args) != 3:
        return False
    cond, _, x = node.args
    return isinstance(cond, Node) and cond.target in (aten.le.Scalar, aten.le) and cond.args[:1] == (x,)


def _is_decomposed_mish(node: Node) -> bool:
    """``aten.mul(x, tanh(where(x > 20, x, log1p(exp(x)))))``: Mish in a core-ATen (decomposed) graph."""
    if node.target not in (aten.mul.Tensor, aten.mul) or len(node.args) != 2:
        return False
    a, b = node.args
    for gate, other in ((a, b), (b, a)):
        if isinstance(gate, Node) and gate.target in (aten.tanh.default, aten.tanh):
            inner = gate.args[0]
            if isinstance(inner, Node) and inner.target in (aten.where.self, aten.where) and other in inner.args[1:2]:
                return True
    return False


def _is_zero_floor_clamp(node: Node) -> bool:
    """``x.clamp(0, hi)`` / ``clamp(x, min=0, ...)`` with constant bounds: a ReLU-like gate no rule covers."""
    low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
    high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    if _known_integer(node.args[0] if node.args else None):
        return False  # e.g. gemma4's position_ids.clamp(min=0): an index, no gradient flows through it
    if _known_constant(node.args[0] if node.args else None):
        return False  # e.g. SigLIP 2's interpolation weights, made from the patch grid: no gradient flows
    return isinstance(low, (int, float)) and low == 0 and (high is None or isinstance(high, (int, float)))


def _known_constant(value: Any) -> bool:
    """Whether dynamo recorded a graph value as a tensor that does not require grad (nothing flows back through it).

    Only dynamo's ``example_value`` says so: export's ``val`` is traced without autograd.
    """
    example = value.meta.get("example_value") if isinstance(value, Node) else None
    return isinstance(example, torch.Tensor) and not example.requires_grad


def _known_integer(value: Any) -> bool:
    """Whether a graph value is known (from dynamo's / export's example metadata) to be a non-float tensor."""
    if not isinstance(value, Node):
        return False
    example = value.meta.get("example_value", value.meta.get("val"))
    dtype = getattr(example, "dtype", None)
    if dtype is None and value.meta.get("tensor_meta") is not None:
        dtype = getattr(value.meta["tensor_meta"], "dtype", None)
    return isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex)


def _autograd_function_activations(gm: GraphModule, node: Node) -> Optional[str]:
    """The activation kinds inside a dynamo ``autograd_function_apply`` (a user ``autograd.Function``), if any.

    dynamo keeps such a Function whole, forward and backward subgraphs: its activations are not
    sites of this graph (the Function's own backward runs), so they must be reported.  timm's
    default ``hard_mish`` is one (``HardMishMe``).
    """
    apply = getattr(torch.ops.higher_order, "autograd_function_apply", None)
    if apply is None or node.target is not apply or not node.args or not isinstance(node.args[0], Node):
        return None
    body = node.args[0]
    if body.op != "get_attr":
        return None
    sub = gm.get_submodule(str(body.target))
    if not isinstance(sub, GraphModule):
        return None
    kinds = []
    for inner in sub.graph.nodes:
        found = match_site(sub, inner)
        if found is not None:
            kinds.append(found.kind)
        elif (other := match_unhandled(sub, inner)) is not None and other[1] != "smooth":
            kinds.append(other[0])
    return f"{'/'.join(sorted(set(kinds)))} in an autograd.Function" if kinds else None


def match_unhandled(gm: GraphModule, node: Node) -> Optional[Tuple[str, str]]:
    """``(op name, reason)`` for an activation-like op no rule covers at ``node``, or ``None``.

    ``reason`` is ``"no rule"``, ``"smooth"`` (sigmoid, tanh: no hard gate, kept
    vanilla by design) or ``"decomposed"`` (a rule's op broken into primitives by
    ``run_decompositions``, where the rule cannot apply without changing the forward).
    """
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _UNHANDLED_MODULES):
            return type(module).__name__, "no rule"
        if isinstance(module, _SMOOTH_MODULES):
            return type(module).__name__, "smooth"
        return None
    if node.op == "call_function" and _is_decomposed_silu(node):
        return "silu (decomposed)", "decomposed"
    if node.op == "call_function" and _is_decomposed_hardsigmoid(node):
        return "hardsigmoid/hardswish (decomposed)", "decomposed"
    if node.op == "call_function" and (inside := _autograd_function_activations(gm, node)) is not None:
        return inside, "no rule"
    if node.op == "call_function" and _is_decomposed_mish(node):
        return "mish (decomposed)", "decomposed"
    if node.op == "call_function" and _is_decomposed_threshold(node):
        return "threshold (decomposed)", "decomposed"
    switch = _decomposed_switch(node) if node.op == "call_function" else None
    if switch is not None:
        return f"{switch} (decomposed)", "decomposed"
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function" and node.target is not operator.getitem:
        name = _callable_name(node.target)
    else:
        return None
    name = name.rstrip("_")
    if name in _UNHANDLED_NAMES:
        return name, "no rule"
    if name in ("clamp", "clip") and (node.op == "call_method" or node.target in (torch.clamp, torch.clip)) \
            and _is_zero_floor_clamp(node) and not any(_hard_mish_site(user, "") for user in node.users):
        return "clamp", "no rule"  # a hard gate 1[lo < x < hi], e.g. timm's hard_mish: x/2 * (x + 2).clamp(0, 2)
    if name in _SMOOTH_NAMES:
        if any(_is_decomposed_silu(user) or _is_decomposed_mish(user) for user in node.users):
            return None  # reported once, by the multiplication
        if name == "tanh" and any(_gelu_new_site(final, "") for user in node.users for final in user.users):
            return None  # the tanh of a gelu_new site (1 + tanh(...)), rewritten with it
        if name == "sigmoid" and any(_quick_gelu_site(user, "") for user in node.users):
            return None  # the sigmoid of a quick_gelu site, rewritten with it
        return name, "smooth"
    return None
