"""One BatchNorm -> ReLU site's backward on the CPU: Inductor's loop for our gate, our C kernel, vanilla's loop.

    python benchmarks/site_backward.py [--shape 4 256 28 28] [--rounds 30]

The input gradient of ``relu(batch_norm(x))`` (eval mode) given the output's gradient, as
compiled graphs compute it: ``torch.compile`` of the gate formula (the backward Inductor wrote
before the C kernels ran there), our C kernel in NCHW and channels-last (what compiled CPU
graphs now call, ``kernels/compiled.py``), and ``torch.compile`` of vanilla's ``threshold``
backward.  Interleaved rounds; min and median per call.  This is the measurement behind the
C kernels as the compiled CPU backward (docs/design.md): on a 2-core Intel Xeon (AVX-512), [4, 256, 28, 28]
took 0.43 / 0.65 ms (min / median of 30 rounds) in Inductor's loop, 0.21 / 0.33 ms in the C kernel,
0.22 / 0.28 ms in vanilla's loop (NCHW; channels-last alike).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from excitation.bench import cpu_model
from excitation.kernels import native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=4, type=int, default=[4, 256, 28, 28])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--temp", type=float, default=0.3)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit(f"the C kernels are not available here: {native.status()}")
    torch.manual_seed(0)
    n, c, h, w = args.shape
    x, g = torch.randn(n, c, h, w) * 2, torch.randn(n, c, h, w)
    mean, var, weight, bias = torch.randn(c), torch.rand(c) + 0.5, torch.randn(c), torch.randn(c)
    scale = (weight * torch.rsqrt(var + 1e-5)).reshape(1, -1, 1, 1)
    floor = -44.3614196 * args.temp  # the sigmoid gate's 2^-64 floor, as the contract writes it

    def ours_in_torch(grad, x):
        z = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, 1e-5, False)
        dz = torch.ops.aten.softplus_backward(grad, torch.where(z <= floor, float("-inf"), z), 1 / args.temp, 20.0)
        return torch.where(dz.abs() < torch.finfo(torch.float32).tiny, 0.0, dz) * scale

    def vanilla(grad, relu_out):
        return torch.where(relu_out <= 0, 0.0, grad) * scale

    inductor_ours, inductor_vanilla = torch.compile(ours_in_torch), torch.compile(vanilla)
    relu_out = torch.relu(torch.batch_norm(x, weight, bias, mean, var, False, 0.0, 1e-5, False))
    cl = {name: t.contiguous(memory_format=torch.channels_last) for name, t in (("x", x), ("g", g), ("a", relu_out))}
    calls = {
        "Inductor, our gate (NCHW)": lambda: inductor_ours(g, x),
        "Inductor, our gate (channels-last)": lambda: inductor_ours(cl["g"], cl["x"]),
        "C kernel (NCHW)": lambda: native.batch_norm_relu_gate_backward(g, x, mean, var, weight, bias, 1e-5, args.temp),
        "C kernel (channels-last)": lambda: native.batch_norm_relu_gate_backward_channels_last(
            cl["g"], cl["x"], mean, var, weight, bias, 1e-5, args.temp),
        "Inductor, vanilla threshold (NCHW)": lambda: inductor_vanilla(g, relu_out),
        "Inductor, vanilla threshold (channels-last)": lambda: inductor_vanilla(cl["g"], cl["a"]),
    }
    for call in calls.values():
        call(), call()  # compile, warm up
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            for _ in range(10):
                call()
            times[name].append((time.perf_counter() - start) / 10 * 1e3)
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, shape {args.shape}, {args.rounds} interleaved rounds")
    print("| backward of one BatchNorm -> ReLU site | min ms | median ms |")
    print("|---|---|---|")
    for name, samples in times.items():
        print(f"| {name} | {min(samples):.3f} | {statistics.median(samples):.3f} |")


if __name__ == "__main__":
    main()
