"""The extract store: a zarr v3 group, one zarr chunk per batch, a commit marker per chunk.

Why zarr v3: it is a chunked, compressed array format that numpy, dask, xarray and
tensorstore read lazily (``zarr.open_group(STORE)["pullback"][i]`` reads one chunk), it is
a stable specification rather than a library's private layout, and its chunks are
separate files, so a rank that owns whole chunks never races another writer.  Safetensors
shards would need our own manifest and a reader to stitch them; zarr is that already.

Layout of ``STORE/``:

* ``zarr.json`` with ``attributes["excitation_extract"]``: the format version, the
  options *fingerprint*, and, once the run is complete, the metadata (throughput,
  machine, versions, options, skipped images);
* arrays ``pullback``, ``logits``, ``target``, ``label``, ``valid`` (and ``gradient``,
  ``accentuation`` when asked), chunked ``batch`` images along the first axis;
* ``paths.json``: the sorted image list the arrays are aligned with;
* ``_commits/<chunk>.json``: written by rename after *all* arrays of that chunk are on
  disk.  A chunk without its marker is treated as absent and recomputed on resume, so a
  kill at any moment leaves chunks that are complete and valid, or absent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set

import numpy as np

from ..errors import ExcitationError

__all__ = ["FORMAT", "ExtractStoreError", "create_or_check", "commit_chunk", "committed_chunks",
           "read_commits", "write_json_atomic", "load_extract", "Extract"]

FORMAT = 1
KEY = "excitation_extract"
COMMITS = "_commits"


class ExtractStoreError(ExcitationError):
    """A store that cannot be used: other options, incomplete, or not an extract store."""


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr is in the dev and store extras
        raise ImportError("excitation extract needs zarr>=3: pip install 'excitation[store]'.") from None
    return zarr


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def create_or_check(out: Path, fingerprint: Dict[str, Any], arrays: Dict[str, tuple], batch: int,
                    paths: List[str]) -> None:
    """Create the store (arrays of ``shape, dtype``), or check that an existing one has this fingerprint.

    Raises :class:`ExtractStoreError` when ``out`` holds a store made with other options,
    or something that is not an extract store.
    """
    zarr = _zarr()
    out = Path(out)
    if (out / "zarr.json").exists():
        group = zarr.open_group(str(out), mode="r")
        info = dict(group.attrs).get(KEY)
        if info is None:
            raise ExtractStoreError(f"--out {out} is a zarr store but not an excitation extract store; pick another --out.")
        diff = _differences(info.get("fingerprint", {}), fingerprint)
        if diff:
            raise ExtractStoreError(
                f"--out {out} was made with other options ({'; '.join(diff)}); rerun with the same options to "
                f"resume, or pass a new --out (or delete {out}) to start again."
            )
        return
    if out.exists() and any(out.iterdir()):
        raise ExtractStoreError(f"--out {out} exists and is not an extract store; pick an empty or new folder.")
    out.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(out), mode="w")  # mode "w" clears the folder: create the rest after it
    (out / COMMITS).mkdir(exist_ok=True)
    write_json_atomic(out / "paths.json", paths)
    for name, (shape, dtype) in arrays.items():
        fill = -1 if np.dtype(dtype).kind == "i" else 0
        group.create_array(name, shape=shape, chunks=(batch,) + tuple(shape[1:]), dtype=dtype, fill_value=fill)
    # The attributes go last: a store with them is fully created.
    group.attrs[KEY] = {"format": FORMAT, "fingerprint": fingerprint, "complete": False}


def commit_chunk(out: Path, chunk: int, record: Dict[str, Any]) -> None:
    """Mark ``chunk`` complete (after every array of it was written)."""
    write_json_atomic(Path(out) / COMMITS / f"{chunk:08d}.json", record)


def committed_chunks(out: Path) -> Set[int]:
    """The chunks whose commit marker exists."""
    folder = Path(out) / COMMITS
    if not folder.is_dir():
        return set()
    return {int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()}


def read_commits(out: Path, chunks: Iterable[int]) -> List[Dict[str, Any]]:
    folder = Path(out) / COMMITS
    return [json.loads((folder / f"{c:08d}.json").read_text()) for c in sorted(chunks)]


class Extract(Mapping):
    """What :func:`load_extract` returns: arrays by name (lazy zarr arrays), ``"path"`` (a list), ``.metadata``."""

    def __init__(self, group: Any, paths: List[str], metadata: Dict[str, Any]) -> None:
        import warnings

        self._group = group
        with warnings.catch_warnings():  # paths.json and _commits/ are ours, not zarr nodes
            warnings.filterwarnings("ignore", message=".*not recognized as a component")
            self._names = sorted(name for name, _ in group.arrays())
        self.paths = paths
        self.metadata = metadata

    def __getitem__(self, key: str) -> Any:
        if key == "path":
            return self.paths
        if key not in self._names:
            raise KeyError(f"{key!r}: this store holds {', '.join(self._names + ['path'])}.")
        return self._group[key]

    def __iter__(self):
        return iter(self._names + ["path"])

    def __len__(self) -> int:
        return len(self._names) + 1

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n} {tuple(self._group[n].shape)}" for n in self._names)
        return f"Extract({len(self.paths)} images: {shapes})"


def load_extract(store: "str | Path", *, allow_incomplete: bool = False) -> Extract:
    """Open an ``excitation extract`` store lazily: a mapping of zarr arrays plus ``"path"``.

    ``load_extract(STORE)["pullback"]`` is an ``(N, C, H, W)`` zarr array (``(N, K, C, H, W)``
    for several targets per image) aligned with ``["path"]``, the sorted image list;
    indexing it reads only the chunks it touches.  ``.metadata`` holds the run's options,
    throughput, machine, versions and skipped images.  An unfinished store raises
    :class:`ExtractStoreError` unless ``allow_incomplete=True``.

    Parameters
    ----------
    store : path
        The folder ``excitation extract --out`` wrote.
    allow_incomplete : bool
        Open a store whose run has not finished (its committed chunks are complete; the others
        may hold anything).

    Returns
    -------
    Extract
        A read-only mapping of array names to zarr arrays, ``"path"`` to the image list, and
        ``.metadata``.

    Raises
    ------
    ExtractStoreError
        ``store`` is not an extract store, or its run has not finished.
    ImportError
        zarr is not installed (``pip install "excitation[store]"``).

    Examples
    --------
    .. code-block:: python

        data = excitation.load_extract("STORE")
        data["pullback"][0]                 # one image's pullback, reading one chunk
        data["path"][0], data["target"][0]  # its file and target
    """
    zarr = _zarr()
    store = Path(store)
    if not (store / "zarr.json").exists():
        raise ExtractStoreError(f"{store} is not an extract store (no zarr.json); run excitation extract --out {store}.")
    group = zarr.open_group(str(store), mode="r")
    info = dict(group.attrs).get(KEY)
    if info is None:
        raise ExtractStoreError(f"{store} is a zarr store but not an excitation extract store.")
    if not info.get("complete") and not allow_incomplete:
        raise ExtractStoreError(
            f"{store} is incomplete (the run was interrupted); rerun the same excitation extract command to finish "
            f"it, or pass allow_incomplete=True."
        )
    paths = json.loads((store / "paths.json").read_text())
    return Extract(group, paths, info)


def write_metadata(out: Path, metadata: Dict[str, Any]) -> None:
    """Rank 0, after the barrier: mark the store complete with ``metadata``."""
    zarr = _zarr()
    group = zarr.open_group(str(out), mode="a")
    info = dict(group.attrs)[KEY]
    info.update(metadata)
    info["complete"] = True
    group.attrs[KEY] = info


def write_rows(group: Any, start: int, rows: Dict[str, np.ndarray]) -> None:
    """Write one chunk's rows into every array (``start`` is the chunk's first image)."""
    for name, value in rows.items():
        group[name][start:start + len(value)] = value


def open_for_writing(out: Path) -> Any:
    return _zarr().open_group(str(out), mode="r+")


def previous(out: Path) -> Optional[Dict[str, Any]]:
    zarr = _zarr()
    if not (Path(out) / "zarr.json").exists():
        return None
    return dict(zarr.open_group(str(out), mode="r").attrs).get(KEY)
