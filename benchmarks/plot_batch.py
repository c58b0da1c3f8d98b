"""Time per batch vs batch size, vanilla gradient vs excitation pullback: ``python benchmarks/plot_batch.py``.

Writes ``docs/perf_batch.png`` and prints the numbers (one process, interleaved rounds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from excitation.bench import run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default="docs/perf_batch.png")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    series = {"vanilla gradient": [], "excitation (ours)": []}
    for batch in args.batches:
        result = run_bench(args.model, batch=batch, size=args.size, device=args.device, repeats=args.repeats,
                           peers=False, progress=False)
        rows = {row.method: row for row in result.rows}
        for name in series:
            series[name].append((rows[name].ms_median, rows[name].ms_p20, rows[name].ms_p80))
        print(f"batch {batch:3d}: vanilla {rows['vanilla gradient'].ms_median:8.1f} ms, ours "
              f"{rows['excitation (ours)'].ms_median:8.1f} ms, ratio {rows['excitation (ours)'].ratio:.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in series.items():
        med = [v[0] for v in values]
        ax.errorbar(args.batches, med, yerr=[[m - v[1] for m, v in zip(med, values)], [v[2] - m for m, v in zip(med, values)]],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("ms per batch (median, p20-p80)")
    ax.set_title(f"{args.model} input gradient, {args.size}², {result.device} ({result.machine})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
