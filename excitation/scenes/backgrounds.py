"""Natural-photo backgrounds: random crops, flips, zooms and colour jitter of photos bundled with scikit-image.

Only photos whose PNG files ship inside the ``skimage`` wheel are used (``astronaut``,
``chelsea``, ``coffee``, ``camera``, ``grass``, ``gravel``, ``brick``, ``moon``), so
nothing is fetched and decoding is lossless: the same bytes on every machine.  JPEG
photos (``rocket``, ``hubble_deep_field``) are avoided because decoders may round
differently.  Grayscale photos are tinted by the colour jitter.

Each photo is box-downsampled once (by an integer factor, to a short side near
:data:`SHORT_SIDE`) and cached, and crops are resampled with a bilinear kernel written
here in plain arithmetic, so no library resize kernel can change the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

import numpy as np

__all__ = ["PHOTOS", "photos", "BackgroundSpec", "sample_background", "render_background", "resize_bilinear"]

#: The ``skimage.data`` photos used, all PNGs inside the installed package.
PHOTOS: Tuple[str, ...] = ("astronaut", "chelsea", "coffee", "camera", "grass", "gravel", "brick", "moon")

#: Photos are box-downsampled to about this short side before cropping.
SHORT_SIDE = 192


@lru_cache(maxsize=1)
def photos() -> Tuple[np.ndarray, ...]:
    """The background photos as ``[H, W, 3]`` float64 arrays in ``[0, 1]``, loaded once.

    Returns
    -------
    tuple of numpy.ndarray

    Raises
    ------
    ImportError
        If scikit-image is not installed.
    """
    try:
        import skimage.data
    except ImportError as exc:  # pragma: no cover - scikit-image is a dependency
        raise ImportError("excitation.scenes needs scikit-image for its backgrounds: pip install scikit-image") from exc
    loaded = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        if pixels.ndim == 2:
            pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        pixels = pixels[:, :, :3].astype(np.float64) / 255.0
        factor = max(1, min(pixels.shape[:2]) // SHORT_SIDE)
        if factor > 1:
            h, w = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
            # Elementwise adds in a fixed order: library reductions may reorder sums per CPU.
            total = np.zeros((h // factor, w // factor, 3))
            for dy in range(factor):
                for dx in range(factor):
                    total += pixels[dy:h:factor, dx:w:factor]
            pixels = total / float(factor * factor)
        loaded.append(np.ascontiguousarray(pixels))
    return tuple(loaded)


def resize_bilinear(image: np.ndarray, top: float, left: float, side: float, size: int) -> np.ndarray:
    """Resample the square ``image[top:top+side, left:left+side]`` to ``[size, size, C]``, bilinearly.

    Sample positions are pixel centres (``align_corners=False``), clamped at the border.

    Parameters
    ----------
    image : numpy.ndarray
        ``[H, W, C]`` float64.
    top, left, side : float
        The crop, in source pixels.
    size : int
        Output side.

    Returns
    -------
    numpy.ndarray
    """
    step = side / size
    out_centres = np.arange(size, dtype=np.float64) + 0.5
    ys = np.clip(top + out_centres * step - 0.5, 0.0, image.shape[0] - 1.0)
    xs = np.clip(left + out_centres * step - 0.5, 0.0, image.shape[1] - 1.0)
    y0 = np.floor(ys).astype(np.intp)
    x0 = np.floor(xs).astype(np.intp)
    y1 = np.minimum(y0 + 1, image.shape[0] - 1)
    x1 = np.minimum(x0 + 1, image.shape[1] - 1)
    wy = (ys - y0)[:, None, None]
    wx = (xs - x0)[None, :, None]
    flat = image.reshape(-1, image.shape[2])
    width = image.shape[1]

    def gather(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        # np.take on flat indices: an exact copy, several times faster than 2-D fancy indexing.
        return np.take(flat, (rows[:, None] * width + cols[None, :]).ravel(), axis=0).reshape(size, size, -1)

    top_row = gather(y0, x0) * (1.0 - wx) + gather(y0, x1) * wx
    bottom_row = gather(y1, x0) * (1.0 - wx) + gather(y1, x1) * wx
    return top_row * (1.0 - wy) + bottom_row * wy


@dataclass(frozen=True)
class BackgroundSpec:
    """One background: which photo, the crop, flips and colour jitter.

    Attributes
    ----------
    photo : int
        Index into :data:`PHOTOS`.
    top, left, side : float
        The crop in the cached (downsampled) photo.
    flip_x, flip_y, transpose : bool
        Mirror left-right, mirror top-bottom, swap axes.
    gains : tuple of 3 floats
        Per-channel multipliers (tint and brightness).
    contrast : float
        Scale of deviations from the crop's mean grey.
    grey : float
        Blend towards the crop's grey version, ``0`` (none) to ``1``.
    """

    photo: int
    top: float
    left: float
    side: float
    flip_x: bool
    flip_y: bool
    transpose: bool
    gains: Tuple[float, float, float]
    contrast: float
    grey: float


def sample_background(rng: np.random.Generator, size: int) -> BackgroundSpec:
    """Draw one background's photo, crop, flips and colour jitter.

    Parameters
    ----------
    rng : numpy.random.Generator
        The scene's generator; the draws happen in a fixed order.
    size : int
        Output side; the crop is between one and three times that, within the photo.

    Returns
    -------
    BackgroundSpec
    """
    photo = int(rng.integers(len(PHOTOS)))
    height, width = photos()[photo].shape[:2]
    side = min(size * rng.uniform(1.0, 3.0), float(min(height, width)))
    top = rng.uniform(0.0, height - side)
    left = rng.uniform(0.0, width - side)
    flip_x, flip_y, transpose = (bool(b) for b in rng.random(3) < 0.5)
    brightness = rng.uniform(0.6, 1.3)
    gains = tuple(float(brightness * g) for g in rng.uniform(0.75, 1.25, size=3))
    contrast = float(rng.uniform(0.4, 0.9))
    grey = float(rng.random() < 0.2)
    return BackgroundSpec(photo, float(top), float(left), float(side), flip_x, flip_y, transpose, gains, contrast, grey)


def render_background(spec: BackgroundSpec, size: int) -> np.ndarray:
    """The background, ``[size, size, 3]`` float64 in ``[0, 1]``.

    Parameters
    ----------
    spec : BackgroundSpec
        From :func:`sample_background` with the same ``size``.
    size : int
        Output side.

    Returns
    -------
    numpy.ndarray
    """
    image = resize_bilinear(photos()[spec.photo], spec.top, spec.left, spec.side, size)
    if spec.flip_x:
        image = image[:, ::-1]
    if spec.flip_y:
        image = image[::-1]
    if spec.transpose:
        image = image.transpose(1, 0, 2)
    luma = (image[:, :, 0] + image[:, :, 1] + image[:, :, 2]) / 3.0
    if spec.grey:
        image = np.repeat(luma[:, :, None], 3, axis=2)
    # Summed as integers (2**-40 steps), so the mean cannot depend on a SIMD reduction order.
    mean = float(np.floor(luma * 2.0**40).astype(np.int64).sum()) / 2.0**40 / luma.size
    image = (image - mean) * spec.contrast + mean
    image = image * np.asarray(spec.gains, dtype=np.float64)
    return np.clip(image, 0.0, 1.0)
