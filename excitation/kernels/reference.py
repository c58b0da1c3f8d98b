"""Plain-torch forward and backward of every surrogate op: the contract.

Everything here runs on any device and dtype torch supports, and every fast
path (fused CPU ops, Triton kernels) is tested against it.  The functions are
also the backward implementations used by the registered ops, so they must be
traceable by ``torch.compile``/AOTAutograd and vmappable by ``torch.func``.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import GATES
from .registry import under_functorch

__all__ = [
    "surrogate_relu_backward",
    "soft_max_pool2d_backward",
    "soft_max_pool2d_backward_torch",
    "surrogate_relu_backward_",
    "max_pool2d_output_size",
    "triton_available",
]

_TRITON: "bool | None" = None


def triton_available() -> bool:
    """True once ``excitation.kernels.triton`` imported (Triton present); checked once per process."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton as _  # noqa: F401  (registers the triton_op)

            _TRITON = True
        except Exception:  # ImportError, or a Triton that cannot initialise here
            _TRITON = False
    return _TRITON


# softplus_backward returns ``g`` unchanged where ``z * beta > threshold``.  At 20,
# sigmoid(20) = 1 - 2e-9, which rounds to 1.0 in float32 and is 2e-9 off in
# float64: far below every tolerance we promise.  It also keeps exp() finite.
# An int, not 20.0: under ``torch.compile(..., dynamic=True)`` dynamo (2.14) turns a
# module-level float into a symbolic graph input, and a symbolic float reaching an
# autograd.Function's backward fails to trace ("lift_tracked_freevar_to_input should
# not be called on root SubgraphTracer") as soon as a graph holds two surrogate ReLUs.
_SOFTPLUS_THRESHOLD = 20


def surrogate_relu_backward(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)``, the excitation backward of ``relu(z)``.

    The sigmoid gate goes through ``aten.softplus_backward`` on every device: it
    computes ``grad * sigmoid(z * beta)`` in one fused pass with no temporaries
    (about 2x faster on CPU than ``grad * torch.sigmoid(z / temp)``, three passes),
    its overflow guard makes it finite for any ``z``, and on CUDA it is as fast as a
    kernel can be (measured on an H200: 101 % of the copy bandwidth, against 96 % for
    our Triton kernel at its best block size) at a fraction of a Python launch's host
    cost, and ``torch.compile`` fuses it into its neighbours.

    The normal-CDF gate has no fused ATen form (``grad * Phi(z / temp)`` is four
    passes), so in eager CUDA it runs the fused Triton kernel
    (:mod:`excitation.kernels.triton`) when Triton imports; under ``torch.compile``
    Inductor fuses the torch expression itself.
    """
    if gate == "sigmoid":
        return torch.ops.aten.softplus_backward(grad, z, 1.0 / temp, _SOFTPLUS_THRESHOLD)
    if z.is_cuda and not torch.compiler.is_compiling() and triton_available():
        if _launch_directly(grad, z):
            from .triton import launch_surrogate_relu_backward

            return launch_surrogate_relu_backward(grad, z, temp, gate)
        return torch.ops.excitation.surrogate_relu_backward_triton(grad, z, temp, gate)
    return grad * GATES[gate](z, temp)


def surrogate_relu_backward_(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """:func:`surrogate_relu_backward` written into ``z`` (a tensor the caller owns and no longer needs); returns ``z``.

    Saves the allocation of a fresh tensor, which on the CPU costs more than the pass
    itself for large tensors (page faults); see :func:`excitation.kernels.fused._cpu_input_gradients`.
    """
    if gate == "sigmoid":
        # Elementwise with the output on its own input: every element is read before it is written.
        return torch.ops.aten.softplus_backward.grad_input(grad, z, 1.0 / temp, _SOFTPLUS_THRESHOLD, grad_input=z)
    return z.copy_(surrogate_relu_backward(grad, z, temp, gate))


def _launch_directly(*tensors: Tensor) -> bool:
    """Whether a Triton kernel may be launched as a plain Python call rather than through its triton_op.

    In plain eager the triton_op's dispatch only adds host time (~100-180 us per call on the
    H200 machine).  But a tracer must see the op: AOTAutograd traces a compiled backward under
    a dispatch mode (``torch.compiler.is_compiling()`` is not set there), and a raw launch on
    its functional / fake tensors is invisible to it: the traced graph kept the zero-filled
    output buffer, and the compiled pullback came out zero upstream of every pool (H200, caught
    by ``test_compile_cuda``).
    """
    return (
        not torch.compiler.is_compiling()
        and not under_functorch()  # functorch's wrapper tensors hide the real storage
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch.jit.is_tracing()
        and all(type(t) is torch.Tensor for t in tensors)
    )


def max_pool2d_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> int:
    """Output length of one spatial dimension, exactly as ``F.max_pool2d`` computes it."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    if ceil_mode:
        out = -(-span // stride) + 1
        # torch's rule: the last window must start inside the input or left padding.
        if (out - 1) * stride >= size + padding:
            out -= 1
    else:
        out = span // stride + 1
    return out


def _offsets(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], out_hw: Tuple[int, int]):
    """For every kernel offset, the (row, column) slices of the padded input it reads."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel_size, stride, dilation, out_hw
    for a in range(kh):
        for b in range(kw):
            yield (slice(a * dh, a * dh + (oh - 1) * sh + 1, sh), slice(b * dw, b * dw + (ow - 1) * sw + 1, sw))


def _window_weights(views: List[Tensor], temp: float, pool_backward: str = "soft") -> List[Tensor]:
    """``d(soft pool)/d(view_k) = p_k + p_k u_k - p_k * sum_v p_v u_v`` for every window offset k.

    With ``pool_backward="weights"`` the softmax weights are constants and the derivative is ``p_k``.

    Out of place, for ``torch.func`` transforms (where the saved input can be a tensor
    autograd tracks and in-place writes on it are refused) and double backward.
    """
    peak = views[0]
    for view in views[1:]:
        peak = torch.maximum(peak, view)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    # Outside the input (padding floor) u is hugely negative or -inf; a finite stand-in with exp(u) == 0 keeps p * u and
    # its derivatives (create_graph / torch.func higher orders) free of 0 * inf.
    us = [(view - peak) / temp for view in views]
    us = [torch.where(torch.isneginf(u), torch.full_like(u, -1e4), u) for u in us]
    ps = [torch.exp(u) for u in us]
    total = ps[0]
    for p in ps[1:]:
        total = total + p
    ps = [p / total for p in ps]
    if pool_backward == "weights":
        return ps
    pus = [p * u for p, u in zip(ps, us)]
    weighted = pus[0]
    for pu in pus[1:]:
        weighted = weighted + pu
    return [p - p * weighted + pu for p, pu in zip(ps, pus)]


_LN2 = math.log(2.0)


def _accumulate_window_gradients(
    views: List[Tensor], targets: List[Tensor], grad: Tensor, pool_backward: str = "soft"
) -> None:
    """``targets[k] += grad * d(soft pool)/d(x_k)`` for every window offset k, in place.

    ``views`` hold the window inputs in base-2 units of the temperature, ``v_k = x_k
    log2(e) / temp`` (finite: clamped, with padding a finite floor).  With ``d_k = v_k -
    max_v v <= 0``, ``e_k = 2^d_k``, ``S = sum e`` and ``SD = sum e d``::

        grad * p_k * (1 + (x_k - s) / temp) = e_k * (grad ln2 / S) * (d_k + 1/ln2 - SD / S)

    Base 2 because ``torch.exp2`` is the fast exponential on the CPU: 4x faster than
    ``torch.exp`` for arguments in [-5, 0] and 20x for arguments below -87, where ``exp``
    leaves its vector path (float32 results go subnormal); every padded position and
    every window holding a value far below its max lands there (measured on the 2-core box,
    128 Ki elements: exp 93 / 1111 us, exp2 24 / 49 us).

    Seven elementwise passes per offset: sub, exp2, two accumulations; add, mul and one
    ``addcmul_`` straight into the strided input gradient (the form that normalised ``u``
    first and scattered with ``result[view] += c`` took twelve).  ``e * d`` never meets
    ``0 * inf`` because ``d`` is finite, so no clean-up pass is needed.

    ``pool_backward="weights"`` holds the softmax weights constant: ``targets[k] += grad * e_k / S``.
    """
    peak = views[0].clone()  # (F.max_pool2d is 2.5x slower here: it writes indices too)
    for view in views[1:]:
        torch.maximum(peak, view, out=peak)
    total, weighted = torch.zeros_like(peak), torch.zeros_like(peak)
    ds, es = [], []
    if pool_backward == "weights":
        for view in views:
            e = torch.exp2(torch.sub(view, peak))
            total.add_(e)
            es.append(e)
        scale = torch.div(grad, total)
        for target, e in zip(targets, es):
            target.addcmul_(e, scale)
        return
    for view in views:
        d = torch.sub(view, peak)
        e = torch.exp2(d)
        total.add_(e)
        weighted.addcmul_(e, d)
        ds.append(d)
        es.append(e)
    shift = weighted.div_(total).neg_().add_(1.0 / _LN2)
    scale = torch.div(grad, total).mul_(_LN2)
    for target, d, e in zip(targets, ds, es):
        target.addcmul_(d.add_(shift), e.mul_(scale))


#: Output positions per chunk of planes in the CPU soft-pool backward (see soft_max_pool2d_backward_torch).
_CPU_CHUNK_OUTPUTS = 1 << 17


def _finite(x: Tensor) -> Tensor:
    """``x`` with +-inf replaced by +-(max / 4): an infinite input then takes all (or none) of its window's weight.

    Without it ``(x - max) / temp`` is ``inf - inf``; the quarter keeps ``x - max`` from
    overflowing, also against the padding floor :func:`_padding_floor` (-max / 2).
    A clamp rather than ``nan_to_num``: Inductor fuses it into the pool backward, while
    ``nan_to_num`` made compiled resnet50's pullback 25 % slower (measured, 2-core CPU).
    """
    big = torch.finfo(x.dtype).max / 4
    return x.clamp(-big, big)


def _scaled_padded(planes: Tensor, pads: List[int], dtype: torch.dtype, temp: float) -> Tensor:
    """``F.pad(_finite(planes * log2(e) / temp), pads, value=_padding_floor(dtype))`` in ``dtype``, in one fresh tensor.

    Scaled before the clamp, so an input that overflows ``x / temp`` still wins (or loses) its window.
    """
    height, width = planes.shape[-2:]
    big = torch.finfo(dtype).max / 4
    padded = planes.new_empty((planes.shape[0], height + pads[2] + pads[3], width + pads[0] + pads[1]), dtype=dtype)
    if any(pads):
        padded.fill_(_padding_floor(dtype))
    interior = padded[:, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
    interior.copy_(planes).mul_(1.0 / (_LN2 * temp)).clamp_(-big, big)
    return padded


def _padding_floor(dtype: torch.dtype) -> float:
    """The value padding gets: below every clamped input, so it never wins a window and its
    weight underflows to exactly 0, yet finite, so ``padding - max`` stays finite too."""
    return -torch.finfo(dtype).max / 2


def soft_max_pool2d_backward(
    grad: Tensor,
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str = "soft",
    functional: bool = False,
) -> Tensor:
    """Gradient of soft pooling ``s = sum_w softmax(x_w / temp) * x_w``, summed over windows.

    For window weights ``p = softmax(u)`` with ``u_w = (x_w - max) / temp <= 0``::

        ds/dx_w = p_w * (1 + (x_w - s) / temp) = p_w + p_w u_w - p_w * sum_v p_v u_v

    The right-hand form only multiplies ``p`` by ``u``, and ``p e^{u}``-style
    products stay bounded, so it is finite at any magnitude of ``x`` and any
    ``temp`` (the log-sum-exp trick applied to the derivative).  Positions outside
    the input (padding, ceil_mode overhang) hold a finite floor far below every input and get weight exactly 0.

    The window elements are handled as ``kh * kw`` strided *views* of the (padded)
    input, each of output size, so nothing of input size times ``kh * kw`` is ever
    materialised (no im2col / col2im), and non-overlapping pools need no padding copy.
    ``functional=True`` avoids in-place writes that involve ``grad`` (needed under
    ``torch.func`` transforms, where ``grad`` may be batched and ``x`` not).

    ``pool_backward="weights"`` differentiates ``s`` with the softmax weights held constant:
    ``ds/dx_w = p_w`` (the later "semantic" rule set).
    """
    if x.is_cuda and not functional and triton_available():
        # One fused kernel instead of ~11 passes per window offset (torch.func / double
        # backward keep the torch path: the kernel has no vmap or derivative rule).
        pool_args = (list(kernel_size), list(stride), list(padding), list(dilation), ceil_mode, temp, pool_backward)
        if _launch_directly(grad, x):
            from .triton import launch_soft_max_pool2d_backward

            return launch_soft_max_pool2d_backward(grad, x, *pool_args)
        return torch.ops.excitation.soft_max_pool2d_backward_triton(grad, x, *pool_args)  # tracers see the kernel
    return soft_max_pool2d_backward_torch(
        grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward, functional
    )


def soft_max_pool2d_backward_torch(
    grad: Tensor,
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    ceil_mode: bool,
    temp: float,
    pool_backward: str = "soft",
    functional: bool = False,
) -> Tensor:
    """:func:`soft_max_pool2d_backward` in plain torch ops on any device (what CPU runs; the Triton kernel's baseline)."""
    batch_shape = x.shape[:-2]
    height, width = x.shape[-2:]
    # Work in at least float32: half-precision softmax derivatives lose too much.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.reshape(-1, height, width)
    out_h = max_pool2d_output_size(height, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = max_pool2d_output_size(width, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    # ceil_mode windows can hang over the right/bottom edge beyond the padding.
    need_h = (out_h - 1) * stride[0] + dilation[0] * (kernel_size[0] - 1) + 1
    need_w = (out_w - 1) * stride[1] + dilation[1] * (kernel_size[1] - 1) + 1
    pads = [padding[1], max(need_w - width - padding[1], 0), padding[0], max(need_h - height - padding[0], 0)]
    offsets = list(_offsets(kernel_size, stride, dilation, (out_h, out_w)))
    g = grad.reshape(-1, out_h, out_w).to(compute_dtype)
    if functional:
        # Under torch.func (vmap over cotangents) ``g`` is batched but ``x`` is not: no
        # in-place write may mix them, so overlapping windows are summed by F.fold.
        finite = _finite(flat.to(compute_dtype))
        padded = F.pad(finite, pads, value=_padding_floor(compute_dtype)) if any(pads) else finite
        views = [padded[:, rows, cols] for rows, cols in offsets]
        columns = torch.stack([w * g for w in _window_weights(views, temp, pool_backward)], dim=1).flatten(2)
        result = F.fold(columns, padded.shape[-2:], kernel_size, dilation=dilation, stride=stride)[:, 0]
        if any(pads):
            result = result[:, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
        return result.reshape(*batch_shape, height, width).to(x.dtype)
    # The one tensor of input size this allocates is the result; everything else is per chunk
    # of planes.  On the CPU the chunks are a few planes (~128 Ki outputs, 512 KiB per float32
    # temporary, measured best of 16 Ki-1 Mi on the 2-core box): the ~7 passes per window
    # offset then run in cache (resnet50's stem pool 75-103 -> 47-55 ms, googlenet's 3x3/1 pools
    # 79-152 -> 53-60 ms, when introduced), and no clamped or padded copy of the whole input is
    # made (a fresh 100 MB CPU tensor costs ~35 ms of page faults before any work).  Elsewhere
    # one chunk holds every plane.
    result = torch.empty(flat.shape, dtype=compute_dtype, device=x.device)
    step = max(1, _CPU_CHUNK_OUTPUTS // max(1, out_h * out_w)) if x.device.type == "cpu" else g.shape[0]
    for start in range(0, g.shape[0], step):
        part = slice(start, start + step)
        scaled = _scaled_padded(flat[part], pads, compute_dtype, temp)
        # Positions no window reads (floor-mode remainders) keep a gradient of exactly 0.
        target = torch.zeros_like(scaled) if any(pads) else result[part].zero_()
        _accumulate_window_gradients(
            [scaled[:, rows, cols] for rows, cols in offsets],
            [target[:, rows, cols] for rows, cols in offsets],
            g[part],
            pool_backward,
        )
        if any(pads):
            result[part] = target[:, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
    return result.reshape(*batch_shape, height, width).to(x.dtype)


# ------------------------------------------------------ any-dimension soft pooling
def pool_windows(
    size: int, kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool
) -> Tuple[Tensor, Tensor]:
    """Input positions ``[out, kernel]`` read by each window of a regular max-pool, and which are real.

    Positions in the padding or past the input (``ceil_mode``) are marked invalid.
    """
    out = max_pool2d_output_size(size, kernel, stride, padding, dilation, ceil_mode)
    positions = torch.arange(out)[:, None] * stride - padding + torch.arange(kernel)[None, :] * dilation
    return positions, (positions >= 0) & (positions < size)


def adaptive_pool_windows(size: int, out: int) -> Tuple[Tensor, Tensor]:
    """Input positions of adaptive pooling's windows ``[floor(i L / O), ceil((i + 1) L / O))``, padded."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    width = max(e - s for s, e in zip(starts, ends))
    positions = torch.tensor(starts)[:, None] + torch.arange(width)[None, :]
    return positions, positions < torch.tensor(ends)[:, None]


def soft_max_pool_windows_backward(
    grad: Tensor, x: Tensor, windows: Sequence[Tuple[Tensor, Tensor]], temp: float, pool_backward: str = "soft"
) -> Tensor:
    """Soft-pool gradient for 1-, 2- or 3-D windows given per dimension as ``(positions, valid)``.

    The general (and simpler, but memory-hungrier) sibling of
    :func:`soft_max_pool2d_backward`: it gathers every window explicitly, so it
    handles adaptive pooling's uneven windows as well as regular ones.  The
    math is the same: ``ds/dx_w = p_w + p_w u_w - p_w sum_v p_v u_v``, with
    invalid positions weighted exactly 0.  Purely functional, so it runs under
    every ``torch.func`` transform.  ``pool_backward="weights"``: ``ds/dx_w = p_w``.
    """
    dims = len(windows)
    spatial = x.shape[-dims:]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = _finite(x.reshape(-1, *spatial).to(compute_dtype))
    gathered, mask_shape = flat, []
    for axis, (positions, valid) in enumerate(windows):
        dim = 1 + 2 * axis  # earlier axes are already split into (out, kernel) pairs
        index = positions.clamp(0, spatial[axis] - 1).to(x.device)
        gathered = gathered.index_select(dim, index.flatten()).unflatten(dim, positions.shape)
        mask_shape += list(positions.shape)
    valid_all = torch.ones((), dtype=torch.bool, device=x.device)
    for axis, (_, valid) in enumerate(windows):
        shape = [1] * (2 * dims)
        shape[2 * axis : 2 * axis + 2] = valid.shape
        valid_all = valid_all & valid.to(x.device).reshape(shape)
    window_dims = tuple(2 + 2 * axis for axis in range(dims))
    masked = gathered.masked_fill(~valid_all, -math.inf)
    peak = masked.amax(dim=window_dims, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    u = (masked - peak) / temp
    u = torch.where(torch.isneginf(u), torch.full_like(u, -1e4), u)  # finite stand-in: exp(-1e4) == 0
    e = torch.exp(u)
    p = e / e.sum(dim=window_dims, keepdim=True)
    if pool_backward == "weights":
        weights = p
    else:
        pu = p * u
        weights = p + pu - p * pu.sum(dim=window_dims, keepdim=True)
    g = grad.reshape(-1, *[positions.shape[0] for positions, _ in windows]).to(compute_dtype)
    for axis in range(dims):
        g = g.unsqueeze(2 + 2 * axis)
    contribution = weights * g
    for axis in reversed(range(dims)):
        positions, valid = windows[axis]
        dim = 1 + 2 * axis
        index = positions.clamp(0, spatial[axis] - 1).to(x.device).flatten()
        shape = list(contribution.shape)
        shape[dim : dim + 2] = [spatial[axis]]
        contribution = torch.zeros(shape, dtype=compute_dtype, device=x.device).index_add(
            dim, index, contribution.flatten(dim, dim + 1)
        )
    return contribution.reshape(x.shape).to(x.dtype)

