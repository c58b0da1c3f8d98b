"""Per-site temperatures from the pre-activation statistics of real inputs.

One temperature for every neuron ignores that layers see pre-activations of
very different scales.  :func:`calibrate` measures a robust scale of each
site's input on real batches and sets ``temp = scale_factor * robust_std``,
where ``robust_std = 1.4826 * median(|z - median(z)|)`` (equal to the standard
deviation for Gaussian data).  A BatchNorm'd layer with unit-variance
pre-activations thus lands on the published 0.3.  Max-pool sites use the
scale of their positive inputs (see ``_Recorder``).  Rules with their own
published temperature scale it instead of ``scale_factor``: SiLU, Mish, Hardswish and
hard_mish get ``1.6 * robust_std``, GELU ``1.0 * robust_std``, so unit-variance inputs keep
the published defaults.  LayerNorm, RMSNorm and attention sites have no temperature.

Models that ``symbolic_trace`` cannot trace are calibrated on the dynamo path, like
:func:`~excitation.pullback` runs them: a clone is compiled with the excitation backend and
each excited graph runs under the recorder instead of as compiled code.  The keys are then
the stable dynamo site keys (:mod:`~excitation.fxpass.dynamo_names`), which ``pullback(...,
temps=...)`` on the same model applies; sites of a branch no batch took get no key (and keep
the default temperature).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor, fx

from .api import check_input, prepare
from .fxpass.options import Options
from .fxpass.rules import RULES
from .kernels.compiled import batch_norm_relu_with_c_backward
from .kernels.fused import batch_norm_relu, batch_norm_relu_pre_activation
from .fxpass.sites import SITE_NODE_META, surrogate_rule
from .fxpass.tracing import TRACE_GATE
from .gates import check_temp

__all__ = ["calibrate", "robust_std"]

_MAD_TO_STD = 1.4826


def robust_std(values: Tensor) -> Tensor:
    """``1.4826 * median(|v - median(v)|)`` over the last dimension."""
    centre = values.median(dim=-1, keepdim=True).values
    return _MAD_TO_STD * (values - centre).abs().median(dim=-1).values


class _Recorder(fx.Interpreter):
    """Runs the excited graph and keeps a bounded sample of every site's input."""

    def __init__(self, gm: fx.GraphModule, max_samples: int, generator: torch.Generator,
                 samples: Optional[Dict[str, List[Tensor]]] = None, rules: Optional[Dict[str, str]] = None) -> None:
        super().__init__(gm)
        self.max_samples = max_samples
        self.generator = generator
        # Shared between the recorders of several graphs (the dynamo path: one per graph).
        self.samples: Dict[str, List[Tensor]] = {} if samples is None else samples
        self.rules: Dict[str, str] = {} if rules is None else rules

    def call_function(self, target, args, kwargs):
        rule = surrogate_rule(target)
        if rule is not None and RULES[rule].default_temp is not None:
            z = _pre_activation(target, args).detach()
            flat = z.reshape(1, -1)
            self.rules[self.current_node.meta[SITE_NODE_META]] = rule
            if rule == "max_pool":
                # Pools usually follow a ReLU: over half their inputs are 0 and the
                # median deviation vanishes.  The spread of the active values is the scale.
                active = flat[flat > 0]
                flat = active.reshape(1, -1) if active.numel() else flat
            if flat.shape[1] > self.max_samples:
                keep = torch.randperm(flat.shape[1], generator=self.generator)[: self.max_samples].to(flat.device)
                flat = flat[:, keep]
            self.samples.setdefault(self.current_node.meta[SITE_NODE_META], []).append(flat.float().cpu())
        return super().call_function(target, args, kwargs)

    def run_node(self, n):
        self.current_node = n
        return super().run_node(n)


def _pre_activation(target: Callable, args: Sequence) -> Tensor:
    """A site's pre-activation: its input, or what a fused BatchNorm -> ReLU site computes inside."""
    if target is batch_norm_relu:
        return batch_norm_relu_pre_activation(*args[:3])
    if target is batch_norm_relu_with_c_backward:  # the backend's lowering: (x, weight, bias, mean, var, eps, ...)
        x, weight, bias, running_mean, running_var, eps = args[:6]
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    return args[0]


class _DynamoRecorder:
    """The recorder for the dynamo path: every graph dynamo captures is excited, then run by a :class:`_Recorder`.

    Its own compiled clone (the backend's inner step is the recorder, not the graph's code), so
    the cached :func:`~excitation.prepare` module keeps its compiled graphs.
    """

    def __init__(self, model: nn.Module, trace_error: str, max_samples: int, generator: torch.Generator,
                 options: Optional[Options] = None) -> None:
        from .dynamo_path import CompiledExcited

        self.samples: Dict[str, List[Tensor]] = {}
        self.rules: Dict[str, str] = {}
        self.max_samples, self.generator = max_samples, generator
        self.compiled = CompiledExcited(model, trace_error=trace_error, options=options, inner=self._record)

    def _record(self, gm: fx.GraphModule, example_inputs: Sequence[Tensor]) -> Callable:
        recorder = _Recorder(gm, self.max_samples, self.generator, self.samples, self.rules)
        return lambda *args: recorder.run(*args)

    def run(self, batch: Tensor) -> None:
        self.compiled(batch)


def calibrate(
    model: nn.Module,
    batches: Union[Tensor, Iterable[Tensor]],
    *,
    scale_factor: float = 0.3,
    max_samples: int = 100_000,
    min_temp: float = 1e-4,
    progress: bool = True,
    options: Optional[Options] = None,
) -> Dict[str, float]:
    """Per-site temperatures for ``excite(model, temps=...)`` from real inputs.

    Parameters
    ----------
    model : nn.Module
        A plain or excited model (never modified; run in eval mode).
    batches : Tensor or iterable of Tensors
        Input batches (a single batch is fine).
    scale_factor : float
        ``temp = scale_factor * robust_std(site input)`` at ReLU, ReLU6/Hardtanh, LeakyReLU,
        RReLU, Threshold, PReLU, ELU/CELU/SELU, Hardsigmoid and max-pool sites; 0.3 puts
        unit-variance (BatchNorm'd) pre-activations at the published temperature.  SiLU, Mish,
        Hardswish, hard_mish (1.6) and GELU (1.0) sites use their rule's default instead.
    max_samples : int
        Values kept per site and batch (a random subsample) to bound memory.
    min_temp : float
        Floor for sites whose inputs barely vary (e.g. constant channels).
    progress : bool
        Show a progress bar over the batches.
    options : excitation.Options, optional
        The options whose sites are calibrated (which rules apply); the default ones if omitted.

    Returns
    -------
    dict
        ``{site key: temp}``, the keys of ``excitation.report(...).sites[i].node``: fx node
        names, or on the dynamo path (models fx cannot trace) the stable dynamo site keys,
        as ``prepare(model).report().sites[i].node`` shows them.

    Raises
    ------
    ValueError
        ``batches`` is empty, a batch is not a valid input (integer dtype, empty, wrong device),
        or ``scale_factor`` / ``min_temp`` is not a finite positive number.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> temps = excitation.calibrate(net, torch.randn(64, 4), progress=False)
    >>> sorted(temps)
    ['_1']
    >>> pb = excitation.pullback(net, torch.randn(2, 4), target=0, temps=temps)
    """
    scale_factor = check_temp(scale_factor, argument="scale_factor")
    min_temp = check_temp(min_temp, argument="min_temp")
    excited = prepare(model, excited=True, options=options)
    if isinstance(batches, Tensor):
        batches = [batches]
    generator = torch.Generator().manual_seed(0)
    if getattr(excited, "excitation_path", None) == "dynamo":
        recorder: Union[_Recorder, _DynamoRecorder] = _DynamoRecorder(model, excited.trace_error, max_samples,
                                                                       generator, options)
    else:
        recorder = _Recorder(excited, max_samples, generator)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="calibrate", unit="batch", leave=False)
    seen = 0
    training = excited.training
    excited.eval()
    try:
        with torch.no_grad():
            for batch in iterator:
                batch = check_input(excited, batch, argument="batch")
                if isinstance(recorder, _DynamoRecorder):
                    recorder.run(batch)
                else:
                    with TRACE_GATE.running():
                        recorder.run(batch)
                seen += 1
    finally:
        excited.train(training)
    if seen == 0:
        raise ValueError("calibrate() got no batches; pass a tensor or a non-empty iterable of tensors.")
    temps: Dict[str, float] = {}
    for node, chunks in recorder.samples.items():
        scale = robust_std(torch.cat(chunks, dim=1))
        default = RULES[recorder.rules[node]].default_temp
        factor = default if isinstance(default, float) else scale_factor
        temps[node] = float((factor * scale).clamp_min(min_temp)[0])
    return temps
