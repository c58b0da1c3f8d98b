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
    ExcitedMultiheadAttention,
    freeze_attention,
    surrogate_adaptive_max_pool,
    surrogate_celu,
    surrogate_elu,
    surrogate_gelu,
    surrogate_hard_mish,
    surrogate_hardsigmoid,
    surrogate_hardswish,
    surrogate_hardtanh,
    surrogate_layer_norm,
    surrogate_leaky_relu,
    surrogate_native_layer_norm,
    surrogate_max_pool,
    surrogate_max_pool2d,
    surrogate_mish,
    surrogate_prelu,
    surrogate_relu,
    surrogate_scaled_dot_product_attention,
    surrogate_selu,
    surrogate_silu,
    surrogate_softmax,
)
from ..kernels.fused import batch_norm_relu
from .rules import KIND_TO_RULE

__all__ = [
    "SiteMatch", "match_site", "match_unhandled", "site_name", "surrogate_rule", "SITE_NAME_META", "SITE_NODE_META",
]

aten = torch.ops.aten

# ------------------------------------------------------------------- signatures
# Each entry: parameter names and defaults, as the callable itself declares them.
_RELU_PARAMS = (("input", None), ("inplace", False))
_POOL_PARAMS = (
    ("input", None),
    ("kernel_size", None),
    ("stride", None),
    ("padding", 0),
    ("dilation", 1),
    ("ceil_mode", False),
    ("return_indices", False),
)
_ATEN_POOL_PARAMS = _POOL_PARAMS[:6]
# Our own surrogate calls (what an excited graph holds).
SURROGATE_RELU_PARAMS = (("input", None), ("temp", 0.3), ("gate", "sigmoid"), ("saved", "exact"))
SURROGATE_POOL_PARAMS = _POOL_PARAMS + (("temp", 0.3), ("pool_backward", "soft"))

# target -> (params, forced inplace or None)
_RELU_FUNCTIONS: Dict[Any, Tuple[Sequence, Optional[bool]]] = {
    F.relu: (_RELU_PARAMS, None),
    F.relu_: (_RELU_PARAMS[:1], True),
    torch.relu: (_RELU_PARAMS[:1], False),
    torch.relu_: (_RELU_PARAMS[:1], True),
    aten.relu.default: (_RELU_PARAMS[:1], False),
    aten.relu: (_RELU_PARAMS[:1], False),
    aten.relu_.default: (_RELU_PARAMS[:1], True),
    aten.relu_: (_RELU_PARAMS[:1], True),
}
_RELU_METHODS = {"relu": False, "relu_": True}

_POOL_FUNCTIONS: Dict[Any, Tuple[Sequence, Optional[bool]]] = {
    F.max_pool2d: (_POOL_PARAMS, None),
    F._max_pool2d: (_POOL_PARAMS, False),
    F.max_pool2d_with_indices: (_POOL_PARAMS, True),
    torch.max_pool2d: (_ATEN_POOL_PARAMS, False),
    aten.max_pool2d.default: (_ATEN_POOL_PARAMS, False),
    aten.max_pool2d: (_ATEN_POOL_PARAMS, False),
    aten.max_pool2d_with_indices.default: (_ATEN_POOL_PARAMS, True),
    aten.max_pool2d_with_indices: (_ATEN_POOL_PARAMS, True),
}


def _schema_params(op: Any) -> Tuple[Tuple[str, Any], ...]:
    """Parameter names and defaults of an ATen overload, first one called ``input``."""
    overload = op.default if isinstance(op, torch._ops.OpOverloadPacket) else op
    params = []
    for i, arg in enumerate(overload._schema.arguments):
        default = arg.default_value if arg.has_default_value() else None
        params.append(("input" if i == 0 else arg.name, default))
    return tuple(params)


def _aten(name: str) -> Tuple[Any, ...]:
    packet = getattr(aten, name)
    return (packet, packet.default)


def _table(entries) -> Dict[Any, Tuple[str, Tuple[Tuple[str, Any], ...], Optional[bool], Dict[str, Any]]]:
    """``target -> (kind, params, forced inplace, fixed arguments)``; ATen params come from the schema."""
    table = {}
    for kind, targets, params, inplace, fixed in entries:
        for target in targets:
            found = params if params is not None else _schema_params(target)
            table[target] = (kind, found, inplace, fixed)
    return table


_HARDTANH = (("input", None), ("min_val", -1.0), ("max_val", 1.0), ("inplace", False))
_LEAKY = (("input", None), ("negative_slope", 0.01), ("inplace", False))
_UNARY = (("input", None), ("inplace", False))
_ALPHA = (("input", None), ("alpha", 1.0), ("inplace", False))
_PRELU = (("input", None), ("weight", None))
_ADAPTIVE = (("input", None), ("output_size", None), ("return_indices", False))
_LAYER_NORM = (("input", None), ("normalized_shape", None), ("weight", None), ("bias", None), ("eps", 1e-5))
_SOFTMAX = (("input", None), ("dim", None), ("_stacklevel", 3), ("dtype", None))
_SDPA = (("query", None), ("key", None), ("value", None), ("attn_mask", None), ("dropout_p", 0.0),
         ("is_causal", False), ("scale", None), ("enable_gqa", False))

# Elementwise activations other than ReLU, and the layer/attention functions.
_FUNCTIONS = _table([
    ("hardtanh", (F.hardtanh,), _HARDTANH, None, {}),
    ("hardtanh", (F.hardtanh_,), _HARDTANH[:3], True, {}),
    ("hardtanh", (F.relu6,), _UNARY, None, {"min_val": 0.0, "max_val": 6.0}),
    ("hardtanh", _aten("hardtanh"), None, False, {}),
    ("hardtanh", _aten("hardtanh_"), None, True, {}),
    ("hardtanh", _aten("relu6"), None, False, {"min_val": 0.0, "max_val": 6.0}),
    ("leaky_relu", (F.leaky_relu,), _LEAKY, None, {}),
    ("leaky_relu", (F.leaky_relu_,), _LEAKY[:2], True, {}),
    ("leaky_relu", _aten("leaky_relu"), None, False, {}),
    ("leaky_relu", _aten("leaky_relu_"), None, True, {}),
    ("silu", (F.silu,), _UNARY, None, {}),
    ("silu", _aten("silu"), None, False, {}),
    ("silu", _aten("silu_"), None, True, {}),
    ("gelu", (F.gelu,), (("input", None), ("approximate", "none")), False, {}),
    ("gelu", _aten("gelu"), None, False, {}),
    ("gelu", _aten("gelu_"), None, True, {}),
    ("prelu", (F.prelu, torch.prelu, *_aten("prelu")), _PRELU, False, {}),
    ("elu", (F.elu,), _ALPHA, None, {}),
    ("elu", (F.elu_,), _ALPHA[:2], True, {}),
    ("elu", _aten("elu"), None, False, {}),
    ("elu", _aten("elu_"), None, True, {}),
    ("celu", (F.celu,), _ALPHA, None, {}),
    ("celu", (torch.celu,), _ALPHA[:2], False, {}),
    ("celu", (F.celu_,), _ALPHA[:2], True, {}),  # F.celu_ is torch.celu_
    ("celu", _aten("celu"), None, False, {}),
    ("celu", _aten("celu_"), None, True, {}),
    ("selu", (F.selu,), _UNARY, None, {}),
    ("selu", (torch.selu,), _UNARY[:1], False, {}),
    ("selu", (F.selu_,), _UNARY[:1], True, {}),  # F.selu_ is torch.selu_
    ("selu", _aten("selu"), None, False, {}),
    ("selu", _aten("selu_"), None, True, {}),
    ("mish", (F.mish,), _UNARY, None, {}),
    ("mish", _aten("mish"), None, False, {}),
    ("mish", _aten("mish_"), None, True, {}),
    ("hardswish", (F.hardswish,), _UNARY, None, {}),
    ("hardswish", _aten("hardswish"), None, False, {}),
    ("hardswish", _aten("hardswish_"), None, True, {}),
    ("hardsigmoid", (F.hardsigmoid,), _UNARY, None, {}),
    ("hardsigmoid", _aten("hardsigmoid"), None, False, {}),
    ("hardsigmoid", _aten("hardsigmoid_"), None, True, {}),
    ("max_pool1d", (F.max_pool1d, F._max_pool1d), _POOL_PARAMS, False, {}),
    ("max_pool1d", (F.max_pool1d_with_indices,), _POOL_PARAMS, False, {"return_indices": True}),
    ("max_pool1d", (torch.max_pool1d, *_aten("max_pool1d")), _ATEN_POOL_PARAMS, False, {}),
    ("max_pool1d", (torch.max_pool1d_with_indices, *_aten("max_pool1d_with_indices")), _ATEN_POOL_PARAMS, False,
     {"return_indices": True}),
    ("max_pool3d", (F.max_pool3d, F._max_pool3d), _POOL_PARAMS, False, {}),
    ("max_pool3d", (F.max_pool3d_with_indices,), _POOL_PARAMS, False, {"return_indices": True}),
    ("max_pool3d", (torch.max_pool3d, *_aten("max_pool3d")), _ATEN_POOL_PARAMS, False, {}),
    ("max_pool3d", _aten("max_pool3d_with_indices"), _ATEN_POOL_PARAMS, False, {"return_indices": True}),
    ("adaptive_max_pool1d", (F.adaptive_max_pool1d, F._adaptive_max_pool1d), _ADAPTIVE, False, {}),
    ("adaptive_max_pool1d", (F.adaptive_max_pool1d_with_indices,), _ADAPTIVE, False, {"return_indices": True}),
    ("adaptive_max_pool1d", (torch.adaptive_max_pool1d, *_aten("adaptive_max_pool1d")), _ADAPTIVE[:2], False,
     {"return_indices": True}),
    ("adaptive_max_pool2d", (F.adaptive_max_pool2d, F._adaptive_max_pool2d), _ADAPTIVE, False, {}),
    ("adaptive_max_pool2d", (F.adaptive_max_pool2d_with_indices,), _ADAPTIVE, False, {"return_indices": True}),
    ("adaptive_max_pool2d", _aten("adaptive_max_pool2d"), _ADAPTIVE[:2], False, {"return_indices": True}),
    ("adaptive_max_pool3d", (F.adaptive_max_pool3d, F._adaptive_max_pool3d), _ADAPTIVE, False, {}),
    ("adaptive_max_pool3d", (F.adaptive_max_pool3d_with_indices,), _ADAPTIVE, False, {"return_indices": True}),
    ("adaptive_max_pool3d", _aten("adaptive_max_pool3d"), _ADAPTIVE[:2], False, {"return_indices": True}),
    ("layer_norm", (F.layer_norm,), _LAYER_NORM, False, {}),
    ("layer_norm", (torch.layer_norm, *_aten("layer_norm")), _LAYER_NORM, False, {}),
    # Core-ATen graphs (run_decompositions) hold the 3-output form and _softmax.
    ("layer_norm", _aten("native_layer_norm"), _LAYER_NORM, False, {"native": True}),
    ("softmax", _aten("_softmax"), (("input", None), ("dim", None), ("half_to_float", False)), False, {}),
    ("softmax", (F.softmax, torch.softmax), _SOFTMAX, False, {}),
    ("softmax", (aten.softmax, aten.softmax.int), (("input", None), ("dim", None), ("dtype", None)), False, {}),
    ("scaled_dot_product_attention", (F.scaled_dot_product_attention, *_aten("scaled_dot_product_attention")),
     _SDPA, False, {}),
])

# Activation modules: type -> (kind, attributes passed as arguments).
_MODULES: Dict[type, Tuple[str, Tuple[str, ...]]] = {
    nn.Hardtanh: ("hardtanh", ("min_val", "max_val")),
    nn.ReLU6: ("hardtanh", ("min_val", "max_val")),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.PReLU: ("prelu", ()),
    nn.ELU: ("elu", ("alpha",)),
    nn.CELU: ("celu", ("alpha",)),
    nn.SELU: ("selu", ()),
    nn.SiLU: ("silu", ()),
    nn.Mish: ("mish", ()),
    nn.GELU: ("gelu", ("approximate",)),
    nn.Hardswish: ("hardswish", ()),
    nn.Hardsigmoid: ("hardsigmoid", ()),
    nn.MaxPool1d: ("max_pool1d", ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    nn.MaxPool3d: ("max_pool3d", ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")),
    nn.AdaptiveMaxPool1d: ("adaptive_max_pool1d", ("output_size", "return_indices")),
    nn.AdaptiveMaxPool2d: ("adaptive_max_pool2d", ("output_size", "return_indices")),
    nn.AdaptiveMaxPool3d: ("adaptive_max_pool3d", ("output_size", "return_indices")),
    nn.LayerNorm: ("layer_norm", ("normalized_shape", "eps")),
    nn.MultiheadAttention: ("multihead_attention", ()),
    ExcitedMultiheadAttention: ("multihead_attention", ()),
}

# Functions fx keeps as leaves (``torch.fx.wrap``) that compute attention inside.
_ATTENTION_FUNCTIONS = {F.multi_head_attention_forward}
try:
    from torchvision.models.swin_transformer import shifted_window_attention

    _ATTENTION_FUNCTIONS.add(shifted_window_attention)
except ImportError:  # torchvision is optional for the pass itself
    pass

# Our own surrogate wrappers, re-matched so that excite(excite(m)) re-tempers.
_SURROGATE_KINDS: Dict[Callable, str] = {
    surrogate_hardtanh: "hardtanh",
    surrogate_leaky_relu: "leaky_relu",
    surrogate_silu: "silu",
    surrogate_gelu: "gelu",
    surrogate_hardswish: "hardswish",
    surrogate_hardsigmoid: "hardsigmoid",
    surrogate_prelu: "prelu",
    surrogate_elu: "elu",
    surrogate_celu: "celu",
    surrogate_selu: "selu",
    surrogate_mish: "mish",
    surrogate_hard_mish: "hard_mish",
    surrogate_layer_norm: "layer_norm",
    surrogate_native_layer_norm: "layer_norm",
    surrogate_softmax: "softmax",
    surrogate_scaled_dot_product_attention: "scaled_dot_product_attention",
}

# Every surrogate function -> its rule.
_SURROGATE_RULES: Dict[Callable, str] = {
    surrogate_relu: "relu",
    batch_norm_relu: "relu",
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
# Activation-like sites with a hard gate (or a max) that no rule covers.
_UNHANDLED_MODULES = (
    nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Threshold, nn.GLU,
    nn.Softshrink, nn.Hardshrink, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_UNHANDLED_NAMES = frozenset(
    """prelu rrelu elu selu celu mish softplus threshold glu softshrink hardshrink
    fractional_max_pool2d fractional_max_pool3d lp_pool1d lp_pool2d""".split()
)
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
    f"{t.__module__}.{t.__qualname__}" for t in (nn.ReLU, nn.MaxPool2d, nn.LayerNorm, *_MODULES)
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


def _match_module(gm: GraphModule, node: Node) -> Optional[SiteMatch]:
    module = gm.get_submodule(node.target)
    if type(module) is nn.ReLU:
        return SiteMatch(node, "relu", "module", node.args[0], bool(module.inplace))
    if type(module) is nn.MaxPool2d:
        bound = {
            "input": node.args[0],
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
            "ceil_mode": module.ceil_mode,
        }
        return _pool_site(node, "module", bound, module.return_indices)
    entry = _MODULES.get(type(module))
    if entry is None:
        return None
    kind, attributes = entry
    if kind == "multihead_attention":
        form = "excited" if type(module) is ExcitedMultiheadAttention else "module"
        return SiteMatch(node, kind, form, node.args[0] if node.args else node.kwargs.get("query"))
    bound = {name: getattr(module, name) for name in attributes}
    bound["input"] = node.args[0] if node.args else node.kwargs.get("input")
    if kind == "prelu":
        bound["weight"] = f"{node.target}.weight"  # read with a get_attr at the rewrite
    if kind == "layer_norm":
        bound["weight"] = f"{node.target}.weight" if module.weight is not None else None
        bound["bias"] = f"{node.target}.bias" if module.bias is not None else None
        bound["normalized_shape"] = list(module.normalized_shape)
    return _general_site(node, kind, "module", bound, bool(getattr(module, "inplace", False)))


def match_site(gm: GraphModule, node: Node) -> Optional[SiteMatch]:
    """Return a :class:`SiteMatch` if ``node`` is a site of any rule, else ``None``."""
    if node.op == "call_module":
        return _match_module(gm, node)
    if node.op == "call_method":
        if node.target in _RELU_METHODS:
            return SiteMatch(node, "relu", "method", node.args[0], _RELU_METHODS[node.target])
        if node.target == "softmax":
            bound = bind_arguments(_SOFTMAX, node.args, node.kwargs)
            return _general_site(node, "softmax", "method", bound, False)
        if node.target == "prelu":
            return _general_site(node, "prelu", "method", bind_arguments(_PRELU, node.args, node.kwargs), False)
        return _hard_mish_site(node, "method")
    if node.op != "call_function":
        return None
    target = node.target
    form = "aten" if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else "function"
    try:
        relu_entry = _RELU_FUNCTIONS.get(target)
        pool_entry = _POOL_FUNCTIONS.get(target)
        entry = _FUNCTIONS.get(target)
        surrogate_kind = _SURROGATE_KINDS.get(target)
    except TypeError:  # unhashable target
        return None
    if relu_entry is not None:
        params, forced_inplace = relu_entry
        bound = bind_arguments(params, node.args, node.kwargs)
        inplace = forced_inplace if forced_inplace is not None else bool(bound["inplace"])
        return SiteMatch(node, "relu", form, bound["input"], inplace)
    if pool_entry is not None:
        params, forced_indices = pool_entry
        bound = bind_arguments(params, node.args, node.kwargs)
        indices = forced_indices if forced_indices is not None else bound["return_indices"]
        return _pool_site(node, form, bound, indices)
    if entry is not None:
        kind, params, forced_inplace, fixed = entry
        bound = bind_arguments(params, node.args, node.kwargs)
        bound.update(fixed)
        if kind == "softmax" and "dtype" not in bound:
            bound["dtype"] = None
        inplace = forced_inplace if forced_inplace is not None else bool(bound.get("inplace", False))
        return _general_site(node, kind, form, bound, inplace)
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
    return _hard_mish_site(node, form)


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
    target = {
        "hardtanh": surrogate_hardtanh,
        "leaky_relu": surrogate_leaky_relu,
        "silu": surrogate_silu,
        "gelu": surrogate_gelu,
        "hardswish": surrogate_hardswish,
        "hardsigmoid": surrogate_hardsigmoid,
        "prelu": surrogate_prelu,
        "elu": surrogate_elu,
        "celu": surrogate_celu,
        "selu": surrogate_selu,
        "mish": surrogate_mish,
        "hard_mish": surrogate_hard_mish,
        "layer_norm": surrogate_layer_norm,
        "softmax": surrogate_softmax,
        "scaled_dot_product_attention": surrogate_scaled_dot_product_attention,
    }[kind]
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
    return isinstance(low, (int, float)) and low == 0 and (high is None or isinstance(high, (int, float)))


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
        return name, "smooth"
    return None
