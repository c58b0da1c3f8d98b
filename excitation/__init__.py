"""excitation: excitation pullbacks for any traced ReLU network, at close to the cost of a gradient.

A ReLU network's input gradient hard-gates every ReLU with ``1[z > 0]``.  The
excitation pullback keeps the forward pass bit-exact and soft-gates only the
backward: ``dz = g * sigmoid(z / temp)`` at ReLUs, and the gradient of soft
pooling ``sum_w softmax(x_w / temp) x_w`` at max-pools.  Rules of the same kind
cover ReLU6, LeakyReLU, SiLU, GELU, Hardswish, Hardsigmoid, LayerNorm, RMSNorm and
attention (:data:`RULES`; ``excite(model, rules=...)`` chooses among them).
Language models: :mod:`excitation.text` pulls back to the input embeddings.

>>> import torch, excitation
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
...                             torch.nn.Flatten(), torch.nn.Linear(8 * 3 * 3, 5)).eval()
>>> x = torch.rand(2, 3, 8, 8)
>>> excited = excitation.excite(model)            # torch.fx pass; model untouched
>>> excitation.report(excited).counts()           # what was rewritten
{'relu': 1, 'max_pool2d': 1}
>>> pb = excitation.pullback(model, x, target=3)  # or with `excited`
>>> pb.shape
torch.Size([2, 3, 8, 8])
>>> pb = excitation.pullback(model, x, 3, preset="semantic")  # the author's later rules

Importing this package registers the ``excitation::`` ops with
``torch.library``; that one import is all ``torch.export.load`` needs.
"""

from .api import clear_cache, gradient, prepare, pullback, pullbacks
from .ascent import IMAGENET_NORMALIZE, Normalized, ascend
from .calibrate import calibrate
from .evaluation import evaluate
from .explain import explain_dispatch
from .extract import extract, load_extract
from .errors import ExcitationError, ExcitationTraceError, InplaceAliasError
from .fxpass import Report, Site, Unhandled, excite, excite_graph, is_excited, report
from .fxpass.backend import backend
from .fxpass.options import Options
from .fxpass.rules import DEFAULT_RULES, RULES, Rule
from .gates import GATES
from .kernels import surrogate_max_pool2d, surrogate_relu
from .presets import DEFAULT_PRESET, POOL_BACKWARDS, PRESETS, Preset
from .quantus import quantus_explain_func
from . import text

__version__ = "0.2.0"

__all__ = [
    "excite",
    "excite_graph",
    "text",
    "Options",
    "backend",
    "report",
    "is_excited",
    "pullback",
    "ascend",
    "calibrate",
    "evaluate",
    "quantus_explain_func",
    "extract",
    "load_extract",
    "IMAGENET_NORMALIZE",
    "Normalized",
    "pullbacks",
    "gradient",
    "prepare",
    "clear_cache",
    "explain_dispatch",
    "surrogate_relu",
    "surrogate_max_pool2d",
    "Report",
    "Site",
    "Unhandled",
    "GATES",
    "PRESETS",
    "DEFAULT_PRESET",
    "POOL_BACKWARDS",
    "Preset",
    "RULES",
    "DEFAULT_RULES",
    "Rule",
    "ExcitationError",
    "ExcitationTraceError",
    "InplaceAliasError",
]
