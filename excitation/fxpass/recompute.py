"""The pass step that lets ``torch.compile`` recompute cheap convolutions feeding pooled ReLUs.

After the rewrite (and fusion), each ``nn.Conv2d`` call that

* is cheap to recompute (:func:`excitation.kernels.recompute.cheap_to_recompute`), and
* feeds, alone, a ReLU site (fused with its BatchNorm, or through one) whose every user is a
  2-D max-pool site,

gets its module re-classed to :class:`~excitation.kernels.recompute.RecomputedConv2d`.  The
module is the excited model's own clone; the user's stays an ``nn.Conv2d``.  Why, with
measurements: :mod:`excitation.kernels.recompute`.

The ``"excitation"`` backend sees dynamo's graphs instead, where convolutions are
``torch.conv2d`` calls and nothing is a module: its lowering (:func:`.lowering.lower`) writes the
checkpoint policy's recompute tag onto such a convolution and its ReLU site, chosen by the same
selector (:func:`.lowering.pooled_site_fed_by`).
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn as nn
from torch import fx

from ..kernels import RecomputedConv2d
from ..kernels.recompute import cheap_to_recompute
from .lowering import pooled_site_fed_by

__all__ = ["recompute_cheap_convolutions"]


def recompute_cheap_convolutions(gm: fx.GraphModule, enabled: bool = True) -> List[str]:
    """Re-class the qualifying convolutions of ``gm`` (see the module docstring); return their paths.

    ``enabled=False`` (compact saved gates, which keep no ``z`` to save) turns every
    :class:`RecomputedConv2d` of ``gm`` back into ``nn.Conv2d``, so re-exciting never
    keeps a choice that no longer applies.  Modules are edited in place: call this on
    the excited model's clones only.
    """
    # A module called from several places is recomputed only if every call qualifies.
    every_call_qualifies: Dict[str, bool] = {}
    if enabled:
        for node in gm.graph.nodes:
            if node.op == "call_module" and cheap_to_recompute(gm.get_submodule(node.target)):
                qualifies = pooled_site_fed_by(gm, node) is not None
                every_call_qualifies[node.target] = every_call_qualifies.get(node.target, True) and qualifies
    chosen = {target for target, qualifies in every_call_qualifies.items() if qualifies}
    for name, module in gm.named_modules():
        if type(module) in (nn.Conv2d, RecomputedConv2d):
            module.__class__ = RecomputedConv2d if name in chosen else nn.Conv2d
    return sorted(chosen)
