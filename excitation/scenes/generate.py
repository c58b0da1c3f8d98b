"""Seeded scenes with exact ground truth: one or two shapes on a natural-photo background.

Scene ``i`` of seed ``s`` is drawn from its own ``numpy.random.default_rng([s, i])``,
so any subset can be regenerated alone and the bytes do not depend on ``n``.  The
draws come in a fixed order: object count, classes (uniform, without replacement),
background, then each object.  :func:`make_labels` stops after the classes, which is
why it reproduces :func:`make_scenes`'s labels at a fraction of the cost.

Why 64 x 64 by default: it is the smallest side at which a ResNet stem (stride-2
convolution, then stride-2 max-pool) still leaves 16 x 16 feature maps and a further
stride-2 stage 8 x 8, fine enough for Grad-CAM and pullbacks to show *which* object
and *which part* of it a class uses; shapes of 11-17 pixel radius keep their corners,
notches and holes legible; and 20 000 scenes (245 MB as bytes) render in well under
a minute, so two small CNNs train on them in minutes on two CPU cores.  ``size=96``
(or any side >= 32) scales every object and crop with it.

Ground truth is exact because nothing is blended: each pixel shows either the
background or exactly one object (the one painted last that covers the pixel's
centre).  ``masks[c]`` is where class ``c``'s object is *visible*, so an object
partly hidden by the other loses those pixels.  The object painted second never
hides more than 15 % of the first (its position is redrawn, up to 50 times, until
it does not): hide more and the part that tells two classes apart (an arrow's head,
an L's short arm) can vanish, so the label would no longer follow from the pixels.

Determinism across machines: per-pixel work is ``+ - * /``, ``floor`` and comparisons
in float64 (correctly rounded, so SIMD width cannot matter), means are summed as integers,
``cos``/``sin`` run on Python scalars once per object, and the result is quantised to
``uint8`` before it becomes a float32 tensor.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .backgrounds import BackgroundSpec, render_background, sample_background
from .shapes import CLASSES, ObjectSpec, local_coordinates, object_colours, object_mask, sample_object

__all__ = ["Scenes", "SceneSpec", "make_scenes", "make_labels", "scene_spec", "render_scene", "MIN_SIZE"]

#: Smallest supported image side: below it the smallest objects lose their parts.
MIN_SIZE = 32

#: Probability of a second object.
TWO_OBJECTS = 0.5

#: The first object keeps at least this fraction of its pixels visible.
MIN_VISIBLE = 0.85

#: Attempts at placing the second object before accepting whatever overlap the last one gave.
PLACEMENT_TRIES = 50

#: Above this many scenes, ``progress=None`` shows a progress bar.
PROGRESS_FROM = 2000


@dataclass(frozen=True, eq=False)
class SceneSpec:
    """Everything needed to render one scene.

    Attributes
    ----------
    background : BackgroundSpec
        The photo crop and its colour jitter.
    objects : tuple of ObjectSpec
        In painting order: a later object hides an earlier one where they overlap.
    """

    background: BackgroundSpec
    objects: Tuple[ObjectSpec, ...]

    @property
    def classes(self) -> Tuple[int, ...]:
        """The class index of each object, in painting order."""
        return tuple(obj.cls for obj in self.objects)


@dataclass(frozen=True, eq=False)
class Scenes:
    """A batch of scenes with their labels and visible-pixel masks.

    Attributes
    ----------
    images : Tensor
        ``[N, 3, H, W]`` float32 in ``[0, 1]``, multiples of ``1 / 255``.
    labels : Tensor
        ``[N, 10]`` float32 multi-hot, in :data:`CLASSES` order.
    masks : Tensor
        ``[N, 10, H, W]`` bool: the visible pixels of each present class's object,
        all ``False`` for absent classes.
    """

    images: Tensor
    labels: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: Union[int, slice, Sequence[int], Tensor]) -> "Scenes":
        """The selected scenes as a new :class:`Scenes`; an integer keeps the batch axis."""
        if isinstance(index, numbers.Integral):
            index = slice(int(index), int(index) + 1) if index != -1 else slice(-1, None)
        return Scenes(self.images[index], self.labels[index], self.masks[index])


def _check_int(value: object, name: str, minimum: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; {hint}.")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {hint}.")
    return int(value)


def _check(n: int, seed: int, size: Optional[int] = None) -> None:
    _check_int(n, "n", 1, "ask for at least one scene")
    _check_int(seed, "seed", 0, "use a non-negative integer seed")
    if size is not None:
        _check_int(size, "size", MIN_SIZE, f"use size={MIN_SIZE} or more (64 is the default)")


def _draw_classes(rng: np.random.Generator) -> np.ndarray:
    count = 2 if rng.random() < TWO_OBJECTS else 1
    return rng.choice(len(CLASSES), size=count, replace=False)


def scene_spec(seed: int, index: int, size: int = 64) -> SceneSpec:
    """Draw scene ``index`` of ``seed``: what :func:`make_scenes` renders at that position.

    Parameters
    ----------
    seed, index : int
        Non-negative; the scene's generator is ``numpy.random.default_rng([seed, index])``.
    size : int
        Image side in pixels.

    Returns
    -------
    SceneSpec

    Raises
    ------
    TypeError, ValueError
        For a negative or non-integer ``seed`` or ``index``, or ``size < 32``.
    """
    _check(1, seed, size)
    _check_int(index, "index", 0, "scene indices start at 0")
    rng = np.random.default_rng([seed, index])
    classes = _draw_classes(rng)
    background = sample_background(rng, size)
    objects = [sample_object(rng, cls, size) for cls in classes]
    if len(objects) == 2:
        first = object_mask(objects[0], size)
        area = int(first.sum())
        for _ in range(PLACEMENT_TRIES):
            hidden = int((first & object_mask(objects[1], size)).sum())
            if area - hidden >= MIN_VISIBLE * area:
                break
            radius = objects[1].radius
            cx, cy = rng.uniform(radius, size - radius, size=2)
            objects[1] = objects[1].moved(float(cx), float(cy))
    return SceneSpec(background, tuple(objects))


def render_scene(
    spec: SceneSpec, size: int = 64, *, objects: Optional[Sequence[int]] = None, flat: Optional[float] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """Paint a scene and return its pixels and each painted object's visible pixels.

    Parameters
    ----------
    spec : SceneSpec
        From :func:`scene_spec` with the same ``size``.
    size : int
        Image side in pixels.
    objects : sequence of int, optional
        Positions in ``spec.objects`` to paint (in painting order); default all.
        ``objects=[]`` gives the background alone.
    flat : float, optional
        Paint on a constant grey of this value in ``[0, 1]`` instead of the photo.

    Returns
    -------
    image : numpy.ndarray
        ``[size, size, 3]`` uint8.
    visible : numpy.ndarray
        ``[len(spec.objects), size, size]`` bool; rows of objects not painted are all ``False``.
    """
    if flat is None:
        canvas = render_background(spec.background, size)
    else:
        canvas = np.full((size, size, 3), float(flat))
    chosen = range(len(spec.objects)) if objects is None else sorted(set(int(k) for k in objects))
    visible = np.zeros((len(spec.objects), size, size), dtype=bool)
    for k in chosen:
        obj = spec.objects[k]
        uv = local_coordinates(obj, size)
        cover = object_mask(obj, size, uv)
        canvas = np.where(cover[:, :, None], object_colours(obj, size, uv), canvas)
        visible &= ~cover
        visible[k] = cover
    image = np.floor(np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return image, visible


def render_batch(
    n: int, seed: int, size: int, *, masks: bool, progress: Optional[bool]
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """``uint8 [N, 3, H, W]`` images, float32 ``[N, 10]`` labels and, if asked, bool ``[N, 10, H, W]`` masks."""
    from tqdm.auto import tqdm

    images = np.empty((n, 3, size, size), dtype=np.uint8)
    labels = np.zeros((n, len(CLASSES)), dtype=np.float32)
    all_masks = np.zeros((n, len(CLASSES), size, size), dtype=bool) if masks else None
    show = n >= PROGRESS_FROM if progress is None else bool(progress)
    for i in tqdm(range(n), desc=f"scenes (seed {seed})", disable=not show, unit="scene"):
        spec = scene_spec(seed, i, size)
        image, visible = render_scene(spec, size)
        images[i] = image.transpose(2, 0, 1)
        for k, cls in enumerate(spec.classes):
            labels[i, cls] = 1.0
            if all_masks is not None:
                all_masks[i, cls] = visible[k]
    return images, labels, all_masks


def make_scenes(n: int, seed: int, size: int = 64, *, progress: Optional[bool] = None) -> Scenes:
    """Generate ``n`` scenes of ``seed``: images, multi-hot labels and visible-pixel masks.

    Parameters
    ----------
    n : int
        Number of scenes, >= 1.  Scene ``i`` does not depend on ``n``.
    seed : int
        Non-negative; the same seed gives the same bytes on any machine.
    size : int
        Image side in pixels, >= 32 (default 64).
    progress : bool, optional
        Show a tqdm bar; by default only from 2000 scenes.

    Returns
    -------
    Scenes

    Raises
    ------
    TypeError, ValueError
        For a non-integer or out-of-range ``n``, ``seed`` or ``size``.
    """
    _check(n, seed, size)
    images, labels, masks = render_batch(n, seed, size, masks=True, progress=progress)
    return Scenes(
        images=torch.from_numpy(images).to(torch.float32) / 255.0,
        labels=torch.from_numpy(labels),
        masks=torch.from_numpy(masks),
    )


def make_labels(n: int, seed: int) -> Tensor:
    """The labels :func:`make_scenes` would give, without rendering: ``[n, 10]`` float32 multi-hot.

    The classes are a scene's first draws, so this follows the very same random
    sequence and stops there; the labels do not depend on ``size``.

    Parameters
    ----------
    n : int
        Number of scenes, >= 1.
    seed : int
        Non-negative.

    Returns
    -------
    Tensor

    Raises
    ------
    TypeError, ValueError
        For a non-integer or out-of-range ``n`` or ``seed``.
    """
    _check(n, seed)
    labels = np.zeros((n, len(CLASSES)), dtype=np.float32)
    for i in range(n):
        labels[i, _draw_classes(np.random.default_rng([seed, i]))] = 1.0
    return torch.from_numpy(labels)

