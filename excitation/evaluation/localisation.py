"""Localisation metrics against a ground-truth mask: one score per image, ``NaN`` where undefined.

Every metric reads one map per image, made the same way for every explainer:

* **the map is the channel sum** of the attribution, ``a.sum(axis=1)``
  (:func:`reduce_channels`).  A one-channel explainer (Grad-CAM) is its own
  map; a three-channel one (gradient, pullback) is summed, so signed channels
  may cancel, as they do when the attribution is dotted with an input change.
* the **energy-type** metrics (:func:`energy_pointing_game`,
  :func:`relevance_mass_accuracy`, :func:`target_specificity`) use the
  **positive part** of that map, ``max(map, 0)``: negative relevance is
  evidence *against* the class and is not "energy" in the mask.  A map with no
  positive part puts no energy in the mask and scores 0.
* the **rank-type** metrics (:func:`pointing_game`,
  :func:`relevance_rank_accuracy`, :func:`mask_auc`) use the signed map.

A target whose mask is empty gets ``NaN`` (as does :func:`mask_auc` for a mask
that covers the whole image): averages must be taken with
:func:`summarise_scores`, which reports how many images were excluded.

Ties are scored as the expected value under random tie-breaking: a map whose
maximum is reached at several pixels scores the share of those pixels that hit
the mask, and pixels tied at the K-th rank of :func:`relevance_rank_accuracy`
contribute in proportion.  A constant map therefore scores the chance level.

Definitions
-----------
* pointing game (Zhang et al. 2018, "Top-down neural attention by excitation
  backprop"): a hit if the map's maximum lies in the mask, or within
  ``tolerance`` pixels (Euclidean) of it.  The paper allows 15 px at 224 x 224;
  the same share of a 64 x 64 image is ``15 * 64 / 224 = 4.3``, so 4 px
  (:data:`POINTING_TOLERANCE_64`).  The default here is 0 (the mask itself).
* energy pointing game (Wang et al. 2020, Score-CAM): positive map in the mask
  over the positive map in total.  The paper's ground truth is a bounding box
  (``box=True`` uses the mask's bounding box); on the mask itself it is the
  same number as the relevance mass accuracy.
* relevance rank accuracy and relevance mass accuracy (Arras, Osman and Samek
  2022, CLEVR-XAI): RRA is the share of the K highest-ranked pixels inside the
  mask, K = the mask's size; RMA is the relevance inside the mask over the total
  relevance, of a map that is non-negative: CLEVR-XAI's public evaluation
  (``eval/util.py``, ``calc_overlap``) takes ``|heatmap|`` of a heatmap pooled
  over channels beforehand.  With the positive part of the channel sum as that
  pooling (negative relevance is evidence against the class, not mass on the
  object), RMA lies in [0, 1].
* mask AUC: the ROC AUC of the map's values with the mask as labels (ties
  count one half, as in the Mann-Whitney statistic).
* target specificity: the positive-energy share on the target's mask minus the
  share on the other objects' mask, in [-1, 1]; ``NaN`` unless both are
  non-empty.

Quantus 0.6.0, checked against these (``tests/test_localisation.py``):

* ``PointingGame`` agrees on maps with a unique maximum.  It writes ``NaN``
  into a *boolean* array for an empty mask, which stores ``True``: an empty
  mask scores a hit (1.0) instead of ``NaN``.  It counts a hit if *any* tied
  maximum is in the mask, so a constant map always hits.
* ``AttributionLocalisation(abs=False, positive_attributions=True)`` agrees
  with the energy pointing game (up to its ``1e-9`` in the denominator).  Its
  defaults (``abs=True``) count negative relevance as energy, and its
  ``weighted`` ratio divides the mask size by ``x_batch[2:].size`` -- the
  images from the third on -- instead of one image's pixels, so the weighted
  score scales with the batch size (and is 0 / NaN for batches of 2 / 1).
* ``RelevanceRankAccuracy`` agrees on maps without ties; at ties it takes
  ``argsort``'s order, so a constant map scores 1 on a mask over the first
  pixels in raster order and 0 on one over the last.
* ``RelevanceMassAccuracy`` uses signed relevance: with negative relevance
  outside the mask it exceeds 1, with negative relevance inside it can be
  negative; on non-negative maps it agrees.
* ``AUC`` agrees (sklearn's ROC curve; ties handled the same way).  The AUC
  helpers elsewhere in Quantus call ``np.trapz`` (removed in NumPy 2.4);
  :func:`.metrics.numpy_trapz_shim` covers them.
* ``TopKIntersection(k=K)`` is the relevance rank accuracy when every mask in
  the batch has K pixels, and agrees on maps without ties.
* ``normalise=True`` (``normalise_by_max`` over the whole batch by default)
  divides by one positive number, which changes none of these scores; the
  checks pass ``normalise=False``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
from torch import Tensor

__all__ = ["reduce_channels", "pointing_game", "energy_pointing_game", "relevance_rank_accuracy",
           "relevance_mass_accuracy", "mask_auc", "target_specificity", "LOCALISATION_METRICS",
           "HIGHER_IS_BETTER", "MASK_METRICS", "OTHER_MASK_METRICS", "POINTING_TOLERANCE_64", "localisation_scores",
           "summarise_scores"]

ArrayLike = Union[Tensor, np.ndarray]

#: The pointing game's 15 px at 224 x 224 (Zhang et al. 2018), scaled to 64 x 64 and rounded down.
POINTING_TOLERANCE_64: int = 4


def _numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def reduce_channels(a: ArrayLike) -> np.ndarray:
    """The map of an attribution: its sum over channels.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W] (C = 1 for Grad-CAM-like maps), or maps [N, H, W]
        already reduced (returned as float64).

    Returns
    -------
    ndarray
        float64 [N, H, W].

    Raises
    ------
    ValueError
        If ``a`` is neither 3- nor 4-dimensional.
    """
    arr = _numpy(a).astype(np.float64, copy=False)
    if arr.ndim == 4:
        return arr.sum(axis=1)
    if arr.ndim == 3:
        return arr
    raise ValueError(f"attributions must be [N, C, H, W] (or maps [N, H, W]), got shape {arr.shape}.")


def _masks(masks: ArrayLike, shape: tuple, argument: str = "masks") -> np.ndarray:
    m = _numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.shape != shape:
        raise ValueError(f"{argument} must be one boolean mask per image, [N, H, W] or [N, 1, H, W] matching the "
                         f"maps {shape}, got {tuple(_numpy(masks).shape)}; select the target's mask first "
                         f"(e.g. masks[range(N), target]).")
    return m.astype(bool)


def _prepare(a: ArrayLike, masks: ArrayLike):
    maps = reduce_channels(a)
    m = _masks(masks, maps.shape)
    return maps.reshape(len(maps), -1), m.reshape(len(m), -1)


def _energy_share(positive: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Positive map in ``region`` over the positive map in total; 0 where there is no positive map."""
    total = positive.sum(axis=1)
    inside = (positive * region).sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, inside / safe, 0.0)


def pointing_game(a: ArrayLike, masks: ArrayLike, tolerance: float = 0) -> np.ndarray:
    """Pointing game (Zhang et al. 2018): does the map's maximum hit the mask?

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W]; the map is their channel sum.
    masks : Tensor or ndarray
        Boolean ground truth [N, H, W] (or [N, 1, H, W]).
    tolerance : float
        A maximum within this Euclidean distance (pixels) of the mask is a hit;
        the paper's 15 px at 224 px is :data:`POINTING_TOLERANCE_64` = 4 at 64 px.

    Returns
    -------
    ndarray
        float64 [N]: 1 (hit) or 0 (miss); with tied maxima, the share of them
        that hit; ``NaN`` for an empty mask.
    """
    maps = reduce_channels(a)
    m = _masks(masks, maps.shape)
    if tolerance > 0:
        from scipy.ndimage import distance_transform_edt

        # Distance of every pixel to the nearest mask pixel: a hit within ``tolerance``.
        near = np.stack([distance_transform_edt(~mi) <= tolerance if mi.any() else mi for mi in m])
    else:
        near = m
    flat, region = maps.reshape(len(maps), -1), near.reshape(len(near), -1)
    top = flat == flat.max(axis=1, keepdims=True)
    scores = (top & region).sum(axis=1) / top.sum(axis=1)
    scores = scores.astype(np.float64)
    scores[~m.reshape(len(m), -1).any(axis=1)] = np.nan
    return scores


def energy_pointing_game(a: ArrayLike, masks: ArrayLike, box: bool = False) -> np.ndarray:
    """Energy pointing game (Wang et al. 2020): the share of positive map in the mask.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W]; the positive part of their channel sum is the energy.
    masks : Tensor or ndarray
        Boolean ground truth [N, H, W] (or [N, 1, H, W]).
    box : bool
        Score the mask's bounding box (the paper's ground truth) instead of the mask.

    Returns
    -------
    ndarray
        float64 [N] in [0, 1]; 0 for a map without positive values; ``NaN`` for an empty mask.
    """
    maps = reduce_channels(a)
    m = _masks(masks, maps.shape)
    region = m
    if box:
        region = np.zeros_like(m)
        for i, mi in enumerate(m):
            if mi.any():
                rows, cols = np.flatnonzero(mi.any(axis=1)), np.flatnonzero(mi.any(axis=0))
                region[i, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    flat = np.clip(maps.reshape(len(maps), -1), 0.0, None)
    scores = _energy_share(flat, region.reshape(len(region), -1))
    scores[~m.reshape(len(m), -1).any(axis=1)] = np.nan
    return scores


def relevance_rank_accuracy(a: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Relevance rank accuracy (Arras et al. 2022): share of the top-K pixels inside the mask, K = mask size.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W]; pixels are ranked by their channel sum (signed).
    masks : Tensor or ndarray
        Boolean ground truth [N, H, W] (or [N, 1, H, W]).

    Returns
    -------
    ndarray
        float64 [N] in [0, 1]; pixels tied at the K-th value count in proportion;
        ``NaN`` for an empty mask.
    """
    flat, region = _prepare(a, masks)
    scores = np.full(len(flat), np.nan)
    for i, (v, r) in enumerate(zip(flat, region)):
        k = int(r.sum())
        if k == 0:
            continue
        kth = np.partition(v, len(v) - k)[len(v) - k]
        above, tied = v > kth, v == kth
        # The K - |above| remaining picks fall on the tied pixels, each inside with probability |tied in mask| / |tied|.
        expected = (above & r).sum() + (k - above.sum()) * (tied & r).sum() / tied.sum()
        scores[i] = expected / k
    return scores


def relevance_mass_accuracy(a: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """Relevance mass accuracy (Arras et al. 2022): positive relevance inside the mask over positive relevance in total.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W]; relevance is the positive part of their channel sum.
    masks : Tensor or ndarray
        Boolean ground truth [N, H, W] (or [N, 1, H, W]).

    Returns
    -------
    ndarray
        float64 [N] in [0, 1]; 0 for a map without positive values; ``NaN`` for an empty mask.
    """
    flat, region = _prepare(a, masks)
    scores = _energy_share(np.clip(flat, 0.0, None), region)
    scores[~region.any(axis=1)] = np.nan
    return scores


def mask_auc(a: ArrayLike, masks: ArrayLike) -> np.ndarray:
    """ROC AUC of the map's values, the mask as labels.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W]; the scores are their channel sum (signed).
    masks : Tensor or ndarray
        Boolean ground truth [N, H, W] (or [N, 1, H, W]).

    Returns
    -------
    ndarray
        float64 [N] in [0, 1] (0.5 = chance); ``NaN`` for a mask that is empty or covers the image.
    """
    from scipy.stats import rankdata

    flat, region = _prepare(a, masks)
    scores = np.full(len(flat), np.nan)
    for i, (v, r) in enumerate(zip(flat, region)):
        pos = int(r.sum())
        neg = len(r) - pos
        if pos == 0 or neg == 0:
            continue
        # Mann-Whitney U from average ranks: equals the area under the ROC curve, ties counting one half.
        ranks = rankdata(v)
        scores[i] = (ranks[r].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return scores


def target_specificity(a: ArrayLike, target_masks: ArrayLike, other_masks: ArrayLike) -> np.ndarray:
    """Positive-energy share on the target's mask minus the share on the other objects' mask.

    Parameters
    ----------
    a : Tensor or ndarray
        Attributions [N, C, H, W] for the target class; energy is the positive part of their channel sum.
    target_masks : Tensor or ndarray
        Boolean mask of the target object [N, H, W] (or [N, 1, H, W]).
    other_masks : Tensor or ndarray
        Boolean mask of the other object(s) in the image, same shape.

    Returns
    -------
    ndarray
        float64 [N] in [-1, 1]; 0 for a map without positive values; ``NaN`` where
        either mask is empty (a single-object image has no specificity to measure).
    """
    maps = reduce_channels(a)
    t = _masks(target_masks, maps.shape, "target_masks").reshape(len(maps), -1)
    o = _masks(other_masks, maps.shape, "other_masks").reshape(len(maps), -1)
    positive = np.clip(maps.reshape(len(maps), -1), 0.0, None)
    scores = _energy_share(positive, t) - _energy_share(positive, o)
    scores[~t.any(axis=1) | ~o.any(axis=1)] = np.nan
    return scores


LOCALISATION_METRICS: Dict[str, Callable[..., np.ndarray]] = {
    "PointingGame": pointing_game,
    "EnergyPointingGame": energy_pointing_game,
    "RelevanceRankAccuracy": relevance_rank_accuracy,
    "RelevanceMassAccuracy": relevance_mass_accuracy,
    "MaskAUC": mask_auc,
    "TargetSpecificity": target_specificity,
}

HIGHER_IS_BETTER: Dict[str, bool] = {name: True for name in LOCALISATION_METRICS}

#: Every localisation metric needs the target's mask; these also need the other objects' mask.
MASK_METRICS: List[str] = list(LOCALISATION_METRICS)
OTHER_MASK_METRICS: List[str] = ["TargetSpecificity"]


def localisation_scores(name: str, a: ArrayLike, masks: Optional[ArrayLike] = None,
                        other_masks: Optional[ArrayLike] = None, **options: Any) -> np.ndarray:
    """Per-image scores [N] of localisation metric ``name`` (see :data:`LOCALISATION_METRICS`).

    Parameters
    ----------
    name : str
        A key of :data:`LOCALISATION_METRICS`.
    a : Tensor or ndarray
        Attributions [N, C, H, W].
    masks : Tensor or ndarray
        The target's boolean mask per image [N, H, W].
    other_masks : Tensor or ndarray, optional
        The other objects' mask per image (``TargetSpecificity`` only).
    **options
        Passed to the metric (e.g. ``tolerance`` for ``PointingGame``, ``box`` for ``EnergyPointingGame``).

    Returns
    -------
    ndarray
        float64 [N], ``NaN`` where the metric is undefined (count them with :func:`summarise_scores`).

    Raises
    ------
    ValueError
        For an unknown name, or when the masks the metric needs are missing.
    """
    if name not in LOCALISATION_METRICS:
        raise ValueError(f"unknown localisation metric {name!r}; choose from {', '.join(LOCALISATION_METRICS)}.")
    if masks is None:
        raise ValueError(f"{name} needs ground-truth masks (masks=[N, H, W] of the target's pixels); the metrics "
                         f"that need masks are {', '.join(MASK_METRICS)}: pass masks, or choose a metric that "
                         f"does not need them.")
    if name in OTHER_MASK_METRICS:
        if other_masks is None:
            raise ValueError(f"{name} also needs other_masks=[N, H, W], the pixels of the image's other objects.")
        return LOCALISATION_METRICS[name](a, masks, other_masks, **options)
    return LOCALISATION_METRICS[name](a, masks, **options)


def summarise_scores(scores: ArrayLike) -> Dict[str, float]:
    """Mean over the defined scores, with how many were used and how many were excluded (``NaN``).

    Parameters
    ----------
    scores : Tensor or ndarray
        Per-image scores [N].

    Returns
    -------
    dict
        ``{"mean": float, "n": int, "excluded": int}``; ``mean`` is ``NaN`` when no score is defined.
    """
    s = _numpy(scores).astype(np.float64).reshape(-1)
    valid = ~np.isnan(s)
    n = int(valid.sum())
    return {"mean": float(s[valid].mean()) if n else math.nan, "n": n, "excluded": int((~valid).sum())}
