"""The ten object classes and their rasteriser.

Every class is defined by its *outline* in a local unit frame (``u, v`` in about
``[-1, 1]``): circles by squared-radius comparisons, everything else by a fixed
polygon and the crossing-number test.  Colour and texture are drawn independently
of the class, so no class can be told apart by colour alone.

Only ``+ - * /``, ``floor`` and comparisons touch per-pixel arrays.  Those are
correctly rounded IEEE operations, so SIMD width (SSE, AVX2, AVX-512) cannot change
a single pixel; the rotation's ``cos``/``sin`` are evaluated once per object on
Python scalars, and the polygon vertices are literal constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np

__all__ = ["CLASSES", "TEXTURES", "ObjectSpec", "sample_object", "object_mask", "object_colours"]

#: Class names, in label order.  They differ in outline and parts, never in colour.
CLASSES: Tuple[str, ...] = ("disc", "ring", "square", "triangle", "cross", "star", "L", "H", "arrow", "crescent")

#: Surface patterns, drawn uniformly and independently of the class.
TEXTURES: Tuple[str, ...] = ("plain", "stripes", "checker", "noise")

#: Side of the random value grid behind the ``noise`` texture, in cells across the unit frame.
NOISE_CELLS = 6

Polygon = Tuple[Tuple[float, float], ...]

_POLYGONS: Dict[str, Polygon] = {
    "square": ((-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)),
    "triangle": ((0.0, -0.95), (0.95, 0.7), (-0.95, 0.7)),
    "cross": (
        (-0.28, -0.95), (0.28, -0.95), (0.28, -0.28), (0.95, -0.28), (0.95, 0.28), (0.28, 0.28),
        (0.28, 0.95), (-0.28, 0.95), (-0.28, 0.28), (-0.95, 0.28), (-0.95, -0.28), (-0.28, -0.28),
    ),
    # Five points at radius 1, five notches at radius 0.42, shifted down by 0.05 to centre the mass.
    "star": (
        (0.0, -0.95), (0.24687, -0.289787), (0.951057, -0.259017), (0.399444, 0.179787),
        (0.587785, 0.859017), (0.0, 0.47), (-0.587785, 0.859017), (-0.399444, 0.179787),
        (-0.951057, -0.259017), (-0.24687, -0.289787),
    ),
    "L": ((-0.7, -0.95), (-0.18, -0.95), (-0.18, 0.43), (0.75, 0.43), (0.75, 0.95), (-0.7, 0.95)),
    "H": (
        (-0.85, -0.95), (-0.4, -0.95), (-0.4, -0.22), (0.4, -0.22), (0.4, -0.95), (0.85, -0.95),
        (0.85, 0.95), (0.4, 0.95), (0.4, 0.22), (-0.4, 0.22), (-0.4, 0.95), (-0.85, 0.95),
    ),
    "arrow": ((-0.95, -0.24), (0.12, -0.24), (0.12, -0.72), (0.95, 0.0), (0.12, 0.72), (0.12, 0.24), (-0.95, 0.24)),
}


@dataclass(frozen=True, eq=False)
class ObjectSpec:
    """Everything needed to paint one object; drawn by :func:`sample_object`.

    Attributes
    ----------
    cls : int
        Index into :data:`CLASSES`.
    cx, cy : float
        Centre in pixels (pixel ``(x, y)`` has its centre at ``(x + 0.5, y + 0.5)``).
    radius : float
        Half-width of the unit frame in pixels.
    cos, sin : float
        Rotation of the unit frame.
    mirror : float
        ``1.0`` or ``-1.0``: the outline is reflected across its vertical axis when negative.
    texture : int
        Index into :data:`TEXTURES`.
    colour, shade : tuple of 3 floats
        The two colours the texture alternates between (``plain`` uses ``colour`` only).
    frequency : float
        Pattern cells per unit length for ``stripes`` and ``checker``.
    pattern_cos, pattern_sin : float
        Direction of the stripes in the unit frame.
    noise : numpy.ndarray
        ``[NOISE_CELLS, NOISE_CELLS]`` mixing weights in ``[0, 1]`` for the ``noise`` texture.
    """

    cls: int
    cx: float
    cy: float
    radius: float
    cos: float
    sin: float
    mirror: float
    texture: int
    colour: Tuple[float, float, float]
    shade: Tuple[float, float, float]
    frequency: float
    pattern_cos: float
    pattern_sin: float
    noise: np.ndarray

    def moved(self, cx: float, cy: float) -> "ObjectSpec":
        """The same object centred at ``(cx, cy)``."""
        fields = dict(self.__dict__)
        fields.update(cx=cx, cy=cy)
        return ObjectSpec(**fields)


def sample_object(rng: np.random.Generator, cls: int, size: int) -> ObjectSpec:
    """Draw position, scale, rotation, mirror, texture and colours of one object of class ``cls``.

    Parameters
    ----------
    rng : numpy.random.Generator
        The scene's generator; the draws happen in a fixed order.
    cls : int
        Class index.
    size : int
        Image side in pixels; scale and position are drawn relative to it.

    Returns
    -------
    ObjectSpec
    """
    radius = size * rng.uniform(0.17, 0.27)
    cx, cy = rng.uniform(radius, size - radius, size=2)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    mirror = 1.0 if rng.random() < 0.5 else -1.0
    texture = int(rng.integers(len(TEXTURES)))
    colour = rng.uniform(0.0, 1.0, size=3)
    # The second colour is a darker or lighter version of the first, so the pattern reads as texture.
    factor = rng.uniform(0.45, 0.75)
    shade = colour * factor if rng.random() < 0.5 else 1.0 - (1.0 - colour) * factor
    frequency = rng.uniform(1.6, 3.2)
    pattern_angle = rng.uniform(0.0, math.pi)
    noise = rng.random((NOISE_CELLS, NOISE_CELLS))
    return ObjectSpec(
        cls=int(cls),
        cx=float(cx),
        cy=float(cy),
        radius=float(radius),
        cos=math.cos(angle),
        sin=math.sin(angle),
        mirror=mirror,
        texture=texture,
        colour=tuple(float(c) for c in colour),
        shade=tuple(float(c) for c in shade),
        frequency=float(frequency),
        pattern_cos=math.cos(pattern_angle),
        pattern_sin=math.sin(pattern_angle),
        noise=noise,
    )


def local_coordinates(spec: ObjectSpec, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel centres in the object's unit frame, two ``[size, size]`` float64 arrays."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    dx = (centres - spec.cx)[None, :]
    dy = (centres - spec.cy)[:, None]
    u = (dx * spec.cos + dy * spec.sin) / spec.radius * spec.mirror
    v = (dy * spec.cos - dx * spec.sin) / spec.radius
    return u, v


def _inside_polygon(u: np.ndarray, v: np.ndarray, polygon: Polygon) -> np.ndarray:
    """Crossing-number point-in-polygon test; arithmetic and comparisons only."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(polygon)
    for k in range(count):
        x1, y1 = polygon[k]
        x2, y2 = polygon[(k + 1) % count]
        if y1 == y2:
            # A horizontal edge never straddles a row under the half-open rule below.
            continue
        slope = (x2 - x1) / (y2 - y1)
        straddles = (v < y1) != (v < y2)
        inside ^= straddles & (u < (v - y1) * slope + x1)
    return inside


def object_mask(spec: ObjectSpec, size: int, uv: "Tuple[np.ndarray, np.ndarray] | None" = None) -> np.ndarray:
    """The pixels (centres) covered by the object, a ``[size, size]`` bool array.

    Parameters
    ----------
    spec : ObjectSpec
        The object.
    size : int
        Image side in pixels.
    uv : tuple of numpy.ndarray, optional
        Precomputed local coordinates from the same ``spec`` and ``size``.

    Returns
    -------
    numpy.ndarray
    """
    u, v = uv if uv is not None else local_coordinates(spec, size)
    name = CLASSES[spec.cls]
    if name in _POLYGONS:
        return _inside_polygon(u, v, _POLYGONS[name])
    rho = u * u + v * v
    if name == "disc":
        return rho <= 0.9025
    if name == "ring":
        return (rho <= 1.0) & (rho >= 0.3025)
    if name == "crescent":
        shifted = (u - 0.5) * (u - 0.5) + v * v
        return (rho <= 1.0) & (shifted > 0.64)
    raise AssertionError(f"class {name!r} has no outline")  # pragma: no cover - CLASSES and outlines agree


def object_colours(spec: ObjectSpec, size: int, uv: "Tuple[np.ndarray, np.ndarray] | None" = None) -> np.ndarray:
    """The textured surface over the whole image, ``[size, size, 3]`` float64 (masked later).

    Parameters
    ----------
    spec : ObjectSpec
        The object.
    size : int
        Image side in pixels.
    uv : tuple of numpy.ndarray, optional
        Precomputed local coordinates from the same ``spec`` and ``size``.

    Returns
    -------
    numpy.ndarray
    """
    u, v = uv if uv is not None else local_coordinates(spec, size)
    texture = TEXTURES[spec.texture]
    colour = np.asarray(spec.colour, dtype=np.float64)
    shade = np.asarray(spec.shade, dtype=np.float64)
    if texture == "plain":
        return np.broadcast_to(colour, (size, size, 3)).copy()
    if texture == "stripes":
        phase = np.floor((u * spec.pattern_cos + v * spec.pattern_sin) * spec.frequency)
        weight = phase - np.floor(phase / 2.0) * 2.0
    elif texture == "checker":
        phase = np.floor(u * spec.frequency) + np.floor(v * spec.frequency)
        weight = phase - np.floor(phase / 2.0) * 2.0
    else:
        cells = NOISE_CELLS
        row = np.clip(np.floor((v + 1.0) * (cells / 2.0)), 0, cells - 1).astype(np.intp)
        col = np.clip(np.floor((u + 1.0) * (cells / 2.0)), 0, cells - 1).astype(np.intp)
        weight = spec.noise[row, col]
    weight = weight[:, :, None]
    return colour * (1.0 - weight) + shade * weight
