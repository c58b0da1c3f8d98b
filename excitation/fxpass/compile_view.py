"""The compile view: the graph ``torch.compile`` traces when it compiles an excited model.

An :class:`~excitation.fxpass.excited.ExcitedGraphModule` keeps one graph, the one every other
runtime, the report, calibration and re-excitation read.  Its ``forward`` runs that graph
everywhere except while dynamo traces it: then it runs this view, a copy of the graph in which

* every exact ReLU site calls its counterpart in :mod:`excitation.kernels.compiled`
  (``surrogate_relu`` -> ``compiled_relu``, ``batch_norm_relu`` -> ``compiled_batch_norm_relu``):
  the same forward and pullback, with the C kernels as the CPU backward; and
* a ``torch.cat`` of exact ReLU sites that feed nothing else becomes one
  ``compiled_relu_concat`` of their pre-activations, so one recompute region holds the ReLUs
  and the concatenation.

Why a view rather than a rewrite of the graph itself: what compiles best is not what the other
runtimes need (``torch.export`` must keep our ops, TorchScript and ``torch.func`` take other
mechanisms), and a site that keeps its node keeps its name in reports and ``temps``.
Sites fed by a :class:`~excitation.kernels.RecomputedConv2d` are left as they are: that
convolution's region must hold the site too, or its output is kept at the boundary.
"""

from __future__ import annotations

import copy
import inspect
from typing import Callable, List, Optional, Set

import torch
from torch import fx

from ..kernels import RecomputedConv2d, batch_norm_relu, surrogate_relu
from ..kernels.compiled import compiled_batch_norm_relu, compiled_relu, compiled_relu_concat
from ..kernels.fused import batch_norm_relu_pre_activation
from .sites import SURROGATE_RELU_PARAMS, bind_arguments

__all__ = ["compile_view", "compiled_forward"]

_CONCATS = (torch.cat, torch.concat)
_BATCH_NORM_RELU_PARAMS = tuple(
    (name, None if parameter.default is inspect.Parameter.empty else parameter.default)
    for name, parameter in inspect.signature(batch_norm_relu).parameters.items()
)


def _site(gm: fx.GraphModule, node: object) -> Optional[dict]:
    """The bound arguments of an exact ReLU site node the view may change (``kind``: "relu" or "bn"), else ``None``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is surrogate_relu:
        bound = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
        return dict(bound, kind="relu") if bound["saved"] == "exact" else None
    if node.target is batch_norm_relu:
        bound = bind_arguments(_BATCH_NORM_RELU_PARAMS, node.args, node.kwargs)
        x = bound["x"]
        if bound["saved"] != "exact" or (
            isinstance(x, fx.Node) and x.op == "call_module" and isinstance(gm.get_submodule(x.target), RecomputedConv2d)
        ):
            return None
        return dict(bound, kind="bn")
    return None


def _concat_parts(node: fx.Node):
    """``(parts, dim)`` of a ``torch.cat`` / ``torch.concat`` node, else ``None``."""
    if node.op != "call_function" or node.target not in _CONCATS:
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not parts or not isinstance(dim, int) or set(node.kwargs) - {"tensors", "dim"}:
        return None
    return list(parts), dim


def _group_concatenations(gm: fx.GraphModule, graph: fx.Graph) -> int:
    """Rewrite each ``cat`` of exact ReLU sites that feed it alone into ``compiled_relu_concat``; return how many."""
    grouped = 0
    for node in list(graph.nodes):
        found = _concat_parts(node)
        if found is None:
            continue
        parts, dim = found
        sites = [_site(gm, part) for part in parts]
        if any(site is None or len(part.users) != 1 for site, part in zip(sites, parts)):
            continue
        with graph.inserting_before(node):
            zs: List[fx.Node] = []
            for site in sites:
                if site["kind"] == "bn":
                    zs.append(graph.call_function(batch_norm_relu_pre_activation,
                                                  (site["x"], site["bn"], site["residual"])))
                else:
                    zs.append(site["input"])
            temps = tuple(site["temp"] for site in sites)
            gates = tuple(site["gate"] for site in sites)
            concat = graph.call_function(compiled_relu_concat, (zs, dim, temps, gates))
        concat.meta = dict(node.meta)
        node.replace_all_uses_with(concat)
        graph.erase_node(node)
        erased: Set[fx.Node] = set()
        for part in parts:
            if part not in erased:
                graph.erase_node(part)
                erased.add(part)
        grouped += 1
    return grouped


def compile_view(gm: fx.GraphModule) -> Optional[fx.Graph]:
    """A copy of ``gm``'s graph as ``torch.compile`` should trace it (module docstring), or ``None`` if it changes nothing."""
    graph = copy.deepcopy(gm.graph)
    changed = _group_concatenations(gm, graph)
    for node in graph.nodes:
        site = _site(gm, node)
        if site is not None:
            node.target = compiled_relu if site["kind"] == "relu" else compiled_batch_norm_relu
            changed += 1
    if not changed:
        return None
    graph.lint()
    return graph


def compiled_forward(gm: fx.GraphModule) -> Optional[Callable]:
    """The view's ``forward(self, *inputs)`` as a plain function, to call with ``gm`` as ``self``; ``None`` if no view.

    It looks up modules, parameters and buffers on the ``self`` it is called with, so it
    follows ``gm`` through ``.to()``, ``load_state_dict`` and module assignment.
    """
    graph = compile_view(gm)
    if graph is None:
        return None
    holder = fx.GraphModule(gm, graph)  # only to generate the code; its attributes are gm's own
    return type(holder).forward
