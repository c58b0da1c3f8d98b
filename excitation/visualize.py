"""See an attribution: heatmaps, overlays and figure grids, without a display.

The three entry points follow what users of Captum (``visualize_image_attr``), zennit
(``imgify`` with a symmetric map) and pytorch-grad-cam (``show_cam_on_image``) expect:

* :func:`heatmap` turns one attribution ``[C, H, W]`` (or ``[H, W]``) into a :class:`Heatmap`,
  an RGB ``uint8`` picture that shows inline in Jupyter, converts to PIL and saves;
* :func:`overlay` blends that heatmap over the image it explains;
* :func:`grid` lays out images x explainers as a :class:`matplotlib.figure.Figure`, with
  scales shared per row or per figure and a colour bar; :func:`save` writes it as PNG,
  SVG or PDF by the file's suffix.

Colour maps
-----------
A signed map (``sign="all"``) is drawn with ``"RdBu_r"`` (ColorBrewer's red-blue, reversed so
that positive evidence is red, as in zennit's ``bwr`` and most saliency papers).  ColorBrewer
rates RdBu colour-blind safe: its two arms differ in hue *and* run through matching lightness
steps to a near-white centre, so they stay apart under deuteranopia and protanopia, where the
red-green of Captum's default and the equal-lightness arms of ``coolwarm`` do not, and unlike
``bwr`` (linear in RGB) equal magnitudes of either sign look equally strong.  ``"PuOr"`` is
the alternative to pass when red/blue carries another meaning.  Zero is drawn as the colour
map's exact centre colour: colours come from a look-up table of odd length (257), so the
value 0 lands on the entry evaluated at 0.5 rather than between two entries.

An unsigned map (``"positive"``, ``"negative"``, ``"absolute"``) is drawn with ``"cividis"``,
built so that viewers with and without colour-vision deficiency see the same map with
monotonic lightness (Nuñez, Anderton & Renslow, 2018); zero is its darkest colour.

Scales
------
``clip=99.5`` maps the 99.5th percentile of ``|values|`` to the colour map's ends, the same
value on both sides of a signed map, so a few extreme pixels cannot wash out the rest;
values beyond saturate.  ``scale=`` gives that value explicitly, which is how maps share a
scale: equal values then get equal colours in every map.

Examples
--------
>>> import torch
>>> from excitation import visualize
>>> attribution = torch.randn(3, 32, 32)
>>> hm = visualize.heatmap(attribution)            # signed, summed over channels
>>> hm.rgb.shape, hm.rgb.dtype
((32, 32, 3), dtype('uint8'))
>>> image = torch.rand(3, 32, 32)
>>> visualize.overlay(image, attribution, alpha=0.5).rgb.shape
(32, 32, 3)
>>> fig = visualize.grid(image[None], {"pullback": attribution[None]})
>>> type(fig).__name__
'GridFigure'

Why one module: heatmaps, overlays and grids share one scaling (percentile clip, shared
scales) and one colour table; split apart, each would reach into the others' internals.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from matplotlib.figure import Figure  # not pyplot: no backend, no display

__all__ = [
    "Heatmap",
    "GridFigure",
    "heatmap",
    "heatmaps",
    "overlay",
    "shared_scale",
    "grid",
    "save",
    "to_image",
    "REDUCTIONS",
    "SIGNS",
    "VIEWS",
    "SIGNED_CMAP",
    "UNSIGNED_CMAP",
]

PathLike = Union[str, Path]
ArrayLike = Any  # torch.Tensor, numpy.ndarray (or anything np.asarray takes)

#: Channel reductions of :func:`heatmap`; ``"rgb"`` keeps the channels and shows the map as an image.
REDUCTIONS = ("sum", "abs-sum", "l2", "mean", "rgb")
#: What of the sign :func:`heatmap` shows.
SIGNS = ("all", "positive", "negative", "absolute")
#: What :func:`heatmap` draws: the attribution, or the attribution times the image.
VIEWS = ("attribution", "input-x-attribution")
#: Default colour map of signed maps (colour-blind safe diverging, neutral centre).
SIGNED_CMAP = "RdBu_r"
#: Default colour map of unsigned maps (colour-blind safe sequential).
UNSIGNED_CMAP = "cividis"
#: Entries of the colour look-up table; odd so that its middle entry is the map at exactly 0.5.
LUT_SIZE = 257
#: The suffixes :func:`save` writes.
FORMATS = (".png", ".svg", ".pdf")


# ----------------------------------------------------------------------------- inputs
def _to_numpy(value: ArrayLike, argument: str) -> np.ndarray:
    """A float64 ndarray from a tensor (any device, with or without grad) or an array."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.dtype.is_complex:
            raise TypeError(f"{argument} is a complex tensor; pass its real part or abs().")
        value = value.float().numpy()
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{argument} must be a torch.Tensor or numpy array, got {type(value).__name__}.") from exc
    return array


def _attribution_chw(attribution: ArrayLike, argument: str = "attribution") -> np.ndarray:
    a = _to_numpy(attribution, argument)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        hint = (" For a batch [N, C, H, W] use heatmaps(...) or grid(...), or index one map: attribution[i]."
                if a.ndim == 4 else "")
        raise ValueError(f"{argument} must be [C, H, W] or [H, W], got shape {tuple(a.shape)}.{hint}")
    if a.shape[0] > 4 and a.shape[-1] in (1, 3, 4):
        raise ValueError(f"{argument} has shape {tuple(a.shape)}, which looks channels-last [H, W, C]; "
                         f"pass it channels-first: attribution.permute(2, 0, 1) or np.moveaxis(a, -1, 0).")
    if not np.isfinite(a).all():
        raise ValueError(f"{argument} holds NaN or infinite values; check the explainer (e.g. torch.nan_to_num).")
    return a


def to_image(image: ArrayLike, argument: str = "image") -> np.ndarray:
    """An image as float64 ``[C, H, W]`` in ``[0, 1]`` (C = 1 or 3).

    Parameters
    ----------
    image : Tensor, ndarray or PIL.Image.Image
        ``[C, H, W]`` or ``[H, W]`` with values in ``[0, 1]``, or a PIL image (any mode; made RGB).

    Raises
    ------
    ValueError
        If the shape is not ``[1|3, H, W]`` / ``[H, W]`` or values leave ``[0, 1]``.
    """
    if hasattr(image, "convert") and hasattr(image, "size") and not hasattr(image, "shape"):  # PIL image
        rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        return np.moveaxis(rgb, -1, 0)
    x = _to_numpy(image, argument)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        channels_last = x.ndim == 3 and x.shape[-1] in (1, 3)
        hint = " It looks channels-last: pass image.permute(2, 0, 1) (torch) or np.moveaxis(a, -1, 0)." if channels_last else ""
        raise ValueError(f"{argument} must be [1, H, W], [3, H, W] or [H, W] in [0, 1], got shape {tuple(x.shape)}.{hint}")
    if not np.isfinite(x).all():
        raise ValueError(f"{argument} holds NaN or infinite values.")
    low, high = float(x.min()), float(x.max())
    if low < -1e-6 or high > 1 + 1e-6:
        hint = " (uint8 pixels? divide by 255)" if high > 1 + 1e-6 and high <= 255 else ""
        raise ValueError(f"{argument} must hold values in [0, 1], got [{low:.3g}, {high:.3g}]{hint}; "
                         f"pass the un-normalised pixels.")
    return np.clip(x, 0.0, 1.0)


def _image_rgb8(image: np.ndarray, grey: bool = False) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> ``uint8 [H, W, 3]``; ``grey`` takes the luma (ITU-R BT.601) first."""
    if image.shape[0] == 3 and grey:
        image = np.tensordot(np.array([0.299, 0.587, 0.114]), image, axes=1)[None]
    if image.shape[0] == 1:
        image = np.repeat(image, 3, 0)
    return np.round(np.moveaxis(image, 0, -1) * 255.0).astype(np.uint8)


def _check_option(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; choose one of {', '.join(repr(a) for a in allowed)}.")


# ----------------------------------------------------------------------------- values
def _values(
    attribution: ArrayLike, reduce: str, sign: str, view: str, image: Optional[ArrayLike]
) -> np.ndarray:
    """The numbers a heatmap colours: ``[H, W]`` (or ``[C, H, W]`` for ``reduce="rgb"``), sign applied.

    Signed (``sign="all"``) values keep their sign; the others are magnitudes >= 0.
    """
    _check_option("reduce", reduce, REDUCTIONS)
    _check_option("sign", sign, SIGNS)
    _check_option("view", view, VIEWS)
    a = _attribution_chw(attribution)
    if view == "input-x-attribution":
        if image is None:
            raise ValueError("view='input-x-attribution' multiplies by the image: pass image=<the input, [C, H, W] in [0, 1]>.")
        x = to_image(image)
        if x.shape[-2:] != a.shape[-2:] or x.shape[0] not in (1, a.shape[0]):
            raise ValueError(f"image {tuple(x.shape)} does not fit attribution {tuple(a.shape)} for input x attribution: "
                             f"same H, W and channels (or 1 channel).")
        a = a * x
    if reduce == "sum":
        v = a.sum(0)
    elif reduce == "abs-sum":
        v = np.abs(a).sum(0)
    elif reduce == "l2":
        v = np.sqrt((a * a).sum(0))
    elif reduce == "mean":
        v = a.mean(0)
    else:  # "rgb": the attribution itself, channel by channel
        v = a
    if sign == "positive":
        v = np.maximum(v, 0.0)
    elif sign == "negative":
        v = np.maximum(-v, 0.0)
    elif sign == "absolute":
        v = np.abs(v)
    return v


def _percentile_scale(values: Sequence[np.ndarray], clip: Optional[float]) -> float:
    if clip is not None and (isinstance(clip, bool) or not 0 < float(clip) <= 100):
        raise ValueError(f"clip={clip!r} must be a percentile in (0, 100] (or None for the maximum).")
    magnitudes = np.concatenate([np.abs(v).ravel() for v in values])
    if magnitudes.size == 0:
        return 0.0
    if clip is None or float(clip) == 100:
        return float(magnitudes.max())
    return float(np.percentile(magnitudes, float(clip)))


def shared_scale(
    attributions: Sequence[ArrayLike],
    *,
    reduce: str = "sum",
    sign: str = "all",
    clip: Optional[float] = 99.5,
    view: str = "attribution",
    images: Optional[Sequence[Optional[ArrayLike]]] = None,
) -> float:
    """One scale for several maps: the ``clip`` percentile of ``|values|`` over all of them.

    Pass the result as ``scale=`` to :func:`heatmap`/:func:`overlay` so that equal values get
    equal colours in every map.

    Parameters
    ----------
    attributions : sequence of [C, H, W] or [H, W] maps
        Maps of any sizes.
    reduce, sign, clip, view
        As for :func:`heatmap`.
    images : sequence, optional
        One image per map, for ``view="input-x-attribution"``.

    Returns
    -------
    float
        The value mapped to the colour map's ends (0.0 if every map is all zeros).

    Examples
    --------
    >>> import numpy as np
    >>> shared_scale([np.ones((1, 2, 2)), 3 * np.ones((1, 2, 2))], clip=None)
    3.0
    """
    images = [None] * len(attributions) if images is None else list(images)
    if len(images) != len(attributions):
        raise ValueError(f"shared_scale: {len(attributions)} attributions but {len(images)} images.")
    return _percentile_scale([_values(a, reduce, sign, view, x) for a, x in zip(attributions, images)], clip)


# ----------------------------------------------------------------------------- colours
def _colormap(name: Any):
    """A matplotlib colour map by name or object (a clear error for unknown names)."""
    import matplotlib

    if not isinstance(name, str):
        return name
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"cmap={name!r} is not a matplotlib colour map; e.g. {SIGNED_CMAP!r}, 'PuOr' (signed) "
                         f"or {UNSIGNED_CMAP!r}, 'viridis' (unsigned).") from None


def _lut(cmap: Any) -> np.ndarray:
    """``uint8 [LUT_SIZE, 3]``: the colour map evaluated at ``linspace(0, 1, LUT_SIZE)``."""
    resampled = _colormap(cmap).resampled(LUT_SIZE)
    return np.round(resampled(np.arange(LUT_SIZE))[:, :3] * 255.0).astype(np.uint8)


def _quantise(t: np.ndarray) -> np.ndarray:
    """Positions in [0, 1] -> LUT indices; 0.5 -> the middle entry exactly."""
    return np.rint(np.clip(t, 0.0, 1.0) * (LUT_SIZE - 1)).astype(np.intp)


# ----------------------------------------------------------------------------- Heatmap
@dataclass(frozen=True, eq=False)
class Heatmap:
    """A rendered attribution map.

    Attributes
    ----------
    rgb : ndarray
        ``uint8 [H, W, 3]``: the picture.
    scale : float
        The value mapped to the colour map's end (``+scale`` and ``-scale`` for signed maps);
        larger magnitudes saturate.  0.0 for an all-zero map.
    signed : bool
        True when the colours run from ``-scale`` through 0 to ``+scale``.
    cmap : str or None
        The colour map's name (``None`` for ``reduce="rgb"``, drawn as an image around grey).
    values : ndarray
        The numbers that were coloured (after ``view``, ``reduce`` and ``sign``): ``[H, W]``,
        or ``[C, H, W]`` for ``reduce="rgb"``.
    """

    rgb: np.ndarray
    scale: float
    signed: bool = True
    cmap: Optional[str] = None
    values: Optional[np.ndarray] = field(default=None, repr=False)
    _source: Any = field(default=None, repr=False)  # the colour map as given (a name or a Colormap object)

    @property
    def limits(self) -> Tuple[float, float]:
        """``(vmin, vmax)`` of the colour scale: ``(-scale, scale)`` if signed, else ``(0, scale)``."""
        return (-self.scale if self.signed else 0.0, self.scale)

    def colormap(self):
        """The matplotlib colour map this heatmap was drawn with (grey for ``reduce="rgb"``), for colour bars."""
        if self.cmap is None:
            return _colormap("gray")
        from matplotlib.colors import ListedColormap

        return ListedColormap(_lut(self._source if self._source is not None else self.cmap) / 255.0, name=self.cmap)

    def to_pil(self):
        """The picture as a ``PIL.Image.Image`` (mode RGB)."""
        from PIL import Image

        return Image.fromarray(self.rgb, mode="RGB") if _pil_takes_mode() else Image.fromarray(self.rgb)

    def save(self, path: PathLike) -> Path:
        """Write the picture at its own pixel size (format from the suffix, e.g. ``.png``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_pil().save(path)
        return path

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.to_pil().save(buffer, format="PNG")
        return buffer.getvalue()

    def __repr__(self) -> str:
        h, w = self.rgb.shape[:2]
        return f"Heatmap({h}x{w}, scale={self.scale:.4g}, signed={self.signed}, cmap={self.cmap!r})"


def _pil_takes_mode() -> bool:
    # Pillow 11+ deprecates the ``mode`` argument of fromarray; uint8 [H, W, 3] is RGB either way.
    import PIL

    return int(PIL.__version__.split(".")[0]) < 11


def heatmap(
    attribution: ArrayLike,
    reduce: str = "sum",
    sign: str = "all",
    clip: Optional[float] = 99.5,
    cmap: Optional[Any] = None,
    scale: Optional[float] = None,
    image: Optional[ArrayLike] = None,
    view: str = "attribution",
) -> Heatmap:
    """Render one attribution map as colours.

    Parameters
    ----------
    attribution : Tensor or ndarray, [C, H, W] or [H, W]
        E.g. one image's ``excitation.pullback(...)[i]``.
    reduce : {"sum", "abs-sum", "l2", "mean", "rgb"}
        How channels become one map: their sum, the sum of magnitudes, the L2 norm or the mean.
        ``"rgb"`` keeps the channels and shows the map as an image, ``0.5 + 0.5 * a / scale``
        per channel (grey is zero): the convention of the excitation-pullback paper.  With
        another ``sign`` it shows the magnitudes, ``|a| / scale``, black at zero.
    sign : {"all", "positive", "negative", "absolute"}
        ``"all"``: signed, on a diverging map centred at zero.  ``"positive"``/``"negative"``:
        only that sign's magnitude (the other sign is drawn as zero); ``"absolute"``: ``|value|``;
        these three use a sequential map whose first colour is zero.
    clip : float or None
        Percentile of ``|values|`` mapped to the colour map's ends (the same for both signs);
        ``None`` or 100 uses the maximum.  Ignored when ``scale`` is given.
    cmap : str or matplotlib Colormap, optional
        Default :data:`SIGNED_CMAP` (``"RdBu_r"``) for ``sign="all"``, :data:`UNSIGNED_CMAP`
        (``"cividis"``) otherwise; both colour-blind safe (see the module's notes).
    scale : float, optional
        The value mapped to the colour map's end; pass one value to several maps to share
        their scale (:func:`shared_scale` computes one).
    image : Tensor, ndarray or PIL image, optional
        The input, ``[C, H, W]`` in [0, 1]; needed for ``view="input-x-attribution"``.
    view : {"attribution", "input-x-attribution"}
        Draw the attribution, or the attribution times the image (before ``reduce``).

    Returns
    -------
    Heatmap
        ``.rgb`` (``uint8 [H, W, 3]``), ``.scale``, ``.to_pil()``, ``.save(path)``; shows inline in Jupyter.

    Raises
    ------
    ValueError
        For a shape other than [C, H, W] / [H, W], non-finite values, an unknown option,
        a ``scale`` <= 0, or ``view="input-x-attribution"`` without a fitting ``image``.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.zeros((3, 4, 4)); a[0, 0, 0] = 1.0; a[0, 0, 1] = -1.0
    >>> hm = heatmap(a, clip=None)
    >>> hm.scale, hm.rgb.shape
    (1.0, (4, 4, 3))
    >>> heatmap(a, sign="positive", clip=None).signed
    False
    """
    v = _values(attribution, reduce, sign, view, image)
    signed = sign == "all"
    if scale is None:
        s = _percentile_scale([v], clip)
    else:
        if isinstance(scale, bool) or not (isinstance(scale, (int, float, np.floating)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r} must be a positive finite number (the value drawn at the colour map's end).")
        s = float(scale)
    inverse = 1.0 / s if s > 0 else 0.0  # an all-zero map is drawn as zero everywhere
    if reduce == "rgb":
        if cmap is not None:
            raise ValueError("reduce='rgb' shows the map as an image and takes no cmap; leave cmap out, or choose "
                             "a channel reduction ('sum', 'abs-sum', 'l2', 'mean').")
        # Signed: grey (0.5) is zero.  Magnitudes: black is zero.
        t = 0.5 + 0.5 * v * inverse if signed else v * inverse
        rgb = _image_rgb8(np.clip(t, 0.0, 1.0))
        return Heatmap(rgb, s, signed, None, v)
    name = cmap if cmap is not None else (SIGNED_CMAP if signed else UNSIGNED_CMAP)
    t = 0.5 + 0.5 * v * inverse if signed else v * inverse
    rgb = _lut(name)[_quantise(t)]
    return Heatmap(rgb, s, signed, name if isinstance(name, str) else getattr(name, "name", None), v, name)


def heatmaps(
    attributions: ArrayLike,
    *,
    share: bool = False,
    images: Optional[ArrayLike] = None,
    **heatmap_options: Any,
) -> List[Heatmap]:
    """:func:`heatmap` of every map of a batch ``[N, C, H, W]`` (or ``[N, H, W]``).

    Parameters
    ----------
    attributions : Tensor or ndarray, [N, C, H, W] or [N, H, W]
    share : bool
        One scale for the whole batch (:func:`shared_scale`) instead of one per map.
    images : [N, C, H, W], optional
        The inputs, for ``view="input-x-attribution"``.
    **heatmap_options
        ``reduce``, ``sign``, ``clip``, ``cmap``, ``scale``, ``view`` as for :func:`heatmap`.

    Examples
    --------
    >>> import numpy as np
    >>> [h.scale for h in heatmaps(np.stack([np.ones((1, 2, 2)), 2 * np.ones((1, 2, 2))]), share=True, clip=None)]
    [2.0, 2.0]
    """
    batch = _to_numpy(attributions, "attributions")
    if batch.ndim not in (3, 4):
        raise ValueError(f"attributions must be a batch [N, C, H, W] or [N, H, W], got shape {tuple(batch.shape)}; "
                         f"for one map call heatmap(...).")
    xs = [None] * len(batch) if images is None else list(images)
    if len(xs) != len(batch):
        raise ValueError(f"{len(batch)} attributions but {len(xs)} images.")
    options = dict(heatmap_options)
    if share and options.get("scale") is None:
        keys = ("reduce", "sign", "clip", "view")
        options["scale"] = shared_scale(list(batch), images=xs, **{k: options[k] for k in keys if k in options}) or None
    return [heatmap(a, image=x, **options) for a, x in zip(batch, xs)]


def overlay(
    image: ArrayLike,
    attribution: ArrayLike,
    alpha: float = 0.5,
    *,
    grey_image: bool = False,
    **heatmap_options: Any,
) -> Heatmap:
    """A heatmap blended over the image it explains: ``(1 - alpha) * image + alpha * heatmap``.

    Parameters
    ----------
    image : Tensor, ndarray or PIL image
        ``[C, H, W]`` (C = 1 or 3) or ``[H, W]`` with values in [0, 1], the size of ``attribution``.
    attribution : Tensor or ndarray, [C, H, W] or [H, W]
    alpha : float in [0, 1]
        Weight of the heatmap: 0 gives exactly the image, 1 exactly :func:`heatmap`'s picture.
    grey_image : bool
        Show a colour image in grey underneath, so the heatmap's colours are the only colours.
    **heatmap_options
        ``reduce``, ``sign``, ``clip``, ``cmap``, ``scale``, ``view`` as for :func:`heatmap`
        (``view="input-x-attribution"`` uses ``image``).

    Returns
    -------
    Heatmap
        With the blended picture in ``.rgb`` and the heatmap's ``.scale``.

    Raises
    ------
    ValueError
        If ``alpha`` leaves [0, 1] or the image does not match the attribution's H, W.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.full((3, 2, 2), 0.2); a = np.ones((3, 2, 2))
    >>> bool((overlay(x, a, alpha=0).rgb == 51).all())
    True
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha!r} must be a number in [0, 1] (0: the image only, 1: the heatmap only).")
    if "image" in heatmap_options:
        raise TypeError("overlay takes the image as its first argument; drop image= from the options.")
    x = to_image(image)
    a = _attribution_chw(attribution)
    if x.shape[-2:] != a.shape[-2:]:
        raise ValueError(f"image is {x.shape[-2]}x{x.shape[-1]} but attribution is {a.shape[-2]}x{a.shape[-1]}; "
                         f"resize one to the other (e.g. torch.nn.functional.interpolate) first.")
    hm = heatmap(a, image=x, **heatmap_options)
    base = _image_rgb8(x, grey=grey_image).astype(np.float64)
    alpha = float(alpha)
    blended = np.round((1.0 - alpha) * base + alpha * hm.rgb.astype(np.float64)).astype(np.uint8)
    return Heatmap(blended, hm.scale, hm.signed, hm.cmap, hm.values, hm._source)


# ----------------------------------------------------------------------------- grid
class GridFigure(Figure):
    """A :class:`matplotlib.figure.Figure` that shows inline in Jupyter without pyplot and saves by suffix.

    Made directly (not through ``pyplot``), so no display or GUI backend is involved.
    """

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.savefig(buffer, format="png", bbox_inches="tight")
        return buffer.getvalue()

    def save(self, path: PathLike, **savefig_options: Any) -> Path:
        """:func:`save` this figure (PNG, SVG or PDF by the suffix); returns the path."""
        return save(self, path, **savefig_options)


VIEWS_OF_GRID = ("heatmap", "overlay", "rgb")
SHARES = ("row", "figure", "none")


def _batch(value: ArrayLike, argument: str) -> np.ndarray:
    b = _to_numpy(value, argument)
    if b.ndim == 3:
        b = b[:, None]
    if b.ndim != 4:
        raise ValueError(f"{argument} must be [N, C, H, W] (or [N, H, W]), got shape {tuple(b.shape)}.")
    return b


def _format_scale(value: float) -> str:
    return f"{value:.2g}"


def grid(
    images: Optional[ArrayLike],
    attributions: Mapping[str, ArrayLike],
    *,
    view: str = "heatmap",
    share: str = "row",
    titles: Optional[Sequence[Any]] = None,
    row_labels: Optional[Sequence[str]] = None,
    colorbar: bool = True,
    as_images: Sequence[str] = (),
    alpha: float = 0.5,
    grey_image: bool = False,
    image_title: str = "input",
    title: Optional[str] = None,
    cell: float = 1.6,
    dpi: float = 100,
    **heatmap_options: Any,
) -> GridFigure:
    """A figure of images (rows) x explainers or targets (columns), the image itself first.

    Parameters
    ----------
    images : Tensor or ndarray [N, C, H, W] in [0, 1], or None
        The inputs; drawn in the first column (``None``: no image column, and no overlays).
    attributions : mapping of column name -> [N, C, H, W]
        One column per entry, in order: ``{"pullback": pb, "gradient": g}``, or one entry per
        target class.  Every entry has the rows' N.
    view : {"heatmap", "overlay", "rgb"}
        ``"heatmap"``: :func:`heatmap`; ``"overlay"``: :func:`overlay` on the row's image;
        ``"rgb"``: the map as an image around grey (``reduce="rgb"``, the paper's convention).
    share : {"row", "figure", "none"}
        Which cells share one colour scale: each row's, the whole figure's, or none.
        ``scale=`` in the options fixes one scale for every cell instead.
    titles : sequence, optional
        Column titles (default: the mapping's keys), or one list of titles per row
        (``N x columns``) to title every cell, e.g. with each row's class names.
    row_labels : sequence of str, optional
        One label per row, left of the first column.
    colorbar : bool
        Draw a colour bar per row (``share="row"``) or one for the figure (``"figure"``, or a
        fixed ``scale``); there is none for ``share="none"``, whose cells have scales of their own.
    as_images : sequence of str
        Keys of ``attributions`` that hold images in [0, 1] (accentuated images, masks), drawn as
        they are rather than as attributions.
    alpha, grey_image
        As for :func:`overlay` (``view="overlay"``).
    image_title : str
        Title of the image column.
    title : str, optional
        Figure title.
    cell, dpi : float
        Side of one cell in inches, and dots per inch.
    **heatmap_options
        ``reduce``, ``sign``, ``clip``, ``cmap``, ``scale`` (and ``view="input-x-attribution"``
        as ``attribution_view=``) as for :func:`heatmap`.

    Returns
    -------
    GridFigure
        A :class:`matplotlib.figure.Figure` (made without pyplot, so no display is needed) that
        shows inline in Jupyter; ``fig.save(path)`` or :func:`save` writes PNG, SVG or PDF.

    Raises
    ------
    ValueError
        For mismatched N, unknown options, titles or labels of the wrong length.

    Examples
    --------
    >>> import torch
    >>> x = torch.rand(2, 3, 16, 16)
    >>> fig = grid(x, {"cat": torch.randn(2, 3, 16, 16), "dog": torch.randn(2, 3, 16, 16)},
    ...            row_labels=["img 0", "img 1"], share="figure")
    >>> len(fig.axes) >= 6
    True
    """
    _check_option("view", view, VIEWS_OF_GRID)
    _check_option("share", share, SHARES)
    if "view" in heatmap_options:
        raise TypeError("grid's view= chooses heatmap/overlay/rgb; for input x attribution pass "
                        "attribution_view='input-x-attribution'.")
    if "image" in heatmap_options:
        raise TypeError("grid takes the images as its first argument; drop image= from the options.")
    attribution_view = heatmap_options.pop("attribution_view", "attribution")
    _check_option("attribution_view", attribution_view, VIEWS)
    if view == "rgb":
        if heatmap_options.get("reduce", "rgb") != "rgb":
            raise ValueError(f"view='rgb' draws reduce='rgb'; drop reduce={heatmap_options['reduce']!r} or use view='heatmap'.")
        heatmap_options["reduce"] = "rgb"
    if not isinstance(attributions, Mapping) or not attributions:
        raise ValueError("attributions must be a non-empty mapping of column name -> [N, C, H, W], "
                         "e.g. {'pullback': pb, 'gradient': g}.")
    columns = list(attributions)
    unknown = [k for k in as_images if k not in attributions]
    if unknown:
        raise ValueError(f"as_images names columns {unknown} that are not keys of attributions {columns}.")
    maps = {k: _batch(v, f"attributions[{k!r}]") for k, v in attributions.items()}
    n = len(next(iter(maps.values())))
    bad = {k: len(v) for k, v in maps.items() if len(v) != n}
    if bad:
        raise ValueError(f"every attribution needs the same N; got {n} and {bad}.")
    xs = None if images is None else _batch(images, "images")
    if xs is not None and len(xs) != n:
        raise ValueError(f"{len(xs)} images but {n} attributions per column; one image per row.")
    if xs is None and (view == "overlay" or attribution_view == "input-x-attribution"):
        raise ValueError(f"view={view!r} / attribution_view={attribution_view!r} need the images; pass them first.")
    x_list = [None if xs is None else to_image(x, f"images[{i}]") for i, x in enumerate(xs if xs is not None else [None] * n)]
    k = len(columns)
    cell_titles: Optional[List[List[str]]] = None
    column_titles = columns
    if titles is not None:
        titles = list(titles)
        if titles and not isinstance(titles[0], str) and isinstance(titles[0], Sequence):
            if len(titles) != n or any(len(row) != k for row in titles):
                raise ValueError(f"titles per cell must be {n} rows of {k} titles.")
            cell_titles = [[str(t) for t in row] for row in titles]
        else:
            if len(titles) != k:
                raise ValueError(f"titles has {len(titles)} entries for {k} columns ({columns}).")
            column_titles = [str(t) for t in titles]
    if row_labels is not None and len(row_labels) != n:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {n} rows.")

    # Scales: the same numbers heatmap() colours, pooled per row or over the figure.
    fixed = heatmap_options.pop("scale", None)
    clip = heatmap_options.pop("clip", 99.5)
    reduce, sign = heatmap_options.get("reduce", "sum"), heatmap_options.get("sign", "all")
    attribution_keys = [c for c in columns if c not in as_images]
    values = [[_values(maps[c][i], reduce, sign, attribution_view, x_list[i]) for c in attribution_keys] for i in range(n)]
    if fixed is not None:
        row_scales: List[Optional[float]] = [fixed] * n
    elif share == "figure":
        s = _percentile_scale([v for row in values for v in row], clip) if attribution_keys else 0.0
        row_scales = [s if s > 0 else None] * n
    elif share == "row":
        row_scales = []
        for row in values:
            s = _percentile_scale(row, clip) if row else 0.0
            row_scales.append(s if s > 0 else None)
    else:
        row_scales = [None] * n

    has_images = xs is not None
    n_cols = k + int(has_images)
    bars = colorbar and bool(attribution_keys) and (share != "none" or fixed is not None)
    height, width = (maps[columns[0]].shape[-2], maps[columns[0]].shape[-1])
    aspect = height / width
    fig = GridFigure(figsize=(cell * n_cols + (0.6 if bars else 0), cell * aspect * n + (0.4 if title else 0) + 0.3),
                       dpi=dpi, layout="constrained")
    axes = fig.subplots(n, n_cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    last: List[Optional[Heatmap]] = [None] * n
    for i in range(n):
        if has_images:
            axes[i, 0].imshow(_image_rgb8(x_list[i]), interpolation="nearest")
            if i == 0:
                axes[i, 0].set_title(image_title, fontsize=9)
        for j, c in enumerate(columns):
            ax = axes[i, j + int(has_images)]
            if c in as_images:
                rgb = _image_rgb8(to_image(maps[c][i], f"attributions[{c!r}][{i}]"))
            else:
                options = dict(heatmap_options, clip=clip, scale=row_scales[i], view=attribution_view)
                if view == "overlay":
                    hm = overlay(x_list[i], maps[c][i], alpha=alpha, grey_image=grey_image, **options)
                else:
                    hm = heatmap(maps[c][i], image=x_list[i], **options)
                rgb = hm.rgb
                last[i] = hm
            ax.imshow(rgb, interpolation="nearest")
            if cell_titles is not None:
                ax.set_title(cell_titles[i][j], fontsize=8)
            elif i == 0:
                ax.set_title(column_titles[j], fontsize=9)
        if row_labels is not None:
            axes[i, 0].set_ylabel(row_labels[i], fontsize=9)
    if bars:
        share_one = fixed is not None or share == "figure"
        groups = [(axes[:, :], last[0])] if share_one else [(axes[i, :], last[i]) for i in range(n)]
        for ax_group, hm in groups:
            if hm is None:
                continue
            _add_colorbar(fig, ax_group, hm)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _add_colorbar(fig, axes, hm: Heatmap) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    low, high = hm.limits
    if high <= 0:  # an all-zero map: a unit bar still reads "zero is this colour"
        low, high = (-1.0, 1.0) if hm.signed else (0.0, 1.0)
    mappable = ScalarMappable(norm=Normalize(low, high), cmap=hm.colormap())
    bar = fig.colorbar(mappable, ax=list(np.ravel(axes)), shrink=0.9, aspect=15, pad=0.01)
    ticks = [low, 0.0, high] if hm.signed else [0.0, high]
    bar.set_ticks(ticks)
    bar.set_ticklabels([_format_scale(t) for t in ticks])
    bar.ax.tick_params(labelsize=7)


def save(fig: Any, path: PathLike, *, dpi: Optional[float] = None, **savefig_options: Any) -> Path:
    """Write a figure (or a :class:`Heatmap`) to ``path``; the suffix picks PNG, SVG or PDF.

    Parameters
    ----------
    fig : matplotlib Figure or Heatmap
    path : str or Path
        Ends in ``.png``, ``.svg`` or ``.pdf``; parent folders are created.
    dpi : float, optional
        Resolution of a PNG (default: the figure's own).
    **savefig_options
        Passed to :meth:`matplotlib.figure.Figure.savefig`.

    Returns
    -------
    Path

    Raises
    ------
    ValueError
        For another suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"save: {path} has suffix {suffix or '(none)'!r}; name a .png, .svg or .pdf file.")
    if isinstance(fig, Heatmap):
        if suffix != ".png":
            raise ValueError("a Heatmap is a picture: save it as .png (draw it with grid(...) for SVG or PDF).")
        return fig.save(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"bbox_inches": "tight", "dpi": dpi if dpi is not None else fig.dpi}
    options.update(savefig_options)
    if suffix == ".svg":
        options.setdefault("metadata", {"Date": None})  # the same figure gives the same file
    fig.savefig(path, **options)
    return path
