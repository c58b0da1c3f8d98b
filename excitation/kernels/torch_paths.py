"""Fast paths written in torch ops: the ReLU gate and the 2-D soft-pool backward, tuned for the CPU.

They compute what :mod:`.reference` specifies (tested against it), in fewer passes and
without temporaries of input size, and they never produce a subnormal float, not even in
an intermediate (see :mod:`.reference` for why; ``tests/test_subnormals.py`` counts them
under a dispatch mode).  They run on any device and under ``torch.compile``; the module
that owns an op (:mod:`.ops`) chooses between them, the C kernels of :mod:`.native` and
the Triton kernels of :mod:`.triton`.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..gates import GATES, gate_floor, normal_cdf_floor_logit, sigmoid_floor_logit, traced_constant
from .reference import (
    GATE_FLOOR,
    finite,
    max_pool2d_output_size,
    padding_floor,
)

__all__ = [
    "SOFTPLUS_THRESHOLD",
    "relu_backward",
    "relu_backward_",
    "flush_subnormal_",
    "compact_gate",
    "soft_max_pool2d_backward_chunked",
    "soft_max_pool2d_backward_functional",
]

# softplus_backward returns ``g`` unchanged where ``z * beta > threshold``.  At 20,
# sigmoid(20) = 1 - 2e-9, which rounds to 1.0 in float32 and is 2e-9 off in
# float64: far below every tolerance we promise.
# An int, not 20.0: under ``torch.compile(..., dynamic=True)`` dynamo (2.14) turns a
# module-level float into a symbolic graph input, and a symbolic float reaching an
# autograd.Function's backward fails to trace ("lift_tracked_freevar_to_input should
# not be called on root SubgraphTracer") as soon as a graph holds two surrogate ReLUs.
SOFTPLUS_THRESHOLD = 20

_aten = torch.ops.aten


def flush_subnormal_(t: Tensor) -> Tensor:
    """Set the subnormal values of ``t`` to 0 in place, in one pass (``hardshrink(t, tiny)`` into ``t``)."""
    if t.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        _aten.hardshrink.out(t, torch.finfo(t.dtype).tiny, out=t)
    return t


def _flush_subnormal(t: Tensor) -> Tensor:
    return F.hardshrink(t, torch.finfo(t.dtype).tiny)


def _floored_logits(z: Tensor, temp: float, gate: str) -> Tensor:
    """``z`` with values whose gate is below the floor replaced: ``-inf`` (sigmoid) or a clamp (normal CDF)."""
    if gate == "sigmoid":
        # softplus_backward maps -inf to a gate of exactly 0, and never evaluates an exp that underflows.
        return torch.threshold(z, sigmoid_floor_logit() * temp, float("-inf"))
    return z.clamp_min(normal_cdf_floor_logit() * temp * 1.125)  # Phi stays normal; floored below


def relu_backward(grad: Tensor, z: Tensor, temp: float, gate: str, functional: bool = True) -> Tensor:
    """:func:`.reference.relu_backward` in 2-3 torch passes (no pass that underflows).

    The sigmoid gate is ``aten.softplus_backward(g, z, 1/temp, 20)``: ``g * sigmoid(z / temp)`` in
    one fused pass, finite for any ``z``, at the copy bandwidth on a GPU (docs/performance), and
    Inductor fuses it.  Pre-activations whose gate is below 2^-64 become ``-inf`` first (one pass),
    which the pass maps to exactly 0 without computing an ``exp`` that underflows: underflowing
    exponentials take a microcode assist per element on many x86 cores (measured in docs/design-measurements.md).
    A last pass flushes results below
    the smallest normal (a tiny incoming gradient).  ``functional=False`` writes in place into the
    one fresh tensor (eager, first-order backward only).
    """
    if gate == "sigmoid":
        cut = _floored_logits(z, temp, gate)
        if functional:
            return _flush_subnormal(_aten.softplus_backward(grad, cut, 1.0 / temp, SOFTPLUS_THRESHOLD))
        return flush_subnormal_(_aten.softplus_backward.grad_input(grad, cut, 1.0 / temp, SOFTPLUS_THRESHOLD, grad_input=cut))
    compute = _floored_logits(z.to(torch.promote_types(z.dtype, torch.float32)), temp, gate)
    value = GATES[gate](compute, temp)
    value = torch.threshold(value, gate_floor(), 0.0) if functional else torch.threshold_(value, gate_floor(), 0.0)
    product = (grad * value).to(grad.dtype)
    return _flush_subnormal(product) if functional else flush_subnormal_(product)


def relu_backward_(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """:func:`relu_backward` written into ``z`` (a tensor the caller owns and no longer needs); returns ``z``.

    Saves the allocation of a fresh tensor, which on the CPU costs more than the pass
    itself for large tensors (page faults); see :func:`excitation.kernels.fused._cpu_input_gradients`.
    """
    if gate == "sigmoid":
        # Elementwise with the output on its own input: every element is read before it is written.
        torch.threshold_(z, sigmoid_floor_logit() * temp, float("-inf"))
        _aten.softplus_backward.grad_input(grad, z, 1.0 / temp, SOFTPLUS_THRESHOLD, grad_input=z)
        return flush_subnormal_(z)
    return z.copy_(relu_backward(grad, z, temp, gate, functional=False))


def compact_gate(z: Tensor, temp: float, gate: str, saved: str) -> Tensor:
    """The floored gate evaluated in float32 and stored in 2 bytes (``"bfloat16"``) or as ``round(255 * gate)`` in 1.

    The sigmoid gate is one ``softplus_backward`` pass with a broadcast constant as its
    "gradient" (``scale * sigmoid(z / temp)``, no temporaries), so storing it costs 2-3
    passes instead of 3-5.
    """
    scale = 255.0 if saved == "uint8" else 1.0
    z32 = _floored_logits(z.float(), temp, gate)
    if gate == "sigmoid":
        value = _aten.softplus_backward(z32.new_full((), scale).expand(z32.shape), z32, 1.0 / temp, SOFTPLUS_THRESHOLD)
    else:
        value = torch.threshold(GATES[gate](z32, temp), gate_floor(), 0.0).mul_(scale)
    return value.to(torch.bfloat16) if saved == "bfloat16" else value.round_().to(torch.uint8)


# --------------------------------------------------------------------- soft pool
def _offsets(kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int], out_hw: Tuple[int, int]):
    """For every kernel offset, the (row, column) slices of the padded input it reads."""
    (kh, kw), (sh, sw), (dh, dw), (oh, ow) = kernel_size, stride, dilation, out_hw
    for a in range(kh):
        for b in range(kw):
            yield (slice(a * dh, a * dh + (oh - 1) * sh + 1, sh), slice(b * dw, b * dw + (ow - 1) * sw + 1, sw))


def _geometry(x: Tensor, kernel_size, stride, padding, dilation, ceil_mode):
    """Output size, the padding every window needs (left, right, top, bottom) and the window offsets."""
    height, width = x.shape[-2:]
    out_h = max_pool2d_output_size(height, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = max_pool2d_output_size(width, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    # ceil_mode windows can hang over the right/bottom edge beyond the padding.
    need_h = (out_h - 1) * stride[0] + dilation[0] * (kernel_size[0] - 1) + 1
    need_w = (out_w - 1) * stride[1] + dilation[1] * (kernel_size[1] - 1) + 1
    pads = [padding[1], max(need_w - width - padding[1], 0), padding[0], max(need_h - height - padding[0], 0)]
    return (out_h, out_w), pads, list(_offsets(kernel_size, stride, dilation, (out_h, out_w)))


_log_floor = traced_constant(math.log(GATE_FLOOR))


def _window_weights(views: List[Tensor], temp: float, pool_backward: str = "soft") -> List[Tensor]:
    """``d(soft pool)/d(view_k) = p_k + p_k u_k - p_k * sum_v p_v u_v`` for every window offset k, out of place.

    With ``pool_backward="weights"`` the softmax weights are constants and the derivative is ``p_k``.
    For ``torch.func`` transforms (where the saved input can be a tensor autograd tracks and
    in-place writes on it are refused) and double backward.
    """
    peak = views[0]
    for view in views[1:]:
        peak = torch.maximum(peak, view)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    us = [(view - peak) / temp for view in views]
    # Weight below the floor (and padding): exactly 0, with a finite stand-in u so that p * u and its
    # derivatives never meet 0 * inf and exp never underflows.
    fars = [u < _log_floor() for u in us]
    us = [torch.where(far, torch.full_like(u, -1e4), u) for u, far in zip(us, fars)]
    ps = [torch.where(far, torch.zeros_like(u), torch.exp(u.clamp_min(_log_floor()))) for u, far in zip(us, fars)]
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


def soft_max_pool2d_backward_functional(
    grad: Tensor, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, temp: float,
    pool_backward: str = "soft",
) -> Tensor:
    """The soft-pool backward with no in-place write (``torch.func``, ``create_graph``): strided views and ``F.fold``.

    Under torch.func (vmap over cotangents) ``grad`` is batched but ``x`` is not: no in-place
    write may mix them, so overlapping windows are summed by ``F.fold``.
    """
    batch_shape, (height, width) = x.shape[:-2], x.shape[-2:]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    (out_h, out_w), pads, offsets = _geometry(x, kernel_size, stride, padding, dilation, ceil_mode)
    g = grad.reshape(-1, out_h, out_w).to(compute_dtype)
    flat = finite(x.reshape(-1, height, width).to(compute_dtype))
    padded = F.pad(flat, pads, value=padding_floor(compute_dtype)) if any(pads) else flat
    views = [padded[:, rows, cols] for rows, cols in offsets]
    columns = torch.stack([w * g for w in _window_weights(views, temp, pool_backward)], dim=1).flatten(2)
    result = F.fold(columns, padded.shape[-2:], kernel_size, dilation=dilation, stride=stride)[:, 0]
    if any(pads):
        result = result[:, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
    return _flush_subnormal(result.reshape(*batch_shape, height, width).to(x.dtype))


_ln2 = traced_constant(math.log(2.0))
#: ``d = v - max`` (base-2 units) below this gives a window weight below the floor: exactly 0.
_floor_exponent = traced_constant(math.log2(GATE_FLOOR))


def _accumulate_window_gradients(
    views: List[Tensor], targets: List[Tensor], grad: Tensor, pool_backward: str = "soft"
) -> None:
    """``targets[k] += grad * d(soft pool)/d(x_k)`` for every window offset k, in place.

    ``views`` hold the window inputs in base-2 units of the temperature, ``v_k = x_k
    log2(e) / temp`` (finite: clamped, with padding a finite floor).  With ``d_k = v_k -
    max_v v <= 0``, ``e_k = 2^d_k``, ``S = sum e`` and ``SD = sum e d``::

        grad * p_k * (1 + (x_k - s) / temp) = e_k * (grad ln2 / S) * (d_k + 1/ln2 - SD / S)

    Base 2 because ``torch.exp2`` is the fast exponential on the CPU, several times faster than
    ``torch.exp`` for arguments in [-5, 0] (measured in docs/design-measurements.md).  ``d`` is
    clamped at -65 first and weights at or below 2^-64 are set to 0 (the floor of
    :mod:`.reference`), so no exponential underflows into subnormals.

    Nine elementwise passes per offset: sub, clamp, exp2, threshold, two accumulations; add,
    mul and one ``addcmul_`` straight into the strided input gradient.  ``e * d`` never meets
    ``0 * inf`` because ``d`` is finite.  ``pool_backward="weights"`` holds the softmax
    weights constant: ``targets[k] += grad * e_k / S``.
    """
    peak = views[0].clone()  # (F.max_pool2d is slower here: it writes indices too)
    for view in views[1:]:
        torch.maximum(peak, view, out=peak)
    total, weighted = torch.zeros_like(peak), torch.zeros_like(peak)
    ds, es = [], []
    for view in views:
        d = torch.sub(view, peak).clamp_min_(_floor_exponent() - 1.0)
        e = torch.threshold_(torch.exp2(d), gate_floor(), 0.0)
        total.add_(e)
        if pool_backward == "soft":
            weighted.addcmul_(e, d)
            ds.append(d)
        es.append(e)
    if pool_backward == "weights":
        scale = torch.div(grad, total)
        for target, e in zip(targets, es):
            target.addcmul_(e, scale)
        return
    shift = weighted.div_(total).neg_().add_(1.0 / _ln2())
    scale = torch.div(grad, total).mul_(_ln2())
    for target, d, e in zip(targets, ds, es):
        target.addcmul_(d.add_(shift), e.mul_(scale))


#: Output positions per chunk of planes in the CPU soft-pool backward (see soft_max_pool2d_backward_chunked).
CPU_CHUNK_OUTPUTS = 1 << 17


def _scaled_padded(planes: Tensor, pads: List[int], dtype: torch.dtype, temp: float) -> Tensor:
    """``F.pad(finite(planes * log2(e) / temp), pads, value=padding_floor(dtype))`` in ``dtype``, in one fresh tensor.

    Scaled before the clamp, so an input that overflows ``x / temp`` still wins (or loses) its window.
    """
    height, width = planes.shape[-2:]
    big = torch.finfo(dtype).max / 4
    padded = planes.new_empty((planes.shape[0], height + pads[2] + pads[3], width + pads[0] + pads[1]), dtype=dtype)
    if any(pads):
        padded.fill_(padding_floor(dtype))
    interior = padded[:, pads[2] : pads[2] + height, pads[0] : pads[0] + width]
    interior.copy_(planes).mul_(1.0 / (_ln2() * temp)).clamp_(-big, big)
    return padded


def soft_max_pool2d_backward_chunked(
    grad: Tensor, x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool, temp: float,
    pool_backward: str = "soft",
) -> Tensor:
    """The soft-pool backward of :func:`.reference.soft_max_pool2d_backward` in plain torch ops, in place per chunk.

    The window elements are handled as ``kh * kw`` strided *views* of the (padded) input, each
    of output size, so nothing of input size times ``kh * kw`` is ever materialised (no im2col
    / col2im).  The one tensor of input size this allocates is the result; everything else is
    per chunk of planes.  On the CPU the chunks are a few planes (~128 Ki outputs, 512 KiB per
    float32 temporary, the best of sizes from 16 Ki to 1 Mi): the ~9 passes per window offset then
    run in cache, and no clamped or padded copy of the whole input is made (a fresh large CPU tensor
    pays a page fault per 4 KiB on first write, before any work; measured in docs/design-measurements.md).
    Elsewhere one chunk holds every plane.
    """
    batch_shape, (height, width) = x.shape[:-2], x.shape[-2:]
    # Work in at least float32: half-precision softmax derivatives lose too much.
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    (out_h, out_w), pads, offsets = _geometry(x, kernel_size, stride, padding, dilation, ceil_mode)
    g = grad.reshape(-1, out_h, out_w).to(compute_dtype)
    flat = x.reshape(-1, height, width)
    result = torch.empty(flat.shape, dtype=compute_dtype, device=x.device)
    step = max(1, CPU_CHUNK_OUTPUTS // max(1, out_h * out_w)) if x.device.type == "cpu" else g.shape[0]
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
    return flush_subnormal_(result.reshape(*batch_shape, height, width).to(x.dtype))
