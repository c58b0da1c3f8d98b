"""BatchNorm -> ReLU fusion: the pass step that lets exact pullbacks keep no more than vanilla.

After the ReLU sites are rewritten, each ``surrogate_relu`` whose input is an
eval-capable ``nn.BatchNorm{1,2,3}d`` call (or the sum of such a call and another
tensor: ResNet's ``bn3(x) + identity``) used by nothing else becomes one
:func:`excitation.kernels.fused.batch_norm_relu` call.  See that module for why
and what it guarantees; this one only edits graphs.
"""

from __future__ import annotations

import operator
from typing import Dict, Optional, Tuple

import torch
from torch import fx

from ..kernels import surrogate_relu
from ..kernels.fused import FUSABLE_BATCH_NORMS, batch_norm_relu
from .sites import SITE_NODE_META, SURROGATE_RELU_PARAMS, bind_arguments

__all__ = ["fuse_batch_norm_relu", "unfuse", "FUSED_META"]

#: node.meta key of a fused site: the BatchNorm's module path, "+ add" when a residual was fused too.
FUSED_META = "excitation_fused"

_ADDS = (operator.add, operator.iadd, torch.add)


def batch_norm_call(gm: fx.GraphModule, node: object) -> bool:
    """``node`` is ``bn(x)`` of a fusable BatchNorm class, with one user."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and type(gm.get_submodule(node.target)) in FUSABLE_BATCH_NORMS
        and len(node.args) == 1
        and not node.kwargs
        and isinstance(node.args[0], fx.Node)
        and len(node.users) == 1
    )


def _pattern(gm: fx.GraphModule, source: object) -> Optional[Tuple[fx.Node, Optional[fx.Node], Optional[fx.Node]]]:
    """``(bn node, residual, add node)`` if ``source`` (a ReLU's input) is ``bn(x)`` or ``bn(x) + residual``."""
    if batch_norm_call(gm, source):
        return source, None, None
    is_add = isinstance(source, fx.Node) and (
        (source.op == "call_function" and source.target in _ADDS) or (source.op == "call_method" and source.target == "add")
    )
    if not is_add or len(source.args) != 2 or source.kwargs or len(source.users) != 1:
        return None
    first, second = source.args
    for bn, residual in ((first, second), (second, first)):
        if batch_norm_call(gm, bn) and isinstance(residual, fx.Node) and residual is not bn:
            return bn, residual, source
    return None


def fuse_batch_norm_relu(gm: fx.GraphModule) -> Dict[str, str]:
    """Fuse every eligible ``bn -> [add ->] surrogate_relu`` chain in ``gm``; return ``{site node: what fused}``.

    The caller recompiles ``gm``.
    """
    graph, fused = gm.graph, {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not surrogate_relu:
            continue
        bound = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
        found = _pattern(gm, bound["input"])
        if found is None:
            continue
        bn, residual, add = found
        with graph.inserting_before(node):
            module = graph.get_attr(bn.target)
            kwargs = {"temp": bound["temp"], "gate": bound["gate"]}
            if bound["saved"] != "exact":
                kwargs["saved"] = bound["saved"]  # applies where a call cannot run fused
            new = graph.call_function(batch_norm_relu, (bn.args[0], module, residual), kwargs)
        new.meta = dict(node.meta)
        new.meta[FUSED_META] = str(bn.target) + (" + add" if add is not None else "")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for dead in (add, bn):
            if dead is not None:
                graph.erase_node(dead)
        fused[new.meta.get(SITE_NODE_META, new.name)] = new.meta[FUSED_META]
    return fused


def unfuse(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert ``bn(x) [+ residual]`` before fused ``node`` and return it: the ReLU input, for re-excitation."""
    x, module, residual = node.args[:3]
    with graph.inserting_before(node):
        source = graph.call_module(module.target, (x,))
        if residual is not None:
            source = graph.call_function(operator.add, (source, residual))
    return source
