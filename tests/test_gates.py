import math

import pytest
import torch
import torch.nn.functional as F

from excitation.gates import (
    GATES,
    check_gate,
    check_temp,
    normal_cdf_gate,
    sigmoid_gate,
    threshold_gate,
)


@pytest.mark.parametrize("temp", [1e-3, 0.3, 5.0])
def test_sigmoid_gate_is_softplus_derivative(temp):
    z = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((temp * F.softplus(z / temp)).sum(), z)
    torch.testing.assert_close(sigmoid_gate(z.detach(), temp), grad)


def test_threshold_gate_by_hand():
    # threshold 1, temp 0.5: sigmoid((z - 1) / 0.5) at z = 1, 2, 0 is 1/2, 1/(1 + e^-2) = 0.880797,
    # 1/(1 + e^2) = 0.119203; the value below the step plays no part; 60 units below, under 2^-64: 0.
    z = torch.tensor([1.0, 2.0, 0.0, -59.0], dtype=torch.float64)
    expected = torch.tensor([0.5, 0.8807970779778823, 0.11920292202211755, 0.0], dtype=torch.float64)
    torch.testing.assert_close(threshold_gate(z, 0.5, 1.0, -3.0), expected)
    torch.testing.assert_close(threshold_gate(z, 0.5, 1.0, 7.0), expected)


def test_normal_cdf_gate_is_analytic_phi():
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    expected = 0.5 * (1 + torch.erf(z / (0.7 * math.sqrt(2))))
    torch.testing.assert_close(normal_cdf_gate(z, 0.7), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_cdf_gate_is_accurate_in_the_tail_down_to_the_floor(dtype):
    # Phi(-8) = 6.2e-16 and Phi(-9) = 1.1e-19 are far above the 2^-64 floor: a gate written as
    # (1 + erf(u / sqrt 2)) / 2 (torch's ndtr) is exactly 0 there in float32.
    u = torch.tensor([-9.08, -9.0, -8.0, -6.0, -4.0, -1.0, 0.0, 2.0, 9.0], dtype=dtype)
    expected = torch.tensor([0.5 * math.erfc(-v / math.sqrt(2)) for v in u.double().tolist()], dtype=torch.float64)
    # float32: rounding u / sqrt 2 costs u^2 x 6e-8 relative (5e-6 at u = -9), the tail's conditioning.
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(normal_cdf_gate(u, 1.0).double(), expected, rtol=rtol, atol=0)
    assert float(normal_cdf_gate(torch.tensor([-9.081], dtype=dtype), 1.0)) == 0.0  # below the floor


@pytest.mark.parametrize("name", sorted(GATES))
def test_gates_are_finite_and_bounded_at_extremes(name):
    z = torch.tensor([-math.inf, -1e30, -1.0, 0.0, 1.0, 1e30, math.inf])
    gate = GATES[name](z, 1e-6)
    assert torch.isfinite(gate).all()
    assert ((gate >= 0) & (gate <= 1)).all()
    assert gate[0] == 0 and gate[-1] == 1 and gate[3] == 0.5


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, -math.inf])
def test_check_temp_rejects_non_positive_and_non_finite(bad):
    with pytest.raises(ValueError, match="temp must be finite and > 0"):
        check_temp(bad)


@pytest.mark.parametrize("bad", ["0.3", None, True, [0.3]])
def test_check_temp_rejects_wrong_types(bad):
    with pytest.raises(TypeError, match="positive float"):
        check_temp(bad)


def test_check_temp_accepts_numbers_and_scalar_tensors():
    assert check_temp(1) == 1.0
    assert check_temp(torch.tensor(0.25)) == 0.25


def test_check_gate_lists_valid_names():
    assert check_gate("normal_cdf") == "normal_cdf"
    with pytest.raises(ValueError, match="'sigmoid', 'normal_cdf'"):
        check_gate("tanh")
