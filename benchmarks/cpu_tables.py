"""The CPU tables of docs/performance: ours against vanilla, eager and compiled, per model and batch, on this machine.

    python benchmarks/cpu_tables.py --out docs/bench/cpu-<cpu> [--models resnet50 googlenet] [--batches 4 8]

One subprocess per (model, batch), so one model's compile caches and allocator state do not
reach the next; each writes ``<model>-b<batch>.json`` (the ``excitation bench`` result) and the
Markdown table, and the script prints a summary table of ratios to vanilla.  The flush-to-zero
footnote is measured once per model (batch 2, one thread).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROWS = ["excitation (ours)", "excitation (ours), unfused", "excitation (ours), compiled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg11_bn", "densenet121", "googlenet"])
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--repeats", type=int, default=8)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--no-compile", action="store_true", help="eager rows only")
    mode.add_argument("--compile-only", action="store_true", help="compiled rows only")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        for i, batch in enumerate(args.batches):
            path = args.out / f"{model}-b{batch}.json"
            if path.exists():
                continue  # resumable: a finished cell is kept
            only = ROWS[:2] if args.no_compile else ROWS[2:] if args.compile_only else ROWS
            code = (
                "from excitation.bench import run_bench, format_table\n"
                f"r = run_bench({model!r}, batch={batch}, compile_={not args.no_compile}, repeats={args.repeats}, "
                f"peers=False, progress=False, flush_to_zero={i == 0 and not args.compile_only}, only={only!r})\n"
                f"open({str(path.with_suffix('.md'))!r}, 'w').write(format_table(r) + '\\n')\n"
                f"open({str(path) + '.tmp'!r}, 'w').write(r.to_json())\n"
            )
            subprocess.run([sys.executable, "-c", code], check=True)
            Path(str(path) + ".tmp").rename(path)
            print(f"done {model} b{batch}", flush=True)
    print("| model | batch | ours / vanilla: time, memory | unfused: time, memory | compiled: time, memory |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for batch in args.batches:
            rows = {r["method"]: r for r in json.loads((args.out / f"{model}-b{batch}.json").read_text())["rows"]}
            cell = lambda name: (f"{rows[name]['ratio']:.3f}, {rows[name]['memory_ratio']:.3f}"
                                 if name in rows and rows[name]["ratio"] else "–")
            print(f"| {model} | {batch} | {cell(ROWS[0])} | {cell(ROWS[1])} | {cell(ROWS[2])} |")


if __name__ == "__main__":
    main()
