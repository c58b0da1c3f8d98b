"""The surrogate ops against plain-torch references (see tests/helpers.py)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from excitation.kernels import surrogate_max_pool2d, surrogate_relu
from excitation.kernels.ops import call_surrogate_relu, pool2d_backward
from excitation.kernels.reference import (
    max_pool2d_output_size,
    soft_max_pool2d_backward,
)

from .helpers import (
    compiled_gradient_and_saved_bytes,
    frozen_conv_relu_conv,
    rel_err,
    saved_bytes,
    soft_pool_reference,
)


# ------------------------------------------------------------------------ ReLU
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_relu_forward_is_bit_identical(dtype):
    z = torch.randn(4, 5, 6).to(dtype)
    z[0, 0, :3] = torch.tensor([0.0, -0.0, math.inf])
    assert torch.equal(surrogate_relu(z), torch.relu(z))


@pytest.mark.parametrize("temp", [1e-3, 0.3, 2.0])
def test_relu_sigmoid_backward_is_softplus_gradient(temp):
    z = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1000, dtype=torch.float64)
    (ours,) = torch.autograd.grad(surrogate_relu(z, temp), z, g)
    (ref,) = torch.autograd.grad(temp * F.softplus(z / temp), z, g)
    assert rel_err(ours, ref) < 1e-12


def test_relu_normal_cdf_backward_is_phi():
    z = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1000, dtype=torch.float64)
    (ours,) = torch.autograd.grad(surrogate_relu(z, 0.5, "normal_cdf"), z, g)
    expected = g * 0.5 * (1 + torch.erf(z.detach() / (0.5 * math.sqrt(2))))
    assert rel_err(ours, expected) < 1e-12


def test_relu_backward_is_finite_at_extremes():
    z = torch.tensor([-math.inf, -1e30, -1e-30, 0.0, 1e-30, 1e30, math.inf], requires_grad=True)
    for gate in ("sigmoid", "normal_cdf"):
        (grad,) = torch.autograd.grad(surrogate_relu(z, 1e-6, gate).sum(), z)
        assert torch.isfinite(grad).all(), gate
        assert grad[0] == 0 and grad[-1] == 1


def _generic_eager(z: torch.Tensor) -> torch.Tensor:
    """The generic classic-Function mechanism, which the CPU fast path must equal bit for bit."""
    return call_surrogate_relu.eager.apply(z, 0.3, "sigmoid", "exact")


def _cpu_site_input(shape=(2, 8, 9, 9)) -> torch.Tensor:
    z = torch.randn(shape) * 12  # gates from ~1 down to below the 2^-64 floor (z / 0.3 < -44)
    z.view(-1)[:3] = torch.tensor([-40.0, 0.0, 40.0])
    return z.requires_grad_(True)


def test_cpu_relu_site_takes_its_own_function_and_equals_the_generic_one():
    z = _cpu_site_input()
    y = surrogate_relu(z)
    assert type(y.grad_fn).__name__ == "_EagerCpuSigmoidReLUBackward"
    assert torch.equal(y, torch.relu(z))
    g = torch.randn_like(y)
    (ours,) = torch.autograd.grad(y, z, g)
    (generic,) = torch.autograd.grad(_generic_eager(z), z, g)
    assert torch.equal(ours, generic)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((ours != 0) & (ours.abs() < tiny)).any()  # the C kernel's flush holds on this path too


@pytest.mark.parametrize("case", ["float64", "non-contiguous z", "normal_cdf", "uint8 saved"])
def test_cpu_relu_site_leaves_other_calls_to_the_generic_function(case):
    z = _cpu_site_input()
    kwargs = {}
    if case == "float64":
        z = z.detach().double().requires_grad_(True)
    elif case == "non-contiguous z":
        z = z.detach().transpose(1, 3).requires_grad_(True)
    elif case == "normal_cdf":
        kwargs["gate"] = "normal_cdf"
    else:
        kwargs["saved"] = "uint8"
    assert "eager_function" in type(surrogate_relu(z, **kwargs).grad_fn).__name__


def test_cpu_relu_site_backward_with_a_graph_an_odd_grad_or_a_mode_takes_the_contract_path():
    from excitation.subnormals import SubnormalCounter

    z = _cpu_site_input()
    g = torch.randn(z.shape[::-1]).permute(3, 2, 1, 0)  # non-contiguous: the C kernel reads grad densely
    (ours,) = torch.autograd.grad(surrogate_relu(z), z, g)
    (generic,) = torch.autograd.grad(_generic_eager(z), z, g)
    assert rel_err(ours, generic) < 1e-6
    # create_graph: the gradient is itself differentiable, as the generic mechanism's
    w = torch.randn_like(z)
    (first,) = torch.autograd.grad(surrogate_relu(z), z, w, create_graph=True)
    (second,) = torch.autograd.grad((first * w).sum(), z)
    (first_generic,) = torch.autograd.grad(_generic_eager(z), z, w, create_graph=True)
    (second_generic,) = torch.autograd.grad((first_generic * w).sum(), z)
    assert rel_err(first, first_generic) < 1e-6 and rel_err(second, second_generic) < 1e-5
    # A dispatch mode entered for the backward alone sees the gate's ops (no invisible C call).
    y = surrogate_relu(z)
    with SubnormalCounter() as counter:
        (seen,) = torch.autograd.grad(y, z, torch.ones_like(y))
    assert counter.values >= z.numel(), "the backward ran a kernel the mode could not see"
    assert rel_err(seen, torch.autograd.grad(_generic_eager(z), z, torch.ones_like(y))[0]) < 1e-6


def test_relu_opcheck():
    z = torch.randn(3, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.excitation.surrogate_relu.default, (z, 0.3, "sigmoid"))


# -------------------------------------------------------------------- max-pool
# The pool site's eager CPU Function (ops._EagerCpuMaxPool2d) against the generic mechanism.
def _generic_eager_pool(x: torch.Tensor, *args) -> "tuple[torch.Tensor, torch.Tensor]":
    from excitation.kernels.ops import _call_surrogate_max_pool2d, pool_arguments

    kernel, stride, padding, dilation, ceil_mode = args
    return _call_surrogate_max_pool2d.eager.apply(x, *pool_arguments(kernel, stride, padding, dilation, 2),
                                                  ceil_mode, 0.3, "soft")


POOL_SITES = [(3, 2, 0, 1, True), (3, 1, 1, 1, True), (2, 2, 0, 1, False), ((3, 2), (2, 1), 1, 2, False)]


@pytest.mark.parametrize("args", POOL_SITES)
def test_cpu_pool_site_takes_its_own_function_and_equals_the_generic_one(args):
    x = (torch.randn(2, 5, 11, 9) * 3).requires_grad_(True)
    out, indices = surrogate_max_pool2d(x, *args, return_indices=True)
    assert type(out.grad_fn).__name__ == "_EagerCpuMaxPool2dBackward"
    generic_out, generic_indices = _generic_eager_pool(x, *args)
    assert "eager_function" in type(generic_out.grad_fn).__name__
    assert torch.equal(out, generic_out) and torch.equal(indices, generic_indices)
    assert torch.equal(out, F.max_pool2d(x, *args))
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    (generic,) = torch.autograd.grad(generic_out, x, g)
    assert torch.equal(ours, generic)


@pytest.mark.parametrize("case", ["float64", "non-contiguous x", "window of 81", "batched 5-D"])
def test_cpu_pool_site_leaves_other_calls_to_the_generic_function(case):
    x = torch.randn(2, 5, 11, 9)
    kernel = 9 if case == "window of 81" else 3
    if case == "float64":
        x = x.double()
    elif case == "non-contiguous x":
        x = x.transpose(2, 3)
    elif case == "batched 5-D":
        x = x.unsqueeze(0)
    x.requires_grad_(True)
    try:
        out = surrogate_max_pool2d(x, kernel, 1, kernel // 2)
    except RuntimeError:
        assert case == "batched 5-D"  # torch's own max_pool2d refuses 5-D input too
        with pytest.raises(RuntimeError):
            F.max_pool2d(x, kernel, 1, kernel // 2)
        return
    assert "eager_function" in type(out.grad_fn).__name__


def test_cpu_pool_site_backward_with_a_graph_an_odd_grad_or_a_mode_takes_the_generic_path():
    from excitation.subnormals import SubnormalCounter

    x = (torch.randn(2, 5, 11, 9) * 3).requires_grad_(True)
    args = (3, 2, 1, 1, False)
    out = surrogate_max_pool2d(x, *args)
    g = torch.randn(out.shape[::-1]).permute(3, 2, 1, 0)  # non-contiguous: the C kernel reads grad densely
    (ours,) = torch.autograd.grad(out, x, g)
    (generic,) = torch.autograd.grad(_generic_eager_pool(x, *args)[0], x, g)
    assert torch.equal(ours, generic)
    w = torch.randn_like(out)  # create_graph: a differentiable gradient, as the generic mechanism's
    (first,) = torch.autograd.grad(surrogate_max_pool2d(x, *args), x, w, create_graph=True)
    (second,) = torch.autograd.grad((first * x).sum(), x)
    (first_generic,) = torch.autograd.grad(_generic_eager_pool(x, *args)[0], x, w, create_graph=True)
    (second_generic,) = torch.autograd.grad((first_generic * x).sum(), x)
    assert rel_err(first, first_generic) < 1e-6 and rel_err(second, second_generic) < 1e-5
    y = surrogate_max_pool2d(x, *args)
    with SubnormalCounter() as counter:  # a mode entered for the backward alone sees the pool's ops
        (seen,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert counter.values >= y.numel(), "the backward ran a kernel the mode could not see"
    assert rel_err(seen, torch.autograd.grad(_generic_eager_pool(x, *args)[0], x, torch.ones_like(y))[0]) < 1e-6


def _pool_configs():
    for kernel, stride, padding, dilation, ceil_mode in itertools.product(
        [2, 3, (2, 3)], [None, 1, 2, (2, 1)], [0, 1], [1, 2, (1, 2)], [False, True]
    ):
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        if padding > min(k) // 2:
            continue  # torch requires padding <= kernel / 2
        yield kernel, stride, padding, dilation, ceil_mode


POOL_CONFIGS = list(_pool_configs())


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CONFIGS)
def test_pool_forward_and_indices_are_bit_identical(kernel, stride, padding, dilation, ceil_mode):
    x = torch.randn(2, 3, 11, 13)
    try:
        expected = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    except RuntimeError:
        pytest.skip("torch rejects this configuration itself (output size <= 0)")
    out, indices = surrogate_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    assert torch.equal(out, expected[0]) and torch.equal(indices, expected[1])
    assert torch.equal(surrogate_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode), expected[0])


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CONFIGS)
def test_pool_backward_is_soft_pool_gradient(kernel, stride, padding, dilation, ceil_mode, pool_backward):
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    try:
        out = surrogate_max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, temp=0.4, pool_backward=pool_backward)
    except RuntimeError:
        pytest.skip("torch rejects this configuration itself")
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    soft = soft_pool_reference(x, kernel, stride, padding, dilation, ceil_mode, 0.4, pool_backward == "weights")
    assert soft.shape == out.shape
    (ref,) = torch.autograd.grad(soft, x, g)
    assert rel_err(ours, ref) < 1e-10


def test_pool_output_size_matches_torch():
    for size, k, s, p, d, ceil in itertools.product(range(3, 12), [2, 3], [1, 2, 3], [0, 1], [1, 2], [False, True]):
        if p > k // 2 or size + 2 * p < d * (k - 1) + 1:
            continue
        expected = F.max_pool2d(torch.zeros(1, 1, size, 1), (k, 1), (s, 1), (p, 0), (d, 1), ceil).shape[2]
        assert max_pool2d_output_size(size, k, s, p, d, ceil) == expected


def test_pool_unbatched_input():
    x = torch.randn(3, 8, 8, dtype=torch.float64, requires_grad=True)
    out = surrogate_max_pool2d(x, 2)
    assert torch.equal(out, F.max_pool2d(x, 2))
    (ours,) = torch.autograd.grad(out.sum(), x)
    (ref,) = torch.autograd.grad(soft_pool_reference(x, 2, None, 0, 1, False, 0.3).sum(), x)
    assert rel_err(ours, ref) < 1e-10


@pytest.mark.parametrize("scale,temp", [(1e30, 1e-6), (1e-30, 1e-6), (1.0, 1e-6), (1e30, 10.0)])
def test_pool_backward_is_stable_at_any_magnitude(scale, temp):
    x = torch.randn(1, 2, 7, 7, dtype=torch.float32) * scale
    g = torch.ones(1, 2, 4, 4)
    grad = soft_max_pool2d_backward(g, x, [2, 2], [2, 2], [1, 1], [1, 1], True, temp)
    assert torch.isfinite(grad).all()
    if temp == 1e-6 and scale >= 1.0:
        # Distinct values at a tiny temperature: soft pool -> hard max; gradient -> routing to the argmax.
        _, indices = F.max_pool2d(x, 2, 2, 1, 1, True, return_indices=True)
        hard = torch.zeros_like(x).view(1, 2, -1).scatter_add_(2, indices.view(1, 2, -1), g.view(1, 2, -1)).view_as(x)
        torch.testing.assert_close(grad, hard, atol=1e-3, rtol=0)


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
def test_pool_opcheck(pool_backward):
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    args = (x, [2, 2], [2, 2], [0, 0], [1, 1], False, 0.3, pool_backward)
    torch.library.opcheck(torch.ops.excitation.surrogate_max_pool2d.default, args)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_pool_reduced_precision(dtype, tol):
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    xr = x.to(dtype).requires_grad_(True)
    out = surrogate_max_pool2d(xr, 3, 2, 1)
    assert out.dtype == dtype and torch.equal(out, F.max_pool2d(xr, 3, 2, 1))
    (ours,) = torch.autograd.grad(out.sum(), xr)
    x64 = xr.detach().double().requires_grad_(True)
    (ref,) = torch.autograd.grad(soft_pool_reference(x64, 3, 2, 1, 1, False, 0.3).sum(), x64)
    assert ours.dtype == dtype and rel_err(ours, ref) < tol


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", POOL_CONFIGS[::7])
def test_pool_functional_and_in_place_backward_agree(kernel, stride, padding, dilation, ceil_mode, pool_backward):
    # The in-place path runs under plain autograd and compile; the functional one under torch.func.
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    g = torch.randn_like(out)
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)
    args = (pair(kernel), pair(kernel) if stride is None else pair(stride), pair(padding), pair(dilation), ceil_mode, 0.3,
            pool_backward)
    fast = pool2d_backward(g, x, *args)
    functional = pool2d_backward(g, x, *args, functional=True)
    torch.testing.assert_close(fast, functional, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, soft_max_pool2d_backward(g, x, *args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
def test_pool_backward_op_for_compiled_cpu_graphs_matches_and_vmaps(pool_backward):
    # Compiled CPU graphs call excitation::soft_max_pool2d_backward (ops.py says why): it must be
    # the torch path exactly, pass torch.library's checks, and vmap over cotangents and inputs.
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    args = ([3, 3], [2, 2], [1, 1], [1, 1], True, 0.3, pool_backward)
    g = torch.randn(4, *F.max_pool2d(x, 3, 2, 1, 1, True).shape, dtype=torch.float64)
    op = torch.ops.excitation.soft_max_pool2d_backward
    assert torch.equal(op(g[0], x, *args), pool2d_backward(g[0], x, *args))
    torch.testing.assert_close(op(g[0], x, *args), soft_max_pool2d_backward(g[0], x, *args), rtol=1e-12, atol=1e-12)
    torch.library.opcheck(op, (g[0], x, *args), test_utils=("test_schema", "test_faketensor"))
    rows = torch.stack([pool2d_backward(gi, x, *args) for gi in g])
    torch.testing.assert_close(torch.func.vmap(lambda gi: op(gi, x, *args))(g), rows, rtol=1e-12, atol=1e-12)
    xs = torch.randn(4, *x.shape, dtype=torch.float64)
    both = torch.func.vmap(lambda gi, xi: op(gi, xi, *args), in_dims=(1, 0))(g.movedim(0, 1), xs)
    want = torch.stack([pool2d_backward(gi, xi, *args) for gi, xi in zip(g, xs)])
    torch.testing.assert_close(both, want, rtol=1e-12, atol=1e-12)


def test_pool_backward_supports_double_backward():
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(surrogate_max_pool2d(x, 3, 2, 1).sum(), x, create_graph=True)
    (ref,) = torch.autograd.grad(soft_pool_reference(x, 3, 2, 1, 1, False, 0.3).sum(), x, create_graph=True)
    assert rel_err(grad, ref) < 1e-10
    # Second order through our backward: d/dx sum(grad * w) for a fixed w.
    w = torch.randn_like(x)
    (second,) = torch.autograd.grad((grad * w).sum(), x)
    assert torch.isfinite(second).all()


# --------------------------------------------------------------- compact saved gate
@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
def test_compact_saved_gate_error_and_size(gate):
    z = (torch.randn(64, 1000) * 2).requires_grad_()
    g = torch.randn(64, 1000)
    (exact,) = torch.autograd.grad(surrogate_relu(z, 0.3, gate), z, g)
    bound = {"bfloat16": 2.0**-8, "uint8": 0.5 / 255 + 1e-6}
    sizes = {}
    for saved in ("exact", "bfloat16", "uint8"):
        (compact,) = torch.autograd.grad(surrogate_relu(z, 0.3, gate, saved), z, g)
        if saved != "exact":
            # Elementwise: |g * (gate_q - gate)| <= |g| * quantisation step / 2.
            assert ((compact - exact).abs() <= g.abs() * bound[saved] + 1e-7).all(), saved
            assert not torch.equal(compact, exact)
        sizes[saved] = saved_bytes(lambda: surrogate_relu(z, 0.3, gate, saved))
    assert sizes == {"exact": 4 * z.numel(), "bfloat16": 2 * z.numel(), "uint8": z.numel()}


def test_compact_saved_gate_through_excite_and_runtimes():
    import excitation

    from .helpers import AllForms, rel_err

    torch.manual_seed(0)
    model, x = AllForms().eval(), torch.randn(2, 3, 17, 19)
    exact = excitation.pullback(excitation.excite(model), x, 3)
    excited = excitation.excite(model, saved="uint8")
    assert excitation.report(excited).saved == "uint8"
    ours = excitation.pullback(excited, x, 3)
    assert 0 < rel_err(ours, exact) < 2e-2
    leaf = x.clone().requires_grad_()
    exported = torch.export.export(excited, (x,)).module()
    (via_export,) = torch.autograd.grad(exported(leaf)[:, 3].sum(), leaf)
    assert rel_err(via_export, ours) < 1e-6
    via_func = torch.func.grad(lambda t: excited(t)[:, 3].sum())(x)
    assert rel_err(via_func, ours) < 1e-6
    with pytest.raises(ValueError, match="saved='int4' is not known"):
        excitation.excite(model, saved="int4")


@pytest.mark.parametrize("chunk", [1, 60, 1 << 17])
def test_cpu_pool_backward_in_plane_chunks_matches_reference(monkeypatch, chunk):
    """The CPU path processes a few planes at a time (cache-sized); any chunking gives the same gradient."""
    import excitation.kernels.torch_paths as torch_paths

    monkeypatch.setattr(torch_paths, "CPU_CHUNK_OUTPUTS", chunk)  # 30 outputs per plane: 1, 2 or all 15 planes per chunk
    x = torch.randn(3, 5, 11, 9, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    soft = soft_pool_reference(leaf, 3, 2, 1, 1, True, 0.3)
    grad = torch.randn_like(soft)
    (expected,) = torch.autograd.grad(soft, leaf, grad)
    ours = torch_paths.soft_max_pool2d_backward_chunked(grad, x, [3, 3], [2, 2], [1, 1], [1, 1], True, 0.3)
    assert rel_err(ours, expected) < 1e-12



@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_relu_keeps_the_pre_activation_in_place_of_its_output(monkeypatch, backend):
    """Under torch.compile, relu(z) is recomputed in the backward: the graph keeps z where vanilla keeps relu(z).

    Without the recompute it would keep relu(z) (for the convolution's backward) *and* z.
    """
    from excitation.kernels import ops

    model, x, z_bytes = frozen_conv_relu_conv()
    conv1, _, conv2 = model

    def ours(t):
        return conv2(surrogate_relu(conv1(t)))

    _, vanilla_bytes = compiled_gradient_and_saved_bytes(model, x, backend)
    grad, ours_bytes = compiled_gradient_and_saved_bytes(ours, x, backend)
    leaf = x.clone().requires_grad_()
    (eager,) = torch.autograd.grad(ours(leaf).sum(), leaf)
    assert rel_err(grad, eager) < 1e-5
    assert ours_bytes == vanilla_bytes
    monkeypatch.setattr(ops, "recompute_in_backward", lambda z: False)
    grad, both_bytes = compiled_gradient_and_saved_bytes(ours, x, backend)
    assert both_bytes == vanilla_bytes + z_bytes and rel_err(grad, eager) < 1e-5


@pytest.mark.parametrize("temp", [0.0, -1.0, float("nan")])
def test_the_raw_ops_refuse_a_temperature_that_is_not_positive(temp):
    # A non-positive temp would make sigmoid(z / temp) a gate of 1 or 0: the plain ReLU gradient, silently.
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="temp must be > 0"):
        surrogate_relu(x, temp=temp)
    with pytest.raises(ValueError, match="temp must be > 0"):
        surrogate_max_pool2d(x, 2, temp=temp)
