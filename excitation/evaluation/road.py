"""ROAD (Rong et al. 2022, "Remove And Debias"), one score per image, over every batch.

Per image and removal percentage ``p``: replace the top ``p`` % pixels (most relevant first, "MoRF",
ranked by the signed attribution summed over channels) with Quantus' *noisy linear imputation* and
record whether the model still predicts the explained class.  The per-image score is the area under
that 0/1 curve against the removed fraction, normalised to [0, 1] (the trapezoid rule over the
percentages, divided by their span).  **Lower is better**: a faithful attribution removes the
evidence first, so the prediction breaks early.

Why not call ``quantus.ROAD``: Quantus 0.6.0 keeps only ``evaluation_scores[0]`` (the first batch)
and returns only the batch-mean accuracy per percentage, so there is no per-image score to pair; and
its ranking runs over ``C * H * W`` attribution entries while its imputation indexes ``H * W`` pixels,
which fails on RGB images.  We reuse Quantus' imputation (:func:`noisy_linear_imputation`, the part
ROAD is about) and do the ranking, the prediction and the aggregation here, in the same order as
Quantus (per batch: per percentage: per image), so with one batch and a seeded ``np.random`` the
result is Quantus' own, image by image.

The curve records *correctness* (argmax == target), not the target probability: that is ROAD's
published definition and what Quantus computes, it does not depend on logits versus softmax, and it
stays comparable with published ROAD numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .explainers import in_eval_mode

__all__ = ["ROADResult", "road", "road_auc", "DEFAULT_PERCENTAGES"]

# A 10 % grid (10 %, 20 %, ..., 90 %), as in ROAD's accuracy curves; Quantus' default 1, 3, ..., 99 % costs
# 50 imputations per image against 9 (one sparse solve per image and percentage) for a curve of the same shape.
DEFAULT_PERCENTAGES = tuple(range(10, 100, 10))


@dataclass
class ROADResult:
    """``curves`` [N, P] (1 = still the explained class after removing ``percentages[j]`` %) and ``auc`` [N]."""

    percentages: np.ndarray
    curves: np.ndarray
    auc: np.ndarray


def road_auc(curves: np.ndarray, percentages: Sequence[float]) -> np.ndarray:
    """Per-image area under ``curves`` [N, P] against the removed fraction, divided by the span (in [0, 1])."""
    p = np.asarray(percentages, dtype=np.float64) / 100.0
    c = np.asarray(curves, dtype=np.float64)
    if p.size == 1:
        return c[:, 0].copy()
    return np.trapezoid(c, x=p, axis=1) / (p[-1] - p[0])


def _check(x: Tensor, target: Tensor, a: Tensor, percentages: Sequence[float]) -> None:
    if x.dim() != 4 or target.shape != (x.shape[0],):
        raise ValueError(f"ROAD needs images x [N, C, H, W] and target [N], got {tuple(x.shape)} and "
                         f"{tuple(target.shape)}.")
    if a.shape[0] != x.shape[0] or a.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"ROAD needs one attribution map per image of the image's size, got {tuple(a.shape)} for "
                         f"images {tuple(x.shape)}.")
    p = np.asarray(percentages, dtype=np.float64)
    if p.size == 0 or np.any(p < 0) or np.any(p > 100) or np.any(np.diff(p) <= 0):
        raise ValueError(f"ROAD percentages must be increasing values in [0, 100], got {list(percentages)}.")


def road(model: nn.Module, x: Tensor, target: Tensor, a: Tensor, *, percentages: Sequence[float] = DEFAULT_PERCENTAGES,
         noise: float = 0.01, batch_size: int = 64, seed: Optional[int] = 0,
         perturb_func: Optional[Callable[..., np.ndarray]] = None) -> ROADResult:
    """ROAD (MoRF) for every image: the per-percentage correctness curve and its normalised AUC.

    ``perturb_func(arr=[C, H, W], indices=[k]) -> [C, H, W]`` replaces pixels (flat ``H * W``
    indices, all channels); default Quantus' noisy linear imputation with ``noise``.  ``np.random``
    is seeded with ``seed`` (unless ``None``) so every explainer sees the same noise.
    """
    _check(x, target, a, percentages)
    if perturb_func is None:
        from quantus.functions.perturb_func import noisy_linear_imputation

        def perturb_func(arr: np.ndarray, indices: np.ndarray) -> np.ndarray:
            return noisy_linear_imputation(arr=arr, indices=indices, noise=noise)


    model = in_eval_mode(model)  # dropout / batch-norm statistics off; a training model is copied, never switched
    if seed is not None:
        np.random.seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    xs = x.detach().float().cpu().numpy()
    ys = target.detach().cpu().numpy()
    # One relevance per pixel: the signed attribution summed over channels (Quantus ranks signed values too).
    relevance = a.detach().float().cpu().reshape(a.shape[0], -1, *a.shape[-2:]).sum(1).flatten(1).numpy()
    order = np.argsort(-relevance, axis=1)
    pixels = relevance.shape[1]
    rows = []
    for start in range(0, len(xs), batch_size):
        xb, yb, ob = xs[start:start + batch_size], ys[start:start + batch_size], order[start:start + batch_size]
        cols = []
        for p in percentages:
            k = int(pixels * p / 100)
            moved = np.stack([perturb_func(arr=xi, indices=oi[:k]) if k else xi.copy() for xi, oi in zip(xb, ob)])
            with torch.no_grad():
                logits = model(torch.as_tensor(moved, dtype=torch.float32, device=device))
            cols.append(logits.argmax(1).cpu().numpy() == yb)
        rows.append(np.stack(cols, axis=1))
    curves = np.concatenate(rows).astype(np.float64)
    return ROADResult(percentages=np.asarray(percentages, dtype=np.float64), curves=curves,
                      auc=road_auc(curves, percentages))
