"""The ``excitation evaluate`` subcommand (registered by :mod:`excitation.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .explainers import DEFAULT_EXPLAINERS, EXPLAINERS
from .localisation import LOCALISATION_METRICS
from .metrics import DEFAULT_METRICS, METRICS

__all__ = ["add_parser", "run"]


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add ``evaluate`` to the ``excitation`` subcommands."""
    p = sub.add_parser(
        "evaluate", help="score pullbacks beside gradients and peers with Quantus metrics, per image, with CIs",
        description="Explainers x Quantus metrics, one score per image, paired bootstrap 95 % intervals of "
                    "(explainer - gradient). Default: the in-repo digits model on its held-out images (offline). "
                    "Writes a Markdown table, a JSON file and one figure.")
    p.add_argument("--dataset", choices=["digits", "images", "scenes", "tokens"],
                   help="digits: the in-repo digits models on held-out digits (the default without --images); "
                        "images: --model on the --images folder (the default with --images); scenes: the in-repo "
                        "scene models on held-out scenes with ground-truth masks (localisation, Focus, faithfulness); "
                        "tokens: the in-repo transformer on the keyword task, whose deciding token is known "
                        "(needs transformers: the hf extra)")
    p.add_argument("--model", nargs="+", help="digits-a (default), digits-b, a torchvision/timm classifier name, or "
                                              "with --dataset scenes: resnet and/or vgg (default both)")
    p.add_argument("--weights", help="torchvision weight set or timm tag (e.g. IMAGENET1K_V2)")
    p.add_argument("--weights-file", help="a local state dict instead of downloading")
    p.add_argument("--images", help="image folder (ImageFolder or flat) or .txt list; needs --model")
    p.add_argument("--n", type=int, help="use the first N images (default: all; with --dataset scenes: 1000 scenes)")
    p.add_argument("--faithfulness-n", type=int, default=128,
                   help="--dataset scenes: targets for the faithfulness, robustness and randomisation metrics "
                        "(default 128; 0 skips them)")
    p.add_argument("--focus-n", type=int, default=200,
                   help="--dataset scenes: 2x2 mosaics for Focus (default 200; 0 skips it)")
    p.add_argument("--size", type=int, help="center-crop side (default: the weights' own)")
    p.add_argument("--targets", choices=["predicted", "label"], default="predicted",
                   help="explain the predicted class (default) or the folder label")
    p.add_argument("--explainers", nargs="+", choices=list(EXPLAINERS),
                   help=f"default: {' '.join(DEFAULT_EXPLAINERS)}; with --dataset scenes every explainer "
                        f"(gradient is always added)")
    p.add_argument("--metrics", nargs="+", choices=METRICS + list(LOCALISATION_METRICS),
                   help=f"default: {' '.join(DEFAULT_METRICS)}; with --dataset scenes the localisation metrics "
                        f"{' '.join(LOCALISATION_METRICS)}, which need ground-truth masks. ROAD (Remove And Debias, most relevant pixels "
                        "first, area under 'still the explained class', lower is better) solves one sparse system per "
                        "image and percentage on the CPU: cheap on 8x8 digits, ~0.5 s per image and percentage at "
                        "224x224 (9 percentages)")
    p.add_argument("--temp-sweep", nargs="+", type=float, metavar="TEMP",
                   help="also sweep the pullback's ReLU temperature over these values, and run calibrate()")
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
    if args.temp_sweep and any(t <= 0 for t in args.temp_sweep):
        raise ValueError(f"--temp-sweep must be positive, got {args.temp_sweep}.")
    if args.dataset == "scenes":
        return _run_scenes(args)
    if args.dataset == "tokens":
        return _run_tokens(args)
    if args.dataset == "digits" and args.images:
        raise ValueError("--dataset digits uses the held-out digits; --images goes with --dataset images.")
    needing = [m for m in (args.metrics or []) if m in LOCALISATION_METRICS]
    if needing:
        raise ValueError(f"the metrics {needing} need ground-truth masks, which only --dataset scenes has; "
                         f"add --dataset scenes or drop them.")
    if args.model and len(args.model) > 1:
        raise ValueError(f"--model takes one name here, got {args.model}; several are for --dataset scenes.")
    model_name = args.model[0] if args.model else None
    model, x, y, description = load_inputs(model_name, weights=args.weights, weights_file=args.weights_file,
                                           images=args.images, n=args.n, targets=args.targets, size=args.size,
                                           progress=not args.no_progress)
    result = evaluate(model, x, y, explainers=args.explainers or DEFAULT_EXPLAINERS,
                      metrics=args.metrics or DEFAULT_METRICS, temp_sweep=args.temp_sweep,
                      batch_size=args.batch_size, seed=args.seed, description=description,
                      progress=not args.no_progress)
    if args.temp_sweep:
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


def _run_tokens(args: argparse.Namespace) -> int:
    from .tokens import evaluate_tokens

    conflicts = [flag for flag, value in (("--images", args.images), ("--weights", args.weights),
                                          ("--weights-file", args.weights_file), ("--size", args.size),
                                          ("--model", args.model), ("--metrics", args.metrics),
                                          ("--explainers", args.explainers), ("--temp-sweep", args.temp_sweep))
                 if value is not None]
    if conflicts:
        raise ValueError(f"--dataset tokens explains the in-repo keyword model with its own token explainers and "
                         f"metrics; {' '.join(conflicts)} do not apply to it.")
    report = evaluate_tokens(args.n or 512, batch_size=args.batch_size, progress=not args.no_progress)
    print(report.table())
    written = report.write(args.out)
    figure = Path(args.out).with_name(Path(args.out).name + "_tokens.html")
    token_figure(figure)
    print(f"wrote {', '.join(str(p) for p in written + [figure])}")
    print(f"cost: {report.seconds:.1f} s")
    return 0


def token_figure(path: Path, n: int = 6) -> Path:
    """An HTML page: ``n`` held-out keyword sequences, pullback and gradient x input heatmaps one above the other."""
    from .. import text
    from ..token_heatmap import save_page, tokens_html
    from ..tokens import load_model, make_sequences
    from ..tokens.task import token_names
    from ..tokens.train import HELD_OUT_SEED

    model = load_model()
    data = make_sequences(n, HELD_OUT_SEED)
    names = token_names(data.input_ids)
    pulled = text.pullback(model, data.input_ids)
    plain = text.gradient(model, data.input_ids, pulled.target)
    parts = []
    for i in range(n):
        truth = f"keyword at position {int(data.keyword[i])}, predicted class {int(pulled.target[i])}"
        parts.append(tokens_html(names[i], pulled.scores()[i], title=f"pullback (input x pullback): {truth}"))
        parts.append(tokens_html(names[i], plain.scores()[i], title="gradient x input"))
    return save_page(path, parts, title="excitation: keyword task, pullback vs gradient x input")


def _run_scenes(args: argparse.Namespace) -> int:
    from .scenes import HELD_OUT_SEED, SCENE_MODELS, evaluate_scenes, scene_figure

    conflicts = [flag for flag, value in (("--images", args.images), ("--weights", args.weights),
                                          ("--weights-file", args.weights_file), ("--size", args.size))
                 if value is not None]
    if args.targets != "predicted":
        conflicts.append("--targets")
    if conflicts:
        raise ValueError(f"--dataset scenes generates its own held-out scenes, models and targets (every present "
                         f"class); {' '.join(conflicts)} do not apply to it. Drop them, or use --dataset images.")
    models = args.model or list(SCENE_MODELS)
    report = evaluate_scenes(models, n=args.n or 1000, explainers=args.explainers, metrics=args.metrics,
                             faithfulness_n=args.faithfulness_n, focus_n=args.focus_n, temp_sweep=args.temp_sweep,
                             batch_size=args.batch_size, progress=not args.no_progress)
    print(report.table())
    written = report.write(args.out)
    from ..scenes import load_model, make_scenes

    figure = Path(args.out).with_name(Path(args.out).name + "_scenes.png")
    scene_figure(load_model(models[0]), make_scenes(8, HELD_OUT_SEED), figure)
    print(f"wrote {', '.join(str(p) for p in written + [figure])}")
    print(f"cost: {report.seconds:.1f} s")
    return 0
