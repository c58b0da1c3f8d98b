"""Presets: the paper's and the later "semantic" rule set, against their reference formulas, in every runtime."""

import pytest
import torch
import torchvision

import excitation
from excitation.presets import PRESETS, resolve_preset

from .helpers import AllForms, fingerprint, reference_pullback, rel_err

TARGET = 3


def _all_forms():
    torch.manual_seed(0)
    model = AllForms().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 17, 19)


def test_resolution_explicit_arguments_win():
    assert resolve_preset() == ("paper", 0.3, 0.3, "sigmoid", "soft")
    assert resolve_preset("semantic") == ("semantic", 0.6, 0.3, "normal_cdf", "weights")
    # Without a preset pool_temp follows temp, as excite(temp=...) always did; a named preset keeps its own.
    assert resolve_preset(temp=0.5) == ("paper", 0.5, 0.5, "sigmoid", "soft")
    assert resolve_preset("semantic", temp=0.5) == ("semantic", 0.5, 0.3, "normal_cdf", "weights")
    assert resolve_preset("semantic", gate="sigmoid", pool_backward="soft", pool_temp=0.1)[2:] == (0.1, "sigmoid", "soft")


@pytest.mark.parametrize("kwargs, message", [
    (dict(preset="semantics"), "did you mean 'semantic'"),
    (dict(pool_backward="hard"), "pool_backward='hard' is not known"),
    (dict(gate="tanh"), "not a known gate"),
    (dict(temp=-1.0), "must be finite and > 0"),
])
def test_bad_options_are_named(kwargs, message):
    model, _ = _all_forms()
    with pytest.raises(ValueError, match=message):
        excitation.excite(model, **kwargs)


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_pullback_equals_its_reference_formulas(name):
    model, x = _all_forms()
    model = model.double()
    x = x.double()
    before = fingerprint(model)
    p = PRESETS[name]
    ours = excitation.pullback(model, x, TARGET, preset=name)
    ref = reference_pullback(model, x, TARGET, temp=p.temp, pool_temp=p.pool_temp, gate=p.gate,
                             pool_backward=p.pool_backward)
    assert rel_err(ours, ref) < 1e-10
    assert rel_err(ours, excitation.gradient(model, x, TARGET)) > 0.05
    assert fingerprint(model) == before


def test_the_presets_differ_and_the_report_says_which_each_site_uses():
    model, x = _all_forms()
    semantic = excitation.excite(model, preset="semantic")
    found = excitation.report(semantic)
    assert found.preset == "semantic" and found.gate == "normal_cdf" and found.temp == 0.6
    pools = [s for s in found.sites if s.rule == "max_pool"]
    assert len(pools) == 5 and {s.pool_backward for s in pools} == {"weights"} and {s.temp for s in pools} == {0.3}
    assert {s.pool_backward for s in found.sites if s.rule == "relu"} == {None}
    assert "preset semantic" in str(found) and "pool backward weights" in str(found)
    paper = excitation.report(excitation.excite(model))
    assert paper.preset == "paper" and {s.pool_backward for s in paper.sites if s.rule == "max_pool"} == {"soft"}
    a, b = excitation.pullback(semantic, x, TARGET), excitation.pullback(model, x, TARGET)
    assert rel_err(a, b) > 0.05


def test_re_exciting_switches_the_pool_variant():
    model, x = _all_forms()
    once = excitation.excite(model, preset="semantic")
    back = excitation.excite(once, preset="paper")
    assert {s.pool_backward for s in excitation.report(back).sites if s.rule == "max_pool"} == {"soft"}
    assert rel_err(excitation.pullback(back, x, TARGET), excitation.pullback(model, x, TARGET)) < 1e-6


def test_already_excited_model_refuses_options():
    model, x = _all_forms()
    excited = excitation.excite(model, preset="semantic")
    with pytest.raises(ValueError, match="already excited"):
        excitation.pullback(excited, x, TARGET, preset="paper")


def test_weights_variant_in_every_runtime():
    """eager == torch.func == compile (CPU extern op) == export == jit.script, and none is vanilla."""
    model, x = _all_forms()
    excited = excitation.excite(model, preset="semantic")
    eager = excitation.pullback(excited, x, TARGET)
    vanilla = excitation.gradient(model, x, TARGET)
    score = lambda m: (lambda inp: m(inp)[:, TARGET].sum())  # noqa: E731
    results = {"func": torch.func.grad(score(excited))(x)}
    torch._dynamo.reset()
    compiled = torch.compile(excited, backend="inductor")
    leaf = x.clone().requires_grad_()
    compiled(leaf)[:, TARGET].sum().backward()
    results["compile"] = leaf.grad
    exported = torch.export.export(excited, (x,)).module()
    leaf = x.clone().requires_grad_()
    (results["export"],) = torch.autograd.grad(exported(leaf)[:, TARGET].sum(), leaf)
    leaf = x.clone().requires_grad_()
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(excited)
    (results["script"],) = torch.autograd.grad(scripted(leaf)[:, TARGET].sum(), leaf)
    for name, result in results.items():
        assert rel_err(result, eager) < 1e-4, name
        assert rel_err(result, vanilla) > 0.05, name


def test_backend_takes_the_preset():
    model, x = _all_forms()
    compiler = excitation.backend(preset="semantic", inner="eager")
    torch._dynamo.reset()
    leaf = x.clone().requires_grad_()
    torch.compile(model, backend=compiler)(leaf)[:, TARGET].sum().backward()
    assert compiler.reports[0].preset == "semantic"
    assert rel_err(leaf.grad, excitation.pullback(model, x, TARGET, preset="semantic")) < 1e-4


def test_semantic_preset_on_a_torchvision_model_matches_the_reference():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    ours = excitation.pullback(model, x, 7, preset="semantic")
    ref = reference_pullback(model, x, 7, temp=0.6, pool_temp=0.3, gate="normal_cdf", pool_backward="weights")
    assert rel_err(ours, ref) < 1e-4
