"""A synthetic text task whose deciding token is known, and a tiny transformer trained on it.

``make_sequences(n, seed)`` draws sequences of :data:`LENGTH` tokens: a ``[CLS]`` token, then
distractor words and exactly one keyword, whose identity is the label (:data:`CLASSES` classes)
and whose position is the ground truth of a token attribution.  ``load_model()`` returns a
two-layer BERT-style classifier (Hugging Face ``BertForSequenceClassification``, random-free:
its weights ship in ``weights/``) trained on them in this repository
(``python -m excitation.tokens.train``).  transformers is needed to build it (the ``hf`` extra).
"""

from .task import CLASSES, CLS, KEYWORDS, LENGTH, VOCAB, KeywordSequences, make_sequences
from .model import build_model, load_model

__all__ = ["CLASSES", "CLS", "KEYWORDS", "LENGTH", "VOCAB", "KeywordSequences", "make_sequences", "build_model",
           "load_model"]
