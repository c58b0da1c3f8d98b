"""``excitation evaluate --dataset scenes``: localisation against ground truth on the in-repo scene models.

Every present class of a held-out scene is one explained target, with the visible pixels of its
object as the mask; a two-object scene is therefore explained once for each object, and the other
object's mask measures target-specificity.  Focus runs on 2x2 mosaics of one-object scenes.  The
faithfulness, robustness and randomisation metrics run on the first targets, since each costs
hundreds of forward passes per image.

>>> from excitation.evaluation.scenes import evaluate_scenes
>>> report = evaluate_scenes(["resnet"], n=8, faithfulness_n=0, focus_n=0, progress=False)
>>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .explainers import Explainer, resolve_explainers
from .run import Evaluation, evaluate
from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["SceneTargets", "SceneReport", "scene_targets", "evaluate_scenes", "scene_figure",
           "SCENE_EXPLAINERS", "SCENE_METRICS", "SCENE_FAITHFULNESS_METRICS", "HELD_OUT_SEED", "SCENE_MODELS"]

# Disjoint from the seeds the models were trained and validated on (see excitation.scenes.train).
HELD_OUT_SEED = 20261207
SCENE_MODELS = ("resnet", "vgg")
SCENE_EXPLAINERS: List[str] = [
    "pullback", "pullback-semantic", "smooth-pullback", "pullback-ascent", "integrated-pullback",
    "guided-pullback-cam", "gradient", "smoothgrad", "integrated-gradients", "guided-backprop", "grad-cam",
    "guided-grad-cam", "lrp"]
SCENE_METRICS: List[str] = ["PointingGame", "EnergyPointingGame", "RelevanceRankAccuracy", "RelevanceMassAccuracy",
                            "MaskAUC", "TargetSpecificity"]
SCENE_FAITHFULNESS_METRICS: List[str] = ["FaithfulnessCorrelation", "Infidelity", "MaxSensitivity", "Sparseness",
                                         "MPRT"]
FIGURE_EXPLAINERS: List[str] = ["pullback", "pullback-semantic", "gradient", "smoothgrad", "integrated-gradients",
                                "guided-backprop", "grad-cam", "lrp"]
# Wang et al. (2020) score the energy inside the object's bounding box; RelevanceMassAccuracy scores
# the same share on the exact mask, so the two columns say different things.
SCENE_METRIC_OPTIONS: Dict[str, Dict[str, Any]] = {"EnergyPointingGame": {"box": True}}


@dataclass(frozen=True)
class SceneTargets:
    """One row per (scene, present class): the image, the class, its object's mask and the other object's."""

    x: Tensor            # [M, 3, H, W] in [0, 1]
    target: Tensor       # [M] class index
    mask: Tensor         # [M, H, W] bool, the target object's visible pixels
    other: Tensor        # [M, H, W] bool, the other object's visible pixels (all False in one-object scenes)
    scene: Tensor        # [M] index of the scene

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def head(self, n: int) -> "SceneTargets":
        """The first ``n`` targets."""
        return SceneTargets(self.x[:n], self.target[:n], self.mask[:n], self.other[:n], self.scene[:n])

    @property
    def two_objects(self) -> Tensor:
        """[M] bool: the scene holds another object."""
        return self.other.flatten(1).any(1)


def scene_targets(scenes: Any) -> SceneTargets:
    """Expand scenes (``images``, ``labels`` [N, K] multi-hot, ``masks`` [N, K, H, W]) into explained targets.

    Parameters
    ----------
    scenes
        What :func:`excitation.scenes.make_scenes` returns.

    Returns
    -------
    SceneTargets
        One row per present class, in scene order.
    """
    rows, cols = torch.nonzero(scenes.labels > 0.5, as_tuple=True)
    masks = scenes.masks.bool()
    present = scenes.labels > 0.5
    other = torch.zeros_like(masks[rows, cols])
    for k, (i, c) in enumerate(zip(rows.tolist(), cols.tolist())):
        others = [j for j in torch.nonzero(present[i]).flatten().tolist() if j != c]
        for j in others:
            other[k] |= masks[i, j]
    return SceneTargets(x=scenes.images[rows], target=cols.long(), mask=masks[rows, cols], other=other, scene=rows)


#: The localisation metrics of :meth:`SceneReport.summary`: one per question (does the map point at the
#: object, how much of its energy is there, how much of its mass, does it follow the explained object).
SUMMARY_METRICS = ("PointingGame", "EnergyPointingGame", "RelevanceMassAccuracy", "TargetSpecificity")


def _delta(d: Interval) -> str:
    return f"{d.mean:+.3f} [{d.low:+.3f}, {d.high:+.3f}]"


@dataclass
class SceneReport:
    """What ``excitation evaluate --dataset scenes`` measured, per scene model."""

    localisation: Dict[str, Evaluation]
    faithfulness: Dict[str, Evaluation] = field(default_factory=dict)
    focus: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    accuracy: Dict[str, Dict[str, float]] = field(default_factory=dict)
    calibrated: Dict[str, Dict[str, float]] = field(default_factory=dict)
    n_scenes: int = 0
    seed: int = HELD_OUT_SEED
    seconds: float = 0.0

    def focus_table(self) -> List[str]:
        """Markdown lines: Focus per model and explainer, with the paired difference from the gradient."""
        from .focus import AUTHOR_FOCUS_RESNET50

        if not self.focus:
            return []
        models = list(self.focus)
        lines = ["", "Focus (2x2 mosaics of one-object scenes, the target in two quadrants; positive relevance in "
                     "the target's quadrants / all positive relevance; 0.5 is chance) ↑", "",
                 "| explainer | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
        explainers = list(next(iter(self.focus.values())))
        for e in explainers:
            cells = []
            for m in models:
                cell = str(bootstrap_mean(self.focus[m][e]))
                if e != "gradient":
                    d = paired_difference(self.focus[m][e], self.focus[m]["gradient"])
                    cell += f"<br>Δ {d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]" + (
                        " ✓" if d.low > 0 else " ✗" if d.high < 0 else "")
                cells.append(cell)
            lines.append(f"| {e} | " + " | ".join(cells) + " |")
        n = {m: len(next(iter(self.focus[m].values()))) for m in models}
        lines.append("")
        lines.append("Mosaics: " + ", ".join(f"{m} {k}" for m, k in n.items()) + ". For comparison, the method "
                     "author's published Focus on ImageNet ResNet50 (his numbers, another data set and model): "
                     + ", ".join(f"{k} {v:.3f}" for k, v in AUTHOR_FOCUS_RESNET50.items()) + ".")
        return lines

    def summary(self, metrics: Sequence[str] = SUMMARY_METRICS) -> str:
        """Markdown: one compact table per model, each cell ``mean (explainer - gradient [paired 95 % interval])``.

        The localisation metrics in ``metrics`` (those this report has) and Focus, for every explainer.
        """
        lines: List[str] = []
        for name, ev in self.localisation.items():
            chosen = [m for m in metrics if m in ev.metrics]
            focus = self.focus.get(name, {})
            acc = self.accuracy.get(name, {})
            about = f"{self.n_scenes} held-out scenes, {ev.n} targets"
            if acc:
                about += f"; held-out mAP {acc['mAP']:.3f}, exact match {acc['exact']:.1%}"
            lines += [f"**Scene model `{name}`** ({about}). Mean, and in brackets explainer − gradient with its "
                      "paired 95 % interval" + (f"; Focus on {len(next(iter(focus.values())))} mosaics." if focus else "."),
                      "", "| explainer | " + " | ".join(chosen + (["Focus"] if focus else [])) + " |",
                      "|---" * (len(chosen) + 1 + bool(focus)) + "|"]
            for e in ev.explainers:
                cells = []
                for m in chosen:
                    mean = ev.interval(e, m).mean
                    cells.append(f"{mean:.3f}" if e == "gradient" else f"{mean:.3f} ({_delta(ev.versus_gradient(e, m))})")
                if focus and e in focus:
                    mean = float(np.mean(focus[e]))
                    cells.append(f"{mean:.3f}" if e == "gradient"
                                 else f"{mean:.3f} ({_delta(paired_difference(focus[e], focus['gradient']))})")
                elif focus:
                    cells.append("-")
                lines.append(f"| {e} | " + " | ".join(cells) + " |")
            lines.append("")
        return "\n".join(lines).rstrip()

    def table(self) -> str:
        """The whole report as Markdown."""
        lines: List[str] = [f"Held-out scenes: {self.n_scenes} (seed {self.seed}); every present class is a target.",
                            "", "## Summary", "", self.summary()]
        for name, ev in self.localisation.items():
            acc = self.accuracy.get(name, {})
            lines += ["", f"## Scene model `{name}`"
                      + (f" (held-out mAP {acc['mAP']:.3f}, exact match {acc['exact']:.1%})" if acc else ""),
                      "", "### Localisation", "", ev.table()]
            if name in self.faithfulness:
                lines += ["", "### Faithfulness, robustness and randomisation", "", self.faithfulness[name].table()]
            if name in self.calibrated and self.calibrated[name]:
                values = np.array(list(self.calibrated[name].values()))
                lines += ["", f"`calibrate` on these scenes gives ReLU temperatures {values.min():.3g} to "
                              f"{values.max():.3g} (median {np.median(values):.3g}) over {len(values)} sites."]
        lines += self.focus_table()
        lines += ["", f"Cost: {self.seconds:.0f} s in all."]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: every per-target score, the Focus scores and the settings."""
        return {"n_scenes": self.n_scenes, "seed": self.seed, "seconds": self.seconds, "accuracy": self.accuracy,
                "localisation": {k: v.to_dict() for k, v in self.localisation.items()},
                "faithfulness": {k: v.to_dict() for k, v in self.faithfulness.items()},
                "focus": {m: {e: [float(v) for v in s] for e, s in d.items()} for m, d in self.focus.items()},
                "calibrated": self.calibrated}

    def write(self, prefix: Union[str, Path], figure_scenes: int = 8, progress: bool = False) -> List[Path]:
        """Write ``PREFIX.md``, ``PREFIX.json``, the metric charts and the scene figure; return the paths."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        written = []
        charts = []
        for name, ev in self.localisation.items():
            charts.append(ev.figure(prefix.with_name(f"{prefix.name}_{name}_localisation.png")))
            if name in self.faithfulness:
                charts.append(self.faithfulness[name].figure(prefix.with_name(f"{prefix.name}_{name}_faithfulness.png")))
        md = prefix.with_suffix(".md")
        body = self.table() + "\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in charts) + "\n"
        md.write_text("# Ground truth on scenes\n\n" + body)
        js = prefix.with_suffix(".json")
        js.write_text(json.dumps(self.to_dict(), indent=1))
        written += [md, js, *charts]
        return written


def _accuracy(model: nn.Module, scenes: Any) -> Dict[str, float]:
    from sklearn.metrics import average_precision_score

    with torch.no_grad():
        logits = torch.cat([model(scenes.images[i:i + 256]) for i in range(0, len(scenes.images), 256)])
    labels = scenes.labels.numpy()
    scores = torch.sigmoid(logits).numpy()
    m_ap = float(np.mean([average_precision_score(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]))
    exact = float(((scores > 0.5) == (labels > 0.5)).all(1).mean())
    return {"mAP": m_ap, "exact": exact}


def evaluate_scenes(
    models: Sequence[str] = SCENE_MODELS,
    *,
    n: int = 1000,
    seed: int = HELD_OUT_SEED,
    explainers: Optional[Sequence[str]] = None,
    metrics: Optional[Sequence[str]] = None,
    faithfulness_n: int = 128,
    faithfulness_metrics: Optional[Sequence[str]] = None,
    focus_n: int = 200,
    temp_sweep: Optional[Sequence[float]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> SceneReport:
    """Localisation, Focus and the faithfulness metrics on held-out scenes, for each scene model.

    Parameters
    ----------
    models : names
        Scene models from :func:`excitation.scenes.load_model` (default: both).
    n : int
        Held-out scenes (each explained once per present class, about 1.5 targets a scene).
    seed : int
        The scenes' seed (default: one never used in training).
    explainers, metrics : names, optional
        Default :data:`SCENE_EXPLAINERS` and :data:`SCENE_METRICS`.
    faithfulness_n : int
        Targets the faithfulness, robustness and randomisation metrics run on (0: none).
    focus_n : int
        Mosaics for Focus (0: none).
    temp_sweep : floats, optional
        ReLU temperatures swept under both presets (localisation metrics), plus :func:`excitation.calibrate`.

    Returns
    -------
    SceneReport

    Raises
    ------
    ValueError
        An unknown scene model, or ``n`` < 2.
    """
    from ..scenes import load_model, make_scenes

    if n < 2:
        raise ValueError(f"n must be at least 2 scenes (intervals need several), got {n}.")
    unknown = [m for m in models if m not in SCENE_MODELS]
    if unknown:
        raise ValueError(f"unknown scene models {unknown}; choose from {', '.join(SCENE_MODELS)}.")
    start = time.perf_counter()
    explainers = list(SCENE_EXPLAINERS if explainers is None else explainers)
    metrics = list(SCENE_METRICS if metrics is None else metrics)
    scenes = make_scenes(n, seed)
    targets = scene_targets(scenes)
    report = SceneReport(localisation={}, n_scenes=n, seed=seed)
    for name in models:
        model = load_model(name)
        report.accuracy[name] = _accuracy(model, scenes)
        about = (f"Model: in-repo scene model {name!r}; {len(targets)} targets from {n} held-out scenes "
                 f"({int(targets.two_objects.sum())} in two-object scenes). Channels summed to one map; the energy "
                 f"metrics use its positive part; EnergyPointingGame on the object's bounding box, "
                 f"RelevanceMassAccuracy on its mask.")
        report.localisation[name] = evaluate(
            model, targets.x, targets.target, masks=targets.mask, other_masks=targets.other, explainers=explainers,
            metrics=metrics, temp_sweep=temp_sweep, sweep_presets=("paper", "semantic"), batch_size=batch_size,
            description=about, progress=progress, metric_options=SCENE_METRIC_OPTIONS)
        if temp_sweep:
            from ..calibrate import calibrate

            found = calibrate(model, targets.x[:batch_size], progress=False)
            report.calibrated[name] = {k: float(v) for k, v in found.items()}
        if faithfulness_n > 0:
            few = targets.head(faithfulness_n)
            # Grad-CAM is left out: on randomised layers (MPRT) its ReLU'd map is all zero, which Quantus refuses.
            chosen = [e for e in explainers if e in ("pullback", "pullback-semantic", "smoothgrad",
                                                    "integrated-gradients", "guided-backprop")]
            report.faithfulness[name] = evaluate(
                model, few.x, few.target, explainers=chosen or None,
                metrics=list(SCENE_FAITHFULNESS_METRICS if faithfulness_metrics is None else faithfulness_metrics),
                batch_size=batch_size, description=f"Model: in-repo scene model {name!r}; the first {len(few)} "
                                                   f"targets.", progress=progress,
                metric_options={"FaithfulnessCorrelation": {"runs": 20}})
        if focus_n > 0:
            report.focus[name] = _focus(model, explainers, focus_n, seed, batch_size, progress)
    report.seconds = time.perf_counter() - start
    return report


def _focus(model: nn.Module, explainers: Sequence[str], n: int, seed: int, batch_size: int,
           progress: bool) -> Dict[str, np.ndarray]:
    from ..scenes import make_scenes
    from .focus import focus, make_mosaics

    # One-object scenes only: a mosaic quadrant must hold one class.  About half the scenes have one
    # object, so draw enough for ``n`` mosaics of four.
    pool = make_scenes(max(16, 10 * n), seed + 1)
    single = (pool.labels.sum(1) == 1)
    images, labels = pool.images[single], pool.labels[single]
    mosaics = make_mosaics(images, labels, n, seed)
    chosen = resolve_explainers(list(explainers))
    from tqdm.auto import tqdm

    out: Dict[str, np.ndarray] = {}
    for name in tqdm([e for e in chosen if e != "gradient"] + ["gradient"], desc="focus", disable=not progress):
        out[name] = focus(model, chosen[name], mosaics.images, mosaics.targets, mosaics.positions,
                          batch_size=batch_size)
    return out


def scene_figure(model: nn.Module, scenes: Any, path: Union[str, Path], *, explainers: Optional[Sequence[str]] = None,
                 count: int = 8, classes: Optional[Sequence[str]] = None, view: str = "overlay") -> Path:
    """Held-out scenes (two-object ones once per object), one column per explainer, as heatmaps over the image.

    Parameters
    ----------
    model : nn.Module
        A scene model.
    scenes
        Scenes from :func:`excitation.scenes.make_scenes`; rows are taken from the first of them.
    path : str or Path
        PNG, SVG or PDF, by suffix.
    explainers : names, optional
        Columns (default :data:`FIGURE_EXPLAINERS`).
    count : int
        Rows (targets).
    view : str
        ``"overlay"`` (heatmap over the image) or ``"heatmap"``.

    Returns
    -------
    Path
        Where the figure was written.
    """
    from ..scenes import CLASSES
    from ..visualize import grid, save

    classes = list(classes or CLASSES)
    targets = scene_targets(scenes).head(count)
    chosen = resolve_explainers(list(explainers or FIGURE_EXPLAINERS))
    names = [e for e in (explainers or FIGURE_EXPLAINERS)]
    attributions = {e: chosen[e](model, targets.x, targets.target).detach() for e in names}
    with torch.no_grad():
        probs = torch.sigmoid(model(targets.x))
    labels = [f"{classes[int(t)]} (p={float(probs[i, t]):.2f})" + (" ·2" if bool(targets.two_objects[i]) else "")
              for i, t in enumerate(targets.target)]
    # One scale per cell: the explainers' maps have different units (Grad-CAM's dwarfs a gradient's), so a
    # shared scale would hide all but one column.  The image is greyed so the colours read as the map's.
    fig = grid(targets.x, attributions, view=view, share="none", row_labels=labels, colorbar=False,
               grey_image=True, alpha=0.75)
    return save(fig, path)
