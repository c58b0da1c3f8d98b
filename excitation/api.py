"""Pullbacks and gradients of a model's class logits with respect to its input.

The functions here never modify the model: they run an excited (or, for
:func:`gradient`, a plain) *clone* of its module tree in eval mode, which
shares the model's tensors but has its own ``training`` flag, and they ask
autograd for the input gradient only, so no parameter ``.grad`` is touched and
no BatchNorm statistic is updated.

Why one module: the public entry points share one cache of prepared modules and its lock.
"""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .errors import ExcitationTraceError
from .fxpass.options import Options, TempsSpec, options_from
from .fxpass.rewrite import check_not_compiled, excite, is_excited, report
from .fxpass.rules import RulesSpec
from .fxpass.tracing import TRACE_GATE, clone_module_tree
from .outputs import OutputSpec, select_output

__all__ = ["pullback", "pullbacks", "gradient", "prepare", "clear_cache", "path_of"]

log = logging.getLogger("excitation")

Target = Union[int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]

# model -> {options: (identity, prepared module)}.  Weak keys: the cache never keeps a model alive.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, Tuple[Tuple[int, ...], nn.Module]]]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget every excited model :func:`pullback` built on the fly (e.g. after editing a model's modules).

    Returns
    -------
    None

    Raises
    ------
    Nothing.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> first = excitation.prepare(net)
    >>> excitation.clear_cache()
    >>> excitation.prepare(net) is first
    False
    """
    with _CACHE_LOCK:
        _CACHE.clear()


def prepare(
    model: nn.Module,
    *,
    excited: bool = True,
    compile: bool = False,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
) -> nn.Module:
    """The module :func:`pullback` (``excited=True``) or :func:`gradient` would run, in eval mode.

    An already-excited model is returned as is.  Plain models are excited once
    per option set and cached (weakly), so repeated calls do not re-trace.

    A model that ``torch.fx.symbolic_trace`` cannot trace (data-dependent control
    flow) is excited through dynamo instead: the result is a
    :class:`~excitation.dynamo_path.CompiledExcited` (``excitation_path == "dynamo"``,
    compiled with ``excitation.backend(..., inner="eager")``), and one ``INFO``
    line on the ``"excitation"`` logger says so.  :func:`path_of` tells which path a
    prepared module took.  ``excite(model)`` still raises the fx error.

    ``compile=True`` gives the compiled excited module, by the path the model takes:
    ``torch.compile(excite(model))`` on the fx path, and the dynamo path's backend with Inductor as
    its inner compiler.  Both lower their ReLU sites the same way (:mod:`excitation.fxpass.lowering`).

    Parameters
    ----------
    model : nn.Module
        A plain or excited model.
    excited : bool
        The excited module (``True``) or the plain one :func:`gradient` runs.
    compile : bool
        Compile the excited module with Inductor (only with ``excited=True``).
    options, preset, temp, pool_temp, gate, pool_backward, temps, rules
        As for :func:`excitation.excite`; only for plain models.  The cache is keyed by the
        :class:`~excitation.Options` they make.

    Returns
    -------
    nn.Module
        The cached module; ``excitation.report(...)`` works on it.

    Raises
    ------
    ValueError
        Bad options.
    excitation.ExcitationError
        Neither path can excite the model without a silent vanilla gradient.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> excitation.prepare(net) is excitation.prepare(net)   # cached
    True
    >>> excitation.api.path_of(excitation.prepare(net))
    'fx'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    check_not_compiled(model, "pullback" if excited else "gradient")
    chosen = options is not None or any(value is not None for value in (preset, temp, pool_temp, gate,
                                                                        pool_backward, temps, rules))
    if compile and not excited:
        raise ValueError("prepare(compile=True) compiles the excited module; pass excited=True, or torch.compile the "
                         "plain model yourself for the vanilla gradient.")
    if excited and getattr(model, "excitation_path", None) == "dynamo":
        return model  # already a CompiledExcited from an earlier prepare()
    if excited and is_excited(model):
        if chosen:
            found = report(model)
            raise ValueError(
                f"model is already excited (preset {found.preset!r}, temp={found.temp}, gate={found.gate!r}); the "
                f"options (preset, temp, pool_temp, gate, pool_backward, temps, rules) apply only to plain models. "
                f"Re-excite it with excitation.excite(model, ...) instead."
            )
        if not compile or isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            return model
    elif excited:
        options = options_from(options, preset=preset, temp=temp, pool_temp=pool_temp, gate=gate,
                               pool_backward=pool_backward, temps=temps, rules=rules)
    key = ("excited", options, compile) if excited else ("vanilla",)
    identity = _identity(model)
    with _CACHE_LOCK:
        cached = _CACHE.get(model, {}).get(key)
    if cached is not None and cached[0] == identity:
        return cached[1]
    if excited and is_excited(model):
        prepared = torch.compile(model)  # the excited model's own compile view
    elif excited:
        try:
            prepared = excite(model, options=options)
            prepared.excitation_path = "fx"
            if compile:
                prepared = torch.compile(prepared.eval())
        except ExcitationTraceError as exc:
            from .dynamo_path import DEFAULT_INNER, CompiledExcited

            inner = "inductor" if compile else DEFAULT_INNER
            reason = str(exc).splitlines()[0]
            log.info("excitation: %s does not trace with torch.fx (%s); using the torch.compile path "
                     "(excitation.backend, inner %r)", type(model).__name__, reason, inner)
            prepared = CompiledExcited(model, trace_error=reason, options=options, inner=inner)
    else:
        prepared = clone_module_tree(model)
    prepared.eval()
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = (identity, prepared)
    return prepared


def path_of(prepared: nn.Module) -> str:
    """Which path a module from :func:`prepare` runs: ``"fx"``, ``"dynamo"`` or ``"vanilla"``."""
    path = getattr(prepared, "excitation_path", None)
    if path is not None:
        return path
    return "fx" if is_excited(prepared) else "vanilla"


def _identity(model: nn.Module) -> Tuple[int, ...]:
    """Which module and tensor objects ``model`` is made of.

    The cached clone shares these objects.  ``model.to(...)``, ``model.double()`` or
    assigning a new submodule or buffer replaces some of them, and then the clone
    would silently run stale tensors: a changed identity means "re-excite".
    """
    ids: List[int] = []
    for module in model.modules():
        ids.append(id(module))
        ids.extend(id(t) for t in module._parameters.values())
        ids.extend(id(t) for t in module._buffers.values())
    return tuple(ids)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode, restoring every submodule's flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    if not any(flag for _, flag in flags):
        yield module
        return
    module.eval()
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


def _reference_tensor(model: nn.Module) -> Optional[Tensor]:
    for tensor in model.parameters():
        return tensor
    for tensor in model.buffers():
        if tensor.is_floating_point():
            return tensor
    return None


def check_input(model: nn.Module, x: Any, *, argument: str = "x") -> Tensor:
    """Validate the input tensor against the model; raise a clear error if they do not fit."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        if x.dtype in (torch.int64, torch.int32) and any(isinstance(m, nn.Embedding) for m in model.modules()):
            raise TypeError(
                f"{argument} holds integer token ids ({x.dtype}), which carry no gradient; use "
                f"excitation.text.pullback(model, input_ids, target), which pulls back to the input embeddings."
            )
        raise TypeError(
            f"{argument} has integer dtype {x.dtype}; gradients need floating point. "
            f"Convert it, e.g. {argument}.float() / 255."
        )
    if x.dim() == 0:
        raise ValueError(f"{argument} is a scalar; pass a batch, shape [N, ...].")
    if x.shape[0] == 0:
        raise ValueError(f"{argument} has batch size 0; pass at least one sample.")
    ref = _reference_tensor(model)
    if ref is not None:
        if ref.device != x.device:
            raise ValueError(
                f"{argument} is on {x.device} but the model is on {ref.device}; move one of them, "
                f"e.g. {argument}.to('{ref.device}')."
            )
        if ref.is_floating_point() and ref.dtype != x.dtype:
            raise TypeError(
                f"{argument} has dtype {x.dtype} but the model's parameters are {ref.dtype}; "
                f"use {argument}.to({ref.dtype}) or model.to({x.dtype})."
            )
    return x


def select_target(out: Any, target: Target, batch: int) -> Tensor:
    """One scalar per sample, ``out[i, target_i]`` (or ``target(out)`` for a callable)."""
    if callable(target) and not isinstance(target, Tensor):
        chosen = target(out)
        if not isinstance(chosen, Tensor) or chosen.shape != (batch,):
            shape = tuple(chosen.shape) if isinstance(chosen, Tensor) else type(chosen).__name__
            raise ValueError(f"target(output) must return one scalar per sample, shape ({batch},); got {shape}.")
        return chosen
    if not isinstance(out, Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the model's output has shape {shape}, not [N, classes]; pass target as a callable "
            f"mapping the output to one scalar per sample, e.g. target=lambda out: out.sum(dim=1)."
        )
    if out.shape[0] != batch:
        raise ValueError(
            f"the model returned {out.shape[0]} rows for a batch of {batch}; does x have a batch "
            f"dimension? Use x.unsqueeze(0) for a single sample."
        )
    index = target_indices(target, batch, out.shape[1], device=out.device)
    return out.gather(1, index[:, None])[:, 0]


def target_indices(target: Any, batch: int, classes: int, *, device: torch.device) -> Tensor:
    """``target`` as a LongTensor of shape [batch], validated against ``classes``."""
    if isinstance(target, bool):
        raise TypeError("target must be a class index, a sequence or a LongTensor, not a bool.")
    if isinstance(target, int):
        index = torch.full((batch,), target, dtype=torch.long, device=device)
    else:
        if isinstance(target, Tensor):
            if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
                raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}; use target.long().")
            index = target.to(device=device, dtype=torch.long).reshape(-1) if target.dim() <= 1 else None
            if index is None:
                raise ValueError(f"target must have shape [{batch}], got {tuple(target.shape)}.")
            if target.dim() == 0:
                index = index.expand(batch)
        else:
            try:
                values = list(target)
            except TypeError:
                raise TypeError(
                    f"target must be an int, a sequence of ints, a LongTensor [N] or a callable; "
                    f"got {type(target).__name__}."
                ) from None
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise TypeError(f"target sequence must hold ints, got {values!r}.")
            index = torch.tensor(values, dtype=torch.long, device=device)
        if index.numel() != batch:
            raise ValueError(f"target has {index.numel()} entries for a batch of {batch}; pass one per sample.")
    bad = (index < 0) | (index >= classes)
    if bool(bad.any()):
        raise IndexError(
            f"target {index[bad].tolist()} out of range for a model with {classes} classes "
            f"(valid: 0..{classes - 1})."
        )
    return index


def _input_gradient(module: nn.Module, x: Tensor, target: Target, create_graph: bool,
                    output: OutputSpec = None) -> Tensor:
    x = check_input(module, x)
    leaf = x.detach().requires_grad_(True)
    with TRACE_GATE.running(), torch.enable_grad(), _eval_mode(module):
        out = select_output(module(leaf), output)
        score = select_target(out, target, x.shape[0])
        (grad,) = torch.autograd.grad(score.sum(), leaf, create_graph=create_graph)
    return grad


def pullback(
    model: nn.Module,
    x: Tensor,
    target: Target,
    *,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    compile: bool = False,
    output: OutputSpec = None,
    create_graph: bool = False,
) -> Tensor:
    """The excitation pullback ``d(sum_i out[i, target_i]) / dx``.

    Parameters
    ----------
    model : nn.Module
        A plain model (excited on the fly and cached) or the result of
        :func:`excitation.excite` (used as is).
    x : Tensor
        Input batch [N, ...], on the model's device and dtype.
    target : int, sequence of ints, LongTensor [N] or callable
        The class per sample, or ``callable(output) -> Tensor [N]``.
    options, preset, temp, pool_temp, gate, pool_backward, temps, rules
        As for :func:`excitation.excite`; only for plain models.
    compile : bool
        Run the excited module compiled with Inductor (:func:`prepare` says how; compiled once and
        cached): the same values, to a compiled graph's rounding, faster after the first call.
    output : str, int, callable or None
        Which tensor of the model's output the target indexes (:func:`excitation.outputs.select_output`):
        by default the output itself, or its ``logits`` (a Hugging Face ``ModelOutput``).
    create_graph : bool
        Keep the graph of the pullback for higher-order derivatives.

    Returns
    -------
    Tensor
        Same shape as ``x``.  The model runs in eval mode (dropout off, no
        BatchNorm update); its parameters' ``.grad`` are left untouched.

    Raises
    ------
    ValueError
        Bad options (``temp``, ``gate``, ``temps``), an empty batch, a target out of range, an
        output without a class dimension.
    TypeError
        An integer input or a non-integer target.
    excitation.ExcitationError
        The model cannot be excited on either path (fx or dynamo) without a silent vanilla gradient.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.rand(2, 4)
    >>> pb = excitation.pullback(net, x, target=[0, 2])
    >>> pb.shape
    torch.Size([2, 4])
    >>> bool(torch.allclose(pb, excitation.gradient(net, x, target=[0, 2])))
    False
    """
    module = prepare(model, excited=True, compile=compile, options=options, preset=preset, temp=temp,
                     pool_temp=pool_temp, gate=gate, pool_backward=pool_backward, temps=temps, rules=rules)
    return _input_gradient(module, x, target, create_graph, output)


def gradient(model: nn.Module, x: Tensor, target: Target, *, output: OutputSpec = None,
             create_graph: bool = False) -> Tensor:
    """The vanilla input gradient ``d(sum_i out[i, target_i]) / dx``, in eval mode, for comparison.

    Parameters
    ----------
    model : nn.Module
        A plain model (an excited one is run through its original, un-excited graph).
    x : Tensor
        Input batch [N, ...], on the model's device and dtype.
    target : int, sequence of ints, LongTensor [N] or callable
        The class per sample, or ``callable(output) -> Tensor [N]``.
    output : str, int, callable or None
        As for :func:`pullback`.
    create_graph : bool
        Keep the graph of the gradient for higher-order derivatives.

    Returns
    -------
    Tensor
        Same shape as ``x``.  The model runs in eval mode; its parameters' ``.grad`` are untouched.

    Raises
    ------
    ValueError
        An empty batch, a target out of range or of the wrong shape, an output without a class dimension.
    TypeError
        An integer input or a non-integer target.

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> excitation.gradient(net, torch.rand(2, 4), target=1).shape
    torch.Size([2, 4])
    """
    module = prepare(model, excited=False)
    return _input_gradient(module, x, target, create_graph, output)


def pullbacks(
    model: nn.Module,
    x: Tensor,
    targets: Union[Sequence[int], Tensor],
    *,
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    pool_temp: Optional[float] = None,
    gate: Optional[str] = None,
    pool_backward: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
    compile: bool = False,
    output: OutputSpec = None,
) -> Tensor:
    """Pullbacks of K classes per input in one backward pass: a Tensor [N, K, ...].

    One forward pass; the K backward passes run batched with ``torch.func.vmap`` over the
    cotangents of a ``torch.func.vjp`` (on the dynamo path, for models fx cannot trace, one
    pullback per target through the same compiled graphs).

    Parameters
    ----------
    model : nn.Module
        A plain model (excited on the fly and cached) or the result of :func:`excitation.excite`.
    x : Tensor
        Input batch [N, ...], on the model's device and dtype.
    targets : sequence of ints, LongTensor [K] or LongTensor [N, K]
        The same K classes for every input, or K classes per input.
    options, preset, temp, pool_temp, gate, pool_backward, temps, rules
        As for :func:`excitation.excite`; only for plain models.
    compile : bool
        As for :func:`pullback`; the K backward passes then run one by one through the compiled graphs.
    output : str, int, callable or None
        As for :func:`pullback`.

    Returns
    -------
    Tensor
        Shape [N, K, ...]: ``result[:, k]`` equals ``pullback(model, x, targets[k])``.

    Raises
    ------
    TypeError
        ``targets`` holds floats or booleans.
    ValueError
        ``targets`` is not of shape [K] or [N, K] with K >= 1, a target is out of range, or the
        model's output is not [N, classes].

    Examples
    --------
    >>> import torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> x = torch.rand(2, 4)
    >>> grid = excitation.pullbacks(net, x, targets=[0, 1, 2])
    >>> grid.shape
    torch.Size([2, 3, 4])
    >>> bool(torch.allclose(grid[:, 1], excitation.pullback(net, x, target=1), atol=1e-6))
    True
    """
    module = prepare(model, excited=True, compile=compile, options=options, preset=preset, temp=temp,
                     pool_temp=pool_temp, gate=gate, pool_backward=pool_backward, temps=temps, rules=rules)
    x = check_input(module, x)
    batch = x.shape[0]
    index = torch.as_tensor(targets) if not isinstance(targets, Tensor) else targets
    if index.is_floating_point() or index.dtype == torch.bool:
        raise TypeError(f"targets must hold integers, got dtype {index.dtype}.")
    if index.dim() == 1:
        index = index[None, :].expand(batch, -1)
    if index.dim() != 2 or index.shape[0] != batch or index.shape[1] == 0:
        raise ValueError(f"targets must have shape [K] or [{batch}, K] with K >= 1, got {tuple(index.shape)}.")
    if compile or path_of(module) == "dynamo":
        # torch.func.vjp/vmap do not compose with dynamo's compiled custom backward.
        return _pullbacks_by_loop(module, x, index, output)
    with TRACE_GATE.running(), torch.enable_grad(), _eval_mode(module):
        out, vjp = torch.func.vjp(lambda t: select_output(module(t), output), x.detach())
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"pullbacks() needs a model output of shape [N, classes]; got {shape}.")
        flat = target_indices(index.reshape(-1), index.numel(), out.shape[1], device=out.device)
        index = flat.reshape(index.shape)
        # cotangents[k] selects out[i, index[i, k]] for every i.
        cotangents = torch.zeros((index.shape[1],) + tuple(out.shape), dtype=out.dtype, device=out.device)
        cotangents.scatter_(2, index.t()[:, :, None], 1.0)
        (grads,) = torch.func.vmap(vjp)(cotangents)
    return grads.transpose(0, 1)


def _pullbacks_by_loop(module: nn.Module, x: Tensor, index: Tensor, output: OutputSpec = None) -> Tensor:
    """:func:`pullbacks` for a compiled or dynamo-excited module: [N, K, ...] from K pullback calls.

    The inner backend may be AOTAutograd's (``aot_eager``, ``inductor``), whose compiled backward
    donates its buffers and runs once per forward (no ``retain_graph``): each of the K targets gets its own forward and backward,
    all through the same compiled graphs (and in grad mode, so no new guards fail).
    """
    grads = [_input_gradient(module, x, index[:, k].contiguous(), False, output) for k in range(index.shape[1])]
    return torch.stack(grads, dim=1)
