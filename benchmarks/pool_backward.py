"""The soft max-pool backward against vanilla max-pool's backward, on the pools of the benchmark models.

``python benchmarks/pool_backward.py [--device cuda] [--batch 32] [--sweep]``.  Rows per
pool: vanilla (``aten.max_pool2d_with_indices_backward``), what the library runs (the
Triton kernel on CUDA, the C kernel on the CPU; both pool variants) and the torch path.
The ``GB/s`` column counts the fewest bytes the soft backward must move (read ``x``
and ``grad``, write ``dx``) over its time.  ``--sweep`` (CUDA) times other Triton
block sizes and warp counts, to choose the defaults in ``kernels/triton.py``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from excitation.kernels import native
from excitation.kernels.dispatch import triton_available
from excitation.kernels.ops import pool2d_backward
from excitation.kernels.torch_paths import soft_max_pool2d_backward_chunked

#: name -> (channels, input side, kernel, stride, padding, ceil_mode), as in the torchvision models.
POOLS = {
    "resnet50 / densenet121 stem 3x3/2 pad 1": (64, 112, 3, 2, 1, False),
    "vgg11_bn first 2x2/2": (64, 224, 2, 2, 0, False),
    "vgg11_bn last 2x2/2": (512, 14, 2, 2, 0, False),
    "googlenet 3x3/2 ceil": (192, 56, 3, 2, 0, True),
    "googlenet inception 3x3/1 pad 1 ceil": (480, 28, 3, 1, 1, True),
}


def main() -> None:
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from gate_bandwidth import _time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="also time other Triton block sizes / warp counts (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), torch {torch.__version__}, batch {args.batch}, float32, temp 0.3")
    print("| pool | backward | ms | time / vanilla | GB/s |")
    print("|---|---|---|---|---|")
    for pool, (channels, side, k, s, p, ceil) in POOLS.items():
        x = torch.randn(args.batch, channels, side, side, device=device)
        y, indices = F.max_pool2d(x, k, s, p, ceil_mode=ceil, return_indices=True)
        g = torch.randn_like(y)
        pool_args = ([k, k], [s, s], [p, p], [1, 1], ceil)
        moved = (2 * x.numel() + g.numel()) * 4
        vanilla_s = _time(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            g, x, [k, k], [s, s], [p, p], [1, 1], ceil, indices), device, args.repeats)

        def row(label: str, fn) -> None:
            seconds = _time(fn, device, args.repeats)
            print(f"| {pool} | {label} | {1e3 * seconds:.3f} | {seconds / vanilla_s:.2f} | {moved / seconds / 1e9:.0f} |")

        print(f"| {pool} | vanilla max-pool backward | {1e3 * vanilla_s:.3f} | 1.00 | {moved / vanilla_s / 1e9:.0f} |")
        cuda_triton = device.type == "cuda" and triton_available()
        c_kernel = device.type == "cpu" and native.available()
        label = "ours (Triton)" if cuda_triton else "ours (C kernel)" if c_kernel else "ours (torch path)"
        for variant in ("soft", "weights"):
            row(f"{label}, {variant}", lambda: pool2d_backward(g, x, *pool_args, 0.3, variant))
        if cuda_triton or c_kernel:
            row("ours, torch path, soft", lambda: soft_max_pool2d_backward_chunked(g, x, *pool_args, 0.3))
        if cuda_triton:
            from excitation.kernels.triton import launch_soft_max_pool2d_backward

            if args.sweep:
                for block, warps in ((128, 4), (256, 4), (512, 4), (512, 8), (1024, 8)):
                    row(f"Triton block {block}, {warps} warps",
                        lambda: launch_soft_max_pool2d_backward(g, x, *pool_args, 0.3, "soft", block, warps))


if __name__ == "__main__":
    main()
