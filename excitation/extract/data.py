"""What ``--images`` may name for extract: a collection of :func:`excitation.images.list_images`, or webdataset shards.

Webdataset shards are plain tar files whose members are grouped into samples by key
(``key.jpg`` + ``key.cls``).  ``--images`` may be one ``.tar``, or a folder holding ``.tar``
files and no images; shards are taken in sorted name order, samples in tar order, and a
sample's label is its ``.cls`` member (``-1`` without one).  An image of a shard is named
``SHARD.tar#MEMBER`` in ``paths``.  Shards are read with the standard ``tarfile`` module,
one open handle per process and shard, which is all local shards need (no streaming,
no shuffling: the order is fixed, as for folders).
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Dict, List

from torch import Tensor

from ..images import IMAGE_EXTENSIONS, ImageDecodeError, ImageList, list_images, load_image

__all__ = ["collect", "load", "SEPARATOR"]

SEPARATOR = ".tar#"
_OPEN: Dict[tuple, tarfile.TarFile] = {}  # by (process id, shard): forked workers must not share offsets


def _shards(source: Path) -> List[Path]:
    if source.is_file() and source.suffix == ".tar":
        return [source]
    if source.is_dir():
        entries = [p for p in source.iterdir() if not p.name.startswith(".")]
        tars = sorted(p for p in entries if p.is_file() and p.suffix == ".tar")
        if tars and not any(p.is_dir() or p.suffix.lower() in IMAGE_EXTENSIONS for p in entries):
            return tars
    return []


def collect(source: "str | Path") -> ImageList:
    """The images of ``source`` in their fixed order: folder, flat folder, ``.txt`` list, or ``.tar`` shards."""
    source = Path(source)
    shards = _shards(source) if source.exists() else []
    if not shards:
        return list_images(source)
    paths: List[str] = []
    labels: List[int] = []
    for shard in shards:
        try:
            with tarfile.open(shard) as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                classes = {m.name.rsplit(".", 1)[0]: m for m in members if m.name.endswith(".cls")}
                for member in members:
                    stem, _, ext = member.name.rpartition(".")
                    if "." + ext.lower() not in IMAGE_EXTENSIONS:
                        continue
                    label = -1
                    if stem in classes:
                        text = tar.extractfile(classes[stem]).read().decode().strip()
                        label = int(text) if text.lstrip("-").isdigit() else -1
                    paths.append(f"{shard}#{member.name}")
                    labels.append(label)
        except tarfile.TarError as exc:
            raise ValueError(f"--images: {shard} is not a readable tar shard ({exc}).") from None
    if not paths:
        raise ValueError(f"--images {source}: its tar shards hold no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return ImageList(paths, labels, [], str(source))


def load(path: str, transform: Callable) -> Tensor:
    """Decode one image (a file, or ``SHARD.tar#MEMBER``); :class:`ImageDecodeError` naming it if it cannot be read."""
    if SEPARATOR not in path:
        return load_image(path, transform)
    shard, _, member = path.partition("#")
    key = (os.getpid(), shard)
    tar = _OPEN.get(key)
    if tar is None:
        tar = _OPEN[key] = tarfile.open(shard)
    try:
        data = tar.extractfile(member).read()
    except (KeyError, AttributeError, tarfile.TarError, OSError) as exc:
        raise ImageDecodeError(path, exc) from exc
    return _decode(path, data, transform)


def _decode(path: str, data: bytes, transform: Callable) -> Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return transform(image)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(path, exc) from exc
