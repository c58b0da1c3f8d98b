"""Image collections on disk: an ImageFolder tree, a flat folder, or a list file, in one fixed order.

Every consumer (``excitation evaluate --images``, ``excitation extract``) sees the same
list in the same order, so results line up with ``ImageList.paths`` whatever the batch
size or the number of processes:

* a folder whose sub-folders hold images is read the ``torchvision.datasets.ImageFolder``
  way: classes are the sorted sub-folder names (label = their index), files sorted within each;
* a folder of images without sub-folders is flat: files sorted by name, label ``-1``;
* a ``.txt`` list file names one image per line, optionally followed by an integer label
  (``path [label]``; relative paths are relative to the list file), in the file's order.

A file that cannot be decoded raises :class:`ImageDecodeError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import ExcitationError

__all__ = ["IMAGE_EXTENSIONS", "ImageList", "ImageDecodeError", "list_images", "load_image", "ImageDataset"]

#: Extensions torchvision's ImageFolder accepts, lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageDecodeError(ExcitationError):
    """An image file that PIL cannot open or decode."""

    def __init__(self, path: "str | Path", cause: BaseException) -> None:
        self.path = str(path)
        super().__init__(
            f"cannot read image {self.path}: {type(cause).__name__}: {cause}. Remove or replace the file, "
            f"or pass --on-error skip to record it and go on."
        )


@dataclass
class ImageList:
    """The images of a collection, in order, with their labels (``-1`` where there is none)."""

    paths: List[str]
    labels: List[int]
    classes: List[str] = field(default_factory=list)
    root: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    def head(self, n: Optional[int]) -> "ImageList":
        """The first ``n`` images (all when ``n`` is ``None``)."""
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"--n must be a positive integer, got {n!r}.")
        return ImageList(self.paths[:n], self.labels[:n], self.classes, self.root)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(source: "str | Path") -> ImageList:
    """The :class:`ImageList` of a folder (ImageFolder layout or flat) or a ``.txt`` list file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"--images {source} does not exist.")
    if source.is_file():
        if source.suffix.lower() != ".txt":
            raise ValueError(f"--images {source} is a file but not a .txt list of image paths; pass a folder or a list.")
        return _from_list_file(source)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: List[str] = []
    labels: List[int] = []
    if classes:
        for label, name in enumerate(classes):
            files = sorted(p for p in (source / name).rglob("*") if _is_image(p))
            paths += [str(p) for p in files]
            labels += [label] * len(files)
    else:
        paths = [str(p) for p in sorted(source.iterdir()) if _is_image(p)]
        labels = [-1] * len(paths)
    if not paths:
        raise ValueError(f"--images {source} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return ImageList(paths, labels, classes, str(source))


def _from_list_file(source: Path) -> ImageList:
    paths: List[str] = []
    labels: List[int] = []
    for number, line in enumerate(source.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        label = -1
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            line, label = parts[0], int(parts[1])
        path = Path(line)
        path = path if path.is_absolute() else source.parent / path
        if not path.is_file():
            raise FileNotFoundError(f"{source}:{number}: image {path} does not exist.")
        paths.append(str(path))
        labels.append(label)
    if not paths:
        raise ValueError(f"--images {source} lists no images.")
    return ImageList(paths, labels, [], str(source))


def load_image(path: "str | Path", transform: Callable) -> Tensor:
    """Decode one image with PIL and apply ``transform``; :class:`ImageDecodeError` if it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated files fail here, not later in the transform
            return transform(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(path, exc) from exc


class ImageDataset(torch.utils.data.Dataset):
    """``(pixels, label, index)`` for the images of an :class:`ImageList` (a ``DataLoader`` can batch it)."""

    def __init__(self, images: ImageList, transform: Callable, indices: Optional[Sequence[int]] = None) -> None:
        self.images = images
        self.transform = transform
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> Tuple[Tensor, int, int]:
        index = self.indices[item]
        return load_image(self.images.paths[index], self.transform), self.images.labels[index], index
