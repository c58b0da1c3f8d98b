"""The CPU tables and the torchvision zoo at two revisions, interleaved, on this machine: did a change move a ratio?

    python benchmarks/compare_revisions.py BEFORE AFTER --out docs/bench/revisions-<cpu> [--repeats 5] [--no-zoo]

Each revision is checked out into ``OUT/src-<rev>`` (``git worktree``), and its own code measures
itself with ``excitation.bench.run_bench`` (the CPU tables' cells, without their peer and
subnormal rows): eager at ``--batches``, compiled (``torch.compile(excite(m))`` and
``backend="excitation"``) at ``--compiled-batches``, one subprocess per cell, the two revisions
taking turns cell by cell, so drift of the machine during the hour this takes falls on both.  Then
``excitation zoo`` at each.  Cells already written are kept (the run is resumable), and the script
ends with a Markdown table of both revisions' ratios to vanilla and their difference, beside the
CPU model, the torch version and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"eager": ["excitation (ours)"],
        "compiled": ["excitation (ours), compiled", 'excitation (ours), backend="excitation", compiled']}


def _checkout(rev: str, out: Path) -> Path:
    src = out / f"src-{rev}"
    if not src.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(src), rev], check=True)
    return src


def _run(src: Path, args: list) -> None:
    # The revision's own package, not the installed one: it comes first on the path of every subprocess.
    env = dict(os.environ, PYTHONPATH=str(src))
    subprocess.run([sys.executable, *args], cwd=src, env=env, check=True)


def _cell(src: Path, path: Path, model: str, batch: int, mode: str, repeats: int) -> None:
    if path.exists():
        return  # resumable: a finished cell is kept
    path.parent.mkdir(parents=True, exist_ok=True)
    code = (
        "from excitation.bench import run_bench\n"
        f"r = run_bench({model!r}, batch={batch}, compile_={mode == 'compiled'}, repeats={repeats}, peers=False, "
        f"progress=False, flush_to_zero=False, only={ROWS[mode]!r})\n"
        f"open({str(path) + '.tmp'!r}, 'w').write(r.to_json())\n"
    )
    _run(src, ["-c", code])
    Path(str(path) + ".tmp").rename(path)
    print(f"done {path}", flush=True)


def _ratios(folder: Path, row: str) -> Dict[str, Optional[float]]:
    found = {}
    for path in sorted(folder.glob("*-b*.json")):
        rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
        found[path.stem] = rows[row]["ratio"] if row in rows else None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vgg11_bn", "densenet121", "googlenet"])
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8], help="eager cells")
    parser.add_argument("--compiled-batches", nargs="+", type=int, default=[4], help="compiled cells")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-zoo", action="store_true")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    revs = {name: subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True,
                                 capture_output=True, text=True).stdout.strip()
            for name, rev in (("before", args.before), ("after", args.after))}
    srcs = {name: _checkout(rev, args.out) for name, rev in revs.items()}
    for mode, batches in (("eager", args.batches), ("compiled", args.compiled_batches)):
        for model in args.models:
            for batch in batches:
                for name, src in srcs.items():
                    _cell(src, args.out / name / mode / f"{model}-b{batch}.json", model, batch, mode, args.repeats)
    if not args.no_zoo:
        for name, src in srcs.items():
            if not (args.out / name / "zoo.json").exists():
                _run(src, ["-m", "excitation", "zoo", "--no-progress", "--out", str(args.out / name / "zoo.md"),
                           "--json", str(args.out / name / "zoo.json")])

    from excitation.bench import cpu_model  # the machine, named as every other table names it

    import torch

    lines = [f"{cpu_model()}, torch {torch.__version__}, {datetime.date.today()}; before = {revs['before']}, "
             f"after = {revs['after']}; ratios to vanilla in the same process (compiled: to compiled vanilla).", "",
             "| cell | before | after | after - before |", "|---|---|---|---|"]
    for mode, rows in ROWS.items():
        for row in rows:
            before, after = (_ratios(args.out / name / mode, row) for name in ("before", "after"))
            for cell in before:
                b, a = before[cell], after.get(cell)
                if b is not None and a is not None:
                    lines.append(f"| {cell} {row} | {b:.3f} | {a:.3f} | {a - b:+.3f} |")
    if not args.no_zoo:
        zoo = {name: {r["model"]: r.get("time_ratio") for r in json.loads((args.out / name / "zoo.json").read_text())}
               for name in ("before", "after")}
        diffs = sorted((zoo["after"][m] - zoo["before"][m], m) for m in zoo["before"]
                       if zoo["before"].get(m) and zoo["after"].get(m))
        if diffs:
            median = diffs[len(diffs) // 2][0]
            lines += ["", f"torchvision zoo, {len(diffs)} models: time ratio after - before, median {median:+.3f}, "
                          f"range {diffs[0][0]:+.3f} ({diffs[0][1]}) to {diffs[-1][0]:+.3f} ({diffs[-1][1]})"]
    text = "\n".join(lines) + "\n"
    (args.out / "comparison.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
