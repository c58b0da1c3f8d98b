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

from .helpers import reference_pullback, rel_err, vanilla_gradient

timm = pytest.importorskip("timm")
from timm.layers import GluMlp, Mlp, SwiGLU, get_act_layer  # noqa: E402
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
}
UNHANDLED = {"mish": "Mish", "elu": "ELU", "celu": "CELU", "selu": "SELU", "prelu": "prelu", "hard_mish": "clamp"}


@pytest.mark.parametrize("name", sorted(HANDLED))
def test_timm_activation_has_a_rule_matching_the_reference(name):
    layer = get_act_layer(name)
    model = _act_model(layer())
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    assert excitation.report(excitation.excite(model)).rule_counts() == HANDLED[name]
    got = excitation.pullback(model, x, 1)
    assert rel_err(got, reference_pullback(model, x, 1, rules=True)) < 1e-5
    assert rel_err(got, vanilla_gradient(model, x, 1)) > 1e-4


@pytest.mark.parametrize("name", sorted(UNHANDLED))
def test_timm_activation_without_rule_is_reported(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no site": expected here
        found = excitation.report(excitation.excite(_act_model(get_act_layer(name)())))
    assert found.unhandled_counts() == {UNHANDLED[name]: 1} and not found.sites


def test_quick_gelu_is_smooth_by_design():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = excitation.report(excitation.excite(_act_model(get_act_layer("quick_gelu")())))
    assert [s.op for s in found.smooth] == ["sigmoid"] and not found.unhandled


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
