"""``excitation.extract``: pullbacks (and gradients, accentuations, logits) of a whole image collection into a store.

One process or many through ``torchrun``; each rank computes its own chunks (see
:mod:`.sharding`), writes them, and commits each one; rank 0 writes the metadata after a
barrier.  Rerunning the same command resumes: committed chunks are skipped, the rest are
computed, and the result is bit-identical to an uninterrupted run.

Why one module: it is one loop, whose resume guarantees depend on the order of its
steps (compute, write the arrays, commit the chunk).
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ExcitationError
from ..fxpass.options import Options, options_from
from ..images import ImageList
from .data import collect, load
from . import store as _store
from .dist import World, init_world
from .faults import DieHook
from .sharding import chunk_bounds, chunk_count, rank_chunks

__all__ = ["extract", "ExtractResult", "parse_targets"]

TargetSpec = Union[str, int, Sequence[int]]


@dataclass
class ExtractResult:
    """What a run did (on this rank); the store's metadata holds the job-wide numbers."""

    out: str
    images: int
    chunks_total: int
    chunks_computed: int
    seconds: float
    images_per_s: float
    store_seconds: float
    errors: List[Dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    world: int = 1

    def summary(self) -> str:
        return (f"wrote {self.out}: {self.images} images, {self.chunks_computed}/{self.chunks_total} chunks computed "
                f"by {self.world} process(es) in {self.seconds:.2f} s ({self.images_per_s:.1f} images/s; store "
                f"writes {100 * self.store_seconds / max(self.seconds, 1e-9):.1f}%), {len(self.errors)} skipped")


def parse_targets(spec: TargetSpec) -> Tuple[str, Any]:
    """``"predicted"``, ``"label"``, ``"topK"`` / ``("topk", K)``, or classes (``"3,5"``, ``[3, 5]``, ``3``)."""
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == "topk":
        spec = f"top{spec[1]}"
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("predicted", "label"):
            return text, None
        if text.startswith("top") and text[3:].isdigit() and int(text[3:]) >= 1:
            return "topk", int(text[3:])
        parts = [p.strip() for p in text.split(",")]
        if parts and all(p.lstrip("-").isdigit() for p in parts):
            spec = [int(p) for p in parts]
        else:
            raise ValueError(f"--targets {spec!r}: use predicted, label, topK (e.g. top5) or class indices like 3,5,7.")
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    classes = list(spec)  # type: ignore[arg-type]
    if not classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes):
        raise ValueError(f"--targets {spec!r}: classes must be non-negative integers.")
    return "classes", classes


def _sha256(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _module_digest(model: nn.Module) -> str:
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Items(torch.utils.data.Dataset):
    """``(index, pixels or None, label, error or None)``; decode errors are returned, not raised."""

    def __init__(self, images: ImageList, transform) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        try:
            return index, load(self.images.paths[index], self.transform), self.images.labels[index], None
        except ExcitationError as exc:
            return index, None, self.images.labels[index], str(exc)


def _collate(items):
    return items


def _machine(device: torch.device) -> Dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _versions() -> Dict[str, str]:
    import sys

    import torchvision
    import zarr

    from .. import __version__

    return {"excitation": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "zarr": zarr.__version__, "python": sys.version.split()[0], "numpy": np.__version__}


def extract(
    model: "str | nn.Module",
    images: "str | Path",
    out: "str | Path",
    *,
    weights: Optional[str] = None,
    weights_file: "str | Path | None" = None,
    size: Optional[int] = None,
    normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    targets: TargetSpec = "predicted",
    batch: int = 8,
    dtype: str = "float16",
    gradient: bool = False,
    ascend_steps: int = 0,
    step_size: float = 10.0,
    radius: float = 50.0,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    rules: Optional[Sequence[str]] = None,
    options: Optional[Options] = None,
    compile: bool = False,
    device: str = "cpu",
    workers: int = 0,
    on_error: str = "raise",
    progress: bool = True,
) -> ExtractResult:
    """Pullbacks of every image of a collection into a zarr store; resumable, and the same under ``torchrun``.

    Parameters
    ----------
    model : str or nn.Module
        A torchvision / timm name or ``"module:function"`` (see :func:`excitation.models.load_classifier`),
        or a module taking ``[0, 1]`` pixels (then ``size`` is required).  Never modified.
    images : path
        An ImageFolder tree, a flat folder, a ``.txt`` list (:func:`excitation.images.list_images`),
        or webdataset ``.tar`` shards (one, or a folder of them; see :mod:`excitation.extract.data`).
    out : path
        The store.  An existing store made with the same options is resumed; other options are refused.
    targets : str or ints
        ``"predicted"`` (argmax), ``"label"`` (the folder's class), ``"topK"`` or class indices.
        One target per image gives ``pullback`` ``(N, C, H, W)``; several give ``(N, K, C, H, W)``.
    batch : int
        Images per batch, and per zarr chunk.
    dtype : {"float16", "float32"}
        Storage type of pullbacks, gradients and accentuations (logits are float32).
    gradient, ascend_steps, step_size, radius
        Also store the vanilla gradient, and (``ascend_steps > 0``) the pullback accentuation
        of :func:`excitation.ascend`.
    preset, temp, rules, options, compile
        As for :func:`excitation.excite`; ``compile`` runs the pullbacks compiled, as
        ``excitation.pullback(..., compile=True)`` does (on either path).
    device, workers, on_error, progress
        ``"cpu"`` / ``"cuda"`` (rank ``LOCAL_RANK``'s GPU under torchrun), DataLoader workers,
        ``"raise"`` or ``"skip"`` for undecodable images (skipped ones are recorded in the
        metadata and have ``valid == False``), tqdm bars.

    Returns
    -------
    ExtractResult
        What this rank did: images, chunks computed out of the total, seconds, images/s, the
        time spent writing the store, and the skipped images.  Read the store with
        :func:`excitation.load_extract`.

    Raises
    ------
    ValueError
        Bad options (``on_error``, ``dtype``, ``batch``, ``workers``, ``ascend_steps``, targets), a
        module without ``size``, or an image collection with no images.
    excitation.extract.store.ExtractStoreError
        ``out`` holds a store made with other options (the message lists them).
    ImportError
        zarr is not installed (``pip install "excitation[store]"``).

    Examples
    --------
    .. code-block:: python

        result = excitation.extract("resnet18", "images/", "store", weights_file="resnet18.pt", batch=8)
        data = excitation.load_extract("store")
        data["pullback"][0]  # (3, H, W) float16, reads one chunk
    """
    from ..models import load_classifier, pixel_transform

    if on_error not in ("raise", "skip"):
        raise ValueError(f"--on-error {on_error!r}: use raise or skip.")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"--dtype {dtype!r}: use float16 or float32.")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {batch!r}.")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"--workers must be a non-negative integer, got {workers!r}.")
    if ascend_steps < 0:
        raise ValueError(f"--ascend-steps must be >= 0, got {ascend_steps}.")
    mode, classes = parse_targets(targets)
    if rules is not None:
        from ..fxpass.rules import RULES

        unknown = [r for r in rules if r not in RULES]
        if unknown:
            raise ValueError(f"--rules {unknown}: not rules; choose among {', '.join(RULES)}.")
    options = options_from(options, preset=preset, temp=temp, rules=list(rules) if rules else None)
    image_list = collect(images)
    if mode == "label" and any(label < 0 for label in image_list.labels):
        raise ValueError(f"--targets label needs labelled images (an ImageFolder tree or a list with labels); "
                         f"{images} has unlabelled ones.")
    out = Path(out)

    if isinstance(model, nn.Module):
        if size is None:
            raise ValueError("extract(model=<nn.Module>) needs size= (the center-crop side).")
        net, transform, norm = model, pixel_transform(int(round(size * 256 / 224)), size), normalize
        model_id = {"model": f"module {type(model).__qualname__}", "model_sha256": _module_digest(model)}
    else:
        loaded = load_classifier(model, weights=weights, weights_file=weights_file, size=size, normalize=normalize,
                                 progress=False)
        net, transform, norm = loaded.model, loaded.preprocess, loaded.normalize
        model_id = {"model": model, "weights": weights,
                    "weights_sha256": _sha256(weights_file) if weights_file else None}

    world = init_world(device)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", world.local_rank if world.distributed else torch.cuda.current_device())
    try:
        return _run(net=net, transform=transform, norm=norm, model_id=model_id, world=world, dev=dev,
                    image_list=image_list, out=out, mode=mode, classes=classes, batch=batch, dtype=dtype,
                    gradient=gradient, ascend_steps=ascend_steps, step_size=step_size, radius=radius,
                    options=options, compile=compile, workers=workers, on_error=on_error, progress=progress,
                    images=images, size=size)
    finally:
        world.close()


def _listed(rules: Any) -> Any:
    """``Options.rules`` as JSON: ``None``, a list of names, or a list of ``[name, value]`` pairs."""
    return None if rules is None else [list(rule) if isinstance(rule, tuple) else rule for rule in rules]


def _run(*, net, transform, norm, model_id, world: World, dev, image_list: ImageList, out: Path, mode, classes,
         batch, dtype, gradient, ascend_steps, step_size, radius, options: Options, compile, workers, on_error,
         progress, images, size) -> ExtractResult:
    """The loop of :func:`extract`, once the arguments are checked and the process group joined."""
    from ..api import gradient as vanilla_gradient
    from ..api import prepare, pullback, pullbacks
    from ..ascent import Normalized, ascend

    die = DieHook.from_env()  # test-only (see .faults); read first, so a bad value fails before any work
    pixel_model = (Normalized(net, *norm, device=dev) if norm is not None else net).to(dev).eval()
    # prepare() excites a copy (the caller's model is never touched), through dynamo where fx cannot trace it,
    # and compiles it as pullback(compile=True) does.
    excited = prepare(pixel_model, options=options, compile=bool(compile))

    n = len(image_list)
    probe = transform(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (512, 512)))
    with torch.no_grad():
        n_classes = int(pixel_model(probe[None].to(dev)).shape[1])
    if mode == "classes" and max(classes) >= n_classes:
        raise ValueError(f"--targets {classes}: out of range for {n_classes} classes.")
    k = len(classes) if mode == "classes" else 1
    if mode == "topk":
        if classes > n_classes:
            raise ValueError(f"--targets top{classes}: the model has only {n_classes} classes.")
        k = classes
    multi = mode == "topk" or (mode == "classes" and len(classes) > 1)
    per = ((k,) if multi else ()) + tuple(probe.shape)
    arrays: Dict[str, tuple] = {"pullback": ((n,) + per, dtype), "logits": ((n, n_classes), "float32"),
                                "target": ((n, k) if multi else (n,), "int64"), "label": ((n,), "int64"),
                                "valid": ((n,), "bool")}
    if gradient:
        arrays["gradient"] = ((n,) + per, dtype)
    if ascend_steps:
        arrays["accentuation"] = ((n,) + per, dtype)
    fingerprint = {
        **model_id, "images": str(Path(images).resolve()), "n_images": n,
        "paths_sha256": hashlib.sha256("\n".join(str(Path(p).resolve()) for p in image_list.paths).encode()).hexdigest(),
        "size": size, "normalize": [list(norm[0]), list(norm[1])] if norm is not None else None,
        "input_shape": list(probe.shape), "targets": [mode, classes], "batch": batch, "dtype": dtype,
        "gradient": bool(gradient), "ascend": [ascend_steps, step_size, radius] if ascend_steps else None,
        "preset": options.preset, "temp": options.temp, "rules": _listed(options.rules), "compile": bool(compile),
        "pool_temp": options.pool_temp, "gate": options.gate, "pool_backward": options.pool_backward,
        "temps": "callable" if callable(options.temps) else _listed(options.temps),
        "device_type": dev.type, "format": _store.FORMAT,
    }
    problem = None
    if world.rank == 0:
        try:
            _store.create_or_check(out, fingerprint, arrays, batch, image_list.paths)
        except Exception as exc:  # every rank must hear of it, not hang at the barrier
            problem = exc
    messages = world.gather(None if problem is None else str(problem))
    if problem is not None:
        raise problem
    if messages[0] is not None:
        raise _store.ExtractStoreError(messages[0])

    n_chunks = chunk_count(n, batch)
    done = _store.committed_chunks(out)
    mine = [c for c in rank_chunks(n_chunks, world.rank, world.world) if c not in done]
    group = _store.open_for_writing(out)
    others = set(range(n_chunks)) - set(rank_chunks(n_chunks, world.rank, world.world))
    np_dtype = np.float16 if dtype == "float16" else np.float32

    loader = torch.utils.data.DataLoader(
        _Items(image_list, transform), batch_sampler=[list(range(*chunk_bounds(c, n, batch))) for c in mine],
        num_workers=workers, collate_fn=_collate,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(min(batch, n - c * batch) for c in mine), unit="img", position=world.rank,
                   desc=f"extract rank {world.rank}/{world.world}", dynamic_ncols=True)
    computed, errors, store_seconds, images_done = 0, [], 0.0, 0
    start_time = time.perf_counter()
    for chunk, items in zip(mine, loader):
        start, stop = chunk_bounds(chunk, n, batch)
        bad = [(i, e) for i, x, _, e in items if x is None]
        if bad and on_error == "raise":
            raise ExcitationError(bad[0][1])
        chunk_errors = [{"index": i, "path": image_list.paths[i], "error": e} for i, e in bad]
        good = [(i, x, y) for i, x, y, _ in items if x is not None]
        rows = len(items)
        pb = np.zeros((rows,) + per, np_dtype)
        logits = np.zeros((rows, n_classes), np.float32)
        target = np.full((rows, k) if multi else (rows,), -1, np.int64)
        extra = {name: np.zeros((rows,) + per, np_dtype) for name in ("gradient", "accentuation") if name in arrays}
        valid = np.zeros(rows, bool)
        labels = np.array([y for _, _, y, _ in items], np.int64)
        if good:
            where = np.array([i - start for i, _, _ in good])
            x = torch.stack([t for _, t, _ in good]).to(dev)
            labels_t = torch.tensor([y for _, _, y in good], device=dev)

            def choose(logits: Tensor) -> Tensor:
                if mode == "predicted":
                    return logits.argmax(1)
                if mode == "label":
                    if int(labels_t.max()) >= n_classes:
                        raise ValueError(f"--targets label: a label is >= the model's {n_classes} classes.")
                    return labels_t
                if mode == "topk":
                    return logits.topk(k, dim=1).indices
                chosen = torch.tensor(classes, device=dev)[None].expand(len(good), -1)
                return chosen if multi else chosen[:, 0]

            seen: Dict[str, Tensor] = {}

            def score(logits: Tensor) -> Tensor:
                """One forward for logits, target and pullback: the target is chosen from this output."""
                seen["logits"], seen["index"] = logits.detach(), choose(logits.detach())
                return logits.gather(1, seen["index"][:, None])[:, 0]

            if multi:
                with torch.no_grad():
                    out_logits = pixel_model(x)
                index = choose(out_logits)
                p = pullbacks(excited, x, index, compile=bool(compile))
            else:
                p = pullback(excited, x, score, compile=bool(compile))
                out_logits, index = seen["logits"], seen["index"]
            pb[where] = p.detach().cpu().numpy().astype(np_dtype)
            logits[where] = out_logits.cpu().numpy()
            target[where] = index.cpu().numpy()
            valid[where] = True
            if "gradient" in extra:
                g = torch.stack([vanilla_gradient(pixel_model, x, index[:, j]) for j in range(k)], 1) if multi \
                    else vanilla_gradient(pixel_model, x, index)
                extra["gradient"][where] = g.cpu().numpy().astype(np_dtype)
            if "accentuation" in extra:
                reps = x.repeat_interleave(k, 0) if multi else x
                wanted = index.reshape(-1)
                acc = ascend(prepare(pixel_model, options=options), reps, wanted, steps=ascend_steps, step_size=step_size, radius=radius,
                             progress=False)
                acc = acc.view(len(good), k, *x.shape[1:]) if multi else acc
                extra["accentuation"][where] = acc.detach().cpu().numpy().astype(np_dtype)
        t0 = time.perf_counter()
        _store.write_rows(group, start, {"pullback": pb, "logits": logits, "target": target, "label": labels,
                                         "valid": valid, **extra})
        die.maybe_die(out, world.rank, computed, others)  # test hook: a kill after the arrays, before the commit
        _store.commit_chunk(out, chunk, {"chunk": chunk, "rank": world.rank, "errors": chunk_errors})
        store_seconds += time.perf_counter() - t0
        computed += 1
        images_done += len(good)
        errors += chunk_errors
        if bar is not None:
            bar.update(rows)
            bar.set_postfix_str(f"{images_done / max(time.perf_counter() - start_time, 1e-9):.1f} img/s")
    seconds = time.perf_counter() - start_time
    if bar is not None:
        bar.close()
    stats = {"rank": world.rank, "images": images_done, "chunks": computed, "seconds": seconds,
             "store_seconds": store_seconds}
    everyone = world.gather(stats)  # also the barrier: every rank has committed its chunks
    if world.rank == 0:
        committed = _store.committed_chunks(out)
        missing = sorted(set(range(n_chunks)) - committed)
        if missing:
            raise _store.ExtractStoreError(f"chunks {missing[:10]} of {out} are not committed; rerun to finish them.")
        all_errors = [e for record in _store.read_commits(out, committed) for e in record["errors"]]
        wall = max(s["seconds"] for s in everyone)
        total = sum(s["images"] for s in everyone)
        info = _store.previous(out) or {}
        runs = list(info.get("runs", [])) + [{
            "world_size": world.world, "images_computed": total, "chunks_computed": sum(s["chunks"] for s in everyone),
            "seconds": wall, "images_per_s": total / wall if wall > 0 else None,
            "store_share": sum(s["store_seconds"] for s in everyone) / max(sum(s["seconds"] for s in everyone), 1e-9),
            "ranks": everyone, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "options": {"workers": workers, "device": str(dev), "progress": progress},
        }]
        _store.write_metadata(out, {
            "n_images": n, "n_chunks": n_chunks, "batch": batch, "errors": all_errors, "runs": runs,
            "throughput_images_per_s": runs[-1]["images_per_s"], "machine": _machine(dev), "versions": _versions(),
            "options": fingerprint, "arrays": sorted(arrays),
        })
        print(f"excitation extract: {total} images in {wall:.2f} s on {world.world} process(es): "
              f"{runs[-1]['images_per_s'] or 0:.1f} images/s; {len(all_errors)} skipped; store {out}", flush=True)
    world.barrier()  # nobody leaves before the metadata is written
    return ExtractResult(str(out), n, n_chunks, computed, seconds, images_done / seconds if seconds > 0 else 0.0,
                         store_seconds, errors, world.rank, world.world)
