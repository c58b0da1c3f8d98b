"""BatchNorm -> ReLU fusion (excitation/fxpass/fusion.py, excitation/kernels/fused.py).

The fused op must be invisible except in memory: the forward bit-identical to the
original, the pullback equal to the unfused pass and to the independent reference,
parameter gradients equal to autograd's, and it must fall back (not fail) where it
cannot run fused: training mode, hooks, a broadcasting residual.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import excitation
from excitation.bench import _saved_bytes
from excitation.kernels import native
from excitation.kernels.fused import batch_norm_relu
from excitation.kernels.ops import surrogate_relu

from .helpers import fingerprint, reference_pullback, rel_err


class Block(nn.Module):
    """conv-bn-relu, a residual bn + add -> relu (as in ResNet), a shared BatchNorm and some that must not fuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.shared = nn.BatchNorm2d(8)  # called twice, fused twice
        self.bn_used_twice = nn.BatchNorm2d(8)  # its output has two readers: must not fuse
        self.bn_plain = nn.BatchNorm2d(8, affine=False)
        self.relu = nn.ReLU(inplace=True)  # reused by several sites
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        b = self.relu(b + a)  # residual: bn2 + add fused
        c = F.relu(self.shared(b))
        c = torch.relu(self.shared(c) + b)
        d = self.bn_used_twice(c)
        e = F.relu(d) + d
        f = self.bn_plain(e).relu()
        return self.head(f.mean((2, 3)))


def _randomise_statistics(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            if module.affine:
                module.weight.data.uniform_(0.5, 1.5)
                module.bias.data.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.fixture
def block():
    return _randomise_statistics(Block())


def test_what_fuses_and_what_does_not(block):
    report = excitation.report(excitation.excite(block))
    fused = {site.node: site.fused for site in report.sites}
    assert len(report.sites) == 6
    assert [f for f in fused.values() if f is not None] == ["bn1", "bn2 + add", "shared", "shared + add", "bn_plain"]
    assert sum(f is None for f in fused.values()) == 1  # the ReLU of bn_used_twice
    assert "5 ReLU sites fused" in str(report)
    unfused = excitation.report(excitation.excite(block, fuse=False))
    assert all(site.fused is None for site in unfused.sites)
    assert [s.node for s in unfused.sites] == [s.node for s in report.sites]


def test_forward_bits_and_pullback_equal_the_unfused_pass_and_the_reference(block):
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    model = block.double()
    fused, unfused = excitation.excite(model), excitation.excite(model, fuse=False)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
    ours = excitation.pullback(fused, x, 2)
    assert rel_err(ours, excitation.pullback(unfused, x, 2)) < 1e-14
    assert rel_err(ours, reference_pullback(model, x, 2)) < 1e-10
    assert rel_err(ours, excitation.gradient(model, x, 2)) > 0.05  # the gate does act


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_torchvision_models_fuse_every_relu_and_save_what_vanilla_saves(name):
    torch.manual_seed(0)
    model = _randomise_statistics(torchvision.models.get_model(name, weights=None))
    for param in model.parameters():
        param.requires_grad_(False)
    fused, unfused = excitation.excite(model), excitation.excite(model, fuse=False)
    sites = excitation.report(fused).sites
    relus = [s for s in sites if s.kind == "relu"]
    assert all(s.fused for s in relus), [s.name for s in relus if not s.fused]
    x = torch.rand(4, 3, 160, 160)  # large enough that activations, not the saved weights, dominate
    target = torch.tensor([1, 7, 2, 3])
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))
    assert rel_err(excitation.pullback(fused, x, target), excitation.pullback(unfused, x, target)) < 1e-6

    def run(module):
        return lambda inputs, t: excitation.gradient(module, inputs, t)

    vanilla = _saved_bytes(run(model), x, target)
    # Fused: every saved tensor is one vanilla saves too (the pools keep their input instead of indices).
    assert _saved_bytes(run(fused), x, target) <= 1.1 * vanilla
    assert _saved_bytes(run(unfused), x, target) > 1.15 * vanilla  # measured 1.17 (resnet18), 1.42 (densenet121)


def test_parameter_gradients_match_autograd_of_the_unfused_chain(block):
    model = block.double()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    fused, unfused = excitation.excite(model), excitation.excite(model, fuse=False)
    params = {k: v.detach() for k, v in fused.named_parameters()}

    def loss(module):
        return lambda p, inputs: torch.func.functional_call(module, p, (inputs,))[:, 1].sum()

    got = torch.func.grad(loss(fused), argnums=(0, 1))(params, x)
    want = torch.func.grad(loss(unfused), argnums=(0, 1))(params, x)
    for key in params:
        assert rel_err(got[0][key], want[0][key]) < 1e-12, key
    assert rel_err(got[1], want[1]) < 1e-12
    # .backward() on a fused model fills BatchNorm's .grad like the unfused one does.
    leaf = x.clone().requires_grad_(True)
    fused(leaf)[:, 1].sum().backward()
    assert rel_err(fused.bn2.weight.grad, got[0]["bn2.weight"]) < 1e-12
    for p in model.parameters():
        p.grad = None


def test_plain_eager_runs_the_cheap_function_and_double_backward_matches(block):
    model = block.double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused, unfused = excitation.excite(model), excitation.excite(model, fuse=False)
    out = fused(x.clone().requires_grad_(True))
    names = set()
    stack = [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and type(node).__name__ not in names:
            names.add(type(node).__name__)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    # the CPU's Function (a GPU runs _EagerBatchNormReLU); bn_used_twice keeps NativeBatchNormBackward0
    assert "_EagerCpuBatchNormReLUBackward" in names, names

    def second_order(module):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(leaf)[:, 1].sum(), leaf, create_graph=True)
        (again,) = torch.autograd.grad(grad.square().sum(), leaf)
        return again

    assert rel_err(second_order(fused), second_order(unfused)) < 1e-12


def test_training_mode_runs_unfused_and_updates_statistics_like_the_original(block):
    original = block
    twin = copy.deepcopy(original)
    excited = excitation.excite(twin)  # shares twin's buffers
    excited.train()
    original.train()
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(excited(x), original(x))
    for (name, a), (_, b) in zip(original.named_buffers(), twin.named_buffers()):
        assert torch.equal(a, b), name
    assert not original.bn1.running_mean.equal(torch.zeros(8))


def test_a_hook_on_the_batch_norm_still_fires(block):
    excited = excitation.excite(block)
    seen = []
    excited.bn1.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(excited(x), block(x))
    assert seen == [torch.Size([2, 8, 8, 8])]


def test_a_broadcasting_residual_falls_back_to_the_unfused_chain():
    bn = nn.BatchNorm2d(4).eval()
    x, residual = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(4, 1, 1, dtype=torch.float64)
    bn.double()
    leaf = x.clone().requires_grad_(True)
    out = batch_norm_relu(leaf, bn, residual, 0.3)
    assert torch.equal(out, torch.relu(bn(x) + residual))
    (grad,) = torch.autograd.grad(out.sum(), leaf)
    z = (bn(x) + residual)
    expected = torch.sigmoid(z / 0.3) * bn.weight.reshape(1, -1, 1, 1) / torch.sqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    assert rel_err(grad, expected) < 1e-12


def test_fuse_must_be_a_bool(block):
    with pytest.raises(TypeError, match="fuse must be True or False"):
        excitation.excite(block, fuse="no")


def test_bad_input_gets_batch_norms_own_error():
    excited = excitation.excite(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()).eval())
    with pytest.raises(ValueError, match="expected 4D input"):
        excited(torch.randn(3, 3))


def test_re_exciting_keeps_fusion_and_takes_the_new_temperature(block):
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    model = block.double()
    again = excitation.excite(excitation.excite(model), temp=0.7)
    assert sum(s.fused is not None for s in excitation.report(again).sites) == 5
    assert rel_err(excitation.pullback(again, x, 0), excitation.pullback(excitation.excite(model, temp=0.7, fuse=False), x, 0)) < 1e-14
    unfused = excitation.excite(excitation.excite(model), fuse=False)
    assert not any(n.target is batch_norm_relu for n in unfused.graph.nodes)
    assert rel_err(excitation.pullback(unfused, x, 0), excitation.pullback(excitation.excite(model), x, 0)) < 1e-14


def _own_gradient(module, x, target):
    """The gradient of ``module``'s own autograd graph (an exported/scripted module's backward, as it runs)."""
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(leaf)[:, target].sum(), leaf)
    return grad


def test_the_runtimes_keep_the_fused_backward(block):
    """export holds the fused op (and keeps its backward: the silent-drop guard); func, compile, trace, script agree."""
    x = torch.randn(2, 3, 8, 8)
    excited = excitation.excite(block)
    want = excitation.pullback(excited, x, 3)
    assert rel_err(want, excitation.gradient(block, x, 3)) > 0.05

    exported = torch.export.export(excited, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count("excitation.surrogate_batch_norm_relu.default") == 5
    assert rel_err(_own_gradient(exported.module(), x, 3), want) < 1e-5

    def score(inputs):
        return excited(inputs)[:, 3].sum()

    assert rel_err(torch.func.grad(score)(x), want) < 1e-5
    assert rel_err(_own_gradient(torch.jit.trace(excited, (x,)), x, 3), want) < 1e-5
    with pytest.warns(FutureWarning):
        scripted = torch.jit.script(excited)
    assert rel_err(_own_gradient(scripted, x, 3), want) < 1e-5
    compiled = torch.compile(excited, fullgraph=True)
    assert rel_err(_own_gradient(compiled, x, 3), want) < 1e-4


def test_the_original_model_is_untouched(block):
    before = fingerprint(block)
    excited = excitation.excite(block)
    excitation.pullback(excited, torch.randn(2, 3, 8, 8), 1)
    excitation.pullbacks(excited, torch.randn(2, 3, 8, 8), [0, 1])
    assert fingerprint(block) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_fused_forward_bits_pullback_and_memory(block):
    model = block.cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    fused, unfused = excitation.excite(model), excitation.excite(model, fuse=False)
    with torch.no_grad():
        assert torch.equal(fused(x), model(x))  # the same cuDNN BatchNorm call
    peaks = []
    for module in (fused, unfused):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        grad = _own_gradient(module, x, 1)
        peaks.append(torch.cuda.max_memory_allocated())
        peaks.append(grad)
    assert rel_err(peaks[1], peaks[3]) < 1e-5
    assert peaks[0] < peaks[2]


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32 + sigmoid: the C kernel
def test_cpu_backward_gates_in_place_and_leaves_its_inputs_alone(gate, with_residual, dtype):
    # Without parameter gradients the CPU backward writes the gate into the recomputed z and
    # applies BatchNorm's input gradient in place: the incoming gradient, x and the residual
    # must come out untouched, and the result equal autograd through the unfused chain.
    torch.manual_seed(0)
    bn = _randomise_statistics(nn.Sequential(nn.BatchNorm2d(4)))[0].to(dtype).requires_grad_(False)
    x = torch.randn(2, 4, 5, 5, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True) if with_residual else None
    inputs = [x] + ([residual] if with_residual else [])
    cotangent = torch.randn_like(x)
    before = [t.detach().clone() for t in (cotangent, *inputs)]
    got = torch.autograd.grad(batch_norm_relu(x, bn, residual, 0.3, gate), inputs, cotangent)
    for kept, now in zip(before, (cotangent, *inputs)):
        assert torch.equal(kept, now)
    z = bn(x) if residual is None else bn(x) + residual
    want = torch.autograd.grad(surrogate_relu(z, 0.3, gate), inputs, cotangent)
    for a, b in zip(got, want):
        assert rel_err(a, b) < (1e-14 if dtype == torch.float64 else 1e-6)
    if with_residual:
        assert got[1].data_ptr() != got[0].data_ptr()  # dx and the residual's gradient are two tensors


def test_parameter_gradients_are_computed_only_when_asked_for(block, monkeypatch):
    # needs_input_grad is fixed in the forward; a pullback of a model whose parameters require
    # grad must still skip BatchNorm's parameter reductions, as vanilla's backward does.
    from excitation.kernels import fused as fused_kernels

    calls = []
    in_place = fused_kernels._cpu_input_gradients
    monkeypatch.setattr(fused_kernels, "_cpu_input_gradients", lambda *a: calls.append(1) or in_place(*a))
    model = excitation.excite(block)
    x = torch.randn(2, 3, 8, 8)
    assert all(p.requires_grad for p in model.parameters())
    excitation.pullback(model, x, 1)
    assert len(calls) == 5  # every fused site, parameter gradients skipped
    calls.clear()
    leaf = x.clone().requires_grad_(True)
    model(leaf)[:, 1].sum().backward()
    assert len(calls) == 1 and model.bn1.weight.grad is not None  # only bn_plain: it has no parameters
    (weight_grad,) = torch.autograd.grad(model(x)[:, 1].sum(), model.bn2.weight)
    assert rel_err(weight_grad, model.bn2.weight.grad) < 1e-6
    for p in block.parameters():
        p.grad = None


def test_cpu_backward_under_a_mode_entered_after_the_forward_runs_where_the_mode_sees_it():
    # The forward decides once whether the C backward may run; a dispatch mode entered between
    # forward and backward (a profiler, the subnormal counter) must still see every op, so the
    # backward then takes the torch path, with the same result.
    from excitation.subnormals import SubnormalCounter

    torch.manual_seed(0)
    bn = _randomise_statistics(nn.Sequential(nn.BatchNorm2d(4)))[0].requires_grad_(False)
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    cotangent = torch.randn_like(x)
    (plain,) = torch.autograd.grad(batch_norm_relu(x, bn), x, cotangent)
    y = batch_norm_relu(x, bn)
    with SubnormalCounter() as counter:
        (seen,) = torch.autograd.grad(y, x, cotangent)
    assert counter.values >= x.numel(), "the backward ran a C call the mode could not see"
    assert rel_err(seen, plain) < 1e-6


def test_cpu_backward_takes_the_c_kernel_exactly_when_every_tensor_fits(monkeypatch):
    # The site's checks are pared down for host time (batch 1); this pins what they must still
    # catch: an input or a grad whose planes are strided.  Both gates have the kernel.  Each case
    # must equal the unfused chain, whichever path it takes.
    from excitation.kernels import fused as fused_kernels

    calls = []
    unchecked = native.batch_norm_relu_gate_backward_unchecked
    monkeypatch.setattr(native, "batch_norm_relu_gate_backward_unchecked",
                        lambda *a: calls.append(1) or unchecked(*a))
    torch.manual_seed(0)
    bn = _randomise_statistics(nn.Sequential(nn.BatchNorm2d(4)))[0].requires_grad_(False)
    dense = torch.randn(2, 4, 5, 5, requires_grad=True)
    strided = torch.randn(2, 4, 5, 10)[..., ::2]  # planes strided along W
    strided_x = torch.randn(2, 4, 5, 10)[..., ::2].requires_grad_(True)
    for x, gate, cotangent, takes_c in [(dense, "sigmoid", torch.randn(2, 4, 5, 5), True),
                                        (dense, "sigmoid", torch.randn(2, 8, 5, 5)[:, 2:6], True),  # a slice of a cat
                                        (dense, "normal_cdf", torch.randn(2, 4, 5, 5), True),
                                        (dense, "sigmoid", strided, False),
                                        (strided_x, "normal_cdf", torch.randn(2, 4, 5, 5), False)]:
        calls.clear()
        (got,) = torch.autograd.grad(fused_kernels.batch_norm_relu(x, bn, None, 0.3, gate), x, cotangent)
        assert bool(calls) == takes_c, (gate, cotangent.stride())
        (want,) = torch.autograd.grad(surrogate_relu(bn(x), 0.3, gate), x, cotangent)
        assert rel_err(got, want) < 1e-6
