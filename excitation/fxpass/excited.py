"""``ExcitedGraphModule``: the GraphModule class :func:`excitation.excite` returns.

It is an ordinary ``torch.fx.GraphModule`` that also

* carries its :class:`Report` (``excitation.report(gm)``) through ``copy.deepcopy``,
  ``pickle`` and ``torch.save``/``torch.load``;
* scripts: ``torch.jit.script(gm)`` compiles :func:`.scripting.to_scriptable` ``(gm)``.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch.nn as nn
from torch import fx

from .report import Report
from .scripting import to_scriptable

try:  # private in torch 2.x; GraphModule.__deepcopy__ re-sets the attributes listed there
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
except ImportError:  # pragma: no cover
    _USER_PRESERVED_ATTRIBUTES_KEY = "_user_preserved_attributes"

__all__ = ["ExcitedGraphModule", "REPORT_ATTR", "adopt_module_tree", "make_excited"]

REPORT_ATTR = "excitation_report"


class ExcitedGraphModule(fx.GraphModule):
    """A GraphModule whose ReLU / max-pool sites have excitation backwards."""

    def __prepare_scriptable__(self) -> fx.GraphModule:
        # torch.jit.script calls this first; our Python dispatchers are not scriptable.
        return to_scriptable(self)

    def __reduce__(self) -> Tuple[Callable, Tuple[Any, ...]]:
        # GraphModule unpickles as a plain GraphModule; come back as an ExcitedGraphModule.
        rebuild, args = super().__reduce__()[:2]
        return (_rebuild_excited, (rebuild, args))


def _rebuild_excited(rebuild: Callable, args: Tuple[Any, ...]) -> "ExcitedGraphModule":
    gm = rebuild(*args)
    return make_excited(gm, getattr(gm, REPORT_ATTR))


def adopt_module_tree(gm: fx.GraphModule, root: nn.Module) -> None:
    """Give ``gm`` every child, parameter and buffer of ``root`` (not only those the graph uses).

    ``GraphModule`` copies only what its graph touches; taking the whole tree makes
    ``state_dict()`` keys equal the original model's, so checkpoints load into either.
    """
    for name, child in root.named_children():
        setattr(gm, name, child)
    for name, param in root._parameters.items():
        gm._parameters[name] = param
    for name, buf in root._buffers.items():
        gm.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)
    gm.training = root.training


def make_excited(gm: fx.GraphModule, report: Report) -> ExcitedGraphModule:
    """Wrap the rewritten ``gm`` as an :class:`ExcitedGraphModule` holding ``report``."""
    excited = ExcitedGraphModule(gm, gm.graph, gm.__class__.__name__)
    adopt_module_tree(excited, gm)
    setattr(excited, REPORT_ATTR, report)
    excited.meta.update(getattr(gm, "meta", {}))
    excited.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[REPORT_ATTR] = report
    return excited
