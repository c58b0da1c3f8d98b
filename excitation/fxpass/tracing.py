"""Turning a user's model into a GraphModule we may edit, without touching the model.

The excited model gets *its own module objects* (so ``.eval()``, ``.train()``
and hooks added to it never reach the original) that *share the original's
parameter and buffer tensors* (so no memory is duplicated and a fine-tuned
original is seen by its excited twin).  Our own functions never write to
those tensors.
"""

from __future__ import annotations

import copy
import os
import threading
import traceback
from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch import fx

from ..errors import ExcitationTraceError
from ..kernels import SURROGATE_FUNCTIONS, ExcitedMultiheadAttention, RecomputedConv2d

__all__ = ["adopt_module_tree", "clone_module_tree", "trace", "copy_graph_module", "TRACE_GATE"]

_TORCH_DIR = os.path.dirname(torch.__file__)


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


class _TraceGate:
    """One tracer or many runners at a time.

    ``symbolic_trace`` patches ``nn.Module.__call__`` process-wide while it runs, so a
    module executed by another thread meanwhile is routed into the tracer.  Our own
    entry points run models inside :meth:`running` and trace inside :meth:`tracing`,
    so they never overlap.  A thread may trace from inside its own ``running`` block.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._tracing = False
        self._local = threading.local()

    @contextmanager
    def running(self) -> Iterator[None]:
        mine = getattr(self._local, "running", 0)
        with self._cond:
            while self._tracing and mine == 0:
                self._cond.wait()
            self._running += 1
        self._local.running = mine + 1
        try:
            yield
        finally:
            self._local.running = mine
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextmanager
    def tracing(self) -> Iterator[None]:
        mine = getattr(self._local, "running", 0)
        with self._cond:
            while self._tracing or self._running > mine:
                self._cond.wait()
            self._tracing = True
        try:
            yield
        finally:
            with self._cond:
                self._tracing = False
                self._cond.notify_all()


#: Entry points that run models use ``TRACE_GATE.running()``; tracing uses ``.tracing()``.
TRACE_GATE = _TraceGate()


def clone_module_tree(module: nn.Module, memo: Optional[Dict[int, nn.Module]] = None) -> nn.Module:
    """A copy of ``module`` with new module objects and dicts but the same tensors.

    A submodule reached twice (a reused ``self.relu``, tied layers) maps to one
    clone, so the structure is kept exactly.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    # Bypass __copy__ overrides (GraphModule's rebuilds itself and drops hooks).
    clone = type(module).__new__(type(module))
    if isinstance(module, fx.GraphModule):
        # GraphModule.__new__ makes a fresh per-instance class without the generated forward;
        # the clone runs the same graph, so it takes the original's class (and forward).
        clone.__class__ = type(module)
    memo[id(module)] = clone
    for key, value in module.__dict__.items():
        # _parameters, _buffers, _modules and every hook registry are dicts:
        # new ones, so adding or removing entries on the clone leaves the original alone.
        clone.__dict__[key] = copy.copy(value) if isinstance(value, (dict, set)) else value
    for name, child in module._modules.items():
        clone._modules[name] = None if child is None else clone_module_tree(child, memo)
    return clone


class _ExcitationTracer(fx.Tracer):
    """``fx.Tracer`` that keeps our surrogates as leaves and remembers where tracing failed."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=SURROGATE_FUNCTIONS)
        self.failed_module: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Our MultiheadAttention and Conv2d subclasses live outside torch.nn but are leaves like their parents.
        return isinstance(m, (ExcitedMultiheadAttention, RecomputedConv2d)) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_module is None:  # the innermost module the error passed through
                self.failed_module = self.path_of_module(m)
            raise


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch: the user's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.sep + "excitation" + os.sep + "fxpass" not in f.filename]
    return frames[-1] if frames else None


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``module`` (a clone of the user's model), with a readable error on failure.

    The resulting GraphModule holds the *whole* module tree of ``module``, not
    only the submodules the graph calls, so its ``state_dict()`` keys are those
    of the original model.
    """
    tracer = _ExcitationTracer()
    try:
        with TRACE_GATE.tracing():
            graph = tracer.trace(module)
    except Exception as exc:  # fx raises many types: TraceError, TypeError, NotImplementedError...
        where = tracer.failed_module or ""
        frame = _user_frame(exc)
        location = f" at {frame.filename}:{frame.lineno} ({frame.line.strip() if frame.line else '?'})" if frame else ""
        module_text = f"in submodule '{where}' ({type(module.get_submodule(where)).__name__})" if where else "in the model's own forward"
        raise ExcitationTraceError(
            f"torch.fx.symbolic_trace cannot trace {type(module).__name__}: {module_text}{location}: "
            f"{type(exc).__name__}: {exc}\n"
            "How to get excitation pullbacks anyway:\n"
            "  * excitation.pullback / pullbacks / ascend take the torch.compile path below by themselves;\n"
            "  * use the torch.compile backend, which handles data-dependent Python control flow:\n"
            "      torch.compile(model, backend=excitation.backend(temp=0.3))\n"
            "  * or trace it yourself with a custom torch.fx.Tracer that treats the failing "
            "submodule as a leaf (override is_leaf_module), and pass the GraphModule to excite();\n"
            "  * or torch.export.export(model, (x,)) and pass the ExportedProgram to excite()."
        ) from exc
    name = module.__class__.__name__
    gm = fx.GraphModule(module, graph, name)
    adopt_module_tree(gm, module)
    return gm


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copied graph and cloned module tree, sharing ``gm``'s tensors.

    The copy keeps the graph's codegen (an exported module's pytree in/out specs).
    """
    root = clone_module_tree(gm)
    graph = fx.Graph(tracer_cls=gm.graph._tracer_cls)
    value, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(value, type_expr=output.type)
    new = fx.GraphModule(root, graph, gm.__class__.__name__)
    adopt_module_tree(new, root)
    return new
