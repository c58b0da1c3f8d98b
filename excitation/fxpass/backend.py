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

import logging
import threading
from typing import Callable, List, Mapping, Optional, Sequence, Set, Union

import torch
from torch import fx

from .dynamo_names import is_dynamo_graph, name_dynamo_nodes
from .lowering import lower
from .report import Report
from .options import Options, TempsSpec, options_from
from .rewrite import excite_graph
from .rules import RulesSpec

_LOG = logging.getLogger("excitation")

__all__ = ["ExcitationBackend", "backend", "excitation_backend"]


class ExcitationBackend:
    """A dynamo backend that rewrites each captured graph, then calls ``inner``.

    Sites of dynamo's graphs are named stably (:mod:`.dynamo_names`): ``report.sites[i].node``
    is a key such as ``"blocks.3.act:relu@57/144"`` that is the same in every compile of
    the model.  A ``temps`` mapping may name a site by that key or by its ``name`` (a site
    module's path); each graph takes the keys it holds (a graph break spreads the sites over
    several graphs), and :attr:`unused_temps` lists the keys no graph has held so far.

    Each graph is then lowered as ``torch.compile(excite(model))`` lowers its compile view
    (:func:`.lowering.lower`, with recompute tags in place of regions): on float32 CPU graphs each
    exact ReLU site's backward becomes one call of its C kernel unless ``inner="eager"``, which
    runs the graph's surrogate calls as they are (they take the eager C kernels already).

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
            # inner="eager" runs the graph as it is: its surrogate ops take the eager C kernels already.
            if lower(gm, mark="tag", c_backward=self.inner != "eager").code_changed:
                gm.recompile()
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
    (:func:`.lowering.lower`) unless ``inner="eager"``.

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
