"""The ReLU and 2-D max-pool surrogate ops, the functions the rewritten graphs call, and which kernel runs.

Each op is registered by :func:`.registry.define_surrogate_op` in three mechanisms
(custom op for export / TorchScript / tracers, a ``setup_context`` twin for
``torch.func`` and ``torch.compile``, a classic Function for plain eager; the
registry's docstring says why, with measurements), all sharing one forward, one
``setup_context`` and one backward.  The backward's math is the contract of
:mod:`.reference`; :mod:`.dispatch` names the implementation per call and
:func:`relu_gate_backward` / :func:`pool2d_backward` run it:

* CUDA with Triton: the Triton kernels (:mod:`.triton`);
* plain float32 CPU tensors outside any tracer: the C kernels (:mod:`.native`), when they built;
* everywhere else (tracers, ``torch.func``, ``create_graph``, other dtypes, no compiler): the
  torch-op paths of :mod:`.torch_paths`.

Why one module: the two ops share their kernels' runners and the eager CPU fast paths, and each
op's forward, ``setup_context`` and backward must be read beside them.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import native
from .reference import flush_subnormal, max_pool2d_output_size
from .dispatch import (
    backward_runtime,
    device_type,
    forward_runtime,
    functional_backward,
    pool2d_backward_path,
    pool_forward_path,
    RAW_CALL_RUNTIMES,
    recompute_in_backward,
    relu_backward_path,
    triton_available,
)
from .registry import NAMESPACE, define_surrogate_op
from .torch_paths import (
    compact_gate,
    relu_backward,
    relu_backward_,
    soft_max_pool2d_backward_chunked,
    soft_max_pool2d_backward_functional,
)

__all__ = [
    "surrogate_relu", "surrogate_max_pool2d", "NAMESPACE", "relu_gate_backward", "relu_gate_backward_",
    "run_relu_backward", "native_activation_backward", "pool2d_backward",
]


IntOrPair = Union[int, Sequence[int]]

def relu_gate_backward(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)``, gate floored and result flushed (:func:`.reference.relu_backward`), on the
    implementation :func:`.dispatch.relu_backward_path` names for this call."""
    runtime = backward_runtime(grad, z)
    path = relu_backward_path(
        runtime, device_type(z), gate,
        runtime in RAW_CALL_RUNTIMES and gate in native.RELU_GATES and grad.shape == z.shape
        and native.supports(grad, z) and native.available(),
        triton=z.is_cuda and triton_available(), grad_mode=torch.is_grad_enabled(),
    )
    return run_relu_backward(path, grad, z, temp, gate)


def run_relu_backward(path: str, grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """The ReLU gate's backward on the implementation ``path`` (:func:`.dispatch.relu_backward_path`)."""
    if path == "c":
        return native.relu_gate_backward(grad, z, temp, gate)
    if path == "triton":
        from .triton import launch_surrogate_relu_backward

        return launch_surrogate_relu_backward(grad, z, temp, gate)
    if path == "triton_op":
        return torch.ops.excitation.surrogate_relu_backward_triton(grad, z, temp, gate)
    return relu_backward(grad, z, temp, gate, functional=path == "torch_functional")


def native_activation_backward(grad: Tensor, z: Tensor, kind: str, temp: float, params: Sequence[float]) -> Tensor:
    """A ReLU relative's C backward (:data:`.dispatch.NATIVE_ACTIVATION_KINDS`): the soft windows of Hardtanh /
    ReLU6 and Hardsigmoid, Hardswish's gate."""
    if kind == "hardtanh":
        return native.hardtanh_sigmoid_backward(grad, z, temp, params[0], params[1])
    if kind == "hardsigmoid":  # relu6(z + 3) / 6: the window [-3, 3] of z, scaled
        return native.hardtanh_sigmoid_backward(grad, z, temp, -3.0, 3.0, 1.0 / 6.0)
    return native.hardswish_backward(grad, z, temp)


def relu_gate_backward_(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """:func:`relu_gate_backward` written into ``z`` (a tensor the caller owns and no longer needs); returns ``z``."""
    runtime = backward_runtime(grad, z)
    path = relu_backward_path(
        runtime, "cpu", gate,
        runtime in RAW_CALL_RUNTIMES and gate in native.RELU_GATES and grad.shape == z.shape
        and native.supports(grad, z) and native.available(),
        in_place=True,
    )
    if path == "c":
        return native.relu_gate_backward(grad, z, temp, gate, out=z)
    return relu_backward_(grad, z, temp, gate)


def pool2d_backward(
    grad: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], ceil_mode: bool, temp: float, pool_backward: str = "soft", functional: bool = False,
    path: Optional[str] = None,
) -> Tensor:
    """The 2-D soft-pool backward (:func:`.reference.soft_max_pool2d_backward`) on the implementation
    :func:`.dispatch.pool2d_backward_path` names (or ``path``, when the caller asked already).

    ``functional=True`` avoids in-place writes that involve ``grad`` (needed under
    ``torch.func`` transforms, where ``grad`` may be batched and ``x`` not, and for double backward).
    """
    pool_args = (list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode, temp, pool_backward)
    if path is None:
        runtime = backward_runtime(grad, x)
        path = pool2d_backward_path(
            runtime, device_type(x),
            runtime in RAW_CALL_RUNTIMES and native.pool_window_supported(kernel_size) and native.supports(x)
            and native.available(),
            triton=x.is_cuda and triton_available(), functional=functional,
        )
    if path == "torch_functional":
        return soft_max_pool2d_backward_functional(grad, x, *pool_args)
    if path == "triton":  # one fused kernel instead of ~9 passes per window offset
        from .triton import launch_soft_max_pool2d_backward

        return launch_soft_max_pool2d_backward(grad, x, *pool_args)
    if path == "triton_op":
        return torch.ops.excitation.soft_max_pool2d_backward_triton(grad, x, *pool_args)  # tracers see the kernel
    if path == "c":
        grad = grad.contiguous()  # the C kernel reads it densely (a copy only for unusual layouts)
        out_hw = [max_pool2d_output_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
                  for i in range(2)]
        return native.soft_max_pool2d_backward(grad, x, kernel_size, stride, padding, dilation, out_hw, temp,
                                               pool_backward)
    if path == "extern":
        return torch.ops.excitation.soft_max_pool2d_backward(grad, x, *pool_args)
    return soft_max_pool2d_backward_chunked(grad, x, *pool_args)


# --------------------------------------------------------------------------- ReLU
def _relu_forward(z: Tensor, temp: float, gate: str, saved: str = "exact") -> Tensor:
    """Forward: exactly ``torch.relu(z)``.  Backward: ``grad * gate(z / temp)``."""
    return torch.relu(z)


def _relu_setup_context(ctx, inputs, output) -> None:
    z, temp, gate, saved = inputs
    ctx.save_for_backward(z if saved == "exact" else compact_gate(z, temp, gate, saved))
    ctx.temp, ctx.gate, ctx.saved = temp, gate, saved


def _relu_backward(ctx, grad: Tensor):
    (kept,) = ctx.saved_tensors
    if ctx.saved == "exact":
        return relu_gate_backward(grad, kept, ctx.temp, ctx.gate), None, None, None
    dz = grad * kept  # promotes the compact gate to grad's dtype
    if ctx.saved == "uint8":
        dz = dz * (1.0 / 255.0)
    return flush_subnormal(dz.to(grad.dtype)), None, None, None


call_surrogate_relu = define_surrogate_op(
    "surrogate_relu", _relu_forward, setup_context=_relu_setup_context, backward=_relu_backward
)


class _EagerCpuSigmoidReLU(torch.autograd.Function):
    """The default ReLU site (sigmoid gate, exact) in plain eager on float32 CPU tensors: the C gate, little Python.

    Why a Function of its own: at batch 1 a site's cost is host time, and the generic
    mechanism (``call`` -> classic Function of four arguments -> ``relu_gate_backward``'s path
    checks -> the kernel wrapper) repeats its checks at every layer.  This one checks once in the
    forward what the C kernel needs of ``z`` and only ``grad`` in the backward (measured in
    docs/design-measurements.md).  Results are those of :func:`relu_gate_backward` bit for bit
    (the same kernel); anything it cannot take (a
    ``create_graph`` backward, a dispatch mode entered for the backward, an odd ``grad``) goes
    there.
    """

    @staticmethod
    def forward(ctx, z: Tensor, temp: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.temp = temp
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        if (
            grad.dtype is torch.float32
            and grad.is_contiguous()
            and grad.shape == z.shape
            and backward_runtime(grad) == "eager"
        ):
            return native.relu_sigmoid_backward(grad, z, ctx.temp), None
        return relu_gate_backward(grad, z, ctx.temp, "sigmoid"), None


def _eager_cpu_sigmoid_site(z: Tensor) -> bool:
    """``z`` may take :class:`_EagerCpuSigmoidReLU`: a plain contiguous float32 CPU tensor, plain eager, C kernels built."""
    return (
        type(z) is Tensor
        and z.dtype is torch.float32
        and z.is_cpu
        and z.is_contiguous()
        and forward_runtime(z) == "eager"
        and native.available()
    )


# ---------------------------------------------------------------------- max-pool
_MAX_POOL = {
    1: torch.ops.aten.max_pool1d_with_indices,
    2: torch.ops.aten.max_pool2d_with_indices,
    3: torch.ops.aten.max_pool3d_with_indices,
}


def pool_forward(
    x: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str,
) -> Tuple[Tensor, Tensor]:
    """Forward of this op and of the 1-D / 3-D one (:mod:`.pooling`): exactly ``F.max_poolNd(..., return_indices=True)``
    (the ATen op's meta kernel is the fake).  Backward: soft-pool gradient (``pool_backward``: see
    :data:`excitation.presets.POOL_BACKWARDS`).

    Plain float32 CPU tensors in eager run the C kernel, bit-identical to ATen's (values and
    indices; tests/test_native.py), because ATen's NCHW max-pool is a scalar loop, a large share of
    a pool-heavy model's input gradient, vanilla's too (measured in docs/design-measurements.md).
    """
    runtime = forward_runtime(x)
    c_ready = runtime in RAW_CALL_RUNTIMES and native.pool_window_supported(kernel_size) and x.dim() in (3, 4) \
        and native.supports(x) and x.numel() > 0 and native.available()
    if pool_forward_path(runtime, c_ready) == "c":
        out_hw = [max_pool2d_output_size(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode)
                  for i in range(2)]
        if min(out_hw) > 0:
            return native.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, out_hw)
    return _MAX_POOL[len(kernel_size)](x, kernel_size, stride, padding, dilation, ceil_mode)


def pool_setup_context(ctx, inputs, output) -> None:
    x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward = inputs
    ctx.save_for_backward(x)
    ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward)
    ctx.mark_non_differentiable(output[1])


@torch.library.custom_op(f"{NAMESPACE}::soft_max_pool2d_backward", mutates_args=())
def _soft_max_pool2d_backward_op(
    grad: Tensor,
    x: Tensor,
    kernel_size: List[int],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str,
) -> Tensor:
    """The plain-torch soft-pool backward as one opaque op: what compiled CPU graphs call.

    Inductor's own code for this backward (traced from the torch ops) is many times slower on the
    CPU than the eager implementation, which works over cache-sized chunks of planes, so a
    compiled CPU graph calls the eager one as an extern kernel (measured in docs/design-measurements.md).
    """
    # A real kernel call (the tracer is above it), so the C kernel may run here too.
    return pool2d_backward(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward)


@_soft_max_pool2d_backward_op.register_fake
def _(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward):
    return x.new_empty(x.shape)  # contiguous, like the real result


@_soft_max_pool2d_backward_op.register_vmap
def _(info, in_dims, grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward):
    # Each plane is pooled on its own, so the vmapped dimension folds into the leading ones.
    def batched(tensor: Tensor, dim: Optional[int]) -> Tensor:
        if dim is None:
            return tensor.unsqueeze(0).expand(info.batch_size, *tensor.shape)
        return tensor.movedim(dim, 0)

    result = pool2d_backward(
        batched(grad, in_dims[0]), batched(x, in_dims[1]), kernel_size, stride, padding, dilation, ceil_mode, temp,
        pool_backward,
    )
    return result, 0


def _pool_backward(ctx, grad: Tensor, _grad_indices: Optional[Tensor]):
    (x,) = ctx.saved_tensors
    # A compiled CPU graph calls ours as one extern op (see _soft_max_pool2d_backward_op).
    dx = pool2d_backward(grad, x, *ctx.pool_args, functional=functional_backward())
    return dx, *NO_POOL_ARG_GRADS


# No gradient for kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward.
NO_POOL_ARG_GRADS = (None,) * 7


_call_surrogate_max_pool2d = define_surrogate_op(
    "surrogate_max_pool2d", pool_forward, setup_context=pool_setup_context, backward=_pool_backward
)


class _EagerCpuMaxPool2d(torch.autograd.Function):
    """The 2-D max-pool site in plain eager on float32 CPU tensors: both C kernels, little Python.

    Why a Function of its own (as :class:`_EagerCpuSigmoidReLU` for ReLU): at batch 1 a site's
    cost is host time.  Through the generic mechanism (``call`` -> classic Function -> the
    forward's path checks -> ``pool2d_backward``'s dispatch -> the kernel wrapper) much of a small
    pool site's time was Python around the C calls (measured in docs/design-measurements.md).
    This one checks ``x`` once in the forward
    (:func:`_eager_cpu_pool_site`) and only ``grad`` in the backward.  Results are those of the
    generic path bit for bit (the same kernels); a backward it cannot take (``create_graph``, a
    dispatch mode entered for the backward, an odd ``grad``) goes to :func:`pool2d_backward`.
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward, out_hw):
        out, indices = native.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, out_hw)
        ctx.save_for_backward(x)
        ctx.pool_args = (kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward)
        ctx.out_hw = out_hw
        ctx.mark_non_differentiable(indices)
        return out, indices

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_indices: Optional[Tensor]):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward = ctx.pool_args
        if grad.dtype is torch.float32 and grad.is_contiguous() and backward_runtime(grad) == "eager":
            dx = native.soft_max_pool2d_backward(grad, x, kernel_size, stride, padding, dilation, ctx.out_hw, temp,
                                                 pool_backward)
        else:
            dx = pool2d_backward(grad, x, *ctx.pool_args, functional=functional_backward())
        return dx, None, None, None, None, None, None, None, None


def _eager_cpu_pool_site(x: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                         dilation: List[int], ceil_mode: bool) -> Optional[List[int]]:
    """The output size if ``x`` may take :class:`_EagerCpuMaxPool2d` (a plain contiguous float32 CPU [C, H, W] or
    [N, C, H, W] tensor, a window the C kernels take, plain eager, C kernels built), else ``None``."""
    if not (type(x) is Tensor and x.dtype is torch.float32 and x.is_cpu and x.dim() in (3, 4) and x.is_contiguous()
            and x.numel() and native.pool_window_supported(kernel_size) and forward_runtime(x) == "eager"
            and native.available()):
        return None
    height, width = x.shape[-2:]
    out_hw = [max_pool2d_output_size(height, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode),
              max_pool2d_output_size(width, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)]
    return out_hw if min(out_hw) > 0 else None


# -------------------------------------------------------------------- dispatch
def surrogate_relu(z: Tensor, temp: float = 0.3, gate: str = "sigmoid", saved: str = "exact") -> Tensor:
    """ReLU whose forward is ``torch.relu(z)`` bit for bit and whose backward is ``grad * gate(z / temp)``.

    Parameters
    ----------
    z : Tensor
        Pre-activations, any shape, floating point.
    temp : float
        Gate temperature (> 0).  Small values approach the vanilla gradient.
    gate : str
        ``"sigmoid"`` (``sigmoid(z/temp)``, the derivative of ``temp*softplus(z/temp)``)
        or ``"normal_cdf"`` (``Phi(z/temp)``).
    saved : str
        What the backward keeps (see :data:`excitation.gates.SAVED_MODES`): ``"exact"`` (the
        pre-activation), ``"bfloat16"`` or ``"uint8"`` (the evaluated gate, 2 or 1 byte).

    Returns
    -------
    Tensor
        ``torch.relu(z)``, bit for bit, with the soft-gated backward attached.

    Raises
    ------
    ValueError
        A ``temp`` that is not positive (it would silently give a gate of 1, the plain ReLU gradient).
    KeyError
        An unknown ``gate``, when the backward runs.  :func:`excitation.excite` and
        :func:`excitation.pullback` validate every option before any site runs.

    Examples
    --------
    >>> import torch, excitation
    >>> z = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    >>> excitation.surrogate_relu(z, temp=0.3).sum().backward()
    >>> z.grad  # sigmoid(z / 0.3), where the vanilla gradient is [0, 0, 1]
    tensor([0.0344, 0.5000, 0.9987])
    """
    if not temp > 0:
        raise ValueError(f"surrogate_relu: temp must be > 0, got {temp}; a small positive temp approaches the "
                         f"vanilla gradient.")
    if saved == "exact" and gate == "sigmoid" and _eager_cpu_sigmoid_site(z):
        return _EagerCpuSigmoidReLU.apply(z, temp)
    if saved == "exact" and recompute_in_backward(z):
        # Compiled, keep z alone and recompute relu(z) in the backward.  Why: a convolution's
        # backward takes its input even when only the input gradient is wanted, so compiled
        # graphs keep every ReLU output that feeds one, and Inductor's partitioner will not
        # recompute relu(z) from z by itself (a value an extern kernel reads in the backward is
        # "materialized", so banned from recomputation), so compiled graphs kept z and relu(z).
        # A non-reentrant checkpoint means "recompute what is in here" under compile: z alone is
        # kept, same time, same result (measured in docs/design-measurements.md).  Not for
        # compact gates: the region would recompute the gate from z, which they exist not to keep.
        # temp, gate and saved are bound as constants, not passed through the checkpoint: under
        # torch.compile(dynamic=True), float arguments of the checkpointed region become symbolic
        # inputs, and dynamo (2.14) then fails to lift them into the traced custom backward
        # ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer").
        return checkpoint(lambda kept: call_surrogate_relu(kept, temp, gate, saved), z, use_reentrant=False)
    return call_surrogate_relu(z, temp, gate, saved)


def _tuple(value: IntOrPair, dims: int, name: str) -> List[int]:
    """An int or a 1- / ``dims``-long sequence as ``dims`` ints, as torch's pools accept them."""
    if isinstance(value, int):
        return [value] * dims
    values = [int(v) for v in value]
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise ValueError(f"max_pool{dims}d {name} must be an int or {dims} ints, got {value!r}.")
    return values


def pool_arguments(
    kernel_size: IntOrPair, stride: Optional[IntOrPair], padding: IntOrPair, dilation: IntOrPair, dims: int
) -> Tuple[List[int], List[int], List[int], List[int]]:
    """Kernel, stride, padding and dilation as ``dims`` ints each, the way torch's pools read them.

    torch treats ``stride=None`` and ``stride=[]`` as "stride = kernel_size".
    """
    kernel = _tuple(kernel_size, dims, "kernel_size")
    no_stride = stride is None or (not isinstance(stride, int) and len(stride) == 0)
    strides = kernel if no_stride else _tuple(stride, dims, "stride")
    return kernel, strides, _tuple(padding, dims, "padding"), _tuple(dilation, dims, "dilation")


def surrogate_max_pool2d(
    x: Tensor,
    kernel_size: IntOrPair,
    stride: Optional[IntOrPair] = None,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    temp: float = 0.3,
    pool_backward: str = "soft",
):
    """2-D max-pool whose forward equals ``F.max_pool2d`` bit for bit and whose backward is soft pooling's.

    The backward is the gradient of ``sum_w softmax(x_w / temp) * x_w`` over each
    window, positions outside the input excluded (``pool_backward="soft"``), or of the
    same sum with its softmax weights held constant (``"weights"``: ``g * softmax(x / temp)``).
    Arguments follow :func:`torch.nn.functional.max_pool2d`; ``temp`` is the softmax temperature.

    Parameters
    ----------
    x : Tensor
        Input [N, C, H, W] or [C, H, W], floating point.
    kernel_size, stride, padding, dilation, ceil_mode, return_indices
        As for :func:`torch.nn.functional.max_pool2d`.
    temp : float
        The soft pool's temperature (> 0).
    pool_backward : {"soft", "weights"}
        What the backward differentiates (:data:`excitation.POOL_BACKWARDS`).

    Returns
    -------
    Tensor, or (Tensor, Tensor) with ``return_indices``
        ``F.max_pool2d``'s output (and indices), bit for bit.

    Raises
    ------
    ValueError
        A ``temp`` that is not positive.
    RuntimeError
        Arguments ``F.max_pool2d`` itself rejects.  The raw op does not validate
        ``pool_backward``; :func:`excitation.excite` does.

    Examples
    --------
    >>> import torch, excitation
    >>> x = torch.tensor([[[[1.0, 2.0], [3.0, 3.1]]]], requires_grad=True)
    >>> excitation.surrogate_max_pool2d(x, 2, temp=0.3).sum().backward()
    >>> x.grad.flatten()  # vanilla sends all of it to 3.1; the soft pool's gradient spreads it
    tensor([-0.0030, -0.0363,  0.3540,  0.6853])
    """
    if not temp > 0:
        raise ValueError(f"surrogate_max_pool2d: temp must be > 0, got {temp}.")
    args = (*pool_arguments(kernel_size, stride, padding, dilation, 2), bool(ceil_mode), temp, pool_backward)
    out_hw = _eager_cpu_pool_site(x, *args[:5])
    if out_hw is not None:
        out, indices = _EagerCpuMaxPool2d.apply(x, *args, out_hw)
    else:
        out, indices = _call_surrogate_max_pool2d(x, *args)
    return (out, indices) if return_indices else out
