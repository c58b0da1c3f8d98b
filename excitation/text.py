"""Token-level pullbacks for language models: with respect to the input embeddings.

Token ids are integers and carry no gradient, so a text pullback is taken where the ids become
vectors: at the input embeddings.  :func:`pullback` embeds the ids with the model's own
embedding layer, runs the excited model on those embeddings (``inputs_embeds=``) and pulls the
target back to them, ``[N, T, D]``; each token then gets one score by a documented reduction:

* ``"input_x_pullback"``: ``sum_d pullback[t, d] * embedding[t, d]``, the embedding-space analogue
  of gradient x input, signed;
* ``"l2"``: ``||pullback[t]||``, unsigned.

The target is a class (``*ForSequenceClassification``: ``logits [N, classes]``) or a token at a
position (causal LMs: ``logits [N, T, vocab]``; by default the model's own prediction for the
token after the last one).  :func:`gradient` gives the same for the vanilla gradient, for
comparison.  The result, a :class:`TokenAttribution`, shows itself as a heatmap over the tokens
(HTML inline in Jupyter, :meth:`TokenAttribution.to_html`, or :meth:`TokenAttribution.to_terminal`).

This follows Captum's ``LLMGradientAttribution`` and inseq: one attribution per input token for
one target token, the target's log-probability or logit as the score.

    >>> result = excitation.text.pullback(model, input_ids, tokenizer=tokenizer)   # doctest: +SKIP
    >>> result.scores("input_x_pullback")                                            # doctest: +SKIP
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .fxpass.options import Options, TempsSpec
from .fxpass.rules import RulesSpec

__all__ = ["TokenAttribution", "REDUCTIONS", "SCORES", "pullback", "gradient", "embeddings_model", "token_scores",
           "EmbeddingsForward"]

#: The per-token reductions of an embedding-space pullback.
REDUCTIONS = ("input_x_pullback", "l2")

TokenTarget = Union[None, int, Sequence[int], Tensor]


class EmbeddingsForward(nn.Module):
    """``model(inputs_embeds=e, attention_mask=m).logits``: a language model as a function of its input embeddings.

    What the excitation pass sees: a module with a float input, whose output is the logits
    tensor (so the forward check compares them bit for bit).  The mask is always passed (all
    ones where the caller gave none), so a model that branches on ``attention_mask is None``
    traces one branch.  It holds the model itself (no copy); :func:`excitation.prepare` excites a
    clone of it, as of any model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, embeddings: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(inputs_embeds=embeddings, attention_mask=attention_mask)
        if isinstance(out, Tensor):
            return out
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            fields = list(out.keys()) if isinstance(out, Mapping) else type(out).__name__
            raise ValueError(f"{type(self.model).__name__} returned no logits (fields: {fields}); excitation.text "
                             f"needs a model with a classification or language-modelling head.")
        return logits


_WRAPPERS: "weakref.WeakKeyDictionary[nn.Module, EmbeddingsForward]" = weakref.WeakKeyDictionary()
_WRAPPERS_LOCK = threading.Lock()


def embeddings_model(model: nn.Module) -> EmbeddingsForward:
    """The :class:`EmbeddingsForward` of ``model``, one per model (so it is excited and compiled once)."""
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise TypeError(f"{type(model).__name__} has no get_input_embeddings(); excitation.text takes Hugging Face "
                        f"language models (or any model with get_input_embeddings() and inputs_embeds=).")
    with _WRAPPERS_LOCK:
        wrapper = _WRAPPERS.get(model)
        if wrapper is None:
            wrapper = _WRAPPERS[model] = EmbeddingsForward(model)
    return wrapper


@dataclass
class TokenAttribution:
    """One attribution per input token, for one target per sequence.

    Attributes
    ----------
    input_ids : Tensor [N, T]
    embeddings : Tensor [N, T, D]
        The input embeddings the model ran on.
    attribution : Tensor [N, T, D]
        The pullback (or gradient) of the target's score with respect to ``embeddings``.
    target : Tensor [N]
        The class, or the token id, each sequence's score is taken from.
    position : Tensor [N] or None
        The position whose logits hold the target token (causal LMs), else ``None``.
    tokens : list of list of str, optional
        The input tokens as text (from ``tokenizer``), for display.
    method : str
        ``"pullback"`` or ``"gradient"``.
    attention_mask : Tensor [N, T] or None
    """

    input_ids: Tensor
    embeddings: Tensor
    attribution: Tensor
    target: Tensor
    position: Optional[Tensor] = None
    tokens: Optional[List[List[str]]] = None
    method: str = "pullback"
    attention_mask: Optional[Tensor] = None
    target_tokens: Optional[List[str]] = field(default=None)

    def scores(self, reduction: str = "input_x_pullback") -> Tensor:
        """One score per token, ``[N, T]`` (:func:`token_scores`); padded positions are 0."""
        found = token_scores(self.attribution, self.embeddings, reduction)
        if self.attention_mask is not None:
            found = found * self.attention_mask.to(found.dtype)
        return found

    def to_html(self, reduction: str = "input_x_pullback", *, index: int = 0) -> str:
        """Sequence ``index`` as an HTML heatmap over its tokens (see :mod:`excitation.token_heatmap`)."""
        from .token_heatmap import tokens_html

        return tokens_html(self._tokens(index), self.scores(reduction)[index], title=self._title(reduction, index))

    def save_html(self, path: Any, reduction: str = "input_x_pullback") -> Any:
        """Every sequence as one standalone HTML page; returns the path."""
        from .token_heatmap import save_page

        parts = [self.to_html(reduction, index=i) for i in range(self.input_ids.shape[0])]
        return save_page(path, parts, title=f"excitation.text: {self.method}, {reduction}")

    def to_terminal(self, reduction: str = "input_x_pullback", *, index: int = 0, color: bool = True) -> str:
        """Sequence ``index`` with each token coloured by its score (ANSI), or scores in brackets without colour."""
        from .token_heatmap import tokens_terminal

        return tokens_terminal(self._tokens(index), self.scores(reduction)[index], color=color)

    def _repr_html_(self) -> str:  # Jupyter shows the first sequence
        return self.to_html()

    def _tokens(self, index: int) -> List[str]:
        if self.tokens is not None:
            return list(self.tokens[index])
        return [str(int(t)) for t in self.input_ids[index]]

    def _title(self, reduction: str, index: int) -> str:
        target = self.target_tokens[index] if self.target_tokens else str(int(self.target[index]))
        where = f" at position {int(self.position[index])}" if self.position is not None else ""
        return f"{self.method} of {target!r}{where}, {reduction}"


def token_scores(attribution: Tensor, embeddings: Tensor, reduction: str = "input_x_pullback") -> Tensor:
    """Reduce ``[N, T, D]`` attributions to ``[N, T]`` token scores (module docstring)."""
    if reduction == "input_x_pullback":
        return (attribution * embeddings).sum(-1)
    if reduction == "l2":
        return attribution.norm(dim=-1)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def _check_ids(model: nn.Module, input_ids: Any, attention_mask: Optional[Tensor]) -> Tensor:
    if not isinstance(input_ids, Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        kind = type(input_ids).__name__ if not isinstance(input_ids, Tensor) else f"a {input_ids.dtype} tensor"
        raise TypeError(f"input_ids must be an integer tensor of token ids [N, T], got {kind}; tokenize the text "
                        f"first, e.g. tokenizer(texts, return_tensors='pt').input_ids.")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape [N, T] with N, T >= 1, got {tuple(input_ids.shape)}.")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                         f"{tuple(input_ids.shape)}; they must match.")
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model.get_input_embeddings(), "num_embeddings") \
        else None
    if vocab is not None and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise IndexError(f"input_ids holds ids outside the vocabulary [0, {vocab}).")
    return input_ids


def _positions(logits: Tensor, position: Union[None, int, Sequence[int], Tensor], attention_mask: Optional[Tensor],
               batch: int, length: int) -> Tensor:
    """The position per sequence whose logits the target is read from (last real token by default)."""
    device = logits.device
    if position is None:
        if attention_mask is None:
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        # Right padding: the last position the mask keeps; left padding: the last position.
        last = attention_mask.long().cumsum(1).argmax(1)
        return last.to(device)
    index = torch.as_tensor(position, dtype=torch.long, device=device).reshape(-1)
    if index.numel() == 1:
        index = index.expand(batch)
    if index.numel() != batch:
        raise ValueError(f"position has {index.numel()} entries for {batch} sequences; pass one, or one per sequence.")
    index = torch.where(index < 0, index + length, index)
    if bool(((index < 0) | (index >= length)).any()):
        raise IndexError(f"position {position} is outside the sequence of length {length} "
                         f"(valid: {-length} to {length - 1}).")
    return index


#: What a target's score is: its logit, or its log-probability (Captum's LLM attribution and inseq take that).
SCORES = ("logit", "log_prob")


def _attribute(model: nn.Module, input_ids: Tensor, target: TokenTarget, *, position: Any, attention_mask: Any,
               tokenizer: Any, excited: bool, options: Optional[Options], keywords: Dict[str, Any],
               score: str = "logit") -> TokenAttribution:
    from . import api

    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
    wrapper = embeddings_model(model)
    input_ids = _check_ids(model, input_ids, attention_mask)
    module = api.prepare(wrapper, excited=excited, options=options, **keywords) if excited else \
        api.prepare(wrapper, excited=False)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(input_ids.to(_device(model)))
    batch, length = input_ids.shape
    mask = attention_mask.to(embeddings.device) if attention_mask is not None else None
    leaf = embeddings.detach().requires_grad_(True)
    with torch.enable_grad():  # prepare() returns the module in eval mode
        logits = module(leaf, mask if mask is not None else torch.ones_like(input_ids, device=leaf.device))
        positions = None
        if logits.dim() == 3:  # a language-modelling head: [N, T, vocab]
            positions = _positions(logits, position, mask, batch, length)
            rows = logits[torch.arange(batch, device=logits.device), positions]
        elif logits.dim() == 2:
            if position is not None:
                raise ValueError("position= applies to language-modelling heads ([N, T, vocab] logits); this model "
                                 "classifies whole sequences ([N, classes]).")
            rows = logits
        else:
            raise ValueError(f"the model's logits have shape {tuple(logits.shape)}; expected [N, classes] or "
                             f"[N, T, vocab].")
        if target is None:
            chosen = rows.detach().argmax(-1)
        else:
            chosen = api.target_indices(target, batch, rows.shape[-1], device=rows.device)
        if score == "log_prob":  # after the model: the normalisation over the vocabulary is the score's own
            rows = rows.float().log_softmax(-1)
        total = rows.gather(1, chosen[:, None]).sum()
        (attribution,) = torch.autograd.grad(total, leaf)
    tokens = target_tokens = None
    if tokenizer is not None:
        tokens = [tokenizer.convert_ids_to_tokens([int(t) for t in row]) for row in input_ids]
        if positions is not None:
            target_tokens = tokenizer.convert_ids_to_tokens([int(t) for t in chosen])
    return TokenAttribution(input_ids=input_ids, embeddings=embeddings.detach(), attribution=attribution.detach(),
                            target=chosen.detach(), position=positions, tokens=tokens,
                            method="pullback" if excited else "gradient", attention_mask=mask,
                            target_tokens=target_tokens)


def _device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def pullback(
    model: nn.Module,
    input_ids: Tensor,
    target: TokenTarget = None,
    *,
    position: Union[None, int, Sequence[int], Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    tokenizer: Any = None,
    score: str = "logit",
    options: Optional[Options] = None,
    preset: Optional[str] = None,
    temp: Optional[float] = None,
    gate: Optional[str] = None,
    temps: TempsSpec = None,
    rules: RulesSpec = None,
) -> TokenAttribution:
    """The excitation pullback of a language model's target with respect to its input embeddings.

    Parameters
    ----------
    model : nn.Module
        A Hugging Face model with a head (``*ForSequenceClassification``, ``*ForCausalLM``, ...),
        or any module with ``get_input_embeddings()`` that takes ``inputs_embeds=``.  Never modified.
    input_ids : LongTensor [N, T] (or [T])
        Token ids.
    target : int, sequence of ints, LongTensor [N] or None
        The class (sequence classification) or the token id (language modelling) per sequence.
        ``None``: the model's own top prediction.
    position : int, sequence or LongTensor [N], optional
        Language models: the position whose logits predict the target (negative counts from the
        end).  Default: the last real token (by ``attention_mask``), i.e. the next token.
    attention_mask : Tensor [N, T], optional
        As the model takes it; padded tokens score 0.
    tokenizer : optional
        For the tokens' text in displays (``convert_ids_to_tokens``).
    score : {"logit", "log_prob"}
        The target's logit, or its log-probability (the score Captum's LLM attribution uses).
    options, preset, temp, gate, temps, rules
        As for :func:`excitation.excite`.

    Returns
    -------
    TokenAttribution
        ``.attribution`` [N, T, D], ``.scores(reduction)`` [N, T], ``.to_html()``, ``.to_terminal()``.

    Raises
    ------
    TypeError
        ``input_ids`` are not integer ids; the model has no input embeddings.
    IndexError
        An id outside the vocabulary, a position past the sequence, a target past the logits.
    excitation.ExcitationError
        A site would keep a vanilla backward (the census of the dynamo path).
    """
    keywords = {k: v for k, v in dict(preset=preset, temp=temp, gate=gate, temps=temps, rules=rules).items()
                if v is not None}
    return _attribute(model, input_ids, target, position=position, attention_mask=attention_mask,
                      tokenizer=tokenizer, excited=True, options=options, keywords=keywords, score=score)


def gradient(
    model: nn.Module,
    input_ids: Tensor,
    target: TokenTarget = None,
    *,
    position: Union[None, int, Sequence[int], Tensor] = None,
    attention_mask: Optional[Tensor] = None,
    tokenizer: Any = None,
    score: str = "logit",
) -> TokenAttribution:
    """The vanilla gradient with respect to the input embeddings, as :func:`pullback` takes it, for comparison."""
    return _attribute(model, input_ids, target, position=position, attention_mask=attention_mask,
                      tokenizer=tokenizer, excited=False, options=None, keywords={}, score=score)
