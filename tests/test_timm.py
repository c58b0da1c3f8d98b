"""timm: its activation layers reach a rule (or are reported), its attention reaches the
attention rule on both paths (fused SDPA and manual softmax), and timm families that
torch.fx cannot trace get correct pullbacks through the automatic dynamo path.

timm is a test dependency only (``pip install -e .[dev]``); the library never imports it.
"""

import warnings

import pytest
import torch
import torch.nn as nn

import excitation
from excitation import api

from .helpers import more_forms_reference, reference_pullback, rel_err, vanilla_gradient

timm = pytest.importorskip("timm")
from timm.layers import GluMlp, Mlp, SwiGLU, get_act_layer  # noqa: E402
from timm.layers.activations import HardMish  # noqa: E402
from timm.layers.activations_me import HardMishMe  # noqa: E402
from timm.models.metaformer import SquaredReLU, StarReLU  # noqa: E402


def _act_model(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 3)).eval()


# timm activation -> (rules that must rewrite it, ops reported unhandled)
HANDLED = {
    "relu": {"relu": 1},
    "relu6": {"hardtanh": 1},
    "leaky_relu": {"leaky_relu": 1},
    "silu": {"silu": 1},
    "swish": {"silu": 1},
    "gelu": {"gelu": 1},
    "gelu_tanh": {"gelu": 1},  # GELUTanh: F.gelu(approximate="tanh")
    "hard_sigmoid": {"hardsigmoid": 1},
    "hard_swish": {"hardswish": 1},
    "mish": {"mish": 1},            # nn.Mish
    "hard_mish": {"hard_mish": 1},  # timm's HardMish: 0.5 * x * (x + 2).clamp(0, 2), recognised as one site
    "prelu": {"prelu": 1},          # timm's PReLU (an nn.PReLU calling F.prelu)
    "elu": {"elu": 1},
    "celu": {"elu": 1},
    "selu": {"elu": 1},
}


@pytest.mark.parametrize("name", sorted(HANDLED))
def test_timm_activation_has_a_rule_matching_the_reference(name):
    layer = get_act_layer(name)
    model = _act_model(layer())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    report = excitation.report(excitation.excite(model))
    assert report.rule_counts() == HANDLED[name] and not report.unhandled and not report.smooth
    got = excitation.pullback(model, x, 1)
    assert rel_err(got, more_forms_reference(model, x, 1, hard_mish_types=(HardMish, HardMishMe))) < 1e-5
    assert rel_err(got, vanilla_gradient(model, x, 1)) > 1e-4


def test_timm_memory_efficient_hard_mish_is_reported_on_the_dynamo_path():
    # get_act_layer("hard_mish") is HardMishMe, an autograd.Function.  fx traces its forward (one
    # hard_mish site, above); dynamo keeps the Function whole, with its own backward: reported.
    torch._dynamo.reset()
    compiler = excitation.backend(inner="aot_eager")
    model = _act_model(HardMishMe())
    leaf = torch.randn(4, 6).requires_grad_()
    torch.compile(model, backend=compiler)(leaf).sum().backward()
    unhandled = [u for report in compiler.reports for u in report.unhandled]
    assert [(u.op, u.reason) for u in unhandled] == [("hard_mish in an autograd.Function", "no rule")]


def test_timm_inplace_hard_mish_is_reported_as_clamp():
    # x.mul_(0.5 * (x + 2).clamp(0, 2)) is not the out-of-place shape the rule recognises: reported, not vanilla.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no site": expected here
        found = excitation.report(excitation.excite(_act_model(HardMish(inplace=True))))
    assert found.unhandled_counts() == {"clamp": 1} and not found.sites


# act_layer -> the rule its sites get; no timm model uses these by default (dpn declares fc_act_layer="elu",
# but dpn48b and dpn68 as built have no ELU site), so timm's test_resnet is built with each.
ACT_LAYER_RULES = {"mish": "mish", "hard_mish": "hard_mish", "prelu": "prelu", "selu": "elu"}  # ELU, CELU: as SELU


@pytest.mark.parametrize("act", sorted(ACT_LAYER_RULES))
def test_timm_model_with_each_new_activation_has_no_unhandled_site(act):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=5, act_layer=act).eval()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    excited = excitation.excite(model)
    report = excitation.report(excited)
    assert not report.unhandled and not report.smooth
    assert report.rule_counts()[ACT_LAYER_RULES[act]] >= 10 and set(report.rule_counts()) == {ACT_LAYER_RULES[act], "max_pool"}
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))
    got = excitation.pullback(excited, x, 2)
    assert rel_err(got, more_forms_reference(model, x, 2, hard_mish_types=(HardMish, HardMishMe))) < 1e-5
    assert rel_err(got, vanilla_gradient(model, x, 2)) > 1e-3


def test_quick_gelu_takes_the_gelu_rule():
    # timm's quick_gelu is CLIP's x * sigmoid(1.702 x): the GELU rule, gate sigmoid(1.702 z / temp).
    found = excitation.report(excitation.excite(_act_model(get_act_layer("quick_gelu")())))
    assert found.counts()["quick_gelu"] == 1 and not found.smooth and not found.unhandled


@pytest.mark.parametrize("make, rule", [
    (lambda: StarReLU(), "relu"),          # s * relu(x) ** 2 + b
    (lambda: SquaredReLU(), "relu"),       # relu(x) ** 2
    (lambda: SwiGLU(8, 8), "silu"),        # silu(x1) * x2
    (lambda: Mlp(8, 8), "gelu"),
])
def test_timm_gated_and_squared_blocks_reach_their_rule(make, rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), make(), nn.Linear(8, 3)).eval()
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    assert excitation.report(excitation.excite(model)).rule_counts() == {rule: 1}
    assert rel_err(excitation.pullback(model, x, 0), reference_pullback(model, x, 0, rules=True)) < 1e-5


def test_glu_mlp_sigmoid_gate_is_smooth():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = excitation.report(excitation.excite(nn.Sequential(nn.Linear(6, 8), GluMlp(8, 8))))
    assert [s.op for s in found.smooth] == ["Sigmoid"] and not found.unhandled


@pytest.mark.parametrize("fused", [True, False])
def test_timm_attention_reaches_the_attention_rule(fused):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8,
                              embed_dim=16, depth=1, num_heads=2).eval()
    for block in model.blocks:
        block.attn.fused_attn = fused
    nn.init.normal_(model.head.weight, std=0.1)  # a zero head would make every gradient 0
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    counts = excitation.report(excitation.excite(model)).counts()
    assert counts.get("scaled_dot_product_attention" if fused else "softmax") == 1
    got = excitation.pullback(model, x, 2)
    assert rel_err(got, reference_pullback(model, x, 2, rules=True)) < 1e-5
    assert rel_err(got, vanilla_gradient(model, x, 2)) > 1e-3


# timm families that torch.fx cannot trace, shrunk to test size.
DYNAMO_FAMILIES = {
    "fasternet": ("fasternet_t0", dict(embed_dim=8, depths=(1, 1, 1, 1))),
    "convit": ("convit_tiny", dict(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=1, local_up_to_layer=1)),
    "vgg": ("vgg11", dict(mlp_ratio=0.01)),  # timm's own VGG (ConvMlp pre-logits): ReLU and max-pool
}


@pytest.mark.parametrize("family", sorted(DYNAMO_FAMILIES))
def test_untraceable_timm_family_through_public_api(family):
    name, kwargs = DYNAMO_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    with pytest.raises(excitation.ExcitationTraceError):
        excitation.excite(model)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    got = excitation.pullback(model, x, 2)
    prepared = api.prepare(model)
    assert api.path_of(prepared) == "dynamo"
    assert prepared.report().sites and not prepared.report().unhandled
    with torch.no_grad():
        assert torch.allclose(prepared(x), model(x), rtol=0, atol=1e-6)
    assert rel_err(got, reference_pullback(model, x, 2, rules=True)) < 1e-5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("family", sorted(DYNAMO_FAMILIES))
def test_calibrate_an_untraceable_timm_family(family):
    # calibrate() takes the dynamo path like pullback(): its keys are the sites pullback compiles,
    # and pullback(temps=...) gives each site its own temperature.
    name, kwargs = DYNAMO_FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    temps = excitation.calibrate(model, x, progress=False)
    default = excitation.pullback(model, x, 2)  # compiles the default graphs, which the report lists
    tempered = [site for site in api.prepare(model).report().sites if site.temp is not None]
    assert tempered and sorted(temps) == sorted({site.node for site in tempered})
    calibrated = api.prepare(model, temps=temps)
    got = excitation.pullback(model, x, 2, temps=temps)
    assert [site.temp for site in calibrated.report().sites if site.temp is not None] == \
        [temps[site.node] for site in tempered]
    assert torch.isfinite(got).all() and rel_err(got, default) > 1e-4
