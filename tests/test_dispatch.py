"""The dispatch: the runtime each call sees, and the table from runtime and tensors to an implementation."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from excitation.kernels import dispatch
from excitation.kernels.dispatch import (
    RUNTIMES,
    activation_backward_path,
    compiled_relu_backward_path,
    forward_mechanism,
    pool2d_backward_path,
    pool_forward_path,
    relu_backward_path,
)

COMPILERS = ("dynamo", "export")


# ------------------------------------------------------------------ the table, as a matrix
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_forward_mechanism_per_runtime(runtime):
    # The custom op where a recorder must keep our op; the twin where torch.func or dynamo needs an
    # autograd.Function it can transform or inline; the classic Function in plain eager.
    expected = {"eager": "eager", "double_backward": "eager", "functorch": "twin", "dynamo": "twin",
                "export": "op", "trace": "op"}[runtime]
    assert forward_mechanism(runtime) == expected


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("c_ready", [True, False])
def test_relu_backward_on_the_cpu(runtime, c_ready):
    path = relu_backward_path(runtime, "cpu", "sigmoid", c_ready)
    if runtime == "eager":
        assert path == ("c" if c_ready else "torch")
    elif runtime == "trace":
        assert path == "torch"  # a recorder sees torch ops; first-order, so in place is safe
    else:
        assert path == "torch_functional"
    assert relu_backward_path("trace", "cpu", "sigmoid", c_ready, grad_mode=True) == "torch_functional"


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("c_ready", [True, False])
def test_relu_backward_into_a_buffer_the_caller_owns(runtime, c_ready):
    # The eager CPU fast path of fused BatchNorm -> ReLU writes the gate into its own buffer: C only
    # where a raw call is safe (no recorder, no transform, no compiler).
    path = relu_backward_path(runtime, "cpu", "sigmoid", c_ready, in_place=True)
    assert path == ("c" if c_ready and runtime in ("eager", "double_backward") else "torch")


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("c_ready", [True, False])
def test_max_pool_forward(runtime, c_ready):
    assert pool_forward_path(runtime, c_ready) == ("c" if c_ready and runtime == "eager" else "torch")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("c_built", [True, False])
def test_compiled_relu_backward(device, dtype, c_built):
    expected = "extern" if (device, dtype, c_built) == ("cpu", torch.float32, True) else "inductor"
    assert compiled_relu_backward_path(device, dtype, "sigmoid", c_built) == expected


def test_functional_backward_follows_the_table():
    x = torch.randn(3, requires_grad=True)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(t):
            return t * 1.0

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            seen.append(dispatch.functional_backward())
            return grad * 1.0

    Probe.apply(x).sum().backward()
    torch.autograd.grad(Probe.apply(x).sum(), x, create_graph=True)
    torch.func.grad(lambda t: Probe.apply(t).sum())(x.detach())
    assert seen == [False, True, True]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_relu_backward_on_cuda(runtime, gate):
    path = relu_backward_path(runtime, "cuda", gate, False, triton=True)
    if gate == "normal_cdf" and runtime in ("eager", "double_backward"):
        assert path == "triton"  # a raw launch: no op dispatch on the host
    elif gate == "normal_cdf" and runtime in ("functorch", "trace"):
        assert path == "triton_op"  # the kernel as an op, which the recorder sees
    elif runtime == "eager":
        assert path == "torch"  # sigmoid: softplus_backward is one fused ATen kernel already
    else:
        assert path == ("torch" if runtime == "trace" else "torch_functional")
    assert relu_backward_path(runtime, "cuda", gate, False, triton=False) in ("torch", "torch_functional")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_activation_backward(runtime):
    native = activation_backward_path(runtime, "cpu", torch.float32, "hardswish", None, True)
    assert native == ("c" if runtime == "eager" else "torch")
    silu = activation_backward_path(runtime, "cpu", torch.float32, "silu", "sigmoid", True)
    assert silu == "relu:" + relu_backward_path(runtime, "cpu", "sigmoid", True)
    # float64 keeps the contract's own expression (the fused softplus_backward rounds the gate).
    assert activation_backward_path(runtime, "cpu", torch.float64, "silu", "sigmoid", True) == "torch"
    assert activation_backward_path(runtime, "cpu", torch.float32, "mish", None, True) == "torch"


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_pool2d_backward(runtime, device):
    path = pool2d_backward_path(runtime, device, device == "cpu", triton=device == "cuda")
    if device == "cpu" and runtime in COMPILERS:
        assert path == "extern"  # compiled CPU graphs call the eager backward as one op
    elif runtime in ("double_backward", "functorch") or runtime in COMPILERS:
        assert path == "torch_functional"
    elif device == "cuda":
        assert path == ("triton" if runtime == "eager" else "triton_op")
    else:
        assert path == ("c" if runtime == "eager" else "torch_chunked")
    assert pool2d_backward_path("eager", "cpu", False) == "torch_chunked"
    # The extern op's body is a real kernel call: its caller says it is not functional.
    assert pool2d_backward_path("functorch", "cpu", True, functional=False) == "torch_chunked"


# --------------------------------------------------------------- the runtime each call sees
class _Probe(torch.autograd.Function):
    """Records the runtime its call and its backward see (a surrogate op decides at the call, before ``apply``)."""

    seen = []

    @staticmethod
    def forward(x):
        return x * 1.0

    @staticmethod
    def setup_context(ctx, inputs, output):  # the style torch.func needs
        pass

    @staticmethod
    def backward(ctx, grad):
        _Probe.seen.append(("backward", dispatch.backward_runtime(grad)))
        return grad * 1.0


def _probe(x):
    _Probe.seen.append(("forward", dispatch.forward_runtime(x)))
    return _Probe.apply(x)


def _seen(run):
    _Probe.seen = []
    run()
    return _Probe.seen


def test_plain_eager_and_a_graph_building_backward():
    x = torch.randn(3, requires_grad=True)
    assert _seen(lambda: _probe(x).sum().backward()) == [("forward", "eager"), ("backward", "eager")]
    assert _seen(lambda: torch.autograd.grad(_probe(x).sum(), x, create_graph=True)) == [
        ("forward", "eager"), ("backward", "double_backward")]


def test_torch_func_transforms():
    x = torch.randn(3)
    assert _seen(lambda: torch.func.grad(lambda t: _probe(t).sum())(x)) == [
        ("forward", "functorch"), ("backward", "functorch")]


def test_recorders_are_trace():
    x = torch.randn(3)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert dispatch.forward_runtime(fake) == "trace" and dispatch.backward_runtime(fake) == "trace"
    seen = []
    make_fx(lambda t: (seen.append(dispatch.forward_runtime(t)), t * 2)[1])(x)
    torch.jit.trace(lambda t: (seen.append(dispatch.forward_runtime(t)), t * 2)[1], (x,), check_trace=False)
    assert seen == ["trace", "trace"]
    assert dispatch.forward_runtime(x) == "eager"  # no state left behind


def test_compilers():
    seen = []

    def spy(t):
        seen.append(dispatch.forward_runtime(t))
        return t * 2

    torch._dynamo.reset()
    torch.compile(spy, backend="eager", fullgraph=True)(torch.randn(3))

    class Spy(torch.nn.Module):
        def forward(self, t):
            return spy(t)

    torch.export.export(Spy(), (torch.randn(3),))
    assert seen[0] == "dynamo" and seen[-1] == "export"
