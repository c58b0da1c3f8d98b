"""The C kernels of ``csrc/excitation_cpu.c``: built at first use, cached, loaded with ctypes, optional.

Why C on the CPU.  The plain-torch paths (:mod:`.torch_paths`) need about nine
elementwise passes per window offset for the soft-pool backward, against one scatter for
vanilla max-pool; pool-heavy models (googlenet, squeezenet) paid 1.4-2x for it.  One C
loop over each output row does the same work in cache, and the ReLU gate's three torch
passes (floor, ``softplus_backward``, flush) become one.

How it is built.  Like a JIT torch extension: the first call compiles the one C file with
the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native``; about a second, no
torch headers) into a cache folder keyed by the source, the flags, the compiler's version
and this CPU's model and flags (``$EXCITATION_CACHE_DIR``, else
``~/.cache/excitation/native``), writing to a temporary name and renaming, so concurrent
processes (torchrun ranks) never load a half-written library.  Where no compiler is
present, the build fails, or ``EXCITATION_NATIVE=0`` is set, every caller falls back to
the torch paths, which compute the same contract; :func:`status` says which and why.

Threads.  Where torch's parallel backend is OpenMP (Linux wheels), the library is built
with ``-fopenmp`` and its parallel regions run on the thread team ATen's operators use: the
library needs ``libgomp.so.1``, and the loader finds the copy torch loaded.  A call is split
over ``torch.get_num_threads()`` threads once it has ``_PARALLEL_MIN_WORK`` elements.  Without
OpenMP (another backend, a compiler without it, or a build that fails with it) the library is
built without, and the ranges run on a small Python thread pool (ctypes releases the GIL); its
hand-off (submitting to Python threads and waiting on them) costs far more than an OpenMP split,
so only large calls go there.

Why one module: the build, the loader and the typed wrapper of each C kernel share the
one library handle and its cache key.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..gates import GATE_CODES

__all__ = ["available", "status", "supports", "relu_sigmoid_backward", "relu_normal_cdf_backward", "relu_gate_backward",
           "RELU_GATES", "hardtanh_sigmoid_backward",
           "hardswish_backward", "batch_norm_relu_gate_backward", "batch_norm_relu_gate_backward_unchecked",
           "soft_max_pool2d_backward", "max_pool2d_with_indices", "channels_last_rows",
           "batch_norm_relu_gate_backward_channels_last", "SOURCE"]

SOURCE = Path(__file__).with_name("csrc") / "excitation_cpu.c"
# 512-bit vectors where the CPU has them (GCC prefers 256-bit ones even on AVX-512 cores, which left
# the soft-pool backward slower: measured in docs/design-measurements.md); elsewhere a no-op.
# -fno-trapping-math: without it GCC 12 vectorises the gate loops only with AVX-512's masked
# arithmetic; with AVX2 or SSE it must not evaluate both arms of a select (`u >= 0 ? s : e * s`
# could raise an FP exception the scalar loop would not), reports "control flow in loop" and
# leaves every gate and pool-weight loop scalar, many times slower than vectorised (measured in
# docs/design-measurements.md).  The values computed are the same IEEE results (it permits no
# reassociation and keeps NaNs); only FP exception flags, which nothing reads, may differ.
# tests/test_native.py checks that every loop vectorised for AVX-512 is vectorised for AVX2 (SSE4.2,
# without masked stores or 64-bit integer compares, keeps the residual branch and the max-pool forward scalar).
# -ffp-contract=fast: multiply-adds as FMA instructions, which -std=c99 turns off (ISO C forbids
# contracting across statements): one instruction instead of two per polynomial step of the gate,
# each step rounded once instead of twice (measured in docs/design-measurements.md).
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math",
          "-ffp-contract=fast", "-fPIC", "-shared", "-std=c99"]
_LOG = logging.getLogger("excitation")
_LOCK = threading.Lock()
_LIBRARY: Optional[ctypes.CDLL] = None
_STATUS: Optional[str] = None
_POOL: Optional[ThreadPoolExecutor] = None
_OPENMP = False  # whether the loaded library runs its parallel regions on torch's OpenMP threads
#: Below this many elements (or outputs x window) a call runs on the calling thread alone.  An
#: OpenMP split (a cheap fork and join on threads already running) pays from ~16 Ki elements; the
#: Python pool's hand-off needs ~1 Mi (measured in docs/design-measurements.md).
_PARALLEL_MIN_WORK = 1 << 14
_POOL_MIN_WORK = 1 << 20

_i64, _f32, _ptr, _int = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
# Each kernel's last argument is its thread count (1: the calling thread alone).
_SIGNATURES = {
    "exc_openmp": ([], _int),
    "exc_relu_sigmoid_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _f32, _int], None),
    "exc_relu_normal_cdf_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _f32, _int], None),
    "exc_hardtanh_sigmoid_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _f32, _f32, _f32, _f32, _int], None),
    "exc_hardswish_backward": ([_ptr, _ptr, _ptr, _i64, _i64, _f32, _int], None),
    "exc_bn_relu_backward": ([_ptr] * 7 + [_f32, _ptr, _ptr] + [_i64] * 4 + [_f32, _int, _i64, _i64, _int], None),
    "exc_bn_relu_backward_channels_last": ([_ptr] * 7 + [_f32, _ptr, _ptr] + [_i64] * 3 + [_f32, _int, _i64, _int],
                                           _int),
    "exc_soft_max_pool2d_backward": ([_ptr, _ptr, _ptr] + [_i64] * 14 + [_f32, _int, _int], _int),
    "exc_max_pool2d_forward": ([_ptr, _ptr, _ptr] + [_i64] * 14 + [_int], _int),
}


def _cpu_identity() -> str:
    """This CPU's model and feature flags (``-march=native`` code is only valid on the same kind of CPU)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(wanted)))


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _cache_dir() -> Path:
    root = os.environ.get("EXCITATION_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "excitation" / "native"


def _torch_uses_openmp() -> bool:
    """Whether ATen's parallel backend is OpenMP with libgomp loaded: then ``-fopenmp`` code shares its threads."""
    if platform.system() != "Linux":
        return False  # elsewhere torch bundles another OpenMP runtime (libomp / vcomp): do not load a second one
    try:
        backend = "ATen parallel backend: OpenMP" in torch.__config__.parallel_info()
        # The soname our -fopenmp library needs; vendored copies under other names (scikit-learn's) do not count.
        loaded = any(line.rstrip().endswith("/libgomp.so.1") for line in Path("/proc/self/maps").read_text().splitlines())
    except (OSError, RuntimeError):
        return False
    return backend and loaded


def _build_with(compiler: str, flags: Sequence[str]) -> ctypes.CDLL:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_identity(), platform.machine()]).encode()
    ).hexdigest()[:16]
    folder = _cache_dir() / key
    library = folder / "libexcitation_cpu.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        handle, partial = tempfile.mkstemp(dir=folder, suffix=".so.partial")
        os.close(handle)
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
            os.replace(partial, library)  # atomic: another process sees the whole library or none
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    loaded = ctypes.CDLL(str(library))
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(loaded, name)
        function.argtypes, function.restype = arguments, result
    return loaded


def _build() -> ctypes.CDLL:
    """Build (or find in the cache) and load the library: with OpenMP where torch's threads allow, else without."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    if _torch_uses_openmp() and os.environ.get("EXCITATION_NATIVE_OPENMP", "1") != "0":
        try:
            return _build_with(compiler, _FLAGS + ["-fopenmp"])
        except Exception as exc:  # a compiler without OpenMP, or a libgomp this one cannot use
            _LOG.info("excitation: C kernels without OpenMP (%s: %s)", type(exc).__name__, exc)
    return _build_with(compiler, _FLAGS)


def _load() -> Optional[ctypes.CDLL]:
    global _LIBRARY, _STATUS, _OPENMP
    if _STATUS is None:
        with _LOCK:
            if _STATUS is None:
                if os.environ.get("EXCITATION_NATIVE", "1") == "0":
                    _STATUS = "off: EXCITATION_NATIVE=0"
                elif platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
                    _STATUS = f"off: untested architecture {platform.machine()}"
                else:
                    try:
                        _LIBRARY = _build()
                        _OPENMP = bool(_LIBRARY.exc_openmp())
                        _STATUS = "on (OpenMP, torch's threads)" if _OPENMP else "on (Python thread pool)"
                    except Exception as exc:  # no compiler, a failed build, an unloadable library
                        _STATUS = f"off: {type(exc).__name__}: {exc}"
                        _LOG.info("excitation: C kernels unavailable, using the torch paths (%s)", _STATUS)
    return _LIBRARY


def available() -> bool:
    """Whether the C kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def status() -> str:
    """``"on (...)"`` with how calls are split over threads, or ``"off: <why>"`` (builds the kernels on the first call)."""
    _load()
    return str(_STATUS)


# The pool kernels keep one pointer per window element on the stack (``KMAX`` in the C source):
# larger windows (cspnext's 13x13 spatial-pyramid pools) take the torch path instead.
MAX_POOL_WINDOW = 64


def pool_window_supported(kernel_size: Sequence[int]) -> bool:
    """Whether a 2-D pooling window is small enough for the C kernels (at most ``MAX_POOL_WINDOW`` elements)."""
    return len(kernel_size) == 2 and kernel_size[0] * kernel_size[1] <= MAX_POOL_WINDOW


def _ranges(total: int, work_per_item: int) -> List[range]:
    threads = max(1, torch.get_num_threads())
    if threads == 1 or total * work_per_item < _POOL_MIN_WORK or total < 2:
        return [range(0, total)]
    step = -(-total // threads)
    return [range(start, min(total, start + step)) for start in range(0, total, step)]


def _run(call: Callable[[int, int, int], object], total: int, work_per_item: int = 1) -> None:
    """``call(begin, end, threads)`` over ``range(total)``: one OpenMP call, or ranges on the Python pool."""
    global _POOL
    if _OPENMP:  # the common case, kept short: at batch 1 this runs a few times per site and call
        threads = min(torch.get_num_threads(), total) if total * work_per_item >= _PARALLEL_MIN_WORK else 1
        status = call(0, total, max(1, threads))
        if status:
            _raise_status([status])
        return
    parts = _ranges(total, work_per_item)
    if len(parts) == 1:
        results = [call(0, total, 1)]
    else:
        if _POOL is None or _POOL._max_workers < len(parts):  # type: ignore[attr-defined]
            with _LOCK:
                if _POOL is None or _POOL._max_workers < len(parts):  # type: ignore[attr-defined]
                    _POOL = ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix="excitation-native")
        results = list(_POOL.map(lambda part: call(part.start, part.stop, 1), parts))
    if any(results):
        _raise_status(results)


def _raise_status(results: List[object]) -> None:
    if 2 in results:  # the callers check pool_window_supported first: this is a bug, never silent
        raise ValueError(f"excitation's C pool kernel got a window of more than {MAX_POOL_WINDOW} elements")
    raise MemoryError("excitation's C pool kernel could not allocate its row buffers")


# Tensor subclasses may carry their own meaning (a wrapper, a fake or functional tensor); a
# Parameter is a plain tensor (BatchNorm's weight reaches the fused backward as one).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def supports(*tensors: Optional[Tensor], contiguous: bool = True, optional: bool = False) -> bool:
    """Whether these tensors can go to the C kernels: plain float32 CPU tensors, contiguous unless told otherwise.

    ``optional=True`` lets ``None`` stand for a tensor a kernel does without (BatchNorm's affine parameters).
    """
    # A loop, not all(<generator>): this runs a few times per site and call, and at batch 1 a
    # generator frame per tensor is a visible share of a pullback's host time (``t.is_cpu`` for
    # the same reason: ``t.device.type`` builds a device object first).
    for t in tensors:
        if t is None and optional:
            continue
        if type(t) not in _PLAIN or t.dtype != torch.float32 or not t.is_cpu:
            return False
        if contiguous and not t.is_contiguous():
            return False
    return True


def relu_sigmoid_backward(grad: Tensor, z: Tensor, temp: float, out: Optional[Tensor] = None) -> Tensor:
    """``flush(grad * floor(sigmoid(z / temp)))`` (:func:`.reference.relu_backward`) in one pass; ``out`` may be ``z``."""
    return _relu_gate_backward(_load().exc_relu_sigmoid_backward, grad, z, temp, out)


def relu_normal_cdf_backward(grad: Tensor, z: Tensor, temp: float, out: Optional[Tensor] = None) -> Tensor:
    """``flush(grad * floor(Phi(z / temp)))`` (:func:`.reference.relu_backward`, gate ``"normal_cdf"``) in one pass.

    GELU's surrogate gate and the semantic preset's ReLU gate.  In torch it is half a dozen
    passes (divide, clamp, ``erfc``, the floor's ``where``, the product, the flush); maxvit_t's 45
    GELU sites spent ~6x vanilla's ``gelu_backward`` on them.  Accurate to 4e-7 relative down to
    the floor (:func:`excitation.gates.normal_cdf_gate`).  ``out`` may be ``z``.
    """
    return _relu_gate_backward(_load().exc_relu_normal_cdf_backward, grad, z, temp, out)


#: The gates with C kernels, by :data:`excitation.gates.GATES` name (elementwise and fused with BatchNorm).
RELU_GATES = tuple(GATE_CODES)


def _check_gate(gate: str) -> None:
    if gate not in GATE_CODES:
        raise ValueError(f"no C kernel for gate {gate!r}; expected one of {RELU_GATES}.")


def relu_gate_backward(grad: Tensor, z: Tensor, temp: float, gate: str, out: Optional[Tensor] = None) -> Tensor:
    """:func:`relu_sigmoid_backward` or :func:`relu_normal_cdf_backward` by gate name (one of :data:`RELU_GATES`)."""
    _check_gate(gate)
    kernel = relu_sigmoid_backward if gate == "sigmoid" else relu_normal_cdf_backward
    return kernel(grad, z, temp, out)


def _relu_gate_backward(kernel, grad: Tensor, z: Tensor, temp: float, out: Optional[Tensor]) -> Tensor:
    out = torch.empty_like(z) if out is None else out
    pointers = (grad.data_ptr(), z.data_ptr(), out.data_ptr())
    _run(lambda begin, end, threads: kernel(*pointers, begin, end, 1.0 / temp, threads), z.numel())
    return out


def hardtanh_sigmoid_backward(
    grad: Tensor, z: Tensor, temp: float, min_val: float, max_val: float, scale: float = 1.0
) -> Tensor:
    """``flush(grad * floor(scale * hardtanh_gate(z, temp, min_val, max_val)))`` in one pass.

    :func:`excitation.gates.hardtanh_gate` (ReLU6, Hardtanh; ``scale`` 1), and Hardsigmoid's gate
    (:func:`excitation.gates.hardsigmoid_unit_gate`: ``min_val, max_val, scale = -3, 3, 1/6``).
    """
    library = _load()
    out = torch.empty_like(z)
    pointers = (grad.data_ptr(), z.data_ptr(), out.data_ptr())
    _run(lambda begin, end, threads: library.exc_hardtanh_sigmoid_backward(*pointers, begin, end, 1.0 / temp, min_val,
                                                                           max_val, scale, threads),
         z.numel())
    return out


def hardswish_backward(grad: Tensor, z: Tensor, temp: float) -> Tensor:
    """``flush(grad * floor(clamp(z / (6 temp) + 1/2, 0, 1)))`` in one pass (:func:`excitation.gates.hard_sigmoid_gate`)."""
    library = _load()
    out = torch.empty_like(z)
    pointers = (grad.data_ptr(), z.data_ptr(), out.data_ptr())
    _run(lambda begin, end, threads: library.exc_hardswish_backward(*pointers, begin, end, 1.0 / (6.0 * temp), threads),
         z.numel())
    return out


def planes_contiguous(t: Tensor) -> bool:
    """Whether each [n, c] plane of ``t`` ([N, C, ...]) is contiguous, at any batch and channel strides."""
    if t.dim() < 2:
        return False
    if t.is_contiguous():  # the common case: one C call instead of the Python loop
        return True
    expected = 1
    for size, stride in zip(reversed(t.shape[2:]), reversed(t.stride()[2:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def batch_norm_relu_gate_backward(
    grad: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, temp: float, residual: Optional[Tensor] = None, residual_grad: bool = False,
    gate: str = "sigmoid",
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(dx, dz)`` of ``relu(batch_norm(x) [+ residual])`` (eval mode), in one pass over ``x``.

    ``gate`` is one of :data:`RELU_GATES` (``"sigmoid"``, ``"normal_cdf"``), the kernels of
    :func:`relu_gate_backward`.
    ``z = batch_norm(x) [+ residual]`` is recomputed in the kernel (to the rounding of one multiply-add),
    ``dz = flush(grad * gate(z))`` and ``dx = flush(dz * weight * rsqrt(running_var + eps))``; ``dz``
    (the residual's gradient) is returned only if ``residual_grad``, else ``None``.  ``x`` and
    ``residual`` ([N, C, ...]) and the per-channel tensors ([C]; ``weight``, ``bias`` may be ``None``)
    must be contiguous float32; ``grad`` needs only contiguous planes (:func:`planes_contiguous`),
    such as a slice of a channel concatenation.
    """
    channels = x.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise ValueError(f"{name} needs {channels} values (one per channel of x), got {t.numel()}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_gate(gate)
    if grad.shape != x.shape or not planes_contiguous(grad):
        raise ValueError(f"grad must have x's shape {tuple(x.shape)} and contiguous [n, c] planes, got "
                         f"{tuple(grad.shape)} with strides {grad.stride()}")
    return batch_norm_relu_gate_backward_unchecked(grad, x, running_mean, running_var, weight, bias, eps, temp,
                                                   residual, residual_grad, gate)


def batch_norm_relu_gate_backward_unchecked(
    grad: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, temp: float, residual: Optional[Tensor] = None, residual_grad: bool = False,
    gate: str = "sigmoid",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`batch_norm_relu_gate_backward` for arguments known to fit (the fused site's: BatchNorm ran on them).

    Kept short because it runs once per site and pullback: at batch 1 the checked wrapper's Python
    (shape checks, a pointer tuple, a closure for :func:`_run`) cost more than the ctypes call
    and the kernel together (measured in docs/design-measurements.md).
    """
    library = _LIBRARY if _LIBRARY is not None else _load()
    shape = x.shape
    planes = shape[0] * shape[1]
    if planes == 0 or x.numel() == 0:
        return torch.empty_like(x), (torch.empty_like(x) if residual_grad else None)
    inner = x.numel() // planes
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if residual_grad else None
    g_batch_stride, g_channel_stride = grad.stride()[:2]
    gate_code = GATE_CODES[gate]
    args = (grad.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
            running_mean.data_ptr(), running_var.data_ptr(), None if weight is None else weight.data_ptr(),
            None if bias is None else bias.data_ptr(), eps, dx.data_ptr(), None if dz is None else dz.data_ptr(),
            shape[1], inner)
    if _OPENMP:  # the common case, without _run's closure
        threads = min(torch.get_num_threads(), planes) if planes * inner >= _PARALLEL_MIN_WORK else 1
        library.exc_bn_relu_backward(*args, 0, planes, 1.0 / temp, gate_code, g_batch_stride, g_channel_stride,
                                     max(1, threads))
    else:
        _run(lambda begin, end, threads: library.exc_bn_relu_backward(*args, begin, end, 1.0 / temp, gate_code,
                                                                     g_batch_stride, g_channel_stride, threads),
             planes, inner)
    return dx, dz


def channels_last_rows(t: Tensor) -> Optional[int]:
    """The row stride of ``t`` ([N, C, *spatial]) if its channels are innermost and contiguous and its rows (one
    per batch index and position) evenly spaced, else ``None``.

    A dense channels-last tensor has rows of ``C`` values; a channel slice of a channels-last
    concatenation (the gradient Inductor hands one part of a ``torch.cat``) has longer ones.
    """
    if t.dim() < 3 or t.stride(1) != 1:
        return None
    row = expected = None
    for dim in [*range(t.dim() - 1, 1, -1), 0]:  # the position dims, innermost first, then the batch
        size, stride = t.shape[dim], t.stride(dim)
        if size == 1:
            continue
        if row is None:
            row = expected = stride
        if stride != expected:
            return None
        expected *= size
    row = t.shape[1] if row is None else row
    return row if row >= t.shape[1] else None


def batch_norm_relu_gate_backward_channels_last(
    grad: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
    bias: Optional[Tensor], eps: float, temp: float, residual: Optional[Tensor] = None, residual_grad: bool = False,
    gate: str = "sigmoid",
) -> Tuple[Tensor, Optional[Tensor]]:
    """:func:`batch_norm_relu_gate_backward` for channels-last ``x`` (and ``residual``), dense, and a channels-last
    ``grad`` with evenly spaced rows (:func:`channels_last_rows`); ``dx`` (and ``dz``) come back channels-last.

    What compiled CPU graphs call: Inductor lays out the activations around convolutions channels-last.
    """
    channels = x.shape[1]
    g_row = channels_last_rows(grad)
    if channels_last_rows(x) != channels or (residual is not None and channels_last_rows(residual) != channels):
        raise ValueError("x (and residual) must be dense channels-last tensors")
    if g_row is None or grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {tuple(x.shape)} and channels-last rows, got {tuple(grad.shape)} "
                         f"with strides {grad.stride()}")
    _check_gate(gate)
    library = _LIBRARY if _LIBRARY is not None else _load()
    dx = torch.empty_like(x)  # empty_like keeps x's (channels-last) strides
    dz = torch.empty_like(x) if residual_grad else None
    rows = x.numel() // max(1, channels)
    if rows == 0:
        return dx, dz
    threads = min(torch.get_num_threads(), rows) if x.numel() >= _PARALLEL_MIN_WORK and _OPENMP else 1
    args = (grad.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
            running_mean.data_ptr(), running_var.data_ptr(), None if weight is None else weight.data_ptr(),
            None if bias is None else bias.data_ptr(), eps, dx.data_ptr(), None if dz is None else dz.data_ptr(),
            channels)
    if _OPENMP:
        status = library.exc_bn_relu_backward_channels_last(*args, 0, rows, 1.0 / temp, GATE_CODES[gate], g_row,
                                                            max(1, threads))
    else:
        results: List[object] = []
        _run(lambda begin, end, t: results.append(library.exc_bn_relu_backward_channels_last(
            *args, begin, end, 1.0 / temp, GATE_CODES[gate], g_row, t)), rows, channels)
        status = max(results, default=0)
    if status:
        raise MemoryError("excitation: the channels-last BatchNorm -> ReLU kernel could not allocate its scratch")
    return dx, dz


def soft_max_pool2d_backward(
    grad: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], out_hw: Sequence[int], temp: float, pool_backward: str,
) -> Tensor:
    """The 2-D soft-pool backward of :func:`.reference.soft_max_pool2d_backward` for a float32 input [..., H, W]."""
    library = _load()
    height, width = x.shape[-2:]
    planes = x.numel() // max(1, height * width)
    dx = torch.zeros_like(x)  # positions no window reads (floor-mode remainders) stay 0
    geometry = (height, width, out_hw[0], out_hw[1], kernel_size[0], kernel_size[1], stride[0], stride[1],
                padding[0], padding[1], dilation[0], dilation[1])
    scale2 = 1.0 / (math.log(2.0) * temp)
    pointers = (grad.data_ptr(), x.data_ptr(), dx.data_ptr())
    weights_only = int(pool_backward == "weights")
    _run(lambda begin, end, threads: library.exc_soft_max_pool2d_backward(*pointers, begin, end, *geometry, scale2,
                                                                          weights_only, threads),
         planes, out_hw[0] * out_hw[1] * kernel_size[0] * kernel_size[1])
    return dx


def max_pool2d_with_indices(
    x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
    out_hw: Sequence[int],
) -> "tuple[Tensor, Tensor]":
    """``aten.max_pool2d_with_indices`` bit for bit (values and indices) for a float32 input [..., H, W].

    ATen's CPU kernel for NCHW tensors is a scalar loop; this one vectorises the same comparisons.
    """
    library = _load()
    height, width = x.shape[-2:]
    planes = x.numel() // max(1, height * width)
    out = x.new_empty((*x.shape[:-2], *out_hw))
    indices = torch.empty(out.shape, dtype=torch.int64, device=x.device)
    geometry = (height, width, out_hw[0], out_hw[1], kernel_size[0], kernel_size[1], stride[0], stride[1],
                padding[0], padding[1], dilation[0], dilation[1])
    pointers = (x.data_ptr(), out.data_ptr(), indices.data_ptr())
    _run(lambda begin, end, threads: library.exc_max_pool2d_forward(*pointers, begin, end, *geometry, threads), planes,
         out_hw[0] * out_hw[1] * kernel_size[0] * kernel_size[1])
    return out, indices
