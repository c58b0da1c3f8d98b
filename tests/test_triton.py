"""The Triton kernels (ReLU gate, soft max-pool) against the reference, on the CPU under TRITON_INTERPRET=1.

The interpreter must be switched on before Triton is imported, so the checks
run in a fresh Python process; the GPU path is exercised where CUDA exists.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed")

SCRIPT = textwrap.dedent(
    """
    import json, math, torch
    from excitation.kernels.triton import launch_surrogate_relu_backward
    from excitation.kernels.reference import relu_backward as surrogate_relu_backward

    results = []
    def check(name, g, z, temp, gate, tol):
        ours = launch_surrogate_relu_backward(g, z, temp, gate)
        ref = surrogate_relu_backward(g.double(), z.double(), temp, gate)
        err = float((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ok = ours.shape == z.shape and ours.dtype == z.dtype and ours.stride() == z.stride() \\
            and bool(torch.isfinite(ours).all()) and err <= tol
        results.append({"case": name, "ok": ok, "err": err})

    torch.manual_seed(0)
    for gate in ("sigmoid", "normal_cdf"):
        for n in (1, 7, 1023, 1024, 1025, 3000):
            check(f"{gate} n={n}", torch.randn(n), torch.randn(n), 0.3, gate, 1e-6)
        x = torch.randn(2, 5, 7, 3)
        check(f"{gate} channels_last", torch.randn(2, 5, 7, 3).to(memory_format=torch.channels_last),
              x.to(memory_format=torch.channels_last), 0.7, gate, 1e-6)
        check(f"{gate} non-contiguous", torch.randn(9, 6).t(), torch.randn(6, 9), 0.3, gate, 1e-6)
        check(f"{gate} transposed both", torch.randn(9, 6).t(), torch.randn(9, 6).t(), 0.3, gate, 1e-6)
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            check(f"{gate} {dtype}", torch.randn(257).to(dtype), torch.randn(257).to(dtype), 0.3, gate, tol)
        z = torch.tensor([-math.inf, -1e30, -1.0, 0.0, 1.0, 1e30, math.inf])
        check(f"{gate} extremes", torch.ones(7), z, 1e-6, gate, 1e-6)

    # The normal-CDF gate's tail, element by element (a max-relative check cannot see it): Phi(-9)
    # is 1e-19, and (1 + erf(u / sqrt 2)) / 2 is already 0 below u = -5.9 in float32.
    z = torch.linspace(-9.08, 2.0, 2001)
    ours = launch_surrogate_relu_backward(torch.ones_like(z), z, 1.0, "normal_cdf").double()
    ref = surrogate_relu_backward(torch.ones(2001, dtype=torch.float64), z.double(), 1.0, "normal_cdf")
    err = float(((ours - ref).abs() / ref).max())
    results.append({"case": "normal_cdf tail, elementwise", "ok": bool((ref > 0).all()) and err <= 1e-5, "err": err})

    from excitation.kernels.triton import launch_soft_max_pool2d_backward
    from excitation.kernels.reference import max_pool2d_output_size, soft_max_pool2d_backward

    def check_pool(name, x, args, temp, tol, pool_backward="soft"):
        k, s, p, d, c = args
        oh = max_pool2d_output_size(x.shape[-2], k[0], s[0], p[0], d[0], c)
        ow = max_pool2d_output_size(x.shape[-1], k[1], s[1], p[1], d[1], c)
        g = torch.randn(*x.shape[:-2], oh, ow).to(x.dtype)
        ours = launch_soft_max_pool2d_backward(g, x, k, s, p, d, c, temp, pool_backward)
        ref = soft_max_pool2d_backward(g.double(), x.double(), k, s, p, d, c, temp, pool_backward)
        err = float((ours.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        ok = ours.shape == x.shape and ours.dtype == x.dtype and bool(torch.isfinite(ours).all()) and err <= tol
        results.append({"case": name, "ok": ok, "err": err})

    pools = {  # kernel, stride, padding, dilation, ceil_mode
        "resnet stem 3x3/2 pad 1": ([3, 3], [2, 2], [1, 1], [1, 1], False),
        "vgg 2x2/2": ([2, 2], [2, 2], [0, 0], [1, 1], False),
        "googlenet 3x3/2 ceil": ([3, 3], [2, 2], [0, 0], [1, 1], True),
        "3x3/1 pad 1 (overlap)": ([3, 3], [1, 1], [1, 1], [1, 1], False),
        "non-square dilated ceil": ([2, 3], [1, 2], [1, 0], [2, 1], True),
        "3x3/3 pad 1 ceil (no overlap, stores)": ([3, 3], [3, 3], [1, 1], [1, 1], True),
        "2x2/4 dilation 3 (no overlap, gaps)": ([2, 2], [4, 4], [0, 0], [3, 3], False),
    }
    for name, args in pools.items():
        for temp in (0.1, 1.0):
            check_pool(f"pool {name} t={temp}", torch.randn(2, 3, 11, 9), args, temp, 1e-5)
        check_pool(f"pool {name} weights only", torch.randn(2, 3, 11, 9), args, 0.3, 1e-5, "weights")
    check_pool("pool channels_last", torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last),
               pools["resnet stem 3x3/2 pad 1"], 0.3, 1e-5)
    check_pool("pool float16", torch.randn(1, 2, 8, 8).half(), pools["vgg 2x2/2"], 0.3, 5e-3)
    x = torch.randn(1, 1, 6, 6)
    x[0, 0, 0, 0], x[0, 0, 3, 3] = math.inf, -math.inf
    check_pool("pool +-inf inputs", x, pools["vgg 2x2/2"], 1e-6, 1e-6)
    print(json.dumps(results))
    """
)


def test_triton_kernel_matches_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    failed = [r for r in results if not r["ok"]]
    assert len(results) == 24 + 1 + 17 + 7 and not failed, failed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("gate, kernel", [("normal_cdf", "surrogate_relu_backward_kernel"), ("sigmoid", "softplus_backward")])
def test_cuda_backward_uses_its_kernel_and_matches_reference(gate, kernel):
    import excitation
    from excitation.gates import GATES

    z = torch.randn(4, 64, 33, 35, device="cuda", requires_grad=True)
    g = torch.randn_like(z)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        (ours,) = torch.autograd.grad(excitation.surrogate_relu(z, 0.3, gate), z, g)
    assert any(kernel in e.name for e in prof.events()), sorted({e.name for e in prof.events()})
    expected = g.double() * GATES[gate](z.detach().double(), 0.3)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_pool_backward_uses_triton_and_matches_reference():
    import excitation
    from excitation.kernels.reference import soft_max_pool2d_backward

    x = torch.randn(4, 16, 56, 56, device="cuda", requires_grad=True)
    out = excitation.surrogate_max_pool2d(x, 3, 2, 1, temp=0.3)
    g = torch.randn_like(out)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        (ours,) = torch.autograd.grad(out, x, g)
    # Eager launches the Triton kernel directly (torch.compile goes through the triton_op).
    assert any("soft_max_pool2d_backward_kernel" in e.name for e in prof.events()), sorted({e.name for e in prof.events()})
    expected = soft_max_pool2d_backward(g.cpu().double(), x.detach().cpu().double(), [3, 3], [2, 2], [1, 1], [1, 1],
                                        False, 0.3)
    torch.testing.assert_close(ours.cpu().double(), expected, rtol=1e-4, atol=1e-5)


def test_triton_kernels_launch_directly_only_where_no_tracer_records(monkeypatch):
    """A raw launch is invisible to tracers: under make_fx / FakeTensorMode / torch.func the triton_op must run.

    (On the H200 machine a raw launch inside AOTAutograd's trace left the zero-filled buffer in the
    compiled graph: the compiled pullback was zero upstream of every pool.)
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from excitation.kernels.dispatch import launch_directly as _launch_directly

    x = torch.randn(3)
    seen = []
    assert _launch_directly(x, x)
    with FakeTensorMode() as mode:
        assert not _launch_directly(mode.from_tensor(x))
    make_fx(lambda t: (seen.append(_launch_directly(t)), t * 2)[1])(x)
    torch.func.grad(lambda t: (seen.append(_launch_directly(t)), t.sum())[1])(x)
    torch.compile(lambda t: (seen.append(_launch_directly(t)), t * 2)[1], backend="eager")(x)
    assert seen == [False, False, False]
