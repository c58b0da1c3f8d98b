"""One helper that registers a surrogate op in both mechanisms the runtimes need.

Why two mechanisms for one op (torch 2.14.1, measured; see :mod:`.ops`): a
``torch.library.custom_op`` with ``register_autograd`` survives ``torch.compile``,
``torch.export``, ``save``/``load`` and TorchScript, but ``torch.func``
transforms refuse it; an ``autograd.Function`` twin with ``setup_context`` and
``generate_vmap_rule`` works under ``torch.func`` but ``torch.export`` silently
drops its backward.  :func:`define_surrogate_op` builds both from one forward,
one ``setup_context`` and one backward, and returns the callable that picks
between them.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["NAMESPACE", "define_surrogate_op", "under_functorch"]

NAMESPACE = "excitation"


def under_functorch() -> bool:
    """True while a ``torch.func`` transform (grad, vjp, vmap, jacrev, ...) is active.

    dynamo traces this call, so it also answers correctly inside
    ``torch.compile(torch.func.grad(f))``.
    """
    return torch._C._functorch.peek_interpreter_stack() is not None


def define_surrogate_op(
    name: str,
    forward: Callable,
    *,
    setup_context: Callable,
    backward: Callable,
    fake: "Callable | None" = None,
) -> Callable:
    """Register ``excitation::<name>`` (custom op + autograd) and its ``torch.func`` twin.

    ``forward`` must have a fully type-annotated signature (``torch.library``
    derives the schema from it) and must not return a view of an input.
    ``fake`` defaults to ``forward``, which is right whenever ``forward`` only
    calls ATen ops (they all have meta kernels).  Returns ``call(*args)``, which
    runs the twin under a ``torch.func`` transform and the custom op otherwise.
    """
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(forward)
    op.register_fake(fake or forward)
    op.register_autograd(backward, setup_context=setup_context)
    twin = type(
        f"{name}_function",
        (torch.autograd.Function,),
        {
            "__doc__": f"The torch.func twin of excitation::{name}.",
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        },
    )
    packet = getattr(getattr(torch.ops, NAMESPACE), name)

    def call(*args):
        if under_functorch():
            return twin.apply(*args)
        return packet(*args)

    call.__name__ = call.__qualname__ = f"call_{name}"
    call.twin = twin  # type: ignore[attr-defined]
    return call
