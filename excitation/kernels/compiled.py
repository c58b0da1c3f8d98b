"""What ``torch.compile`` runs at ReLU sites: recompute regions, and on the CPU the C kernels as the backward.

An excited graph is traced by dynamo through its *compile view*
(:mod:`excitation.fxpass.compile_view`), whose ReLU sites call the functions here instead
of :func:`~.ops.surrogate_relu` / :func:`~.fused.batch_norm_relu`; the ``"excitation"``
backend puts :func:`relu_with_c_backward` and :func:`batch_norm_relu_with_c_backward` into the
graphs dynamo hands it; both are placed by one lowering (:mod:`excitation.fxpass.lowering`).  Outside dynamo each
one is exactly the function it stands for.  Under dynamo they differ in two ways, neither of
which changes a value:

**The C kernels run the backward on the CPU.**  Inductor writes the backward's elementwise
loops itself, and for the excitation gate it writes a Sleef exponential and a division per
element: a compute-bound loop, slower than our C kernel, which keeps pace with vanilla's
threshold loop (``benchmarks/site_backward.py``; measured in docs/design-measurements.md).
So on float32 CPU tensors the forward stays torch ops (Inductor fuses BatchNorm and
``relu`` into the convolution's epilogue, as in vanilla) and the backward is one extern call
per site: ``excitation::batch_norm_relu_backward_cpu`` (BatchNorm's input in, BatchNorm's input
gradient out, ``z`` recomputed in the kernel) or ``excitation::relu_gate_backward_cpu``.  Both
take whatever layout Inductor chose (``flexible_layout``): it lays activations out
channels-last around convolutions, and a copy into NCHW and back would cost more than the
kernel saves.  The extern kernels matter most on models with many such sites (densenet121:
docs/performance; docs/design-measurements.md).

**Recompute regions.**  Each exact ReLU runs in a non-reentrant checkpoint region, so the
partitioner keeps ``z`` (or BatchNorm's input) and recomputes ``relu(z)`` where a backward reads
it (:func:`~.ops.surrogate_relu` says why), and ReLUs that feed one ``torch.cat`` share one region
(:func:`compiled_relu_concat`), so the concatenation is recomputed too instead of being kept
beside its parts.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import native
from .fused import batch_norm_eval, batch_norm_relu, batch_norm_relu_pre_activation, fusable
from .ops import call_surrogate_relu, surrogate_relu
from .dispatch import compiled_relu_backward_path, device_type, recompute_in_backward
from .registry import NAMESPACE

__all__ = ["compiled_relu", "compiled_batch_norm_relu", "compiled_relu_concat", "relu_with_c_backward",
           "batch_norm_relu_with_c_backward", "c_backward_applies"]


@torch.compiler.assume_constant_result
def _c_kernels_built() -> bool:
    # Asked while dynamo traces: evaluated once, outside the trace, and folded in as a constant.
    return native.available()


def _cpu_backward(t: Tensor, gate: str) -> bool:
    """The C kernels run this site's backward (:func:`.dispatch.compiled_relu_backward_path`)."""
    c_built = gate in native.RELU_GATES and _c_kernels_built()
    return compiled_relu_backward_path(device_type(t), t.dtype, gate, c_built) == "extern"


def _dense(t: Tensor) -> bool:
    """``t`` fills one block of memory without overlap (contiguous in its own dimension order)."""
    if t.is_contiguous():
        return True
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )


def _in_layout_of(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` with the strides of ``ref`` (a dense tensor of its shape): one copy, none if they match.

    Inductor may hand a site's gradient in another layout than its input: before a max-pool the
    input is the convolution's channels-last output and the gradient the soft-pool backward's
    NCHW one.  Copying the gradient alone into the input's layout is one transposing pass; the
    general path (both to NCHW, the result back) is three passes over activation-sized tensors
    (vgg11_bn's four such sites: measured in docs/design-measurements.md).
    """
    return t if t.stride() == ref.stride() else torch.empty_like(ref, dtype=t.dtype).copy_(t)


# ------------------------------------------------------------------ extern backward ops
@torch.library.custom_op(f"{NAMESPACE}::relu_gate_backward_cpu", mutates_args=(),
                         tags=(torch._C.Tag.flexible_layout,))
def _relu_gate_backward_cpu(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)`` (floored, flushed) by the C kernel, in any layout; the result has ``z``'s strides."""
    if _dense(z):
        return native.relu_gate_backward(_in_layout_of(grad, z), z, temp, gate)  # elementwise over one block
    out = torch.empty_like(z)
    return out.copy_(native.relu_gate_backward(grad.contiguous(), z.contiguous(), temp, gate))


@_relu_gate_backward_cpu.register_fake
def _(grad, z, temp, gate):
    return torch.empty_like(z)


@torch.library.custom_op(f"{NAMESPACE}::batch_norm_relu_backward_cpu", mutates_args=(),
                         tags=(torch._C.Tag.flexible_layout,))
def _batch_norm_relu_backward_cpu(grad: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor,
                                  weight: Optional[Tensor], bias: Optional[Tensor], eps: float, temp: float,
                                  gate: str) -> Tensor:
    """BatchNorm's input gradient at a BatchNorm -> ReLU site (eval mode), by the C kernel, in ``x``'s layout.

    NCHW and channels-last inputs go to their kernel, the gradient copied into the input's layout if
    the kernel cannot read it as it is; anything else through contiguous copies.
    """
    per_channel = [t if t is None else t.contiguous() for t in (running_mean, running_var, weight, bias)]
    if x.is_contiguous():
        grad = grad if native.planes_contiguous(grad) else _in_layout_of(grad, x)
        return native.batch_norm_relu_gate_backward_unchecked(grad, x, *per_channel, eps, temp, gate=gate)[0]
    if native.channels_last_rows(x) == x.shape[1]:
        grad = grad if native.channels_last_rows(grad) is not None else _in_layout_of(grad, x)
        return native.batch_norm_relu_gate_backward_channels_last(grad, x, *per_channel, eps, temp, gate=gate)[0]
    dx = native.batch_norm_relu_gate_backward_unchecked(grad.contiguous(), x.contiguous(), *per_channel, eps, temp,
                                                        gate=gate)[0]
    return torch.empty_like(x).copy_(dx)


@_batch_norm_relu_backward_cpu.register_fake
def _(grad, x, running_mean, running_var, weight, bias, eps, temp, gate):
    return torch.empty_like(x)


class _CpuReLU(torch.autograd.Function):
    """``relu(z)``, whose backward is one call of ``excitation::relu_gate_backward_cpu``."""

    @staticmethod
    def forward(z: Tensor, temp: float, gate: str) -> Tensor:
        return torch.relu(z)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        z, temp, gate = inputs
        ctx.save_for_backward(z)
        ctx.temp, ctx.gate = temp, gate

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return torch.ops.excitation.relu_gate_backward_cpu(grad, z, ctx.temp, ctx.gate), None, None


class _CpuBatchNormReLU(torch.autograd.Function):
    """``relu(batch_norm(x))`` in eval mode, whose backward is one call of ``excitation::batch_norm_relu_backward_cpu``.

    Only for BatchNorms whose parameters need no gradient: the kernel returns ``x``'s alone.
    """

    @staticmethod
    def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                running_var: Tensor, eps: float, temp: float, gate: str) -> Tensor:
        return torch.relu(batch_norm_eval(x, weight, bias, running_mean, running_var, eps))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, running_mean, running_var, eps, temp, gate = inputs
        ctx.save_for_backward(x, weight, bias, running_mean, running_var)
        ctx.eps, ctx.temp, ctx.gate = eps, temp, gate

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, bias, running_mean, running_var = ctx.saved_tensors
        dx = torch.ops.excitation.batch_norm_relu_backward_cpu(grad, x, running_mean, running_var, weight, bias,
                                                               ctx.eps, ctx.temp, ctx.gate)
        return dx, None, None, None, None, None, None, None


# ------------------------------------------------------------------ what the "excitation" backend calls
def c_backward_applies(example: object, gate: str) -> bool:
    """Whether a graph site whose ReLU input looks like ``example`` (a tensor or fake tensor) gets the C backward.

    Asked by the ``"excitation"`` backend at compile time, outside any trace: float32, on the
    CPU, a gate the C kernels implement, and the kernels built on this machine.
    """
    return isinstance(example, Tensor) and _cpu_backward(example, gate)


def relu_with_c_backward(z: Tensor, temp: float = 0.3, gate: str = "sigmoid") -> Tensor:
    """``relu(z)`` whose backward is one extern call of ``excitation::relu_gate_backward_cpu``.

    What the ``"excitation"`` backend puts at an exact ReLU site of a float32 CPU graph
    (:func:`c_backward_applies` decided it at compile time): AOTAutograd traces the autograd
    Function's backward into the joint graph, so Inductor calls the C kernel where it would
    otherwise write the gate's loop (the module docstring says why).  The backend tags the node
    for recompute itself, so no checkpoint region is needed here.
    """
    return _CpuReLU.apply(z, temp, gate)


def batch_norm_relu_with_c_backward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Tensor,
                                    running_var: Tensor, eps: float, temp: float = 0.3,
                                    gate: str = "sigmoid") -> Tensor:
    """``relu(batch_norm(x))`` in eval mode, whose backward is one extern call of ``excitation::batch_norm_relu_backward_cpu``.

    What the ``"excitation"`` backend puts where a frozen eval-mode ``F.batch_norm`` feeds an
    exact ReLU site alone (see :func:`relu_with_c_backward`): one C pass for the gate and
    BatchNorm's input gradient, where the unfused site needs the gate's pass and BatchNorm's.
    """
    return _CpuBatchNormReLU.apply(x, weight, bias, running_mean, running_var, eps, temp, gate)


# ------------------------------------------------------------------ what the compile view calls
def _relu_in_region(z: Tensor, temp: float, gate: str) -> Tensor:
    """An exact surrogate ReLU inside a recompute region: the C backward where it runs, else the op's twin."""
    if _cpu_backward(z, gate):
        return _CpuReLU.apply(z, temp, gate)
    return call_surrogate_relu(z, temp, gate, "exact")


def compiled_relu(z: Tensor, temp: float = 0.3, gate: str = "sigmoid", saved: str = "exact") -> Tensor:
    """:func:`~excitation.kernels.surrogate_relu` as compiled graphs run it (see the module docstring)."""
    if saved == "exact" and recompute_in_backward(z):
        # temp and gate are bound as constants (surrogate_relu says why).
        return checkpoint(lambda kept: _relu_in_region(kept, temp, gate), z, use_reentrant=False)
    return surrogate_relu(z, temp, gate, saved)


def _frozen(bn: nn.Module) -> bool:
    return not any(p is not None and p.requires_grad for p in (bn._parameters.get("weight"), bn._parameters.get("bias")))


def compiled_batch_norm_relu(x: Tensor, bn: nn.Module, residual: Optional[Tensor] = None, temp: float = 0.3,
                             gate: str = "sigmoid", saved: str = "exact") -> Tensor:
    """:func:`~excitation.kernels.batch_norm_relu` as compiled graphs run it (see the module docstring).

    A site with a residual sum runs as ``compiled_relu(bn(x) + residual)``: the region then keeps
    ``z`` alone, where one around BatchNorm would keep both of its inputs.
    """
    if saved != "exact" or not recompute_in_backward(x):
        return batch_norm_relu(x, bn, residual, temp, gate, saved)
    if residual is None and fusable(bn, x, None) and _frozen(bn) and _cpu_backward(x, gate):
        parameters, buffers = bn._parameters, bn._buffers
        args = (parameters["weight"], parameters["bias"], buffers["running_mean"], buffers["running_var"],
                float(bn.eps), temp, gate)
        return checkpoint(lambda kept: _CpuBatchNormReLU.apply(kept, *args), x, use_reentrant=False)
    return compiled_relu(batch_norm_relu_pre_activation(x, bn, residual), temp, gate, saved)


def compiled_relu_concat(zs: List[Tensor], dim: int, temps: Sequence[float], gates: Sequence[str]) -> Tensor:
    """``torch.cat([surrogate_relu(z, temp, gate) ...], dim)`` whose ReLUs and concatenation share one recompute region.

    Why: a concatenation of ReLU outputs (GoogLeNet's inception blocks) is read by the backward
    of what follows (a convolution, a soft max-pool), so the compiled graph kept it beside every
    part's ``z``; with one region per ReLU the partitioner must also keep the parts at the
    region boundaries.  One region for the lot keeps the ``z`` parts alone (compiled googlenet's
    saved bytes: measured in docs/design-measurements.md).
    """
    if zs and all(recompute_in_backward(z) for z in zs):
        def region(*kept: Tensor) -> Tensor:
            return torch.cat([_relu_in_region(z, t, g) for z, t, g in zip(kept, temps, gates)], dim)

        return checkpoint(region, *zs, use_reentrant=False)
    return torch.cat([surrogate_relu(z, t, g) for z, t, g in zip(zs, temps, gates)], dim)
