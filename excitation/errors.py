"""The exceptions excitation raises.  Each message names the problem and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["ExcitationError", "ExcitationTraceError", "InplaceAliasError", "with_suggestions"]


def with_suggestions(unknown: Iterable[object], known: Iterable[str]) -> str:
    """``"'gelus' (did you mean 'gelu'?), 'x'"``: each unknown name with its closest known ones."""
    candidates = sorted(known)
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), candidates, n=3)
        hints.append(f"{key!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
    return ", ".join(hints)


class ExcitationError(RuntimeError):
    """Base class of every error raised by excitation itself."""


class ExcitationTraceError(ExcitationError):
    """``torch.fx.symbolic_trace`` could not trace the model; the message says where and what to do."""


class InplaceAliasError(ExcitationError):
    """An in-place ReLU mutates a tensor that other views read later; rewriting it would change values."""
