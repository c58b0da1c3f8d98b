"""fxpass/lowering.py: the one compile lowering that the compile view and the "excitation" backend share."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

import excitation
from excitation.fxpass.compile_view import compile_view
from excitation.fxpass.lowering import MARKS, cheap_convolution, lower, pooled_site_fed_by, relu_sites
from excitation.kernels import RecomputedConv2d
from excitation.kernels.compiled import (
    batch_norm_relu_with_c_backward,
    compiled_batch_norm_relu,
    compiled_relu,
    compiled_relu_concat,
    relu_with_c_backward,
)

from .helpers import eval_with_statistics, rel_err

TARGET = 2


class Mixed(nn.Module):
    """One site of each kind the lowering sees: a cheap pooled stem (conv -> BN -> ReLU -> max-pool), a
    concatenation of a BN -> ReLU and a plain ReLU, and a lone ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_bn, self.pool = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.MaxPool2d(2)
        self.a, self.a_bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(16, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.stem_bn(self.stem(x))))
        x = torch.cat([F.relu(self.a_bn(self.a(x))), F.relu(self.b(x))], 1)
        return self.head(F.relu(self.c(x)).mean((2, 3)))


def _frozen() -> nn.Module:
    model = eval_with_statistics(Mixed())
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def _count(graph, *targets) -> int:
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in targets)


def _tagged(graph, *targets) -> int:
    return sum(1 for node in graph.nodes if node.op == "call_function" and node.target in targets
               and node.meta.get("recompute") is not None)


def _backend_graphs(model, x):
    """The graphs the backend hands its inner compiler, and the compiled model's pullback."""
    seen = []

    def inner(gm, example_inputs):
        seen.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=excitation.backend(inner=inner))
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(compiled(leaf)[:, TARGET].sum(), leaf)
    return seen, grad


def test_both_routes_lower_the_same_sites_the_same_way():
    """The compile view (regions) and the backend (tags) pick the same sites, concatenations and convolutions."""
    model, x = _frozen(), torch.rand(2, 3, 16, 16)
    expected = excitation.pullback(model, x, TARGET)

    excited = excitation.excite(model)
    view = compile_view(excited)
    recomputed = [node for node in view.nodes if node.op == "call_module"
                  and isinstance(excited.get_submodule(node.target), RecomputedConv2d)]
    concatenations = [node for node in view.nodes if node.target is compiled_relu_concat]
    lone = _count(view, compiled_relu, compiled_batch_norm_relu)
    assert len(recomputed) == 1 and len(concatenations) == 1 and lone == 1
    # The stem's site runs inside its convolution's region; the others are lowered.
    view_sites = 1 + len(concatenations[0].args[0]) + lone

    (graph,), pullback = _backend_graphs(model, x)
    tag_sites = _count(graph.graph, relu_with_c_backward, batch_norm_relu_with_c_backward)
    assert tag_sites == view_sites == 4
    assert _count(graph.graph, batch_norm_relu_with_c_backward) == 2  # the stem's and a's frozen BatchNorms
    assert _tagged(graph.graph, relu_with_c_backward, batch_norm_relu_with_c_backward) == 4
    assert _tagged(graph.graph, torch.cat, torch.concat) == len(concatenations)
    assert _tagged(graph.graph, torch.conv2d, F.conv2d) == len(recomputed)
    assert rel_err(pullback, expected) < 1e-5

    torch._dynamo.reset()
    assert rel_err(excitation.pullback(torch.compile(excited, backend="aot_eager"), x, TARGET), expected) < 1e-5


def _dynamo_graph(model, x):
    """The graph dynamo captures of ``model`` (example values recorded), not yet excited."""
    seen = []

    def capture(gm, example_inputs):
        seen.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=capture, fullgraph=True)(x)
    return seen[0]


@pytest.mark.parametrize("c_backward", [True, False], ids=["c-backward", "surrogate-backward"])
def test_tags_mark_every_site_and_the_c_backward_is_a_switch(c_backward):
    """What ``inner="eager"`` gets (no C backward) and what a compiler gets: the same sites, tagged alike."""
    model, x = _frozen(), torch.rand(2, 3, 16, 16)
    gm, inputs = _dynamo_graph(model, x)
    excitation.excite_graph(gm)
    found = lower(gm, mark="tag", c_backward=c_backward)
    assert (found.sites, found.concatenations, found.convolutions) == (4, 1, 1)
    assert found.retargeted == (4 if c_backward else 0) and found.code_changed == c_backward
    lowered = _count(gm.graph, relu_with_c_backward, batch_norm_relu_with_c_backward)
    assert lowered == (4 if c_backward else 0)
    # Two frozen BatchNorms feed sites alone: with the C backward each runs inside its site's one C pass.
    assert _count(gm.graph, F.batch_norm) == (0 if c_backward else 2)
    gm.recompile()
    with torch.no_grad():
        assert torch.equal(gm(*inputs)[0], model(x))


def test_site_selection_reads_both_graph_forms():
    model = _frozen()
    excited = excitation.excite(model)
    sites = relu_sites(excited, excited.graph)
    # The stem's fused site is fed by its RecomputedConv2d, so its region holds it: not a site to lower.
    assert [site.form for site in sites.values()] == ["batch_norm_relu", "relu", "relu"]

    traced = torch.fx.symbolic_trace(model)
    convolutions = [node for node in traced.graph.nodes if node.op == "call_module" and cheap_convolution(traced, node)]
    # Before the rewrite no node is a site: nothing is selected.
    assert convolutions and all(pooled_site_fed_by(traced, node) is None for node in convolutions)
    stem = next(node for node in excited.graph.nodes if node.op == "call_module" and node.target == "stem")
    chain = pooled_site_fed_by(excited, stem)
    assert chain is not None and len(chain) == 1  # the fused BatchNorm -> ReLU site, then max-pools only


def test_a_site_with_a_residual_or_a_second_user_is_not_recomputed_with_its_convolution():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.pool = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.MaxPool2d(2)

        def forward(self, x):
            y = F.relu(self.bn(self.conv(x)) + x)
            return self.pool(y).sum((1, 2, 3))[:, None] + y.mean((1, 2, 3))[:, None]

    excited = excitation.excite(eval_with_statistics(Residual()))
    conv = next(node for node in excited.graph.nodes if node.op == "call_module" and node.target == "conv")
    assert pooled_site_fed_by(excited, conv) is None
    assert not any(isinstance(module, RecomputedConv2d) for module in excited.modules())


def test_a_bad_mark_is_refused():
    excited = excitation.excite(_frozen())
    before = [(node.op, node.target) for node in excited.graph.nodes]
    with pytest.raises(ValueError, match=r"mark must be one of \('region', 'tag'\)"):
        lower(excited, mark="checkpoint")
    assert [(node.op, node.target) for node in excited.graph.nodes] == before
    assert MARKS == ("region", "tag")
