"""The ReLU relatives: each surrogate's forward is the op itself, its backward the gradient of a smooth stand-in.

References are independent of the gates module: every rule is checked against
autograd of a closed-form smooth function whose derivative is the rule's gate.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from excitation.spec import SPECS
from excitation.kernels import (
    surrogate_celu,
    surrogate_elu,
    surrogate_gelu,
    surrogate_gelu_new,
    surrogate_hard_mish,
    surrogate_hardsigmoid,
    surrogate_hardswish,
    surrogate_hardtanh,
    surrogate_leaky_relu,
    surrogate_mish,
    surrogate_prelu,
    surrogate_quick_gelu,
    surrogate_rrelu,
    surrogate_selu,
    surrogate_silu,
    surrogate_threshold,
)

from .helpers import (
    elu_switch_gradient,
    gaussian_smoothed_relu,
    hard_mish,
    soft_clamp,
    soft_hard_mish_standin,
    soft_hardswish_standin,
    soft_mish_standin,
    softplus,
)

# (surrogate call, the op itself, the smooth stand-in whose gradient the backward must equal)
CASES = {
    "relu6": (lambda z, t: surrogate_hardtanh(z, 0.0, 6.0, temp=t), F.relu6, lambda z, t: soft_clamp(z, 0.0, 6.0, t)),
    "hardtanh": (lambda z, t: surrogate_hardtanh(z, -1.0, 2.0, temp=t), lambda z: F.hardtanh(z, -1.0, 2.0),
                 lambda z, t: soft_clamp(z, -1.0, 2.0, t)),
    "leaky_relu": (lambda z, t: surrogate_leaky_relu(z, 0.2, temp=t), lambda z: F.leaky_relu(z, 0.2),
                   lambda z, t: 0.2 * z + 0.8 * t * softplus(z / t)),
    "threshold": (lambda z, t: surrogate_threshold(z, 1.0, -2.0, temp=t), lambda z: F.threshold(z, 1.0, -2.0),
                  lambda z, t: 1.0 + t * softplus((z - 1.0) / t)),
    # Eval-mode RReLU is a LeakyReLU of slope (lower + upper) / 2 = 0.25.
    "rrelu": (lambda z, t: surrogate_rrelu(z, 0.1, 0.4, temp=t), lambda z: F.rrelu(z, 0.1, 0.4),
              lambda z, t: 0.25 * z + 0.75 * t * softplus(z / t)),
    "silu": (lambda z, t: surrogate_silu(z, temp=t), F.silu, lambda z, t: t * softplus(z / t)),
    "gelu": (lambda z, t: surrogate_gelu(z, temp=t), F.gelu, gaussian_smoothed_relu),
    "gelu_tanh": (lambda z, t: surrogate_gelu(z, "tanh", temp=t), lambda z: F.gelu(z, approximate="tanh"),
                  gaussian_smoothed_relu),
    "hardswish": (lambda z, t: surrogate_hardswish(z, temp=t), F.hardswish, soft_hardswish_standin),
    "hardsigmoid": (lambda z, t: surrogate_hardsigmoid(z, temp=t), F.hardsigmoid,
                    lambda z, t: soft_clamp(z + 3, 0.0, 6.0, t) / 6),
    "mish": (lambda z, t: surrogate_mish(z, temp=t), F.mish, soft_mish_standin),
    "hard_mish": (lambda z, t: surrogate_hard_mish(z, temp=t), hard_mish, soft_hard_mish_standin),
    # GPT-2's gelu_new, transformers' own expression; the GELU rule's gate Phi(z / temp).
    "gelu_new": (lambda z, t: surrogate_gelu_new(z, temp=t),
                 lambda z: 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3.0)))),
                 gaussian_smoothed_relu),
    # CLIP's quick_gelu z * sigmoid(1.702 z): gate sigmoid(1.702 z / temp), the derivative of t softplus(1.702 z / t) / 1.702.
    "quick_gelu": (lambda z, t: surrogate_quick_gelu(z, temp=t), lambda z: z * torch.sigmoid(1.702 * z),
                   lambda z, t: t * softplus(1.702 * z / t) / 1.702),
}

# ELU, CELU, SELU: (surrogate call, the op itself). Their rule soft-switches between the unit's two
# slopes; the reference takes both slopes from torch's own derivative of the op (helpers.elu_switch_gradient).
SWITCHES = {
    "elu": (lambda z, t: surrogate_elu(z, 0.7, temp=t), lambda z: F.elu(z, 0.7)),
    "elu_aten": (lambda z, t: surrogate_elu(z, 0.7, 1.3, 0.5, temp=t),
                 lambda z: torch.ops.aten.elu(z, 0.7, 1.3, 0.5)),
    "celu": (lambda z, t: surrogate_celu(z, 0.5, temp=t), lambda z: F.celu(z, 0.5)),
    "selu": (lambda z, t: surrogate_selu(z, temp=t), F.selu),
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


@pytest.mark.parametrize("name", sorted(SWITCHES))
@pytest.mark.parametrize("temp", [0.05, 0.3, 1.6])
def test_elu_family_backward_soft_switches_between_its_slopes(name, temp):
    surrogate, op = SWITCHES[name]
    z = (torch.randn(4, 7, 5, dtype=torch.float64) * 4).requires_grad_()
    g = torch.randn(4, 7, 5, dtype=torch.float64)
    (ours,) = torch.autograd.grad(surrogate(z, temp), z, g)
    torch.testing.assert_close(ours, g * elu_switch_gradient(op, z, temp), rtol=1e-12, atol=1e-14)


def test_elu_gate_by_hand():
    # ELU(alpha = 1), temp 1: at z = 0 the two slopes 1 and alpha * e^0 = 1 meet (gate 1);
    # at z = -2: sigmoid(-2) * 1 + (1 - sigmoid(-2)) * e^-2 = 0.119203 + 0.880797 * 0.135335 = 0.238406;
    # at z = 3 the negative slope is held at alpha: sigmoid(3) + (1 - sigmoid(3)) * 1 = 1.
    z = torch.tensor([0.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(surrogate_elu(z, 1.0, temp=1.0).sum(), z)
    torch.testing.assert_close(grad, torch.tensor([1.0, 0.2384058440442351, 1.0], dtype=torch.float64))


def _all_forms():
    forms = {name: (surrogate, op) for name, (surrogate, op, _) in CASES.items()}
    forms.update(SWITCHES)
    return forms


FORMS = _all_forms()


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_forward_is_bit_identical(name, dtype):
    surrogate, op = FORMS[name]
    z = torch.randn(3, 64, dtype=dtype) * 5
    assert torch.equal(surrogate(z, 0.3), op(z))


@pytest.mark.parametrize("name", ["relu6", "hardtanh", "leaky_relu", "threshold", "rrelu", "hardsigmoid",
                                  *sorted(SWITCHES)])
def test_small_temp_approaches_vanilla_gradient(name):
    # Units whose rule softens a hard switch; gated units (SiLU, GELU, Hardswish, Mish) are checked below.
    # Every kink is at an integer (0, 6, +-3, -1, 2, the threshold 1).
    surrogate, op = FORMS[name]
    z = torch.randn(200, dtype=torch.float64) * 4
    z = z[(z - z.round()).abs() > 0.05]  # away from the kinks at integers (0, 6, +-3, -1, 2)
    z.requires_grad_()
    (ours,) = torch.autograd.grad(surrogate(z, 1e-4).sum(), z)
    (vanilla,) = torch.autograd.grad(op(z).sum(), z)
    # rtol: ATen's own hardsigmoid backward multiplies by 1/6 rounded to float32.
    torch.testing.assert_close(ours, vanilla, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_no_subnormal_in_the_backward(name):
    # The contract of kernels/reference.py: far-negative pre-activations give exactly 0, never subnormals.
    surrogate, _ = FORMS[name]
    z = -torch.logspace(0, 4, 200, dtype=torch.float32).requires_grad_()
    (grad,) = torch.autograd.grad(surrogate(z, 0.3).sum(), z)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((grad != 0) & (grad.abs() < tiny)).any()


# ------------------------------------------------------------------ PReLU
@pytest.mark.parametrize("shape,slopes", [((3, 4, 5, 5), 4), ((3, 4, 5, 5), 1), ((6, 4), 4), ((7,), 1)])
@pytest.mark.parametrize("temp", [0.05, 0.3])
def test_prelu_is_leaky_relu_with_the_learned_slope_and_its_weight_gradient_is_exact(shape, slopes, temp):
    z = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
    weight = torch.linspace(-0.3, 0.6, slopes, dtype=torch.float64).requires_grad_()
    g = torch.randn(shape, dtype=torch.float64)
    out = surrogate_prelu(z, weight, temp)
    assert torch.equal(out, F.prelu(z, weight))
    dz, dweight = torch.autograd.grad(out, (z, weight), g)
    # Reference: autograd of the LeakyReLU stand-in, one slope per channel (dim 1), written out.
    a = weight.detach().reshape(-1, *[1] * (z.dim() - 2)) if slopes > 1 else weight.detach()
    (ref_dz,) = torch.autograd.grad(a * z + (1 - a) * temp * softplus(z / temp), z, g)
    (ref_dweight,) = torch.autograd.grad(F.prelu(z, weight), weight, g)
    torch.testing.assert_close(dz, ref_dz, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dweight, ref_dweight, rtol=1e-12, atol=1e-12)


def test_prelu_small_temp_is_vanilla_and_float32_forward_bit_identical():
    z = torch.randn(2, 3, 6, 6) * 3
    z = torch.where(z.abs() < 0.05, torch.full_like(z, 0.5), z).requires_grad_()
    weight = torch.tensor([0.25, -0.1, 0.5], requires_grad=True)
    out = surrogate_prelu(z, weight, 1e-4)
    assert torch.equal(out, F.prelu(z, weight))
    ours = torch.autograd.grad(out.sum(), (z, weight))
    vanilla = torch.autograd.grad(F.prelu(z, weight).sum(), (z, weight))
    torch.testing.assert_close(ours[0], vanilla[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], vanilla[1], rtol=1e-6, atol=1e-6)


def test_prelu_under_torch_func_and_compile():
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    weight = torch.tensor([0.2, 0.3, -0.4], dtype=torch.float64)
    f = lambda t, w: surrogate_prelu(t, w, 0.4).sum()  # noqa: E731
    x, w = z.clone().requires_grad_(), weight.clone().requires_grad_()
    eager = torch.autograd.grad(f(x, w), (x, w))
    func = torch.func.grad(f, argnums=(0, 1))(z, weight)
    x, w = z.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x, w), (x, w))
    for got in (func, compiled):
        torch.testing.assert_close(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1])


@pytest.mark.parametrize("name", ["silu", "gelu", "hardswish", "mish", "hard_mish"])
def test_gated_units_backward_is_their_soft_gate(name):
    # SiLU = z * sigmoid(z), GELU = z * Phi(z), Hardswish = z * hardsigmoid(z), Mish = z * tanh(softplus(z)),
    # hard_mish = z * clamp(z / 2 + 1, 0, 1): the rule's backward is the gate alone at temp 1, i.e. the
    # unit's own gate without its slope term.
    surrogate, _, _ = CASES[name]
    z = torch.linspace(-6, 6, 121, dtype=torch.float64, requires_grad=True)
    (ours,) = torch.autograd.grad(surrogate(z, 1.0).sum(), z)
    gate = {"silu": torch.sigmoid(z), "gelu": 0.5 * (1 + torch.erf(z / math.sqrt(2))), "hardswish": F.hardsigmoid(z),
            "mish": torch.tanh(torch.log1p(torch.exp(z))), "hard_mish": (z / 2 + 1).clamp(0, 1)}
    torch.testing.assert_close(ours, gate[name].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_finite_at_extremes(name):
    surrogate, _ = FORMS[name]
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


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh"])
def test_float32_silu_and_gelu_take_the_relu_fast_paths_and_keep_the_contract(name, layout):
    # In float32 these gates run the ReLU rule's fast paths (C kernel when contiguous, fused
    # softplus_backward otherwise); the contract (float64, plain torch) must still hold.
    from excitation.kernels.activations import surrogate_activation_backward
    from excitation.kernels.reference import flush_subnormal, gated_backward

    z = torch.randn(6, 40, 9) * 30
    g = torch.randn(6, 40, 9) * 1e-30  # products that underflow unless flushed
    if layout == "strided":
        z, g = z.transpose(0, 2), g.transpose(0, 2)
    ours = surrogate_activation_backward(g, z, name, 0.7, [])
    # The contract in float64, rounded to float32 and flushed at float32's smallest normal.
    ref = flush_subnormal(gated_backward(g.double(), SPECS[name].gate(z.double(), 0.7)).float())
    # Values within a few smallest normals of the flush line may land on either side of it
    # (the C kernel floors the gate on its logit, the contract on its value).
    torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-37)
    assert (ours == 0).sum() > 0 and (ours != 0).sum() > 0  # both regimes are exercised
    assert int(((ours != 0) & (ours.abs() < torch.finfo(torch.float32).tiny)).sum()) == 0


@pytest.mark.parametrize("name", ["relu6", "hardtanh", "hardsigmoid", "hardswish"])
def test_float32_cpu_backward_takes_the_c_kernel_and_matches_the_float64_standin(name, monkeypatch):
    # The eager float32 CPU backward of these kinds runs one C pass (kernels.native); float64 takes
    # the torch path.  Both must give the stand-in's gradient, and the C kernel must really have run.
    from excitation.kernels import native

    if not native.available():
        pytest.skip(f"no C kernels on this machine: {native.status()}")  # the torch path is tested above
    calls = []
    for kernel in ("hardtanh_sigmoid_backward", "hardswish_backward"):
        real = getattr(native, kernel)
        monkeypatch.setattr(native, kernel, lambda *a, _real=real, _k=kernel: calls.append(_k) or _real(*a))
    surrogate, _, standin = CASES[name]
    torch.manual_seed(0)
    z = torch.randn(4, 8, 9, 9) * 4
    temp = 0.3 if name != "hardswish" else 1.6
    leaf = z.clone().requires_grad_(True)
    surrogate(leaf, temp).backward(torch.ones_like(z))
    z64 = z.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(standin(z64, temp).sum(), z64)
    assert calls == ["hardswish_backward" if name == "hardswish" else "hardtanh_sigmoid_backward"]
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-5, atol=1e-6)
