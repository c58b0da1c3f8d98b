"""BatchNorm (+ residual add) + ReLU as one surrogate op that keeps nothing vanilla does not keep.

Why fuse.  A surrogate ReLU's backward needs its pre-activation ``z``.  Vanilla's
in-place ReLU overwrites ``z``, and the BatchNorm before it keeps its own input
``x`` (autograd saves it even when the affine parameters are frozen), so a
``conv -> bn -> relu`` block costs vanilla two saved tensors (``x`` and the ReLU
output, which the next convolution saves anyway) and an unfused pullback three.
That third tensor is the whole memory overhead of an exact pullback (measured in docs/design-measurements.md),
and allocating ``relu(z)`` out of place costs CPU time too (a fresh tensor pays a page
fault per 4 KiB on first write, which ``clamp_min_`` in place does not).

The fused op runs the same ``torch.batch_norm`` call ``F.batch_norm`` makes in eval
mode, adds the residual and applies ``relu_`` in place: the forward is the
original's bit for bit.  It saves BatchNorm's input (and the residual, which the
following block's convolution saves anyway) and *recomputes* ``z`` in the backward
with the same call, so its pullback equals the unfused one exactly (the eager CPU C kernel
recomputes ``z`` itself, to the rounding of one multiply-add: see :func:`_cpu_input_gradients`).  Parameter
gradients are BatchNorm's eval-mode ones: on a GPU from the same ``native_batch_norm_backward`` vanilla
runs, elsewhere from the plain formula (:func:`_batch_norm_eval_backward`).

On the CPU, a pullback's backward (no BatchNorm parameter gradient wanted) allocates one tensor
where vanilla allocates two (:func:`_cpu_input_gradients`).

Only eval-mode BatchNorm with running statistics fuses (a training-mode BatchNorm
normalises by batch statistics and updates its buffers); :func:`batch_norm_relu`
checks that, and for hooks on the module, at every call and otherwise runs the
unfused ``bn(x) [+ residual] -> surrogate_relu``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from . import native
from .ops import relu_gate_backward, relu_gate_backward_, surrogate_relu
from .reference import flush_subnormal
from .dispatch import backward_runtime, dynamo_compiling, forward_runtime, functional_backward
from .registry import define_surrogate_op
from .torch_paths import flush_subnormal_

__all__ = ["batch_norm_relu", "batch_norm_relu_pre_activation", "FUSABLE_BATCH_NORMS", "fusable"]

#: Exactly these classes fuse (a subclass may override ``forward``; SyncBatchNorm reduces across processes).
FUSABLE_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batch_norm_eval(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float
) -> Tensor:
    # The very call F.batch_norm makes in eval mode (momentum is unused there).
    return torch.batch_norm(x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled)


def _forward(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    residual: Optional[Tensor],
    temp: float,
    gate: str,
) -> Tensor:
    """Forward: exactly ``relu(batch_norm(x) [+ residual])``.  Backward: the excitation gate at ``z``."""
    z = batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        z = z.add_(residual)  # z is our own fresh tensor; ``a + b`` and ``a.add_(b)`` round alike
    return z.relu_()


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, running_mean, running_var, eps, residual, temp, gate = inputs
    ctx.save_for_backward(x, weight, bias, running_mean, running_var, residual)
    ctx.eps, ctx.temp, ctx.gate = eps, temp, gate


def _input_gradient_scale(x: Tensor, weight: Optional[Tensor], running_var: Tensor, eps: float) -> Tensor:
    """``weight * invstd`` per channel, shaped to broadcast against ``x``: eval-mode BatchNorm's ``dx / dz``."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    return scale.reshape([1, -1] + [1] * (x.dim() - 2))


def _batch_norm_eval_backward(dz, x, weight, running_mean, running_var, eps, mask):
    """Eval-mode BatchNorm's gradients w.r.t. ``(x, weight, bias)`` in plain torch ops (vmappable)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    dx = dweight = dbias = None
    if mask[0]:
        dx = flush_subnormal((dz * _input_gradient_scale(x, weight, running_var, eps)).to(x.dtype))
    reduce_dims = [0] + list(range(2, x.dim()))
    if mask[1]:
        x_hat = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var + eps).reshape(shape)
        dweight = (dz * x_hat).sum(reduce_dims).to(weight.dtype)
    if mask[2]:
        dbias = dz.sum(reduce_dims).to(dz.dtype if weight is None else weight.dtype)
    return dx, dweight, dbias


def _recomputed_gate(grad, x, weight, bias, running_mean, running_var, residual, eps, temp, gate, functional):
    """``grad * gate(z / temp)`` with ``z = batch_norm(x) [+ residual]`` recomputed, bit-equal to the forward's."""
    z = batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        # In-place only in a plain first-order backward (create_graph / torch.func track z).
        z = z + residual if functional else z.add_(residual)
    return relu_gate_backward(grad, z, temp, gate)


def _gradient_mask(weight: Optional[Tensor], bias: Optional[Tensor], needs) -> list:
    # dx always: x needs it whenever the fused op is in a gradient's path at all.
    return [True, weight is not None and bool(needs[1]), bias is not None and bool(needs[2])]


def _formula_backward(grad: Tensor, saved, needs, eps: float, temp: float, gate: str):
    """The backward in plain, differentiable, vmappable torch ops (twin, custom op, ``create_graph``)."""
    x, weight, bias, running_mean, running_var, residual = saved
    dz = _recomputed_gate(grad, x, weight, bias, running_mean, running_var, residual, eps, temp, gate, functional_backward())
    mask = _gradient_mask(weight, bias, needs)
    dx, dweight, dbias = _batch_norm_eval_backward(dz, x, weight, running_mean, running_var, eps, mask)
    dresidual = dz.to(residual.dtype) if residual is not None and needs[6] else None
    return dx, dweight, dbias, None, None, None, dresidual, None, None


def _backward(ctx, grad: Tensor):
    return _formula_backward(grad, ctx.saved_tensors, ctx.needs_input_grad, ctx.eps, ctx.temp, ctx.gate)


_call_surrogate_batch_norm_relu = define_surrogate_op(
    "surrogate_batch_norm_relu", _forward, setup_context=_setup_context, backward=_backward
)


def _native_ready(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                  bias: Optional[Tensor], residual: Optional[Tensor], gate: str) -> bool:
    """What the C backward needs of a site's saved tensors (``grad`` is checked when it comes).

    Called in plain eager on the CPU only (:func:`batch_norm_relu` has ruled out every tracer,
    dispatch mode and ``torch.func`` transform), so of the dispatch's checks only the tensors' own
    remain: one pass of cheap tests, since at batch 1 each Python check is host
    time that a chain of the general checks would repeat (measured in docs/design-measurements.md).
    """
    if gate not in native.RELU_GATES or type(x) is not torch.Tensor or x.dim() < 2 or not native.available():
        return False
    if residual is None:
        return native.supports(x, running_mean, running_var, weight, bias, optional=True)
    return native.supports(x, running_mean, running_var, weight, bias, residual, optional=True)


def _cpu_input_gradients(grad: Tensor, saved, needs, eps: float, temp: float, gate: str, ready: bool):
    """The eager CPU backward when no BatchNorm parameter needs a gradient (a pullback): one fresh tensor, not three.

    Fresh CPU tensors are expensive: a large one comes straight from ``mmap`` and pays a
    page fault per 4 KiB on first write, several times a write into existing pages
    (measured in docs/design-measurements.md).  The C kernel reads BatchNorm's input and
    writes the input gradient alone, recomputing ``z`` on the way (one pass, and no ``torch.batch_norm``
    call's host time at batch 1).  Elsewhere (another dtype or layout) ``z`` is recomputed
    by ``torch.batch_norm`` and the gate and eval-mode BatchNorm's input gradient, ``dz * weight *
    invstd`` per channel, are applied to it in place: the generic path allocates ``z``, ``dz`` and ``dx``.
    """
    x, weight, bias, running_mean, running_var, residual = saved
    wants_residual = residual is not None and needs[6]
    # ``ready`` (:func:`_native_ready`) was decided in the forward: only a dispatch mode entered
    # since could make a C call unseen.  Then grad, as cheaply as it can be asked (at batch 1 these
    # checks are a site's host time): a plain float32 tensor of x's shape with contiguous planes.
    if (ready and backward_runtime(grad) == "eager"
            and grad.dtype == torch.float32 and grad.shape == x.shape and native.planes_contiguous(grad)):
        dx, dresidual = native.batch_norm_relu_gate_backward_unchecked(
            grad, x, running_mean, running_var, weight, bias, eps, temp, residual, wants_residual, gate)
        return dx, None, None, None, None, None, dresidual, None, None
    dz = batch_norm_eval(x, weight, bias, running_mean, running_var, eps)
    if residual is not None:
        dz.add_(residual)
    scale = _input_gradient_scale(x, weight, running_var, eps)
    if wants_residual:  # the residual's gradient is dz itself: dx needs a tensor of its own
        relu_gate_backward_(grad, dz, temp, gate)
        return flush_subnormal_(torch.mul(dz, scale)), None, None, None, None, None, dz, None, None
    relu_gate_backward_(grad, dz, temp, gate)
    return flush_subnormal_(dz.mul_(scale)), None, None, None, None, None, None, None, None


def _gradients_wanted(ctx, weight: Optional[Tensor], bias: Optional[Tensor], residual: Optional[Tensor]) -> tuple:
    """``ctx.needs_input_grad`` without the parameter / residual gradients this backward pass will not use.

    ``needs_input_grad`` is fixed in the forward (``requires_grad``), so for a model whose
    parameters require grad a pullback (``torch.autograd.grad(score, x)``) would compute and
    throw away BatchNorm's weight and bias gradients at every site: two reductions vanilla's
    own BatchNorm backward skips, because the engine tells it which outputs it needs.  The
    engine's answer for our inputs is ``_will_engine_execute_node`` on the nodes they lead
    to (a private torch API: without it, ``needs_input_grad`` stands); it refuses to answer
    (RuntimeError) for a leaf that ``autograd.grad`` asks for, which is then wanted.  Only
    inputs that require grad are asked about, so a frozen model pays nothing.
    """
    needs = ctx.needs_input_grad
    if not ((needs[1] and weight is not None) or (needs[2] and bias is not None) or (needs[6] and residual is not None)):
        return needs  # a frozen model's pullback: nothing to ask (even next_functions is host time per site)
    needs = list(needs)
    will_execute = getattr(torch._C, "_will_engine_execute_node", None)
    if will_execute is None:
        return tuple(needs)
    # One edge per tensor input, in order: x, [weight], [bias], running_mean, running_var, [residual].
    edges = ctx.next_functions
    positions = {1: 1, 2: 1 + (weight is not None), 6: len(edges) - 1}
    for index, tensor in ((1, weight), (2, bias), (6, residual)):
        if needs[index] and tensor is not None:
            node = edges[positions[index]][0]
            if node is not None:
                try:
                    needs[index] = will_execute(node)
                except RuntimeError:
                    pass
    return tuple(needs)


class _EagerBatchNormReLU(torch.autograd.Function):
    """The fused op in plain eager on a GPU, where host time matters most (at moderate batch sizes).

    It runs BatchNorm through ``_batch_norm_impl_index``, the entry point ``torch.batch_norm``
    uses (same kernel, same bits), and keeps what that returns for the backward, so the
    backward is vanilla's own BatchNorm backward kernel (cuDNN's on CUDA) after the gate: three
    kernels, against six for the plain-torch formula, and less host time per site than the unfused
    chain or the formula (measured in docs/design-measurements.md).  A backward with
    ``create_graph`` takes the plain formula, which is differentiable.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, residual, temp, gate):
        z, save_mean, save_invstd, reserve, impl = torch.ops.aten._batch_norm_impl_index(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, torch.backends.cudnn.enabled
        )
        if residual is not None:
            z = z.add_(residual)
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, residual, save_mean, save_invstd, reserve)
        ctx.eps, ctx.temp, ctx.gate, ctx.impl = eps, temp, gate, impl
        return z.relu_()

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        x, weight, bias, running_mean, running_var, residual, save_mean, save_invstd, reserve = saved
        needs = _gradients_wanted(ctx, weight, bias, residual)
        if torch.is_grad_enabled():  # create_graph: the differentiable formula
            return _formula_backward(grad, saved[:6], needs, ctx.eps, ctx.temp, ctx.gate)
        mask = _gradient_mask(weight, bias, needs)
        dz = _recomputed_gate(
            grad, x, weight, bias, running_mean, running_var, residual, ctx.eps, ctx.temp, ctx.gate, functional=False
        )
        dx, dweight, dbias = torch.ops.aten._batch_norm_impl_index_backward(
            ctx.impl, x, dz, weight, running_mean, running_var, save_mean, save_invstd, False, ctx.eps, mask, reserve,
        )
        dx = flush_subnormal_(dx)  # vanilla's kernel, fed our tiny-but-normal gated values, may underflow
        dresidual = dz if residual is not None and needs[6] else None
        return dx, dweight, dbias, None, None, None, dresidual, None, None


class _EagerCpuBatchNormReLU(torch.autograd.Function):
    """The fused op in plain eager on the CPU: :class:`_EagerBatchNormReLU` without what only its GPU backward uses.

    BatchNorm runs through ``torch.batch_norm`` (the same kernel, the same bits) and only its six
    inputs are kept; a pullback's backward is one C pass (:func:`_cpu_input_gradients`), and a
    backward that wants BatchNorm's parameter gradients, or a graph (``create_graph``), takes the
    plain formula.  At batch 1 host time is the cost, and ``_batch_norm_impl_index``'s five results,
    nine saved tensors and a ``torch.batch_norm`` call in the backward cost more of it than this
    (measured in docs/design-measurements.md).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, residual, temp, gate):
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, residual)
        ctx.eps, ctx.temp, ctx.gate = eps, temp, gate
        # Decided here, once: at batch 1 the backward's checks were a fifth of a site's host time.
        ctx.ready = _native_ready(x, running_mean, running_var, weight, bias, residual, gate)
        return _forward(x, weight, bias, running_mean, running_var, eps, residual, temp, gate)  # the op's own forward

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        needs = _gradients_wanted(ctx, saved[1], saved[2], saved[5])
        mask = _gradient_mask(saved[1], saved[2], needs)
        if torch.is_grad_enabled() or mask[1] or mask[2]:  # create_graph, or parameter gradients: the formula
            return _formula_backward(grad, saved, needs, ctx.eps, ctx.temp, ctx.gate)
        return _cpu_input_gradients(grad, saved, needs, ctx.eps, ctx.temp, ctx.gate, ctx.ready)


def fusable(bn: nn.Module, x: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether this call may run fused: eval-mode statistics, no hooks, a residual of BatchNorm's output shape."""
    buffers = bn._buffers  # the exact BatchNorm classes keep them here: a dict lookup, not nn.Module.__getattr__
    return (
        not bn.training
        and buffers.get("running_mean") is not None
        and buffers.get("running_var") is not None
        and not (bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks or bn._backward_pre_hooks)
        and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype))
    )


def batch_norm_relu_pre_activation(x: Tensor, bn: nn.Module, residual: Optional[Tensor] = None) -> Tensor:
    """The ReLU's input at a fused site, ``bn(x) [+ residual]``, computed the unfused way."""
    z = bn(x)
    return z if residual is None else z + residual


def batch_norm_relu(
    x: Tensor,
    bn: nn.Module,
    residual: Optional[Tensor] = None,
    temp: float = 0.3,
    gate: str = "sigmoid",
    saved: str = "exact",
) -> Tensor:
    """``surrogate_relu(bn(x) [+ residual])`` with the same forward and pullback, saving only BatchNorm's input.

    What an excited graph calls at a fused site (``excite(..., fuse=True)``).  Runs
    the fused op when :func:`fusable` says so, else the unfused chain (training mode,
    hooks on ``bn``, a broadcasting residual), where ``saved`` applies.
    """
    # Under torch.compile (not export) the chain runs unfused: Inductor chooses what to save and
    # recompute by itself (it keeps z or x, the same bytes), so fusing buys nothing there.
    if fusable(bn, x, residual) and not dynamo_compiling():
        bn._check_input_dim(x)  # the error BatchNorm itself would raise
        # Straight from the module's dicts (FUSABLE_BATCH_NORMS are exact classes, which keep every
        # parameter and buffer there, None included): at batch 1 nn.Module.__getattr__'s search is host time.
        parameters, buffers = bn._parameters, bn._buffers
        args = (x, parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                float(bn.eps), residual, temp, gate)
        if forward_runtime(x) == "eager":
            return (_EagerCpuBatchNormReLU if x.is_cpu else _EagerBatchNormReLU).apply(*args)
        return _call_surrogate_batch_norm_relu(*args)
    return surrogate_relu(batch_norm_relu_pre_activation(x, bn, residual), temp, gate, saved)
