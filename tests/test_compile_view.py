"""fxpass/compile_view.py and ExcitedGraphModule.recompile: dynamo traces the view, everything else the graph."""

import copy
import inspect
import logging
import pickle
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import excitation
from excitation.fxpass.compile_view import compile_view
from excitation.kernels import RecomputedConv2d, batch_norm_relu, surrogate_relu
from excitation.kernels.compiled import compiled_batch_norm_relu, compiled_relu, compiled_relu_concat

from .helpers import fingerprint, rel_err
from .test_compiled import Inception, _eval_model, _pullback
from .test_recompute import PooledStem


def _targets(graph):
    return [node.target for node in graph.nodes if node.op == "call_function"]


def test_view_of_googlenet_groups_every_inception_and_retargets_every_other_site():
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=True).eval()
    excited = excitation.excite(model)
    before = _targets(excited.graph)
    view = _targets(compile_view(excited))
    assert view.count(compiled_relu_concat) == 9  # inception 3a-5b
    # 9 x 4 branch outputs went into the concatenations, the stem's ReLU stays with its recomputed
    # convolution (next test), and the 20 others are retargeted one by one.
    assert isinstance(excited.get_submodule("conv1.conv"), RecomputedConv2d)
    assert before.count(batch_norm_relu) == 57 and view.count(compiled_batch_norm_relu) == 57 - 36 - 1
    assert view.count(batch_norm_relu) == 1 and surrogate_relu not in view
    assert _targets(excited.graph) == before  # the model's own graph is untouched


def test_sites_fed_by_a_recomputed_convolution_keep_their_function():
    """That convolution's recompute region must end after the ReLU, or its output is kept at the boundary."""
    excited = excitation.excite(PooledStem().eval())
    assert isinstance(excited.stem, RecomputedConv2d)
    view = _targets(compile_view(excited))
    assert view.count(batch_norm_relu) == 1 and view.count(compiled_relu) == 1


def test_a_concatenation_whose_parts_are_read_elsewhere_is_left_alone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            p, q = torch.relu(self.a(x)), torch.relu(self.b(x))
            return torch.cat([p, q], 1).sum((2, 3)) + p.mean()

    view = _targets(compile_view(excitation.excite(Shared().eval())))
    assert compiled_relu_concat not in view and view.count(compiled_relu) == 2 and torch.cat in view


def test_a_graph_without_sites_has_no_view():
    with pytest.warns(UserWarning, match="no site"):
        excited = excitation.excite(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))
    assert compile_view(excited) is None


def _wrapped(excited):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = excited

        def forward(self, x):
            return self.inner(x)

    return Wrapper()


@pytest.mark.parametrize("how", ["module", "wrapped_module", "function", "deepcopy", "pickle"])
def test_every_way_to_compile_an_excited_model_traces_its_view(how):
    """dynamo always reaches ``forward`` (a custom ``__call__`` it would skip inside a wrapper), so the view
    is what it traces however the model is compiled, and after it is copied or unpickled."""
    model = _eval_model(Inception())
    excited = excitation.excite(model)
    x = torch.rand(2, 8, 16, 16)
    expected = _pullback(excited, x)
    seen = []
    real = compiled_relu_concat

    # Count calls at trace time through the function the view's code calls.
    def counting(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    target = {"deepcopy": lambda: copy.deepcopy(excited), "pickle": lambda: pickle.loads(pickle.dumps(excited))}.get(
        how, lambda: excited)()
    for node in target.graph.nodes:
        assert node.target is not compiled_relu_concat  # the model's graph itself never changes
    forward = type(target).forward
    view_code = inspect.getclosurevars(forward).nonlocals["view"]
    view_code.__globals__[_global_name(view_code, real)] = counting
    try:
        torch._dynamo.reset()
        compiled_model = {"wrapped_module": lambda: torch.compile(_wrapped(target)),
                          "function": lambda: torch.compile(lambda t: target(t))}.get(how, lambda: torch.compile(target))()
        assert rel_err(_pullback(compiled_model, x), expected) < 1e-5
    finally:
        view_code.__globals__[_global_name(view_code, counting)] = real
    assert seen  # traced through the view
    seen.clear()
    assert torch.equal(target(x), model(x)) and not seen  # eager: the graph, not the view


def _global_name(function, value):
    (name,) = [name for name, v in function.__globals__.items() if v is value]
    return name


def test_excited_forward_keeps_the_graphs_signature_and_the_model_is_untouched():
    model = _eval_model(Inception())
    before = fingerprint(model)
    excited = excitation.excite(model)
    assert list(inspect.signature(excited.forward).parameters) == ["x"]
    torch._dynamo.reset()
    _pullback(torch.compile(excited), torch.rand(1, 8, 8, 8))
    assert fingerprint(model) == before


def test_a_view_that_cannot_be_built_warns_and_compile_traces_the_graph(monkeypatch, caplog):
    def broken(gm):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr("excitation.fxpass.excited.compiled_forward", broken)
    model = _eval_model(Inception())
    with caplog.at_level(logging.WARNING, logger="excitation"):
        excited = excitation.excite(model)
    assert "no compile view" in caplog.text and "synthetic failure" in caplog.text
    x = torch.rand(2, 8, 16, 16)
    torch._dynamo.reset()
    assert rel_err(_pullback(torch.compile(excited), x), _pullback(excited, x)) < 1e-5


def test_dynamo_traces_an_excited_model_in_one_graph(monkeypatch):
    """No graph break: a break splits the recompute regions, and the compiled pullback keeps more.

    The ReLU and pool backwards are traced with the forward; they must not ask whether the C kernels
    are built where no raw kernel can run: before the library is loaded, that call is one dynamo
    cannot trace.
    """
    from torch._dynamo.backends.registry import lookup_backend

    from excitation.kernels import native

    from .test_recompute import PooledStem

    excited = excitation.excite(_eval_model(PooledStem(batch_norm=True)))
    asked_while_compiling, graphs = [], []
    real = native.available

    def spy():
        if torch.compiler.is_compiling():
            asked_while_compiling.append(sys._getframe(1).f_code.co_name)
        return real()

    def counting(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setattr(native, "available", spy)
    x = torch.rand(2, 3, 12, 12, requires_grad=True)
    torch._dynamo.reset()
    torch.compile(excited, backend=counting)(x)[:, 1].sum().backward()
    # _c_kernels_built asks once, outside the trace (assume_constant_result): that one may.
    assert len(graphs) == 1 and set(asked_while_compiling) <= {"_c_kernels_built"}, asked_while_compiling
