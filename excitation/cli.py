"""The ``excitation`` command: ``demo``, ``explain``, ``app``, ``bench``, ``zoo``, ``evaluate`` and ``extract``.

Every subcommand has ``--help``.  Errors print one line, ``excitation: error: ...``,
and exit with status 2; ``--traceback`` shows the full trace instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .presets import PRESETS

__all__ = ["main", "build_parser"]


# ------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo.run import run_demo

    result = run_demo(Path(args.out), progress=not args.no_progress, seed=args.seed)
    print(result.summary())
    return 0


# --------------------------------------------------------------------- explain
def _cmd_explain(args: argparse.Namespace) -> int:
    import torch

    from .api import pullbacks
    from .ascent import ascend
    from .figures import accentuation_grid, pullback_grid
    from .images import load_image
    from .models import load_classifier

    if not (args.weights or args.weights_file):
        raise ValueError("pass --weights NAME (torchvision weights) and/or --weights-file PATH (a local state dict).")
    loaded = load_classifier(args.model, weights=args.weights, weights_file=args.weights_file)
    device = torch.device(args.device)
    for name in args.images:
        if not Path(name).is_file():
            raise FileNotFoundError(f"image {name} does not exist.")
    images = torch.stack([load_image(name, loaded.preprocess) for name in args.images]).to(device)
    model = loaded.pixel_model(device).to(device)
    targets = list(args.targets) + ([args.extra] if args.extra is not None else [])
    categories = loaded.categories
    with torch.no_grad():
        classes = model(images[:1]).shape[1] if categories is None else len(categories)
    bad = [t for t in targets if not 0 <= t < classes]
    if bad:
        raise ValueError(f"targets {bad} out of range for {classes} classes.")
    name = (lambda t: categories[t]) if categories else (lambda t: f"class {t}")
    columns = [name(t) for t in args.targets] + ([f"{name(args.extra)} (extra)"] if args.extra is not None else [])
    rows = [Path(p).stem for p in args.images]
    grids = pullbacks(model, images, targets, preset=args.preset, temp=args.temp)
    out = pullback_grid(images.cpu(), grids.cpu(), rows, columns, args.out, title=f"{args.model}: excitation pullbacks",
                        view=args.view)
    print(f"wrote {out}")
    if args.steps > 0:
        n, k = len(images), len(targets)
        repeated = images.repeat_interleave(k, 0)
        wanted = torch.tensor(targets, device=device).repeat(n)
        common = dict(steps=args.steps, step_size=args.step_size, radius=args.radius, preset=args.preset,
                      temp=args.temp, progress=True)
        by_pb = ascend(model, repeated, wanted, direction="pullback", **common).view(n, k, *images.shape[1:])
        by_gr = ascend(model, repeated, wanted, direction="gradient", **common).view(n, k, *images.shape[1:])
        acc_path = Path(args.out).with_name(Path(args.out).stem + "_accentuation.png")
        accentuation_grid(images.cpu(), by_pb.cpu(), by_gr.cpu(), rows, columns, acc_path,
                          title=f"{args.model}: accentuation, pullback vs gradient",
                          view=args.view)
        print(f"wrote {acc_path}")
    return 0


# -------------------------------------------------------------------------- app
def _cmd_app(args: argparse.Namespace) -> int:
    from .app import build_app, launch, load_app_model

    if args.weights_file and not args.model:
        raise ValueError("--weights-file needs --model NAME (the default scene model has its own weights).")
    demo = build_app(app_model=load_app_model(args.model, args.weights_file, args.weights))
    launch(demo, host=args.host, port=args.port)
    return 0


# ------------------------------------------------------------------------ bench
def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_table, run_bench

    result = run_bench(args.model, batch=args.batch, size=args.size, device=args.device, compile_=args.compile,
                       temp=args.temp, repeats=args.repeats, warmup=args.warmup, peers=not args.no_peers,
                       progress=not args.no_progress, flush_to_zero=not args.no_flush_check)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(result.to_json())
        print(f"wrote {args.json}")
    return 0


# -------------------------------------------------------------------------- zoo
_TIMM_ONLY = ("modules", "all", "size", "budget")


def _cmd_zoo(args: argparse.Namespace) -> int:
    if args.source == "huggingface":
        given = [f"--{name}" for name in _TIMM_ONLY if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"{' '.join(given)} apply to the timm zoo only; with --source huggingface choose "
                             f"architectures with --models (e.g. --models vit swin).")
        from . import zoo_hf

        args.repeats = 1 if args.repeats is None else args.repeats
        return zoo_hf.run(args)
    if args.source == "timm":
        from . import zoo_timm

        if args.models:
            raise ValueError("--models names torchvision models; with --source timm choose timm model modules "
                             "with --modules (e.g. --modules resnet vgg), or every model of them with --all.")
        args.repeats = 1 if args.repeats is None else args.repeats
        return zoo_timm.run(args)
    given = [f"--{name}" for name in _TIMM_ONLY if getattr(args, name) not in (None, False)]
    if given:
        raise ValueError(f"{' '.join(given)} apply to the timm zoo only; add --source timm, or leave them out.")
    args.repeats = 3 if args.repeats is None else args.repeats
    from .zoo import format_zoo_table, rows_to_json, run_zoo

    def show(row) -> None:
        if not args.no_progress:
            from tqdm.auto import tqdm

            tqdm.write(format_zoo_table([row], title=False).splitlines()[-1])

    rows = run_zoo(args.models, repeats=args.repeats, progress=not args.no_progress, on_row=show)
    table = format_zoo_table(rows)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# The torchvision zoo\n\nMade by `excitation zoo --out " + args.out + "`.\n\n"
                                  + table + "\n")
        print(f"wrote {args.out}")
    if args.json:
        Path(args.json).write_text(rows_to_json(rows))
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="excitation", description="Excitation pullbacks for ReLU networks.")
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="offline demo on in-repo digits models: figures + transfer numbers",
                          description="Offline demo: pullback and accentuation grids and the A->B transfer test.")
    demo.add_argument("--out", default="out", help="folder for the PNG figures (default: out)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the transfer test's target draw")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_cmd_demo)

    explain = sub.add_parser("explain", help="pullback and accentuation grids for a torchvision classifier",
                             description="Pullback grid (and accentuation grid) for images and target classes.")
    explain.add_argument("--model", default="resnet50", help="torchvision model name (default: resnet50)")
    explain.add_argument("--weights", help="torchvision weight set, e.g. IMAGENET1K_V1 (also gives class names)")
    explain.add_argument("--weights-file", help="a local state dict to load instead of downloading")
    explain.add_argument("--images", nargs="+", required=True, help="image files (resized and center-cropped)")
    explain.add_argument("--targets", nargs="+", type=int, required=True, help="target class indices (columns)")
    explain.add_argument("--extra", type=int, help="one extra class, not among the images' classes")
    explain.add_argument("--out", default="explain.png", help="pullback grid PNG (default: explain.png)")
    explain.add_argument("--steps", type=int, default=5, help="ascent steps; 0 skips the accentuation grid")
    explain.add_argument("--step-size", type=float, default=10.0, help="L2 step per image, [0,1] pixels")
    explain.add_argument("--radius", type=float, default=50.0, help="L2 ball radius, [0,1] pixels")
    explain.add_argument("--preset", choices=list(PRESETS), help="rule set (default: paper); see excitation.PRESETS")
    explain.add_argument("--temp", type=float, help="ReLU gate temperature (default: the preset's, 0.3 / 0.6)")
    explain.add_argument("--view", choices=["heatmap", "overlay", "rgb"], default="heatmap",
                         help="how pullbacks (and accentuation changes) are drawn: a signed heatmap (default), "
                              "a heatmap over the image, or an image around grey (the paper's convention)")
    explain.add_argument("--device", default="cpu", help="cpu or cuda")
    explain.set_defaults(func=_cmd_explain)

    app = sub.add_parser("app", help="a local web page: pullback vs gradient and accentuation for one image",
                         description="Serve a local Gradio page (needs the app extra: pip install 'excitation[app]').")
    app.add_argument("--model", help="torchvision/timm model name or module:function (default: the in-repo scene model)")
    app.add_argument("--weights-file", help="a local state dict for --model")
    app.add_argument("--weights", help="torchvision weight set, for class names and preprocessing (with --weights-file: "
                                       "no download)")
    app.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    app.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    app.set_defaults(func=_cmd_app)

    bench = sub.add_parser("bench", help="time pullbacks against the vanilla gradient and peers",
                           description="Time pullbacks against the vanilla gradient and peers (one process, "
                                       "interleaved rounds); prints a Markdown table.")
    bench.add_argument("--model", default="resnet50", help="torchvision classification model (random weights)")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--size", type=int, default=224, help="input side in pixels")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--compile", action="store_true", help="also time torch.compile'd vanilla and ours")
    bench.add_argument("--temp", type=float, default=0.3)
    bench.add_argument("--repeats", type=int, default=10, help="timed rounds (each runs every method once)")
    bench.add_argument("--warmup", type=int, default=2)
    bench.add_argument("--no-peers", action="store_true", help="skip zennit and captum")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--no-flush-check", action="store_true",
                       help="skip the footnote on subnormal floats (one thread, flush-to-zero off and on)")
    bench.add_argument("--json", help="also write the result as JSON")
    bench.set_defaults(func=_cmd_bench)

    zoo = sub.add_parser("zoo", help="excite every torchvision (or timm) classifier and tabulate the checks",
                         description="For each torchvision classification model (random weights, small input): "
                                     "traced?, sites by kind, unhandled sites, forward bit-identical?, finite?, "
                                     "relative difference from the gradient, time ratio. Prints a Markdown table. "
                                     "--source timm: one row per timm model module instead (as `zoo-timm`); "
                                     "--source huggingface: one row per transformers image-classification "
                                     "architecture.")
    zoo.add_argument("--source", choices=["torchvision", "timm", "huggingface"], default="torchvision",
                     help="whose models (default torchvision); timm takes --modules / --all / --size / --budget; "
                          "huggingface builds each image-classification architecture from a small random config")
    zoo.add_argument("--models", nargs="+", help="model names (default: all of list_models(module=torchvision.models)); "
                                                 "with --source huggingface, architectures (model types)")
    zoo.add_argument("--repeats", type=int, help="timed rounds per model, interleaved with vanilla (default: "
                                                 "3 torchvision, 1 timm)")
    from .zoo_timm import add_timm_options  # timm itself is imported only when it runs

    add_timm_options(zoo, repeats_default=None)
    zoo.add_argument("--out", help="also write the table as a Markdown page, e.g. docs/zoo.md")
    zoo.add_argument("--json", help="also write the rows as JSON")
    zoo.add_argument("--no-progress", action="store_true")
    zoo.set_defaults(func=_cmd_zoo)

    from .evaluation.cli import add_parser as add_evaluate_parser

    add_evaluate_parser(sub)

    from .extract.cli import add_parser as add_extract_parser

    add_extract_parser(sub)

    from .zoo_timm import add_parser as add_zoo_timm  # timm itself is imported only when it runs

    add_zoo_timm(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("excitation: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"excitation: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
