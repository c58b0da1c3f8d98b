"""The exceptions excitation raises.  Each message names the problem and the fix."""

from __future__ import annotations

__all__ = ["ExcitationError", "ExcitationTraceError", "InplaceAliasError"]


class ExcitationError(RuntimeError):
    """Base class of every error raised by excitation itself."""


class ExcitationTraceError(ExcitationError):
    """``torch.fx.symbolic_trace`` could not trace the model; the message says where and what to do."""


class InplaceAliasError(ExcitationError):
    """An in-place ReLU mutates a tensor that other views read later; rewriting it would change values."""
