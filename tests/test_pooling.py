"""1-D, 3-D and adaptive max-pool surrogates against a brute-force soft-pool reference."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from excitation.kernels import (
    surrogate_adaptive_max_pool,
    surrogate_max_pool,
    surrogate_max_pool2d,
)

MAX_POOL = {1: F.max_pool1d, 3: F.max_pool3d}
ADAPTIVE = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _regular_windows(size, kernel, stride, padding, dilation, out):
    # Every window's input positions inside the input (padding and ceil overhang dropped).
    return [[i * stride - padding + j * dilation for j in range(kernel)
             if 0 <= i * stride - padding + j * dilation < size] for i in range(out)]


def _adaptive_windows(size, out):
    return [list(range(math.floor(i * size / out), math.ceil((i + 1) * size / out))) for i in range(out)]


def _soft_pool(x, windows_per_dim, temp, weights_only=False):
    """sum_w softmax(x_w / temp) x_w for every output position, one window at a time (weights detached if asked)."""
    dims = len(windows_per_dim)
    outs = [len(w) for w in windows_per_dim]
    flat = x.reshape(-1, *x.shape[-dims:])
    result = []
    for position in itertools.product(*[range(o) for o in outs]):
        members = itertools.product(*[windows_per_dim[d][position[d]] for d in range(dims)])
        values = torch.stack([flat[(slice(None), *m)] for m in members], -1)
        weights = torch.softmax(values / temp, -1)
        result.append(((weights.detach() if weights_only else weights) * values).sum(-1))
    return torch.stack(result, -1).reshape(*x.shape[:-dims], *outs)


POOL_CASES = [  # dims, spatial, kernel, stride, padding, dilation, ceil_mode
    (1, (11,), 3, 2, 1, 1, False),
    (1, (10,), 3, 2, 1, 2, True),
    (1, (7,), 2, None, 0, 1, True),
    (3, (5, 6, 7), 2, 2, 0, 1, False),
    (3, (5, 6, 7), (3, 2, 2), (2, 1, 2), (1, 0, 1), (1, 2, 1), True),
]


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[str(i) for i in range(len(POOL_CASES))])
@pytest.mark.parametrize("temp", [0.1, 1.0])
def test_max_pool_nd_matches_forward_and_soft_pool_gradient(case, temp, pool_backward):
    dims, spatial, kernel, stride, padding, dilation, ceil_mode = case
    x = torch.randn(2, 3, *spatial, dtype=torch.float64, requires_grad=True)
    out, idx = surrogate_max_pool(x, kernel, stride, padding, dilation, ceil_mode, True, temp=temp, dims=dims,
                                  pool_backward=pool_backward)
    ref_out, ref_idx = MAX_POOL[dims](x, kernel, stride, padding, dilation, ceil_mode, True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    tup = lambda v, default: ((default if v is None else v),) * dims if not isinstance(v, tuple) else v  # noqa: E731
    k, s, p, d = tup(kernel, None), tup(stride if stride is not None else kernel, None), tup(padding, 0), tup(dilation, 1)
    windows = [_regular_windows(spatial[i], k[i], s[i], p[i], d[i], out.shape[2 + i]) for i in range(dims)]
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    (ref,) = torch.autograd.grad(_soft_pool(x, windows, temp, pool_backward == "weights"), x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
@pytest.mark.parametrize("dims,spatial,output", [
    (1, (10,), 4), (1, (7,), 7), (2, (9, 7), (4, 3)), (2, (8, 8), (2, None)), (3, (5, 7, 6), (2, 3, 4)),
])
def test_adaptive_max_pool_matches_forward_and_soft_pool_gradient(dims, spatial, output, pool_backward):
    x = torch.randn(2, 2, *spatial, dtype=torch.float64, requires_grad=True)
    out, idx = surrogate_adaptive_max_pool(x, output, True, temp=0.5, dims=dims, pool_backward=pool_backward)
    ref_out, ref_idx = ADAPTIVE[dims](x, output, True)
    assert torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
    sizes = out.shape[2:]
    windows = [_adaptive_windows(spatial[i], sizes[i]) for i in range(dims)]
    g = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, g)
    (ref,) = torch.autograd.grad(_soft_pool(x, windows, 0.5, pool_backward == "weights"), x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_unbatched_input_and_float32():
    x = torch.randn(3, 12, requires_grad=True)
    out = surrogate_max_pool(x, 3, dims=1, temp=0.3)
    assert torch.equal(out, F.max_pool1d(x, 3))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


@pytest.mark.parametrize("temp", [1e-6, 0.3, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_inputs_take_their_windows_weight(temp, dtype):
    # A +inf input is its window's max: it gets the whole gradient, like vanilla max-pool; -inf gets none.
    x = torch.randn(1, 1, 6, 6, 6, dtype=dtype)
    x[0, 0, 0, 0, 0] = math.inf
    x[0, 0, 4, 4, 4] = -math.inf
    calls = {
        "adaptive3d": lambda t: surrogate_adaptive_max_pool(t, 2, dims=3, temp=temp),
        "pool3d": lambda t: surrogate_max_pool(t, 2, dims=3, temp=temp),
        "pool2d": lambda t: surrogate_max_pool2d(t[:, :, 0], 2, temp=temp),
        "pool2d_overlapping": lambda t: surrogate_max_pool2d(t[:, :, 0], 3, 1, 1, temp=temp),
    }
    for name, call in calls.items():
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(call(leaf).sum(), leaf)
        assert torch.isfinite(grad).all(), name
        assert grad[0, 0, 0, 0, 0] >= 1 - 1e-6 and grad[0, 0, 4, 4, 4] == 0, name


def test_under_torch_func_and_vmap():
    x = torch.randn(2, 3, 9, dtype=torch.float64)
    f = lambda t: surrogate_max_pool(t, 3, 2, 1, dims=1, temp=0.4)  # noqa: E731
    eager_x = x.clone().requires_grad_()
    g = torch.randn(4, *f(x).shape, dtype=torch.float64)
    rows = [torch.autograd.grad(f(eager_x), eager_x, gi)[0] for gi in g]
    _, vjp = torch.func.vjp(f, x)
    torch.testing.assert_close(torch.func.vmap(vjp)(g)[0], torch.stack(rows))


def test_rank_must_be_known():
    with pytest.raises(ValueError, match="pass dims=1, 2 or 3"):
        surrogate_max_pool(torch.randn(1, 1, 8), 2)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_excited_nd_pools_script_and_match_eager():
    import excitation

    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3), torch.nn.MaxPool1d(3, 2, 1), torch.nn.AdaptiveMaxPool1d(4), torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).double().eval()
    x = torch.randn(2, 2, 17, dtype=torch.float64)
    excited = excitation.excite(model)
    assert excitation.report(excited).counts() == {"relu": 0, "max_pool1d": 1, "max_pool2d": 0, "adaptive_max_pool1d": 1}
    eager = excitation.pullback(excited, x, 1)
    leaf = x.clone().requires_grad_()
    (scripted,) = torch.autograd.grad(torch.jit.script(excited)(leaf)[:, 1].sum(), leaf)
    torch.testing.assert_close(scripted, eager)
    keeps_size = torch.nn.Sequential(torch.nn.AdaptiveMaxPool2d((2, None)), torch.nn.Flatten()).eval()
    with pytest.raises(TypeError, match="needs every adaptive output size"):
        torch.jit.script(excitation.excite(keeps_size))
