"""excitation.captum.ExcitationPullback and excitation.quantus_explain_func against excitation.pullback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

captum = pytest.importorskip("captum")

import excitation
from excitation.captum import ExcitationPullback


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).eval()


def _x():
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", [None, "semantic"])
def test_captum_attribute_equals_pullback_signed_with_int_and_tensor_targets(preset):
    model, x = _model(), _x()
    y = torch.tensor([0, 1, 2, 1])
    explainer = ExcitationPullback(model, preset=preset)
    assert torch.equal(explainer.attribute(x, target=y), excitation.pullback(model, x, y, preset=preset))
    assert torch.equal(explainer.attribute(x, target=2), excitation.pullback(model, x, 2, preset=preset))
    assert torch.equal(explainer.attribute(x, target=y, abs=True), excitation.pullback(model, x, y, preset=preset).abs())
    assert (explainer.attribute(x, target=y) < 0).any()  # signed by default
    with pytest.raises(ValueError, match="one class per input"):
        explainer.attribute(x, target=torch.tensor([0, 1]))


def test_captum_noise_tunnel_uses_the_wrapped_attribute():
    from captum.attr import NoiseTunnel

    model, x = _model(), _x()
    explainer = ExcitationPullback(model)
    assert hasattr(explainer.attribute, "__wrapped__")  # log_usage, which NoiseTunnel calls through
    # With zero noise every sample is x itself: the tunnel's mean is the pullback.
    still = NoiseTunnel(explainer).attribute(x, target=1, nt_type="smoothgrad", nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(still, excitation.pullback(model, x, 1))
    torch.manual_seed(0)
    noisy = NoiseTunnel(explainer).attribute(x, target=1, nt_type="smoothgrad", nt_samples=4, stdevs=0.1)
    assert noisy.shape == x.shape and not torch.allclose(noisy, still)


def test_captum_metrics_infidelity_and_sensitivity_on_a_linear_model_are_zero():
    from captum.metrics import infidelity, sensitivity_max

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()  # pullback = gradient = constant
    x = _x()
    explainer = ExcitationPullback(linear)
    attr = explainer.attribute(x, target=1)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.1
        return noise, inputs - noise

    inf = infidelity(linear, perturb, x, attr, target=1, n_perturb_samples=4)
    assert torch.allclose(inf, torch.zeros(4), atol=1e-8)
    sens = sensitivity_max(explainer.attribute, x, target=1, n_perturb_samples=3)
    assert torch.allclose(sens, torch.zeros(4), atol=1e-6)
    # ... and on the ReLU model the same calls run and are positive.
    relu = _model()
    assert (sensitivity_max(ExcitationPullback(relu).attribute, x, target=1, n_perturb_samples=3) > 0).all()


def test_quantus_explain_func_is_the_pullback_in_numpy():
    model, x = _model(), _x()
    y = np.array([2, 0, 1, 1])
    out = excitation.quantus_explain_func(model, x.numpy(), y, preset="semantic")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, excitation.pullback(model, x, torch.tensor(y), preset="semantic").numpy())
    np.testing.assert_array_equal(excitation.quantus_explain_func(model, x.numpy(), 1),
                                  excitation.pullback(model, x, 1).numpy())


def test_quantus_metric_runs_with_the_explain_func():
    quantus = pytest.importorskip("quantus")
    model, x = _model(), _x()
    y = np.array([2, 0, 1, 1])
    scores = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, device="cpu",
        explain_func=excitation.quantus_explain_func, explain_func_kwargs={"temp": 0.5})
    assert len(scores) == 4 and np.all(np.isfinite(scores)) and np.all(np.asarray(scores) > 0)
