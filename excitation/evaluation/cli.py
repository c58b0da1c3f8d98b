"""The ``excitation evaluate`` subcommand (registered by :mod:`excitation.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .explainers import DEFAULT_EXPLAINERS, EXPLAINERS
from .metrics import DEFAULT_METRICS, METRICS

__all__ = ["add_parser", "run"]


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``excitation`` subcommands."""
    p = sub.add_parser(
        "evaluate", help="score pullbacks beside gradients and peers with Quantus metrics, per image, with CIs",
        description="Explainers x Quantus metrics, one score per image, paired bootstrap 95 % intervals of "
                    "(explainer - gradient). Default: the in-repo digits model on its held-out images (offline). "
                    "Writes a Markdown table, a JSON file and one figure.")
    p.add_argument("--model", help="digits-a (default), digits-b, or a torchvision/timm classifier name")
    p.add_argument("--weights", help="torchvision weight set or timm tag (e.g. IMAGENET1K_V2)")
    p.add_argument("--weights-file", help="a local state dict instead of downloading")
    p.add_argument("--images", help="image folder (ImageFolder or flat) or .txt list; needs --model")
    p.add_argument("--n", type=int, help="use the first N images (default: all)")
    p.add_argument("--size", type=int, help="center-crop side (default: the weights' own)")
    p.add_argument("--targets", choices=["predicted", "label"], default="predicted",
                   help="explain the predicted class (default) or the folder label")
    p.add_argument("--explainers", nargs="+", default=DEFAULT_EXPLAINERS, choices=list(EXPLAINERS),
                   help=f"default: {' '.join(DEFAULT_EXPLAINERS)} (gradient is always added)")
    p.add_argument("--metrics", nargs="+", default=DEFAULT_METRICS, choices=METRICS,
                   help=f"default: {' '.join(DEFAULT_METRICS)}. ROAD (Remove And Debias, most relevant pixels "
                        "first, area under 'still the explained class', lower is better) solves one sparse system per "
                        "image and percentage on the CPU: cheap on 8x8 digits, ~0.5 s per image and percentage at "
                        "224x224 (9 percentages)")
    p.add_argument("--temps", nargs="+", type=float, help="also sweep the pullback's ReLU temperature")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of Quantus' random subsets and perturbations")
    p.add_argument("--out", default="evaluation", help="output prefix: PREFIX.md, PREFIX.json, PREFIX.png")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the evaluation the arguments describe; print the table and the files written."""
    from .run import evaluate, load_inputs

    if args.n is not None and args.n < 2:
        raise ValueError(f"--n must be at least 2 (intervals need several images), got {args.n}.")
    if args.temps and any(t <= 0 for t in args.temps):
        raise ValueError(f"--temps must be positive, got {args.temps}.")
    model, x, y, description = load_inputs(args.model, weights=args.weights, weights_file=args.weights_file,
                                           images=args.images, n=args.n, targets=args.targets, size=args.size,
                                           progress=not args.no_progress)
    result = evaluate(model, x, y, explainers=args.explainers, metrics=args.metrics, temps=args.temps,
                      batch_size=args.batch_size, seed=args.seed, description=description,
                      progress=not args.no_progress)
    if args.temps:
        from ..calibrate import calibrate

        temps = calibrate(model, x[: args.batch_size], progress=False)
        result.calibrated = {k: float(v) for k, v in temps.items()}
    table = result.table()
    print(table)
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md, js, png = prefix.with_suffix(".md"), prefix.with_suffix(".json"), prefix.with_suffix(".png")
    md.write_text(f"# Evaluation\n\n{table}\n\n![metrics]({png.name})\n")
    js.write_text(result.to_json())
    result.figure(png)
    print(f"wrote {md}, {js}, {png}")
    print(f"cost: {result.seconds:.1f} s")
    return 0
