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
    """Base class of every error raised by excitation itself.

    A ``RuntimeError``; catch it to handle any refusal of the package (an untraceable model,
    an unsafe in-place op, a dynamo frame that would run vanilla, an incomplete extract store).

    Examples
    --------
    >>> import torch, excitation
    >>> try:
    ...     excitation.report(torch.nn.ReLU())
    ... except excitation.ExcitationError as error:
    ...     print(type(error).__name__)
    ExcitationError
    """


class ExcitationTraceError(ExcitationError):
    """``torch.fx.symbolic_trace`` could not trace the model; the message says where and what to do.

    :func:`excitation.excite` raises it; :func:`excitation.pullback` and the other entry points
    take the dynamo path instead (see the documentation's "Models fx cannot trace").

    Examples
    --------
    >>> import torch, excitation
    >>> class Branchy(torch.nn.Module):
    ...     def forward(self, x):
    ...         return torch.relu(x) if x.sum() > 0 else -x
    >>> try:
    ...     excitation.excite(Branchy())
    ... except excitation.ExcitationTraceError:
    ...     print("not traceable by fx")
    not traceable by fx
    """


class InplaceAliasError(ExcitationError):
    """An in-place ReLU mutates a tensor that other views read later; rewriting it would change values.

    The message names the graph nodes.  Make the ReLU out of place (``inplace=False``), or
    do not read the views after it.
    """
