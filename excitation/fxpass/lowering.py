"""One compile lowering: what ``torch.compile`` runs at the ReLU sites of an excited graph.

Two routes bring an excited graph to the compiler:

* ``torch.compile(excite(model))``: dynamo traces the excited graph's compile view
  (:mod:`.compile_view`), a copy of the graph lowered here with ``mark="region"``;
* ``torch.compile(model, backend="excitation")``: the backend excites each graph dynamo hands it
  and lowers it here with ``mark="tag"`` (:mod:`.backend`).

Both take the same steps, over the same site selection:

1. **Sites**: every exact ReLU site: a ``surrogate_relu`` call, or BatchNorm and ReLU together,
   which is the excite pass's ``batch_norm_relu`` (a module's BatchNorm, fused by :mod:`.fusion`)
   or, in dynamo's graphs, a frozen eval-mode ``F.batch_norm`` that feeds the site alone.
2. **Concatenations** of sites that feed nothing else are recomputed with their parts
   (:func:`~excitation.kernels.compiled.compiled_relu_concat` says why).
3. **C backward**: on float32 CPU tensors a site's backward is one call of the C kernels, BatchNorm's
   input gradient and the gate in one pass where a frozen BatchNorm feeds it
   (:mod:`excitation.kernels.compiled` says why; :func:`~excitation.kernels.compiled.c_backward_applies`
   decides, for both routes).
4. **Cheap convolutions** that feed a site whose every user is a max-pool site are recomputed
   (:mod:`excitation.kernels.recompute` says why; :func:`pooled_site_fed_by` selects them, for both routes).

Only how recompute is marked differs.  A graph dynamo has yet to trace gets checkpoint regions
(``"region"``: the compiled kernels open them; a cheap convolution is the excite pass's
:class:`~excitation.kernels.RecomputedConv2d`, chosen with the same selector).  A graph that is
already dynamo's gets the checkpoint policy's tag in ``node.meta`` (``"tag"``), which AOTAutograd
copies onto the ops each node traces to.  The C decision moves with it: a region decides when
dynamo traces it, a tagged graph from the example values dynamo recorded; both ask the same
function.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels import RecomputedConv2d, batch_norm_relu, surrogate_max_pool2d, surrogate_relu
from ..kernels.compiled import (
    batch_norm_relu_with_c_backward,
    c_backward_applies,
    compiled_batch_norm_relu,
    compiled_relu,
    compiled_relu_concat,
    relu_with_c_backward,
)
from ..kernels.fused import batch_norm_relu_pre_activation
from ..kernels.recompute import RECOMPUTE_MAX_MACS, cheap_to_recompute
from .fusion import batch_norm_call
from .sites import SURROGATE_RELU_PARAMS, bind_arguments

__all__ = ["Lowering", "ReluSite", "MARKS", "lower", "relu_sites", "pooled_site_fed_by", "cheap_convolution"]

#: How recompute is marked: checkpoint regions (a graph dynamo will trace) or node tags (one it has traced).
MARKS = ("region", "tag")

_CONCATS = (torch.cat, torch.concat)
_CONV2D = (torch.conv2d, F.conv2d)
_BATCH_NORM_PARAMS = tuple(inspect.signature(F.batch_norm).parameters)
_BATCH_NORM_RELU_PARAMS = tuple(
    (name, None if parameter.default is inspect.Parameter.empty else parameter.default)
    for name, parameter in inspect.signature(batch_norm_relu).parameters.items()
)
# Every form a lowered or unlowered exact ReLU site takes, for the cheap-convolution selector.
_SITE_TARGETS = (surrogate_relu, batch_norm_relu, relu_with_c_backward, batch_norm_relu_with_c_backward)


@dataclass
class ReluSite:
    """An exact ReLU site of a graph, as the lowering sees it.

    ``form`` is ``"relu"`` (a ``surrogate_relu`` call, ``z = input``) or ``"batch_norm_relu"`` (the
    excite pass's fused call, ``z = bn(x) [+ residual]``).  ``batch_norm`` holds the bound arguments
    of a frozen eval-mode ``F.batch_norm`` that feeds a ``"relu"`` site alone (dynamo's graphs only:
    it is read from the example values dynamo records).
    """

    node: fx.Node
    form: str
    arguments: Dict[str, object]
    batch_norm: Optional[Dict[str, object]] = None

    @property
    def temp(self) -> object:
        return self.arguments["temp"]

    @property
    def gate(self) -> object:
        return self.arguments["gate"]


@dataclass
class Lowering:
    """What :func:`lower` did: exact sites found, sites given another function, concatenations, convolutions tagged."""

    sites: int = 0
    retargeted: int = 0
    concatenations: int = 0
    convolutions: int = 0

    @property
    def code_changed(self) -> bool:
        """Whether the graph's code changed (tags alone are meta, no new code)."""
        return bool(self.retargeted)


def _example(value: object) -> object:
    """What dynamo recorded for a graph value (a fake tensor), or the value itself if it is no node."""
    return value.meta.get("example_value") if isinstance(value, fx.Node) else value


def _frozen_eval_batch_norm(z: object) -> Optional[Dict[str, object]]:
    """The bound arguments of ``z`` if it is an eval-mode ``F.batch_norm`` call with frozen parameters and one user."""
    if not (isinstance(z, fx.Node) and z.op == "call_function" and z.target is F.batch_norm and len(z.users) == 1):
        return None
    bound: Dict[str, object] = dict(zip(_BATCH_NORM_PARAMS, z.args))
    bound.update(z.kwargs)
    if bound.get("training", False) is not False or not isinstance(bound.get("eps", 1e-5), (int, float)):
        return None
    tensors = [_example(bound.get(name)) for name in ("running_mean", "running_var", "weight", "bias")]
    if not all(isinstance(t, torch.Tensor) for t in tensors[:2]) or any(
        t is not None and not (isinstance(t, torch.Tensor) and not t.requires_grad) for t in tensors
    ):
        return None
    x = _example(bound["input"])
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        return None
    return bound


def _fed_by_recomputed_convolution(gm: fx.GraphModule, x: object) -> bool:
    return isinstance(x, fx.Node) and x.op == "call_module" and isinstance(gm.get_submodule(x.target),
                                                                           RecomputedConv2d)


def relu_sites(gm: fx.GraphModule, graph: fx.Graph) -> Dict[fx.Node, ReluSite]:
    """Every exact ReLU site of ``graph`` (a graph of ``gm``, or a copy of it), in graph order.

    A fused site fed by a :class:`~excitation.kernels.RecomputedConv2d` is left out: that
    convolution's region must hold the site, or its output is kept at the boundary.
    """
    sites: Dict[fx.Node, ReluSite] = {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is surrogate_relu:
            bound = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
            if bound["saved"] == "exact":
                sites[node] = ReluSite(node, "relu", bound, _frozen_eval_batch_norm(bound["input"]))
        elif node.target is batch_norm_relu:
            bound = bind_arguments(_BATCH_NORM_RELU_PARAMS, node.args, node.kwargs)
            if bound["saved"] == "exact" and not _fed_by_recomputed_convolution(gm, bound["x"]):
                sites[node] = ReluSite(node, "batch_norm_relu", bound)
    return sites


def _concatenation(node: fx.Node) -> Optional[Tuple[List[fx.Node], int]]:
    """``(parts, dim)`` of a ``torch.cat`` / ``torch.concat`` node, else ``None``."""
    if node.op != "call_function" or node.target not in _CONCATS:
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not parts or not isinstance(dim, int) or set(node.kwargs) - {"tensors", "dim"}:
        return None
    return list(parts), dim


def _site_concatenations(graph: fx.Graph, sites: Dict[fx.Node, ReluSite]) -> List[Tuple[fx.Node, List[fx.Node], int]]:
    """Each concatenation whose every part is a site that feeds it alone: ``(node, parts, dim)``."""
    found = []
    for node in graph.nodes:
        concatenation = _concatenation(node)
        if concatenation is not None and all(part in sites and len(part.users) == 1 for part in concatenation[0]):
            found.append((node, *concatenation))
    return found


def cheap_convolution(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` is a 2-D convolution cheap to recompute: an ``nn.Conv2d`` call, or a ``conv2d`` call whose weight dynamo recorded."""
    if node.op == "call_module":
        return cheap_to_recompute(gm.get_submodule(node.target))
    if node.op != "call_function" or node.target not in _CONV2D or len(node.args) < 2:
        return False
    weight = _example(node.args[1]) if isinstance(node.args[1], fx.Node) else None
    return isinstance(weight, torch.Tensor) and weight.dim() == 4 and math.prod(weight.shape[1:]) <= RECOMPUTE_MAX_MACS


def pooled_site_fed_by(gm: fx.GraphModule, conv: fx.Node) -> Optional[List[fx.Node]]:
    """The nodes from ``conv``'s sole user to the ReLU site it alone feeds, if every user of that site is a max-pool site.

    The site may follow ``conv`` directly, through one BatchNorm (a module call or ``F.batch_norm``),
    or fused with it (``batch_norm_relu`` without a residual, which would make ``z`` depend on more
    than ``conv``).  ``None`` if there is no such site.
    """
    chain: List[fx.Node] = []
    previous = conv
    while len(previous.users) == 1:
        (user,) = previous.users
        if user.op not in ("call_function", "call_module") or not user.args or user.args[0] is not previous:
            return None
        chain.append(user)
        if user.op == "call_function" and user.target in _SITE_TARGETS:
            if user.target is batch_norm_relu and len(user.args) > 2 and user.args[2] is not None:
                return None
            pooled = bool(user.users) and all(
                other.op == "call_function" and other.target is surrogate_max_pool2d for other in user.users)
            return chain if pooled else None
        is_batch_norm = (user.op == "call_function" and user.target is F.batch_norm) or batch_norm_call(gm, user)
        if not is_batch_norm or len(chain) > 1:
            return None
        previous = user
    return None


def lower(gm: fx.GraphModule, graph: Optional[fx.Graph] = None, *, mark: str, c_backward: bool = True) -> Lowering:
    """Lower the exact ReLU sites of ``graph`` (``gm.graph`` by default) for ``torch.compile``, in place.

    ``mark="region"``: sites call :func:`~excitation.kernels.compiled.compiled_relu` /
    :func:`~excitation.kernels.compiled.compiled_batch_norm_relu` and site concatenations
    :func:`~excitation.kernels.compiled.compiled_relu_concat`, which open checkpoint regions and
    take the C backward when dynamo traces them.  ``mark="tag"``: sites, their concatenations
    and cheap convolutions get ``meta["recompute"]``, and, with ``c_backward``, float32 CPU
    sites call :func:`~excitation.kernels.compiled.relu_with_c_backward` or, with the frozen
    BatchNorm that feeds them, :func:`~excitation.kernels.compiled.batch_norm_relu_with_c_backward`.
    Values are the same either way.  The caller recompiles ``gm``.
    """
    if mark not in MARKS:
        raise ValueError(f"mark must be one of {MARKS}, got {mark!r}.")
    graph = gm.graph if graph is None else graph
    sites = relu_sites(gm, graph)
    concatenations = _site_concatenations(graph, sites)
    if mark == "region":
        return _lower_in_regions(graph, sites, concatenations)
    return _lower_with_tags(gm, graph, sites, concatenations, c_backward)


def _lower_in_regions(graph: fx.Graph, sites: Dict[fx.Node, ReluSite],
                      concatenations: List[Tuple[fx.Node, List[fx.Node], int]]) -> Lowering:
    done = Lowering(sites=len(sites))
    for node, parts, dim in concatenations:
        grouped = [sites.pop(part) for part in parts]
        with graph.inserting_before(node):
            zs: List[fx.Node] = []
            for site in grouped:
                if site.form == "batch_norm_relu":
                    arguments = site.arguments
                    zs.append(graph.call_function(batch_norm_relu_pre_activation,
                                                  (arguments["x"], arguments["bn"], arguments["residual"])))
                else:
                    zs.append(site.arguments["input"])
            temps = tuple(site.temp for site in grouped)
            gates = tuple(site.gate for site in grouped)
            concat = graph.call_function(compiled_relu_concat, (zs, dim, temps, gates))
        concat.meta = dict(node.meta)
        node.replace_all_uses_with(concat)
        graph.erase_node(node)
        for part in parts:
            graph.erase_node(part)
        done.concatenations += 1
        done.retargeted += 1
    for node, site in sites.items():
        # A functional BatchNorm (site.batch_norm) stays the region's input: the C pass needs a module's buffers.
        node.target = compiled_relu if site.form == "relu" else compiled_batch_norm_relu
        done.retargeted += 1
    return done


def _lower_with_tags(gm: fx.GraphModule, graph: fx.Graph, sites: Dict[fx.Node, ReluSite],
                     concatenations: List[Tuple[fx.Node, List[fx.Node], int]], c_backward: bool) -> Lowering:
    from torch.utils.checkpoint import CheckpointPolicy

    recompute = CheckpointPolicy.PREFER_RECOMPUTE
    done = Lowering(sites=len(sites))
    # The tags carry no region id, so the partitioner keeps no boundary between a concatenation and its parts.
    for node in sites:
        node.meta["recompute"] = recompute
    for node, _, _ in concatenations:
        node.meta["recompute"] = recompute
        done.concatenations += 1
    for node, site in sites.items():
        temp, gate, z = site.temp, site.gate, site.arguments.get("input")
        if not (c_backward and site.form == "relu" and isinstance(temp, (int, float)) and isinstance(gate, str)):
            continue
        if not c_backward_applies(node.meta.get("example_value", _example(z)), gate):
            continue
        bn = site.batch_norm
        if bn is None:
            node.target = relu_with_c_backward
            node.args, node.kwargs = (z, float(temp), gate), {}
        else:
            with graph.inserting_before(node):
                fused = graph.call_function(batch_norm_relu_with_c_backward, (
                    bn["input"], bn.get("weight"), bn.get("bias"), bn["running_mean"], bn["running_var"],
                    float(bn.get("eps", 1e-5)), float(temp), gate))
            fused.meta = dict(node.meta)
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(z)
        done.retargeted += 1
    for node in list(graph.nodes):
        if cheap_convolution(gm, node) and node.op == "call_function":
            chain = pooled_site_fed_by(gm, node)
            if chain is not None:
                for part in (node, *chain):
                    part.meta["recompute"] = recompute
                done.convolutions += 1
    return done
