"""Triton kernels for the surrogate backwards, used automatically on CUDA.

* ReLU: one pass over ``(grad, z)``: load both, compute the gate in float32
  registers, store ``grad * gate``.
* 2-D soft max-pool: one program per block of output positions; each reads its
  window three times from cache (max, softmax sums, weights) and scatters
  ``grad * d(soft pool)/dx`` into a float32 buffer, with atomic adds where windows
  overlap and plain stores where they cannot (vgg's 2x2/2), instead of the ~11
  full-size elementwise passes per window offset of the torch path.

Both are registered with ``torch.library.triton_op`` and launched through
``wrap_triton``, so ``torch.compile`` sees the kernels rather than opaque calls.
Import this module only where Triton imports (:func:`triton_available`);
``reference.relu_backward`` and ``reference.soft_max_pool2d_backward``
are the contracts they are tested against, on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..gates import GATE_CODES, GATE_FLOOR

__all__ = [
    "surrogate_relu_backward_triton",
    "launch_surrogate_relu_backward",
    "soft_max_pool2d_backward_triton",
    "launch_soft_max_pool2d_backward",
]

BLOCK = 1024
NUM_WARPS = 4


# The contract's floor and flush (reference.py): gates below GATE_FLOOR are 0, results below the
# output dtype's smallest normal are 0.


@triton.jit
def _flush(value, tiny):
    return tl.where(tl.abs(value) < tiny, 0.0, value)


@triton.jit
def _normal_cdf(u):
    """Phi(u), tail-accurate: (1 + erf(u / sqrt 2)) / 2 cancels to 0 below u = -5.9 in float32.

    Where u < 0 and a = |u| / sqrt 2 >= 1/2, erfc(a) / 2 = e^(-u^2 / 2) t P(t)
    with t = 1 / (1 + a / 2): the C kernel's fit (csrc/excitation_cpu.c, ``normal_cdf_floored``), the
    same coefficients.  Elsewhere erf does not cancel.  The floor (below) zeroes u < -9.08.
    """
    w = tl.minimum(tl.abs(u), 9.19)
    a = w * 0.7071067811865476
    t = 1.0 / (1.0 + 0.5 * a)
    p = -3.643332533e-02
    p = p * t + 1.715752021e-01
    p = p * t - 2.963889361e-01
    p = p * t + 1.916512020e-01
    p = p * t - 4.494894213e-02
    p = p * t + 1.130631458e-01
    p = p * t + 1.189446872e-01
    p = p * t + 1.415057426e-01
    p = p * t + 1.410269124e-01
    tail = tl.exp(-0.5 * w * w) * t * p
    core = 0.5 * (1.0 + tl.math.erf(tl.maximum(u, -12.0) * 0.7071067811865476))
    return tl.where((u < 0.0) & (a >= 0.5), tail, core)


@triton.jit
def _surrogate_relu_backward_kernel(grad_ptr, z_ptr, out_ptr, n_elements, inv_temp, tiny,
                                    GATE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * inv_temp
    if GATE == 0:
        gate = tl.sigmoid(tl.maximum(u, -64.0))  # finite for +-inf; floored below
    else:
        gate = _normal_cdf(u)
    gate = tl.where(gate < GATE_FLOOR, 0.0, gate)
    out = (g * gate).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offsets, _flush(out, tiny), mask=mask)


def _same_dense_layout(a: Tensor, b: Tensor) -> bool:
    # Elementwise over raw memory is valid when both tensors place the same elements
    # identically and densely (contiguous, channels_last, transposed alike); then
    # empty_like() gives the output that layout too.
    return a.stride() == b.stride() and _dense(a)


def _dense(t: Tensor) -> bool:
    """Every element at a distinct offset, no gaps: some permutation of dims is contiguous."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _run(grad: Tensor, z: Tensor, temp: float, gate: str, launcher, block: int = BLOCK, num_warps: int = NUM_WARPS) -> Tensor:
    if not _same_dense_layout(grad, z):
        grad, z = grad.contiguous(), z.contiguous()
    out = torch.empty_like(z)
    n = z.numel()
    if n:
        grid = (triton.cdiv(n, block),)
        launcher(_surrogate_relu_backward_kernel)[grid](
            grad, z, out, n, 1.0 / temp, torch.finfo(out.dtype).tiny, GATE=GATE_CODES[gate], BLOCK=block, num_warps=num_warps
        )
    return out


def launch_surrogate_relu_backward(
    grad: Tensor, z: Tensor, temp: float, gate: str, block: int = BLOCK, num_warps: int = NUM_WARPS
) -> Tensor:
    """Run the kernel eagerly (the plain launcher; tests call it under the interpreter, benchmarks sweep ``block``)."""
    return _run(grad, z, temp, gate, lambda kernel: kernel, block, num_warps)


@torch.library.triton_op("excitation::surrogate_relu_backward_triton", mutates_args=())
def surrogate_relu_backward_triton(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)`` in one Triton pass (CUDA); ``wrap_triton`` lets torch.compile trace it."""
    return _run(grad, z, temp, gate, torch.library.wrap_triton)


# ------------------------------------------------------------------ soft max-pool
# 128 outputs per program: smaller blocks put more programs in flight to hide the atomics'
# latency, and 128 beat 256-1024 on the benchmark models' pools (measured in docs/design-measurements.md).
POOL_BLOCK = 128
POOL_NUM_WARPS = 4


@triton.jit
def _window_logit(x_ptr, offset, ok, peak, inv_temp, big):
    """``u = (clamp(x, +-big) - peak) / temp`` at one window offset, and ``e^u`` (0 outside the input or below 2^-64)."""
    v = tl.load(x_ptr + offset, mask=ok, other=0.0).to(tl.float32)
    u = tl.maximum((tl.minimum(tl.maximum(v, -big), big) - peak) * inv_temp, -45.0)
    return u, tl.where(ok & (u >= -44.3614196), tl.exp(u), 0.0)


@triton.jit
def _soft_max_pool2d_backward_kernel(
    grad_ptr, x_ptr, out_ptr, n_outputs, height, width, out_h, out_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, inv_temp, big, tiny,
    KH: tl.constexpr, KW: tl.constexpr, OVERLAP: tl.constexpr, WEIGHTS_ONLY: tl.constexpr, BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = index < n_outputs
    plane = index // (out_h * out_w)
    rest = index % (out_h * out_w)
    top = (rest // out_w) * stride_h - pad_h
    left = (rest % out_w) * stride_w - pad_w
    base = plane * height * width
    g = tl.load(grad_ptr + index, mask=live, other=0.0).to(tl.float32)
    # Pass 1: the window maximum (inputs clamped to +-big, as in the reference).
    peak = tl.full((BLOCK,), float("-inf"), tl.float32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            h = top + a * dil_h
            w = left + b * dil_w
            ok = live & (h >= 0) & (h < height) & (w >= 0) & (w < width)
            v = tl.load(x_ptr + base + h * width + w, mask=ok, other=float("-inf")).to(tl.float32)
            v = tl.where(ok, tl.minimum(tl.maximum(v, -big), big), float("-inf"))
            peak = tl.maximum(peak, v)
    # Pass 2: S = sum e^u and SU = sum e^u u, u = (x - peak) / temp <= 0.
    total = tl.zeros((BLOCK,), tl.float32)
    weighted = tl.zeros((BLOCK,), tl.float32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            h = top + a * dil_h
            w = left + b * dil_w
            ok = live & (h >= 0) & (h < height) & (w >= 0) & (w < width)
            u, e = _window_logit(x_ptr, base + h * width + w, ok, peak, inv_temp, big)
            total += e
            weighted += tl.where(e > 0.0, e * u, 0.0)
    mean_u = weighted / tl.where(total > 0.0, total, 1.0)
    scale = g / tl.where(total > 0.0, total, 1.0)
    # Pass 3: dx_w += g * p_w * (1 + u_w - sum_v p_v u_v), or g * p_w with the weights held constant.
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            h = top + a * dil_h
            w = left + b * dil_w
            ok = live & (h >= 0) & (h < height) & (w >= 0) & (w < width)
            u, e = _window_logit(x_ptr, base + h * width + w, ok, peak, inv_temp, big)
            if WEIGHTS_ONLY:
                contribution = _flush(e * scale, tiny)
            else:
                contribution = _flush(tl.where(e > 0.0, e * scale * (1.0 + u - mean_u), 0.0), tiny)
            if OVERLAP:
                tl.atomic_add(out_ptr + base + h * width + w, contribution, mask=ok & (e > 0.0))
            else:  # every input position is in at most one window: a plain store is race-free
                tl.store(out_ptr + base + h * width + w, contribution, mask=ok)


def _run_pool(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward, launcher,
              block: int = POOL_BLOCK, num_warps: int = POOL_NUM_WARPS) -> Tensor:
    from .reference import max_pool2d_output_size

    height, width = x.shape[-2:]
    out_h = max_pool2d_output_size(height, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    out_w = max_pool2d_output_size(width, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    xs = x.contiguous()
    gs = grad.contiguous()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    n = gs.numel()
    if n:
        big = torch.finfo(torch.float32).max / 4
        # Windows overlap when a window reaches past the next one's start (vgg's 2x2/2 does not).
        overlap = any(s < d * (k - 1) + 1 for k, s, d in zip(kernel_size, stride, dilation))
        grid = (triton.cdiv(n, block),)
        launcher(_soft_max_pool2d_backward_kernel)[grid](
            gs, xs, out, n, height, width, out_h, out_w, stride[0], stride[1], padding[0], padding[1],
            dilation[0], dilation[1], 1.0 / temp, big, torch.finfo(torch.float32).tiny, KH=kernel_size[0], KW=kernel_size[1], OVERLAP=overlap,
            WEIGHTS_ONLY=pool_backward == "weights", BLOCK=block, num_warps=num_warps,
        )
    out = out.to(x.dtype)
    # Sums of normal contributions can still cancel below the smallest normal (and a float16 cast can underflow).
    return out.masked_fill_(out.abs() < torch.finfo(out.dtype).tiny, 0.0)


def launch_soft_max_pool2d_backward(
    grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward: str = "soft",
    block: int = POOL_BLOCK, num_warps: int = POOL_NUM_WARPS,
) -> Tensor:
    """Run the pool kernel eagerly (the plain launcher; tests call it under the interpreter, benchmarks sweep ``block``)."""
    return _run_pool(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward,
                     lambda kernel: kernel, block, num_warps)


@torch.library.triton_op("excitation::soft_max_pool2d_backward_triton", mutates_args=())
def soft_max_pool2d_backward_triton(
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
    """The soft-pool gradient of :func:`.reference.soft_max_pool2d_backward` in one Triton kernel (CUDA)."""
    return _run_pool(grad, x, kernel_size, stride, padding, dilation, ceil_mode, temp, pool_backward,
                     torch.library.wrap_triton)
