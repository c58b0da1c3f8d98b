"""Which implementation each site of a model runs: the dispatch table (:mod:`excitation.kernels.dispatch`), asked per site."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor, fx

from .api import prepare
from .fxpass.rewrite import report as site_report
from .fxpass.sites import SITE_NODE_META
from .kernels import native
from .kernels.compiled import c_backward_applies
from .kernels.dispatch import (
    RUNTIMES,
    activation_backward_path,
    forward_mechanism,
    functional_runtime,
    pool2d_backward_path,
    relu_backward_path,
    triton_available,
)
from .spec import SPECS

__all__ = ["SiteDispatch", "explain_dispatch"]


@dataclass(frozen=True)
class SiteDispatch:
    """What one site of an excited model runs under one runtime.

    Attributes
    ----------
    name : str
        The site's name (``Site.name``).
    kind : str
        Its kind (``Site.kind``).
    forward : str
        The forward's mechanism (:func:`forward_mechanism`).
    backward : str
        The backward's implementation, or ``"autograd"`` for rules whose backward is torch's own
        on constant statistics or weights (LayerNorm, attention).
    """

    name: str
    kind: str
    forward: str
    backward: str


def explain_dispatch(model: torch.nn.Module, x: Tensor, *, runtime: str = "eager") -> List[SiteDispatch]:
    """Which implementation each site of ``model`` runs for input ``x`` under ``runtime``.

    ``model`` is prepared as :func:`excitation.pullback` prepares it (fx, or the dynamo path for
    models fx cannot trace); one forward with ``x`` records each site's input device and dtype
    (nothing is run backward).  ``runtime`` is one of :data:`RUNTIMES`; ``"eager"`` is what
    ``pullback`` runs, ``"dynamo"`` what ``torch.compile`` of the excited model runs (its float32 CPU
    ReLU sites are retargeted to the C backward when the graph is compiled: ``"c (compiled)"``).

    Returns
    -------
    list of SiteDispatch
        One per site of the prepared model, in its report's order.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> [(d.kind, d.forward, d.backward) for d in excitation.explain_dispatch(net, torch.rand(2, 4))]
    [('relu', 'eager', 'c')]
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not known; use one of {', '.join(RUNTIMES)}.")
    prepared = prepare(model)
    inputs = _site_inputs(prepared, x)
    triton = triton_available() if torch.cuda.is_available() else False
    explained = []
    found = site_report(prepared)
    for site in found.sites:
        z = inputs.get(site.node)
        device = z.device.type if z is not None else x.device.type
        dtype = z.dtype if z is not None else x.dtype
        c_ready = device == "cpu" and dtype == torch.float32 and native.available()
        forward = forward_mechanism(runtime)
        if site.kind == "relu":
            if forward == "eager" and site.fused:
                forward = "eager (BatchNorm fused)"
            backward = relu_backward_path(runtime, device, site.gate or "sigmoid", c_ready, triton=triton)
            example = z if z is not None else torch.empty(0, dtype=dtype, device=device)
            exact = found.saved == "exact" or site.fused is not None
            if runtime == "dynamo" and exact and c_backward_applies(example, site.gate or "sigmoid"):
                # Compiled graphs retarget such sites when they are compiled (fxpass/lowering.py).
                backward = "c (compiled)"
        elif site.kind == "max_pool2d":
            backward = pool2d_backward_path(runtime, device, c_ready, triton=triton)
        elif site.kind.startswith(("max_pool", "adaptive_max_pool")):
            backward = "torch_functional" if functional_runtime(runtime, False) else "torch"
        elif site.rule in ("layer_norm", "attention"):
            backward = "autograd"
        else:
            spec = SPECS.get(site.kind)
            relu_gate = spec.relu_gate if spec is not None else None
            backward = activation_backward_path(runtime, device, dtype, site.kind, relu_gate, c_ready, triton=triton)
        explained.append(SiteDispatch(site.name, site.kind, forward, backward))
    return explained


def _site_inputs(prepared: torch.nn.Module, x: Tensor) -> Dict[str, Tensor]:
    """``{site node: example of its input}`` from one forward of an fx-prepared model (empty for the dynamo path)."""
    if not isinstance(prepared, fx.GraphModule):
        return {}
    found: Dict[str, Tensor] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> object:
            result = super().run_node(node)
            key = node.meta.get(SITE_NODE_META)
            if key is not None and node.op in ("call_function", "call_module"):
                first = self.env.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
                example = first if isinstance(first, Tensor) else result
                if isinstance(example, Tensor):
                    found[key] = example
            return result

    with torch.no_grad():
        _Recorder(prepared).run(x)
    return found
