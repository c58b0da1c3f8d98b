"""Which code a surrogate op runs: the runtime, decided once per call, and one table of implementations.

**Runtimes.**  Every call of a surrogate op happens in one of these:

==================  ===========================================================================
``"eager"``         plain eager; in a backward, a first-order one (grad mode off)
``"double_backward"``  a plain eager backward that builds a graph (``create_graph=True``)
``"functorch"``     a ``torch.func`` transform (grad, vjp, vmap, jacrev, ...)
``"dynamo"``        ``torch.compile`` traces (dynamo, or AOTAutograd tracing the backward)
``"export"``        ``torch.export`` traces
``"trace"``         another recorder: ``torch.jit.trace``, fx symbolic tracing, a
                    ``TorchDispatchMode`` (``make_fx``, ``FakeTensorMode``, a FLOP counter),
                    a tensor subclass
==================  ===========================================================================

:func:`forward_runtime` and :func:`backward_runtime` read them from torch's state.  Their order
differs on purpose: in a forward a ``torch.func`` transform wins (it refuses custom ops, whatever
else is tracing); in a backward a compiler wins (a raw kernel launch would be invisible to it).

**The table.**  Given the runtime and what the tensors are (device, dtype, whether the C kernels
take them), the functions below name the implementation, and the op wrappers in :mod:`.ops`,
:mod:`.fused` and :mod:`.activations` run what they name:

* :func:`forward_mechanism`: ``"eager"`` (a classic ``autograd.Function``, the cheapest to call),
  ``"twin"`` (the ``setup_context`` Function ``torch.func`` and dynamo need) or ``"op"`` (the
  ``torch.library`` custom op, which export and every recorder keep);
* :func:`relu_backward_path`: ``"c"``, ``"triton"`` (a raw launch), ``"triton_op"`` (the same
  kernel as an op a recorder sees), ``"torch"`` (torch ops, in place where safe) or
  ``"torch_functional"`` (no in-place writes: ``create_graph``, transforms and compilers);
* :func:`activation_backward_path`: ``"c"``, ``"relu:<path>"`` (a gate that is a ReLU gate, on the
  ReLU's path) or ``"torch"`` (the contract of :mod:`.reference`);
* :func:`pool2d_backward_path`: ``"c"``, ``"triton"``, ``"triton_op"``, ``"extern"`` (a compiled CPU
  graph calls the eager backward as one op), ``"torch_chunked"`` or ``"torch_functional"``.

The table is pure, so :func:`excitation.explain_dispatch` can ask it about any runtime, and
``tests/test_dispatch.py`` asserts it as a matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx._symbolic_trace as _fx_trace
from torch import Tensor

__all__ = [
    "RUNTIMES",
    "forward_runtime",
    "backward_runtime",
    "RAW_CALL_RUNTIMES",
    "forward_mechanism",
    "pool_forward_path",
    "relu_backward_path",
    "compiled_relu_backward_path",
    "activation_backward_path",
    "pool2d_backward_path",
    "functional_runtime",
    "NATIVE_ACTIVATION_KINDS",
    "under_functorch",
    "dynamo_compiling",
    "dispatch_mode_active",
    "functional_backward",
    "recompute_in_backward",
    "launch_directly",
    "device_type",
    "triton_available",
]

RUNTIMES = ("eager", "double_backward", "functorch", "dynamo", "export", "trace")

# torch >= 2.8 names the symbolic-trace check apart (is_fx_tracing warns there).
_is_fx_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", None) or _fx_trace.is_fx_tracing


# ------------------------------------------------------------------ torch's state
def under_functorch() -> bool:
    """True while a ``torch.func`` transform (grad, vjp, vmap, jacrev, ...) is active.

    dynamo traces this call, so it also answers correctly inside
    ``torch.compile(torch.func.grad(f))``.  It asks ``isinstance`` rather than
    ``is not None``: dynamo (2.14) wraps the interpreter stack's ``None`` in an object
    variable, and ``... is not None`` then reads True in every compiled graph.
    """
    return isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter)


def dynamo_compiling() -> bool:
    """True while ``torch.compile`` (not ``torch.export``) traces: dynamo constant-folds it per graph."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def dispatch_mode_active() -> bool:
    """A ``TorchDispatchMode`` is on the stack (make_fx, FakeTensorMode, a FLOP counter, ...).

    Such a mode sees every op but not a raw kernel launch, so a kernel called directly would
    escape it (a fake tensor has no memory to read; a traced graph would miss the call).
    """
    return torch._C._len_torch_dispatch_stack() > 0


def forward_runtime(first: object = None) -> str:
    """The runtime of a forward call whose first argument is ``first`` (module docstring)."""
    if under_functorch():
        return "functorch"
    if torch.compiler.is_exporting():
        return "export"
    if torch.compiler.is_compiling():
        return "dynamo"
    if (torch.jit.is_tracing() or _is_fx_tracing() or dispatch_mode_active()
            or (isinstance(first, Tensor) and type(first) not in (Tensor, torch.nn.Parameter))):
        return "trace"
    return "eager"


def backward_runtime(*tensors: Tensor) -> str:
    """The runtime of a backward call over ``tensors`` (module docstring)."""
    if torch.compiler.is_compiling():
        return "export" if torch.compiler.is_exporting() else "dynamo"
    if under_functorch():
        return "functorch"
    if torch.jit.is_tracing() or dispatch_mode_active():
        return "trace"
    for t in tensors:  # a loop, not all(<generator>): at batch 1 a generator frame per call is host time
        if type(t) is not Tensor:
            return "trace"
    return "double_backward" if torch.is_grad_enabled() else "eager"


#: The runtimes in which a raw kernel call may run.  Elsewhere nobody asks whether the C kernels take
#: the tensors: asking loads the library, a call dynamo cannot trace (it would break the graph, and
#: with it every recompute region around the site).
RAW_CALL_RUNTIMES = ("eager", "double_backward")


def device_type(t: Tensor) -> str:
    """``t.device.type`` without building a ``torch.device`` (a microsecond a call, per site, at batch 1)."""
    return "cpu" if t.is_cpu else "cuda" if t.is_cuda else t.device.type


def functional_backward() -> bool:
    """Whether a backward running now must not write into buffers in place (the ``torch_functional`` paths).

    The table's rule (:func:`functional_runtime`) for the backward's runtime: in-place buffers are
    only safe in a plain first-order eager backward.  With ``create_graph`` autograd tracks the
    inputs, under ``vmap`` the gradient is batched, and a compiler's tracer wants a functional graph.
    """
    return functional_runtime(backward_runtime(), torch.is_grad_enabled())


def recompute_in_backward(t: Tensor) -> bool:
    """Whether code producing ``t`` should run in a recompute region (a non-reentrant checkpoint).

    Only while dynamo traces (``torch.export`` must keep our ops; in eager a checkpoint only
    costs host time), outside ``torch.func`` transforms, and where a backward will run.
    """
    return dynamo_compiling() and not under_functorch() and torch.is_grad_enabled() and t.requires_grad


def launch_directly(*tensors: Tensor) -> bool:
    """Whether a kernel may be called raw (a Python-launched Triton kernel, a ctypes C call) rather than as an op.

    In plain eager an op's dispatch only adds host time (measured in docs/design-measurements.md).
    But a tracer must see the op: AOTAutograd traces a compiled backward under
    a dispatch mode (``torch.compiler.is_compiling()`` is not set there), and a raw launch on
    its functional / fake tensors is invisible to it: the traced graph kept the zero-filled
    output buffer, and the compiled pullback came out zero upstream of every pool (on CUDA, caught
    by ``test_compile_cuda``).  A raw C call on a fake tensor would read memory it has not got.
    """
    return backward_runtime(*tensors) in ("eager", "double_backward")


_TRITON: Optional[bool] = None


def triton_available() -> bool:
    """True once ``excitation.kernels.triton`` imported (Triton present); checked once per process."""
    global _TRITON
    if _TRITON is None:
        try:
            from . import triton as _  # noqa: F401  (registers the triton_op)

            _TRITON = True
        except Exception:  # ImportError, or a Triton that cannot initialise here
            _TRITON = False
    return _TRITON


# ------------------------------------------------------------------------ the table
#: Forward: which mechanism of :func:`.registry.define_surrogate_op` runs, per runtime.
_MECHANISMS = {"eager": "eager", "double_backward": "eager", "functorch": "twin", "dynamo": "twin",
               "export": "op", "trace": "op"}

#: The activation kinds with a C backward of their own (the soft windows of Hardtanh / ReLU6 and
#: Hardsigmoid, Hardswish's gate): at batch 1 the contract's half-dozen small passes made each such
#: site ~3x vanilla's.
NATIVE_ACTIVATION_KINDS = ("hardtanh", "hardsigmoid", "hardswish")


def forward_mechanism(runtime: str) -> str:
    """``"eager"``, ``"twin"`` or ``"op"``: the mechanism a surrogate op's forward runs under ``runtime``."""
    return _MECHANISMS[runtime]


def pool_forward_path(runtime: str, c_ready: bool) -> str:
    """A max-pool's forward: ``"c"`` (the C kernel, bit-identical to ATen's and faster than its NCHW
    scalar loop) in plain eager where the C kernels take the tensor and the window, else ``"torch"``."""
    return "c" if runtime == "eager" and c_ready else "torch"


def functional_runtime(runtime: str, grad_mode: bool) -> bool:
    # A recorder's backward is first-order unless grad mode is on (make_fx of a create_graph backward).
    return runtime in ("double_backward", "functorch", "dynamo", "export") or (runtime == "trace" and grad_mode)


def relu_backward_path(runtime: str, device: str, gate: str, c_ready: bool, *, triton: bool = False,
                       grad_mode: bool = False, in_place: bool = False) -> str:
    """The ReLU gate's backward ``grad * gate(z / temp)``.

    ``c_ready``: the C kernels are built, take this gate, and take the tensors (plain contiguous
    float32 CPU tensors of one shape).  ``triton``: Triton imports (CUDA).  ``grad_mode``: grad mode
    is on (it matters under ``"trace"`` only).  The normal-CDF gate has no fused ATen form
    (``grad * Phi(z / temp)`` is five passes), so eager CUDA runs Triton; the sigmoid gate's
    ``softplus_backward`` is one fused ATen kernel already; compilers fuse the torch expression.
    ``in_place``: the caller owns ``z`` and takes the result in it (an eager CPU fast path): ``"c"``
    or ``"torch"``, both writing into ``z``.
    """
    if in_place:
        return "c" if runtime in ("eager", "double_backward") and c_ready else "torch"
    if device == "cuda" and gate == "normal_cdf" and triton and runtime not in ("dynamo", "export"):
        return "triton" if runtime in ("eager", "double_backward") else "triton_op"
    if runtime == "eager" and c_ready:
        return "c"
    return "torch_functional" if functional_runtime(runtime, grad_mode) else "torch"


def compiled_relu_backward_path(device: str, dtype: torch.dtype, gate: str, c_built: bool) -> str:
    """What an exact ReLU site of a compiled graph calls for its backward, decided when it is compiled.

    ``"extern"``: the C kernels as one extern op (float32 CPU, a gate they implement, the library
    built): Inductor's own loop for the gate is compute-bound on the CPU.  Else ``"inductor"``: the
    surrogate's torch expression, which Inductor fuses.
    """
    return "extern" if device == "cpu" and dtype == torch.float32 and c_built else "inductor"


def activation_backward_path(runtime: str, device: str, dtype: torch.dtype, kind: str, relu_gate: Optional[str],
                             c_ready: bool, *, triton: bool = False, grad_mode: bool = False) -> str:
    """A gated activation's backward (``excitation::surrogate_activation``).

    ``relu_gate``: the kind's gate is this ReLU gate (SiLU's sigmoid, GELU's normal CDF); float64
    keeps the contract's own expression there (the fused ``softplus_backward`` rounds the gate to
    1 past ``z / temp > 20``, below float32's resolution but not float64's).
    """
    if kind in NATIVE_ACTIVATION_KINDS and runtime == "eager" and c_ready:
        return "c"
    if relu_gate is not None and dtype != torch.float64:
        return "relu:" + relu_backward_path(runtime, device, relu_gate, c_ready, triton=triton, grad_mode=grad_mode)
    return "torch"


def pool2d_backward_path(runtime: str, device: str, c_ready: bool, *, triton: bool = False,
                         grad_mode: bool = False, functional: Optional[bool] = None) -> str:
    """The 2-D soft max-pool's backward.

    ``c_ready``: the C kernels are built and take the tensor and the window.  A compiled CPU graph
    calls the eager backward as one extern op: Inductor's own code for it, traced from the torch
    ops, is many times slower than the eager one, which works over cache-sized chunks of planes.
    ``functional`` overrides what the runtime implies (the extern op's own body and its vmap rule
    are real kernel calls, whatever the state around them).
    """
    if device == "cpu" and runtime in ("dynamo", "export"):
        return "extern"
    if functional_runtime(runtime, grad_mode) if functional is None else functional:
        return "torch_functional"
    if device == "cuda" and triton:
        return "triton" if runtime == "eager" else "triton_op"
    if runtime == "eager" and c_ready:
        return "c"
    return "torch_chunked"
