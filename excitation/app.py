"""``excitation app``: a local web page to explain one image at a time.

Upload an image (or pick an example), see the classifier's top-5 classes, choose a target,
and compare the excitation pullback with the vanilla gradient (as overlays), and the image
accentuated towards the target along each of them, with the time every step took.

The default model is the in-repo scene classifier (:func:`excitation.scenes.load_model`);
``--model NAME --weights-file W`` loads any torchvision or timm classifier from a local state
dict instead (through :func:`excitation.models.load_classifier`, as ``excitation explain`` does).
Nothing is downloaded: example photos come from scikit-image's bundled files, scene examples
are generated.

Why one module: it is one page, its layout, its event handlers and their input checks,
which change together.

Needs the ``app`` extra (``pip install 'excitation[app]'``, i.e. gradio).

Examples
--------
>>> from excitation.app import build_app
>>> demo = build_app(model=my_model, classes=["cat", "dog"], size=64)  # doctest: +SKIP
>>> demo.launch(server_name="127.0.0.1")                               # doctest: +SKIP
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import visualize
from .presets import DEFAULT_PRESET, PRESETS

__all__ = ["AppModel", "build_app", "load_app_model", "launch", "example_photos", "TEMP_RANGE"]

#: Accepted ReLU gate temperatures: below, the pullback is the gradient to float precision;
#: above, every gate is about 1/2 and the model is linearised.
TEMP_RANGE = (0.01, 10.0)
#: Most accentuation steps one request may ask for (each is a forward and a backward pass).
MAX_STEPS = 100
#: scikit-image photos that ship inside the package (no download).
PHOTOS = ("astronaut", "chelsea", "coffee")
#: Held-out scene examples shown, and their seed when excitation.scenes does not name its test seed.
SCENE_EXAMPLES, SCENE_SEED = 6, 3


@dataclass
class AppModel:
    """What the app explains: a classifier on ``[0, 1]`` pixels and how to feed it.

    Attributes
    ----------
    model : nn.Module
        Takes ``[N, 3, size, size]`` pixels in [0, 1] (normalisation inside), returns logits.
    classes : list of str
        One name per logit.
    size : int
        Side of the square input; uploads are resized (short side) and center-cropped to it.
    examples : list of (name, image [3, H, W] in [0, 1])
        Example inputs offered next to the scikit-image photos.
    preprocess : callable, optional
        PIL image -> ``[3, size, size]`` tensor in [0, 1]; default resize + center-crop.
    description : str
        One line naming the model, shown in the page.
    multi_label : bool
        Independent sigmoid scores per class (the scene models) rather than one softmax.
    """

    model: nn.Module
    classes: List[str]
    size: int
    examples: List[Tuple[str, Tensor]] = field(default_factory=list)
    preprocess: Optional[Callable] = None
    description: str = ""
    multi_label: bool = False

    def __post_init__(self) -> None:
        if self.preprocess is None:
            from .models import pixel_transform

            self.preprocess = pixel_transform(self.size, self.size)
        self.model = self.model.eval()


def _scene_model(kind: str = "resnet") -> AppModel:
    try:
        from . import scenes
        from .scenes.models import load_model
    except ImportError as exc:
        raise RuntimeError(f"the default model is the in-repo scene classifier (excitation.scenes), which cannot be "
                           f"imported here ({exc}); pass --model NAME --weights-file W instead.") from exc
    model = load_model(kind)
    try:
        from .scenes.train import TEST_SEED as seed  # never used for training
    except ImportError:
        seed = SCENE_SEED
    held_out = scenes.make_scenes(SCENE_EXAMPLES, seed=seed)
    classes = list(scenes.CLASSES)
    examples = []
    for i, labels in enumerate(held_out.labels):
        present = " + ".join(classes[int(j)] for j in torch.as_tensor(labels).reshape(-1).nonzero().flatten())
        examples.append((f"scene {i}: {present or 'empty'}", held_out.images[i]))
    return AppModel(model, classes, int(held_out.images.shape[-1]), examples, multi_label=True,
                    description=f"In-repo scene classifier ({kind}, multi-label)")


def load_app_model(
    name: Optional[str] = None, weights_file: Optional[str] = None, weights: Optional[str] = None
) -> AppModel:
    """The model the app shows: the scene classifier, or a named classifier with local weights.

    Parameters
    ----------
    name : str, optional
        ``None``: ``excitation.scenes.load_model("resnet")``.  Otherwise a torchvision or timm
        model name (or ``module:function``), as for ``excitation explain``.
    weights_file : str, optional
        A local state dict for ``name`` (``.pt``/``.pth``/``.safetensors``).
    weights : str, optional
        A torchvision weight-set name, for its class names and preprocessing only when
        ``weights_file`` is given (otherwise it is downloaded once into the torch hub cache).

    Raises
    ------
    FileNotFoundError
        If ``weights_file`` does not exist.
    ValueError
        For an unknown model, or a state dict that does not fit it.
    """
    if name is None or name in ("scenes", "scenes-resnet", "resnet-scenes"):
        if weights_file:
            raise ValueError("--weights-file needs --model NAME (the default scene model has its own weights).")
        return _scene_model("resnet")
    if name == "scenes-vgg":
        return _scene_model("vgg")
    from .models import load_classifier

    if weights_file is not None and not Path(weights_file).is_file():
        raise FileNotFoundError(f"weights file {weights_file} does not exist; pass the path of a saved state dict.")
    loaded = load_classifier(name, weights=weights, weights_file=weights_file)
    size = int(getattr(loaded.preprocess, "crop", 224))
    model = loaded.pixel_model()
    with torch.no_grad():
        classes_n = int(model(torch.zeros(1, 3, size, size)).shape[1])
    classes = list(loaded.categories) if loaded.categories else [f"class {i}" for i in range(classes_n)]
    return AppModel(model, classes, size, [], loaded.preprocess, loaded.describe())


def example_photos() -> List[Tuple[str, np.ndarray]]:
    """scikit-image's bundled photos (:data:`PHOTOS`) as ``(name, uint8 [H, W, 3])``; empty without scikit-image.

    Read straight from the package's data folder, so nothing is fetched.
    """
    try:
        import skimage.data
    except ImportError:
        return []
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    photos = []
    for name in PHOTOS:
        path = folder / f"{name}.png"
        if path.is_file():
            with Image.open(path) as image:
                photos.append((name, np.asarray(image.convert("RGB"))))
    return photos


# ----------------------------------------------------------------------------- computing
@dataclass
class _Result:
    top5: Dict[str, float]
    target: int
    pullback: Tensor  # [C, H, W]
    gradient: Tensor
    image: Tensor  # [C, H, W], what the model saw
    after_pullback: Optional[Tensor]
    after_gradient: Optional[Tensor]
    seconds: Dict[str, float]


class _Engine:
    """The app's model and the computations behind the page (no gradio here, so tests can call it)."""

    def __init__(self, app_model: AppModel) -> None:
        self.app_model = app_model

    @property
    def model(self) -> nn.Module:
        return self.app_model.model

    def warm_up(self) -> None:
        """Trace the excited model once now, so the page's timings are those of a pullback, not of tracing."""
        from .api import pullback

        x = torch.zeros(1, 3, self.app_model.size, self.app_model.size)
        pullback(self.model, x, 0, preset=DEFAULT_PRESET, temp=PRESETS[DEFAULT_PRESET].temp)

    def pixels(self, image: Any) -> Tensor:
        """An uploaded image (PIL, uint8 [H, W, C] array or file path) -> ``[1, 3, size, size]`` in [0, 1]."""
        from PIL import Image, UnidentifiedImageError

        if image is None:
            raise ValueError("no image: upload one or pick an example.")
        try:
            if isinstance(image, (str, Path)):
                with Image.open(image) as opened:
                    opened.load()
                    pil = opened.convert("RGB")
            elif isinstance(image, np.ndarray):
                array = image
                if array.dtype != np.uint8:
                    array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
                if array.ndim == 3 and array.shape[-1] == 4:
                    array = array[..., :3]
                pil = Image.fromarray(array).convert("RGB")
            else:
                pil = image.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"the upload is not an image this app can read ({type(exc).__name__}); "
                             f"upload a PNG, JPEG, BMP or WebP file.") from None
        return self.app_model.preprocess(pil)[None]

    def top5(self, x: Tensor) -> Dict[str, float]:
        with torch.no_grad():
            logits = self.model(x).float()
            probabilities = (torch.sigmoid(logits) if self.app_model.multi_label else torch.softmax(logits, 1))[0]
        values, indices = probabilities.topk(min(5, probabilities.numel()))
        return {self.label(int(i)): float(v) for v, i in zip(values, indices)}

    def label(self, index: int) -> str:
        return f"{index}: {self.app_model.classes[index]}"

    def check(self, temp: Any, steps: Any, step_size: Any, radius: Any, preset: Any) -> Tuple[float, int, float, float, str]:
        """Validated options, or a ValueError that says what is allowed."""
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is not known; choose one of {', '.join(PRESETS)}.")
        low, high = TEMP_RANGE
        if temp is None or not isinstance(temp, (int, float)) or not math.isfinite(temp) or not low <= temp <= high:
            raise ValueError(f"temperature {temp!r} is out of range: choose a value in [{low:g}, {high:g}] "
                             f"(the presets use {', '.join(f'{p.temp:g}' for p in PRESETS.values())}).")
        if steps is None or not 0 <= int(steps) <= MAX_STEPS or int(steps) != steps:
            raise ValueError(f"accentuation steps {steps!r}: choose a whole number in [0, {MAX_STEPS}] (0 skips it).")
        for name, value in (("step size", step_size), ("radius", radius)):
            if value is None or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} {value!r} must be a positive number (L2 distance in [0, 1] pixels).")
        return float(temp), int(steps), float(step_size), float(radius), str(preset)

    def run(self, image: Any, target: Optional[int], preset: str, temp: float, steps: int, step_size: float,
            radius: float) -> _Result:
        from .api import gradient, pullback
        from .ascent import ascend

        temp, steps, step_size, radius, preset = self.check(temp, steps, step_size, radius, preset)
        x = self.pixels(image)
        top5 = self.top5(x)
        classes = len(self.app_model.classes)
        if target is None or (isinstance(target, (int, float)) and int(target) < 0):
            with torch.no_grad():
                target = int(self.model(x).argmax(1))
        if not isinstance(target, (int, float)) or not 0 <= int(target) < classes:
            raise ValueError(f"target {target!r} is not a class index in [0, {classes - 1}].")
        target = int(target)
        seconds: Dict[str, float] = {}
        start = time.perf_counter()
        pb = pullback(self.model, x, target, preset=preset, temp=temp)
        seconds["pullback"] = time.perf_counter() - start
        start = time.perf_counter()
        g = gradient(self.model, x, target)
        seconds["gradient"] = time.perf_counter() - start
        after_pb = after_g = None
        if steps > 0:
            common = dict(steps=steps, step_size=step_size, radius=radius, preset=preset, temp=temp, progress=False)
            start = time.perf_counter()
            after_pb = ascend(self.model, x, [target], direction="pullback", **common)[0]
            seconds["accentuation (pullback)"] = time.perf_counter() - start
            start = time.perf_counter()
            after_g = ascend(self.model, x, [target], direction="gradient", **common)[0]
            seconds["accentuation (gradient)"] = time.perf_counter() - start
        return _Result(top5, target, pb[0].detach(), g[0].detach(), x[0], after_pb, after_g, seconds)


def _default_budget(size: int, channels: int = 3) -> Tuple[float, float]:
    """(step size, radius): the published budget (5 steps of 10, radius 50 on 3x224x224) per pixel."""
    radius = 50.0 * math.sqrt(channels * size * size / (3 * 224 * 224))
    return round(radius / 5, 2), round(radius, 1)


def _render(view: str, image: Tensor, attribution: Tensor) -> np.ndarray:
    """The picture the page shows for one map (the same call tests make)."""
    if view == "overlay":
        return visualize.overlay(image, attribution, alpha=0.6, grey_image=True).rgb
    if view == "rgb":
        return visualize.heatmap(attribution, reduce="rgb").rgb
    return visualize.heatmap(attribution).rgb


def _rgb8(image: Tensor) -> np.ndarray:
    return np.round(image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- page
VIEWS = ("overlay", "heatmap", "rgb")


def build_app(
    model: Optional[nn.Module] = None,
    *,
    classes: Optional[Sequence[str]] = None,
    examples: Optional[Sequence[Tuple[str, Tensor]]] = None,
    size: Optional[int] = None,
    preprocess: Optional[Callable] = None,
    app_model: Optional[AppModel] = None,
    multi_label: bool = False,
    photos: bool = True,
    title: str = "Excitation pullbacks",
):
    """The gradio page (a ``gradio.Blocks``): call ``.launch()`` on it, or use :func:`launch`.

    Parameters
    ----------
    model : nn.Module, optional
        A classifier on ``[0, 1]`` pixels (normalisation inside).  ``None``: the scene classifier
        (:func:`load_app_model`).
    classes : sequence of str, optional
        Class names (default ``"class i"``).
    examples : sequence of (name, [3, H, W] tensor in [0, 1]), optional
        Example inputs offered in the page, after the scikit-image photos.
    size : int, optional
        The model's square input side (default: the examples', else 224).
    preprocess : callable, optional
        PIL image -> ``[3, size, size]`` in [0, 1] (default: resize the short side, center-crop).
    app_model : AppModel, optional
        All of the above at once (as :func:`load_app_model` returns).
    multi_label : bool
        Score classes with independent sigmoids (multi-label models) rather than a softmax.
    photos : bool
        Offer scikit-image's bundled photos as examples.
    title : str
        Page heading.

    Returns
    -------
    gradio.Blocks
        Its API: ``/explain`` (image, target, preset, temperature, steps, step size, radius, view),
        ``/predict`` (image) and ``/load_model`` (name, weights file, weight set).

    Raises
    ------
    ImportError
        Without gradio (``pip install 'excitation[app]'``).
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool: no telemetry calls
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("excitation app needs gradio: pip install 'excitation[app]' (or pip install gradio).") from None

    if app_model is None:
        if model is None:
            app_model = load_app_model()
        else:
            example_list = list(examples or [])
            if size is None:
                size = int(example_list[0][1].shape[-1]) if example_list else 224
            with torch.no_grad():
                n_classes = int(model.eval()(torch.zeros(1, 3, size, size)).shape[1])
            names = list(classes) if classes is not None else [f"class {i}" for i in range(n_classes)]
            if len(names) != n_classes:
                raise ValueError(f"classes has {len(names)} names but the model has {n_classes} outputs.")
            app_model = AppModel(model, names, size, example_list, preprocess, f"{type(model).__name__}",
                                 multi_label)
    engine = _Engine(app_model)
    engine.warm_up()
    step_default, radius_default = _default_budget(app_model.size)

    # Examples become PNG files in a folder of this page's own, served to the browser.
    folder = Path(tempfile.mkdtemp(prefix="excitation-app-"))
    atexit.register(shutil.rmtree, folder, True)
    example_files: List[str] = []
    from PIL import Image

    # The model's own examples first: they are what it was trained on.
    for i, (name, tensor) in enumerate(app_model.examples):
        path = folder / f"example_{i}.png"
        Image.fromarray(_rgb8(tensor)).save(path)
        example_files.append(str(path))
    for name, array in (example_photos() if photos else []):
        path = folder / f"{name}.png"
        Image.fromarray(array).save(path)
        example_files.append(str(path))

    target_choices = [("predicted class (top-1)", -1)] + [(engine.label(i), i) for i in range(len(app_model.classes))]
    default_preset = PRESETS[DEFAULT_PRESET]

    def predict(image):
        if image is None:
            return {}, -1, "Upload an image or pick an example."
        try:
            x = engine.pixels(image)
            top5 = engine.top5(x)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return top5, -1, f"Predicted {next(iter(top5))}. Choose a target and press Explain."

    def explain(image, target, preset, temp, steps, step_size, radius, view):
        try:
            if view not in VIEWS:
                raise ValueError(f"view {view!r}: choose one of {', '.join(VIEWS)}.")
            result = engine.run(image, target, preset, temp, steps, step_size, radius)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        except Exception as exc:  # anything else still gives a message, and the server keeps serving
            raise gr.Error(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]) from None
        raw = Path(tempfile.mkdtemp(dir=folder)) / "pullback.npy"
        np.save(raw, result.pullback.float().cpu().numpy())
        before = _rgb8(result.image)
        timing = " · ".join(f"{name} {1000 * s:.0f} ms" for name, s in result.seconds.items())
        status = f"Explained {engine.label(result.target)}. {timing}"
        return (
            result.top5,
            _render(view, result.image, result.pullback),
            _render(view, result.image, result.gradient),
            before,
            None if result.after_pullback is None else _rgb8(result.after_pullback),
            None if result.after_gradient is None else _rgb8(result.after_gradient),
            f"**Time** — {timing}",
            str(raw),
            status,
        )

    blocks_options: Dict[str, Any] = {"title": title, "analytics_enabled": False, "delete_cache": (3600, 3600)}
    if "theme" in inspect.signature(gr.Blocks.__init__).parameters:  # gradio < 6; later ones take it in launch()
        blocks_options.update(_theme_options(gr))
    # The page opens with the first example explained, so there is something to see at once.
    first: List[Any] = [None] * 9
    if example_files:
        try:
            first = list(explain(example_files[0], -1, DEFAULT_PRESET, default_preset.temp, 5, step_default,
                                 radius_default, "overlay"))
        except gr.Error:
            pass
    with gr.Blocks(**blocks_options) as demo:
        gr.Markdown(f"# {title}\n{app_model.description}: the excitation pullback (soft-gated input gradient) "
                    f"next to the vanilla gradient, and the image accentuated towards the target along each.")
        with gr.Row():
            with gr.Column(scale=4, min_width=300):
                image = gr.Image(example_files[0] if example_files else None, type="pil", label="Image",
                                 sources=["upload", "clipboard"], format="png", height=260,
                                 elem_classes=["excitation-pixels"])
                _check_uploads(image, gr)
                if example_files:
                    gr.Examples(examples=[[p] for p in example_files], inputs=[image], label="Examples",
                                examples_per_page=12)
                top5 = gr.Label(first[0], num_top_classes=5, label="Top-5 classes")
            with gr.Column(scale=5, min_width=360):
                with gr.Row():
                    pullback_image = gr.Image(first[1], label="Excitation pullback", format="png", interactive=False,
                                              height=230, elem_classes=["excitation-pixels"])
                    gradient_image = gr.Image(first[2], label="Vanilla gradient", format="png", interactive=False,
                                              height=230, elem_classes=["excitation-pixels"])
                gr.Markdown("**Accentuation** towards the target (same steps and L2 budget)")
                small = dict(format="png", interactive=False, height=160, min_width=100, elem_classes=["excitation-pixels"])
                with gr.Row():
                    before_image = gr.Image(first[3], label="Before", **small)
                    after_pb_image = gr.Image(first[4], label="Along pullback", **small)
                    after_g_image = gr.Image(first[5], label="Along gradient", **small)
                timing = gr.Markdown(first[6])
            with gr.Column(scale=4, min_width=300):
                target = gr.Dropdown(choices=target_choices, value=-1, label="Target class", filterable=True)
                with gr.Row():
                    preset = gr.Dropdown(choices=list(PRESETS), value=DEFAULT_PRESET, label="Preset")
                    temp = gr.Number(value=default_preset.temp, label="Temperature",
                                     info=f"gate sigmoid(z / T), T in [{TEMP_RANGE[0]:g}, {TEMP_RANGE[1]:g}]")
                with gr.Row():
                    steps = gr.Number(value=5, precision=0, label="Accentuation steps", info="0 skips it")
                    step_size = gr.Number(value=step_default, label="Step size", info="L2, [0, 1] pixels")
                    radius = gr.Number(value=radius_default, label="Radius", info="L2 ball")
                view = gr.Radio(choices=list(VIEWS), value="overlay", label="Display")
                run = gr.Button("Explain", variant="primary")
                status = gr.Textbox(first[8], label="Status", interactive=False, lines=2)
                raw_file = gr.File(first[7], label="Pullback as a NumPy array [C, H, W] (.npy)", interactive=False)
                with gr.Accordion("Model", open=False):
                    model_name = gr.Textbox(label="Model", placeholder="torchvision/timm name, e.g. resnet50")
                    weights_path = gr.Textbox(label="Weights file", placeholder="/path/to/state_dict.pt")
                    weight_set = gr.Textbox(label="Weight set (class names only)", placeholder="IMAGENET1K_V1")
                    load = gr.Button("Load model")

        def preset_temp(name):
            return PRESETS[name].temp if name in PRESETS else gr.update()

        def load_model(name, weights_file, weights):
            try:
                loaded = load_app_model(name.strip() or None if name else None, (weights_file or "").strip() or None,
                                        (weights or "").strip() or None)
            except Exception as exc:  # a message in the page; the current model stays
                raise gr.Error(f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"[:500]) from None
            engine.app_model = loaded
            engine.warm_up()
            choices = [("predicted class (top-1)", -1)] + [(engine.label(i), i) for i in range(len(loaded.classes))]
            return gr.update(choices=choices, value=-1), f"Loaded {loaded.description}. Press Explain."

        load.click(load_model, inputs=[model_name, weights_path, weight_set], outputs=[target, status],
                   api_name="load_model")
        preset.change(preset_temp, inputs=preset, outputs=temp, api_name=False)
        image.change(predict, inputs=image, outputs=[top5, target, status], api_name="predict")
        run.click(explain, inputs=[image, target, preset, temp, steps, step_size, radius, view],
                  outputs=[top5, pullback_image, gradient_image, before_image, after_pb_image, after_g_image, timing,
                           raw_file, status], api_name="explain")
    demo._excitation_folder = folder  # type: ignore[attr-defined]  # example files live here; launch() allows it
    demo._excitation_engine = engine  # type: ignore[attr-defined]
    return demo


def _check_uploads(component: Any, gr: Any) -> None:
    """Make an unreadable upload give a message, not a server-side trace.

    Wraps the one component's ``preprocess`` (a subclass would make gradio write a ``.pyi``
    stub next to this module).
    """
    preprocess = component.preprocess

    def checked(payload):
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as exc:
            raise gr.Error(f"The upload is not an image this app can read ({type(exc).__name__}); "
                           f"upload a PNG, JPEG, BMP or WebP file.") from None

    component.preprocess = checked


def _theme_options(gr) -> Dict[str, Any]:
    # System fonts: the default theme would fetch web fonts, and this page works offline.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": _CSS}


# Small inputs (64 px scenes) fill their boxes, drawn pixel for pixel rather than blurred.
_CSS = """
.excitation-pixels img { width: 100% !important; height: 100% !important; object-fit: contain;
                         image-rendering: pixelated; }
"""


def launch(
    demo: Any = None,
    *,
    host: str = "127.0.0.1",
    port: Optional[int] = None,
    block: bool = True,
    quiet: bool = False,
) -> Any:
    """Serve the page on ``http://host:port`` (default loopback only).

    Parameters
    ----------
    demo : gradio.Blocks, optional
        From :func:`build_app` (default: ``build_app()``, the scene model).
    host : str
        Interface to listen on; ``"0.0.0.0"`` to serve other machines.
    port : int, optional
        Port (default: the first free one from 7860).
    block : bool
        Serve until interrupted; ``False`` returns at once (the server runs in a thread).
    quiet : bool
        Print nothing.

    Returns
    -------
    gradio.Blocks
        The running page; ``.local_url`` is its address, ``.close()`` stops it.
    """
    import gradio as gr

    demo = build_app() if demo is None else demo
    options: Dict[str, Any] = dict(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                                   quiet=quiet, share=False, inbrowser=False)
    folder = getattr(demo, "_excitation_folder", None)
    if folder is not None:
        options["allowed_paths"] = [str(folder)]
    if "theme" in inspect.signature(demo.launch).parameters:  # gradio 6 takes the theme here, older Blocks()
        options.update(_theme_options(gr))
    demo.launch(**options)
    return demo
