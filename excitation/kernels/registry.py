"""One helper that registers a surrogate op in every mechanism the runtimes need, and picks one per call.

Three mechanisms for one op (torch 2.14.1, measured; see :mod:`.ops`):

* a ``torch.library.custom_op`` with ``register_autograd`` survives ``torch.export``
  (the exported graph holds ``excitation::<name>``), ``save``/``load``,
  ``torch.jit.trace``/``script`` and any tracer (fx, ``make_fx``), but ``torch.func``
  transforms refuse it, and ``torch.compile`` keeps it an opaque call per site;
* an ``autograd.Function`` *twin* with ``setup_context`` and ``generate_vmap_rule``
  works under ``torch.func``, and dynamo inlines it, so Inductor fuses it; but
  ``torch.export`` silently drops its backward;
* in plain eager both of those pay for machinery nobody uses there: binding the
  arguments to the forward's signature (``setup_context`` style) costs host time on
  every call that a classic ``forward(ctx, ...)`` Function does not pay (measured in
  docs/design-measurements.md).  On a GPU, where a ResNet's input gradient at batch 32
  is bound by the host, that per-site cost *is* the pullback's overhead.  So plain eager runs a
  classic Function built from the same forward, ``setup_context`` and backward.

:func:`define_surrogate_op` builds all three from one forward, one ``setup_context``
and one backward, and returns the callable that picks between them (:func:`mechanism`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx._symbolic_trace as _fx_trace

# torch >= 2.8 names the symbolic-trace check apart (is_fx_tracing warns there).
_is_fx_tracing = getattr(_fx_trace, "is_fx_symbolic_tracing", None) or _fx_trace.is_fx_tracing

__all__ = [
    "NAMESPACE",
    "define_surrogate_op",
    "dispatch_mode_active",
    "dynamo_compiling",
    "functional_backward",
    "mechanism",
    "recompute_in_backward",
    "under_functorch",
    "use_function_twin",
]

NAMESPACE = "excitation"


def under_functorch() -> bool:
    """True while a ``torch.func`` transform (grad, vjp, vmap, jacrev, ...) is active.

    dynamo traces this call, so it also answers correctly inside
    ``torch.compile(torch.func.grad(f))``.  It asks ``isinstance`` rather than
    ``is not None``: dynamo (2.14) wraps the interpreter stack's ``None`` in an object
    variable, and ``... is not None`` then reads True in every compiled graph.
    """
    return isinstance(torch._C._functorch.peek_interpreter_stack(), torch._C._functorch.CInterpreter)


def functional_backward() -> bool:
    """Whether a backward must not write into buffers in place (``functional=True`` paths).

    In-place buffers are only safe in a plain first-order eager backward: with
    ``create_graph`` (grad mode on, e.g. ``torch.func.grad``) autograd tracks the inputs,
    under ``vmap`` the gradient is batched, and a compiler's tracer wants a functional graph.
    """
    return torch.is_grad_enabled() or under_functorch() or torch.compiler.is_compiling()


def recompute_in_backward(t: torch.Tensor) -> bool:
    """Whether code producing ``t`` should run in a recompute region (a non-reentrant checkpoint).

    Only while dynamo traces (``torch.export`` must keep our ops; in eager a checkpoint only
    costs host time), outside ``torch.func`` transforms, and where a backward will run.
    """
    return dynamo_compiling() and not under_functorch() and torch.is_grad_enabled() and t.requires_grad


def use_function_twin() -> bool:
    """True where the ``setup_context`` ``autograd.Function`` twin must (or should) run.

    * Under a ``torch.func`` transform it must: the custom op is refused there.
    * Under ``torch.compile`` (dynamo, not ``torch.export``) it should: dynamo inlines
      an ``autograd.Function``'s forward and backward into the graph, so Inductor fuses
      ``relu`` into its producer and the gate into the backward's kernels, whereas a
      custom op stays an opaque Python call per site in the compiled program.
    * Under ``torch.export`` it must not: export drops an ``autograd.Function``'s
      backward silently, and the exported graph must hold ``excitation::*`` ops.

    dynamo evaluates these checks while tracing, so each compiled graph has its branch baked in.
    """
    return under_functorch() or dynamo_compiling()


def dynamo_compiling() -> bool:
    """True while ``torch.compile`` (not ``torch.export``) traces: dynamo constant-folds it per graph."""
    return torch.compiler.is_compiling() and not torch.compiler.is_exporting()


def dispatch_mode_active() -> bool:
    """A ``TorchDispatchMode`` is on the stack (make_fx, FakeTensorMode, a FLOP counter, ...).

    Such a mode sees every op but not a raw kernel launch, so a kernel called directly would
    escape it (a fake tensor has no memory to read; a traced graph would miss the call).
    """
    return torch._C._len_torch_dispatch_stack() > 0


def _plain_eager(first) -> bool:
    """No tracer of any kind is recording: only then may the classic Function run."""
    return not (
        torch.jit.is_tracing()
        or _is_fx_tracing()
        or torch.compiler.is_exporting()
        or dispatch_mode_active()
        or (isinstance(first, torch.Tensor) and type(first) not in (torch.Tensor, torch.nn.Parameter))
    )


def mechanism(first=None) -> str:
    """Which mechanism a call with first argument ``first`` runs now: ``"twin"``, ``"eager"`` or ``"op"``."""
    if use_function_twin():
        return "twin"
    return "eager" if _plain_eager(first) else "op"


def define_surrogate_op(
    name: str,
    forward: Callable,
    *,
    setup_context: Callable,
    backward: Callable,
    fake: "Callable | None" = None,
) -> Callable:
    """Register ``excitation::<name>`` (custom op + autograd), its ``torch.func`` twin and its eager Function.

    ``forward`` must have a fully type-annotated signature (``torch.library``
    derives the schema from it) and must not return a view of an input.
    ``fake`` defaults to ``forward``, which is right whenever ``forward`` only
    calls ATen ops (they all have meta kernels).  Returns ``call(*args)``, which
    runs the mechanism :func:`mechanism` names.
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(forward)
    op.register_fake(fake or forward)
    op.register_autograd(backward, setup_context=setup_context)
    twin = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "__doc__": f"The torch.func / torch.compile twin of excitation::{name}.",
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )

    def eager_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    eager = type(
        f"{name}_eager_function",
        (torch.autograd.Function,),
        {
            "__doc__": f"excitation::{name} for plain eager calls: a classic Function, the cheapest to call.",
            "forward": staticmethod(eager_forward),
            "backward": staticmethod(backward),
        },
    )
    packet = getattr(getattr(torch.ops, NAMESPACE), name)

    def call(*args):
        if use_function_twin():
            return twin.apply(*args)
        if _plain_eager(args[0]):
            return eager.apply(*args)
        return packet(*args)

    call.__name__ = call.__qualname__ = f"call_{name}"
    call.twin = twin  # type: ignore[attr-defined]
    call.eager = eager  # type: ignore[attr-defined]
    return call
