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
the published defaults.  LayerNorm and attention sites have no temperature.
"""

from __future__ import annotations

from typing import Dict, Iterable, Union

import torch
import torch.nn as nn
from torch import Tensor, fx

from .api import check_input, prepare
from .errors import ExcitationError
from .fxpass.rules import RULES
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

    def __init__(self, gm: fx.GraphModule, max_samples: int, generator: torch.Generator) -> None:
        super().__init__(gm)
        self.max_samples = max_samples
        self.generator = generator
        self.samples: Dict[str, list] = {}
        self.rules: Dict[str, str] = {}

    def call_function(self, target, args, kwargs):
        rule = surrogate_rule(target)
        if rule is not None and RULES[rule].default_temp is not None:
            # A fused BatchNorm -> ReLU site's input is the pre-activation it computes inside.
            z = (batch_norm_relu_pre_activation(*args[:3]) if target is batch_norm_relu else args[0]).detach()
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


def calibrate(
    model: nn.Module,
    batches: Union[Tensor, Iterable[Tensor]],
    *,
    scale_factor: float = 0.3,
    max_samples: int = 100_000,
    min_temp: float = 1e-4,
    progress: bool = True,
) -> Dict[str, float]:
    """Per-site temperatures for ``excite(model, temps=...)`` from real inputs.

    Parameters
    ----------
    model : nn.Module
        A plain or excited model (never modified; run in eval mode).
    batches : Tensor or iterable of Tensors
        Input batches (a single batch is fine).
    scale_factor : float
        ``temp = scale_factor * robust_std(site input)`` at ReLU, ReLU6/Hardtanh,
        LeakyReLU, PReLU, ELU/CELU/SELU, Hardsigmoid and max-pool sites; 0.3 puts unit-variance
        (BatchNorm'd) pre-activations at the published temperature.  SiLU, Mish,
        Hardswish, hard_mish (1.6) and GELU (1.0) sites use their rule's default instead.
    max_samples : int
        Values kept per site and batch (a random subsample) to bound memory.
    min_temp : float
        Floor for sites whose inputs barely vary (e.g. constant channels).

    Returns
    -------
    dict
        ``{site node name: temp}``, the keys of ``excitation.report(...).sites[i].node``.
    """
    scale_factor = check_temp(scale_factor, argument="scale_factor")
    min_temp = check_temp(min_temp, argument="min_temp")
    excited = prepare(model, excited=True)
    if getattr(excited, "excitation_path", None) == "dynamo":
        raise ExcitationError(
            f"calibrate() reads each site's input from the fx graph, but {type(model).__name__} does not trace "
            f"with torch.fx ({excited.trace_error}); pullback() runs it through dynamo with the preset's "
            f"temperatures.  Pass temp=... to pullback(), or make the model fx-traceable to calibrate it."
        )
    if isinstance(batches, Tensor):
        batches = [batches]
    recorder = _Recorder(excited, max_samples, torch.Generator().manual_seed(0))
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
                with TRACE_GATE.running():
                    recorder.run(check_input(excited, batch, argument="batch"))
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
