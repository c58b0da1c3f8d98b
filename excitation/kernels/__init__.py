"""Surrogate ops: exact forwards, excitation backwards.

Importing this package registers the ``excitation::`` ops with ``torch.library``;
``import excitation`` does it for you, and is all that
``torch.export.load`` needs to run a saved excited program.
"""

from .ops import surrogate_max_pool2d, surrogate_relu

__all__ = ["surrogate_relu", "surrogate_max_pool2d"]
