"""Captum with excitation pullbacks: the pullback as an attribution class, and any Captum class on pullbacks.

>>> from captum.attr import NoiseTunnel
>>> from excitation.captum import ExcitationPullback
>>> explainer = ExcitationPullback(model, preset="semantic")
>>> attr = explainer.attribute(x, target=3)                     # like captum.attr.Saliency
>>> smooth = NoiseTunnel(explainer).attribute(x, target=3, nt_type="smoothgrad", nt_samples=8, stdevs=0.1)

It also works with ``captum.metrics.infidelity`` and ``captum.metrics.sensitivity_max``.

:func:`wrap` runs any gradient-based Captum class on an excited copy of the model,
so every gradient it takes is a pullback (e.g. Integrated Gradients becomes the
path integral of pullbacks):

>>> from captum.attr import IntegratedGradients, LayerGradCam
>>> from excitation.captum import wrap
>>> ig = wrap(IntegratedGradients)(model, preset="semantic")
>>> attr = ig.attribute(x, baselines=0 * x, target=3, n_steps=16)
>>> cam = wrap(LayerGradCam)(model, model.features[-1], preset="semantic")   # the layer is mapped by name

For language models, :class:`LLMPullbackAttribution` takes the place of Captum's
``LLMGradientAttribution(LayerGradientXActivation(model, embeddings), tokenizer)``: the same
``attribute(TextTokenInput, target=...)`` and the same ``LLMAttributionResult``, with pullbacks:

>>> from captum.attr import TextTokenInput
>>> from excitation.captum import LLMPullbackAttribution
>>> llm_attr = LLMPullbackAttribution(model, tokenizer)          # was LLMGradientAttribution(...)
>>> result = llm_attr.attribute(TextTokenInput("The capital of France is", tokenizer), target=" Paris")
>>> result.seq_attr, result.token_attr                           # per input token; per output x input token
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type

import torch
import torch.nn as nn
from torch import Tensor

try:
    from captum.attr._utils.attribution import Attribution, GradientAttribution
    from captum.log import log_usage
except ImportError as exc:  # pragma: no cover - captum is in the eval extra
    raise ImportError("excitation.captum needs Captum: pip install 'excitation[eval]'") from exc

__all__ = ["ExcitationPullback", "wrap", "PULLBACK_OPTIONS", "LLMPullbackAttribution"]


class ExcitationPullback(GradientAttribution):
    """The excitation pullback of ``forward_func`` (an ``nn.Module``), shaped like ``captum.attr.Saliency``.

    Parameters
    ----------
    forward_func : nn.Module
        The model.  It is never modified: an excited clone runs (cached per options).
    preset, temp, pool_temp : optional
        Options of :func:`excitation.pullback`.
    abs : bool
        Return ``|pullback|`` (as Saliency does by default).  Default ``False``: signed.
    """

    def __init__(self, forward_func: nn.Module, *, preset: Optional[str] = None, temp: Optional[float] = None,
                 pool_temp: Optional[float] = None, abs: bool = False) -> None:
        if not isinstance(forward_func, nn.Module):
            raise TypeError(f"ExcitationPullback needs the model as an nn.Module (the pass traces it), got "
                            f"{type(forward_func).__name__}.")
        super().__init__(forward_func)
        self.preset, self.temp, self.pool_temp, self.abs = preset, temp, pool_temp, abs

    @property
    def multiplies_by_inputs(self) -> bool:
        return False

    @log_usage()
    def attribute(self, inputs: Tensor, target: Any = None, abs: Optional[bool] = None,
                  additional_forward_args: Any = None) -> Tensor:
        """The pullback of ``target`` (int, list or LongTensor [N]; ``None`` for a single-output model).

        ``abs`` overrides the constructor's choice for this call.  ``additional_forward_args``
        is not supported (the pass traces ``forward(x)``); pass ``None``.
        """
        from .api import pullback

        if additional_forward_args is not None:
            raise ValueError("ExcitationPullback does not take additional_forward_args: wrap the model so that "
                             "forward(x) takes the input alone.")
        if isinstance(inputs, tuple):
            if len(inputs) != 1:
                raise ValueError(f"ExcitationPullback explains one input tensor, got a tuple of {len(inputs)}.")
            return (self.attribute.__wrapped__(self, inputs[0], target, abs),)  # type: ignore[attr-defined]
        n = inputs.shape[0]
        if target is None:
            target = 0
        if isinstance(target, int) or (isinstance(target, Tensor) and target.numel() == 1):
            target = torch.full((n,), int(target), dtype=torch.long, device=inputs.device)
        elif not isinstance(target, Tensor):
            target = torch.as_tensor(list(target), dtype=torch.long, device=inputs.device)
        if target.numel() != n:
            raise ValueError(f"target must give one class per input: {target.numel()} targets for {n} inputs.")
        out = pullback(self.forward_func, inputs.detach(), target.reshape(-1).long(), preset=self.preset,
                       temp=self.temp, pool_temp=self.pool_temp).detach()
        return out.abs() if (self.abs if abs is None else abs) else out


#: Keyword arguments of :func:`wrap`'s constructors that go to :func:`excitation.excite`, not to the Captum class.
PULLBACK_OPTIONS = ("preset", "temp", "pool_temp", "gate", "pool_backward", "temps")

# These override nn.ReLU backward hooks; an excited model has no nn.ReLU modules left (each ReLU site is a
# surrogate op), so they would silently return plain pullbacks.
_RELU_HOOK_CLASSES = ("GuidedBackprop", "Deconvolution", "GuidedGradCam")


def _excited_module(original: nn.Module, excited: nn.Module, value: Any) -> Any:
    """``value`` itself, or -- for a submodule of ``original`` -- the excited model's module of the same name."""
    if not isinstance(value, nn.Module):
        return value
    name = next((n for n, m in original.named_modules() if m is value), None)
    if name is None:
        return value
    called = {node.target for node in getattr(getattr(excited, "graph", None), "nodes", ()) if node.op == "call_module"}
    if getattr(excited, "graph", None) is not None and name not in called:
        raise ValueError(f"layer {name!r} is not called as a module in the excited model (the pass fuses BatchNorm "
                         f"into its ReLU and inlines containers): pass a Conv2d or Linear layer, e.g. one of "
                         f"{sorted(called)[-3:]}.")
    return excited.get_submodule(name)


def wrap(attribution_cls: Type["Attribution"]) -> Callable[..., "Attribution"]:
    """A constructor of ``attribution_cls`` whose gradients are excitation pullbacks.

    ``wrap(Cls)(model, *args, preset=..., temp=..., **kwargs)`` builds ``Cls(excited, *args, **kwargs)``
    where ``excited`` is the excited copy of ``model`` that :func:`excitation.pullback` uses
    (cached per model and options; ``model`` itself is never modified).

    Parameters
    ----------
    attribution_cls : type
        A Captum attribution class that differentiates its forward function
        (``IntegratedGradients``, ``Saliency``, ``InputXGradient``, ``GradientShap``,
        ``NoiseTunnel``-wrappable classes, layer classes such as ``LayerGradCam``).

    Returns
    -------
    callable
        ``(model, *args, **kwargs) -> attribution_cls instance``.  Keywords in
        :data:`PULLBACK_OPTIONS` go to :func:`excitation.excite`; the rest, and
        ``args``, to ``attribution_cls``.  A submodule of ``model`` among them (a
        layer) is replaced by the excited model's module of the same name.

    Raises
    ------
    TypeError
        If ``attribution_cls`` is not a Captum attribution class.
    ValueError
        For Guided Backprop, Deconvolution and Guided Grad-CAM, which rewrite ``nn.ReLU``
        backwards that the excited model no longer has (use the explainer
        ``"guided-pullback-cam"`` of :mod:`excitation.evaluation.explainers`).
    """
    if not (isinstance(attribution_cls, type) and issubclass(attribution_cls, Attribution)):
        raise TypeError(f"wrap needs a Captum attribution class (e.g. captum.attr.IntegratedGradients), got "
                        f"{attribution_cls!r}.")
    if attribution_cls.__name__ in _RELU_HOOK_CLASSES:
        raise ValueError(f"{attribution_cls.__name__} hooks nn.ReLU modules, which the excited model replaces by "
                         f"surrogate ops: wrapped it would return plain pullbacks.  Use the evaluation explainer "
                         f"'guided-pullback-cam' for the guided variant.")

    def construct(model: nn.Module, *args: Any, **kwargs: Any) -> Attribution:
        from .api import prepare

        if not isinstance(model, nn.Module):
            raise TypeError(f"wrap({attribution_cls.__name__}) needs the model as an nn.Module, got "
                            f"{type(model).__name__}.")
        options: Dict[str, Any] = {k: kwargs.pop(k) for k in PULLBACK_OPTIONS if k in kwargs}
        excited = prepare(model, excited=True, **options)
        args = tuple(_excited_module(model, excited, a) for a in args)
        kwargs = {k: _excited_module(model, excited, v) for k, v in kwargs.items()}
        attribution = attribution_cls(excited, *args, **kwargs)
        attribution.pullback_options = options  # type: ignore[attr-defined]
        return attribution

    construct.__name__ = construct.__qualname__ = f"Pullback{attribution_cls.__name__}"
    construct.__doc__ = (f"{attribution_cls.__name__} on the excited copy of ``model``: "
                         f"``(model, *args, preset=..., temp=..., **kwargs)``.")
    return construct


class LLMPullbackAttribution:
    """Captum's LLM gradient attribution with pullbacks: ``attribute(inp, target)`` -> ``LLMAttributionResult``.

    For each token of the target response, the pullback of its log-probability (given the prompt
    and the response's earlier tokens, teacher-forced) with respect to the input embeddings,
    reduced to one score per prompt token as ``LayerGradientXActivation`` on the embedding layer
    reduces gradients: ``sum_d pullback * embedding`` (:func:`excitation.text.pullback`,
    ``reduction="input_x_pullback"``).  ``seq_attr`` sums them over the response's tokens.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face causal language model (``get_input_embeddings()``, ``inputs_embeds=``).
    tokenizer
        Its tokenizer.
    options, keywords
        As for :func:`excitation.text.pullback` (``preset``, ``temp``, ``rules``, ...).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, **options: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.options = options

    def _target_ids(self, prompt: Tensor, target: Any, gen_args: Optional[Dict[str, Any]]) -> Tensor:
        if isinstance(target, str):
            return torch.tensor(self.tokenizer.encode(target, add_special_tokens=False), dtype=torch.long)
        if isinstance(target, Tensor):
            return target.reshape(-1).long()
        if target is None:
            args = {"max_new_tokens": 25, "do_sample": False, **(gen_args or {})}
            generated = self.model.generate(prompt, **args)
            return generated[0, prompt.shape[1]:]
        raise TypeError(f"target must be a string, a tensor of token ids or None, got {type(target).__name__}.")

    def attribute(self, inp: Any, target: Any = None, gen_args: Optional[Dict[str, Any]] = None, **kwargs: Any):
        """Attribute each token of ``target`` (a string, token ids, or ``None`` to generate it) to ``inp``'s tokens."""
        from captum.attr._core.llm_attr import LLMAttributionResult

        from . import text

        if kwargs:
            raise TypeError(f"LLMPullbackAttribution.attribute takes no {sorted(kwargs)}; the pullback has no "
                            f"attribution-method arguments (set temp=, preset=, rules= when constructing it).")
        prompt = inp.to_model_input().long()  # the token ids (to_tensor() is the interpretable mask)
        if prompt.dim() == 1:
            prompt = prompt[None]
        wanted = self._target_ids(prompt, target, gen_args).to(prompt.device)
        if wanted.numel() == 0:
            raise ValueError("the target response has no tokens.")
        rows = []
        for k in range(wanted.numel()):
            ids = torch.cat([prompt, wanted[None, :k]], dim=1)
            result = text.pullback(self.model, ids, wanted[k:k + 1], score="log_prob", **self.options)
            rows.append(result.scores("input_x_pullback")[0, :prompt.shape[1]])
        token_attr = torch.stack(rows)
        mask = getattr(inp, "itp_mask", None)
        if mask is not None:
            token_attr = token_attr[mask.to(token_attr.device).expand_as(token_attr)].view(token_attr.shape[0], -1)
        outputs = [self.tokenizer.decode([int(t)]) for t in wanted]
        return LLMAttributionResult(seq_attr=token_attr.sum(0), token_attr=token_attr, input_tokens=inp.values,
                                    output_tokens=outputs)
