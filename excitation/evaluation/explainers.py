"""Explainers the evaluation compares: ``(model, x, target) -> attribution`` callables.

Every explainer takes a model (never modified), a batch ``x`` [N, C, H, W] and a
LongTensor ``target`` [N], and returns an attribution of ``x``'s shape -- except
``grad-cam``, which returns one channel [N, 1, H, W] (a class map has no colour;
broadcasting it to C channels would multiply its channel sum by C).  Quantus
re-explains with *randomised copies* of the model (MPRT), so an explainer must
use the model it is given, never one captured in advance.

The CAM explainers read the model's last convolutional block: ``model.cam_layer``
(a dotted submodule path) where the model has one, else the output of its last
``nn.Conv2d``.  They run on a deep copy, so the module structure is the
original's; an already-excited model (a ``GraphModule``) has no block modules
left, so there the last ``nn.Conv2d`` is used.

* ``grad-cam``: Captum ``LayerGradCam`` at that layer, ReLU of the
  gradient-weighted channel sum (Selvaraju et al.), upsampled bilinearly.
* ``guided-grad-cam``: Captum ``GuidedGradCam`` (guided backprop times the
  Grad-CAM map upsampled nearest, Captum's default).
* ``lrp``: zennit's ``EpsilonPlusFlat`` composite (flat rule on the first layer,
  z+ on convolutions, epsilon on dense layers) through
  ``zennit.attribution.Gradient``.  BatchNorm is merged into the preceding
  Conv/Linear by ``SequentialMergeBatchNorm`` where they sit in one
  ``nn.Sequential``; torchvision ResNets use zennit's ``ResNetCanonizer``
  (BatchNorm inside the blocks, the residual sum as a module), VGGs its
  ``VGGCanonizer``.  Other residual additions pass the relevance as a
  gradient would, and BatchNorm outside a Sequential is not merged: there the
  result is not a conservative LRP.  The output relevance is the target's
  logit, so the input relevance sums to about that logit.
* ``integrated-pullback``: Captum ``IntegratedGradients`` (black baseline, 16
  steps) on the excited model, preset ``"semantic"``: the path integral of
  pullbacks, the method author's "IntegratedPullbacks".
* ``guided-pullback-cam``: the author's "GuidedPbCam", Captum's Guided
  Grad-CAM run with the pullback backward: the guided pullback (at every ReLU
  the incoming gradient is gated softly and then clipped at zero, as guided
  backprop clips it) times the Grad-CAM map computed from pullback gradients
  at the CAM layer (ReLU, upsampled nearest); preset ``"semantic"``.  The
  author applied it at ResNet50's ``layer4[-1].conv3`` (a conv output); here
  the layer is the model's CAM layer, as for the other CAM explainers.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..fxpass.options import Options

__all__ = ["Explainer", "EXPLAINERS", "DEFAULT_EXPLAINERS", "make_explainer", "resolve_explainers", "cam_layer_name",
           "in_eval_mode"]

Explainer = Callable[[nn.Module, Tensor, Tensor], Tensor]


def in_eval_mode(model: nn.Module) -> nn.Module:
    """``model`` if it is in eval mode, else an eval-mode deep copy (metrics need eval; the model is never changed)."""
    if not any(m.training for m in model.modules()):
        return model
    return copy.deepcopy(model).eval()


def _pullback(options: Options) -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import pullback

        return pullback(model, x, target, options=options).detach()

    return explain


def _pullback_options(preset: str, chosen: Dict[str, Any]) -> Options:
    """The pullback's options: ``chosen["options"]`` (the ``"paper"`` entry only) or the preset's, at ``chosen["temp"]``."""
    given, temp = chosen.get("options") if preset == "paper" else None, chosen.get("temp")
    if given is None:
        return Options.build(preset, temp=temp)
    return given if temp is None else given.replace(temp=temp)


def _gradient() -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import gradient

        return gradient(model, x, target).detach()

    return explain


def _smooth_pullback(samples: int = 8, stdev: float = 0.15, preset: Optional[str] = None,
                     temp: Optional[float] = None, seed: int = 0) -> Explainer:
    """A noise tunnel over the pullback: the mean pullback at ``x + N(0, (stdev * range)^2)``."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..api import pullback

        generator = torch.Generator(device="cpu").manual_seed(seed)
        spread = (x.amax(dim=tuple(range(1, x.dim())), keepdim=True)
                  - x.amin(dim=tuple(range(1, x.dim())), keepdim=True)).clamp_min(1e-12)
        total = torch.zeros_like(x)
        for _ in range(samples):
            noise = torch.randn(x.shape, generator=generator).to(x) * stdev * spread
            total += pullback(model, x + noise, target, preset=preset, temp=temp).detach()
        return total / samples

    return explain


def _ascent(steps: int = 3, step_size: float = 1.0, radius: float = 5.0, preset: Optional[str] = None,
            temp: Optional[float] = None) -> Explainer:
    """The change ``ascend(model, x, target) - x`` after a few normalised pullback steps."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from ..ascent import ascend

        low, high = float(x.min()), float(x.max())
        moved = ascend(model, x, target, steps=steps, step_size=step_size, radius=radius,
                       pixel_range=(min(low, 0.0), max(high, 1.0)), preset=preset, temp=temp, progress=False)
        return (moved - x).detach()

    return explain


def _work_copy(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy without in-place ReLUs: hooks and canonizers must never touch the user's model."""
    work = copy.deepcopy(model).eval()
    for module in work.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return work


def cam_layer_name(model: nn.Module) -> str:
    """The dotted path of the layer the CAM explainers read: ``model.cam_layer``, else the last ``nn.Conv2d``.

    Raises
    ------
    ValueError
        If ``model.cam_layer`` names no submodule, or the model has no ``nn.Conv2d``.
    """
    name = getattr(model, "cam_layer", None)
    if isinstance(name, str):
        try:
            model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"model.cam_layer = {name!r} names no submodule of {type(model).__name__}: set it to "
                             f"the dotted path of the last convolutional block.") from exc
        return name
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has neither a cam_layer attribute nor an nn.Conv2d: the CAM "
                         f"explainers need a convolutional layer (set model.cam_layer to its dotted path).")
    return convs[-1]


def _grad_cam() -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from captum.attr import LayerAttribution, LayerGradCam

        work = _work_copy(model)
        layer = work.get_submodule(cam_layer_name(work))
        cam = LayerGradCam(work, layer).attribute(x.detach(), target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="bilinear").detach()

    return explain


def _guided_grad_cam() -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from captum.attr import GuidedGradCam

        work = _work_copy(model)
        layer = work.get_submodule(cam_layer_name(work))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            out = GuidedGradCam(work, layer).attribute(x.detach().clone().requires_grad_(True), target=target)
        return out.detach()

    return explain


def _lrp_canonizers(model: nn.Module) -> list:
    from zennit.canonizers import SequentialMergeBatchNorm

    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck
        from torchvision.models.vgg import VGG
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return [SequentialMergeBatchNorm()]
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in model.modules()):
        return [ResNetCanonizer()]
    if isinstance(model, VGG):
        return [VGGCanonizer()]
    return [SequentialMergeBatchNorm()]


def _lrp() -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        try:
            from zennit.attribution import Gradient
            from zennit.composites import EpsilonPlusFlat
        except ImportError as exc:
            raise ImportError("explainer 'lrp' needs zennit: pip install 'excitation[eval]'") from exc
        work = _work_copy(model)
        composite = EpsilonPlusFlat(canonizers=_lrp_canonizers(work))
        with Gradient(model=work, composite=composite) as attributor:
            with torch.no_grad():
                out = work(x.detach())
            # LRP starts from the target's logit (zennit's one-hot seed would scale each image by 1 / logit).
            rows = torch.arange(len(target), device=out.device)
            seed = torch.zeros_like(out)
            seed[rows, target] = out[rows, target]
            _, relevance = attributor(x.detach(), seed)
        return relevance.detach()

    return explain


def _integrated_pullback(preset: Optional[str] = "semantic", temp: Optional[float] = None, steps: int = 16,
                         method: str = "gausslegendre") -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from captum.attr import IntegratedGradients

        from ..captum import wrap

        ig = wrap(IntegratedGradients)(model, preset=preset, temp=temp)
        inputs = x.detach().clone().requires_grad_(True)
        return ig.attribute(inputs, baselines=torch.zeros_like(inputs), target=target, n_steps=steps,
                            method=method).detach()

    return explain


class _GuideFunction(torch.autograd.Function):
    """Identity forward; backward keeps the positive part of the gradient (guided backprop's clip)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad.clamp_min(0)


class _Guide(nn.Module):
    """After a ReLU site: the gate is positive, so clipping after it equals guided backprop's clip before it."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: Tensor) -> Tensor:
        return _GuideFunction.apply(x) if self.active else x


class _Tap(nn.Identity):
    """A module call at the CAM layer's output, for Captum's layer hooks."""


def _is_relu_site(excited: nn.Module, node: Any) -> bool:
    """A ReLU of the excited graph: a surrogate/fused ReLU op, or a ReLU the pass left as it was."""
    if node.op == "call_module":
        return isinstance(excited.get_submodule(node.target), nn.ReLU)
    if node.op != "call_function":
        return False
    if node.target in (torch.relu, torch.nn.functional.relu):
        return True
    name = getattr(node.target, "__name__", "")
    module = getattr(node.target, "__module__", "") or ""
    return module.startswith("excitation.") and "relu" in name and "leaky" not in name


def _insert_module_after(excited: nn.Module, node: Any, name: str, module: nn.Module) -> Any:
    excited.add_module(name, module)
    users = list(node.users)
    with excited.graph.inserting_after(node):
        new = excited.graph.call_module(name, args=(node,))
    for user in users:
        user.replace_input_with(node, new)
    return new


def _guided_excited(model: nn.Module, layer: str, preset: Optional[str], temp: Optional[float]) -> nn.Module:
    """A fresh excited copy with a :class:`_Tap` after ``layer``'s output and a :class:`_Guide` after every ReLU site."""
    from ..fxpass.rewrite import excite, is_excited

    if is_excited(model):
        raise ValueError("guided-pullback-cam excites the model itself (it adds guides to the excited graph): pass "
                         "the plain model, not the result of excitation.excite().")
    excited = excite(_work_copy(model), preset=preset, temp=temp)
    nodes = list(excited.graph.nodes)

    def inside(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        return (node.op == "call_module" and node.target == layer) or any(
            path == layer or path.startswith(layer + ".") for path, _ in stack.values())

    members = [n for n in nodes if inside(n)]
    if not members:
        raise ValueError(f"the CAM layer {layer!r} left no trace in the excited graph: set model.cam_layer to a "
                         f"block or Conv2d that the forward calls.")
    # The block's output is its last node in graph order (nn_module_stack records the calling module).
    _insert_module_after(excited, members[-1], "excitation_cam_tap", _Tap())
    for i, node in enumerate(n for n in nodes if _is_relu_site(excited, n)):
        _insert_module_after(excited, node, f"excitation_guide_{i}", _Guide())
    excited.recompile()
    return excited


def _guided_pullback_cam(preset: Optional[str] = "semantic", temp: Optional[float] = None) -> Explainer:
    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from captum.attr import LayerAttribution, LayerGradCam

        excited = _guided_excited(model, cam_layer_name(model), preset, temp)
        tap = next(m for m in excited.modules() if isinstance(m, _Tap))
        guides = [m for m in excited.modules() if isinstance(m, _Guide)]
        cam = LayerGradCam(excited, tap).attribute(x.detach(), target=target, relu_attributions=True)
        for guide in guides:
            guide.active = True
        inputs = x.detach().clone().requires_grad_(True)
        out = excited(inputs)
        (guided,) = torch.autograd.grad(out[torch.arange(len(target)), target].sum(), inputs)
        return (guided * LayerAttribution.interpolate(cam, tuple(x.shape[2:]), interpolate_mode="nearest")).detach()

    return explain


def _captum(kind: str, **options: Any) -> Explainer:
    """Captum's SmoothGrad, Integrated Gradients or Guided Backprop (signed), on a copy of the model."""

    def explain(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        try:
            from captum.attr import GuidedBackprop, IntegratedGradients, NoiseTunnel, Saliency
        except ImportError as exc:  # pragma: no cover - captum is in the eval extra
            raise ImportError(f"explainer {kind!r} needs Captum: pip install 'excitation[eval]'") from exc
        # Captum's hooks (Guided Backprop) and in-place ReLUs must never touch the user's model.
        work = copy.deepcopy(model).eval()
        for module in work.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        inputs = x.detach().clone().requires_grad_(True)
        if kind == "smoothgrad":
            stdev = options.get("stdev", 0.15) * float(x.max() - x.min())
            out = NoiseTunnel(Saliency(work)).attribute(inputs, target=target, nt_type="smoothgrad",
                                                        nt_samples=options.get("samples", 8), stdevs=stdev,
                                                        abs=False)
        elif kind == "integrated-gradients":
            out = IntegratedGradients(work).attribute(inputs, baselines=torch.zeros_like(inputs), target=target,
                                                      n_steps=options.get("steps", 16))
        elif kind == "guided-backprop":
            out = GuidedBackprop(work).attribute(inputs, target=target)
        else:  # pragma: no cover - guarded by EXPLAINERS
            raise ValueError(kind)
        return out.detach()

    return explain


# name -> (factory, short description).  Factories take keyword options.
EXPLAINERS: Dict[str, Any] = {
    "pullback": (lambda **o: _pullback(_pullback_options("paper", o)),
                 "excitation pullback, preset 'paper' (or evaluate's options=)"),
    "pullback-semantic": (lambda **o: _pullback(_pullback_options("semantic", o)), "excitation pullback, preset 'semantic'"),
    "smooth-pullback": (lambda **o: _smooth_pullback(temp=o.get("temp")), "noise tunnel (8 samples, 15 %) over the pullback"),
    "pullback-ascent": (lambda **o: _ascent(temp=o.get("temp")), "ascend(x) - x, 3 normalised pullback steps"),
    "gradient": (lambda **o: _gradient(), "vanilla input gradient"),
    "smoothgrad": (lambda **o: _captum("smoothgrad"), "Captum NoiseTunnel(Saliency), 8 samples, 15 %, signed"),
    "integrated-gradients": (lambda **o: _captum("integrated-gradients"), "Captum IntegratedGradients, black baseline, 16 steps"),
    "guided-backprop": (lambda **o: _captum("guided-backprop"), "Captum GuidedBackprop"),
    "grad-cam": (lambda **o: _grad_cam(), "Captum LayerGradCam at the CAM layer, ReLU, bilinear upsampling, 1 channel"),
    "guided-grad-cam": (lambda **o: _guided_grad_cam(), "Captum GuidedGradCam at the CAM layer"),
    "lrp": (lambda **o: _lrp(), "zennit EpsilonPlusFlat with BatchNorm-merging canonizers"),
    "integrated-pullback": (lambda **o: _integrated_pullback(temp=o.get("temp")),
                            "Captum IntegratedGradients on the excited model, preset 'semantic', black baseline, 16 steps"),
    "guided-pullback-cam": (lambda **o: _guided_pullback_cam(temp=o.get("temp")),
                            "guided pullback x pullback Grad-CAM at the CAM layer, preset 'semantic'"),
}

DEFAULT_EXPLAINERS: List[str] = ["pullback", "pullback-semantic", "gradient"]


def make_explainer(name: str, **options: Any) -> Explainer:
    """The explainer registered as ``name`` (see :data:`EXPLAINERS`)."""
    if name not in EXPLAINERS:
        raise ValueError(f"unknown explainer {name!r}; choose from {', '.join(EXPLAINERS)} or pass a callable.")
    return EXPLAINERS[name][0](**options)


def resolve_explainers(explainers: Union[None, Sequence[Union[str, Explainer]], Mapping[str, Any]],
                       **options: Any) -> Dict[str, Explainer]:
    """Names and callables -> ``{label: explainer}``; ``"gradient"`` is always included (the reference)."""
    if explainers is None:
        explainers = DEFAULT_EXPLAINERS
    items = list(explainers.items()) if isinstance(explainers, Mapping) else [
        (e if isinstance(e, str) else getattr(e, "__name__", f"callable{i}"), e) for i, e in enumerate(explainers)]
    resolved: Dict[str, Explainer] = {}
    for label, spec in items:
        if isinstance(spec, str):
            resolved[label] = make_explainer(spec, **options)
        elif callable(spec):
            resolved[label] = spec
        else:
            raise TypeError(f"explainer {label!r} must be a registered name or a callable (model, x, target), "
                            f"got {type(spec).__name__}.")
    if "gradient" not in resolved:
        resolved["gradient"] = make_explainer("gradient")
    return resolved
