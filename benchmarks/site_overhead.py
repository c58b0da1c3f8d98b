"""Host cost of one surrogate site: forward + backward of a tiny tensor, against ``torch.relu``.

``python benchmarks/site_overhead.py [--device cuda]``.  With 16 elements the device
work is nil, so the time per call is what the host spends: dispatch, autograd
bookkeeping and kernel launches.  A ResNet-50 has 49 ReLU sites; where the model's
own gradient is host-bound (a GPU at small batch), this cost times 49 is the
pullback's whole overhead.  Rows: each mechanism of :mod:`excitation.kernels.registry`.
"""

from __future__ import annotations

import argparse
import time

import torch

from excitation.kernels.fused import batch_norm_relu
from excitation.kernels.ops import _call_surrogate_max_pool2d, call_surrogate_relu


def _per_call(fn, z: torch.Tensor, calls: int) -> float:
    sync = torch.cuda.synchronize if z.is_cuda else (lambda: None)
    for _ in range(50):
        fn(z).sum().backward()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn(z).sum().backward()
    sync()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    z = torch.randn(1, 1, 4, 4, device=args.device, requires_grad=True)
    bn = torch.nn.BatchNorm2d(1).eval().requires_grad_(False).to(args.device)  # frozen, as in a pullback
    rows = {
        "baseline: sum + backward only": lambda t: t,
        "torch.relu (vanilla)": torch.relu,
        "surrogate_relu, classic Function (plain eager)": lambda t: call_surrogate_relu.eager.apply(t, 0.3, "sigmoid", "exact"),
        "surrogate_relu, custom op (export, tracers)": lambda t: torch.ops.excitation.surrogate_relu(t, 0.3, "sigmoid", "exact"),
        "surrogate_relu, setup_context twin (torch.func)": lambda t: call_surrogate_relu.twin.apply(t, 0.3, "sigmoid", "exact"),
        "surrogate_relu, normal_cdf gate (plain eager)": lambda t: call_surrogate_relu.eager.apply(t, 0.3, "normal_cdf", "exact"),
        "BatchNorm2d + torch.relu (vanilla)": lambda t: torch.relu(bn(t)),
        "BatchNorm2d + surrogate_relu (unfused)": lambda t: call_surrogate_relu(bn(t), 0.3, "sigmoid", "exact"),
        "batch_norm_relu (fused, plain eager)": lambda t: batch_norm_relu(t, bn, None, 0.3),
        "F.max_pool2d 2x2 (vanilla)": lambda t: torch.nn.functional.max_pool2d(t, 2),
        "surrogate_max_pool2d 2x2 (plain eager)": lambda t: _call_surrogate_max_pool2d.eager.apply(
            t, [2, 2], [2, 2], [0, 0], [1, 1], False, 0.3)[0],
    }
    print(f"device {args.device}, torch {torch.__version__}, {args.calls} calls of forward + backward")
    print("| site | us per call | us over baseline |")
    print("|---|---|---|")
    base = None
    for name, fn in rows.items():
        seconds = _per_call(fn, z, args.calls)
        base = seconds if base is None else base
        print(f"| {name} | {1e6 * seconds:.1f} | {1e6 * (seconds - base):.1f} |")


if __name__ == "__main__":
    main()
