"""Which tensor of a model's output a pullback starts from.

torchvision and timm classifiers return their logits; Hugging Face models return a
``ModelOutput`` (an ordered dict whose fields are also attributes: ``logits``, ``loss``,
``hidden_states``, ...), and other models a tuple or a dict.  :func:`select_output` takes the
logits by itself where there are logits to take, and otherwise says what the output holds and
how to choose (``output=``).
"""

from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Union

from torch import Tensor

__all__ = ["OutputSpec", "select_output", "output_fields"]

#: How to choose the tensor: ``None`` (the output itself, or its ``logits``), a field or key
#: name, a position in a tuple, or ``callable(output) -> Tensor``.
OutputSpec = Optional[Union[str, int, Callable[[Any], Tensor]]]


def output_fields(out: Any) -> List[str]:
    """The names (or positions) one could pass as ``output=`` for ``out``."""
    if isinstance(out, Mapping):
        return [str(key) for key, value in out.items() if value is not None]
    if isinstance(out, (tuple, list)):
        names = getattr(out, "_fields", None)
        return list(names) if names else [str(i) for i in range(len(out))]
    return []


def select_output(out: Any, output: OutputSpec = None) -> Tensor:
    """The tensor of ``out`` that targets index: ``out`` itself, its ``logits``, or what ``output`` names.

    Parameters
    ----------
    out
        What the model returned.
    output : str, int, callable or None
        ``None``: ``out`` if it is a tensor, else its ``logits`` field (a Hugging Face
        ``ModelOutput``, a dict, a named tuple).  A string: that field or key.  An int: that
        position of a tuple.  A callable: ``output(out)``.

    Raises
    ------
    ValueError
        No tensor to take: the message lists the output's fields and says how to choose one.
    """
    if output is None:
        if isinstance(out, Tensor):
            return out
        chosen = _field(out, "logits")
        if isinstance(chosen, Tensor):
            return chosen
        raise ValueError(
            f"the model returned a {type(out).__name__}, not a tensor, and it has no 'logits' "
            f"(its fields: {', '.join(output_fields(out)) or 'none'}); pass output= with a field name, "
            f"e.g. output={(output_fields(out) or ['last_hidden_state'])[0]!r}, or a callable mapping the output "
            f"to a tensor."
        )
    if callable(output):
        chosen = output(out)
        where = "output(out)"
    elif isinstance(output, bool) or not isinstance(output, (str, int)):
        raise TypeError(f"output must be a field name, a position, a callable or None; got {type(output).__name__}.")
    else:
        chosen = _field(out, output)
        where = f"output={output!r}"
    if not isinstance(chosen, Tensor):
        raise ValueError(
            f"{where} gave a {type(chosen).__name__}, not a tensor; the model's output is a {type(out).__name__} "
            f"with fields: {', '.join(output_fields(out)) or 'none'}."
        )
    return chosen


def _field(out: Any, name: Union[str, int]) -> Any:
    if isinstance(name, int) and isinstance(out, (tuple, list)):
        return out[name] if -len(out) <= name < len(out) else None
    if isinstance(name, str):
        if isinstance(out, Mapping) and name in out:
            return out[name]
        if not isinstance(out, Tensor):
            return getattr(out, name, None)
    return None
