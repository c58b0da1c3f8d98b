"""The ReLU relatives: each surrogate's forward is the op itself, its backward the gradient of a smooth stand-in.

References are independent of the gates module: every rule is checked against
autograd of a closed-form smooth function whose derivative is the rule's gate.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from excitation.kernels import (
    surrogate_gelu,
    surrogate_hardsigmoid,
    surrogate_hardswish,
    surrogate_hardtanh,
    surrogate_leaky_relu,
    surrogate_silu,
)

from .helpers import (
    gaussian_smoothed_relu,
    soft_clamp,
    soft_hardswish_standin,
    softplus,
)

# (surrogate call, the op itself, the smooth stand-in whose gradient the backward must equal)
CASES = {
    "relu6": (lambda z, t: surrogate_hardtanh(z, 0.0, 6.0, temp=t), F.relu6, lambda z, t: soft_clamp(z, 0.0, 6.0, t)),
    "hardtanh": (lambda z, t: surrogate_hardtanh(z, -1.0, 2.0, temp=t), lambda z: F.hardtanh(z, -1.0, 2.0),
                 lambda z, t: soft_clamp(z, -1.0, 2.0, t)),
    "leaky_relu": (lambda z, t: surrogate_leaky_relu(z, 0.2, temp=t), lambda z: F.leaky_relu(z, 0.2),
                   lambda z, t: 0.2 * z + 0.8 * t * softplus(z / t)),
    "silu": (lambda z, t: surrogate_silu(z, temp=t), F.silu, lambda z, t: t * softplus(z / t)),
    "gelu": (lambda z, t: surrogate_gelu(z, temp=t), F.gelu, gaussian_smoothed_relu),
    "gelu_tanh": (lambda z, t: surrogate_gelu(z, "tanh", temp=t), lambda z: F.gelu(z, approximate="tanh"),
                  gaussian_smoothed_relu),
    "hardswish": (lambda z, t: surrogate_hardswish(z, temp=t), F.hardswish, soft_hardswish_standin),
    "hardsigmoid": (lambda z, t: surrogate_hardsigmoid(z, temp=t), F.hardsigmoid,
                    lambda z, t: soft_clamp(z + 3, 0.0, 6.0, t) / 6),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("temp", [0.05, 0.3, 1.6])
def test_backward_is_gradient_of_smooth_standin(name, temp):
    surrogate, _, standin = CASES[name]
    z = (torch.randn(4, 7, 5, dtype=torch.float64) * 4).requires_grad_()
    g = torch.randn(4, 7, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(surrogate(z, temp), z, g)
    (ref,) = torch.autograd.grad(standin(z, temp), z, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_is_bit_identical(name, dtype):
    surrogate, op, _ = CASES[name]
    z = torch.randn(3, 64, dtype=dtype) * 5
    assert torch.equal(surrogate(z, 0.3), op(z))


@pytest.mark.parametrize("name", ["relu6", "hardtanh", "leaky_relu", "hardsigmoid"])
def test_small_temp_approaches_vanilla_gradient(name):
    # Piecewise-linear units only; gated units (SiLU, GELU, Hardswish) are checked below.
    surrogate, op, _ = CASES[name]
    z = torch.randn(200, dtype=torch.float64) * 4
    z = z[(z - z.round()).abs() > 0.05]  # away from the kinks at integers (0, 6, +-3, -1, 2)
    z.requires_grad_()
    (ours,) = torch.autograd.grad(surrogate(z, 1e-4).sum(), z)
    (vanilla,) = torch.autograd.grad(op(z).sum(), z)
    # rtol: ATen's own hardsigmoid backward multiplies by 1/6 rounded to float32.
    torch.testing.assert_close(ours, vanilla, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["silu", "gelu", "hardswish"])
def test_gated_units_backward_is_their_soft_gate(name):
    # SiLU = z * sigmoid(z), GELU = z * Phi(z), Hardswish = z * hardsigmoid(z): the rule's backward is
    # the gate alone at temp 1, i.e. the unit's own gate without its slope term.
    surrogate, _, _ = CASES[name]
    z = torch.linspace(-6, 6, 121, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(surrogate(z, 1.0).sum(), z)
    gate = {"silu": torch.sigmoid(z), "gelu": 0.5 * (1 + torch.erf(z / math.sqrt(2))), "hardswish": F.hardsigmoid(z)}
    torch.testing.assert_close(ours, gate[name].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_finite_at_extremes(name):
    surrogate, _, _ = CASES[name]
    z = torch.tensor([-math.inf, -1e30, -3.0, 0.0, 3.0, 6.0, 1e30, math.inf], requires_grad=True)
    for temp in (1e-6, 0.3, 1e6):
        (grad,) = torch.autograd.grad(surrogate(z, temp).sum(), z)
        assert torch.isfinite(grad).all(), (name, temp)


def test_bad_gelu_approximation_is_refused():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        surrogate_gelu(torch.randn(3), "erf")


def test_torch_func_and_compile_use_the_same_backward():
    z = torch.randn(5, 6, dtype=torch.float64)
    f = lambda t: surrogate_leaky_relu(t, 0.1, temp=0.4).sum()  # noqa: E731
    eager = torch.autograd.grad(f(z.clone().requires_grad_()), z.clone().requires_grad_(), allow_unused=True)
    x = z.clone().requires_grad_()
    (eager,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(torch.func.grad(f)(z), eager)
    x = z.clone().requires_grad_()
    (compiled,) = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x), x)
    torch.testing.assert_close(compiled, eager)
