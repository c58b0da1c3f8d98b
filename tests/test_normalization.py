"""LayerNorm with constant statistics: exact forward, ``grad * weight * rstd`` backward, exact parameter grads."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from excitation.kernels import held_rsqrt, held_sqrt, surrogate_layer_norm, surrogate_rms_norm


def _reference(x, shape, weight, bias, eps):
    dims = tuple(range(-len(shape), 0))
    mean = x.mean(dims, keepdim=True).detach()
    rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps).detach()
    out = (x - mean) * rstd
    return out * weight + bias if weight is not None else out


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_forward_exact_and_backward_holds_statistics(shape, affine):
    x = torch.randn(4, 6, *shape, dtype=torch.float64, requires_grad=True)
    norm = nn.LayerNorm(shape, elementwise_affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-1, 1)
    ours = surrogate_layer_norm(x, list(shape), norm.weight, norm.bias, norm.eps)
    assert torch.equal(ours, norm(x))
    g = torch.randn_like(ours)
    params = [x] + ([norm.weight, norm.bias] if affine else [])
    mine = torch.autograd.grad(ours, params, g)
    ref = torch.autograd.grad(_reference(x, shape, norm.weight, norm.bias, norm.eps), params, g)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if affine:  # parameter gradients are the vanilla ones
        vanilla = torch.autograd.grad(norm(x), params[1:], g)
        for a, b in zip(mine[1:], vanilla):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # ...but the input gradient is not: vanilla projects out the mean and the normalised input.
    (vanilla_x,) = torch.autograd.grad(norm(x), x, g)
    assert (mine[0] - vanilla_x).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_forward_is_exact(dtype):
    x = torch.randn(2, 9, 16, dtype=dtype)
    w, b = torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)
    assert torch.equal(surrogate_layer_norm(x, 16, w, b, 1e-6), F.layer_norm(x, (16,), w, b, 1e-6))


def test_torch_func_matches_eager():
    x = torch.randn(3, 8, dtype=torch.float64)
    w = torch.rand(8, dtype=torch.float64) + 0.5
    f = lambda t: (surrogate_layer_norm(t, [8], w, None, 1e-5) * torch.arange(8.0, dtype=torch.float64)).sum()  # noqa: E731
    leaf = x.clone().requires_grad_()
    (eager,) = torch.autograd.grad(f(leaf), leaf)
    torch.testing.assert_close(torch.func.grad(f)(x), eager)


# ------------------------------------------------------------------ RMSNorm
def _rms_reference(x, shape, weight, eps):
    dims = tuple(range(-len(shape), 0))
    rstd = torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps).detach()
    out = x * rstd
    return out * weight if weight is not None else out


@pytest.mark.parametrize("shape", [(7,), (3, 5)])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_forward_exact_and_backward_holds_the_rms(shape, affine):
    x = torch.randn(4, 6, *shape, dtype=torch.float64, requires_grad=True)
    norm = nn.RMSNorm(shape, eps=1e-6, elementwise_affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0)
    ours = surrogate_rms_norm(x, list(shape), norm.weight, norm.eps)
    assert torch.equal(ours, norm(x))
    g = torch.randn_like(ours)
    params = [x] + ([norm.weight] if affine else [])
    mine = torch.autograd.grad(ours, params, g)
    ref = torch.autograd.grad(_rms_reference(x, shape, norm.weight, norm.eps), params, g)
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (vanilla_x,) = torch.autograd.grad(norm(x), x, g)
    assert (mine[0] - vanilla_x).abs().max() > 1e-3  # vanilla projects out the normalised input


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_low_precision_forward_is_exact_and_default_eps_is_torchs(dtype):
    x = torch.randn(2, 9, 16, dtype=dtype)
    w = torch.randn(16, dtype=dtype)
    assert torch.equal(surrogate_rms_norm(x, 16, w, 1e-6), F.rms_norm(x, (16,), w, 1e-6))
    assert torch.equal(surrogate_rms_norm(x, [16], w), F.rms_norm(x, (16,), w))


def test_held_roots_keep_the_value_and_pass_no_gradient():
    v = torch.rand(3, 1, dtype=torch.float64) + 0.1
    v.requires_grad_()
    assert torch.equal(held_rsqrt(v), torch.rsqrt(v)) and torch.equal(held_sqrt(v), torch.sqrt(v))
    assert not held_rsqrt(v).requires_grad and not held_sqrt(v).requires_grad
