"""``ExcitedGraphModule``: the GraphModule class :func:`excitation.excite` returns.

It is an ordinary ``torch.fx.GraphModule`` that also

* carries its :class:`Report` (``excitation.report(gm)``) through ``copy.deepcopy``,
  ``pickle`` and ``torch.save``/``torch.load``;
* scripts: ``torch.jit.script(gm)`` compiles :func:`.scripting.to_scriptable` ``(gm)``;
* runs its compile view (:mod:`.compile_view`) while dynamo traces it, and its graph everywhere else.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any, Callable, Tuple

import torch.nn as nn
from torch import fx

from ..kernels.dispatch import dynamo_compiling
from .compile_view import compiled_forward
from .report import Report
from .scripting import to_scriptable
from .tracing import adopt_module_tree

try:  # private in torch 2.x; GraphModule.__deepcopy__ re-sets the attributes listed there
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
except ImportError:  # pragma: no cover
    _USER_PRESERVED_ATTRIBUTES_KEY = "_user_preserved_attributes"

__all__ = ["ExcitedGraphModule", "REPORT_ATTR", "make_excited"]

REPORT_ATTR = "excitation_report"
_LOG = logging.getLogger("excitation")


class ExcitedGraphModule(fx.GraphModule):
    """A GraphModule whose ReLU / max-pool sites have excitation backwards."""

    def __prepare_scriptable__(self) -> fx.GraphModule:
        # torch.jit.script calls this first; our Python dispatchers are not scriptable.
        return to_scriptable(self)

    def recompile(self):
        """Generate ``forward`` from the graph, as ``GraphModule`` does, plus the compile view's for dynamo.

        Every way a GraphModule is made or re-made (construction, ``deepcopy``, unpickling, a
        graph edit) ends here, so the view always matches the graph.  ``forward`` asks
        ``dynamo_compiling()``, which dynamo folds to a constant, so a compiled program holds only
        the view's code, and eager mode pays one check per call.
        """
        code = super().recompile()
        cls = type(self)  # GraphModule gives each instance a class of its own
        eager = cls.forward
        try:
            view = compiled_forward(self)
        except Exception as exc:  # the view is an optimisation: never let it break the model
            _LOG.warning("excitation: no compile view for this model (%s: %s); torch.compile traces its graph as it is, "
                         "which keeps more for the backward", type(exc).__name__, exc)
            view = None
        if view is not None:
            cls.forward = _dispatching_forward(eager, view)
        return code

    def __reduce__(self) -> Tuple[Callable, Tuple[Any, ...]]:
        # GraphModule unpickles as a plain GraphModule; come back as an ExcitedGraphModule.
        rebuild, args = super().__reduce__()[:2]
        return (_rebuild_excited, (rebuild, args))


def _dispatching_forward(eager: Callable, view: Callable) -> Callable:
    """``forward(self, ...)``: ``view`` while dynamo traces, else ``eager`` (the graph's own generated code)."""
    compiling = dynamo_compiling

    def forward(self, *args, **kwargs):
        if compiling():
            return view(self, *args, **kwargs)
        return eager(self, *args, **kwargs)

    # fx's tracer keeps our site functions as leaves by patching them in forward.__globals__ (an excited
    # model inside another model re-traces through this forward): give it the generated code's globals.
    forward = types.FunctionType(forward.__code__, eager.__globals__, "forward", None, forward.__closure__)
    return functools.wraps(eager)(forward)


def _rebuild_excited(rebuild: Callable, args: Tuple[Any, ...]) -> "ExcitedGraphModule":
    gm = rebuild(*args)
    return make_excited(gm, getattr(gm, REPORT_ATTR))


def make_excited(gm: fx.GraphModule, report: Report) -> ExcitedGraphModule:
    """Wrap the rewritten ``gm`` as an :class:`ExcitedGraphModule` holding ``report``."""
    excited = ExcitedGraphModule(gm, gm.graph, gm.__class__.__name__)
    adopt_module_tree(excited, gm)
    setattr(excited, REPORT_ATTR, report)
    excited.meta.update(getattr(gm, "meta", {}))
    excited.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[REPORT_ATTR] = report
    return excited
