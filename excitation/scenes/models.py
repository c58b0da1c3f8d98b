"""Two small multi-label CNNs for the scenes, their committed weights, and an evaluation helper.

Both take ``[N, 3, H, W]`` pixels in ``[0, 1]`` (normalisation is their first step),
end in global average pooling (so any input side works, e.g. a 128 x 128 mosaic of
four scenes) and return 10 logits, one per class of :data:`CLASSES`, trained with
BCE-with-logits.  ``model.cam_layer`` names the last convolutional block, usable as
``model.get_submodule(model.cam_layer)`` for Grad-CAM.

* ``resnet`` (:class:`SceneResNet`): the seed paper's family at toy widths: a
  stride-2 stem with BatchNorm, ReLU and max-pool, then three residual basic blocks
  (BatchNorm before every ReLU, residual sums before the block's last ReLU).
* ``vgg`` (:class:`SceneVGG`): a second, independent design: plain 3 x 3 conv +
  BatchNorm + ReLU stacks separated by 2 x 2 max-pools, no skip connections.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .generate import Scenes
from .shapes import CLASSES

__all__ = ["SceneResNet", "SceneVGG", "MODELS", "WEIGHTS_DIR", "load_model", "evaluate_model", "predict"]

WEIGHTS_DIR = Path(__file__).with_name("weights")

#: Per-channel mean and std of the scenes' pixels (rounded), applied inside the models.
MEAN = (0.47, 0.45, 0.42)
STD = (0.26, 0.25, 0.26)


class _Normalise(nn.Module):
    """``(x - mean) / std`` with fixed, non-persistent statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, as in torchvision's ResNet-18."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class SceneResNet(nn.Module):
    """Stem (5 x 5 conv, stride 2, BN, ReLU, 3 x 3 max-pool, stride 2), three basic blocks, GAP, linear.

    Feature maps for a 64 x 64 input: 32 x 32 after the stem's convolution, 16 x 16
    after its pool (``layer1``, 32 channels), 8 x 8 in ``layer2`` (64) and ``layer3``
    (96, stride 1 so Grad-CAM keeps 8 x 8).
    """

    cam_layer = "layer3"

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.normalise = _Normalise()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.layer1 = BasicBlock(32, 32)
        self.layer2 = BasicBlock(32, 64, stride=2)
        self.layer3 = BasicBlock(64, 96)
        self.head = nn.Linear(96, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(self.normalise(x)))))
        return self.head(x.mean((2, 3)))


def _conv(inputs: int, outputs: int) -> list:
    return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), nn.BatchNorm2d(outputs), nn.ReLU(inplace=True)]


class SceneVGG(nn.Module):
    """VGG-style: conv-BN-ReLU stacks (16 | 32 | 64 | 96, 96 channels) with 2 x 2 max-pools, GAP, linear.

    Feature maps for a 64 x 64 input: 64, 32, 16 and 8 pixels across; the last block
    (``features.3``, two convolutions) works at 8 x 8.
    """

    cam_layer = "features.3"

    def __init__(self, classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.normalise = _Normalise()
        self.features = nn.Sequential(
            nn.Sequential(*_conv(3, 16), nn.MaxPool2d(2)),
            nn.Sequential(*_conv(16, 32), nn.MaxPool2d(2)),
            nn.Sequential(*_conv(32, 64), nn.MaxPool2d(2)),
            nn.Sequential(*_conv(64, 96), *_conv(96, 96)),
        )
        self.head = nn.Linear(96, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalise(x)).mean((2, 3)))


@dataclass(frozen=True)
class Spec:
    """How a named model is built, seeded and stored."""

    build: Callable[[], nn.Module]
    seed: int
    file: str


MODELS: Dict[str, Spec] = {
    "resnet": Spec(SceneResNet, seed=11, file="resnet.pt"),
    "vgg": Spec(SceneVGG, seed=12, file="vgg.pt"),
}


def load_model(name: str) -> nn.Module:
    """The trained scenes classifier ``"resnet"`` or ``"vgg"``, in eval mode, float32.

    Parameters
    ----------
    name : str
        ``"resnet"`` or ``"vgg"``.

    Returns
    -------
    torch.nn.Module
        Takes ``[N, 3, H, W]`` pixels in ``[0, 1]``, returns ``[N, 10]`` logits; has ``cam_layer``.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the choices).
    FileNotFoundError
        If the weights file is missing.
    """
    if name not in MODELS:
        raise ValueError(f"unknown scenes model {name!r}; use one of {sorted(MODELS)}.")
    spec = MODELS[name]
    path = WEIGHTS_DIR / spec.file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `python -m excitation.scenes.train --model {name}` to recreate it.")
    model = spec.build()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict({key: value.float() for key, value in state.items()})
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch: int = 256) -> Tensor:
    """Sigmoid probabilities ``[N, 10]`` of ``model`` (put in eval mode) on ``images``, in batches.

    Parameters
    ----------
    model : torch.nn.Module
        A scenes classifier.
    images : Tensor
        ``[N, 3, H, W]`` in ``[0, 1]`` (float), or uint8 in ``[0, 255]``.
    batch : int
        Images per forward pass.

    Returns
    -------
    Tensor
    """
    model.eval()
    out = []
    for start in range(0, images.shape[0], batch):
        chunk = images[start : start + batch]
        if chunk.dtype == torch.uint8:
            chunk = chunk.float() / 255.0
        out.append(torch.sigmoid(model(chunk)))
    return torch.cat(out)


def evaluate_model(
    model: nn.Module, scenes: Union[Scenes, Tensor], labels: Optional[Tensor] = None, threshold: float = 0.5
) -> Dict[str, float]:
    """Mean average precision and exact-match accuracy of a scenes classifier.

    Parameters
    ----------
    model : torch.nn.Module
        A scenes classifier returning 10 logits.
    scenes : Scenes or Tensor
        A :class:`~excitation.scenes.Scenes`, or an image tensor (then pass ``labels``).
    labels : Tensor, optional
        ``[N, 10]`` multi-hot, when ``scenes`` is a tensor.
    threshold : float
        Probability above which a class counts as predicted.

    Returns
    -------
    dict
        ``{"map": ..., "exact_match": ..., "n": ...}``: the mean over classes of
        ``sklearn.metrics.average_precision_score``, and the fraction of scenes with all
        ten labels right.

    Raises
    ------
    ValueError
        If labels are missing or some class never occurs (its average precision is undefined).
    """
    from sklearn.metrics import average_precision_score

    images = scenes if isinstance(scenes, Tensor) else scenes.images
    if labels is None:
        if isinstance(scenes, Tensor):
            raise ValueError("pass labels= when scenes is an image tensor, or pass a Scenes.")
        labels = scenes.labels
    truth = labels.numpy().astype(bool)
    if not truth.any(0).all():
        raise ValueError("every class must occur at least once for mean average precision; use more scenes.")
    scores = predict(model, images).numpy()
    per_class = [average_precision_score(truth[:, c], scores[:, c]) for c in range(truth.shape[1])]
    exact = ((scores > threshold) == truth).all(1)
    return {"map": float(np.mean(per_class)), "exact_match": float(exact.mean()), "n": int(truth.shape[0])}
