"""The pass step that lets ``torch.compile`` recompute cheap convolutions feeding pooled ReLUs.

After the rewrite (and fusion), each ``nn.Conv2d`` call that

* is cheap to recompute (:func:`excitation.kernels.recompute.cheap_to_recompute`), and
* feeds, alone, a ReLU site (fused with its BatchNorm, or through one) whose every user is a
  2-D max-pool site,

gets its module re-classed to :class:`~excitation.kernels.recompute.RecomputedConv2d`.  The
module is the excited model's own clone; the user's stays an ``nn.Conv2d``.  Why, with
measurements: :mod:`excitation.kernels.recompute`.

The ``"excitation"`` backend sees dynamo's graphs instead, where convolutions are
``torch.conv2d`` calls and nothing is a module: :func:`tag_cheap_convolutions` writes the
checkpoint policy's recompute tag onto such a convolution and its ReLU site directly.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

from ..kernels import (
    RecomputedConv2d,
    batch_norm_relu,
    surrogate_max_pool2d,
    surrogate_relu,
)
from ..kernels.compiled import batch_norm_relu_with_c_backward, relu_with_c_backward
from ..kernels.recompute import RECOMPUTE_MAX_MACS, cheap_to_recompute
from .fusion import batch_norm_call

__all__ = ["recompute_cheap_convolutions", "tag_cheap_convolutions"]


def _relu_fed_by(gm: fx.GraphModule, node: fx.Node) -> Optional[fx.Node]:
    """The ReLU site that ``node`` alone feeds: ``batch_norm_relu(node, ...)``, ``surrogate_relu([bn](node))``."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op == "call_function" and user.target is batch_norm_relu:
        # A fused residual would make z depend on more than this convolution.
        return user if user.args[0] is node and (len(user.args) < 3 or user.args[2] is None) else None
    if batch_norm_call(gm, user):
        (user,) = user.users
    if user.op == "call_function" and user.target is surrogate_relu:
        return user
    return None


def _feeds_a_pooled_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``node`` alone feeds a ReLU site whose every user is a 2-D max-pool site."""
    relu = _relu_fed_by(gm, node)
    return relu is not None and bool(relu.users) and all(
        user.op == "call_function" and user.target is surrogate_max_pool2d for user in relu.users
    )


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
                qualifies = _feeds_a_pooled_relu(gm, node)
                every_call_qualifies[node.target] = every_call_qualifies.get(node.target, True) and qualifies
    chosen = {target for target, qualifies in every_call_qualifies.items() if qualifies}
    for name, module in gm.named_modules():
        if type(module) in (nn.Conv2d, RecomputedConv2d):
            module.__class__ = RecomputedConv2d if name in chosen else nn.Conv2d
    return sorted(chosen)


_CONV2D = (torch.conv2d, F.conv2d)
_BACKEND_RELU_SITES = (surrogate_relu, relu_with_c_backward)


def _backend_relu_fed_by(conv: fx.Node) -> Optional[List[fx.Node]]:
    """In a dynamo graph: the nodes from ``conv``'s sole user to the ReLU site it alone feeds, else ``None``."""
    chain: List[fx.Node] = []
    previous = conv
    while len(previous.users) == 1:
        (user,) = previous.users
        if user.op != "call_function" or not user.args or user.args[0] is not previous:
            return None
        chain.append(user)
        if user.target in _BACKEND_RELU_SITES or user.target is batch_norm_relu_with_c_backward:
            return chain
        if user.target is not F.batch_norm or len(chain) > 1:
            return None
        previous = user
    return None


def tag_cheap_convolutions(gm: fx.GraphModule) -> int:
    """The backend's :func:`recompute_cheap_convolutions`: tag each cheap ``conv2d`` of a dynamo graph for recompute.

    A convolution qualifies as in the excite pass: at most
    :data:`~excitation.kernels.recompute.RECOMPUTE_MAX_MACS` multiply-adds per output (read from
    its weight's example value), feeding alone a ReLU site (through an ``F.batch_norm`` or fused
    with it) whose every user is a max-pool site.  The convolution, the BatchNorm and the site get
    ``meta["recompute"]``, so AOTAutograd's partitioner keeps the image and recomputes ``z``.
    Call it after the ReLU sites are in their final form.  Returns the number of convolutions tagged.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    tagged = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _CONV2D or len(node.args) < 2:
            continue
        weight = node.args[1].meta.get("example_value") if isinstance(node.args[1], fx.Node) else None
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or math.prod(weight.shape[1:]) > RECOMPUTE_MAX_MACS:
            continue
        chain = _backend_relu_fed_by(node)
        if chain is None or not chain[-1].users or not all(
            user.op == "call_function" and user.target is surrogate_max_pool2d for user in chain[-1].users
        ):
            continue
        for part in (node, *chain):
            part.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
        tagged += 1
    return tagged
