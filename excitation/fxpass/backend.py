"""The ``torch.compile`` backend: excite the graphs dynamo captures, then hand them on.

dynamo inlines modules, so its graphs hold ``torch.nn.functional.relu``,
``torch.relu_``, ``.relu()`` and ``max_pool2d`` calls rather than ``nn.ReLU``
modules; the same site matcher covers them.  Because dynamo handles Python
control flow that ``symbolic_trace`` cannot (graph breaks, guards), this is
the way to excite models that do not trace.

    compiled = torch.compile(model, backend="excitation")               # defaults
    compiled = torch.compile(model, backend=excitation.backend(temp=0.5, inner="eager"))
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Callable, List, Mapping, Optional, Sequence, Set, Union

import torch
import torch.nn.functional as F
from torch import fx

from ..kernels import surrogate_relu
from ..kernels.compiled import batch_norm_relu_with_c_backward, c_backward_applies, relu_with_c_backward
from .dynamo_names import is_dynamo_graph, name_dynamo_nodes
from .recompute import tag_cheap_convolutions
from .report import Report
from .options import Options, TempsSpec, options_from
from .rewrite import excite_graph
from .rules import RulesSpec
from .sites import SURROGATE_RELU_PARAMS, bind_arguments

_LOG = logging.getLogger("excitation")

__all__ = ["ExcitationBackend", "backend", "excitation_backend", "mark_relu_outputs_for_recompute",
           "use_c_backward"]


class ExcitationBackend:
    """A dynamo backend that rewrites each captured graph, then calls ``inner``.

    Sites of dynamo's graphs are named stably (:mod:`.dynamo_names`): ``report.sites[i].node``
    is a key such as ``"blocks.3.act:relu@57/144"`` that is the same in every compile of
    the model.  A ``temps`` mapping may name a site by that key or by its ``name`` (a site
    module's path); each graph takes the keys it holds (a graph break spreads the sites over
    several graphs), and :attr:`unused_temps` lists the keys no graph has held so far.

    On float32 CPU graphs each exact ReLU site's backward becomes one call of its C kernel
    (:func:`use_c_backward`) unless ``inner="eager"``, which runs the graph's surrogate calls as
    they are (they take the eager C kernels already).

    Attributes
    ----------
    reports : list of Report
        One per graph dynamo compiled with this backend (a graph break gives several).
    """

    def __init__(
        self,
        *,
        options: Optional[Options] = None,
        preset: Optional[str] = None,
        temp: Optional[float] = None,
        pool_temp: Optional[float] = None,
        gate: Optional[str] = None,
        pool_backward: Optional[str] = None,
        temps: TempsSpec = None,
        rules: RulesSpec = None,
        saved: str = "exact",
        inner: Union[str, Callable] = "inductor",
    ) -> None:
        #: The pass's options (:class:`~excitation.Options`); BatchNorm fusion is the compiler's here.
        self.options = options_from(options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                                    pool_backward=pool_backward, temps=temps, rules=rules, saved=saved)
        self.preset, self.temp, self.pool_temp = self.options.preset, self.options.temp, self.options.pool_temp
        self.gate, self.pool_backward, self.saved = self.options.gate, self.options.pool_backward, self.options.saved
        self.temps = self.options.temps_spec
        self._used_temps: Set[str] = set()
        # Used by hand, the backend cannot know which graph is the last: it says once that keys are
        # unused so far.  CompiledExcited knows when a call ends and checks there instead.
        self.warn_unused_temps = True
        self._warned_unused = False
        if not (isinstance(inner, str) or callable(inner)):
            raise TypeError(f"inner must be a backend name such as 'inductor' or 'eager', or a callable; got {inner!r}.")
        self.inner = inner
        self.reports: List[Report] = []
        self._lock = threading.Lock()

    def _inner_backend(self) -> Callable:
        if callable(self.inner):
            return self.inner
        from torch._dynamo.backends.registry import lookup_backend

        if self.inner == "excitation":
            raise ValueError("inner='excitation' would excite twice; use 'inductor', 'aot_eager' or 'eager'.")
        return lookup_backend(self.inner)

    @property
    def unused_temps(self) -> List[str]:
        """Keys of a ``temps`` mapping that no compiled graph has held so far (empty for other ``temps``)."""
        if not isinstance(self.temps, Mapping):
            return []
        return [key for key in self.temps if key not in self._used_temps]

    def _graph_temps(self) -> TempsSpec:
        """``temps`` as one graph applies it: a mapping becomes a look-up that notes which keys it used."""
        if not isinstance(self.temps, Mapping):
            return self.temps
        mapping = self.temps

        def chosen(site) -> Optional[float]:
            # A node key is more specific than a module path (a reused module has one path, many nodes).
            for key in (site.node, site.name):
                if key in mapping:
                    with self._lock:
                        self._used_temps.add(key)
                    return mapping[key]
            return None

        return chosen

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
        if is_dynamo_graph(gm):
            name_dynamo_nodes(gm)
        result = excite_graph(gm, options=self.options.replace(temps=self._graph_temps()))
        if self.saved == "exact":
            mark_relu_outputs_for_recompute(gm)
            # inner="eager" runs the graph as it is: its surrogate ops take the eager C kernels already.
            if self.inner != "eager" and use_c_backward(gm):
                gm.recompile()
            tag_cheap_convolutions(gm)  # after the sites take their final form; tags are meta, no new code
        with self._lock:
            self.reports.append(result)
            unused = self.unused_temps
            if unused and self.warn_unused_temps and not self._warned_unused:
                self._warned_unused = True
                _LOG.warning("excitation.backend: %d temps keys name no site of the %d graph(s) compiled so far "
                             "(a later graph may hold them; backend.unused_temps lists them): %s", len(unused),
                             len(self.reports), ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else ""))
        return self._inner_backend()(gm, example_inputs)

    def __repr__(self) -> str:
        return (f"excitation.backend(preset={self.preset!r}, temp={self.temp}, pool_temp={self.pool_temp}, "
                f"gate={self.gate!r}, pool_backward={self.pool_backward!r}, inner={self.inner!r})")


def mark_relu_outputs_for_recompute(gm: fx.GraphModule) -> int:
    """Tag each exact surrogate ReLU so AOTAutograd's partitioner recomputes ``relu(z)`` in the backward.

    The graph then keeps ``z`` alone, where it would keep ``z`` and ``relu(z)`` (a
    convolution's backward reads its input even for an input gradient only), so compiled
    saved bytes come close to vanilla's (measured in docs/design-measurements.md).  This is what
    the checkpoint in :func:`excitation.kernels.surrogate_relu` does for graphs dynamo
    traces; a backend sees the graph after dynamo, so it writes the checkpoint policy's tag
    directly (AOTAutograd copies ``meta["recompute"]`` onto the ops each node traces to).
    A ``torch.cat`` of tagged ReLUs that feed nothing else is tagged too, as the compile view
    groups them (:func:`excitation.kernels.compiled.compiled_relu_concat` says why); the tags
    carry no region id, so no boundary between them is kept.  Returns the number of nodes tagged.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    tagged = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is surrogate_relu and node.kwargs.get("saved", "exact") == "exact":
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            tagged += 1
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat) or not node.args:
            continue
        parts = node.args[0]
        if isinstance(parts, (list, tuple)) and parts and all(
            isinstance(part, fx.Node) and part.meta.get("recompute") is CheckpointPolicy.PREFER_RECOMPUTE
            and len(part.users) == 1 for part in parts
        ):
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            tagged += 1
    return tagged


_BATCH_NORM_PARAMS = tuple(inspect.signature(F.batch_norm).parameters)


def _example(value: object) -> object:
    """What dynamo recorded for a graph value (a fake tensor), or the value itself if it is no node."""
    return value.meta.get("example_value") if isinstance(value, fx.Node) else value


def _frozen_eval_batch_norm(z: object) -> Optional[dict]:
    """The arguments of ``z`` if it is an eval-mode ``F.batch_norm`` call with frozen parameters and one user."""
    if not (isinstance(z, fx.Node) and z.op == "call_function" and z.target is F.batch_norm and len(z.users) == 1):
        return None
    bound = dict(zip(_BATCH_NORM_PARAMS, z.args))
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


def use_c_backward(gm: fx.GraphModule) -> int:
    """Give each exact ReLU site of a float32 CPU graph the C kernels' backward, as the compile view does.

    ``torch.compile(excite(model))`` gets them through the compile view: Inductor's own loop for
    the excitation gate is compute-bound on the CPU (a Sleef exponential and a division per
    element), the C kernel is not.  Here a site calls
    :func:`~excitation.kernels.compiled.relu_with_c_backward`, and a site fed by a frozen
    eval-mode ``F.batch_norm`` alone calls
    :func:`~excitation.kernels.compiled.batch_norm_relu_with_c_backward` in place of both (one C
    pass for the gate and BatchNorm's input gradient).  Which sites qualify is read from the
    example values dynamo records on each node (``meta["example_value"]``): a site without
    one, on another device or dtype, or with a gate the kernels lack keeps ``surrogate_relu``.
    Values are the same either way.  Call it after :func:`mark_relu_outputs_for_recompute`:
    the new nodes keep the site's recompute tag.  Returns the number of sites changed; the
    caller recompiles ``gm``.
    """
    changed = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not surrogate_relu:
            continue
        site = bind_arguments(SURROGATE_RELU_PARAMS, node.args, node.kwargs)
        temp, gate, z = site["temp"], site["gate"], site["input"]
        if site["saved"] != "exact" or not isinstance(temp, (int, float)) or not isinstance(gate, str):
            continue
        if not c_backward_applies(node.meta.get("example_value", _example(z)), gate):
            continue
        bn = _frozen_eval_batch_norm(z)
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
        changed += 1
    return changed


def backend(
    *,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    saved: str = "exact",
    inner: Union[str, Callable] = "inductor",
) -> ExcitationBackend:
    """A ``torch.compile`` backend with these options: ``torch.compile(model, backend=excitation.backend(...))``.

    ``temps`` keys are the stable site keys of dynamo's graphs or module paths (see
    :class:`ExcitationBackend`; ``calibrate`` returns them for models on the dynamo path).  ``inner``
    is the backend that compiles the excited graph (``"inductor"``,
    ``"aot_eager"``, ``"eager"`` or any callable backend).  ``preset``, ``pool_backward``, ``rules`` and
    ``saved`` as in :func:`excitation.excite`.  Float32 CPU ReLU sites get the C kernels' backward
    (:func:`use_c_backward`) unless ``inner="eager"``.

    Parameters
    ----------
    options, preset, temp, pool_temp, gate, pool_backward, rules, saved
        As for :func:`excitation.excite`.
    temps : mapping or callable, optional
        Per-site temperatures keyed by dynamo site keys or module paths (what
        :func:`excitation.calibrate` returns for a model on the dynamo path).
    inner : str or callable
        The backend that compiles each excited graph: ``"inductor"`` (default), ``"aot_eager"``,
        ``"eager"`` (the rewritten graph as it is, forward bit for bit) or any callable backend.

    Returns
    -------
    ExcitationBackend
        A callable ``(GraphModule, example_inputs) -> compiled`` for ``torch.compile(backend=...)``.

    Raises
    ------
    ValueError
        Bad options (checked when the backend is created, not at the first compile).

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> compiled = torch.compile(net, backend=excitation.backend(temp=0.5, inner="eager"))
    >>> x = torch.rand(2, 4, requires_grad=True)
    >>> compiled(x)[:, 0].sum().backward()  # the backward is the excitation pullback
    >>> x.grad.shape
    torch.Size([2, 4])
    """
    return ExcitationBackend(options=options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                             pool_backward=pool_backward, temps=temps, rules=rules, saved=saved, inner=inner)


def excitation_backend(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]):
    """The backend registered as ``"excitation"`` (entry point ``torch_dynamo_backends``): default options."""
    return ExcitationBackend()(gm, example_inputs)
