"""The keyword task: one keyword among distractor words decides the class, at a known position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["VOCAB", "LENGTH", "CLASSES", "CLS", "KEYWORDS", "DISTRACTORS", "KeywordSequences", "make_sequences",
           "token_names"]

#: Token ids: 0 padding (unused), 1 ``[CLS]``, 2-3 reserved, 4-7 the keywords of classes 0-3, 8-39 distractors.
VOCAB = 40
#: Tokens per sequence, ``[CLS]`` included.
LENGTH = 12
CLASSES = 4
CLS = 1
KEYWORDS = (4, 5, 6, 7)
DISTRACTORS = (8, VOCAB)


@dataclass(frozen=True)
class KeywordSequences:
    """``input_ids [N, LENGTH]``, ``labels [N]`` and ``keyword [N]``, the position of the deciding token."""

    input_ids: Tensor
    labels: Tensor
    keyword: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def make_sequences(n: int, seed: int) -> KeywordSequences:
    """``n`` sequences: ``[CLS]``, then ``LENGTH - 1`` distractors of which one, at a random position, is the keyword.

    The same ``(n, seed)`` gives the same sequences on every machine (a CPU generator).
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}.")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(DISTRACTORS[0], DISTRACTORS[1], (n, LENGTH), generator=generator)
    ids[:, 0] = CLS
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    keyword = torch.randint(1, LENGTH, (n,), generator=generator)
    ids[torch.arange(n), keyword] = torch.tensor(KEYWORDS)[labels]
    return KeywordSequences(ids, labels, keyword)


def token_names(ids: Tensor) -> list:
    """Readable tokens for displays: ``[CLS]``, ``KEY0``..``KEY3``, ``w8``..``w39``."""
    names = {CLS: "[CLS]", 0: "[PAD]", **{k: f"KEY{i}" for i, k in enumerate(KEYWORDS)}}
    return [[names.get(int(t), f"w{int(t)}") for t in row] for row in ids]
