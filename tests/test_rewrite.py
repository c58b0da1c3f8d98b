"""The FX pass: which sites it finds, what it puts there, and what it refuses."""


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

import excitation
from excitation import ExcitationTraceError, InplaceAliasError
from excitation.kernels import batch_norm_relu, surrogate_max_pool2d, surrogate_relu

from .helpers import (
    ALL_FORMS_POOLS,
    ALL_FORMS_RELUS,
    AllForms,
    fingerprint,
    reference_pullback,
    rel_err,
)


def _x(dtype=torch.float64):
    return torch.randn(3, 3, 17, 19, dtype=dtype)


def test_all_forms_are_found(all_forms):
    report = excitation.report(excitation.excite(all_forms))
    assert report.counts() == {"relu": ALL_FORMS_RELUS, "max_pool2d": ALL_FORMS_POOLS}
    forms = {(s.kind, s.form) for s in report.sites}
    assert forms == {("relu", "module"), ("relu", "function"), ("relu", "method"), ("max_pool2d", "module"), ("max_pool2d", "function")}
    # The reused in-place module: three sites, one name, three nodes.
    reused = [s for s in report.sites if s.name == "relu"]
    assert len(reused) == 3 and len({s.node for s in reused}) == 3 and all(s.inplace for s in reused)


def test_no_original_site_survives(all_forms):
    gm = excitation.excite(all_forms)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert not isinstance(gm.get_submodule(node.target), (nn.ReLU, nn.MaxPool2d))
        assert node.target not in (F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_", F.max_pool2d, torch.max_pool2d)
    targets = [n.target for n in gm.graph.nodes]
    relus = targets.count(surrogate_relu) + targets.count(batch_norm_relu)  # fused with a BatchNorm, or not
    assert relus == ALL_FORMS_RELUS and targets.count(surrogate_max_pool2d) == ALL_FORMS_POOLS


def test_forward_is_bit_identical_including_inplace_rereads(all_forms):
    gm = excitation.excite(all_forms)
    x = _x()
    with torch.no_grad():
        assert torch.equal(gm(x), all_forms(x))


def test_pullback_matches_interception_reference(all_forms):
    x = _x()
    for temp, pool_temp, gate in [(0.3, None, "sigmoid"), (0.1, 1.0, "sigmoid"), (0.5, 0.2, "normal_cdf")]:
        gm = excitation.excite(all_forms, temp=temp, pool_temp=pool_temp, gate=gate)
        ours = excitation.pullback(gm, x, 4)
        ref = reference_pullback(all_forms, x, 4, temp, pool_temp, gate)
        assert rel_err(ours, ref) < 1e-10, (temp, pool_temp, gate)


def test_excite_leaves_model_untouched(all_forms):
    before = fingerprint(all_forms)
    forward = type(all_forms).forward
    gm = excitation.excite(all_forms)
    gm.train()
    gm.register_forward_hook(lambda *a: None)
    assert fingerprint(all_forms) == before
    assert type(all_forms).forward is forward and not all_forms.training


def test_parameters_are_shared_but_modules_are_not(all_forms):
    gm = excitation.excite(all_forms)
    assert gm.conv1.weight is all_forms.conv1.weight
    assert gm.bn1.running_mean is all_forms.bn1.running_mean
    assert gm.conv1 is not all_forms.conv1


def test_state_dict_keys_equal_original(all_forms):
    gm = excitation.excite(all_forms)
    assert list(gm.state_dict()) == list(all_forms.state_dict())
    gm.load_state_dict(all_forms.state_dict())


def test_training_flag_is_copied():
    model = AllForms().train()
    assert excitation.excite(model).training
    assert not excitation.excite(model.eval()).training


def test_site_temperatures_from_mapping_and_callable(all_forms):
    gm = excitation.excite(all_forms, temp=0.3, temps={"relu": 0.7, "relu_2": 0.9, "pool_mod": 2.0})
    by_node = {s.node: s for s in excitation.report(gm).sites}
    sites = excitation.report(gm).sites
    assert [s.temp for s in sites if s.name == "relu"] == [0.7, 0.7, 0.7]  # module path: every call
    assert {s.temp for s in sites if s.name == "pool_mod"} == {2.0}
    assert sum(s.temp == 0.9 for s in sites) == 1  # node name: that call only
    assert sum(s.temp == 0.3 for s in sites) == len(sites) - 5
    gm2 = excitation.excite(all_forms, temps=lambda site: 1.5 if site.kind == "max_pool2d" else None)
    assert {(s.kind, s.temp) for s in excitation.report(gm2).sites} == {("relu", 0.3), ("max_pool2d", 1.5)}
    assert len(by_node) == len(sites)


def test_site_temperatures_change_the_pullback_like_the_reference():
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    gm = excitation.excite(model, temps={"1": 0.05, "3": 2.0})
    leaf = x.clone().requires_grad_(True)
    h = model[0](leaf)
    h = torch.relu(h).detach() + 0.05 * F.softplus(h / 0.05) - (0.05 * F.softplus(h / 0.05)).detach()
    h = model[2](h)
    h = torch.relu(h).detach() + 2.0 * F.softplus(h / 2.0) - (2.0 * F.softplus(h / 2.0)).detach()
    (ref,) = torch.autograd.grad(model[4](h)[:, 1].sum(), leaf)
    assert rel_err(excitation.pullback(gm, x, 1), ref) < 1e-12


def test_unknown_site_names_are_refused_with_suggestions(all_forms):
    with pytest.raises(ValueError, match=r"'pool_mood' \(did you mean 'pool_mod'"):
        excitation.excite(all_forms, temps={"pool_mood": 1.0})


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_site_temperature_is_refused(all_forms, bad):
    with pytest.raises(ValueError, match=r"temps\['relu'\]"):
        excitation.excite(all_forms, temps={"relu": bad})


def test_excite_is_idempotent_and_retempers(all_forms):
    once = excitation.excite(all_forms)
    twice = excitation.excite(once)
    assert [(s.name, s.kind) for s in excitation.report(twice).sites] == [(s.name, s.kind) for s in excitation.report(once).sites]
    assert {s.form for s in excitation.report(twice).sites} == {"excited"}
    targets = [n.target for n in twice.graph.nodes]
    assert targets.count(surrogate_relu) + targets.count(batch_norm_relu) == ALL_FORMS_RELUS  # no double wrapping
    x = _x()
    assert torch.equal(excitation.pullback(twice, x, 1), excitation.pullback(once, x, 1))
    hotter = excitation.excite(once, temp=1.0)
    assert rel_err(excitation.pullback(hotter, x, 1), reference_pullback(all_forms, x, 1, 1.0)) < 1e-10


def test_report_lists_unhandled_activations_and_prints():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.act = nn.GELU()
            self.six = nn.ReLU6()

        def forward(self, x):
            return F.hardshrink(F.silu(self.six(self.act(torch.relu(self.lin(x)))))).sigmoid()

    gm = excitation.excite(Mixed())
    report = excitation.report(gm)
    assert report.counts() == {"relu": 1, "hardtanh": 1, "silu": 1, "gelu": 1, "max_pool2d": 0}
    assert [s.rule for s in report.sites] == ["relu", "gelu", "hardtanh", "silu"]
    assert report.unhandled_counts() == {"hardshrink": 1}
    assert [(u.op, u.reason) for u in report.smooth] == [("sigmoid", "smooth")]
    text = str(report)
    assert "1 relu" in text and "1 gelu" in text and "hardshrink x1" in text and "smooth, vanilla by design: sigmoid x1" in text
    # Switching rules off leaves those sites vanilla and says why.
    seed_only = excitation.report(excitation.excite(Mixed(), rules=["relu", "max_pool"]))
    assert seed_only.counts() == {"relu": 1, "max_pool2d": 0}
    assert {(u.op, u.reason) for u in seed_only.unhandled} == {
        ("gelu", "rule off"), ("hardtanh", "rule off"), ("silu", "rule off"), ("hardshrink", "no rule")}


def test_no_sites_warns_and_says_so():
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.warns(UserWarning, match="found no site of the rules"):
        gm = excitation.excite(model)
    assert "nothing was rewritten" in str(excitation.report(gm))


def test_untraceable_model_gets_a_clear_error():
    class Inner(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return torch.relu(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Sequential(nn.Linear(3, 3), Inner())

        def forward(self, x):
            return self.block(x)

    with pytest.raises(ExcitationTraceError) as info:
        excitation.excite(Outer())
    message = str(info.value)
    assert "submodule 'block.1' (Inner)" in message
    assert "test_rewrite.py" in message and "if x.sum() > 0" in message
    assert "backend=excitation.backend" in message


def test_inplace_relu_on_a_view_read_later_is_refused():
    class ViewMutation(nn.Module):
        def forward(self, x):
            y = x * 1.0
            head = y[:, :2]
            head.relu_()
            return y.sum(1, keepdim=True)

    with pytest.raises(InplaceAliasError, match="inplace=False"):
        excitation.excite(ViewMutation())


def test_inplace_relu_on_view_not_read_later_is_fine():
    class Fine(nn.Module):
        def forward(self, x):
            y = (x * 1.0).view(x.shape[0], -1)
            return F.relu(y, inplace=True)

    gm = excitation.excite(Fine())
    x = torch.randn(2, 3, 4)
    assert torch.equal(gm(x), Fine()(x))


def test_custom_traced_graph_module_is_accepted(all_forms):
    class LeafConv(fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, name)

    graph = LeafConv().trace(all_forms)
    traced = fx.GraphModule(all_forms, graph)
    gm = excitation.excite(traced)
    assert excitation.report(gm).counts() == {"relu": ALL_FORMS_RELUS, "max_pool2d": ALL_FORMS_POOLS}
    assert not excitation.is_excited(traced)  # the user's GraphModule is not edited
    assert surrogate_relu not in [n.target for n in traced.graph.nodes]
    x = _x()
    assert rel_err(excitation.pullback(gm, x, 0), reference_pullback(all_forms, x, 0)) < 1e-10


def test_report_of_plain_module_is_an_error():
    with pytest.raises(excitation.ExcitationError, match="not an excited model"):
        excitation.report(nn.ReLU())


def test_excite_rejects_non_modules():
    with pytest.raises(TypeError, match="needs an nn.Module"):
        excitation.excite(lambda x: x)


def test_report_node_names_are_valid_temps_keys_before_and_after_reexcite(all_forms):
    sites = excitation.report(excitation.excite(all_forms)).sites
    temps = {s.node: 0.1 * (i + 1) for i, s in enumerate(sites)}
    gm = excitation.excite(all_forms, temps=temps)
    assert [s.temp for s in excitation.report(gm).sites] == list(temps.values())
    again = excitation.excite(gm, temps=temps)
    assert [s.node for s in excitation.report(again).sites] == [s.node for s in sites]
