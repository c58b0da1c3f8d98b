"""Focus (Arias-Duart et al. 2022): the share of positive relevance on the target's half of a 2 x 2 mosaic.

A mosaic holds four single-object images: two of the target class, two of
other classes.  A class-specific explanation puts its positive relevance on the
target's two quadrants; the score is that share, in [0, 1] (0.5 = no
preference when the quadrants are alike).

Conventions follow Quantus' ``Focus``: ``positions`` (Quantus' ``p_batch`` /
``custom_batch``) is one 0/1 row per mosaic over the quadrants
(top-left, top-right, bottom-left, bottom-right); quadrants split the map at
``H // 2`` and ``W // 2``.  The relevance map is the channel sum of the
attribution and only its positive part counts (the package-wide reduction of
:mod:`.localisation`); Quantus clips each *channel* before summing, which gives
the same score on one-channel maps (checked in ``tests/test_focus.py``).  A map
with no positive relevance scores 0, as in Quantus (``1e-9`` in its
denominator).

:data:`AUTHOR_FOCUS_RESNET50` holds the method author's published ImageNet
numbers, for display next to ours; they were measured with a different
relevance (input x attribution, inputs in [-1, 1]), see its docstring.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .explainers import Explainer
from .localisation import reduce_channels

__all__ = ["Mosaics", "make_mosaics", "focus", "focus_scores", "quadrant_masks", "AUTHOR_FOCUS_RESNET50",
           "AUTHOR_FOCUS_SETTING"]

#: The method author's Focus means on ImageNet ResNet50, *his* numbers (not measured by this package):
#: repository 314-Foundation/SemanticPullbacks, ``results/focus_model_name=resnet50_summary.csv``.
#: Keys are this package's explainer names; his names are in :data:`AUTHOR_FOCUS_SETTING`.
AUTHOR_FOCUS_RESNET50: Dict[str, float] = {
    "guided-grad-cam": 0.849,      # his "GuidedGradCam" (0.8493, std 0.176)
    "pullback-semantic": 0.748,    # his "SoftPullback" (0.7483, std 0.134)
    "gradient": 0.634,             # his "Gradient" (0.6337, std 0.140)
}

#: How :data:`AUTHOR_FOCUS_RESNET50` was measured (from the repository's ``evaluate_focus.py`` and README).
AUTHOR_FOCUS_SETTING: str = (
    "author's numbers (314-Foundation/SemanticPullbacks, evaluate_focus.py): torchvision ResNet50, ImageNet "
    "validation images, 500 mosaics (seed 314), each of one target image repeated in 2 random quadrants and 2 "
    "distractor images of other classes, every tile resized to 112 x 112 (mosaic 224 x 224); relevance = input x "
    "attribution with inputs normalised to [-1, 1], scored by quantus.Focus(abs=False, normalise=False) (positive "
    "relevance per channel). SoftPullback = one pullback with the ReLU gate Phi(z / 0.6) and max-pool temperature "
    "0.3 (this package's preset 'semantic'); GuidedGradCam = Captum GuidedGradCam at layer4[-1].conv3. "
    "A 100-mosaic run gave 0.865 / 0.762 / 0.635."
)

_QUADRANTS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) of top-left, top-right, bottom-left, bottom-right


class Mosaics(NamedTuple):
    """2 x 2 mosaics: ``images`` [M, C, 2H, 2W], ``targets`` [M], ``positions`` [M, 4] (0/1),
    ``sources`` [M, 4] (the index of each quadrant's image in the input set)."""

    images: Tensor
    targets: Tensor
    positions: np.ndarray
    sources: np.ndarray


def _single_labels(labels: Union[Tensor, np.ndarray]) -> np.ndarray:
    """Class per image, ``-1`` where a multi-hot row has not exactly one class."""
    lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if lab.ndim == 1:
        return lab.astype(np.int64)
    if lab.ndim == 2:
        one = lab.astype(bool).sum(axis=1) == 1
        return np.where(one, lab.astype(bool).argmax(axis=1), -1).astype(np.int64)
    raise ValueError(f"labels must be classes [N] or multi-hot [N, K], got shape {lab.shape}.")


def make_mosaics(images: Tensor, labels: Union[Tensor, np.ndarray], n: int, seed: int = 0) -> Mosaics:
    """``n`` mosaics of single-object images, the target class in exactly 2 of the 4 quadrants.

    Each mosaic draws a target class, two different images of it (one repeated
    if the class has a single image) for two random quadrants, and two
    different images of other classes (different from the target, possibly of
    one class) for the rest.

    Parameters
    ----------
    images : Tensor
        [N, C, H, W].
    labels : Tensor or ndarray
        Classes [N], or multi-hot [N, K]: rows with more or less than one class are skipped.
    n : int
        Number of mosaics.
    seed : int
        Seed of the draws (``numpy.random.default_rng``).

    Returns
    -------
    Mosaics
        ``images`` [n, C, 2H, 2W] (same dtype and device as ``images``), ``targets``
        LongTensor [n], ``positions`` int64 [n, 4], ``sources`` int64 [n, 4].

    Raises
    ------
    ValueError
        If fewer than two classes have single-object images, or ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"make_mosaics needs n >= 1, got {n}.")
    single = _single_labels(labels)
    if len(single) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(single)} labels.")
    pool = {int(c): np.flatnonzero(single == c) for c in np.unique(single[single >= 0])}
    if len(pool) < 2:
        raise ValueError(f"Focus mosaics need single-object images of at least two classes, got classes "
                         f"{sorted(pool)}: generate more images (or keep the single-object ones).")
    classes = np.array(sorted(pool))
    rng = np.random.default_rng(seed)
    h, w = images.shape[-2:]
    out = images.new_empty((n, images.shape[1], 2 * h, 2 * w))
    targets = np.empty(n, np.int64)
    positions = np.zeros((n, 4), np.int64)
    sources = np.empty((n, 4), np.int64)
    for i in range(n):
        target = int(rng.choice(classes))
        own = pool[target]
        picks = rng.choice(own, size=2, replace=len(own) < 2)
        others = np.concatenate([pool[int(c)] for c in classes if c != target])
        distractors = rng.choice(others, size=2, replace=len(others) < 2)
        where = rng.choice(4, size=2, replace=False)
        positions[i, where] = 1
        order = iter(list(picks) + list(distractors))
        for q in np.concatenate([np.sort(where), np.setdiff1d(np.arange(4), where)]):
            sources[i, q] = next(order)
        for q, (r, c) in enumerate(_QUADRANTS):
            out[i, :, r * h:(r + 1) * h, c * w:(c + 1) * w] = images[sources[i, q]]
        targets[i] = target
    return Mosaics(out, torch.as_tensor(targets, device=images.device), positions, sources)


def quadrant_masks(positions: Union[Tensor, np.ndarray], height: int, width: int) -> np.ndarray:
    """Boolean masks [M, H, W] of the quadrants marked 1 in ``positions`` [M, 4]."""
    pos = positions.detach().cpu().numpy() if isinstance(positions, Tensor) else np.asarray(positions)
    if pos.ndim != 2 or pos.shape[1] != 4:
        raise ValueError(f"positions must be [M, 4] (top-left, top-right, bottom-left, bottom-right), got {pos.shape}.")
    hh, hw = height // 2, width // 2
    masks = np.zeros((len(pos), height, width), bool)
    for q, (r, c) in enumerate(_QUADRANTS):
        rows = slice(0, hh) if r == 0 else slice(hh, height)
        cols = slice(0, hw) if c == 0 else slice(hw, width)
        masks[pos[:, q].astype(bool), rows, cols] = True
    return masks


def focus_scores(a: Union[Tensor, np.ndarray], positions: Union[Tensor, np.ndarray]) -> np.ndarray:
    """Focus of given attributions: positive relevance on the marked quadrants over all positive relevance.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [M, C, 2H, 2W] (their channel sum is the map).
    positions : Tensor or ndarray
        [M, 4] 0/1 per quadrant (top-left, top-right, bottom-left, bottom-right).

    Returns
    -------
    ndarray
        float64 [M] in [0, 1]; 0 where the map has no positive relevance.
    """
    maps = np.clip(reduce_channels(a), 0.0, None)
    masks = quadrant_masks(positions, *maps.shape[-2:])
    total = maps.reshape(len(maps), -1).sum(axis=1)
    inside = (maps * masks).reshape(len(maps), -1).sum(axis=1)
    return np.where(total > 0, inside / np.where(total > 0, total, 1.0), 0.0)


def focus(model: nn.Module, explainer: Explainer, mosaics: Tensor, targets: Tensor,
          positions: Union[Tensor, np.ndarray], *, times_input: bool = False, batch_size: int = 32) -> np.ndarray:
    """Per-mosaic Focus of ``explainer`` on ``model``.

    Parameters
    ----------
    model : nn.Module
        The classifier (never modified).
    explainer : callable
        ``(model, x, target) -> attribution`` (see :mod:`.explainers`).
    mosaics : Tensor
        [M, C, 2H, 2W], e.g. :func:`make_mosaics`'s ``images``.
    targets : Tensor
        LongTensor [M].
    positions : Tensor or ndarray
        [M, 4] 0/1, the target's quadrants.
    times_input : bool
        Score ``mosaics * attribution`` instead of the attribution (the author's
        setting, there with inputs in [-1, 1]).
    batch_size : int
        Mosaics per explainer call.

    Returns
    -------
    ndarray
        float64 [M] in [0, 1].
    """
    if len(mosaics) != len(targets) or len(mosaics) != len(positions):
        raise ValueError(f"{len(mosaics)} mosaics, {len(targets)} targets and {len(positions)} positions: give one "
                         f"target and one positions row per mosaic.")
    parts = []
    for i in range(0, len(mosaics), batch_size):
        x = mosaics[i:i + batch_size]
        a = explainer(model, x, targets[i:i + batch_size].long()).detach()
        parts.append((a * x if times_input else a).float().cpu())
    return focus_scores(torch.cat(parts), positions)
