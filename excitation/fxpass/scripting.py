"""``torch.jit.script`` support: swap the Python dispatchers for direct op calls.

TorchScript cannot compile our Python dispatchers (they ask functorch whether
a transform is active) and chokes on ``torch.ops.ns.op.default`` overloads, but
it resolves ``torch.ops.excitation.surrogate_relu(...)`` packets through the
op schema, and the op's registered autograd still runs.  TorchScript has no
``torch.func``, so the custom-op branch is the only one it needs.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ..errors import ExcitationError
from ..kernels import ExcitedMultiheadAttention, RecomputedConv2d, surrogate_max_pool2d, surrogate_relu
from ..kernels.fused import batch_norm_relu
from ..kernels.ops import pool_arguments
from ..spec import GATED_KINDS, op_arguments
from .fusion import unfuse
from .tracing import copy_graph_module
from .sites import (
    SURROGATE_POOL_PARAMS,
    SURROGATE_RELU_PARAMS,
    SiteMatch,
    bind_arguments,
    match_site,
)

def _constant(match: SiteMatch, value: Any, name: str) -> Any:
    if isinstance(value, fx.Node):
        raise TypeError(
            f"torch.jit.script needs constant {name} arguments, but '{match.node.name}' computes them at run "
            f"time; use torch.jit.trace or torch.export instead."
        )
    return value


def _lower(graph: fx.Graph, gm: fx.GraphModule, node: fx.Node) -> Any:
    """The direct ``torch.ops.excitation`` call for a site of the newer rules, or ``None`` if not one."""
    match = match_site(gm, node)
    if match is None or match.form != "excited" or match.kind in ("relu", "max_pool2d"):
        return None  # not ours (a site whose rule was off stays as the model wrote it)
    if match.kind in ("multihead_attention", "attention_function"):
        raise ExcitationError(
            f"torch.jit.script cannot compile the attention rule at '{node.name}' (a re-globalled copy of "
            f"{'nn.MultiheadAttention.forward' if match.kind == 'multihead_attention' else 'an attention function'}"
            f"). Use torch.jit.trace, torch.export or torch.compile, or excite(model, "
            f"rules={{'attention': False}}) to keep attention vanilla."
        )
    ops, p = torch.ops.excitation, match.params
    bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    temp = float(bound.arguments.get("temp") or 0.0)  # rules without a temperature ignore it
    pool_backward = bound.arguments.get("pool_backward", "soft")
    if match.kind in GATED_KINDS:
        kind, params = op_arguments(match.kind, {name: _constant(match, value, name) for name, value in p.items()})
        return graph.call_function(ops.surrogate_activation, (match.input, kind, temp, params))
    if match.kind == "prelu":
        return graph.call_function(ops.surrogate_prelu, (match.input, p["weight"], temp))
    if match.kind == "layer_norm":
        shape = [int(v) for v in _constant(match, p["normalized_shape"], "normalized_shape")]
        normed = graph.call_function(ops.surrogate_layer_norm, (match.input, shape, p["weight"], p["bias"], float(p["eps"])))
        return graph.call_function(operator.getitem, (normed, 0))
    if match.kind == "rms_norm":
        if "normalized_shape" not in p:  # the hand-written form: its (r)sqrt, detached
            root = torch.sqrt if p.get("held") == "sqrt" else torch.rsqrt
            return graph.call_method("detach", (graph.call_function(root, (match.input,)),))
        shape = [int(_constant(match, v, "normalized_shape")) for v in _constant(match, p["normalized_shape"],
                                                                                   "normalized_shape")]
        eps = p.get("eps")
        return graph.call_function(ops.surrogate_rms_norm, (match.input, shape, p.get("weight"),
                                                             None if eps is None else float(eps)))
    if match.kind == "softmax":
        return graph.call_function(ops.constant_softmax, (match.input, int(_constant(match, p["dim"], "dim")), p.get("dtype")))
    if match.kind == "scaled_dot_product_attention":
        query = graph.call_function(ops.stop_gradient, (match.input,))
        key = graph.call_function(ops.stop_gradient, (p["key"],))
        kwargs = {k: v for k, v in p.items() if k not in ("key", "value")}
        return graph.call_function(F.scaled_dot_product_attention, (query, key, p["value"]), kwargs)
    dims = p["dims"]
    if match.kind.startswith("adaptive"):
        sizes = _constant(match, p["output_size"], "output_size")
        sizes = [sizes] * dims if not isinstance(sizes, (list, tuple)) else list(sizes)
        if None in sizes:
            raise TypeError(
                f"torch.jit.script needs every adaptive output size, but '{node.name}' keeps an input size (None); "
                f"use torch.jit.trace or torch.export instead."
            )
        pooled = graph.call_function(
            ops.surrogate_adaptive_max_pool, (match.input, [int(v) for v in sizes], temp, pool_backward)
        )
    else:
        arguments = pool_arguments(
            _constant(match, p["kernel_size"], "kernel_size"), p.get("stride"), p.get("padding", 0),
            p.get("dilation", 1), dims,
        )
        args = (match.input, *arguments, bool(p.get("ceil_mode", False)), temp, pool_backward)
        pooled = graph.call_function(ops.surrogate_max_pool, args)
    return pooled if match.returns_tuple else graph.call_function(operator.getitem, (pooled, 0))

__all__ = ["to_scriptable"]


def to_scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of excited ``gm`` that ``torch.jit.script`` can compile, with the same forward and backward."""
    new = copy_graph_module(gm)
    for module in new.modules():  # clones: the excited model keeps its classes
        if type(module) is RecomputedConv2d:
            module.__class__ = nn.Conv2d  # recomputation is a torch.compile matter; TorchScript cannot run it
    graph = new.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(new.get_submodule(node.target), ExcitedMultiheadAttention):
            _lower(graph, new, node)  # raises: TorchScript cannot compile it
        if isinstance(node.type, str):
            # Annotations under `from __future__ import annotations` arrive as strings,
            # which fx prints as unresolvable names (`_Tensor_`) that TorchScript rejects.
            node.type = torch.Tensor if node.type in ("Tensor", "torch.Tensor") else None
        if node.op != "call_function":
            continue
        if node.target is batch_norm_relu:
            # TorchScript cannot call our Python dispatcher: run the chain unfused (same forward, same pullback).
            bound = inspect.signature(batch_norm_relu).bind(*node.args, **node.kwargs)
            bound.apply_defaults()
            source, module = unfuse(graph, node), node.args[1]
            with graph.inserting_before(node):
                replacement = graph.call_function(
                    torch.ops.excitation.surrogate_relu,
                    (source, float(bound.arguments["temp"]), bound.arguments["gate"], bound.arguments["saved"]),
                )
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
            if not module.users:
                graph.erase_node(module)
        elif node.target is surrogate_relu:
            bound = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
            with graph.inserting_after(node):
                replacement = graph.call_function(
                    torch.ops.excitation.surrogate_relu,
                    (bound["input"], float(bound["temp"]), bound["gate"], bound["saved"]),
                )
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        elif node.target is surrogate_max_pool2d:
            bound = bind_arguments(SURROGATE_POOL_PARAMS, node.args, node.kwargs)
            constants = [bound[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")]
            if any(isinstance(value, fx.Node) for value in constants):
                raise TypeError(
                    f"torch.jit.script needs constant max-pool arguments, but '{node.name}' computes them "
                    f"at run time; use torch.jit.trace or torch.export instead."
                )
            arguments = pool_arguments(bound["kernel_size"], bound["stride"], bound["padding"], bound["dilation"], 2)
            args = (bound["input"], *arguments, bool(bound["ceil_mode"]), float(bound["temp"]), bound["pool_backward"])
            with graph.inserting_after(node):
                pooled = graph.call_function(torch.ops.excitation.surrogate_max_pool2d, args)
            replacement: Any = pooled
            if not bound["return_indices"]:
                with graph.inserting_after(pooled):
                    replacement = graph.call_function(operator.getitem, (pooled, 0))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        else:
            with graph.inserting_before(node):  # several new nodes: keep them in creation order
                lowered = _lower(graph, new, node)
            if lowered is not None:
                node.replace_all_uses_with(lowered)
                graph.erase_node(node)
    graph.lint()
    new.recompile()
    return new
