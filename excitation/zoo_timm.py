"""``excitation zoo-timm``: every timm model module through the public API, in one table.

One row per timm model module (its smallest model by parameter count, or every model
with ``--all``), random weights, batch 1.  Each row goes through :func:`excitation.pullback`
itself, so a module that ``torch.fx`` cannot trace takes the automatic dynamo path, and the
``path`` column says which.  Zero-initialised layers (classifier heads) are re-initialised
first, since with them every gradient is exactly 0; the ``re-init`` column names them.
timm is imported lazily: it is a test / tooling dependency, not a runtime one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from .bench import cpu_model
from .zoo import compare_with_gradient, seconds_per_call

__all__ = ["TimmRow", "smallest_per_module", "reinit_zero_weights", "check_timm_model", "run_timm_zoo",
           "format_timm_table", "add_parser", "run"]


@dataclass
class TimmRow:
    """One timm model's result.  ``rel_diff`` is ``||pullback - gradient|| / ||gradient||``."""

    module: str
    model: str
    size: int
    params_m: float = math.nan
    path: str = "?"  # "fx" or "dynamo"
    sites: Dict[str, int] = field(default_factory=dict)
    unhandled: Dict[str, int] = field(default_factory=dict)
    forward_identical: Optional[bool] = None
    finite: Optional[bool] = None
    rel_diff: Optional[float] = None
    first_call_s: Optional[float] = None
    time_ratio: Optional[float] = None
    reinit: List[str] = field(default_factory=list)
    error: str = ""


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ImportError("the timm zoo needs timm: pip install timm (or pip install -e .[dev]).") from None
    return timm


def _param_count(name: str) -> int:
    timm = _timm()
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


# Size words in timm's model names, smallest first ("efficientvit_m0", "levit_128s" carry digits).
_SIZE_WORDS = ["atto", "femto", "pico", "nano", "xxxs", "xxs", "xs", "mini", "tiny", "t0", "m0", "b0", "s0", "small",
               "lite0", "light", "t", "s"]


def _size_rank(name: str) -> tuple:
    tokens = name.replace("-", "_").replace(".", "_").split("_")
    for rank, word in enumerate(_SIZE_WORDS):
        if any(token == word or token.startswith(word) and word not in ("t", "s") for token in tokens):
            return (rank, len(name), name)
    return (len(_SIZE_WORDS), len(name), name)


def smallest_per_module(modules: Optional[List[str]] = None, progress: bool = True, exact: bool = False) -> Dict[str, str]:
    """``{timm model module: its smallest model}``.

    By default the smallest by name (size words such as ``atto``, ``tiny``, ``small``, then the
    shortest name): building all 1371 models just to count their parameters takes ~10 minutes
    on two CPU cores.  ``exact=True`` counts the parameters on the meta device instead.
    """
    timm = _timm()
    modules = sorted(timm.list_modules()) if modules is None else modules
    chosen: Dict[str, str] = {}
    iterator: Any = modules
    if progress and exact:
        from tqdm.auto import tqdm

        iterator = tqdm(modules, desc="sizing", unit="module", leave=False)
    for module in iterator:
        names = timm.list_models(module=module)
        if not names:
            continue
        if not exact:
            chosen[module] = min(names, key=_size_rank)
            continue
        best, best_n = None, None
        for name in names:
            try:
                n = _param_count(name)
            except Exception:  # noqa: BLE001 - a model that cannot be built is not a candidate
                continue
            if best_n is None or n < best_n:
                best, best_n = name, n
        if best is not None:
            chosen[module] = best
    return chosen


def reinit_zero_weights(model: nn.Module, seed: int = 0) -> List[str]:
    """Give every all-zero Linear / Conv weight small random values; return their names.

    timm (and torchvision's ViT) zero-initialise some classifier heads: with random weights
    elsewhere every input gradient is then exactly 0 and a pullback-vs-gradient check is empty.
    """
    generator = torch.Generator().manual_seed(seed)
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)) and weight is not None and not weight.any():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
                names.append(name)
    return names


def check_timm_model(model: nn.Module, x: torch.Tensor, *, module: str, name: str, repeats: int = 1,
                     seed: int = 0) -> TimmRow:
    """Check one model through the public API (:func:`excitation.pullback`, fx or automatic dynamo)."""
    from . import api

    model = model.eval()
    row = TimmRow(module=module, model=name, size=int(x.shape[-1]),
                  params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    row.reinit = reinit_zero_weights(model, seed)
    with torch.no_grad():
        expected = model(x)
    target = int(expected[0].argmax())
    row.first_call_s = seconds_per_call(lambda: api.pullback(model, x, target))
    prepared = api.prepare(model)
    row.path = api.path_of(prepared)
    result = prepared.report() if row.path == "dynamo" else __import__("excitation").report(prepared)
    row.sites = {k: v for k, v in result.counts().items() if v}
    row.unhandled = result.unhandled_counts()
    with torch.no_grad():
        row.forward_identical = bool(torch.equal(prepared(x), expected))
    row.finite, row.rel_diff, row.time_ratio = compare_with_gradient(
        lambda: api.pullback(model, x, target), lambda: api.gradient(model, x, target), repeats)
    return row


def run_timm_zoo(
    names: Dict[str, List[str]], *, size: Optional[int] = None, repeats: int = 1, seed: int = 0,
    budget_s: Optional[float] = None, progress: bool = True, on_row: Optional[Callable[[TimmRow], None]] = None,
) -> List[TimmRow]:
    """Check ``{module: [model names]}``; a failure becomes a row.  Stops starting models after ``budget_s``."""
    timm = _timm()
    from . import api

    work = [(module, name) for module, models in names.items() for name in models]
    iterator: Any = work
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(work, desc="zoo timm", unit="model")
    rows: List[TimmRow] = []
    start = time.perf_counter()
    for module, name in iterator:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            rows.append(TimmRow(module=module, model=name, size=0, error=f"not run: the {budget_s:.0f} s budget was spent"))
            continue
        torch.manual_seed(seed)
        side = size or 0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kwargs = {"img_size": size} if size else {}
                try:
                    model = timm.create_model(name, pretrained=False, **kwargs)
                except TypeError:  # the architecture fixes its input size
                    kwargs = {}
                    model = timm.create_model(name, pretrained=False)
                cfg_side = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
                side = size if kwargs else cfg_side
                x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(seed))
                try:
                    row = check_timm_model(model, x, module=module, name=name, repeats=repeats, seed=seed)
                except Exception:
                    if side == cfg_side:
                        raise
                    # Some models take img_size yet break at it (crossvit's two patch grids must
                    # agree): build the model afresh at its own size rather than report a failure.
                    api.clear_cache()
                    torch.manual_seed(seed)
                    model = timm.create_model(name, pretrained=False)
                    side = cfg_side = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
                    x = torch.rand(1, 3, cfg_side, cfg_side, generator=torch.Generator().manual_seed(seed))
                    row = check_timm_model(model, x, module=module, name=name, repeats=repeats, seed=seed)
        except Exception as exc:  # noqa: BLE001 - one row per model, whatever happens
            row = TimmRow(module=module, model=name, size=side, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        if on_row is not None:
            on_row(row)
        api.clear_cache()
        torch._dynamo.reset()  # each model's graphs are its own; keep dynamo's caches small
    return rows


def _yes(value: Optional[bool]) -> str:
    return "?" if value is None else ("yes" if value else "**no**")


def format_timm_table(rows: List[TimmRow]) -> str:
    """A Markdown page body: summary line, then one row per model."""
    ran = [r for r in rows if not r.error]
    finite = sum(bool(r.finite) for r in ran)
    identical = sum(bool(r.forward_identical) for r in ran)
    unhandled = sum(sum(r.unhandled.values()) for r in ran)
    dynamo = sum(r.path == "dynamo" for r in ran)
    ratios = [r.time_ratio for r in ran if r.time_ratio is not None]
    lines = [
        f"{len(rows)} models, {date.today().isoformat()}, torch {torch.__version__}, timm {_timm().__version__}, "
        f"{cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads, batch 1, random "
        f"weights, eval mode.",
        "",
        f"**ran {len(ran)}/{len(rows)} · pullback finite {finite}/{len(rows)} · forward bit-identical "
        f"{identical}/{len(rows)} · dynamo path {dynamo} · unhandled activation sites {unhandled}**"
        + (f" · steady-state time / vanilla median {statistics.median(ratios):.2f}" if ratios else ""),
        "",
        "| module | model | input | params (M) | path | sites rewritten | unhandled | forward identical | finite "
        "| rel. diff | first call (s) | time / vanilla | re-init (zero weights) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.module} | {r.model} | {r.size or '-'} | - | - | {r.error[:120]} | - | - | - | - | - | - | - |")
            continue
        sites = ", ".join(f"{k} {v}" for k, v in r.sites.items()) or "-"
        left = ", ".join(f"{k} {v}" for k, v in r.unhandled.items()) or "0"
        diff = "-" if r.rel_diff is None or math.isnan(r.rel_diff) else f"{r.rel_diff:.3f}"
        lines.append(
            f"| {r.module} | {r.model} | {r.size} | {r.params_m:.1f} | {r.path} | {sites} | {left} | "
            f"{_yes(r.forward_identical)} | {_yes(r.finite)} | {diff} | {r.first_call_s:.1f} | "
            f"{r.time_ratio:.2f} | {', '.join(r.reinit) or '-'} |"
        )
    return "\n".join(lines)


def add_timm_options(p: argparse.ArgumentParser, *, repeats_default: Optional[int] = 1) -> None:
    """The timm zoo's options, shared by ``zoo-timm`` and ``zoo --source timm``."""
    p.add_argument("--modules", nargs="+", help="timm model modules (default: all of timm.list_modules())")
    p.add_argument("--all", action="store_true", help="every model of each module, not only the smallest")
    p.add_argument("--size", type=int, help="input side for models that accept img_size (default: each model's own)")
    p.add_argument("--budget", type=float, help="seconds after which no new model is started (rows say so)")
    if repeats_default is not None:
        p.add_argument("--repeats", type=int, default=repeats_default,
                       help="timed rounds per model (interleaved with vanilla)")


def add_parser(sub: Any) -> None:
    """Register ``excitation zoo-timm`` on the CLI's subparsers (``excitation zoo --source timm`` runs the same)."""
    p = sub.add_parser("zoo-timm", help="every timm model module through excitation.pullback (fx or dynamo path)",
                       description=__doc__.splitlines()[0] + " Same as `excitation zoo --source timm`.")
    add_timm_options(p)
    p.add_argument("--out", help="also write the table as a Markdown page, e.g. docs/zoo-timm.md")
    p.add_argument("--json", help="also write the rows as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``zoo-timm`` command."""
    timm = _timm()
    modules = args.modules or sorted(timm.list_modules())
    unknown = sorted(set(modules) - set(timm.list_modules()))
    if unknown:
        raise ValueError(f"not timm model modules: {unknown}; see timm.list_modules().")
    if args.all:
        names = {m: timm.list_models(module=m) for m in modules}
    else:
        names = {m: [n] for m, n in smallest_per_module(modules, progress=not args.no_progress).items()}
    done: List[TimmRow] = []

    def write(rows: List[TimmRow]) -> None:
        if args.out:
            Path(args.out).write_text("# The timm zoo\n\nMade by `excitation zoo --source timm`"
                                      + (f" --size {args.size}" if args.size else "") + ".\n\n"
                                      + format_timm_table(rows) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))

    def on_row(row: TimmRow) -> None:  # written as it goes: a killed run keeps its rows
        done.append(row)
        write(done)

    rows = run_timm_zoo(names, size=args.size, repeats=args.repeats, budget_s=args.budget,
                        progress=not args.no_progress, on_row=on_row)
    write(rows)
    print(format_timm_table(rows))
    return 0
