"""Thin wrappers over Quantus 0.6.0 metrics: choose, configure, correct.

One function per metric family; each returns one score per image (``NaN`` where
Quantus gives none).  The Quantus 0.6.0 defects handled here:

* ``MPRT`` averages over layers *including* the un-randomised model's
  self-similarity (it skips the key ``"orig"``, but writes ``"original"``).
  :func:`mprt` returns the per-layer curve and averages it itself, without
  ``"original"``.
* the AUC helper calls ``np.trapz``, which NumPy >= 2.4 removed;
  :func:`numpy_trapz_shim` restores it as ``np.trapezoid`` for the duration of a
  call, only where it is missing.
* ``normalise_by_max`` normalises over the *batch* axis unless it is given
  per-sample axes; every metric here gets ``normalise_axes`` = all but axis 0.
* ``ROAD`` aggregates only the first batch (and returns batch means, no
  per-image score): :mod:`.road` reuses its imputation and aggregates every
  batch itself, one score per image.
* ``quantus[torch]`` pins an old torch on some platforms: the ``eval`` extra
  depends on plain ``quantus``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .explainers import Explainer, in_eval_mode
from .road import road

__all__ = ["METRICS", "DEFAULT_METRICS", "HIGHER_IS_BETTER", "numpy_trapz_shim", "per_sample_normalise",
           "as_quantus_explain_func", "run_metric", "mprt", "MPRTResult"]


def _quantus():
    try:
        import quantus  # noqa: F401
    except ImportError as exc:
        raise ImportError("the evaluation needs Quantus: pip install 'excitation[eval]' (plain quantus, not "
                          "quantus[torch], which pins an old torch).") from exc
    return quantus


@contextlib.contextmanager
def numpy_trapz_shim() -> Iterator[None]:
    """``np.trapz`` = ``np.trapezoid`` inside the block, only where NumPy (>= 2.4) lacks it."""
    if hasattr(np, "trapz"):
        yield
        return
    np.trapz = np.trapezoid  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.trapz  # type: ignore[attr-defined]


def per_sample_normalise(a: np.ndarray) -> np.ndarray:
    """Quantus' ``normalise_by_max`` over each sample's own axes (all but axis 0)."""
    from quantus.functions.normalise_func import normalise_by_max

    return normalise_by_max(a, normalise_axes=tuple(range(1, np.ndim(a))))


def as_quantus_explain_func(explainer: Explainer, device: Optional[torch.device] = None) -> Callable[..., np.ndarray]:
    """An ``explain_func`` for Quantus: numpy ``inputs``/``targets`` in, a numpy attribution out."""

    def explain_func(model: nn.Module, inputs: Any, targets: Any, **_: Any) -> np.ndarray:
        dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=dev)
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=dev).reshape(-1)
        if t.numel() == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        return explainer(model, x, t).detach().float().cpu().numpy()

    return explain_func


HIGHER_IS_BETTER: Dict[str, bool] = {
    "Infidelity": False, "FaithfulnessCorrelation": True, "FaithfulnessEstimate": True,
    "MonotonicityCorrelation": True, "MaxSensitivity": False, "RandomLogit": False, "Sparseness": True,
    "MPRT": False, "ROAD": False,  # ROAD: MoRF order, the area under "still correct" (lower = faithful)
}


def _features(x: np.ndarray) -> int:
    return int(np.prod(x.shape[2:]))


def _build(name: str, x: np.ndarray, classes: int, options: Dict[str, Any]):
    """The configured Quantus metric object for ``name``; defaults sized to the images (CPU-friendly)."""
    q = _quantus()
    side = int(x.shape[-1])
    pixels = _features(x)
    common = dict(normalise_func=per_sample_normalise, disable_warnings=True, display_progressbar=False,
                  return_aggregate=False)
    o = dict(options)
    if name == "Infidelity":
        return q.Infidelity(perturb_patch_sizes=o.get("patch_sizes", [max(1, side // 4)]),
                            n_perturb_samples=o.get("samples", 5), normalise=o.get("normalise", False), **common)
    if name == "FaithfulnessCorrelation":
        return q.FaithfulnessCorrelation(nr_runs=o.get("runs", 50), subset_size=o.get("subset", min(224, pixels // 4)),
                                         perturb_baseline="black", normalise=o.get("normalise", True), **common)
    if name == "FaithfulnessEstimate":
        return q.FaithfulnessEstimate(features_in_step=o.get("step", max(1, pixels // 32)), perturb_baseline="black",
                                      normalise=o.get("normalise", True), **common)
    if name == "MonotonicityCorrelation":
        return q.MonotonicityCorrelation(nr_samples=o.get("samples", 5), features_in_step=o.get("step", max(1, pixels // 16)),
                                         perturb_baseline=o.get("baseline", "uniform"), normalise=o.get("normalise", True), **common)
    if name == "MaxSensitivity":
        return q.MaxSensitivity(nr_samples=o.get("samples", 5), lower_bound=o.get("radius", 0.2),
                                normalise=o.get("normalise", False), **common)
    if name == "RandomLogit":
        return q.RandomLogit(num_classes=classes, seed=o.get("seed", 42), normalise=o.get("normalise", True),
                             similarity_func=o.get("similarity", q.similarity_func.ssim), **common)
    if name == "Sparseness":
        return q.Sparseness(normalise=o.get("normalise", True), **common)
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}.")


METRICS: List[str] = ["Infidelity", "FaithfulnessCorrelation", "FaithfulnessEstimate", "MonotonicityCorrelation",
                      "MaxSensitivity", "RandomLogit", "Sparseness", "MPRT", "ROAD"]
# ROAD is in the default set because it is cheap on the default 8x8 digits: each imputation is a sparse
# solve (scipy) that grows with the pixel count, so on 224x224 images it dominates (docs/evaluation.md).
DEFAULT_METRICS: List[str] = ["Infidelity", "FaithfulnessCorrelation", "MaxSensitivity", "Sparseness", "ROAD"]


def run_metric(name: str, model: nn.Module, x: Tensor, y: Tensor, a: Tensor, explainer: Explainer, *,
               classes: int, batch_size: int = 64, seed: int = 0, **options: Any) -> np.ndarray:
    """Per-image scores [N] of Quantus metric ``name`` for attributions ``a`` of ``explainer``.

    ``np.random`` is seeded with ``seed`` first, so two explainers see the same
    random subsets and perturbations (the comparison is paired).
    """
    if name == "MPRT":
        return mprt(model, x, y, a, explainer, batch_size=batch_size, **options).average
    if name == "ROAD":
        return road(in_eval_mode(model), x, y, a, batch_size=batch_size, seed=seed, **options).auc
    xn = x.detach().float().cpu().numpy()
    metric = _build(name, xn, classes, options)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with numpy_trapz_shim():
        scores = metric(model=in_eval_mode(model), x_batch=xn, y_batch=y.detach().cpu().numpy(),
                        a_batch=a.detach().float().cpu().numpy(), explain_func=as_quantus_explain_func(explainer),
                        channel_first=True, softmax=False, device=str(device), batch_size=batch_size)
    return np.asarray(scores, dtype=np.float64).reshape(-1)


@dataclass
class MPRTResult:
    """The cascading randomisation test (Adebayo et al. 2018), top-down.

    ``curve`` maps ``"original"`` and then each randomised layer (top first) to
    per-image Spearman rank correlations with the original explanation.
    ``average`` [N] is the mean over the *randomised* layers only (Quantus 0.6.0
    wrongly includes ``"original"``).  Lower means more sensitive to the model.
    """

    curve: Dict[str, np.ndarray]
    average: np.ndarray


def mprt(model: nn.Module, x: Tensor, y: Tensor, a: Tensor, explainer: Explainer, *, batch_size: int = 64,
         seed: int = 42, **_: Any) -> MPRTResult:
    """The per-layer MPRT curve and the per-image average over randomised layers."""
    q = _quantus()
    metric = q.MPRT(layer_order="top_down", seed=seed, similarity_func=q.similarity_func.correlation_spearman,
                    return_average_correlation=False, return_last_correlation=False, abs=True, normalise=True,
                    normalise_func=per_sample_normalise, disable_warnings=True, display_progressbar=False)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with numpy_trapz_shim():
        scores = metric(model=in_eval_mode(model), x_batch=x.detach().float().cpu().numpy(),
                        y_batch=y.detach().cpu().numpy(), a_batch=a.detach().float().cpu().numpy(),
                        explain_func=as_quantus_explain_func(explainer), channel_first=True, softmax=False,
                        device=str(device), batch_size=batch_size)
    curve = {str(k): np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    layers = [k for k in curve if k != "original"]
    average = np.mean(np.stack([curve[k] for k in layers]), axis=0) if layers else np.full(len(x), np.nan)
    return MPRTResult(curve=curve, average=average)
