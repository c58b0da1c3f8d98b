"""Classifiers by name: torchvision, timm or ``module:function``, with weights and the weights' own preprocessing.

What ``excitation explain``, ``evaluate`` and ``extract`` load.  The result keeps the
network and its preprocessing apart, the way this library wants them: ``preprocess``
turns a PIL image into pixels in ``[0, 1]`` (resize and center-crop only), and
``normalize`` is the ``(mean, std)`` that :class:`excitation.Normalized` applies inside
the model, so pullbacks, accentuations and stores live in pixel space.

Nothing is downloaded unless weights are asked for *by name*; ``weights_file`` loads a
local state dict (``.pt``/``.pth`` via ``torch.load(weights_only=True)``, or
``.safetensors``), which is how offline machines and the tests use real code paths.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .ascent import IMAGENET_NORMALIZE, Normalized

__all__ = ["LoadedClassifier", "load_classifier", "pixel_transform", "load_state_dict_file", "SOURCES"]

#: Where a model name is looked up; ``"auto"`` tries them in this order.
SOURCES = ("torchvision", "timm", "entry point")

#: Preprocessing when neither the weights nor the model say otherwise: torchvision's ImageNet recipe.
DEFAULT_RESIZE, DEFAULT_CROP = 256, 224


@dataclass
class LoadedClassifier:
    """A classifier and how to feed it.

    Attributes
    ----------
    model : nn.Module
        The network in eval mode; it takes *normalised* inputs.
    name, source : str
        The name asked for and where it came from (``"torchvision"``, ``"timm"``, ``"entry point"``).
    preprocess : callable
        PIL image -> float tensor ``[3, crop, crop]`` in ``[0, 1]`` (resize, center-crop).
    normalize : (mean, std)
        What :meth:`pixel_model` applies before the network.
    categories : list of str or None
        Class names from the weights' metadata, when known.
    weights : str or None
        The weights loaded: a weight-set name, a file path, or ``None`` (random).
    """

    model: nn.Module
    name: str
    source: str
    preprocess: Callable
    normalize: Tuple[Tuple[float, ...], Tuple[float, ...]]
    categories: Optional[List[str]] = None
    weights: Optional[str] = None

    def pixel_model(self, device: "torch.device | str | None" = None) -> nn.Module:
        """``Normalized(model, *normalize)``: the classifier on ``[0, 1]`` pixels, as pullbacks want it."""
        return Normalized(self.model, *self.normalize, device=device).eval()

    def describe(self) -> str:
        return f"{self.source} {self.name} ({'weights ' + self.weights if self.weights else 'random weights'})"


def pixel_transform(resize: int, crop: int, interpolation: str = "bilinear") -> Callable:
    """PIL image -> ``[3, crop, crop]`` float tensor in ``[0, 1]``: RGB, resize the short side, center-crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    mode = InterpolationMode(interpolation) if not isinstance(interpolation, InterpolationMode) else interpolation

    def transform(image):
        image = TF.resize(image.convert("RGB"), resize, interpolation=mode, antialias=True)
        return TF.to_tensor(TF.center_crop(image, crop))

    transform.resize, transform.crop, transform.interpolation = resize, crop, mode.value  # type: ignore[attr-defined]
    return transform


def load_state_dict_file(
    model: nn.Module, path: "str | Path", *, argument: str = "--weights-file", drop_prefixes: Tuple[str, ...] = ()
) -> None:
    """Load a local state dict into ``model``; a clear error names the file and what did not fit.

    Keys starting with ``drop_prefixes`` are ignored (GoogLeNet / Inception v3 checkpoints carry
    auxiliary classifiers that the evaluation-time model is built without).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument} {path} does not exist.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{argument} {path} is a .safetensors file: pip install safetensors") from None

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # checkpoints saved as {"state_dict": ..., "epoch": ...}
    if not isinstance(state, dict):
        raise TypeError(f"{argument} {path} holds a {type(state).__name__}, not a state dict; save model.state_dict().")
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ValueError(
            f"{argument} {path} does not fit {type(model).__name__}: {' '.join(first[:2])[:300]} "
            f"Check --model, or save the state dict of exactly this architecture."
        ) from None


def _torchvision(name: str, weights: Optional[str], weights_file: Optional[str], progress: bool):
    import torchvision

    if name not in torchvision.models.list_models():
        return None
    weight_enum = None
    if weights:
        try:
            weight_enum = torchvision.models.get_model_weights(name)[weights]
        except KeyError:
            names = [w.name for w in torchvision.models.get_model_weights(name)]
            raise ValueError(f"--weights {weights!r} is not a weight set of {name}; choose from {names}.") from None
    # Without their auxiliary heads, as torchvision's own pretrained models run in eval mode.
    auxiliary = name in ("googlenet", "inception_v3")
    kwargs = {"aux_logits": False, "init_weights": True} if auxiliary else {}
    drop = ("aux1.", "aux2.", "AuxLogits.") if auxiliary else ()
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if weights_file:
        load_state_dict_file(model, weights_file, drop_prefixes=drop)
    elif weight_enum is not None:
        try:
            state = weight_enum.get_state_dict(progress=progress, check_hash=True)
        except Exception as exc:  # URLError, OSError, HTTPError...
            raise RuntimeError(
                f"could not load {name} weights {weight_enum.name} ({type(exc).__name__}: {exc}). They are "
                f"downloaded once into the torch hub cache; on an offline machine copy the file there, or pass "
                f"--weights-file PATH (keep --weights for the class names and preprocessing)."
            ) from exc
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(drop)})
    if weight_enum is not None:
        preset = weight_enum.transforms()
        preprocess = pixel_transform(int(preset.resize_size[0]), int(preset.crop_size[0]), preset.interpolation.value)
        normalize = (tuple(preset.mean), tuple(preset.std))
        categories = list(weight_enum.meta.get("categories") or []) or None
    else:
        preprocess, normalize, categories = pixel_transform(DEFAULT_RESIZE, DEFAULT_CROP), IMAGENET_NORMALIZE, None
    return model, preprocess, normalize, categories


def _timm(name: str, weights: Optional[str], weights_file: Optional[str], progress: bool):
    try:
        import timm
    except ImportError:
        return None
    architecture = name.split(".")[0]
    if architecture not in timm.list_models():
        return None
    full = f"{architecture}.{weights}" if weights and "." not in name else name
    pretrained = bool(weights or "." in name) and not weights_file
    try:
        model = timm.create_model(full, pretrained=pretrained)
    except Exception as exc:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load timm weights {full} ({type(exc).__name__}: {str(exc)[:200]}). timm downloads them "
            f"from the Hugging Face hub once; offline, pass --weights-file PATH (a state dict or .safetensors)."
        ) from exc
    if weights_file:
        load_state_dict_file(model, weights_file)
    config = timm.data.resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    resize = int(round(crop / float(config.get("crop_pct", 1.0) or 1.0)))
    interpolation = config.get("interpolation", "bilinear")
    preprocess = pixel_transform(resize, crop, interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear")
    return model, preprocess, (tuple(config["mean"]), tuple(config["std"])), None


def _entry_point(name: str, weights_file: Optional[str]):
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--model {name!r}: cannot import module {module_name!r} ({exc}).") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValueError(f"--model {name!r}: module {module_name!r} has no function {function_name!r}.")
    model = factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"--model {name!r} returned a {type(model).__name__}, not an nn.Module.")
    if weights_file:
        load_state_dict_file(model, weights_file)
    return model, pixel_transform(DEFAULT_RESIZE, DEFAULT_CROP), IMAGENET_NORMALIZE, None


def load_classifier(
    name: str,
    *,
    weights: Optional[str] = None,
    weights_file: "str | Path | None" = None,
    source: str = "auto",
    size: Optional[int] = None,
    normalize: Optional[Tuple[Sequence[float], Sequence[float]]] = None,
    progress: bool = True,
) -> LoadedClassifier:
    """Load a classifier by name, with weights by name or from a file, and its preprocessing.

    Parameters
    ----------
    name : str
        A torchvision model (``"resnet50"``), a timm model (``"convnext_tiny"``, or with a
        weight tag, ``"resnet50.a1_in1k"``), or ``"module:function"`` returning an ``nn.Module``.
    weights : str, optional
        torchvision: a weight-set name (``"IMAGENET1K_V1"``), which also gives class names and the
        transforms; timm: a pretrained tag (``"a1_in1k"``).  Downloads once into the usual caches.
    weights_file : path, optional
        A local state dict (``.pt``/``.pth``/``.safetensors``) loaded instead of downloading.
        Without ``weights`` and ``weights_file`` the weights are random.
    source : {"auto", "torchvision", "timm", "entry point"}
        Where to look the name up; ``"auto"`` tries torchvision, then timm, and treats a name
        with ``":"`` as an entry point.
    size, normalize : optional
        Override the preprocessing: center-crop side (the resize is ``size * 256 / 224``) and
        ``(mean, std)``.
    """
    if source not in ("auto",) + SOURCES:
        raise ValueError(f"source={source!r}; use 'auto' or one of {SOURCES}.")
    if not isinstance(name, str) or not name:
        raise ValueError("--model must name a torchvision or timm classifier, or module:function.")
    found, where = None, None
    if ":" in name and source in ("auto", "entry point"):
        found, where = _entry_point(name, weights_file and str(weights_file)), "entry point"
    else:
        for candidate in (("torchvision", _torchvision), ("timm", _timm)):
            if source in ("auto", candidate[0]):
                found = candidate[1](name, weights, weights_file and str(weights_file), progress)
                if found is not None:
                    where = candidate[0]
                    break
    if found is None:
        raise ValueError(
            f"--model {name!r} is not a torchvision classifier (torchvision.models.list_models()) nor a timm model "
            f"(timm.list_models(); pip install timm); pass module:function for anything else."
        )
    model, preprocess, norm, categories = found
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 8:
            raise ValueError(f"--size must be an integer >= 8, got {size!r}.")
        preprocess = pixel_transform(int(round(size * DEFAULT_RESIZE / DEFAULT_CROP)), size)
    if normalize is not None:
        mean, std = normalize
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"--normalize needs mean and std of equal length with std > 0, got {normalize!r}.")
        norm = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    label = str(weights_file) if weights_file else (weights or (name.split(".", 1)[1] if "." in name and where == "timm" else None))
    return LoadedClassifier(model.eval(), name, where, preprocess, norm, categories, label)
