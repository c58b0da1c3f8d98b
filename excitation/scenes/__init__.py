"""Seeded, offline scenes with exact ground truth, and two small CNNs trained on them.

``make_scenes(n, seed)`` draws one or two of ten shapes (:data:`CLASSES`) on crops of
natural photos bundled with scikit-image, with multi-hot labels and the exact visible
pixels of every object.  ``load_model("resnet")`` and ``load_model("vgg")`` return
two multi-label classifiers trained on them in this repository
(``python -m excitation.scenes.train``), whose weights ship in ``weights/``;
``evaluate_model`` gives their mean average precision and exact-match accuracy.
"""

from .generate import Scenes, make_labels, make_scenes
from .models import evaluate_model, load_model
from .shapes import CLASSES

__all__ = ["CLASSES", "Scenes", "make_scenes", "make_labels", "load_model", "evaluate_model"]
