"""Attention with its attention weights held constant in the backward.

``softmax(q k^T / sqrt(d)) v`` keeps its forward; its backward treats the
attention weights as constants, so gradients reach the input only through the
values (and the residual stream), not through the query-key logits.  Three
forms are covered:

* an explicit softmax whose output multiplies values (MaxViT, hand-written
  attention): :func:`surrogate_softmax`, a softmax whose backward is zero;
* ``F.scaled_dot_product_attention``: :func:`surrogate_scaled_dot_product_attention`
  stops the gradient at the query and the key;
* attention inside a function we cannot trace (``nn.MultiheadAttention``'s
  ``F.multi_head_attention_forward``, torchvision's Swin
  ``shifted_window_attention``): :func:`freeze_attention` returns a copy of the
  function, same code object, whose global ``softmax`` / ``F.softmax`` /
  ``scaled_dot_product_attention`` are the surrogates above.  Same code means
  the same ops in the same order: the forward is bit-exact by construction and
  follows whatever torch version is installed.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .registry import define_surrogate_op

__all__ = [
    "surrogate_softmax",
    "surrogate_scaled_dot_product_attention",
    "stop_gradient",
    "freeze_attention",
    "ExcitedMultiheadAttention",
]


# --------------------------------------------------------------- constant softmax
def _softmax_forward(x: Tensor, dim: int, dtype: Optional[torch.dtype]) -> Tensor:
    return torch.softmax(x, dim, dtype=dtype)


def _no_context(ctx, inputs, output) -> None:
    pass


def _zero_backward_1(ctx, grad: Tensor):
    return (None,)


def _zero_backward_3(ctx, grad: Tensor):
    return None, None, None


_constant_softmax = define_surrogate_op(
    "constant_softmax", _softmax_forward, setup_context=_no_context, backward=_zero_backward_3
)


def surrogate_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """``F.softmax(input, dim, dtype=dtype)`` bit for bit, with a zero backward (constant weights)."""
    if dim is None:
        dim = F._get_softmax_dim("softmax", input.dim(), _stacklevel)
    return _constant_softmax(input, int(dim), dtype)


# ---------------------------------------------------------------- stop gradient
def _stop_gradient_forward(x: Tensor) -> Tensor:
    # A custom op may not return its input or a view of it; the copy is the price of
    # a stop-gradient that survives torch.export's run_decompositions (which turns
    # aten.detach into aten.alias and so would silently drop a plain .detach()).
    return x.clone()


_stop_gradient = define_surrogate_op(
    "stop_gradient", _stop_gradient_forward, setup_context=_no_context, backward=_zero_backward_1
)


def stop_gradient(x: Tensor) -> Tensor:
    """``x`` (a copy) with no gradient flowing back, in every runtime including ``run_decompositions``."""
    return _stop_gradient(x)


def surrogate_scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with constant attention weights: no gradient to query or key."""
    return F.scaled_dot_product_attention(
        stop_gradient(query), stop_gradient(key), value, attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )


# ------------------------------------------------- untraceable attention functions
_FROZEN_NAMES = {
    "softmax": surrogate_softmax,
    "scaled_dot_product_attention": surrogate_scaled_dot_product_attention,
}


def _regloballed(fn: Callable, replacements: dict) -> Callable:
    scope = dict(fn.__globals__)
    scope.update(replacements)
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__module__ = fn.__module__
    copy.__wrapped_original__ = fn  # type: ignore[attr-defined]
    # torch functions re-dispatch to themselves by global name under a TorchFunctionMode
    # (``handle_torch_function(multi_head_attention_forward, ...)``, e.g. in non-strict
    # torch.export): that name must reach the copy, or the mode would run the original.
    if scope.get(fn.__name__) is fn:
        scope[fn.__name__] = copy
    return copy


def _frozen_functional() -> types.ModuleType:
    """A stand-in for ``torch.nn.functional`` whose attention entry points are frozen."""
    module = types.ModuleType("excitation_frozen_functional")
    module.__dict__.update({k: v for k, v in F.__dict__.items() if not k.startswith("__")})
    module.__dict__.update(_FROZEN_NAMES)
    module.multi_head_attention_forward = _regloballed(F.multi_head_attention_forward, _FROZEN_NAMES)
    return module


_FROZEN_F = _frozen_functional()


@functools.lru_cache(maxsize=None)
def freeze_attention(fn: Callable) -> Callable:
    """A copy of ``fn`` whose softmax and attention calls hold the attention weights constant."""
    replacements = {name: value for name, value in _FROZEN_NAMES.items() if name in fn.__code__.co_names}
    if fn.__globals__.get("F") is F:
        replacements["F"] = _FROZEN_F
    return _regloballed(fn, replacements)


_FROZEN_MHA_FORWARD = _regloballed(nn.MultiheadAttention.forward, {"F": _FROZEN_F})


class ExcitedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose attention weights are constants in the backward.

    Same parameters and state-dict keys (the excited model's module object is
    re-classed in place; the user's module is never touched).  Its forward is
    ``nn.MultiheadAttention.forward``'s own code with frozen softmax /
    scaled-dot-product calls, so it takes the same fast or slow path as the
    original and matches it bit for bit.
    """

    forward = _FROZEN_MHA_FORWARD
