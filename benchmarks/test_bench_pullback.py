"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

Times are machine-dependent; compare rows of one run (same process, same
machine), e.g. ``--benchmark-group-by=group`` puts each op next to its vanilla
counterpart.  These never run in CI (tests/ is the test path).
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision

import excitation
from excitation.kernels.ops import pool2d_backward as soft_max_pool2d_backward
from excitation.kernels.ops import relu_gate_backward as surrogate_relu_backward

GATE_SHAPE = (8, 64, 112, 112)  # a resnet50 stem activation at batch 8


@pytest.fixture(scope="module")
def gate_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(GATE_SHAPE, generator=g), torch.randn(GATE_SHAPE, generator=g)


@pytest.mark.benchmark(group="relu backward (8x64x112x112)")
def test_vanilla_threshold_backward(benchmark, gate_inputs):
    grad, z = gate_inputs
    benchmark(torch.ops.aten.threshold_backward, grad, z, 0.0)


@pytest.mark.benchmark(group="relu backward (8x64x112x112)")
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_surrogate_relu_backward(benchmark, gate_inputs, gate):
    grad, z = gate_inputs
    benchmark(surrogate_relu_backward, grad, z, 0.3, gate)


@pytest.mark.benchmark(group="relu backward (8x64x112x112)")
def test_naive_three_pass_backward(benchmark, gate_inputs):
    grad, z = gate_inputs
    benchmark(lambda: grad * torch.sigmoid(z / 0.3))


@pytest.mark.benchmark(group="max-pool backward (8x64x112x112, 3x3 s2 p1)")
def test_vanilla_max_pool_backward(benchmark, gate_inputs):
    grad_full, x = gate_inputs
    out, indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    grad = torch.randn_like(out)
    benchmark(torch.ops.aten.max_pool2d_with_indices_backward, grad, x, [3, 3], [2, 2], [1, 1], [1, 1], False, indices)


@pytest.mark.benchmark(group="max-pool backward (8x64x112x112, 3x3 s2 p1)")
def test_soft_max_pool_backward(benchmark, gate_inputs):
    _, x = gate_inputs
    grad = torch.randn(8, 64, 56, 56)
    benchmark(soft_max_pool2d_backward, grad, x, [3, 3], [2, 2], [1, 1], [1, 1], False, 0.3)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, excitation.excite(model), torch.rand(4, 3, 112, 112)


def _input_grad(module, x, target=3):
    leaf = x.clone().requires_grad_(True)
    return torch.autograd.grad(module(leaf)[:, target].sum(), leaf)[0]


@pytest.mark.benchmark(group="resnet18 input gradient (4x3x112x112)")
def test_resnet18_vanilla_gradient(benchmark, resnet):
    model, _, x = resnet
    benchmark(_input_grad, model, x)


@pytest.mark.benchmark(group="resnet18 input gradient (4x3x112x112)")
def test_resnet18_pullback(benchmark, resnet):
    _, excited, x = resnet
    benchmark(_input_grad, excited, x)


@pytest.mark.benchmark(group="resnet18 input gradient (4x3x112x112)")
def test_resnet18_pullback_unfused(benchmark, resnet):
    model, _, x = resnet
    benchmark(_input_grad, excitation.excite(model, fuse=False), x)  # BatchNorm -> ReLU fusion off


@pytest.mark.benchmark(group="8 class pullbacks per image (resnet18, 4x3x112x112)")
def test_pullbacks_vmap(benchmark, resnet):
    _, excited, x = resnet
    benchmark(excitation.pullbacks, excited, x, list(range(8)))


@pytest.mark.benchmark(group="8 class pullbacks per image (resnet18, 4x3x112x112)")
def test_pullbacks_python_loop(benchmark, resnet):
    _, excited, x = resnet
    benchmark(lambda: torch.stack([excitation.pullback(excited, x, t) for t in range(8)], 1))
