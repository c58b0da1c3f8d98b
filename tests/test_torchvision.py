"""The pass on real torchvision architectures (random weights, eval mode, small inputs)."""

import pytest
import torch
import torchvision

import excitation

from .helpers import ExcitationReference, fingerprint, reference_pullback, rel_err

# name -> (constructor kwargs, input side, expected ReLU sites, expected max-pool sites)
MODELS = {
    "resnet50": ({}, 64, 49, 1),
    "vgg11_bn": ({}, 64, 10, 5),
    "densenet121": ({}, 64, 121, 1),
    "googlenet": ({"aux_logits": False, "init_weights": True}, 64, 57, 13),
    "inception_v3": ({"aux_logits": False, "init_weights": True}, 96, 94, 4),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    name = request.param
    kwargs, side, relus, pools = MODELS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(1))
    return name, model, x, relus, pools


def test_forward_is_bit_identical(case):
    name, model, x, _, _ = case
    with torch.no_grad():
        assert torch.equal(excitation.excite(model)(x), model(x)), name


def test_site_counts(case):
    name, model, _, relus, pools = case
    report = excitation.report(excitation.excite(model))
    assert report.counts() == {"relu": relus, "max_pool2d": pools}, name
    assert report.unhandled == []
    # The interception reference sees the same number of calls at run time.
    mode = ExcitationReference()
    with torch.no_grad(), mode:
        model(case[2])
    assert mode.calls == {"relu": relus, "max_pool2d": pools}


def test_pullback_matches_reference_and_state_is_untouched(case):
    name, model, x, _, _ = case
    before = fingerprint(model)
    ours = excitation.pullback(model, x, 3)
    ref = reference_pullback(model, x, 3)
    assert rel_err(ours, ref) <= 1e-5, name
    assert rel_err(excitation.gradient(model, x, 3), ref) > 0.05  # not the vanilla gradient
    assert fingerprint(model) == before
