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
and one backward, and returns the callable that runs the one :func:`.dispatch.forward_mechanism` names.
"""

from __future__ import annotations

from typing import Callable

import torch

from .dispatch import forward_mechanism, forward_runtime

__all__ = ["NAMESPACE", "define_surrogate_op"]

NAMESPACE = "excitation"


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
    runs the mechanism :func:`.dispatch.forward_mechanism` names for the call's runtime.
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
        chosen = forward_mechanism(forward_runtime(args[0]))
        if chosen == "eager":
            return eager.apply(*args)
        if chosen == "twin":
            return twin.apply(*args)
        return packet(*args)

    call.__name__ = call.__qualname__ = f"call_{name}"
    call.twin = twin  # type: ignore[attr-defined]
    call.eager = eager  # type: ignore[attr-defined]
    return call
