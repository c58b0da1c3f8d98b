"""excitation.ascend: projected gradient ascent along pullbacks or gradients."""

import pytest
import torch

import excitation
from excitation.demo.digits import load_digits, load_model

from .helpers import fingerprint


@pytest.fixture(scope="module")
def digits():
    (_, _), (x, y) = load_digits()
    return load_model("a"), x[:16], (y[:16] + 3) % 10


@pytest.mark.parametrize("direction", ["pullback", "gradient"])
def test_target_logit_increases_monotonically(digits, direction):
    model, x, target = digits
    final, history = excitation.ascend(model, x, target, steps=5, step_size=0.3, radius=3.0,
                                       direction=direction, return_history=True, progress=False)
    assert len(history) == 6 and torch.equal(history[0], x) and torch.equal(history[-1], final)
    with torch.no_grad():
        logits = torch.stack([model(h).gather(1, target[:, None])[:, 0] for h in history])
    assert (logits[1:] > logits[:-1]).all()


def test_projection_and_clamp_hold_exactly(digits):
    model, x, target = digits
    _, history = excitation.ascend(model, x, target, steps=6, step_size=1.5, radius=2.0,
                                   pixel_range=(0.0, 1.0), return_history=True, progress=False)
    for step in history:
        assert step.min() >= 0.0 and step.max() <= 1.0
        assert ((step - x).flatten(1).norm(dim=1) <= 2.0 * (1 + 1e-6)).all()
    # The budget binds: the final change sits on the ball (up to clamping pulling it inside).
    assert (history[-1] - x).flatten(1).norm(dim=1).max() > 1.9


def _hand_pga(model, x, target, steps, step_size, radius, low, high):
    x0 = x.clone()
    for _ in range(steps):
        leaf = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(leaf)[torch.arange(len(x)), target].sum(), leaf)
        g = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x = x + step_size * g
        delta = x - x0
        n = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = torch.where(n > radius, delta * radius / n, delta)
        x = (x0 + delta).clamp(low, high)
    return x


def test_gradient_direction_equals_hand_written_pga(digits):
    model, x, target = digits
    ours = excitation.ascend(model, x, target, steps=4, step_size=0.7, radius=1.5, direction="gradient", progress=False)
    torch.testing.assert_close(ours, _hand_pga(model, x, target, 4, 0.7, 1.5, 0.0, 1.0), rtol=1e-5, atol=1e-6)


def test_defaults_are_the_published_setting_in_unit_pixels():
    # Published: 5 steps of 20, radius 100, on pixels in [-1, 1].  A model that reads
    # [0, 1] pixels p as u = 2p - 1 must give the same images either way.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 48 * 48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).double()
    u0 = torch.rand(2, 3, 48, 48, dtype=torch.float64) * 2 - 1
    published = _hand_pga(net, u0, torch.tensor([1, 3]), 5, 20.0, 100.0, -1.0, 1.0)
    unit_model = _Affine(net)
    ours = excitation.ascend(unit_model, (u0 + 1) / 2, torch.tensor([1, 3]), direction="gradient", progress=False)
    torch.testing.assert_close(ours * 2 - 1, published, rtol=1e-7, atol=1e-9)


class _Affine(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, p):
        return self.net(2 * p - 1)


def test_normalize_is_applied_inside(digits):
    model, x, target = digits
    mean, std = (0.2,), (0.5,)
    ours = excitation.ascend(model, x, target, steps=2, step_size=0.5, radius=1.0, normalize=(mean, std),
                             direction="gradient", progress=False)
    wrapped = excitation.ascent.Normalized(model, mean, std)
    expected = _hand_pga(wrapped, x, target, 2, 0.5, 1.0, 0.0, 1.0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_zero_direction_leaves_image_in_place():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.zero_()
    x = torch.rand(2, 1, 2, 2)
    assert torch.equal(excitation.ascend(model, x, 0, direction="gradient", progress=False), x)


def test_model_state_untouched(digits):
    model, x, target = digits
    model.train()
    before = fingerprint(model)
    excitation.ascend(model, x, target, steps=2, progress=False)
    excitation.ascend(model, x, target, steps=2, direction="gradient", progress=False)
    assert fingerprint(model) == before and model.training
    model.eval()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"direction": "up"}, "direction="),
        ({"steps": -1}, "steps"),
        ({"step_size": 0}, "step_size"),
        ({"radius": float("nan")}, "radius"),
        ({"pixel_range": (1.0, 0.0)}, "pixel_range"),
        ({"temp": 0}, "temp"),
    ],
)
def test_bad_arguments(digits, kwargs, match):
    model, x, target = digits
    with pytest.raises(ValueError, match=match):
        excitation.ascend(model, x, target, progress=False, **kwargs)


def test_bad_inputs_and_targets_are_refused(digits):
    model, x, _ = digits
    with pytest.raises(TypeError, match="integer dtype"):
        excitation.ascend(model, (x * 255).long(), 1, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        excitation.ascend(model, x, 10, progress=False)
    with pytest.raises(ValueError, match="16 entries|entries for a batch"):
        excitation.ascend(model, x, [1, 2], progress=False)
