"""``excitation.evaluate`` (this module's :func:`evaluate`): every explainer, every metric, per image, with paired intervals.

Data flows one way: images -> model -> explainers -> Quantus metrics (per image)
-> paired bootstrap against the gradient -> Markdown table, JSON, figure.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..fxpass.options import Options
from .explainers import Explainer, resolve_explainers
from .localisation import HIGHER_IS_BETTER as LOCALISATION_HIGHER_IS_BETTER
from .metrics import DEFAULT_METRICS, METRICS, in_eval_mode, mprt, run_metric
from .metrics import HIGHER_IS_BETTER as METRIC_HIGHER_IS_BETTER
from .road import road
from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["evaluate", "Evaluation", "load_inputs", "HIGHER_IS_BETTER"]

HIGHER_IS_BETTER: Dict[str, bool] = {**METRIC_HIGHER_IS_BETTER, **LOCALISATION_HIGHER_IS_BETTER}



def _curve_table(title: str, curves: Dict[str, Dict[Any, float]], column: Callable[[Any], str]) -> List[str]:
    """Markdown lines: a blank line, ``title``, then one row per explainer of its curve (same columns for all)."""
    points = list(next(iter(curves.values())))
    lines = ["", title, "", "| explainer | " + " | ".join(column(p) for p in points) + " |", "|---" * (len(points) + 1) + "|"]
    lines += [f"| {e} | " + " | ".join(f"{curve[p]:.3f}" for p in points) + " |" for e, curve in curves.items()]
    return lines

@dataclass
class Evaluation:
    """Per-image scores ``scores[explainer][metric]`` [N], intervals, the MPRT and ROAD curves and the cost.

    ``road_curves[explainer]`` maps each removal percentage to the fraction of images still
    predicted as the explained class (ROAD, most relevant pixels removed first).
    """

    scores: Dict[str, Dict[str, np.ndarray]]
    metrics: List[str]
    explainers: List[str]
    n: int
    description: str = ""
    mprt_curves: Dict[str, Dict[str, float]] = field(default_factory=dict)
    road_curves: Dict[str, Dict[str, float]] = field(default_factory=dict)
    sweep: List[Dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    seconds_by_explainer: Dict[str, float] = field(default_factory=dict)
    calibrated: Dict[str, float] = field(default_factory=dict)
    # Targets left out of a localisation metric (their mask is empty: the object is fully hidden).
    excluded: Dict[str, int] = field(default_factory=dict)

    def interval(self, explainer: str, metric: str) -> Interval:
        return bootstrap_mean(self.scores[explainer][metric])

    def versus_gradient(self, explainer: str, metric: str) -> Interval:
        """Mean of (explainer - gradient) over images, paired bootstrap 95 % interval."""
        return paired_difference(self.scores[explainer][metric], self.scores["gradient"][metric])

    def table(self) -> str:
        """A Markdown table: each metric's mean [95 % CI], and the paired difference from the gradient."""
        arrows = {m: ("↑" if HIGHER_IS_BETTER[m] else "↓") for m in self.metrics}
        head = "| explainer | " + " | ".join(f"{m} {arrows[m]}" for m in self.metrics) + " |"
        lines = [head, "|---" * (len(self.metrics) + 1) + "|"]
        for e in self.explainers:
            cells = []
            for m in self.metrics:
                cell = str(self.interval(e, m))
                if e != "gradient":
                    d = self.versus_gradient(e, m)
                    better = (d.low > 0) if HIGHER_IS_BETTER[m] else (d.high < 0)
                    worse = (d.high < 0) if HIGHER_IS_BETTER[m] else (d.low > 0)
                    cell += f"<br>Δ {d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]" + (" ✓" if better else " ✗" if worse else "")
                cells.append(cell)
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(f"N = {self.n} images; mean [bootstrap 95 % CI]; Δ = explainer − gradient, paired bootstrap "
                     f"95 % CI (✓ better, ✗ worse, else not resolved). {self.description}")
        if self.excluded:
            lines.append("Left out as undefined (an empty target mask, the object fully hidden; for MaskAUC also a "
                         "mask covering the image; for TargetSpecificity also a scene without another object): "
                         + ", ".join(f"{m} {k} of {self.n}" for m, k in self.excluded.items()) + ".")
        lines.append(f"Cost: {self.seconds:.1f} s in all (" + ", ".join(
            f"{k} {v:.1f} s" for k, v in self.seconds_by_explainer.items()) + ").")
        if self.mprt_curves:
            lines += _curve_table("MPRT curve (mean Spearman ρ with the original explanation, layers randomised "
                                  "top-down, cumulative):", self.mprt_curves, str)
        if self.road_curves:
            lines += _curve_table("ROAD curve (fraction of images still predicted as the explained class after the "
                                  "most relevant pixels, in %, are replaced by noisy linear imputation; lower = more "
                                  "faithful):", self.road_curves, lambda p: f"{p} %")
        if self.sweep:
            lines.append("")
            swept = [m for m in self.metrics if m != "MPRT"]
            lines.append("Temperature sweep (pullback, mean per metric; the ReLU temperature of each preset):")
            lines.append("")
            lines.append("| preset | temp | " + " | ".join(swept) + " |")
            lines.append("|---" * (len(swept) + 2) + "|")
            for row in self.sweep:
                lines.append(f"| {row.get('preset', 'paper')} | {row['temp']} | "
                             + " | ".join(f"{row[m]:.3g}" for m in swept) + " |")
        if self.calibrated:
            values = np.array(list(self.calibrated.values()))
            lines.append("")
            lines.append(f"`calibrate` gives per-site temperatures from {values.min():.3g} to {values.max():.3g} "
                         f"(median {np.median(values):.3g}) over {len(values)} sites.")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"n": self.n, "description": self.description, "seconds": self.seconds,
                               "seconds_by_explainer": self.seconds_by_explainer, "metrics": self.metrics,
                               "explainers": self.explainers, "mprt_curves": self.mprt_curves,
                               "road_curves": self.road_curves, "sweep": self.sweep,
                               "calibrated": self.calibrated, "excluded": self.excluded, "results": {}}
        for e in self.explainers:
            out["results"][e] = {}
            for m in self.metrics:
                i = self.interval(e, m)
                row = {"mean": i.mean, "ci95": [i.low, i.high], "n": i.n,
                       "per_image": [None if not np.isfinite(v) else float(v) for v in self.scores[e][m]]}
                if e != "gradient":
                    d = self.versus_gradient(e, m)
                    row["minus_gradient"] = {"mean": d.mean, "ci95": [d.low, d.high], "n": d.n}
                out["results"][e][m] = row
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def figure(self, path: Union[str, Path]) -> Path:
        """One chart per metric: each explainer's mean with its 95 % interval."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        swept = [m for m in self.metrics if m != "MPRT"] if self.sweep else []
        curve_panels = (1 if self.mprt_curves else 0) + (1 if self.road_curves else 0)
        panels = len(self.metrics) + curve_panels + len(swept)
        cols = min(4, panels)
        rows = -(-panels // cols)
        fig, grid = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.9 * rows), squeeze=False)
        axes = [list(grid.flat)]
        for ax in axes[0][panels:]:
            ax.axis("off")
        for k, (ax, m) in enumerate(zip(axes[0], self.metrics)):
            ivs = [self.interval(e, m) for e in self.explainers]
            means = np.array([i.mean for i in ivs])
            err = np.array([[i.mean - i.low for i in ivs], [i.high - i.mean for i in ivs]])
            colors = ["tab:gray" if e == "gradient" else "tab:blue" for e in self.explainers]
            ax.barh(range(len(ivs)), means, xerr=err, color=colors, capsize=3)
            ax.set_yticks(range(len(ivs)))
            ax.set_yticklabels(self.explainers if k % cols == 0 else [""] * len(ivs), fontsize=8)
            ax.invert_yaxis()
            ax.set_title(f"{m} {'↑' if HIGHER_IS_BETTER[m] else '↓'}", fontsize=9)
            ax.tick_params(labelsize=7)
        if self.mprt_curves:
            ax = axes[0][len(self.metrics)]
            for e, curve in self.mprt_curves.items():
                ax.plot(range(len(curve)), list(curve.values()), marker="o", ms=3, label=e)
            layers = list(next(iter(self.mprt_curves.values())))
            ax.set_xticks(range(len(layers)))
            ax.set_xticklabels(layers, rotation=60, fontsize=6)
            ax.set_title("MPRT (ρ, top-down) ↓", fontsize=9)
            ax.legend(fontsize=6)
        if self.road_curves:
            ax = axes[0][len(self.metrics) + (1 if self.mprt_curves else 0)]
            for e, curve in self.road_curves.items():
                ax.plot([float(p) for p in curve], list(curve.values()), marker="o", ms=3, label=e,
                        color="tab:gray" if e == "gradient" else None, ls="--" if e == "gradient" else "-")
            ax.set_xlabel("most relevant pixels imputed (%)", fontsize=7)
            ax.set_ylabel("still the explained class", fontsize=7)
            ax.set_title("ROAD curve ↓", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        first = len(self.metrics) + curve_panels
        presets = list(dict.fromkeys(row.get("preset", "paper") for row in self.sweep))
        for ax, m in zip(axes[0][first:], swept):
            for preset in presets:
                # Undefined means (a metric with no defined score at this N) would leave a log axis empty.
                rows = [row for row in self.sweep if row.get("preset", "paper") == preset and np.isfinite(row[m])]
                ax.plot([row["temp"] for row in rows], [row[m] for row in rows], marker="o", ms=3,
                        label=f"pullback ({preset})")
            reference = self.interval("gradient", m).mean
            if np.isfinite(reference):
                ax.axhline(reference, color="tab:gray", ls="--", label="gradient")
            if any(np.isfinite(row[m]) for row in self.sweep):
                ax.set_xscale("log")
            ax.set_xlabel("ReLU temp", fontsize=7)
            ax.set_title(f"{m} vs temperature", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6)
        fig.suptitle(f"N = {self.n}, mean and bootstrap 95 % CI", fontsize=9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def evaluate(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    *,
    explainers: Union[None, Sequence[Union[str, Explainer]], Dict[str, Any]] = None,
    metrics: Optional[Sequence[str]] = None,
    masks: Optional[Tensor] = None,
    other_masks: Optional[Tensor] = None,
    temp_sweep: Optional[Sequence[float]] = None,
    sweep_presets: Sequence[str] = ("paper",),
    batch_size: int = 64,
    seed: int = 0,
    description: str = "",
    progress: bool = True,
    metric_options: Optional[Dict[str, Dict[str, Any]]] = None,
    options: Optional[Options] = None,
) -> Evaluation:
    """Score explainers with Quantus metrics, per image, beside the vanilla gradient.

    Parameters
    ----------
    model : nn.Module
        A classifier on the given inputs (plain; never modified: Quantus randomises copies).
    x, target : Tensor
        Inputs [N, C, H, W] and the explained classes [N] (labels or predictions).
    explainers : names or callables ``(model, x, target) -> attribution``
        Registered names in :data:`excitation.evaluation.EXPLAINERS` (default: pullback
        under each preset and the gradient); the gradient is always added as the reference.
    metrics : names
        From :data:`excitation.evaluation.METRICS` (default: Infidelity, FaithfulnessCorrelation,
        MaxSensitivity, Sparseness, ROAD).  ``"MPRT"`` also records the per-layer curve, ``"ROAD"``
        the mean "still correct" curve per removal percentage.
    masks, other_masks : Tensor, optional
        Ground truth for the localisation metrics (:data:`LOCALISATION_METRICS`): ``masks`` [N, H, W]
        bool, the pixels of the explained object; ``other_masks`` [N, H, W], another object's pixels
        (all ``False`` where there is none), for ``TargetSpecificity``.  A target whose mask is empty
        (its object fully hidden) scores NaN, is left out of every mean and is counted in
        :attr:`Evaluation.excluded`.
    temp_sweep : floats, optional
        Also sweep the pullback's ReLU temperature under each of ``sweep_presets``: metric means
        per preset and temperature (every metric but MPRT).
    sweep_presets : preset names
        The presets the sweep runs under (default: ``("paper",)``).
    seed : int
        Seeds Quantus' random subsets and perturbations, identically for every explainer.
    options : excitation.Options, optional
        The options of the ``"pullback"`` explainer (default: the ``"paper"`` preset); the sweep's
        ``"paper"`` rows change only its ``temp``.

    Returns
    -------
    Evaluation
        Per-image scores, intervals, tables (:meth:`Evaluation.table`) and figures.

    Raises
    ------
    ValueError
        An unknown metric, shapes that do not match, or a localisation metric without ``masks``.
    """
    from .localisation import LOCALISATION_METRICS, localisation_scores, target_specificity

    start = time.perf_counter()
    metrics = list(DEFAULT_METRICS if metrics is None else metrics)
    known = list(METRICS) + list(LOCALISATION_METRICS)
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(known)}.")
    if x.dim() != 4 or target.shape != (x.shape[0],):
        raise ValueError(f"x must be [N, C, H, W] and target [N], got {tuple(x.shape)} and {tuple(target.shape)}.")
    localising = [m for m in metrics if m in LOCALISATION_METRICS]
    if localising and masks is None:
        raise ValueError(f"the metrics {localising} compare attributions with a ground-truth mask, and no masks "
                         f"were given: pass masks= (for example `excitation evaluate --dataset scenes`) or "
                         f"choose from {', '.join(METRICS)}.")
    if masks is not None and tuple(masks.shape) != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"masks must be [N, H, W] = {(x.shape[0], *x.shape[2:])}, got {tuple(masks.shape)}.")
    if "TargetSpecificity" in metrics and (other_masks is None or other_masks.shape != masks.shape):
        raise ValueError("TargetSpecificity needs other_masks [N, H, W] (another object's pixels, all False where "
                         "there is none) beside masks.")
    metric_options = metric_options or {}
    model = in_eval_mode(model)  # a training-mode model is copied, never switched
    with torch.no_grad():
        classes = int(model(x[:1]).shape[1])
    chosen = resolve_explainers(explainers, options=options)
    names = [n for n in chosen if n != "gradient"] + ["gradient"]
    from tqdm.auto import tqdm

    def score(m: str, a: Tensor, explainer: Explainer) -> np.ndarray:
        if m == "TargetSpecificity":
            return target_specificity(a, masks, other_masks, **metric_options.get(m, {}))
        if m in LOCALISATION_METRICS:
            return localisation_scores(m, a, masks, **metric_options.get(m, {}))
        return run_metric(m, model, x, target, a, explainer, classes=classes, batch_size=batch_size, seed=seed,
                          **metric_options.get(m, {}))

    def attribute(explainer: Explainer) -> Tensor:
        return torch.cat([explainer(model, x[i:i + batch_size], target[i:i + batch_size])
                          for i in range(0, len(x), batch_size)])

    scores: Dict[str, Dict[str, np.ndarray]] = {}
    curves: Dict[str, Dict[str, float]] = {}
    road_curves: Dict[str, Dict[str, float]] = {}
    seconds: Dict[str, float] = {}
    bar = tqdm(total=len(names) * len(metrics), desc="evaluate", disable=not progress)
    for name in names:
        explainer = chosen[name]
        t0 = time.perf_counter()
        a = attribute(explainer)
        scores[name] = {}
        for m in metrics:
            bar.set_postfix_str(f"{name}: {m}")
            if m == "MPRT":
                result = mprt(model, x, target, a, explainer, batch_size=batch_size, **metric_options.get(m, {}))
                scores[name][m] = result.average
                curves[name] = {k: float(np.nanmean(v)) for k, v in result.curve.items()}
            elif m == "ROAD":
                found = road(model, x, target, a, batch_size=batch_size, seed=seed, **metric_options.get(m, {}))
                scores[name][m] = found.auc
                road_curves[name] = {f"{p:g}": float(c) for p, c in zip(found.percentages, found.curves.mean(0))}
            else:
                scores[name][m] = score(m, a, explainer)
            bar.update(1)
        seconds[name] = time.perf_counter() - t0
    bar.close()
    # Undefined scores (NaN) are left out of every mean; count them on the reference explainer, whose
    # NaNs come from the ground truth alone (an empty mask; for MaskAUC also a mask covering the image;
    # for TargetSpecificity also a scene with no other object).
    excluded = {m: int(np.isnan(scores["gradient"][m]).sum()) for m in localising}
    excluded = {m: k for m, k in excluded.items() if k}
    sweep: List[Dict[str, Any]] = []
    if temp_sweep:
        sweep_metrics = [m for m in metrics if m != "MPRT"]
        settings = [(p, float(t)) for p in sweep_presets for t in temp_sweep]
        for preset, temp in tqdm(settings, desc="temperature sweep", disable=not progress):
            label = "pullback" if preset == "paper" else f"pullback-{preset}"
            chosen_t = resolve_explainers([label], temp=temp, options=options)[label]
            a = attribute(chosen_t)
            row: Dict[str, Any] = {"preset": preset, "temp": temp}
            for m in sweep_metrics:
                values = score(m, a, chosen_t)
                row[m] = float(np.mean(values[np.isfinite(values)])) if np.isfinite(values).any() else float("nan")
            for m in metrics:
                row.setdefault(m, float("nan"))
            sweep.append(row)
    return Evaluation(scores=scores, metrics=metrics, explainers=names, n=int(len(x)), description=description,
                      mprt_curves=curves, road_curves=road_curves, sweep=sweep, seconds=time.perf_counter() - start,
                      seconds_by_explainer=seconds, excluded=excluded)


def load_inputs(model_name: Optional[str] = None, *, weights: Optional[str] = None, weights_file: Optional[str] = None,
                images: Optional[str] = None, n: Optional[int] = None, targets: str = "predicted",
                size: Optional[int] = None, progress: bool = True):
    """``(model, x, target, description)``: the digits demo (default) or a classifier on an image folder.

    ``targets`` is ``"predicted"`` (the model's top class) or ``"label"`` (the folder's class index,
    which must be the model's class index, as in an ImageNet validation ImageFolder).
    """
    if targets not in ("predicted", "label"):
        raise ValueError(f"targets must be 'predicted' or 'label', got {targets!r}.")
    if model_name is None or model_name in ("digits-a", "digits-b"):
        if images is not None:
            raise ValueError("--images needs --model NAME (a torchvision or timm classifier); the digits models "
                             "use their own held-out images.")
        from ..demo.digits import load_digits, load_model

        which = "b" if model_name == "digits-b" else "a"
        model = load_model(which)
        (_, _), (x, y) = load_digits()
        if n is not None:
            x, y = x[:n], y[:n]
        description = f"Model: in-repo digits model {which!r}, held-out digits."
    else:
        if images is None:
            raise ValueError(f"--model {model_name} needs --images DIR (a folder of images, ImageFolder or flat).")
        from ..images import ImageDataset, list_images
        from ..models import load_classifier

        loaded = load_classifier(model_name, weights=weights, weights_file=weights_file, size=size, progress=progress)
        listing = list_images(images).head(n)
        data = ImageDataset(listing, loaded.preprocess)
        items = [data[i] for i in range(len(data))]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([item[1] for item in items], dtype=torch.long)
        model = loaded.pixel_model()
        description = f"Model: {loaded.describe()}, {len(x)} images from {images}."
        if targets == "label" and bool((y < 0).any()):
            raise ValueError(f"--targets label needs labelled images (an ImageFolder); {images} has none. "
                             f"Use --targets predicted.")
    if targets == "predicted":
        with torch.no_grad():
            y = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)])
        description += " Targets: the predicted class."
    else:
        description += " Targets: the labels."
    return model, x, y, description
