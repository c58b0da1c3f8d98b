"""The keyword task's classifier: a two-layer BERT-style transformer, built from a fixed config."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn as nn

from .task import CLASSES, LENGTH, VOCAB

__all__ = ["CONFIG", "WEIGHTS", "build_model", "load_model"]

#: ``transformers.BertConfig`` fields of the model (dropout off: the trained model is used in eval mode).
CONFIG: Dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
    max_position_embeddings=LENGTH, type_vocab_size=1, num_labels=CLASSES, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, pad_token_id=0,
)
WEIGHTS = Path(__file__).parent / "weights" / "keyword.pt"


def build_model(seed: int = 0) -> nn.Module:
    """The untrained classifier (``transformers.BertForSequenceClassification``), seeded."""
    try:
        import transformers
    except ImportError:
        raise ImportError("the keyword task's model is a Hugging Face BERT: pip install -e .[hf]") from None
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**CONFIG))


def load_model() -> nn.Module:
    """The trained classifier, in eval mode, float32 (``python -m excitation.tokens.train`` made its weights)."""
    if not WEIGHTS.exists():
        raise FileNotFoundError(f"{WEIGHTS} is missing; run `python -m excitation.tokens.train` to recreate it.")
    model = build_model()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()
