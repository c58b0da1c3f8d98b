"""Matching: which FX nodes are ReLU or max-pool sites, and what their arguments are.

Matching is kept apart from rewriting (see :mod:`.rewrite`).  A site can be an
``nn.Module`` call, a ``torch``/``torch.nn.functional`` call, a tensor method,
an ATen overload (graphs from ``torch.export`` or dynamo), or one of our own
surrogate calls (so that excite(excite(m)) re-tempers instead of double-wrapping).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..kernels import surrogate_max_pool2d, surrogate_relu

__all__ = ["SiteMatch", "match_site", "match_unhandled", "site_name", "SITE_NAME_META", "SITE_NODE_META"]

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
SURROGATE_RELU_PARAMS = (("input", None), ("temp", 0.3), ("gate", "sigmoid"))
SURROGATE_POOL_PARAMS = _POOL_PARAMS + (("temp", 0.3),)

# target -> (params, forced inplace or None, forced "returns indices" or None)
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

# Activation-like sites that ReLU excitation does not cover, reported as "left alone".
_UNHANDLED_MODULES = (
    nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Threshold, nn.LogSigmoid, nn.GLU, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink,
    nn.MaxPool1d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
_UNHANDLED_NAMES = frozenset(
    """relu6 leaky_relu prelu rrelu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh
    sigmoid tanh softplus threshold logsigmoid log_sigmoid glu softshrink hardshrink tanhshrink
    max_pool1d max_pool3d max_pool1d_with_indices max_pool3d_with_indices adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d fractional_max_pool2d fractional_max_pool3d
    lp_pool1d lp_pool2d""".split()
)


@dataclass
class SiteMatch:
    """One ReLU or max-pool site, as found in a graph."""

    node: Node
    kind: str  # "relu" or "max_pool2d"
    form: str  # "module", "function", "method", "aten" or "excited"
    input: Any
    inplace: bool = False
    # max-pool only: kernel_size, stride, padding, dilation, ceil_mode (values or Nodes).
    pool_args: Tuple[Any, ...] = ()
    returns_indices: bool = False


def _bind(params: Sequence[Tuple[str, Any]], args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
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
_SITE_MODULE_TYPES = ("torch.nn.modules.activation.ReLU", "torch.nn.modules.pooling.MaxPool2d")


def site_name(gm: GraphModule, node: Node) -> str:
    """A site's user-facing name: the module path for module calls, else the node name.

    A name given once is kept in ``node.meta`` so re-exciting keeps it.  Graphs from
    ``torch.export`` and dynamo record the calling module in ``nn_module_stack``;
    when that module is itself the ReLU / MaxPool2d, its path is the name.
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
            return _normalise_path(path)
    return node.name


def _normalise_path(path: str) -> str:
    # dynamo writes "L['self'].layer1[0].relu" style paths; export writes "layer1.0.relu".
    if path.startswith("L['self']"):
        path = path[len("L['self']"):].lstrip(".")
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _pool_site(node: Node, form: str, bound: Dict[str, Any], returns_indices: bool) -> SiteMatch:
    stride = bound["stride"]
    if isinstance(stride, (list, tuple)) and len(stride) == 0:
        stride = None  # aten's "[]" means "same as kernel_size"
    args = (bound["kernel_size"], stride, bound["padding"], bound["dilation"], bound["ceil_mode"])
    return SiteMatch(node, "max_pool2d", form, bound["input"], False, args, bool(returns_indices))


def match_site(gm: GraphModule, node: Node) -> Optional[SiteMatch]:
    """Return a :class:`SiteMatch` if ``node`` is a ReLU or 2-D max-pool site, else ``None``."""
    if node.op == "call_module":
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
        return None
    if node.op == "call_method":
        if node.target in _RELU_METHODS:
            return SiteMatch(node, "relu", "method", node.args[0], _RELU_METHODS[node.target])
        return None
    if node.op != "call_function":
        return None
    target = node.target
    form = "aten" if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) else "function"
    try:
        relu_entry = _RELU_FUNCTIONS.get(target)
        pool_entry = _POOL_FUNCTIONS.get(target)
    except TypeError:  # unhashable target
        return None
    if relu_entry is not None:
        params, forced_inplace = relu_entry
        bound = _bind(params, node.args, node.kwargs)
        inplace = forced_inplace if forced_inplace is not None else bool(bound["inplace"])
        return SiteMatch(node, "relu", form, bound["input"], inplace)
    if pool_entry is not None:
        params, forced_indices = pool_entry
        bound = _bind(params, node.args, node.kwargs)
        indices = forced_indices if forced_indices is not None else bound["return_indices"]
        return _pool_site(node, form, bound, indices)
    if target is surrogate_relu:
        bound = _bind(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
        return SiteMatch(node, "relu", "excited", bound["input"])
    if target is surrogate_max_pool2d:
        bound = _bind(SURROGATE_POOL_PARAMS, node.args, node.kwargs)
        return _pool_site(node, "excited", bound, bound["return_indices"])
    return None


def _callable_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._opname
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target))


def match_unhandled(gm: GraphModule, node: Node) -> Optional[str]:
    """Name the activation-like op at ``node`` that excitation leaves alone, or ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return type(module).__name__ if isinstance(module, _UNHANDLED_MODULES) else None
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function" and node.target is not operator.getitem:
        name = _callable_name(node.target)
    else:
        return None
    name = name.rstrip("_")
    return name if name in _UNHANDLED_NAMES else None
