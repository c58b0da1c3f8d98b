"""The contract: plain-torch backward of every surrogate op, written for clarity, not speed.

Nothing here is a fast path and nothing here chooses one: every fast path (the
torch-op paths of :mod:`.torch_paths`, the C kernels of :mod:`.native`, the Triton
kernels of :mod:`.triton`) is tested against these functions, and the module that owns
an op (:mod:`.ops`, :mod:`.fused`, :mod:`.pooling`) chooses which path runs.  Everything
here runs on any device and dtype torch supports, under every ``torch.func`` transform,
and is differentiable (``create_graph``).

No subnormal floats.  A soft gate of a strongly negative pre-activation underflows:
``sigmoid(z / temp)`` is below 1e-38 once ``z / temp < -87``, and ``g * gate`` even
sooner.  Arithmetic on subnormal floats takes a microcode assist per element on many x86
cores (a backward full of them runs several times slower: measured in docs/design-measurements.md),
and such values are 30 orders of magnitude below any gradient an explanation can use.  So the
contract is, for every excitation backward:

* a soft gate (or a soft-pool window weight, relative to its window's max) below
  :data:`GATE_FLOOR` = 2^-64 is exactly 0, so a gated product is either 0 or within 64
  binary orders of the incoming gradient (the margin that keeps later convolutions and
  BatchNorms from underflowing);
* a result whose magnitude is below the dtype's smallest normal number is exactly 0
  (:func:`flush_subnormal`).

Both change a pullback by at most 2^-64 of the incoming gradient per element.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ..gates import GATE_FLOOR, GATES, NORMAL_CDF_FLOOR_LOGIT, SIGMOID_FLOOR_LOGIT, gate_floor, traced_constant

__all__ = [
    "GATE_FLOOR",
    "SIGMOID_FLOOR_LOGIT",
    "NORMAL_CDF_FLOOR_LOGIT",
    "flush_subnormal",
    "floor_gate",
    "relu_backward",
    "gated_backward",
    "max_pool2d_output_size",
    "pool_windows",
    "adaptive_pool_windows",
    "soft_max_pool2d_backward",
    "soft_max_pool_windows_backward",
    "padding_floor",
    "finite",
]

# GATE_FLOOR (2^-64, in excitation.gates): gates, and window weights relative to the window's max,
# below it are exactly 0; SIGMOID_FLOOR_LOGIT / NORMAL_CDF_FLOOR_LOGIT are the logits where each gate crosses it.


def flush_subnormal(t: Tensor) -> Tensor:
    """``t`` with every value of magnitude below ``finfo(t.dtype).tiny`` (the subnormals) set to exactly 0."""
    if not t.is_floating_point():
        return t
    return torch.where(t.abs() < torch.finfo(t.dtype).tiny, torch.zeros((), dtype=t.dtype, device=t.device), t)


_log_floor = traced_constant(math.log(GATE_FLOOR))


def floor_gate(gate: Tensor) -> Tensor:
    """``gate`` with values below :data:`GATE_FLOOR` set to exactly 0."""
    return torch.where(gate < gate_floor(), torch.zeros((), dtype=gate.dtype, device=gate.device), gate)


def gated_backward(grad: Tensor, gate: Tensor) -> Tensor:
    """``flush_subnormal(grad * floor_gate(gate))`` in ``grad``'s dtype: how every soft gate is applied."""
    return flush_subnormal((grad * floor_gate(gate)).to(grad.dtype))


def relu_backward(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)``, the excitation backward of ``relu(z)`` (gate floored, result flushed).

    The gate is evaluated in at least float32: half-precision sigmoids of ``z / temp`` lose too much.
    """
    compute = z.to(torch.promote_types(z.dtype, torch.float32))
    return gated_backward(grad, GATES[gate](compute, temp))


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


def finite(x: Tensor) -> Tensor:
    """``x`` with +-inf replaced by +-(max / 4): an infinite input then takes all (or none) of its window's weight.

    Without it ``(x - max) / temp`` is ``inf - inf``; the quarter keeps ``x - max`` from
    overflowing, also against :func:`padding_floor` (-max / 2).
    A clamp rather than ``nan_to_num``: Inductor fuses the clamp into the pool backward, while
    ``nan_to_num`` made the compiled pullback slower (measured in docs/design-measurements.md).
    """
    big = torch.finfo(x.dtype).max / 4
    return x.clamp(-big, big)


def padding_floor(dtype: torch.dtype) -> float:
    """The value padding gets: below every clamped input, so it never wins a window and its
    weight is exactly 0, yet finite, so ``padding - max`` stays finite too."""
    return -torch.finfo(dtype).max / 2


def soft_max_pool_windows_backward(
    grad: Tensor, x: Tensor, windows: Sequence[Tuple[Tensor, Tensor]], temp: float, pool_backward: str = "soft"
) -> Tensor:
    """Soft-pool gradient for 1-, 2- or 3-D windows given per dimension as ``(positions, valid)``.

    For window weights ``p = softmax(u)``, ``u_w = (x_w - max) / temp <= 0``, the gradient of
    ``s = sum_w p_w x_w`` is ``ds/dx_w = p_w (1 + u_w - sum_v p_v u_v)`` (``pool_backward="soft"``;
    only products of ``p`` with ``u`` appear, so it is finite at any magnitude and temperature),
    or ``p_w`` with the weights held constant (``"weights"``).  Positions outside the input and
    positions with ``e^{u_w} <`` :data:`GATE_FLOOR` get weight exactly 0; the result is flushed.

    It gathers every window explicitly (memory ``kernel x output``), so it handles adaptive
    pooling's uneven windows as well as regular ones, and it is purely functional.
    """
    dims = len(windows)
    spatial = x.shape[-dims:]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    flat = finite(x.reshape(-1, *spatial).to(compute_dtype))
    gathered = flat
    for axis, (positions, _) in enumerate(windows):
        dim = 1 + 2 * axis  # earlier axes are already split into (out, kernel) pairs
        index = positions.clamp(0, spatial[axis] - 1).to(x.device)
        gathered = gathered.index_select(dim, index.flatten()).unflatten(dim, positions.shape)
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
    # Far below the max (and outside the input): weight exactly 0, and u a finite stand-in so
    # that p * u and its derivatives (create_graph, torch.func) never meet 0 * inf.
    far = u < _log_floor()
    u = torch.where(far, torch.full_like(u, -1e4), u)
    e = torch.where(far, torch.zeros_like(u), torch.exp(u))
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
        positions, _ = windows[axis]
        dim = 1 + 2 * axis
        index = positions.clamp(0, spatial[axis] - 1).to(x.device).flatten()
        shape = list(contribution.shape)
        shape[dim : dim + 2] = [spatial[axis]]
        contribution = torch.zeros(shape, dtype=compute_dtype, device=x.device).index_add(
            dim, index, contribution.flatten(dim, dim + 1)
        )
    return flush_subnormal(contribution.reshape(x.shape).to(x.dtype))


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
) -> Tensor:
    """Gradient of soft pooling ``s = sum_w softmax(x_w / temp) * x_w`` of a 2-D max-pool, summed over windows.

    See :func:`soft_max_pool_windows_backward`: the same math, with the windows of
    ``F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)``.
    """
    windows = [
        pool_windows(x.shape[-2 + i], kernel_size[i], stride[i], padding[i], dilation[i], ceil_mode) for i in range(2)
    ]
    return soft_max_pool_windows_backward(grad, x, windows, temp, pool_backward)
