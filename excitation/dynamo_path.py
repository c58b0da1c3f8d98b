"""The automatic ``torch.compile`` path for models that ``torch.fx.symbolic_trace`` cannot trace.

:func:`excitation.pullback`, :func:`~excitation.pullbacks` and :func:`~excitation.ascend`
first try the fx pass.  When tracing fails (data-dependent control flow such as
``if x.sum() > 0:``, as in a fifth of timm's model modules) they fall back, by
themselves, to dynamo: a clone of the model's module tree is compiled with the
:func:`excitation.backend` (inner backend ``"eager"`` by default: dynamo's graph, rewritten,
runs as it is, so nothing is re-traced and the forward is the model's own, bit for bit).

Guarantees of this path (each checked at run time, not only promised):

* **no silent vanilla.**  Each compiled graph is wrapped so that its run counts
  the activation sites it holds (rewritten or reported unhandled) and its norm and softmax calls.  After every call
  that compiled a new graph, the model is also run once eagerly under a
  ``TorchFunctionMode`` that counts every activation-like, norm and softmax call; if it saw more than
  the graphs account for, some activation ran outside dynamo's graphs (with a
  vanilla backward) and :class:`~excitation.errors.ExcitationError` is raised.
* **forward equals the model's.**  The same eager run gives the plain output; the
  largest difference is kept in :attr:`CompiledExcited.forward_max_diff` and a
  mismatch is logged as a warning.
* **the original model is untouched.**  The compiled module is a clone of the module
  tree (own module objects and flags, shared tensors); nothing writes to the tensors.
* **temps land where they are meant to.**  Sites are named stably across graphs and
  compiles (:mod:`excitation.fxpass.dynamo_names`), so ``calibrate(model, ...)`` on this path
  returns keys that ``pullback(model, ..., temps=...)`` applies.  A ``temps`` mapping none of
  whose keys any graph holds raises ``ValueError``; keys still unused after a call (sites of
  branches this input did not take, or typos) are logged once (a warning for keys that are
  not dynamo site keys, which may be typos).
* **compiled once per shape.**  :func:`excitation.api.prepare` caches the wrapper per
  model and options; dynamo's guards reuse its graphs, so repeated calls at a fixed
  shape do not recompile (:attr:`CompiledExcited.compiles` counts the graphs).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor, fx
from torch.overrides import TorchFunctionMode

from .errors import ExcitationError, with_suggestions
from .fxpass.backend import ExcitationBackend
from .fxpass.report import Report
from .fxpass.options import Options, TempsSpec
from .fxpass.rules import RulesSpec
from .fxpass.sites import ACTIVATION_CALL_NAMES
from .fxpass.tracing import clone_module_tree
from .spec import ACTIVATIONS

__all__ = ["CompiledExcited", "ACTIVATION_FUNCTIONS", "NORM_SOFTMAX_FUNCTIONS", "DEFAULT_INNER",
           "count_activation_calls"]

log = logging.getLogger("excitation")

#: Recompilations allowed per frame on this path (dynamo's own default is 8).
RECOMPILE_LIMIT = 64

#: The inner backend of the automatic dynamo path: ``"eager"`` runs dynamo's (rewritten) torch-level
#: graph as it is, so the forward is the model's bit for bit.  ``"aot_eager"`` re-traces it to ATen
#: and reorders a few reductions (cpubone_nano, qwen3_vit: forward off by ~7e-7), and its
#: compiled backward costs more, on the first call and after (measured in docs/design-measurements.md).
DEFAULT_INNER = "eager"

def _collect(names: Sequence[str]) -> frozenset:
    found = set()
    for owner in (F, torch, torch.Tensor, torch._C._nn):
        for name in names:
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
    return frozenset(found)


#: Callables counted as one activation call each by :func:`count_activation_calls`.
ACTIVATION_FUNCTIONS = _collect(sorted(ACTIVATION_CALL_NAMES))
#: Norm and softmax callables, counted too: a LayerNorm, RMSNorm or attention softmax run outside
#: dynamo's graphs would keep its vanilla backward as silently as an activation.  A graph counts its
#: calls of them before it is excited (a softmax that feeds no matmul is a call, not a site).
NORM_SOFTMAX_FUNCTIONS = _collect(["layer_norm", "rms_norm", "softmax", "scaled_dot_product_attention"])
# The sites and unhandled ops of a report that are element-wise activations or max-pools.
# timm's hard_mish is no torch call but an expression around one ``clamp(0, 2)``: the eager count
# counts clamps with a constant floor 0 (each such clamp in a graph is a hard_mish site or an
# unhandled ``clamp``, so both sides count it once).
_COUNTED_KINDS = frozenset(spec.kind for spec in ACTIVATIONS)
_CLAMPS = frozenset({torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip, torch.Tensor.clamp_,
                     torch.Tensor.clip_})


def _is_zero_floor_clamp_call(args: Sequence[Any], kwargs: Dict[str, Any]) -> bool:
    """``clamp(x, 0, hi)`` / ``x.clamp(min=0, ...)`` with constant bounds, as ``fxpass.sites`` matches it in graphs."""
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        return False  # an index clamp (gemma4's position_ids.clamp(min=0)), as fxpass.sites skips it
    if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
        return False  # no gradient flows through it (SigLIP 2's interpolation weights), as fxpass.sites skips it
    low = args[1] if len(args) > 1 else kwargs.get("min")
    high = args[2] if len(args) > 2 else kwargs.get("max")
    constant = (int, float)
    return isinstance(low, constant) and not isinstance(low, bool) and low == 0 and \
        (high is None or isinstance(high, constant))


class _ActivationCounter(TorchFunctionMode):
    """Counts the outermost activation-like torch calls (nested calls run with the mode off)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in ACTIVATION_FUNCTIONS or func in NORM_SOFTMAX_FUNCTIONS or (
                func in _CLAMPS and _is_zero_floor_clamp_call(args, kwargs or {})):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_activation_calls(module: nn.Module, *args: Any) -> "tuple[int, Any]":
    """Run ``module(*args)`` eagerly and count its activation-like calls: ``(count, output)``.

    Grad mode stays as the caller has it, so which tensors require grad is what dynamo saw when it
    traced the same call (a clamp through which no gradient flows is not counted, on either side).
    """
    counter = _ActivationCounter()
    with counter:
        out = module(*args)
    return counter.count, out


def _graph_activation_count(result: Report) -> int:
    """Activation sites in one excited graph: rewritten (of a counted kind) plus left alone."""
    rewritten = sum(site.kind in _COUNTED_KINDS for site in result.sites)
    return rewritten + len(result.unhandled)


def _norm_softmax_calls(gm: fx.GraphModule) -> int:
    """Calls of :data:`NORM_SOFTMAX_FUNCTIONS` in a graph as dynamo captured it (``.softmax()`` methods too)."""
    found = 0
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "softmax":
            found += 1
        elif node.op == "call_function":
            try:
                found += node.target in NORM_SOFTMAX_FUNCTIONS
            except TypeError:  # unhashable target
                pass
    return found


class _CountingBackend:
    """Wraps an :class:`ExcitationBackend` so that each compiled graph counts its sites when it runs."""

    def __init__(self, inner: ExcitationBackend) -> None:
        self.inner = inner
        self.executed = 0
        self._lock = threading.Lock()

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Tensor]) -> Callable:
        calls = _norm_softmax_calls(gm)  # before the backend rewrites the graph in place
        compiled = self.inner(gm, example_inputs)
        sites = _graph_activation_count(self.inner.reports[-1]) + calls

        @functools.wraps(compiled)  # keeps attributes such as _boxed_call
        def run(*args: Any, **kwargs: Any) -> Any:
            self.executed += sites
            return compiled(*args, **kwargs)

        return run


class CompiledExcited(nn.Module):
    """A model excited through dynamo: ``forward`` runs the compiled, excited clone.

    Built by :func:`excitation.prepare` when ``symbolic_trace`` fails; use it like the
    fx-excited module (``pullback(prepared, x, t)`` works too).

    Attributes
    ----------
    excitation_path : str
        ``"dynamo"`` (an fx-excited module from :func:`~excitation.prepare` says ``"fx"``).
    trace_error : str
        Why the fx pass could not trace the model (first line of its error).
    backend : ExcitationBackend
        The backend used; ``backend.reports`` holds one report per compiled graph.
    forward_max_diff : float
        Largest ``|compiled - eager|`` of the plain forward seen in the checked calls (0.0: bit-equal).
    """

    excitation_path = "dynamo"

    def __init__(
        self,
        model: nn.Module,
        *,
        trace_error: str = "",
        options: Optional[Options] = None,
        preset: Optional[str] = None,
        temp: Optional[float] = None,
        pool_temp: Optional[float] = None,
        gate: Optional[str] = None,
        pool_backward: Optional[str] = None,
        temps: TempsSpec = None,
        rules: RulesSpec = None,
        inner: Any = DEFAULT_INNER,
    ) -> None:
        super().__init__()
        self.model = clone_module_tree(model)
        self.model.eval()
        self.trace_error = trace_error
        self.backend = ExcitationBackend(options=options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                                         pool_backward=pool_backward, temps=temps, rules=rules, inner=inner)
        self.backend.warn_unused_temps = False  # _check_temps() checks after each call instead
        counting = _CountingBackend(self.backend)
        # Not a registered submodule: parameters() and modules() see the clone once.
        self.__dict__["_counting"] = counting
        self.__dict__["_compiled"] = torch.compile(self.model, backend=counting)
        self.__dict__["_check_lock"] = threading.Lock()
        self.forward_max_diff = 0.0
        self._checked_compiles = 0
        self._warned_unused = False

    @property
    def compiles(self) -> int:
        """How many graphs dynamo compiled so far (a graph break or a new shape adds some)."""
        return len(self.backend.reports)

    def report(self) -> Report:
        """One report over every compiled graph (sites and unhandled ops of all of them)."""
        reports = self.backend.reports
        merged = Report(temp=self.backend.temp, pool_temp=self.backend.pool_temp, gate=self.backend.gate,
                        saved=self.backend.saved, preset=self.backend.preset, pool_backward=self.backend.pool_backward)
        for part in reports:
            merged.sites.extend(part.sites)
            merged.unhandled.extend(part.unhandled)
            merged.smooth.extend(part.smooth)
            merged.rules.update(part.rules)
        return merged

    def forward(self, *args: Any) -> Any:
        counting: _CountingBackend = self._counting
        before_compiles = self.compiles
        before = counting.executed
        # Past the recompile limit dynamo would run the frame eagerly, with vanilla backwards:
        # a higher limit for this model, and an error rather than that silent fallback.
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            try:
                out = self._compiled(*args)
            except Exception as exc:
                if "recompile_limit" in str(exc) or "cache_size_limit" in str(exc):
                    raise ExcitationError(
                        f"dynamo recompiled {type(self.model).__name__} past its limit ({RECOMPILE_LIMIT}); "
                        f"its frames would run eagerly with vanilla backwards.  Call pullback() with fewer "
                        f"input shapes, or excitation.clear_cache() and torch._dynamo.reset() between models."
                    ) from exc
                raise
        executed = counting.executed - before
        if self.compiles != before_compiles or self._checked_compiles == 0:
            self._check(args, out, executed)
            self._check_temps()
        return out

    def _check_temps(self) -> None:
        """A ``temps`` mapping must name sites of these graphs: none at all is an error, some unused a warning."""
        unused = self.backend.unused_temps
        if not unused:
            return
        if len(unused) == len(self.backend.temps):
            known = sorted({key for part in self.backend.reports for site in part.sites if site.temp is not None
                            for key in (site.node, site.name)})
            raise ValueError(
                f"temps names no site of {type(self.model).__name__}'s compiled graphs: "
                f"{with_suggestions(unused, known)}.  On the dynamo path sites are keyed like "
                f"'blocks.3.act:relu@57/144' (excitation.calibrate returns such keys) or by module path; "
                f"see prepare(model).report().sites."
            )
        if not self._warned_unused:
            self._warned_unused = True
            # Keys in the dynamo format come from calibrate() or a report of this model: unused ones are most
            # likely sites of a branch these inputs did not take (INFO).  Other keys may be typos (WARNING).
            typed = [key for key in unused if "@" not in key]
            level = logging.WARNING if typed else logging.INFO
            log.log(level, "excitation: %d temps keys name no site compiled so far for %s (sites of branches "
                    "these inputs did not take, or wrong keys): %s", len(unused), type(self.model).__name__,
                    ", ".join((typed or unused)[:5]) + (" ..." if len(unused) > 5 else ""))

    def _check(self, args: Sequence[Any], out: Any, executed: int) -> None:
        """After a call that compiled something: no activation ran outside the graphs; forward equal."""
        with self._check_lock:
            eager_count, eager_out = count_activation_calls(self.model, *args)
            if eager_count > executed:
                raise ExcitationError(
                    f"{type(self.model).__name__}: {eager_count} activation, norm and softmax calls ran, but the graphs dynamo "
                    f"captured hold only {executed}; {eager_count - executed} ran outside them and would keep a "
                    f"vanilla backward.  Make the code around them traceable by dynamo (no skipped frames), "
                    f"or excite an fx-traceable version of the model."
                )
            if isinstance(out, Tensor) and isinstance(eager_out, Tensor):
                diff = float((out.detach() - eager_out.detach()).abs().max()) if out.numel() else 0.0
                self.forward_max_diff = max(self.forward_max_diff, diff)
                if diff != 0.0:
                    log.warning("excitation: dynamo path forward of %s differs from eager by %.3g",
                                type(self.model).__name__, diff)
            self._checked_compiles = self.compiles

    def __repr__(self) -> str:
        return f"CompiledExcited({type(self.model).__name__}, {self.backend!r}, compiles={self.compiles})"
