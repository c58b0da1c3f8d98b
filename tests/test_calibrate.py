import pytest
import torch
import torch.nn as nn

import excitation
from excitation.calibrate import robust_std
from excitation.demo.digits import load_digits, load_model

from .helpers import fingerprint


def test_robust_std_of_gaussian_is_its_std():
    values = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(0)) * 2.5
    assert abs(float(robust_std(values)[0]) - 2.5) < 0.03


def test_temperatures_follow_the_preactivation_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(10)
        model[2].bias.zero_()
    x = torch.randn(512, 8)
    temps = excitation.calibrate(model, [x[:256], x[256:]], progress=False)
    sites = excitation.report(excitation.excite(model)).sites
    assert sorted(temps) == sorted(s.node for s in sites)
    with torch.no_grad():
        z1 = model[0](x)
        z2 = model[2](model[1](z1))
    expected = [0.3 * float(robust_std(z.reshape(1, -1))[0]) for z in (z1, z2)]
    for got, want in zip(temps.values(), expected):
        assert abs(got - want) / want < 0.02
    assert list(temps.values())[1] > 3 * list(temps.values())[0]  # the x10 layer
    # The mapping is what excite() takes, and gives the reference pullback at those temps.
    excited = excitation.excite(model, temps=temps)
    assert [s.temp for s in excitation.report(excited).sites] == list(temps.values())


def test_calibrated_temps_on_the_digits_model_are_sane_and_state_is_untouched():
    (x_train, _), (x_test, y_test) = load_digits()
    model = load_model("a").train()
    before = fingerprint(model)
    temps = excitation.calibrate(model, x_train[:256].split(64), progress=False)
    assert fingerprint(model) == before and model.training
    report = excitation.report(excitation.excite(model))
    assert len(temps) == len(report.sites) == 5
    assert all(1e-3 < t < 10 for t in temps.values())
    grad = excitation.pullback(model, x_test[:4], y_test[:4], temps=temps)
    assert torch.isfinite(grad).all()


def test_calibrate_errors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no batches"):
        excitation.calibrate(model, [], progress=False)
    with pytest.raises(ValueError, match="scale_factor"):
        excitation.calibrate(model, torch.randn(2, 4), scale_factor=0, progress=False)
    with pytest.raises(TypeError, match="integer dtype"):
        excitation.calibrate(model, torch.ones(2, 4, dtype=torch.long), progress=False)


def test_every_tempered_rule_is_calibrated_with_its_own_factor():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 12), nn.SiLU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 12), nn.ReLU6(),
        nn.Linear(12, 12), nn.LeakyReLU(0.1), nn.Linear(12, 12), nn.Hardswish(), nn.LayerNorm(12), nn.Linear(12, 2),
    ).eval()
    x = torch.randn(400, 6)
    temps = excitation.calibrate(model, x, progress=False)
    sites = [s for s in excitation.report(excitation.excite(model)).sites]
    tempered = [s for s in sites if s.temp is not None]
    assert sorted(temps) == sorted(s.node for s in tempered) and len(tempered) == 5
    inputs, h = [], x
    with torch.no_grad():
        for layer in model:
            if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                inputs.append(h)
            h = layer(h)
    factors = {"silu": 1.6, "gelu": 1.0, "hardtanh": 0.3, "leaky_relu": 0.3, "hardswish": 1.6}
    for site, z in zip(tempered, inputs):
        want = factors[site.kind] * float(robust_std(z.reshape(1, -1))[0])
        assert abs(temps[site.node] - want) / want < 0.02, site.kind
