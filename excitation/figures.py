"""Paper-style figures: pullback grids and accentuation grids, drawn by :func:`excitation.visualize.grid`.

Both write their figure to ``path`` (PNG, SVG or PDF by the suffix) without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

from torch import Tensor

from . import visualize

__all__ = ["pullback_grid", "accentuation_grid"]

PathLike = Union[str, Path]


def pullback_grid(
    images: Tensor,
    pullbacks: Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: PathLike,
    *,
    title: Optional[str] = None,
    cell: float = 1.3,
    view: str = "heatmap",
    share: str = "row",
    **heatmap_options: Any,
) -> Path:
    """Rows: input images.  Columns: the input, then one signed pullback per target class.

    Parameters
    ----------
    images : Tensor [N, C, H, W]
        The inputs, in [0, 1].
    pullbacks : Tensor [N, K, C, H, W]
        As :func:`excitation.pullbacks` returns: image i's pullback towards target j.
    row_labels, col_labels : sequence of str
        N row labels and K column titles (e.g. the target classes' names).
    path : str or Path
        Where to write the figure (``.png``, ``.svg`` or ``.pdf``).
    title : str, optional
        Figure title.
    cell : float
        Side of one cell in inches.
    view : {"heatmap", "overlay", "rgb"}
        How each pullback is drawn (see :func:`excitation.visualize.grid`).
    share : {"row", "figure", "none"}
        Colour scale shared by each image's pullbacks (default), by all, or none.
    **heatmap_options
        ``reduce``, ``sign``, ``clip``, ``cmap``, ``scale``, ``alpha`` ... as for
        :func:`excitation.visualize.grid`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If N or K disagree between the tensors and the labels.
    """
    if pullbacks.dim() != 5:
        raise ValueError(f"pullback_grid: pullbacks must be [N, K, C, H, W], got shape {tuple(pullbacks.shape)}.")
    n, k = pullbacks.shape[:2]
    if images.shape[0] != n or len(row_labels) != n or len(col_labels) != k:
        raise ValueError(f"pullback_grid: {n} rows x {k} targets need {n} images/row labels and {k} column labels.")
    columns = {f"{j}": pullbacks[:, j] for j in range(k)}
    fig = visualize.grid(images, columns, titles=list(col_labels), row_labels=list(row_labels), view=view,
                         share=share, title=title, cell=cell, **heatmap_options)
    return visualize.save(fig, path)


def accentuation_grid(
    images: Tensor,
    by_pullback: Tensor,
    by_gradient: Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: PathLike,
    *,
    title: Optional[str] = None,
    cell: float = 1.1,
    view: str = "rgb",
    share: str = "figure",
    **heatmap_options: Any,
) -> Path:
    """Accentuated images and their changes, pullback-guided rows next to gradient-guided rows.

    Each input gets two rows (along the pullback, along the gradient); each target two
    columns: the accentuated image, and its change from the input.

    Parameters
    ----------
    images : Tensor [N, C, H, W]
        The inputs, in [0, 1].
    by_pullback, by_gradient : Tensor [N, K, C, H, W]
        Image i pushed towards target j along pullbacks / gradients.
    row_labels, col_labels : sequence of str
        N image labels and K target names.
    path : str or Path
        Where to write the figure (``.png``, ``.svg`` or ``.pdf``).
    title : str, optional
        Figure title.
    cell : float
        Side of one cell in inches.
    view : {"rgb", "heatmap", "overlay"}
        How the changes are drawn: as images around grey (the paper's convention), as
        heatmaps, or as heatmaps over the input.
    share : {"figure", "row", "none"}
        Colour scale of the changes; by default one for the figure, since every change
        has the same L2 budget.
    **heatmap_options
        As for :func:`excitation.visualize.grid`.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        If the shapes or the labels disagree.
    """
    n, k = by_pullback.shape[:2]
    if by_gradient.shape != by_pullback.shape or images.shape[0] != n or len(row_labels) != n or len(col_labels) != k:
        raise ValueError("accentuation_grid: images, both results and the labels must agree in N and K.")
    import torch

    # Rows 2i and 2i + 1: image i along the pullback, then along the gradient.
    results = torch.stack([by_pullback, by_gradient], 1).flatten(0, 1)  # [2N, K, C, H, W]
    inputs = images.repeat_interleave(2, 0)
    columns, shown = {}, []
    for j in range(k):
        columns[f"result {j}"] = results[:, j]
        columns[f"change {j}"] = results[:, j] - inputs
        shown.append(f"result {j}")
    titles = [text for label in col_labels for text in (str(label), "Δ")]
    rows = [f"{label} · {kind}" for label in row_labels for kind in ("pullback", "gradient")]
    fig = visualize.grid(inputs, columns, as_images=shown, titles=titles, row_labels=rows, view=view, share=share,
                         title=title, cell=cell, **heatmap_options)
    return visualize.save(fig, path)
