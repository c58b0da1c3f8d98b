"""Surrogate ops: exact forwards, excitation backwards.

Importing this package registers the ``excitation::`` ops with ``torch.library``;
``import excitation`` does it for you, and is all that
``torch.export.load`` needs to run a saved excited program.
"""

from .activations import SURROGATES, surrogate_prelu
from .attention import (
    ExcitedMultiheadAttention,
    freeze_attention,
    stop_gradient,
    surrogate_scaled_dot_product_attention,
    surrogate_softmax,
)
from .fused import batch_norm_relu
from .normalization import held_rsqrt, held_sqrt, surrogate_layer_norm, surrogate_native_layer_norm, surrogate_rms_norm
from .ops import surrogate_max_pool2d, surrogate_relu
from .pooling import surrogate_adaptive_max_pool, surrogate_max_pool
from .recompute import RecomputedConv2d

# The gated activations' surrogates by name (surrogate_hardtanh, surrogate_silu, ...), made from the table.
globals().update({function.__name__: function for function in SURROGATES.values()})

#: Every function an excited graph may call: fx keeps them as leaves when re-tracing.
SURROGATE_FUNCTIONS = (
    surrogate_relu,
    batch_norm_relu,
    surrogate_max_pool2d,
    surrogate_max_pool,
    surrogate_adaptive_max_pool,
    *SURROGATES.values(),
    surrogate_prelu,
    surrogate_layer_norm,
    surrogate_rms_norm,
    held_rsqrt,
    held_sqrt,
    surrogate_native_layer_norm,
    surrogate_softmax,
    surrogate_scaled_dot_product_attention,
)

__all__ = [
    "surrogate_relu",
    "batch_norm_relu",
    "surrogate_max_pool2d",
    "surrogate_max_pool",
    "surrogate_adaptive_max_pool",
    *(function.__name__ for function in SURROGATES.values()),
    "surrogate_prelu",
    "surrogate_layer_norm",
    "surrogate_rms_norm",
    "held_rsqrt",
    "held_sqrt",
    "surrogate_native_layer_norm",
    "surrogate_softmax",
    "surrogate_scaled_dot_product_attention",
    "stop_gradient",
    "freeze_attention",
    "ExcitedMultiheadAttention",
    "RecomputedConv2d",
    "SURROGATE_FUNCTIONS",
    "SURROGATES",
]
