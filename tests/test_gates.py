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
)


@pytest.mark.parametrize("temp", [1e-3, 0.3, 5.0])
def test_sigmoid_gate_is_softplus_derivative(temp):
    z = torch.linspace(-5, 5, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad((temp * F.softplus(z / temp)).sum(), z)
    torch.testing.assert_close(sigmoid_gate(z.detach(), temp), grad)


def test_normal_cdf_gate_is_analytic_phi():
    z = torch.linspace(-3, 3, 61, dtype=torch.float64)
    expected = 0.5 * (1 + torch.erf(z / (0.7 * math.sqrt(2))))
    torch.testing.assert_close(normal_cdf_gate(z, 0.7), expected)


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
