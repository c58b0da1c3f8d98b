"""Explainers the evaluation compares: ``(model, x, target) -> attribution`` callables.

Every explainer takes a model (never modified), a batch ``x`` [N, C, H, W] and a
LongTensor ``target`` [N], and returns an attribution of ``x``'s shape.  Quantus
re-explains with *randomised copies* of the model (MPRT), so an explainer must
use the model it is given, never one captured in advance.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["Explainer", "EXPLAINERS", "DEFAULT_EXPLAINERS", "make_explainer", "resolve_explainers"]

Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def _pullback(preset: Optional[str] = None, temp: Optional[float] = None) -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import pullback

        return pullback(model, x, target, preset=preset, temp=temp).detach()

    return explain


def _gradient() -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import gradient

        return gradient(model, x, target).detach()

    return explain


def _smooth_pullback(samples: int = 8, stdev: float = 0.15, preset: Optional[str] = None,
                     temp: Optional[float] = None, seed: int = 0) -> Explainer:
    """A noise tunnel over the pullback: the mean pullback at ``x + N(0, (stdev * range)^2)``."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import pullback

        generator = torch.Generator(device="cpu").manual_seed(seed)
        spread = (x.amax(dim=tuple(range(1, x.dim())), keepdim=True)
                  - x.amin(dim=tuple(range(1, x.dim())), keepdim=True)).clamp_min(1e-12)
        total = torch.zeros_like(x)
        for _ in range(samples):
            noise = torch.randn(x.shape, generator=generator).to(x) * stdev * spread
            total += pullback(model, x + noise, target, preset=preset, temp=temp).detach()
        return total / samples

    return explain


def _ascent(steps: int = 3, step_size: float = 1.0, radius: float = 5.0, preset: Optional[str] = None,
            temp: Optional[float] = None) -> Explainer:
    """The change ``ascend(model, x, target) - x`` after a few normalised pullback steps."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..ascent import ascend

        low, high = float(x.min()), float(x.max())
        moved = ascend(model, x, target, steps=steps, step_size=step_size, radius=radius,
                       pixel_range=(min(low, 0.0), max(high, 1.0)), preset=preset, temp=temp, progress=False)
        return (moved - x).detach()

    return explain


def _captum(kind: str, **options: Any) -> Explainer:
    """Captum's SmoothGrad, Integrated Gradients or Guided Backprop (signed), on a copy of the model."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        try:
            from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
        except ImportError as exc:  # pragma: no cover - captum is in the eval extra
            raise ImportError(f"explainer {kind!r} needs Captum: pip install 'excitation[eval]'") from exc
        # Captum's hooks (Guided Backprop) and in-place ReLUs must never touch the user's model.
        work = copy.deepcopy(model).eval()
        for module in work.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        inputs = x.detach().clone().requires_grad_(True)
        if kind == "smoothgrad":
            stdev = options.get("stdev", 0.15) * float(x.max() - x.min())
            out = NoiseTunnel(Saliency(work)).attribute(inputs, target=target, nt_type="smoothgrad",
                                                        nt_samples=options.get("samples", 8), stdevs=stdev,
                                                        abs=False)
        elif kind == "integrated-gradients":
            out = IntegratedGradients(work).attribute(inputs, baselines=torch.zeros_like(inputs), target=target,
                                                      n_steps=options.get("steps", 16))
        elif kind == "guided-backprop":
            out = GuidedBackprop(work).attribute(inputs, target=target)
        else:  # pragma: no cover - guarded by EXPLAINERS
            raise ValueError(kind)
        return out.detach()

    return explain


# name -> (factory, short description).  Factories take keyword options.
EXPLAINERS: Dict[str, Any] = {
    "pullback": (lambda **o: _pullback("paper", o.get("temp")), "excitation pullback, preset 'paper'"),
    "pullback-semantic": (lambda **o: _pullback("semantic", o.get("temp")), "excitation pullback, preset 'semantic'"),
    "smooth-pullback": (lambda **o: _smooth_pullback(temp=o.get("temp")), "noise tunnel (8 samples, 15 %) over the pullback"),
    "pullback-ascent": (lambda **o: _ascent(temp=o.get("temp")), "ascend(x) - x, 3 normalised pullback steps"),
    "gradient": (lambda **o: _gradient(), "vanilla input gradient"),
    "smoothgrad": (lambda **o: _captum("smoothgrad"), "Captum NoiseTunnel(Saliency), 8 samples, 15 %, signed"),
    "integrated-gradients": (lambda **o: _captum("integrated-gradients"), "Captum IntegratedGradients, black baseline, 16 steps"),
    "guided-backprop": (lambda **o: _captum("guided-backprop"), "Captum GuidedBackprop"),
}

DEFAULT_EXPLAINERS: List[str] = ["pullback", "pullback-semantic", "gradient"]


def make_explainer(name: str, **options: Any) -> Explainer:
    """The explainer registered as ``name`` (see :data:`EXPLAINERS`)."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; choose from {', '.join(EXPLAINERS)} or pass a callable.")
    return EXPLAINERS[name][0](**options)


def resolve_explainers(explainers: Union[None, Sequence[Union[str, Explainer]], Mapping[str, Any]],
                       **options: Any) -> Dict[str, Explainer]:
    """Names and callables -> ``{label: explainer}``; ``"gradient"`` is always included (the reference)."""
    if explainers is None:
        explainers = DEFAULT_EXPLAINERS
    items = list(explainers.items()) if isinstance(explainers, Mapping) else [
        (e if isinstance(e, str) else getattr(e, "__name__", f"callable{i}"), e) for i, e in enumerate(explainers)]
    resolved: Dict[str, Explainer] = {}
    for label, spec in items:
        if isinstance(spec, str):
            resolved[label] = make_explainer(spec, **options)
        elif callable(spec):
            resolved[label] = spec
        else:
            raise TypeError(f"explainer {label!r} must be a registered name or a callable (model, x, target), "
                            f"got {type(spec).__name__}.")
    if "gradient" not in resolved:
        resolved["gradient"] = make_explainer("gradient")
    return resolved
