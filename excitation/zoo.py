"""The zoo check: excite every torchvision classifier and record what happened.

For each model (random weights, eval mode, a small input it accepts) one
:class:`ZooRow`: how it was traced, the sites rewritten by kind, the sites left
alone, whether the forward is bit-identical (with and without autograd, since
some modules such as ``nn.MultiheadAttention`` take a different path when grad
is needed), whether the pullback is finite, its relative difference from the
vanilla gradient, and pullback time / vanilla time (medians, interleaved).

    excitation zoo --out docs/zoo.md            # all 80 models, about 4 min on 2 CPU cores
    excitation zoo --models resnet18 vit_b_16   # a few

Where ``torch.fx.symbolic_trace`` fails, the model is run through the
``torch.compile`` backend instead (``traced = "dynamo"``).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from .api import gradient, pullback
from .bench import cpu_model
from .errors import ExcitationTraceError
from .fxpass.backend import backend
from .fxpass.rewrite import excite, report

__all__ = [
    "ZooRow", "zoo_models", "input_size", "randomise_zero_heads", "check_model", "run_zoo", "format_zoo_table",
    "rows_to_json",
    "compare_with_gradient",
]

# Models whose input size is fixed by their architecture (position embeddings, partitions).
_FIXED_SIZE = {"maxvit_t": 224}
_MIN_SIZE = {"inception_v3": 96}  # needs >= 75 pixels
_DEFAULT_SIZE = 64


def zoo_models() -> List[str]:
    """All torchvision classification models: ``torchvision.models.list_models(module=torchvision.models)``."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def input_size(name: str) -> int:
    """The small square input side this check uses for ``name``."""
    if name.startswith("vit_"):
        return 224
    return _FIXED_SIZE.get(name, _MIN_SIZE.get(name, _DEFAULT_SIZE))


@dataclass
class ZooRow:
    """One model's result.  ``rel_diff`` is ``||pullback - gradient|| / ||gradient||``."""

    model: str
    size: int
    params_m: float
    traced: str  # "fx", "dynamo" or "no: <reason>"
    sites: Dict[str, int] = field(default_factory=dict)
    unhandled: Dict[str, int] = field(default_factory=dict)
    smooth: Dict[str, int] = field(default_factory=dict)
    forward_identical: Optional[bool] = None
    finite: Optional[bool] = None
    rel_diff: Optional[float] = None
    time_ratio: Optional[float] = None
    seconds: float = 0.0
    error: str = ""


def randomise_zero_heads(model: nn.Module, seed: int) -> None:
    """Give zero-initialised linear layers (ViT's head) small random weights.

    With a zero head every input gradient is exactly 0 and the comparison is empty.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and not module.weight.any():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.01)


def seconds_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    """Wall seconds per call of ``fn``, averaged over ``calls`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


#: Each timed round lasts at least this long (several calls of a small model), so that one
#: preempted call or page-faulting allocation does not decide a ratio: with one call per round a
#: small batch-1 model's ratio moved far beyond the noise between two runs a minute apart
#: (measured in docs/design-measurements.md).
_MIN_ROUND_SECONDS = 0.03


def check_model(
    model: nn.Module, x: torch.Tensor, *, name: str = "model", target: Optional[int] = None, repeats: int = 3,
    **excite_options,
) -> ZooRow:
    """Excite ``model`` (fx, or the dynamo backend if fx cannot trace it) and check it on ``x``.

    ``target`` defaults to the class the model predicts for ``x[0]``: with random
    weights a final ReLU (SqueezeNet) can zero other logits, and their gradients.
    """
    start = time.perf_counter()
    model = model.eval()
    row = ZooRow(model=name, size=int(x.shape[-1]), params_m=sum(p.numel() for p in model.parameters()) / 1e6,
                 traced="fx")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            excited = excite(model, **excite_options)
        result = report(excited)
        run: Callable[[torch.Tensor], torch.Tensor] = excited
    except ExcitationTraceError as exc:
        row.traced = "dynamo"
        row.error = f"fx: {str(exc).splitlines()[0][:160]}"
        compiler = backend(inner="eager", **excite_options)
        run = torch.compile(model, backend=compiler)
        result = None
    with torch.no_grad():
        expected = model(x)
        same = torch.equal(run(x), expected)
    if target is None:
        target = int(expected[0].argmax())
    grad_x = x.clone().requires_grad_(True)
    same = same and torch.equal(run(grad_x).detach(), model(grad_x).detach())
    row.forward_identical = bool(same)
    if result is None:  # dynamo: reports arrive per compiled graph
        reports = compiler.reports
        kinds: Dict[str, int] = {}
        for part in reports:
            for kind, n in part.counts().items():
                kinds[kind] = kinds.get(kind, 0) + n
        row.sites = {k: v for k, v in kinds.items() if v}
        row.unhandled = _merge(part.unhandled_counts() for part in reports)
        row.smooth = _merge({u.op: 1 for u in part.smooth} for part in reports)
    else:
        row.sites = {k: v for k, v in result.counts().items() if v}
        row.unhandled = result.unhandled_counts()
        row.smooth = _merge([{u.op: 1} for u in result.smooth])
    def ours_call() -> torch.Tensor:
        return pullback(run, x, target) if result is not None else _input_grad(run, x, target)

    row.finite, row.rel_diff, row.time_ratio = compare_with_gradient(ours_call, lambda: gradient(model, x, target),
                                                                     repeats)
    row.seconds = time.perf_counter() - start
    return row


def compare_with_gradient(ours: Callable[[], torch.Tensor], vanilla: Callable[[], torch.Tensor],
                          repeats: int) -> Tuple[bool, float, float]:
    """``(finite, rel. diff, time ratio)`` of a pullback call against the gradient call, as every zoo reports them.

    The relative difference is ``||pullback - gradient|| / ||gradient||`` (NaN for a zero gradient);
    the time ratio is the median of interleaved rounds, each at least :data:`_MIN_ROUND_SECONDS` long.
    """
    pulled, plain = ours(), vanilla()
    finite = bool(torch.isfinite(pulled).all())
    norm = float(plain.norm())
    rel_diff = float((pulled - plain).norm()) / norm if norm > 0 else math.nan
    calls = max(1, min(64, math.ceil(_MIN_ROUND_SECONDS / max(seconds_per_call(vanilla), 1e-6))))
    ours_t, vanilla_t = [], []
    for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
        vanilla_t.append(seconds_per_call(vanilla, calls))
        ours_t.append(seconds_per_call(ours, calls))
    return finite, rel_diff, statistics.median(ours_t) / statistics.median(vanilla_t)


def _input_grad(run: Callable, x: torch.Tensor, target: int) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(run(x)[:, target].sum(), x)[0]


def _merge(counts: Iterable[Dict[str, int]]) -> Dict[str, int]:
    merged: Dict[str, int] = {}
    for part in counts:
        for key, n in part.items():
            merged[key] = merged.get(key, 0) + n
    return merged


def run_zoo(
    names: Optional[List[str]] = None, *, batch: int = 1, repeats: int = 3, seed: int = 0, progress: bool = True,
    on_row: Optional[Callable[[ZooRow], None]] = None,
) -> List[ZooRow]:
    """Check every model in ``names`` (default: :func:`zoo_models`); failures become rows, not exceptions."""
    import torchvision

    names = zoo_models() if names is None else list(names)
    unknown = sorted(set(names) - set(zoo_models()))
    if unknown:
        raise ValueError(f"not torchvision classification models: {unknown}; see torchvision.models.list_models().")
    iterator: Iterable[str] = names
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(names, desc="zoo", unit="model")
    rows = []
    for name in iterator:
        if progress:
            iterator.set_postfix_str(name)  # type: ignore[attr-defined]
        torch.manual_seed(seed)
        size = input_size(name)
        model = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torchvision's init-weights FutureWarnings
                model = torchvision.models.get_model(name, weights=None)
            randomise_zero_heads(model, seed)
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
            row = check_model(model, x, name=name, repeats=repeats)
        except Exception as exc:  # a row per model, whatever happens
            row = ZooRow(model=name, size=size, params_m=math.nan, traced="no", error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        if on_row is not None:
            on_row(row)
        del model
    return rows


def _yes(value: Optional[bool]) -> str:
    return "?" if value is None else ("yes" if value else "**no**")


def format_zoo_table(rows: List[ZooRow], *, title: bool = True) -> str:
    """A Markdown table of ``rows`` with a summary line (and the machine and date)."""
    lines = []
    if title:
        traced = sum(r.traced in ("fx", "dynamo") for r in rows)
        identical = sum(bool(r.forward_identical) for r in rows)
        finite = sum(bool(r.finite) for r in rows)
        unhandled = sum(sum(r.unhandled.values()) for r in rows)
        ratios = [r.time_ratio for r in rows if r.time_ratio is not None]
        lines += [
            f"{len(rows)} models, {date.today().isoformat()}, torch {torch.__version__}, "
            f"{cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads, batch 1, random weights, eval mode.",
            "",
            f"**traced {traced}/{len(rows)} · forward bit-identical {identical}/{len(rows)} · "
            f"pullback finite {finite}/{len(rows)} · unhandled activation sites {unhandled}**"
            + (f" · time ratio median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})"
               if ratios else ""),
            "",
        ]
    lines += [
        "| model | input | params (M) | traced | sites rewritten | unhandled | smooth (vanilla) | forward identical "
        "| finite | rel. diff | time / vanilla |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sites = ", ".join(f"{k} {v}" for k, v in r.sites.items()) or "-"
        unhandled = ", ".join(f"{k} {v}" for k, v in r.unhandled.items()) or "0"
        smooth = ", ".join(f"{k} {v}" for k, v in r.smooth.items()) or "-"
        traced = r.traced if not r.error or r.traced == "fx" else f"{r.traced} ({r.error[:80]})"
        diff = "-" if r.rel_diff is None else f"{r.rel_diff:.3f}"
        ratio = "-" if r.time_ratio is None else f"{r.time_ratio:.2f}"
        lines.append(
            f"| {r.model} | {r.size} | {r.params_m:.1f} | {traced} | {sites} | {unhandled} | {smooth} | "
            f"{_yes(r.forward_identical)} | {_yes(r.finite)} | {diff} | {ratio} |"
        )
    return "\n".join(lines)


def rows_to_json(rows: List[ZooRow]) -> str:
    """The rows as a JSON list of objects (the fields of :class:`ZooRow`)."""
    return json.dumps([asdict(r) for r in rows], indent=1)
