"""Feature accentuation: projected gradient ascent on a class logit along the pullback.

Each step moves every image by ``step_size`` (L2, per image) along the
excitation pullback (or the vanilla gradient) of its raw target logit, projects
the change back onto the L2 ball of ``radius`` around the original, and clamps
to the pixel range.  Along pullbacks the changes are perceptually aligned and
class-specific; along gradients they tend to be adversarial noise.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .api import Target, check_input, prepare, select_target
from .fxpass.options import Options, TempsSpec
from .fxpass.rules import RulesSpec
from .fxpass.tracing import TRACE_GATE

__all__ = ["ascend", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGENET_NORMALIZE", "Normalized"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``normalize=`` for torchvision's ImageNet classifiers.
IMAGENET_NORMALIZE = (IMAGENET_MEAN, IMAGENET_STD)


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model that takes ``[0, 1]`` pixels, so an ascent runs in pixel space.

    Parameters
    ----------
    model : nn.Module
        The classifier that expects normalised inputs (shared, not copied).
    mean, std : sequence of float
        Per-channel normalisation, e.g. ``excitation.IMAGENET_NORMALIZE``.
    device : torch.device, optional
        Where to keep the ``mean`` / ``std`` buffers (they also follow ``.to(...)``).

    Returns
    -------
    Normalized
        An ``nn.Module``; ``forward(x)`` returns ``model((x - mean) / std)``.

    Raises
    ------
    ValueError
        A ``std`` entry is not positive.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.LazyLinear(5))
    >>> model = excitation.Normalized(net, *excitation.IMAGENET_NORMALIZE).eval()
    >>> model(torch.rand(1, 3, 8, 8)).shape
    torch.Size([1, 5])
    """

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], device: Optional[torch.device] = None
    ) -> None:
        super().__init__()
        self.model = model
        as_column = lambda v: torch.as_tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.register_buffer("mean", as_column(mean), persistent=False)
        self.register_buffer("std", as_column(std), persistent=False)
        if bool((self.std <= 0).any()):
            raise ValueError(f"normalize std must be > 0, got {std!r}.")

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))


def _per_image_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def ascend(
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    steps: int = 5,
    step_size: float = 10.0,
    radius: float = 50.0,
    pixel_range: Optional[Tuple[float, float]] = (0.0, 1.0),
    normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    direction: str = "pullback",
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    return_history: bool = False,
    progress: bool = True,
) -> Union[Tensor, Tuple[Tensor, List[Tensor]]]:
    """Accentuate the features of class ``target`` in ``x`` by projected gradient ascent.

    Parameters
    ----------
    model : nn.Module
        A classifier (plain or excited).  Never modified.
    x : Tensor
        Images [N, C, H, W] in pixel space (see ``pixel_range``).
    target : int, sequence, LongTensor [N] or callable
        The class whose raw logit is raised (no softmax), per image.
    steps, step_size, radius
        ``steps`` steps of L2 length ``step_size`` per image, projected onto the
        L2 ball of ``radius`` around ``x``.  The defaults (5 steps of 10, radius
        50, in [0, 1] pixel units) are the published setting of 5 steps of 20,
        radius 100, in [-1, 1] units: distances halve with the pixel scale.
    pixel_range : (low, high) or None
        Clamp after every step; ``None`` to skip.
    normalize : (mean, std), optional
        Applied inside, before the model; ``excitation.IMAGENET_NORMALIZE`` for torchvision.
    direction : {"pullback", "gradient"}
        Ascend along the excitation pullback or the vanilla gradient.
    options, preset, temp, pool_temp, gate, pool_backward, temps, rules
        Options of the pullback (plain models only), as for :func:`excitation.excite`.
    return_history : bool
        Also return the images after every step (``steps + 1`` tensors, the original first).
    progress : bool
        Show a progress bar (tqdm) when there is more than one step.

    Returns
    -------
    Tensor, or (Tensor, list of Tensor) with ``return_history``.

    Raises
    ------
    ValueError
        ``direction`` is not ``"pullback"`` or ``"gradient"``, ``steps`` is negative, ``step_size`` or
        ``radius`` is not a finite positive number, or an input / target is invalid (as for
        :func:`excitation.pullback`).

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 5))
    >>> x = torch.rand(2, 3, 8, 8)
    >>> moved = excitation.ascend(net, x, target=1, steps=3, step_size=0.5, radius=1.0, progress=False)
    >>> moved.shape, bool(((moved - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all())
    (torch.Size([2, 3, 8, 8]), True)
    """
    if direction not in ("pullback", "gradient"):
        raise ValueError(f"direction={direction!r}; use 'pullback' or 'gradient'.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}.")
    step_size = _check_positive(step_size, "step_size")
    radius = _check_positive(radius, "radius")
    if pixel_range is not None:
        low, high = pixel_range
        if not low < high:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range!r}.")
    x = check_input(model, x)
    if direction == "pullback":
        module = prepare(model, excited=True, options=options, preset=preset, temp=temp, pool_temp=pool_temp,
                         gate=gate, pool_backward=pool_backward, temps=temps, rules=rules)
    else:
        module = prepare(model, excited=False)
    if normalize is not None:
        mean, std = normalize
        module = Normalized(module, mean, std, device=x.device)
    x0 = x.detach()
    current = x0.clone()
    history = [current.clone()] if return_history else []
    bar = None
    if progress and steps > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"ascend ({direction})", leave=False)
    try:
        for _ in range(steps):
            leaf = current.requires_grad_(True)
            with TRACE_GATE.running(), torch.enable_grad():
                score = select_target(module(leaf), target, x0.shape[0])
                (direction_t,) = torch.autograd.grad(score.sum(), leaf)
            with torch.no_grad():
                norm = _per_image_norm(direction_t)
                # A zero direction (e.g. a dead network) leaves that image where it is.
                step = torch.where(norm > 0, direction_t / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.zeros_like(direction_t))
                current = leaf.detach() + step_size * step
                delta = current - x0
                delta = delta * (radius / _per_image_norm(delta).clamp_min(radius))
                current = x0 + delta
                if pixel_range is not None:
                    current = current.clamp(pixel_range[0], pixel_range[1])
            if return_history:
                history.append(current.clone())
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    current = current.detach()
    return (current, history) if return_history else current
