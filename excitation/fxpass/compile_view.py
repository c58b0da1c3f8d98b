"""The compile view: the graph ``torch.compile`` traces when it compiles an excited model.

An :class:`~excitation.fxpass.excited.ExcitedGraphModule` keeps one graph, the one every other
runtime, the report, calibration and re-excitation read.  Its ``forward`` runs that graph
everywhere except while dynamo traces it: then it runs this view, a copy of the graph lowered
for the compiler with checkpoint regions (:func:`.lowering.lower`, ``mark="region"``; the
``"excitation"`` backend lowers its graphs with the same function).

Why a view rather than a rewrite of the graph itself: what compiles best is not what the other
runtimes need (``torch.export`` must keep our ops, TorchScript and ``torch.func`` take other
mechanisms), and a site that keeps its node keeps its name in reports and ``temps``.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from torch import fx

from .lowering import lower

__all__ = ["compile_view", "compiled_forward"]


def compile_view(gm: fx.GraphModule) -> Optional[fx.Graph]:
    """A copy of ``gm``'s graph as ``torch.compile`` should trace it (module docstring), or ``None`` if it changes nothing."""
    graph = copy.deepcopy(gm.graph)
    if not lower(gm, graph, mark="region").code_changed:
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
