"""Achieved memory bandwidth of the ReLU gate backward against a copy ceiling.

``python benchmarks/gate_bandwidth.py [--device cuda]``.  The gate backward reads
``grad`` and ``z`` and writes the result (3 x N elements moved); the ceiling is
``out.copy_(src)`` (2 x N moved), the best a memory-bound op can do.  On CUDA
the gate is the Triton kernel; on CPU, ``aten.softplus_backward``.
"""

from __future__ import annotations

import argparse
import time

import torch

from excitation.kernels.reference import surrogate_relu_backward


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print("| dtype | gate | GB/s gate | GB/s copy ceiling | % of ceiling |")
    print("|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(args.numel, device=device, dtype=dtype)
        z = torch.randn(args.numel, device=device, dtype=dtype)
        out = torch.empty_like(z)
        copy_s = _time(lambda: out.copy_(z), device, args.repeats)
        ceiling = 2 * z.numel() * z.element_size() / copy_s / 1e9
        for gate in ("sigmoid", "normal_cdf"):
            gate_s = _time(lambda: surrogate_relu_backward(grad, z, 0.3, gate), device, args.repeats)
            achieved = 3 * z.numel() * z.element_size() / gate_s / 1e9
            print(f"| {dtype} | {gate} | {achieved:.0f} | {ceiling:.0f} | {100 * achieved / ceiling:.0f} % |")


if __name__ == "__main__":
    main()
