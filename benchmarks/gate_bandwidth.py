"""Achieved memory bandwidth of the ReLU gate backward against a copy ceiling.

``python benchmarks/gate_bandwidth.py [--device cuda] [--sweep]``.  The gate backward
reads ``grad`` and ``z`` and writes the result (3 x N elements moved); the ceiling is
``out.copy_(src)`` (2 x N moved), the best a memory-bound op can do.  Rows: what the
library runs (``aten.softplus_backward`` for the sigmoid gate, the Triton kernel for the
normal-CDF gate on CUDA), the Triton kernel for the sigmoid gate, and vanilla ReLU's
backward (``aten.threshold_backward``).  ``--sweep`` (CUDA) also times the Triton kernel at
other block sizes and warp counts, to choose the defaults in ``kernels/triton.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from excitation.kernels.dispatch import triton_available
from excitation.kernels.ops import relu_gate_backward as surrogate_relu_backward


def _time(fn, device: torch.device, repeats: int) -> float:
    """Seconds per call after a warm-up call.

    CUDA: the median over 5 rounds of ``repeats`` back-to-back calls between two events,
    so the kernels queue up and the host's launch cost is hidden (device throughput, as
    a bandwidth figure means).  CPU: the median of ``repeats`` single calls.
    """
    fn()
    if device.type == "cuda":
        rounds = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            torch.cuda.synchronize()
            rounds.append(start.elapsed_time(end) / 1e3 / repeats)
        return sorted(rounds)[2]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--numel", type=int, default=64 * 2**20)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time other Triton block sizes / warp counts (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, {args.numel} elements")
    print("| dtype | gate | kernel | ms | GB/s | GB/s copy ceiling | % of ceiling |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.randn(args.numel, device=device, dtype=dtype)
        z = torch.randn(args.numel, device=device, dtype=dtype)
        out = torch.empty_like(z)
        copy_s = _time(lambda: out.copy_(z), device, args.repeats)
        ceiling = 2 * z.numel() * z.element_size() / copy_s / 1e9

        def row(gate: str, kernel: str, fn) -> None:
            seconds = _time(fn, device, args.repeats)
            achieved = 3 * z.numel() * z.element_size() / seconds / 1e9
            print(f"| {dtype} | {gate} | {kernel} | {1e3 * seconds:.3f} | {achieved:.0f} | {ceiling:.0f} | "
                  f"{100 * achieved / ceiling:.0f} % |")

        triton = device.type == "cuda" and triton_available()
        row("sigmoid", "library (what the op runs here)", lambda: surrogate_relu_backward(grad, z, 0.3, "sigmoid"))
        row("normal_cdf", f"library ({'Triton' if triton else 'torch'})",
            lambda: surrogate_relu_backward(grad, z, 0.3, "normal_cdf"))
        row("vanilla", "aten.threshold_backward", lambda: torch.ops.aten.threshold_backward(grad, z, 0.0))
        if triton:
            from excitation.kernels.triton import launch_surrogate_relu_backward

            row("sigmoid", "Triton op", lambda: torch.ops.excitation.surrogate_relu_backward_triton(grad, z, 0.3, "sigmoid"))
            sweep = ((512, 4), (1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8)) if args.sweep else ()
            for block, warps in sweep:
                row("sigmoid", f"Triton block {block}, {warps} warps",
                    lambda: launch_surrogate_relu_backward(grad, z, 0.3, "sigmoid", block, warps))


if __name__ == "__main__":
    main()
