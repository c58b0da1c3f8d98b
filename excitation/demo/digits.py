"""scikit-learn's digits, upsampled to 32x32, and the two small CNNs the demo uses.

Everything here works offline: the data ships inside scikit-learn and the
weights ship inside this package (``weights/``).  ``python -m
excitation.demo.train`` reproduces the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DigitsA", "DigitsB", "MODELS", "load_digits", "load_model", "WEIGHTS_DIR", "SPLIT_SEED"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
SIZE = 32
SPLIT_SEED = 0
TEST_FRACTION = 0.25


def load_digits() -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
    """``((x_train, y_train), (x_test, y_test))``: images [N, 1, 32, 32] in [0, 1], labels [N].

    The split is a fixed permutation (seed ``SPLIT_SEED``), 25 % held out.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits demo needs scikit-learn: pip install scikit-learn") from exc
    bunch = sklearn_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(TEST_FRACTION * len(labels)))
    test, train = order[:n_test], order[n_test:]
    return (images[train], labels[train]), (images[test], labels[test])


class DigitsA(nn.Module):
    """Three conv-BN-ReLU stages with two 2x2 max-pools, global average pool, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class DigitsB(nn.Module):
    """A different design: 5x5 conv, overlapping 3x3 pool, functional ReLUs, an MLP head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5, padding=2)
        self.conv2 = nn.Conv2d(24, 48, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(48)
        self.fc1 = nn.Linear(48 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 3, stride=2, padding=1)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@dataclass(frozen=True)
class Spec:
    cls: type
    seed: int
    file: str


MODELS: Dict[str, Spec] = {
    "a": Spec(DigitsA, seed=1, file="digits_a.pt"),
    "b": Spec(DigitsB, seed=2, file="digits_b.pt"),
}


def load_model(name: str) -> nn.Module:
    """The trained demo model ``"a"`` or ``"b"``, in eval mode."""
    if name not in MODELS:
        raise ValueError(f"unknown demo model {name!r}; use one of {sorted(MODELS)}.")
    spec = MODELS[name]
    path = WEIGHTS_DIR / spec.file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m excitation.demo.train` to recreate it.")
    model = spec.cls()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
