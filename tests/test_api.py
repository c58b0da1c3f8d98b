"""pullback / pullbacks / gradient: correctness, targets, caching, limits and state safety."""

import pytest
import torch
import torch.nn as nn

import excitation
from excitation import api

from .helpers import fingerprint, reference_pullback, rel_err, vanilla_gradient


def _x(n=3):
    return torch.randn(n, 3, 17, 19, dtype=torch.float64)


def _mlp():
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(inplace=True), nn.Linear(32, 5)).double()


def test_pullback_of_plain_and_excited_model_agree_with_reference(all_forms):
    x = _x()
    ref = reference_pullback(all_forms, x, 7)
    assert rel_err(excitation.pullback(all_forms, x, 7), ref) < 1e-10
    assert rel_err(excitation.pullback(excitation.excite(all_forms), x, 7), ref) < 1e-10
    # And it is not the vanilla gradient.
    assert rel_err(excitation.gradient(all_forms, x, 7), ref) > 0.05


def test_gradient_is_vanilla_autograd(all_forms):
    x = _x()
    assert torch.equal(excitation.gradient(all_forms, x, 2), vanilla_gradient(all_forms, x, 2))


@pytest.mark.parametrize(
    "target",
    [3, [1, 2, 3], (0, 0, 9), torch.tensor([4, 5, 6]), torch.tensor(2), lambda out: out[:, 1] - out[:, 2]],
    ids=["int", "list", "tuple", "tensor", "scalar-tensor", "callable"],
)
def test_target_forms(all_forms, target):
    x = _x()
    ours = excitation.pullback(all_forms, x, target)
    leaf = x.clone().requires_grad_(True)
    from .helpers import ExcitationReference

    with ExcitationReference():
        out = all_forms(leaf)
    if callable(target) and not isinstance(target, torch.Tensor):
        score = target(out)
    else:
        index = torch.as_tensor(target).expand(3) if not isinstance(target, int) else torch.full((3,), target)
        score = out.gather(1, index.reshape(-1, 1))
    (ref,) = torch.autograd.grad(score.sum(), leaf)
    assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize(
    "target,error,match",
    [
        (10, IndexError, r"out of range .* 10 classes"),
        (-1, IndexError, "out of range"),
        ([1, 2], ValueError, "2 entries for a batch of 3"),
        (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integer tensor"),
        (torch.ones(3, 2, dtype=torch.long), ValueError, r"shape \[3\]"),
        ("cat", TypeError, "sequence must hold ints"),
        (True, TypeError, "not a bool"),
        (lambda out: out, ValueError, r"one scalar per sample"),
    ],
)
def test_bad_targets_are_refused(all_forms, target, error, match):
    with pytest.raises(error, match=match):
        excitation.pullback(all_forms, _x(), target)


def test_output_without_class_dimension_needs_callable_target():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="not \\[N, classes\\]; pass target as a callable"):
        excitation.pullback(model, x, 0)
    grad = excitation.pullback(model, x, lambda out: out.sum((1, 2, 3)))
    assert grad.shape == x.shape


def test_missing_batch_dimension_is_explained():
    model = nn.Sequential(nn.Flatten(0), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="shape \\(3,\\), not \\[N, classes\\]"):
        excitation.pullback(model, torch.randn(3, 4, dtype=torch.float64), 0)


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.ones(2, 10, dtype=torch.long), TypeError, "integer dtype"),
        (torch.ones(2, 10, dtype=torch.float32), TypeError, "dtype torch.float32 but the model's parameters are torch.float64"),
        (torch.ones(0, 10, dtype=torch.float64), ValueError, "batch size 0"),
        (torch.tensor(1.0, dtype=torch.float64), ValueError, "scalar"),
        ([1.0] * 10, TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs_are_refused(x, error, match):
    model = _mlp()
    for fn in (excitation.pullback, excitation.gradient):
        with pytest.raises(error, match=match):
            fn(model, x, 0)
    with pytest.raises(error, match=match):
        excitation.pullbacks(model, x, [0, 1])


def test_pullback_caches_the_excited_model(all_forms, monkeypatch):
    calls = []
    real = api.excite
    monkeypatch.setattr(api, "excite", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = _x()
    first = excitation.pullback(all_forms, x, 1)
    second = excitation.pullback(all_forms, x, 1)
    assert torch.equal(first, second) and len(calls) == 1
    excitation.pullback(all_forms, x, 1, temp=0.5)
    assert len(calls) == 2  # other options, other entry


def test_cache_notices_replaced_tensors(all_forms):
    x = _x()
    excitation.pullback(all_forms, x, 1)
    all_forms.float()  # replaces buffers (new tensor objects)
    ours = excitation.pullback(all_forms, x.float(), 1)
    assert ours.dtype == torch.float32
    assert rel_err(ours, reference_pullback(all_forms, x.float(), 1)) < 1e-5


def test_options_on_an_excited_model_are_refused(all_forms):
    gm = excitation.excite(all_forms)
    with pytest.raises(ValueError, match="already excited"):
        excitation.pullback(gm, _x(), 1, temp=0.5)


def test_state_untouched_by_every_function_even_in_train_mode(all_forms):
    all_forms.train()
    for p in all_forms.parameters():
        p.grad = torch.full_like(p, 0.125)
    before = fingerprint(all_forms)
    x = _x()
    excitation.excite(all_forms)
    pb = excitation.pullback(all_forms, x, 1)
    excitation.gradient(all_forms, x, 1)
    excitation.pullbacks(all_forms, x, [1, 2])
    assert fingerprint(all_forms) == before
    assert all_forms.training
    # Computed in eval mode: equal to the eval-mode reference.
    all_forms.eval()
    assert rel_err(pb, reference_pullback(all_forms, x, 1)) < 1e-10


def test_user_excited_model_in_train_mode_is_restored(all_forms):
    gm = excitation.excite(all_forms).train()
    before = fingerprint(gm)
    excitation.pullback(gm, _x(), 1)
    assert fingerprint(gm) == before and gm.training


def test_pullbacks_equal_one_pullback_per_target(all_forms):
    x = _x()
    grids = excitation.pullbacks(all_forms, x, [1, 4, 9])
    assert grids.shape == (3, 3) + x.shape[1:]
    for k, target in enumerate([1, 4, 9]):
        assert rel_err(grids[:, k], excitation.pullback(all_forms, x, target)) < 1e-10
    per_sample = torch.tensor([[0, 1], [2, 3], [4, 5]])
    grids = excitation.pullbacks(all_forms, x, per_sample)
    for k in range(2):
        assert rel_err(grids[:, k], excitation.pullback(all_forms, x, per_sample[:, k])) < 1e-10


def test_pullbacks_bad_targets():
    model = _mlp()
    x = torch.randn(2, 10, dtype=torch.float64)
    with pytest.raises(IndexError, match="out of range"):
        excitation.pullbacks(model, x, [0, 5])
    with pytest.raises(ValueError, match="shape"):
        excitation.pullbacks(model, x, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        excitation.pullbacks(model, x, [0.5])


def test_small_temperature_converges_to_vanilla_gradient():
    # The gap comes from pre-activations within ~temp of 0, whose share shrinks with temp:
    # measured rel. error ~ sqrt(temp) on random nets (0.035 at 1e-3 here, 1e-11 at 1e-6).
    model = _mlp()
    x = torch.randn(256, 10, dtype=torch.float64)
    vanilla = excitation.gradient(model, x, 2)
    temps = (1.0, 0.1, 1e-2, 1e-3, 1e-4, 1e-5)
    errors = [rel_err(excitation.pullback(model, x, 2, temp=t), vanilla) for t in temps]
    assert errors == sorted(errors, reverse=True)
    assert errors[3] < 0.05 and errors[-1] < 0.01
    tiny = excitation.pullback(model, x, 2, temp=1e-8)
    assert torch.isfinite(tiny).all() and rel_err(tiny, vanilla) < 1e-6


def test_large_temperature_approaches_half_linearised_network():
    # temp -> inf: every gate -> 1/2, so the pullback of a 2-ReLU MLP -> W3 (W2 W1) / 4.
    model = _mlp()
    x = torch.randn(4, 10, dtype=torch.float64)
    w1, w2, w3 = model[0].weight, model[2].weight, model[4].weight
    expected = (w3 @ w2 @ w1)[2].detach().expand(4, -1) / 4
    assert rel_err(excitation.pullback(model, x, 2, temp=1e6), expected) < 1e-5


def test_create_graph_allows_second_order():
    model = _mlp()
    x = torch.randn(2, 10, dtype=torch.float64)
    grad = excitation.pullback(model, x, 1, create_graph=True)
    assert grad.requires_grad


def test_input_on_another_device_is_refused():
    model = _mlp().to("meta")
    with pytest.raises(ValueError, match="x is on cpu but the model is on meta"):
        excitation.pullback(model, torch.randn(2, 10, dtype=torch.float64), 0)


def test_compiled_modules_get_a_clear_error_or_work_when_excited():
    model = _mlp().float()
    x = torch.randn(4, 10)
    for fn, match in ((excitation.excite, "Excite the original model first"),
                      (lambda m: excitation.pullback(m, x, 0), "Excite the original model first"),
                      (lambda m: excitation.gradient(m, x, 0), "Pass the original")):
        with pytest.raises(excitation.ExcitationError, match=match):
            fn(torch.compile(model))
    excited = excitation.excite(model)
    compiled = torch.compile(excited, backend="aot_eager")
    assert excitation.is_excited(compiled) and excitation.report(compiled).counts()["relu"] == 2
    assert rel_err(excitation.pullback(compiled, x, 0), excitation.pullback(excited, x, 0)) < 1e-6


def test_compile_runs_the_same_pullbacks_compiled_and_cached():
    """``pullback(..., compile=True)``: torch.compile(excite(model)) on the fx path, once per model and options."""
    model = _mlp().float()
    x = torch.randn(4, 10)
    torch._dynamo.reset()
    compiled = excitation.prepare(model, compile=True)
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and api.path_of(compiled) == "fx"
    assert excitation.prepare(model, compile=True) is compiled
    assert excitation.prepare(model, compile=True, temp=0.5) is not compiled
    assert excitation.prepare(model) is not compiled  # the eager module is cached apart
    expected = excitation.pullback(model, x, [0, 1, 2, 3])
    assert rel_err(excitation.pullback(model, x, [0, 1, 2, 3], compile=True), expected) < 1e-5
    assert rel_err(excitation.pullback(model, x, [0, 1, 2, 3], compile=True), vanilla_gradient(model, x, 0)) > 1e-3
    grid = excitation.pullbacks(model, x, [0, 3], compile=True)
    assert rel_err(grid, excitation.pullbacks(model, x, [0, 3])) < 1e-5
    excited = excitation.excite(model)
    assert isinstance(excitation.prepare(excited, compile=True), torch._dynamo.eval_frame.OptimizedModule)
    assert rel_err(excitation.pullback(excited, x, 1, compile=True), excitation.pullback(excited, x, 1)) < 1e-5


def test_compile_on_the_dynamo_path_compiles_with_inductor():
    from .test_dynamo_fallback import Branchy, _inputs

    from excitation.dynamo_path import DEFAULT_INNER

    model = Branchy().eval()
    torch._dynamo.reset()
    prepared = excitation.prepare(model, compile=True)
    assert api.path_of(prepared) == "dynamo" and prepared.backend.inner == "inductor" != DEFAULT_INNER
    assert excitation.prepare(model).backend.inner == DEFAULT_INNER
    for x in _inputs():  # both branches
        assert rel_err(excitation.pullback(model, x, 1, compile=True), excitation.pullback(model, x, 1)) < 1e-5


def test_compile_needs_the_excited_module():
    with pytest.raises(ValueError, match=r"compile=True\) compiles the excited module; pass excited=True"):
        excitation.prepare(_mlp(), excited=False, compile=True)
