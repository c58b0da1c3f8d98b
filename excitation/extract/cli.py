"""The ``excitation extract`` subcommand: arguments (:func:`add_parser`) and handler (:func:`run`)."""

from __future__ import annotations

import argparse

from ..presets import PRESETS

__all__ = ["add_parser", "run"]


def _normalize(text: str):
    try:
        values = [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 6 comma-separated numbers (3 means, 3 stds)") from None
    if len(values) % 2 or not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give means then stds, e.g. 0.485,0.456,0.406,0.229,0.224,0.225")
    half = len(values) // 2
    return values[:half], values[half:]


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``extract`` on the ``excitation`` command's subparsers."""
    p = sub.add_parser(
        "extract", help="pullbacks of a whole image collection into a zarr store (resumable; torchrun for many)",
        description="Pullbacks (and optionally gradients and accentuations), logits and targets of every image of "
                    "a collection, into a zarr v3 store aligned with the sorted image list. Rerun the same command "
                    "to resume. Many processes: torchrun --nproc-per-node N -m excitation extract ...")
    p.add_argument("--model", required=True, help="torchvision / timm name, or module:function returning an nn.Module")
    p.add_argument("--weights", help="weight-set name (torchvision) or pretrained tag (timm)")
    p.add_argument("--weights-file", help="a local state dict (.pt/.pth/.safetensors)")
    p.add_argument("--images", required=True, help="ImageFolder tree, flat folder, .txt list of images, or webdataset .tar shard(s)")
    p.add_argument("--out", required=True, help="the store (a folder); an existing one is resumed")
    p.add_argument("--targets", default="predicted", help="predicted (default), label, topK (e.g. top5) or 3,5,7")
    p.add_argument("--batch", type=int, default=8, help="images per batch and per zarr chunk (default 8)")
    p.add_argument("--size", type=int, help="center-crop side instead of the weights' own preprocessing")
    p.add_argument("--normalize", type=_normalize, help="mean,mean,mean,std,std,std instead of the weights' own")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="pullback storage type")
    p.add_argument("--gradient", action="store_true", help="also store the vanilla input gradient")
    p.add_argument("--ascend-steps", type=int, default=0, help="also store accentuations (excitation.ascend steps)")
    p.add_argument("--step-size", type=float, default=10.0, help="ascent L2 step, [0,1] pixels")
    p.add_argument("--radius", type=float, default=50.0, help="ascent L2 ball radius, [0,1] pixels")
    p.add_argument("--preset", choices=list(PRESETS), help="rule set (default: paper)")
    p.add_argument("--temp", type=float, help="ReLU gate temperature (default: the preset's)")
    p.add_argument("--rules", help="comma-separated rules to apply (see excitation.RULES)")
    p.add_argument("--compile", action="store_true", help="run the pullbacks compiled with Inductor, as pullback(compile=True) does")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's LOCAL_RANK GPU)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="undecodable images: stop with an error naming the file, or record them and go on")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .run import extract

    rules = [r.strip() for r in args.rules.split(",") if r.strip()] if args.rules else None
    result = extract(args.model, args.images, args.out, weights=args.weights, weights_file=args.weights_file,
                     size=args.size, normalize=args.normalize, targets=args.targets, batch=args.batch,
                     dtype=args.dtype, gradient=args.gradient, ascend_steps=args.ascend_steps,
                     step_size=args.step_size, radius=args.radius, preset=args.preset, temp=args.temp, rules=rules,
                     compile=args.compile, device=args.device, workers=args.workers, on_error=args.on_error,
                     progress=not args.no_progress)
    if result.rank == 0:
        print(result.summary())
    return 0
