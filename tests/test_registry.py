"""The registry: one op, three mechanisms, the right one per runtime, one result."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import excitation
from excitation.kernels.ops import _call_surrogate_max_pool2d, call_surrogate_relu
from excitation.kernels.dispatch import forward_mechanism, forward_runtime

from .helpers import rel_err


def mechanism(first):
    return forward_mechanism(forward_runtime(first))


def test_plain_eager_runs_the_classic_function():
    z = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert mechanism(z) == "eager"
    assert "eager_function" in type(excitation.surrogate_relu(z).grad_fn).__name__
    # float32 CPU sites with the default gate take a leaner Function of their own (tests/test_kernels.py)
    assert type(excitation.surrogate_relu(z.float()).grad_fn).__name__ == "_EagerCpuSigmoidReLUBackward"


def test_tracers_get_the_custom_op_and_transforms_the_twin():
    z = torch.randn(3, 4)
    seen = []

    def spy(x):
        seen.append(mechanism(x))
        return x * 2

    torch.jit.trace(spy, (z,), check_trace=False)
    with FakeTensorMode() as mode:
        spy(mode.from_tensor(z))
    torch.func.grad(lambda x: spy(x).sum())(z)
    torch.func.vmap(spy)(z)
    assert seen == ["op", "op", "twin", "twin"]
    assert torch.fx.symbolic_trace(torch.nn.ReLU()) is not None  # a tracer run leaves no state behind
    assert mechanism(z) == "eager"


@pytest.mark.parametrize("saved", ["exact", "uint8"])
def test_the_three_relu_mechanisms_agree(saved):
    z = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    g = torch.randn_like(z)
    results = []
    for run in (call_surrogate_relu.eager.apply, call_surrogate_relu.twin.apply, torch.ops.excitation.surrogate_relu):
        leaf = z.clone().requires_grad_(True)
        out = run(leaf, 0.3, "sigmoid", saved)
        assert torch.equal(out, torch.relu(z))
        (grad,) = torch.autograd.grad(out, leaf, g)
        results.append(grad)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    expected = g * torch.sigmoid(z / 0.3)
    assert rel_err(results[0], expected) < (1e-12 if saved == "exact" else 5e-3)


def test_the_three_pool_mechanisms_agree():
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True, 0.3, "soft")
    results = []
    for run in (_call_surrogate_max_pool2d.eager.apply, _call_surrogate_max_pool2d.twin.apply,
                torch.ops.excitation.surrogate_max_pool2d):
        leaf = x.clone().requires_grad_(True)
        out, indices = run(leaf, *args)
        assert torch.equal(out, torch.nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)) and not indices.requires_grad
        (grad,) = torch.autograd.grad(out, leaf, torch.ones_like(out))
        results.append(grad)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
