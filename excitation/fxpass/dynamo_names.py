"""Stable site names for the graphs dynamo captures.

A ``symbolic_trace`` graph covers the whole model once, so its node names are the site
keys (``calibrate`` returns them, ``temps=`` takes them).  Dynamo's graphs are not: a graph
break splits the forward into several graphs, each naming its nodes afresh (``relu``,
``relu_1``, ... in every one of them), and a resume frame inside a submodule records module
paths relative to that submodule (``L['self'].act`` in ``blocks.3`` and in ``blocks.4``).
Keys made of those would collide, or change with the input shape that splits the graphs.

So each node of a dynamo graph gets a key made of what does not change between two
compiles of the same model, nor between two clones of it:

* the **module** that called it, by its path from the compiled frame's ``self`` (the model
  itself for the top frame; a block for a resume frame inside that block);
* the **op** (``relu``, ``gelu``, ``max_pool2d``);
* the **source lines** of the call, outermost frame first (from ``stack_trace``).

For example ``blocks.3.act:relu@57/144``: ``blocks.3.act``'s ``F.relu`` reached from line 57
of the caller and line 144 of ``torch/nn/modules/activation.py``.  A key that still repeats
within one graph (a module called in a Python loop) gets ``#1``, ``#2``, ... in graph order.

Why relative paths in resume frames: dynamo passes a module's parameters to its graphs as
inputs, so the graph of a resume frame inside ``Block.forward`` is compiled once and run for
every block of that class.  Its sites are one site for all those blocks (one temperature,
calibrated on all their inputs), and a key such as ``act:relu@31`` says exactly that, where
the absolute path of the first block would claim one block.
"""

from __future__ import annotations

import re
from typing import Dict

from torch import fx

from .sites import SITE_NODE_META, normalise_path

__all__ = ["name_dynamo_nodes", "is_dynamo_graph"]

_FRAME = re.compile(r'File "[^"]*", line (\d+)')


def is_dynamo_graph(gm: fx.GraphModule) -> bool:
    """Whether dynamo captured ``gm`` (it records a compile id in the graph module's meta)."""
    return "dynamo_compile_id" in getattr(gm, "meta", {})


def _owner(node: fx.Node) -> str:
    """The calling module's path from the frame's ``self`` ("" outside any module)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    relative, _ = list(stack.values())[-1]
    return normalise_path(relative)


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", None) or str(target)


def name_dynamo_nodes(gm: fx.GraphModule) -> int:
    """Give every call node of a dynamo graph its stable key (``SITE_NODE_META``); returns how many.

    Nodes that already carry a key (an earlier pass) keep it.
    """
    seen: Dict[str, int] = {}
    named = 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module") or SITE_NODE_META in node.meta:
            continue
        owner = _owner(node)
        lines = "/".join(_FRAME.findall(node.meta.get("stack_trace") or ""))
        key = f"{owner + ':' if owner else ''}{_op_name(node)}@{lines or node.name}"
        count = seen.get(key, 0)
        seen[key] = count + 1
        node.meta[SITE_NODE_META] = key if count == 0 else f"{key}#{count}"
        named += 1
    return named
