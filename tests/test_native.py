"""The C kernels (kernels/native.py, csrc/excitation_cpu.c) against the contract and ATen, and their fallback."""

import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from excitation.gates import GATES, hard_sigmoid_gate, hardsigmoid_unit_gate, hardtanh_gate
from excitation.kernels import native, reference, torch_paths
from excitation.kernels.reference import max_pool2d_output_size

from .helpers import rel_err

TINY = torch.finfo(torch.float32).tiny


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).sum())


def test_the_kernels_build_here():
    # CI and this machine have a C compiler (torch.compile's CPU backend needs one too).
    assert native.available(), native.status()
    assert native.status() == "on (OpenMP, torch's threads)"
    # The library needs libgomp.so.1 and must share torch's copy (the loader matches the soname):
    # a second copy would bring a second thread team onto the same cores.  Vendored copies under
    # other sonames (scikit-learn's libgomp-<hash>.so) are other libraries' business, not ours.
    mapped = {line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith("/libgomp.so.1")}
    assert len(mapped) == 1 and Path(next(iter(mapped))).parent == Path(torch.__file__).parent / "lib", mapped


def _vectorised_loops(march: str) -> set:
    """Source lines of the loops GCC vectorises when it builds the kernels for ``-march=<march>``."""
    flags = [f"-march={march}" if flag == "-march=native" else flag for flag in native._FLAGS]
    done = subprocess.run(["gcc", *flags, "-fopt-info-vec-optimized", "-c", str(native.SOURCE), "-o", os.devnull],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return {line.split(":")[1] for line in done.stderr.splitlines() if "loop vectorized" in line}


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("gcc") is None,
                    reason="checks GCC's x86 vectoriser")
def test_every_loop_that_vectorises_with_avx512_vectorises_with_avx2():
    # Why: GCC vectorises a select with a floating-point arm (`u >= 0 ? s : e * s`) under AVX-512's
    # masked arithmetic alone unless -fno-trapping-math says FP exceptions may be ignored.  Without
    # it every gate loop stayed scalar on AVX2 machines (an AMD EPYC Zen 3: the ReLU gate 10x
    # slower) while AVX-512 machines, where the benchmarks ran, showed nothing.  A check on the
    # compiler's report holds whatever CPU runs the test: it builds for both targets, runs neither.
    avx512, avx2 = _vectorised_loops("x86-64-v4"), _vectorised_loops("x86-64-v3")
    assert len(avx512) >= 20, avx512  # the report is read right: the gate, BatchNorm and pool loops
    assert avx512 <= avx2, f"loops vectorised only with AVX-512 (source lines): {sorted(avx512 - avx2, key=int)}"


def _pool_cases():
    # kernel, stride, padding, dilation, ceil_mode: the common pools, every parity, the generic path (K not 4 or 9).
    for k, s, p, d, c in itertools.product([(2, 2), (3, 3), (2, 3), (5, 5)], [(1, 1), (2, 2), (2, 1), (3, 3)],
                                           [(0, 0), (1, 1), (1, 0)], [(1, 1), (2, 1)], [False, True]):
        if p[0] > k[0] // 2 or p[1] > k[1] // 2:
            continue
        yield k, s, p, d, c


POOL_CASES = list(_pool_cases())


@pytest.mark.parametrize("pool_backward", ["soft", "weights"])
@pytest.mark.parametrize("shape", [(2, 3, 11, 13), (1, 2, 6, 5)])
def test_soft_pool_backward_matches_the_contract(shape, pool_backward):
    failures = []
    for kernel, stride, padding, dilation, ceil_mode in POOL_CASES:
        x = torch.randn(*shape)
        try:
            out = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
        except RuntimeError:
            continue  # torch rejects the configuration itself
        g = torch.randn_like(out)
        args = (list(kernel), list(stride), list(padding), list(dilation))
        ours = native.soft_max_pool2d_backward(g, x, *args, out.shape[-2:], 0.3, pool_backward)
        ref = reference.soft_max_pool2d_backward(g.double(), x.double(), *args, ceil_mode, 0.3, pool_backward)
        if not rel_err(ours, ref) < 2e-6 or _subnormals(ours):
            failures.append((kernel, stride, padding, dilation, ceil_mode, rel_err(ours, ref)))
    assert not failures, failures


@pytest.mark.parametrize("temp", [1e-6, 0.3, 1e6])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_soft_pool_backward_at_extremes(temp, scale):
    x = torch.randn(2, 4, 9, 9) * scale
    x[0, 0, 0, 0], x[0, 1, 4, 4] = math.inf, -math.inf
    out = F.max_pool2d(x, 3, 2, 1)
    g = torch.randn_like(out)
    ours = native.soft_max_pool2d_backward(g, x, [3, 3], [2, 2], [1, 1], [1, 1], out.shape[-2:], temp, "soft")
    chunked = torch_paths.soft_max_pool2d_backward_chunked(g, x, [3, 3], [2, 2], [1, 1], [1, 1], False, temp)
    assert torch.isfinite(ours).all() and _subnormals(ours) == 0
    torch.testing.assert_close(ours, chunked, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


def test_soft_pool_backward_on_large_planes_and_many_chunks():
    # A plane wider than a chunk (8 Ki extended columns), and planes that do not fill the last chunk.
    for shape in [(1, 1, 200, 190), (3, 37, 9, 9)]:
        x = torch.randn(*shape)
        out = F.max_pool2d(x, 3, 1, 1)
        g = torch.randn_like(out)
        ours = native.soft_max_pool2d_backward(g, x, [3, 3], [1, 1], [1, 1], [1, 1], out.shape[-2:], 0.3, "soft")
        ref = reference.soft_max_pool2d_backward(g.double(), x.double(), [3, 3], [1, 1], [1, 1], [1, 1], False, 0.3)
        assert rel_err(ours, ref) < 2e-6


def test_max_pool_forward_is_atens_bit_for_bit():
    failures = 0
    for kernel, stride, padding, dilation, ceil_mode in POOL_CASES:
        x = torch.randn(2, 3, 11, 13)
        # Ties, signed zeros, infinities and NaNs: the cases where "which element" is a choice.
        x[0, 0, :4, :4] = 1.0
        x[0, 1, 2:6, 2:6] = torch.tensor([0.0, -0.0]).repeat(8)[:16].reshape(4, 4)
        x[1, 0] = -math.inf
        x[1, 1, 3, 3], x[1, 1, 3, 4], x[1, 2, 5, 5] = math.nan, math.nan, math.inf
        try:
            values, indices = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        except RuntimeError:
            continue
        ours_v, ours_i = native.max_pool2d_with_indices(x, list(kernel), list(stride), list(padding), list(dilation),
                                                        values.shape[-2:])
        same_bits = torch.equal(ours_v.view(torch.int32), values.view(torch.int32))
        failures += not (same_bits and torch.equal(ours_i, indices))
    assert failures == 0


def test_relu_gate_matches_the_contract_and_never_underflows():
    z = torch.cat([torch.randn(10_000) * 30, torch.tensor([-math.inf, math.inf, 0.0, -0.0, -1e30, 1e30])])
    g = torch.randn_like(z)
    g[:100] = 1e-30  # tiny incoming gradients: products below the smallest normal must be flushed
    for temp in (1e-3, 0.3, 5.0):
        ours = native.relu_sigmoid_backward(g, z, temp)
        ref = reference.relu_backward(g.double(), z.double(), temp, "sigmoid")
        # float32's own conditioning: u = z / temp carries a relative rounding of 6e-8, so e^u at
        # |u| ~ 40 carries ~3e-6 (torch's float32 sigmoid too).
        torch.testing.assert_close(ours.double(), ref, rtol=5e-6, atol=TINY)
        assert _subnormals(ours) == 0
        in_place = z.clone()
        assert native.relu_sigmoid_backward(g, in_place, temp, out=in_place) is in_place
        assert torch.equal(in_place, ours)


def test_normal_cdf_gate_is_phi_to_float_precision_down_to_the_floor():
    # Independent reference: math.erfc in float64, at every float32 u on a fine grid of [-10, 10],
    # the floor's edge and the specials.  The kernel's own error is 4e-7 relative; a form that
    # rounds u^2 (or u / sqrt 2) before the exponential costs u^2 x 6e-8, 5e-6 at u = -9.
    u = torch.cat([torch.linspace(-10.0, 10.0, 400_001),
                   torch.tensor([-9.0801, -9.0802, 0.0, -0.0, 1e30, -1e30, math.inf, -math.inf, math.nan])])
    ours = native.relu_normal_cdf_backward(torch.ones_like(u), u, 1.0).double()
    phi = torch.tensor([0.5 * math.erfc(-v / math.sqrt(2)) for v in u.double().tolist()], dtype=torch.float64)
    phi = torch.where(phi < 2.0**-64, 0.0, phi)
    torch.testing.assert_close(ours, phi, rtol=1e-6, atol=0, equal_nan=True)
    assert float(ours[-9]) > 0 and float(ours[-8]) == 0  # the floor: Phi(-9.0801) > 2^-64 > Phi(-9.0802)


def test_normal_cdf_relu_gate_matches_the_contract_and_never_underflows():
    z = torch.cat([torch.randn(10_000) * 30, torch.tensor([-math.inf, math.inf, 0.0, -0.0, -1e30, 1e30])])
    g = torch.randn_like(z)
    g[:100] = 1e-30
    for temp in (1e-3, 0.6, 5.0):
        ours = native.relu_normal_cdf_backward(g, z, temp)
        ref = reference.relu_backward(g.double(), z.double(), temp, "normal_cdf")
        # z / temp rounds by 6e-8 relative; the tail's conditioning (u^2) makes that 5e-6 at u = -9.
        torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=TINY)
        assert _subnormals(ours) == 0
        assert torch.equal(native.relu_gate_backward(g, z, temp, "normal_cdf"), ours)
        in_place = z.clone()
        assert native.relu_gate_backward(g, in_place, temp, "normal_cdf", out=in_place) is in_place
        assert torch.equal(in_place, ours)
    with pytest.raises(ValueError, match="no C kernel for gate 'tanh'"):
        native.relu_gate_backward(g, z, 0.3, "tanh")


@pytest.mark.parametrize("window", [(0.0, 6.0), (-1.0, 1.0), (-2.5, 0.5)])
def test_hardtanh_window_matches_the_contract_and_never_underflows(window):
    lo, hi = window
    z = torch.cat([torch.randn(20_000) * 8, torch.tensor([-math.inf, math.inf, lo, hi, 0.5 * (lo + hi), -1e30, 1e30])])
    g = torch.randn_like(z)
    g[:100] = 1e-30
    for temp in (1e-3, 0.3, 5.0):
        ours = native.hardtanh_sigmoid_backward(g, z, temp, lo, hi)
        # float64, in the form that does not cancel: above the window's middle both sigmoids are
        # ~1, where even float64's difference loses the window (z = 17, ReLU6, t = 0.3: e^-37).
        u_lo, u_hi = (z.double() - lo) / temp, (z.double() - hi) / temp
        window_ = torch.where(z.double() > 0.5 * (lo + hi), torch.sigmoid(-u_hi) - torch.sigmoid(-u_lo),
                              torch.sigmoid(u_lo) - torch.sigmoid(u_hi))
        ref = reference.gated_backward(g.double(), window_)
        torch.testing.assert_close(ours.double(), ref, rtol=5e-6, atol=1e-18)
        # and the contract's own float32 gate, up to its cancellation (~1e-7 of the gate's scale)
        torch.testing.assert_close(ours, reference.gated_backward(g, hardtanh_gate(z, temp, lo, hi)), rtol=5e-6,
                                   atol=2e-7 * float(g.abs().max()))
        assert _subnormals(ours) == 0


def test_hardsigmoid_window_is_the_relu6_window_of_z_plus_3_over_6():
    z = torch.cat([torch.randn(20_000) * 8, torch.tensor([-math.inf, math.inf, -3.0, 3.0, 0.0])])
    g = torch.randn_like(z)
    for temp in (1e-3, 0.3, 5.0):
        ours = native.hardtanh_sigmoid_backward(g, z, temp, -3.0, 3.0, 1.0 / 6.0)
        u_lo, u_hi = (z.double() + 3) / temp, (z.double() - 3) / temp
        window = torch.where(z.double() > 0, torch.sigmoid(-u_hi) - torch.sigmoid(-u_lo),
                             torch.sigmoid(u_lo) - torch.sigmoid(u_hi))
        torch.testing.assert_close(ours.double(), reference.gated_backward(g.double(), window / 6), rtol=5e-6,
                                   atol=1e-18)
        contract = reference.gated_backward(g, hardsigmoid_unit_gate(z, temp))
        torch.testing.assert_close(ours, contract, rtol=5e-6, atol=2e-7 * float(g.abs().max()))
        assert _subnormals(ours) == 0


def test_hardswish_gate_matches_the_contract_and_never_underflows():
    z = torch.cat([torch.randn(20_000) * 8, torch.tensor([-math.inf, math.inf, math.nan, 0.0, -3.0, 3.0, 1e30, -1e30])])
    g = torch.randn_like(z)
    g[:100] = 1e-30
    for temp in (1e-3, 0.3, 1.6, 5.0):
        ours = native.hardswish_backward(g, z, temp)
        # float64 (independent rounding) and the contract's float32 gate (z / (6 t) there, a product here).  Near
        # the gate's foot z / (6 t) + 1/2 cancels: float32 carries ~ulp(1/2) = 6e-8 absolute there, in both.
        atol = 1e-7 * float(g.abs().max())
        ref = reference.gated_backward(g.double(), hard_sigmoid_gate(z.double(), temp))
        torch.testing.assert_close(ours.double(), ref, rtol=2e-6, atol=atol, equal_nan=True)
        contract = reference.gated_backward(g, hard_sigmoid_gate(z, temp))
        torch.testing.assert_close(ours, contract, rtol=2e-6, atol=atol, equal_nan=True)
        assert torch.isnan(ours[-6]) and _subnormals(ours) == 0
        assert torch.equal(ours[-8:-6], torch.stack([torch.tensor(0.0), g[-7]]))  # -inf gates 0, +inf gates 1


def _batch_norm_relu_reference(g, x, mean, var, weight, bias, residual, eps=1e-5, temp=0.3, gate="sigmoid"):
    """(dx, dz) by torch: z = batch_norm(x) [+ residual], dz = the torch path's gate, dx = dz * weight * invstd."""
    z = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    if residual is not None:
        z = z + residual
    dz = torch_paths.relu_backward(g, z, temp, gate)
    scale = torch.rsqrt(var + eps) * (1 if weight is None else weight.detach())
    return torch_paths.flush_subnormal_(dz * scale.view(1, -1, 1, 1)), dz


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_batch_norm_gate_from_batch_norms_input(affine, with_residual, gate):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 6) * 3 + 1
    whole = torch.randn(2, 12, 7, 6)
    whole[:, :, 0] = 3e-38  # products that would be subnormal: flushed to 0 in both
    g = whole[:, 3:8]  # planes contiguous, batch stride of the concatenation
    assert not g.is_contiguous() and native.planes_contiguous(g)
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    weight, bias = (torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))) if affine else (None, None)
    residual = torch.randn_like(x) if with_residual else None
    with torch.no_grad():
        expected_dx, expected_dz = _batch_norm_relu_reference(g, x, mean, var, weight, bias, residual, gate=gate)
    dx, dz = native.batch_norm_relu_gate_backward(g, x, mean, var, weight, bias, 1e-5, 0.3, residual, with_residual,
                                                  gate)
    # z to the rounding of one multiply-add against torch.batch_norm's (a possible FMA there): a relative
    # 6e-8 in z is |z / temp| times that in the gate (up to ~40 x 6e-8 where it is still above its floor)
    torch.testing.assert_close(dx, expected_dx, rtol=5e-6, atol=1e-12)
    if with_residual:
        torch.testing.assert_close(dz, expected_dz, rtol=5e-6, atol=1e-12)
    else:
        assert dz is None
    assert _subnormals(dx) == 0 and (dz is None or _subnormals(dz) == 0)
    # where the exact product lies in float32's subnormal range, the kernel wrote 0 (and such places exist)
    with torch.no_grad():
        z64 = F.batch_norm(x.double(), mean.double(), var.double(), None if weight is None else weight.double(),
                           None if bias is None else bias.double(), False, 0.0, 1e-5)
        z64 = z64 if residual is None else z64 + residual.double()
        scale64 = torch.rsqrt(var.double() + 1e-5) * (1 if weight is None else weight.double())
        exact = (g.double() * GATES[gate](z64, 0.3) * scale64.view(1, -1, 1, 1)).abs()
    subnormal_range = (exact > 0) & (exact < 0.9 * torch.finfo(torch.float32).tiny)
    assert subnormal_range.any() and (dx[subnormal_range] == 0).all()


@pytest.mark.parametrize("gate", ["sigmoid", "normal_cdf"])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (3, 40, 1, 1), (2, 24, 9, 9, 2)])
def test_channels_last_batch_norm_gate_is_the_planes_kernel_bit_for_bit(shape, with_residual, gate):
    """The channels-last loop (compiled CPU graphs, kernels/compiled.py) computes what the NCHW loop does."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    wide = torch.randn(shape[0], shape[1] + 7, *shape[2:]).contiguous(memory_format=fmt)
    wide[:, :, 0] = 3e-38  # products that would be subnormal
    g = wide[:, 2:2 + shape[1]]  # a channel slice of a channels-last concatenation: rows longer than C
    assert native.channels_last_rows(g) == shape[1] + 7
    assert native.channels_last_rows(x) == (shape[1] if x[0, 0].numel() == 1 else None)  # 1x1: both layouts
    mean, var, weight, bias = torch.randn(shape[1]), torch.rand(shape[1]) + 0.5, torch.randn(shape[1]), None
    residual = torch.randn_like(x) if with_residual else None
    expected_dx, expected_dz = native.batch_norm_relu_gate_backward(
        g.contiguous(), x, mean, var, weight, bias, 1e-5, 0.3, residual, with_residual, gate)
    dx, dz = native.batch_norm_relu_gate_backward_channels_last(
        g, x.contiguous(memory_format=fmt), mean, var, weight, bias, 1e-5, 0.3,
        None if residual is None else residual.contiguous(memory_format=fmt), with_residual, gate)
    assert dx.is_contiguous(memory_format=fmt) and torch.equal(dx, expected_dx)
    assert (dz is None) == (not with_residual) and (dz is None or torch.equal(dz, expected_dz))
    assert _subnormals(dx) == 0


def test_channels_last_rows_reads_only_evenly_spaced_channel_minor_layouts():
    t = torch.randn(2, 3, 4, 5)
    assert native.channels_last_rows(t) is None  # NCHW
    assert native.channels_last_rows(t.contiguous(memory_format=torch.channels_last)) == 3
    wide = torch.randn(2, 9, 4, 5).contiguous(memory_format=torch.channels_last)
    assert native.channels_last_rows(wide[:, 3:6]) == 9
    assert native.channels_last_rows(wide[:, 3:6, ::2]) is None  # every other row: not evenly spaced
    assert native.channels_last_rows(wide[:1, 3:6, :1, :1]) == 3  # a single row: its length is C
    with pytest.raises(ValueError, match="dense channels-last"):
        native.batch_norm_relu_gate_backward_channels_last(wide[:, 3:6], t, torch.zeros(3), torch.ones(3), None, None,
                                                           1e-5, 0.3)


def test_fused_batch_norm_gate_refuses_mismatched_tensors():
    x, g = torch.randn(2, 5, 3, 3), torch.randn(2, 5, 3, 3)
    mean, var = torch.zeros(5), torch.ones(5)
    with pytest.raises(ValueError, match="running_var needs 5 values"):
        native.batch_norm_relu_gate_backward(g, x, mean, var[:4], None, None, 1e-5, 0.3)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        native.batch_norm_relu_gate_backward(g, x, mean, var, None, None, 1e-5, 0.3, x[:1])
    with pytest.raises(ValueError, match="grad must have x's shape"):
        native.batch_norm_relu_gate_backward(g[:1], x, mean, var, None, None, 1e-5, 0.3)
    with pytest.raises(ValueError, match="contiguous"):  # planes strided along W
        native.batch_norm_relu_gate_backward(torch.randn(2, 5, 3, 6)[..., ::2], x, mean, var, None, None, 1e-5, 0.3)
    with pytest.raises(ValueError, match="no C kernel for gate 'tanh'"):
        native.batch_norm_relu_gate_backward(g, x, mean, var, None, None, 1e-5, 0.3, gate="tanh")


def test_fused_batch_norm_gate_takes_an_empty_batch():
    x = torch.randn(0, 5, 3, 3)
    dx, dz = native.batch_norm_relu_gate_backward(x, x, torch.zeros(5), torch.ones(5), None, None, 1e-5, 0.3,
                                                     residual=x, residual_grad=True)
    assert dx.shape == dz.shape == x.shape


def test_supports_names_what_the_c_kernels_take():
    x = torch.randn(2, 3)
    assert native.supports(x, x.t().contiguous())
    assert not native.supports(x.t())  # not contiguous
    assert native.supports(x.t(), contiguous=False)
    assert not native.supports(x.double()) and not native.supports(x.to(torch.float16))
    assert not native.supports(x, None)  # None stands for a tensor only where told
    assert native.supports(x, None, optional=True)
    assert native.supports(torch.nn.Parameter(x))  # a Parameter is a plain tensor

    class Wrapped(torch.Tensor):
        pass

    assert not native.supports(x.as_subclass(Wrapped))
    assert not native.supports(torch.empty(2, 3, device="meta"))


def test_results_do_not_depend_on_the_thread_count():
    # Every kernel, big enough to be split (native._PARALLEL_MIN_WORK), with a plane count that
    # two threads cannot halve: each thread's part must be exactly its share, nothing twice or lost.
    torch.manual_seed(0)
    x = torch.randn(3, 7, 40, 40)  # 21 planes
    out_hw = F.max_pool2d(x, 3, 2, 1).shape[-2:]
    g_pool = torch.randn(3, 7, *out_hw)
    g = torch.randn_like(x)
    var, weight = torch.rand(7) + 0.5, torch.randn(7)
    assert x.numel() >= native._PARALLEL_MIN_WORK

    def every_kernel():
        return [
            native.relu_sigmoid_backward(g, x, 0.3),
            native.relu_normal_cdf_backward(g, x, 0.6),
            native.hardtanh_sigmoid_backward(g, x, 0.3, 0.0, 6.0),
            native.hardswish_backward(g, x * 4, 0.3),
            *native.batch_norm_relu_gate_backward(g, x, var - 1, var, weight, None, 1e-5, 0.3, x * 0.5, True),
            *native.batch_norm_relu_gate_backward(g, x, var - 1, var, weight, None, 1e-5, 0.6, x * 0.5, True,
                                                  "normal_cdf"),
            native.soft_max_pool2d_backward(g_pool, x, [3, 3], [2, 2], [1, 1], [1, 1], out_hw, 0.3, "soft"),
            *native.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], out_hw),
        ]

    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(every_kernel())
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    expected_values, expected_indices = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(results[0][-2], expected_values) and torch.equal(results[0][-1], expected_indices)


_FALLBACK = textwrap.dedent(
    """
    import json, torch, torchvision, excitation
    from excitation.kernels import native
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    pb = excitation.pullback(model, x, 3)
    print(json.dumps({"status": native.status(), "pullback": pb.flatten()[:4000].tolist()}))
    """
)


def _run(env_extra):
    env = dict(os.environ, **env_extra)
    done = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_without_a_compiler_or_when_switched_off_the_torch_paths_give_the_same_pullback(tmp_path):
    on = _run({"EXCITATION_CACHE_DIR": str(tmp_path / "cache")})
    pool = _run({"EXCITATION_CACHE_DIR": str(tmp_path / "cache"), "EXCITATION_NATIVE_OPENMP": "0"})
    off = _run({"EXCITATION_NATIVE": "0"})
    no_compiler = _run({"EXCITATION_CACHE_DIR": str(tmp_path / "empty"), "CC": "/nonexistent/cc",
                        "PATH": "/nonexistent"})
    assert on["status"] == "on (OpenMP, torch's threads)" and pool["status"] == "on (Python thread pool)"
    assert off["status"] == "off: EXCITATION_NATIVE=0"
    assert no_compiler["status"].startswith("off: RuntimeError: no C compiler")
    reference_pb = torch.tensor(on["pullback"])
    assert pool["pullback"] == on["pullback"]  # the same kernels, split over threads otherwise
    for other in (off, no_compiler):
        assert rel_err(torch.tensor(other["pullback"]), reference_pb) < 1e-5
    assert list((tmp_path / "cache").rglob("libexcitation_cpu.so"))  # built into the cache, under its key


def test_concurrent_first_builds_share_one_cache(tmp_path):
    # torchrun ranks start together: each compiles to a temporary name and renames, so none loads a partial file.
    env = dict(os.environ, EXCITATION_CACHE_DIR=str(tmp_path))
    code = "from excitation.kernels import native; print(native.status())"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    assert [run.communicate(timeout=300)[0].strip() for run in runs] == ["on (OpenMP, torch's threads)"] * 2
    assert len(list(tmp_path.rglob("libexcitation_cpu.so"))) == 1 and not list(tmp_path.rglob("*.partial"))


def test_windows_larger_than_the_c_kernels_take_the_torch_path():
    # cspnext's spatial-pyramid pools are 13x13: the C kernels keep 64 window pointers, so such
    # pools must reach the torch paths (this raised "could not allocate" before), and a direct
    # call must say what is wrong rather than blame memory.
    import excitation

    from .helpers import reference_pullback

    assert native.pool_window_supported([8, 8]) and not native.pool_window_supported([13, 13])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(13, 1, 6),
                                torch.nn.MaxPool2d(9, 1, 4), torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).eval()
    x = torch.randn(2, 2, 16, 16)
    excited = excitation.excite(model)
    assert torch.equal(excited(x), model(x))
    assert rel_err(excitation.pullback(excited, x, 1), reference_pullback(model, x, 1, rules=True)) < 1e-5
    g = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="more than 64 elements"):
        native.soft_max_pool2d_backward(g, x[:, :1].expand(2, 3, 16, 16).contiguous(), [13, 13], [1, 1], [6, 6],
                                        [1, 1], (16, 16), 0.3, "soft")
