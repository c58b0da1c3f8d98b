"""A Captum attribution class for the excitation pullback.

>>> from captum.attr import NoiseTunnel
>>> from excitation.captum import ExcitationPullback
>>> explainer = ExcitationPullback(model, preset="semantic")
>>> attr = explainer.attribute(x, target=3)                     # like captum.attr.Saliency
>>> smooth = NoiseTunnel(explainer).attribute(x, target=3, nt_type="smoothgrad", nt_samples=8, stdevs=0.1)

It also works with ``captum.metrics.infidelity`` and ``captum.metrics.sensitivity_max``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

try:
    from captum.attr._utils.attribution import GradientAttribution
    from captum.log import log_usage
except ImportError as exc:  # pragma: no cover - captum is in the eval extra
    raise ImportError("excitation.captum needs Captum: pip install 'excitation[eval]'") from exc

__all__ = ["ExcitationPullback"]


class ExcitationPullback(GradientAttribution):
    """The excitation pullback of ``forward_func`` (an ``nn.Module``), shaped like ``captum.attr.Saliency``.

    Parameters
    ----------
    forward_func : nn.Module
        The model.  It is never modified: an excited clone runs (cached per options).
    preset, temp, pool_temp : optional
        Options of :func:`excitation.pullback`.
    abs : bool
        Return ``|pullback|`` (as Saliency does by default).  Default ``False``: signed.
    """

    def __init__(self, forward_func: nn.Module, *, preset: Optional[str] = None, temp: Optional[float] = None,
                 pool_temp: Optional[float] = None, abs: bool = False) -> None:
        if not isinstance(forward_func, nn.Module):
            raise TypeError(f"ExcitationPullback needs the model as an nn.Module (the pass traces it), got "
                            f"{type(forward_func).__name__}.")
        super().__init__(forward_func)
        self.preset, self.temp, self.pool_temp, self.abs = preset, temp, pool_temp, abs

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    @log_usage()
    def attribute(self, inputs: Tensor, target: Any = None, abs: Optional[bool] = None,
                  additional_forward_args: Any = None) -> Tensor:
        """The pullback of ``target`` (int, list or LongTensor [N]; ``None`` for a single-output model).

        ``abs`` overrides the constructor's choice for this call.  ``additional_forward_args``
        is not supported (the pass traces ``forward(x)``); pass ``None``.
        """
        from .api import pullback

        if additional_forward_args is not None:
            raise ValueError("ExcitationPullback does not take additional_forward_args: wrap the model so that "
                             "forward(x) takes the input alone.")
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(f"ExcitationPullback explains one input tensor, got a tuple of {len(inputs)}.")
            return (self.attribute.__wrapped__(self, inputs[0], target, abs),)  # type: ignore[attr-defined]
        n = inputs.shape[0]
        if target is None:
            target = 0
        if isinstance(target, int) or (isinstance(target, Tensor) and target.numel() == 1):
            target = torch.full((n,), int(target), dtype=torch.long, device=inputs.device)
        elif not isinstance(target, Tensor):
            target = torch.as_tensor(list(target), dtype=torch.long, device=inputs.device)
        if target.numel() != n:
            raise ValueError(f"target must give one class per input: {target.numel()} targets for {n} inputs.")
        out = pullback(self.forward_func, inputs.detach(), target.reshape(-1).long(), preset=self.preset,
                       temp=self.temp, pool_temp=self.pool_temp).detach()
        return out.abs() if (self.abs if abs is None else abs) else out
