"""Triton kernel for the surrogate ReLU backward, used automatically on CUDA.

One pass over ``(grad, z)``: load both, compute the gate in float32 registers,
store ``grad * gate``.  The op is registered with ``torch.library.triton_op`` and
launched through ``wrap_triton``, so ``torch.compile`` sees the kernel rather
than an opaque call.  Import this module only where Triton imports
(:func:`triton_available`); ``reference.surrogate_relu_backward`` is the
contract it is tested against, on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["surrogate_relu_backward_triton", "launch_surrogate_relu_backward"]

_GATES = {"sigmoid": 0, "normal_cdf": 1}
BLOCK = 1024


@triton.jit
def _surrogate_relu_backward_kernel(grad_ptr, z_ptr, out_ptr, n_elements, inv_temp, GATE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32) * inv_temp
    if GATE == 0:
        gate = tl.sigmoid(u)  # saturates to exactly 0 / 1, finite for +-inf
    else:
        gate = 0.5 * (1.0 + tl.math.erf(u * 0.7071067811865476))
    tl.store(out_ptr + offsets, (g * gate).to(out_ptr.dtype.element_ty), mask=mask)


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


def _run(grad: Tensor, z: Tensor, temp: float, gate: str, launcher) -> Tensor:
    if not _same_dense_layout(grad, z):
        grad, z = grad.contiguous(), z.contiguous()
    out = torch.empty_like(z)
    n = z.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        launcher(_surrogate_relu_backward_kernel)[grid](grad, z, out, n, 1.0 / temp, GATE=_GATES[gate], BLOCK=BLOCK)
    return out


def launch_surrogate_relu_backward(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """Run the kernel eagerly (the plain launcher; tests call it under the interpreter)."""
    return _run(grad, z, temp, gate, lambda kernel: kernel)


@torch.library.triton_op("excitation::surrogate_relu_backward_triton", mutates_args=())
def surrogate_relu_backward_triton(grad: Tensor, z: Tensor, temp: float, gate: str) -> Tensor:
    """``grad * gate(z / temp)`` in one Triton pass (CUDA); ``wrap_triton`` lets torch.compile trace it."""
    return _run(grad, z, temp, gate, torch.library.wrap_triton)
