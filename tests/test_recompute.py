"""Cheap convolutions before pooled ReLUs: recomputed under torch.compile, plain nn.Conv2d everywhere else."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import excitation
from excitation.kernels import RecomputedConv2d
from excitation.kernels.recompute import RECOMPUTE_MAX_MACS, cheap_to_recompute

from .helpers import (compiled_gradient_and_saved_bytes, eval_with_statistics, fingerprint, reference_pullback, rel_err,
                      without_recompute_tags)

TARGET = 1


class PooledStem(nn.Module):
    """VGG's shape: an RGB 3x3 stem whose ReLU feeds only a max-pool; then a ReLU that feeds a convolution."""

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else None
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.stem(x)
        h = self.pool(torch.relu(h if self.bn is None else self.bn(h)))
        h = torch.relu(self.conv(h))
        return self.head(h.mean((2, 3)))


_frozen = eval_with_statistics


def _recomputed(model: nn.Module):
    return [name for name, module in model.named_modules() if type(module) is RecomputedConv2d]


@pytest.mark.parametrize("fuse", [True, False])
def test_only_a_cheap_convolution_feeding_a_pooled_relu_is_chosen(fuse):
    torch.manual_seed(0)
    model = PooledStem().eval()
    before = fingerprint(model)
    excited = excitation.excite(model, fuse=fuse)
    assert _recomputed(excited) == ["stem"]  # not `conv`: its ReLU feeds no pool
    assert fingerprint(model) == before and type(model.stem) is nn.Conv2d  # the user's module keeps its class
    assert _recomputed(excitation.excite(PooledStem(batch_norm=False).eval())) == ["stem"]


def test_what_counts_as_cheap():
    assert cheap_to_recompute(nn.Conv2d(3, 64, 3))  # 27 multiply-adds per output
    assert cheap_to_recompute(nn.Conv2d(3, 64, 7))  # the ResNet / GoogLeNet / DenseNet stem: 147
    assert not cheap_to_recompute(nn.Conv2d(18, 8, 3))  # 162
    assert not cheap_to_recompute(nn.Conv2d(64, 192, 3))  # GoogLeNet's conv3: 576
    assert cheap_to_recompute(nn.Conv2d(32, 32, 3, groups=32))  # depthwise: 9
    assert not cheap_to_recompute(nn.Conv1d(3, 8, 3)) and RECOMPUTE_MAX_MACS == 160
    torch.manual_seed(0)
    vgg = excitation.excite(torchvision.models.vgg11_bn().eval())
    assert _recomputed(vgg) == ["features.0"]
    assert _recomputed(excitation.excite(torchvision.models.resnet18().eval())) == ["conv1"]
    googlenet = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    assert _recomputed(excitation.excite(googlenet)) == ["conv1.conv"]  # conv3's 576 is not cheap


def test_compact_gates_and_re_excitation_undo_the_choice():
    torch.manual_seed(0)
    excited = excitation.excite(PooledStem().eval())
    compact = excitation.excite(excited, saved="uint8")  # keeps no z: nothing to recompute
    assert _recomputed(compact) == [] and _recomputed(excited) == ["stem"]
    assert _recomputed(excitation.excite(compact)) == ["stem"]


def test_eager_forward_and_pullback_are_unchanged():
    model = _frozen(PooledStem())
    x = torch.randn(2, 3, 12, 12)
    excited = excitation.excite(model)
    assert torch.equal(excited(x), model(x))
    ours = excitation.pullback(excited, x, TARGET)
    assert rel_err(ours, reference_pullback(model, x, TARGET)) < 1e-5
    plain = excitation.excite(model)
    plain.stem.__class__ = nn.Conv2d
    assert torch.equal(excitation.pullback(plain, x, TARGET), ours)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_graph_keeps_neither_z_nor_the_pool_input(backend):
    """Compiled, the stem's z is recomputed from the image: we keep no more than vanilla (a mask and pool indices)."""
    model = _frozen(PooledStem())
    x = torch.randn(2, 3, 12, 12)
    z_bytes = 2 * 8 * 12 * 12 * 4
    excited = excitation.excite(model)

    def score(module):
        return lambda t: module(t)[:, TARGET]

    expected = excitation.pullback(excited, x, TARGET)
    _, vanilla_bytes = compiled_gradient_and_saved_bytes(score(model), x, backend)
    grad, ours_bytes = compiled_gradient_and_saved_bytes(score(excited), x, backend)
    assert rel_err(grad, expected) < 1e-5 and ours_bytes <= vanilla_bytes
    excited.stem.__class__ = nn.Conv2d
    grad, kept_bytes = compiled_gradient_and_saved_bytes(score(excited), x, backend)
    assert rel_err(grad, expected) < 1e-5 and kept_bytes - ours_bytes > 0.99 * z_bytes  # z, give or take a channel vector


@pytest.mark.parametrize("batch_norm", [True, False], ids=["conv-bn-relu", "conv-relu"])
def test_backend_graph_keeps_neither_z_nor_the_pool_input(batch_norm):
    """The "excitation" backend tags the same stem in dynamo's graph (no modules there): it keeps no more than vanilla."""
    model = _frozen(PooledStem(batch_norm=batch_norm))
    x = torch.randn(2, 3, 12, 12)
    z_bytes = 2 * 8 * 12 * 12 * 4
    expected = excitation.pullback(excitation.excite(model), x, TARGET)

    def score(t):
        return model(t)[:, TARGET]

    _, vanilla_bytes = compiled_gradient_and_saved_bytes(score, x, "inductor")
    grad, ours_bytes = compiled_gradient_and_saved_bytes(score, x, excitation.backend())
    assert rel_err(grad, expected) < 1e-5 and ours_bytes <= vanilla_bytes
    convolutions_kept = excitation.backend(inner=without_recompute_tags((torch.conv2d, F.conv2d)))
    grad, kept_bytes = compiled_gradient_and_saved_bytes(score, x, convolutions_kept)
    assert rel_err(grad, expected) < 1e-5 and kept_bytes - ours_bytes > 0.99 * z_bytes


def test_backend_tags_only_a_cheap_convolution_feeding_a_pooled_relu():
    """In dynamo's graph of googlenet only the 7x7 RGB stem qualifies, as ``excite`` picks ``conv1.conv``."""
    model = _frozen(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True))
    tagged = []

    def inner(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in (torch.conv2d, F.conv2d) and node.meta.get("recompute"):
                tagged.append(tuple(node.args[1].meta["example_value"].shape))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=excitation.backend(inner=inner))(torch.randn(1, 3, 64, 64))
    assert tagged == [(64, 3, 7, 7)]


def test_every_other_runtime_runs_it_as_a_plain_convolution():
    model = _frozen(PooledStem())
    x = torch.randn(2, 3, 12, 12)
    excited = excitation.excite(model)
    expected = excitation.pullback(excited, x, TARGET)

    def grad_of(module):
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(module(leaf)[:, TARGET].sum(), leaf)
        return grad

    exported = torch.export.export(excited, (x,))
    assert "excitation.surrogate_relu" in str(exported.graph) or "surrogate_batch_norm_relu" in str(exported.graph)
    assert "checkpoint" not in str(exported.graph)
    for module in (exported.module(), torch.jit.trace(excited, x), torch.jit.script(excited)):
        assert rel_err(grad_of(module), expected) < 1e-5
    assert type(excited.stem) is RecomputedConv2d  # scripting converted a copy
    via_func = torch.func.grad(lambda t: excited(t)[:, TARGET].sum())(x)
    assert rel_err(via_func, expected) < 1e-5

    class Outer(nn.Module):  # an excited model inside another one re-traces as a leaf
        def __init__(self):
            super().__init__()
            self.inner = excited

        def forward(self, t):
            return self.inner(t) * 2

    assert rel_err(excitation.pullback(Outer(), x, TARGET), 2 * expected) < 1e-5
