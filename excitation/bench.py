"""Benchmarks behind ``excitation bench``: pullback cost against the vanilla gradient and against peers, in one process.

Every method computes the input gradient of one class logit per image for the
same model, batch and device; timings are interleaved round by round (so drift
and noise hit every method alike) and reported as median and p20-p80 spread.
Memory is the autograd *saved-tensor* footprint of one forward (unique
storages) on CPU, and the peak allocated memory on CUDA.  The last column says
whether each method's result equals our pullback (relative L2 <= 1e-4).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .fxpass.backend import backend
from .fxpass.rewrite import excite

__all__ = ["BenchRow", "BenchResult", "run_bench", "format_table"]

EQUAL_TOL = 1e-4


@dataclass
class BenchRow:
    method: str
    ms_median: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    images_per_s: Optional[float] = None
    ratio: Optional[float] = None  # to the vanilla row of the same mode (eager or compiled)
    memory_mb: Optional[float] = None
    memory_ratio: Optional[float] = None
    rel_diff_to_ours: Optional[float] = None
    equals_ours: Optional[bool] = None
    note: str = ""


@dataclass
class BenchResult:
    model: str
    batch: int
    size: int
    device: str
    temp: float
    torch_version: str
    date: str
    machine: str
    memory_kind: str
    rows: List[BenchRow] = field(default_factory=list)
    tf32: Optional[bool] = None  # CUDA only: whether cuDNN ran float32 convolutions in TF32
    #: CPU only: one-thread times with flush-to-zero off and on (see :func:`_flush_cost`).
    flush_to_zero: Optional[Dict[str, object]] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class _SoftReLUFunction(torch.autograd.Function):
    """The paper-style surrogate: a straightforward autograd.Function (three-pass backward)."""

    @staticmethod
    def forward(ctx, z: Tensor, temp: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.temp = temp
        return torch.relu(z)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (z,) = ctx.saved_tensors
        return grad * torch.sigmoid(z / ctx.temp), None


class _SoftReLU(nn.Module):
    def __init__(self, temp: float) -> None:
        super().__init__()
        self.temp = temp

    def forward(self, z: Tensor) -> Tensor:
        return _SoftReLUFunction.apply(z, self.temp)


def _swap_relus(model: nn.Module, temp: float) -> nn.Module:
    swapped = copy.deepcopy(model)
    for module in swapped.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, _SoftReLU(temp))
    return swapped


def cpu_model() -> str:
    """The CPU as ``lscpu`` names it, with what tells machines of one name apart.

    ``"AMD EPYC (family 25 model 1, AVX2)"``: cloud VMs report a bare "AMD EPYC" for Zen 3
    and Zen 4 alike, and the vector width torch's kernels (and ours) run at is what moves the
    ratios (``torch.backends.cpu.get_cpu_capability()``: AVX2, AVX512, ...).
    """
    import platform

    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if not line.strip():
                    break  # the first processor is enough
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    detail.append(torch.backends.cpu.get_cpu_capability())
    return f"{name} ({', '.join(detail)})"


def _machine() -> str:
    import os

    return f"{cpu_model()}, {os.cpu_count()} cores"


def _input_gradient(module: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    leaf = x.detach().requires_grad_(True)
    out = module(leaf)
    (grad,) = torch.autograd.grad(out.gather(1, target[:, None]).sum(), leaf)
    return grad


def _methods(model: nn.Module, model_name: str, temp: float, compile_: bool, peers: bool) -> Dict[str, Callable]:
    """name -> callable(x, target) -> input gradient; names starting 'vanilla' are baselines."""
    excited = excite(model, temp=temp)
    # The unfused rows show what BatchNorm -> ReLU fusion buys, and the compact gates that
    # serve ReLUs with no BatchNorm before them (fused sites are always exact).
    unfused = {saved: excite(model, temp=temp, saved=saved, fuse=False) for saved in ("exact", "bfloat16", "uint8")}
    methods: Dict[str, Callable] = {
        "vanilla gradient": lambda x, t: _input_gradient(model, x, t),
        "excitation (ours)": lambda x, t: _input_gradient(excited, x, t),
        "excitation (ours), unfused": lambda x, t: _input_gradient(unfused["exact"], x, t),
        "excitation (ours), unfused, bfloat16 saved gate": lambda x, t: _input_gradient(unfused["bfloat16"], x, t),
        "excitation (ours), unfused, uint8 saved gate": lambda x, t: _input_gradient(unfused["uint8"], x, t),
        "paper-style: nn.ReLU -> autograd.Function": (lambda swapped: lambda x, t: _input_gradient(swapped, x, t))(
            _swap_relus(model, temp)
        ),
    }
    if compile_:
        compiled_vanilla = torch.compile(model)
        compiled_ours = torch.compile(excited)
        methods["vanilla gradient, compiled"] = lambda x, t: _input_gradient(compiled_vanilla, x, t)
        methods["excitation (ours), compiled"] = lambda x, t: _input_gradient(compiled_ours, x, t)
        # The other way to compile a pullback: the backend excites the graphs dynamo captures.
        compiled_backend = torch.compile(model, backend=backend(temp=temp))
        methods['excitation (ours), backend="excitation", compiled'] = lambda x, t: _input_gradient(compiled_backend, x, t)
        # Compiled, the exact default keeps z in place of relu(z); a compact gate comes on top of relu(z).
        compiled_compact = torch.compile(unfused["uint8"])
        methods["excitation (ours), unfused, uint8 saved gate, compiled"] = (
            lambda x, t: _input_gradient(compiled_compact, x, t)
        )
    if not peers:
        return methods
    try:
        from zennit.composites import BetaSmooth
        from zennit.torchvision import ResNetCanonizer
    except ImportError:
        methods["zennit BetaSmooth"] = None  # reported as skipped
    else:
        canonizers = [ResNetCanonizer()] if model_name.startswith(("resnet", "resnext", "wide_resnet")) else []
        composite = BetaSmooth(beta_smooth=1.0 / temp, canonizers=canonizers)

        def zennit_grad(x, t):
            with composite.context(model) as modified:
                return _input_gradient(modified, x, t)

        methods["zennit BetaSmooth"] = zennit_grad
    try:
        from captum.attr import GuidedBackprop
    except ImportError:
        methods["captum GuidedBackprop"] = None
    else:
        guided = GuidedBackprop(model)
        methods["captum GuidedBackprop"] = lambda x, t: guided.attribute(x.detach().requires_grad_(True), target=t)
    return methods


def _saved_bytes(fn: Callable, x: Tensor, target: Tensor) -> int:
    """Bytes of the unique storages autograd saves for backward during one call."""
    storages: Dict[int, int] = {}

    def pack(tensor: Tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, target)
    return sum(storages.values())


def run_bench(
    model_name: str = "resnet50",
    *,
    batch: int = 8,
    size: int = 224,
    device: str = "cpu",
    compile_: bool = False,
    temp: float = 0.3,
    repeats: int = 10,
    warmup: int = 2,
    peers: bool = True,
    progress: bool = True,
    model: Optional[nn.Module] = None,
    flush_to_zero: bool = True,
    only: Optional[List[str]] = None,
) -> BenchResult:
    """Measure every method on one torchvision model (random weights, eval, frozen parameters).

    On the CPU, ``flush_to_zero=True`` adds the cost of subnormal floats on this machine: vanilla,
    ours and the paper-style surrogate on one thread with flush-to-zero off and on (batch <= 2).
    ``only`` restricts the timed methods to these names (the vanilla baselines always run).
    """
    import torchvision

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA device.")
    if model is None:
        if model_name not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"--model {model_name!r} is not a torchvision classification model.")
        kwargs = {"aux_logits": False, "init_weights": True} if model_name in ("googlenet", "inception_v3") else {}
        torch.manual_seed(0)
        model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    model = model.eval().to(dev)
    for param in model.parameters():
        param.requires_grad_(False)  # input gradients only, as users of attribution run it
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=generator).to(dev)
    target = torch.randint(0, 1000, (batch,), generator=generator).to(dev)
    methods = _methods(model, model_name, temp, compile_, peers)
    flush_methods = dict(methods)
    if only is not None:
        unknown = sorted(set(only) - set(methods))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(methods)}")
        methods = {name: fn for name, fn in methods.items() if name in only or name.startswith("vanilla gradient")}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    rows = {name: BenchRow(name) for name in methods}
    live = {}
    results = {}
    for name, fn in methods.items():
        if fn is None:
            rows[name].note = "not installed (pip install -e '.[bench]')"
            continue
        try:
            for _ in range(max(1, warmup)):
                results[name] = fn(x, target)
            sync()
            live[name] = fn
        except Exception as exc:  # a peer that crashes on this model is a result, not a bench failure
            rows[name].note = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    times: Dict[str, List[float]] = {name: [] for name in live}
    rounds = range(repeats)
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc=f"bench {model_name} b{batch} {device}", unit="round", leave=False)
    for _ in rounds:
        for name, fn in live.items():  # interleaved: every method sees the same machine state
            sync()
            start = time.perf_counter()
            fn(x, target)
            sync()
            times[name].append(time.perf_counter() - start)
    ours = results.get("excitation (ours)")
    for name, fn in live.items():
        row = rows[name]
        samples = sorted(times[name])
        row.ms_median = 1e3 * statistics.median(samples)
        row.ms_p20 = 1e3 * samples[int(0.2 * (len(samples) - 1))]
        row.ms_p80 = 1e3 * samples[int(round(0.8 * (len(samples) - 1)))]
        row.images_per_s = batch / (row.ms_median / 1e3)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(x, target)
            row.memory_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            row.memory_mb = _saved_bytes(fn, x, target) / 2**20
        if ours is not None:
            diff = float((results[name].double() - ours.double()).norm() / ours.double().norm())
            row.rel_diff_to_ours = diff
            row.equals_ours = diff <= EQUAL_TOL
    for name, row in rows.items():
        base_name = "vanilla gradient, compiled" if name.endswith("compiled") else "vanilla gradient"
        base = rows.get(base_name)
        if row.ms_median is not None and base is not None and base.ms_median:
            row.ratio = row.ms_median / base.ms_median
            if base.memory_mb:
                row.memory_ratio = row.memory_mb / base.memory_mb
    flush = _flush_cost(flush_methods, x, target, repeats) if flush_to_zero and dev.type == "cpu" else None
    return BenchResult(
        flush_to_zero=flush, model=model_name, batch=batch, size=size, device=str(dev), temp=temp, torch_version=torch.__version__,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"), machine=_machine() if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        memory_kind="autograd saved tensors" if dev.type == "cpu" else "peak CUDA allocation", rows=list(rows.values()),
        tf32=bool(torch.backends.cudnn.allow_tf32) if dev.type == "cuda" else None,
    )


#: The methods of the flush-to-zero footnote: the baseline, ours, and the surrogate that underflows.
FLUSH_METHODS = ("vanilla gradient", "excitation (ours)", "paper-style: nn.ReLU -> autograd.Function")


def _flush_cost(methods: Dict[str, Callable], x: Tensor, target: Tensor, repeats: int) -> Dict[str, object]:
    """One thread, flush-to-zero off and on, for :data:`FLUSH_METHODS` (batch <= 2 to bound the time)."""
    from .subnormals import flush_to_zero_cost

    xs, ts = x[:2], target[:2]
    chosen = {name: (lambda fn: lambda: fn(xs, ts))(methods[name]) for name in FLUSH_METHODS if methods.get(name)}
    cost = flush_to_zero_cost(chosen, rounds=max(2, min(5, repeats // 3)))
    return {"batch": int(xs.shape[0]), "rounds": cost.rounds, "supported": cost.supported,
            "ms_off": cost.ms_off, "ms_on": cost.ms_on, "subnormals": cost.subnormals}


def format_flush_note(flush: Dict[str, object]) -> List[str]:
    """The footnote: what subnormal floats cost on this CPU, per method, as ratios to vanilla."""
    ms_off, ms_on, subnormals = flush["ms_off"], flush["ms_on"], flush["subnormals"]
    base = "vanilla gradient"
    lines = ["", f"Subnormal floats on this CPU (one thread, batch {flush['batch']}, {flush['rounds']} interleaved rounds; "
                 "flush-to-zero reaches only the calling thread, so it is a diagnosis, not a setting to rely on):", "",
             "| method | subnormal outputs / call | time / vanilla, FTZ off | time / vanilla, FTZ on |", "|---|---|---|---|"]
    for name in ms_off:
        on = f"{ms_on[name] / ms_on[base]:.3f}" if ms_on else "– (no FTZ on this CPU)"
        lines.append(f"| {name} | {subnormals[name]} | {ms_off[name] / ms_off[base]:.3f} | {on} |")
    return lines


def format_table(result: BenchResult) -> str:
    """A Markdown table of one run, with its conditions in a header line."""
    head = (f"{result.model}, batch {result.batch}, {result.size}x{result.size}, {result.device} ({result.machine}), "
            f"torch {result.torch_version}, {result.date}; memory = {result.memory_kind}")
    lines = [head, "",
             "| method | ms / batch (median, p20-p80) | images/s | time / vanilla | memory MiB | memory / vanilla | equals our pullback |",
             "|---|---|---|---|---|---|---|"]
    lines += _rows(result)
    if result.tf32:
        lines += ["", TF32_NOTE]
    if result.flush_to_zero:
        lines += format_flush_note(result.flush_to_zero)
    return "\n".join(lines)


#: Why compiled rows on CUDA may say "no": cuDNN's TF32 convolutions (docs/performance/nvidia-h200.md).
TF32_NOTE = (
    "cuDNN ran float32 convolutions in TF32 (PyTorch's default), so programs with different kernel choices "
    "differ beyond float32 rounding: compiled vs eager differ by ~1 % for the pullback and ~10 % for the vanilla "
    "gradient of a random-weight resnet50; with torch.backends.cudnn.allow_tf32 = False they agree to ~2e-5."
)


def _rows(result: BenchResult) -> List[str]:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)
    lines = []
    for row in result.rows:
        if row.ms_median is None:
            lines.append(f"| {row.method} | {row.note} | | | | | |")
            continue
        equal = "–" if row.equals_ours is None else ("yes" if row.equals_ours else f"no (rel. diff {row.rel_diff_to_ours:.2g})")
        lines.append(
            f"| {row.method} | {row.ms_median:.1f} ({row.ms_p20:.1f}–{row.ms_p80:.1f}) | {row.images_per_s:.1f} | "
            f"{fmt(row.ratio, '.3f')} | {row.memory_mb:.0f} | {fmt(row.memory_ratio, '.3f')} | {equal} |"
        )
    return lines
