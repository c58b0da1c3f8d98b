"""Token heatmaps: one score per token as coloured text, in HTML (Jupyter, a standalone page) or a terminal.

Signed scores use a diverging scale (red positive, blue negative), unsigned ones a sequential
red; either way the colour's strength is ``|score| / max |score|`` over the sequence, so the
strongest token is full colour and each sequence is read on its own scale (stated in the title).
Every token keeps its score in a tooltip (``title=``).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import List, Sequence, Union

from torch import Tensor

__all__ = ["tokens_html", "tokens_terminal", "save_page", "token_text"]

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}}
.excitation-tokens{{line-height:2em;margin:1em 0}}
.excitation-tokens span{{padding:0.15em 0.1em;border-radius:0.2em;font-family:monospace}}</style>
</head><body>
{body}
</body></html>
"""


def token_text(token: str) -> str:
    """A token as it reads: byte-level BPE's ``Ġ`` and SentencePiece's ``▁`` become a space, ``Ċ`` a newline mark."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "⏎")


def _check(tokens: Sequence[str], scores: Union[Tensor, Sequence[float]]) -> List[float]:
    values = scores.detach().float().cpu().tolist() if isinstance(scores, Tensor) else [float(v) for v in scores]
    if len(values) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} scores; pass one score per token.")
    if any(v != v for v in values):
        raise ValueError("scores hold NaN; a token heatmap needs finite scores.")
    return values


def _scale(values: List[float]) -> float:
    peak = max((abs(v) for v in values), default=0.0)
    return peak if peak > 0 else 1.0


def _rgba(value: float, peak: float, signed: bool) -> str:
    strength = min(abs(value) / peak, 1.0)
    red = value >= 0 or not signed
    return f"rgba({214 if red else 33},{39 if red else 102},{40 if red else 172},{0.85 * strength:.3f})"


def tokens_html(tokens: Sequence[str], scores: Union[Tensor, Sequence[float]], *, title: str = "") -> str:
    """An HTML fragment: ``tokens`` as spans coloured by ``scores`` (module docstring), with a title line."""
    values = _check(tokens, scores)
    signed = any(v < 0 for v in values)
    peak = _scale(values)
    spans = "".join(
        f'<span style="background:{_rgba(v, peak, signed)}" title="{v:.4g}">{html.escape(token_text(t))}</span>'
        for t, v in zip(tokens, values)
    )
    legend = f"{'red +, blue −' if signed else 'red'}; full colour = |score| {peak:.3g}"
    head = f"<div><b>{html.escape(title)}</b> <small>({legend})</small></div>" if title else \
        f"<div><small>({legend})</small></div>"
    return f'<div class="excitation-tokens">{head}<div>{spans}</div></div>'


def save_page(path: Union[str, Path], fragments: Sequence[str], *, title: str = "excitation") -> Path:
    """Write ``fragments`` (from :func:`tokens_html`) as one standalone HTML page; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_PAGE.format(title=html.escape(title), body="\n".join(fragments)), encoding="utf-8")
    return path


def tokens_terminal(tokens: Sequence[str], scores: Union[Tensor, Sequence[float]], *, color: bool = True) -> str:
    """``tokens`` with 24-bit ANSI background colours by ``scores``; ``color=False``: ``token[score]`` plain text."""
    values = _check(tokens, scores)
    if not color:
        return " ".join(f"{token_text(t).strip() or repr(t)}[{v:+.3g}]" for t, v in zip(tokens, values))
    signed = any(v < 0 for v in values)
    peak = _scale(values)
    parts = []
    for t, v in zip(tokens, values):
        strength = min(abs(v) / peak, 1.0)
        base = (214, 39, 40) if (v >= 0 or not signed) else (33, 102, 172)
        r, g, b = (round(255 + (c - 255) * strength) for c in base)
        parts.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;0;0;0m{token_text(t)}\x1b[0m")
    return "".join(parts)
