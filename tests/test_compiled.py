"""kernels/compiled.py: what compiled graphs run at ReLU sites, checked against the eager pullback and the contract."""

import pytest
import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import excitation
from excitation.kernels import compiled, native
from excitation.kernels.fused import batch_norm_eval
from excitation.kernels.reference import relu_backward

from .helpers import eval_with_statistics, rel_err, saved_bytes

needs_c_kernels = pytest.mark.skipif(not native.available(), reason=f"C kernels unavailable: {native.status()}")

EXTERN_OPS = ("excitation::relu_gate_backward_cpu", "excitation::batch_norm_relu_backward_cpu")


def _layouts(shape):
    """The same values as NCHW, channels-last, and a channel slice of a channels-last concatenation."""
    torch.manual_seed(0)
    base = torch.randn(shape) * 3
    wide = torch.randn(shape[0], 3 * shape[1], *shape[2:]).contiguous(memory_format=torch.channels_last)
    wide[:, shape[1]:2 * shape[1]] = base
    return {"nchw": base, "channels_last": base.contiguous(memory_format=torch.channels_last),
            "concat_slice": wide[:, shape[1]:2 * shape[1]]}


def _bn_tensors(channels):
    torch.manual_seed(1)
    return (torch.randn(channels), torch.rand(channels) + 0.5, torch.randn(channels), torch.randn(channels))


@needs_c_kernels
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
@pytest.mark.parametrize("grad_layout", ["nchw", "channels_last", "concat_slice"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_batch_norm_relu_backward_op_matches_the_contract_in_every_layout(gate, grad_layout, x_layout):
    shape = (2, 24, 5, 7)
    grads, xs = _layouts(shape), _layouts(shape)
    grad, x = grads[grad_layout] * 0.5, xs[x_layout]
    mean, var, weight, bias = _bn_tensors(shape[1])
    dx = torch.ops.excitation.batch_norm_relu_backward_cpu(grad, x, mean, var, weight, bias, 1e-5, 0.3, gate)
    z = batch_norm_eval(x.double(), weight.double(), bias.double(), mean.double(), var.double(), 1e-5)
    scale = (weight.double() * torch.rsqrt(var.double() + 1e-5)).reshape(1, -1, 1, 1)
    expected = relu_backward(grad.double(), z, 0.3, gate) * scale
    assert dx.stride() == torch.empty_like(x).stride()  # what the fake promises Inductor
    assert rel_err(dx, expected) < 1e-5


@needs_c_kernels
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("channels_last", "channels_last"),
                                     ("concat_slice", "channels_last"), ("nchw", "channels_last"),
                                     ("channels_last", "nchw"), ("concat_slice", "nchw")])
def test_relu_gate_backward_op_matches_the_contract_in_every_layout(gate, layouts):
    grads, zs = _layouts((2, 16, 6, 6)), _layouts((2, 16, 6, 6))
    grad, z = grads[layouts[0]], zs[layouts[1]] * 0.5
    out = torch.ops.excitation.relu_gate_backward_cpu(grad, z, 0.3, gate)
    assert out.stride() == torch.empty_like(z).stride()
    assert rel_err(out, relu_backward(grad.double(), z.double(), 0.3, gate)) < 1e-6


@needs_c_kernels
@pytest.mark.parametrize("grad_layout, x_layout", [("nchw", "channels_last"), ("channels_last", "nchw")])
def test_a_gradient_in_another_layout_is_copied_once(grad_layout, x_layout):
    """Before a max-pool Inductor hands an NCHW gradient with a channels-last input: the ops copy the
    gradient into the input's layout (one pass), not both tensors to NCHW and the result back (three)."""
    from torch.profiler import profile

    shape = (2, 24, 5, 7)
    grad, x = _layouts(shape)[grad_layout], _layouts(shape)[x_layout]
    mean, var, weight, bias = _bn_tensors(shape[1])
    for call in (lambda: torch.ops.excitation.batch_norm_relu_backward_cpu(grad, x, mean, var, weight, bias, 1e-5,
                                                                          0.3, "sigmoid"),
                 lambda: torch.ops.excitation.relu_gate_backward_cpu(grad, x, 0.3, "sigmoid")):
        with profile() as prof:  # sees the ops inside a custom op's body, which a dispatch mode does not
            out = call()
        copies = sum(event.name == "aten::copy_" for event in prof.events())
        assert copies == 1 and out.stride() == x.stride()


@needs_c_kernels
def test_extern_ops_pass_opcheck():
    """Schema, fake (strides included) and real implementation agree, for NCHW and channels-last inputs."""
    for layout in ("nchw", "channels_last"):
        grad, z = _layouts((2, 8, 4, 4))[layout], _layouts((2, 8, 4, 4))[layout] * 0.7
        torch.library.opcheck(torch.ops.excitation.relu_gate_backward_cpu.default, (grad, z, 0.3, "sigmoid"),
                              test_utils=("test_schema", "test_faketensor"))
        mean, var, weight, bias = _bn_tensors(8)
        torch.library.opcheck(torch.ops.excitation.batch_norm_relu_backward_cpu.default,
                              (grad, z, mean, var, weight, bias, 1e-5, 0.3, "normal_cdf"),
                              test_utils=("test_schema", "test_faketensor"))


class DenseBlock(nn.Module):
    """densenet's shape: BatchNorm -> ReLU -> 1x1 conv -> BatchNorm -> ReLU -> 3x3 conv, concatenated onto the input."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(channels), nn.Conv2d(channels, 32, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(32), nn.Conv2d(32, 8, 3, padding=1, bias=False)
        self.head = nn.Linear(channels + 8, 5)

    def forward(self, x):
        y = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return self.head(torch.cat([x, y], 1).mean((2, 3)))


_eval_model = eval_with_statistics


def _pullback(module, x, target=1):
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(leaf)[:, target].sum(), leaf)
    return grad


def _extern_calls(fn) -> dict:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {name: sum(e.count for e in prof.key_averages() if e.key == name) for name in EXTERN_OPS}


@needs_c_kernels
@pytest.mark.parametrize("preset", ["paper", "semantic"])
def test_compiled_dense_block_runs_the_c_backward_and_equals_eager(preset):
    model = _eval_model(DenseBlock())
    excited = excitation.excite(model, preset=preset)
    x = torch.rand(2, 16, 12, 12).contiguous(memory_format=torch.channels_last)  # Inductor's layout, from the start
    torch._dynamo.reset()
    compiled_model = torch.compile(excited, fullgraph=True)
    got = _pullback(compiled_model, x)
    assert rel_err(got, _pullback(excited, x)) < 1e-5
    assert _extern_calls(lambda: _pullback(compiled_model, x)) == {EXTERN_OPS[0]: 0, EXTERN_OPS[1]: 2}


@needs_c_kernels
def test_batch_norm_parameters_that_need_gradients_keep_the_formula_backward():
    """The C kernel returns BatchNorm's input gradient only; a model being trained must get its weight gradients."""
    model = _eval_model(DenseBlock(), frozen=False)
    excited = excitation.excite(model)
    x = torch.rand(2, 16, 12, 12)
    torch._dynamo.reset()
    compiled_model = torch.compile(excited, fullgraph=True)
    leaf = x.clone().requires_grad_(True)
    compiled_model(leaf)[:, 1].sum().backward()
    got = {name: p.grad.clone() for name, p in excited.named_parameters()}
    excited.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(True)
    excited(leaf)[:, 1].sum().backward()
    for name, param in excited.named_parameters():
        assert rel_err(got[name], param.grad) < 1e-5, name
    assert _extern_calls(lambda: _pullback(compiled_model, x))[EXTERN_OPS[1]] == 0


class Inception(nn.Module):
    """GoogLeNet's shape: four conv -> BatchNorm -> ReLU branches concatenated; the next block reads the
    concatenation with a convolution and a 3x3 max-pool."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(8, width, 1, bias=False) for width in (8, 16, 4, 4))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for width in (8, 16, 4, 4))
        self.next_conv = nn.Conv2d(32, 8, 1, bias=False)
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(bn(conv(x))) for conv, bn in zip(self.convs, self.bns)], 1)
        return self.head(torch.cat([self.next_conv(y), self.pool(y)], 1).mean((2, 3)))


@pytest.mark.parametrize("extern", [True, False], ids=["c_kernels", "torch_gate"])
def test_concatenated_relus_keep_only_their_pre_activations(extern, monkeypatch):
    """One region for the ReLUs and their concatenation: the compiled graph keeps the four z's and not the
    concatenation (which the next convolution's and soft max-pool's backwards read), i.e. less than
    vanilla, which keeps the concatenation and a mask per ReLU."""
    if not extern:
        monkeypatch.setattr(compiled, "_c_kernels_built", lambda: False)
    elif not native.available():
        pytest.skip(native.status())
    model = _eval_model(Inception())
    excited = excitation.excite(model)
    x = torch.rand(2, 8, 16, 16)
    torch._dynamo.reset()
    compiled_model = torch.compile(excited, fullgraph=True)
    assert rel_err(_pullback(compiled_model, x), _pullback(excited, x)) < 1e-5
    kept = saved_bytes(lambda: _pullback(compiled_model, x))
    vanilla = saved_bytes(lambda: _pullback(torch.compile(model, fullgraph=True), x))
    z_bytes = 2 * 32 * 16 * 16 * 4
    # The z's, the convolutions' input x and small per-channel tensors; no 32-channel concatenation.
    assert z_bytes <= kept < z_bytes + 2 * 8 * 16 * 16 * 4 + 4096
    assert kept < vanilla
