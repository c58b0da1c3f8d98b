"""Paper-style figures: pullback grids and accentuation grids, written as PNG without a display."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from torch import Tensor

__all__ = ["pullback_grid", "accentuation_grid", "scale_each"]

PathLike = Union[str, Path]


def scale_each(t: Tensor) -> Tensor:
    """Min-max scale every image of ``t`` [..., C, H, W] to [0, 1] on its own.

    The ``torchvision.utils.make_grid(normalize=True, scale_each=True)`` convention:
    a signed pullback's zero lands wherever its range puts it.
    """
    flat = t.detach().float().flatten(-3)
    low = flat.min(-1, keepdim=True).values
    high = flat.max(-1, keepdim=True).values
    scaled = (flat - low) / (high - low).clamp_min(1e-12)
    return scaled.view_as(t)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _show(ax, image: Tensor) -> None:
    image = image.detach().float().cpu().clamp(0, 1)
    if image.shape[0] == 1:
        ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def pullback_grid(
    images: Tensor,
    pullbacks: Tensor,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: PathLike,
    *,
    title: Optional[str] = None,
    cell: float = 1.3,
) -> Path:
    """Rows: input images.  Columns: the input, then one signed pullback per target class.

    ``pullbacks`` is [N, K, C, H, W] (as :func:`excitation.pullbacks` returns);
    each cell is min-max scaled on its own.
    """
    n, k = pullbacks.shape[:2]
    if images.shape[0] != n or len(row_labels) != n or len(col_labels) != k:
        raise ValueError(f"pullback_grid: {n} rows x {k} targets need {n} images/row labels and {k} column labels.")
    plt = _pyplot()
    fig, axes = plt.subplots(n, k + 1, figsize=(cell * (k + 1), cell * n), squeeze=False)
    scaled = scale_each(pullbacks)
    for i in range(n):
        _show(axes[i, 0], images[i])
        axes[i, 0].set_ylabel(row_labels[i], fontsize=9)
        for j in range(k):
            _show(axes[i, j + 1], scaled[i, j])
    return _finish(fig, axes, col_labels, title, path)


def _finish(fig, axes, col_labels: Sequence[str], title: Optional[str], path: PathLike) -> Path:
    axes[0, 0].set_title("input", fontsize=9)
    for j, label in enumerate(col_labels):
        axes[0, j + 1].set_title(label, fontsize=9)
    fig.tight_layout()
    if title:
        # Above the column titles (tight_layout ignores suptitles); bbox_inches="tight" keeps it.
        fig.suptitle(title, fontsize=10, y=1.0 + 0.25 / fig.get_size_inches()[1], va="bottom")
    return _save(fig, path)


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
) -> Path:
    """Accentuated images and their changes, pullback-guided next to gradient-guided.

    ``by_pullback`` and ``by_gradient`` are [N, K, C, H, W]: image i pushed
    towards target j.  Each input gets four rows: pullback result, its change
    (min-max scaled), gradient result, its change.
    """
    n, k = by_pullback.shape[:2]
    if by_gradient.shape != by_pullback.shape or images.shape[0] != n or len(row_labels) != n or len(col_labels) != k:
        raise ValueError("accentuation_grid: images, both results and the labels must agree in N and K.")
    plt = _pyplot()
    fig, axes = plt.subplots(4 * n, k + 1, figsize=(cell * (k + 1), cell * 4 * n), squeeze=False)
    kinds = [("pullback", by_pullback, False), ("pullback Δ", by_pullback, True),
             ("gradient", by_gradient, False), ("gradient Δ", by_gradient, True)]
    for i in range(n):
        for r, (name, result, is_delta) in enumerate(kinds):
            row = 4 * i + r
            if r == 0:
                _show(axes[row, 0], images[i])
            else:
                axes[row, 0].axis("off")
            axes[row, 0].set_ylabel(f"{row_labels[i]}" if r == 0 else "", fontsize=8)
            for j in range(k):
                cell_image = scale_each(result[i, j] - images[i]) if is_delta else result[i, j]
                _show(axes[row, j + 1], cell_image)
            axes[row, 1].set_ylabel(name, fontsize=7)
    return _finish(fig, axes, col_labels, title, path)
