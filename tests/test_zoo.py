"""The zoo check on one model per torchvision family (every rule kind among them), as CI can afford.

The full table over all 80 classifiers is ``excitation zoo`` (docs/zoo.md); this
runs the same :func:`excitation.zoo.check_model` and, on top, compares each
pullback with the independent interception reference of ``tests/helpers.py``.
"""

import warnings

import pytest
import torch
import torchvision

import excitation
from excitation.zoo import (
    ZooRow,
    check_model,
    format_zoo_table,
    input_size,
    randomise_zero_heads,
    zoo_models,
)

from .helpers import SubnormalCounter, reference_pullback, rel_err

# One per family: the smallest member.  Together they hold every rule kind torchvision uses.
SUBSET = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "swin_t", "swin_v2_t", "vgg11", "vit_b_32",
    "wide_resnet50_2",
]
ROWS = {}


def _model(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None).eval()
    randomise_zero_heads(model, 0)
    return model, torch.randn(1, 3, input_size(name), input_size(name), generator=torch.Generator().manual_seed(0))


def _census(model, x, target):
    """The input gradient of ``model``'s ``target`` logit, with forward and backward counted apart."""
    forward, backward = SubnormalCounter(), SubnormalCounter()
    x = x.detach().requires_grad_()
    with forward:
        logit = model(x)[:, target].sum()
    with backward:
        (grad,) = torch.autograd.grad(logit, x)
    return grad, forward, backward


def test_subset_has_one_model_per_family():
    family = lambda name: name.split("_")[0].rstrip("0123456789") if not name.startswith("efficientnet_v2") else "effv2"  # noqa: E731
    assert set(SUBSET) <= set(zoo_models()) and len(zoo_models()) == 80
    assert {family(n) for n in SUBSET} == {family(n) for n in zoo_models()}


@pytest.mark.parametrize("name", SUBSET)
def test_zoo_model(name):
    model, x = _model(name)
    row = check_model(model, x, name=name, repeats=1)
    ROWS[name] = row
    assert row.traced == "fx", row.error
    assert row.forward_identical and row.finite
    assert row.unhandled == {}
    assert row.rel_diff is not None and row.rel_diff > 1e-3, "pullback equals the vanilla gradient"
    excited = excitation.excite(model)
    # The subnormal census on every family (a count, so it holds on any CPU): the
    # backward of the pullback returns no subnormal float from any op.  The forward is the
    # model's own, bit for bit, subnormals included (swin's masked softmax makes ~44k), so it is
    # counted apart and must match vanilla's forward count; vanilla's *backward* is not always
    # clean (swin_v2_t's softmax backward returns a few hundred), ours must be.
    ours, ours_forward, ours_backward = _census(excited, x, 1)
    _, vanilla_forward, _ = _census(model, x, 1)
    assert ours_backward.total == 0 and ours_backward.values > 1e5, ours_backward.counts
    assert ours_forward.total == vanilla_forward.total
    assert rel_err(ours, reference_pullback(model, x, 1, rules=True)) < 1e-4


def test_subset_covers_every_rule_kind_torchvision_uses():
    kinds = set()
    for name in SUBSET:
        if name in ROWS:  # filled by test_zoo_model when the module runs as a whole
            kinds |= set(ROWS[name].sites)
        else:
            counts = excitation.report(excitation.excite(_model(name)[0])).counts()
            kinds |= {kind for kind, n in counts.items() if n}
    assert kinds == {"relu", "hardtanh", "silu", "gelu", "hardswish", "hardsigmoid", "max_pool2d", "layer_norm",
                     "softmax", "multihead_attention", "attention_function"}
    if len(ROWS) == len(SUBSET):
        table = format_zoo_table([ROWS[name] for name in SUBSET])
        assert f"traced {len(SUBSET)}/{len(SUBSET)}" in table and "unhandled activation sites 0" in table


def test_untraceable_model_falls_back_to_the_dynamo_backend():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x)
            h = torch.relu(h) if h.mean() > -10 else torch.relu(-h)  # fx cannot trace this branch
            return self.head(torch.nn.functional.max_pool2d(h, 2).mean((2, 3)))

    torch._dynamo.reset()
    row = check_model(DataDependent().eval(), torch.randn(2, 3, 12, 12), name="data_dependent", repeats=1)
    assert isinstance(row, ZooRow) and row.traced == "dynamo" and "symbolic_trace" in row.error
    assert row.sites.get("relu", 0) >= 1 and row.sites.get("max_pool2d", 0) >= 1  # dynamo may split graphs
    assert row.forward_identical and row.finite and row.rel_diff > 1e-3
