"""``torch.jit.script`` support: swap the Python dispatchers for direct op calls.

TorchScript cannot compile our Python dispatchers (they ask functorch whether
a transform is active) and chokes on ``torch.ops.ns.op.default`` overloads, but
it resolves ``torch.ops.excitation.surrogate_relu(...)`` packets through the
op schema, and the op's registered autograd still runs.  TorchScript has no
``torch.func``, so the custom-op branch is the only one it needs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from ..kernels import surrogate_max_pool2d, surrogate_relu
from ..kernels.ops import _pair
from .sites import SURROGATE_POOL_PARAMS, SURROGATE_RELU_PARAMS, _bind

__all__ = ["to_scriptable"]


def to_scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of excited ``gm`` that ``torch.jit.script`` can compile, with the same forward and backward."""
    from .tracing import copy_graph_module

    new = copy_graph_module(gm)
    graph = new.graph
    for node in list(graph.nodes):
        if isinstance(node.type, str):
            # Annotations under `from __future__ import annotations` arrive as strings,
            # which fx prints as unresolvable names (`_Tensor_`) that TorchScript rejects.
            node.type = torch.Tensor if node.type in ("Tensor", "torch.Tensor") else None
        if node.op != "call_function":
            continue
        if node.target is surrogate_relu:
            bound = _bind(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
            with graph.inserting_after(node):
                replacement = graph.call_function(
                    torch.ops.excitation.surrogate_relu, (bound["input"], float(bound["temp"]), bound["gate"])
                )
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
        elif node.target is surrogate_max_pool2d:
            bound = _bind(SURROGATE_POOL_PARAMS, node.args, node.kwargs)
            constants = [bound[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")]
            if any(isinstance(value, fx.Node) for value in constants):
                raise TypeError(
                    f"torch.jit.script needs constant max-pool arguments, but '{node.name}' computes them "
                    f"at run time; use torch.jit.trace or torch.export instead."
                )
            kernel = _pair(bound["kernel_size"], "kernel_size")
            stride = kernel if bound["stride"] in (None, [], ()) else _pair(bound["stride"], "stride")
            args = (bound["input"], kernel, stride, _pair(bound["padding"], "padding"),
                    _pair(bound["dilation"], "dilation"), bool(bound["ceil_mode"]), float(bound["temp"]))
            with graph.inserting_after(node):
                pooled = graph.call_function(torch.ops.excitation.surrogate_max_pool2d, args)
            replacement: Any = pooled
            if not bound["return_indices"]:
                with graph.inserting_after(pooled):
                    replacement = graph.call_function(operator.getitem, (pooled, 0))
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)
    graph.lint()
    new.recompile()
    return new
