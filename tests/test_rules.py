"""The rule set: choosing rules, the report, and one model with every rule through every runtime."""

import copy
import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import excitation
from excitation.kernels import ExcitedMultiheadAttention

from .helpers import (
    MORE_FORMS_KINDS,
    HF_FORMS_KINDS,
    HFForms,
    STEP_FORMS_KINDS,
    StepForms,
    hf_forms_reference,
    ZOO_FORMS_KINDS,
    ExcitationReference,
    MoreForms,
    ZooForms,
    fingerprint,
    more_forms_reference,
    reference_pullback,
    rel_err,
)

TARGET = 3


@pytest.fixture(scope="module")
def zoo_forms():
    torch.manual_seed(0)
    model = ZooForms().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def excited(zoo_forms):
    return excitation.excite(zoo_forms)


def test_every_rule_is_found_and_reported(excited):
    report = excitation.report(excited)
    assert report.counts() == ZOO_FORMS_KINDS
    assert report.unhandled == [] and report.smooth == []
    # ZooForms, MoreForms and StepForms together hold every rule but ReLU (AllForms has those).
    more = excitation.report(excitation.excite(MoreForms())).rule_counts()
    steps = excitation.report(excitation.excite(StepForms().eval())).rule_counts()
    hf = excitation.report(excitation.excite(HFForms().eval())).rule_counts()
    assert set(report.rule_counts()) | set(more) | set(steps) | set(hf) == set(excitation.RULES) - {"relu"}
    assert not set(report.rule_counts()) & set(more) and not (set(report.rule_counts()) | set(more)) & set(steps)
    assert set(hf) == {"rms_norm", "gelu"}  # gelu_new and quick_gelu are GELU's rule
    temps = {s.kind: s.temp for s in report.sites}
    assert temps["silu"] == 1.6 and temps["gelu"] == 1.0 and temps["hardswish"] == 1.6
    assert temps["hardtanh"] == temps["leaky_relu"] == temps["hardsigmoid"] == temps["max_pool2d"] == 0.3
    assert temps["layer_norm"] is None and temps["multihead_attention"] is None


def test_independent_reference_sees_the_same_sites(zoo_forms, x):
    with ExcitationReference(rules=True) as mode:
        zoo_forms(x)
    expected = {"hardtanh": 1, "leaky_relu": 1, "silu": 1, "hardswish": 1, "hardsigmoid": 1, "max_pool2d": 1,
                "layer_norm": 2, "mha": 1, "softmax": 1, "sdpa": 1, "gelu": 1, "relu": 0}
    assert mode.calls == expected


def test_pullback_matches_reference_and_differs_from_gradient(zoo_forms, excited, x):
    ours = excitation.pullback(excited, x, TARGET)
    assert rel_err(ours, reference_pullback(zoo_forms, x, TARGET, rules=True)) < 1e-10
    assert rel_err(ours, excitation.gradient(zoo_forms, x, TARGET)) > 0.05


def test_forward_is_bit_identical_with_and_without_grad(zoo_forms, excited, x):
    with torch.no_grad():
        assert torch.equal(excited(x), zoo_forms(x))
    leaf = x.clone().requires_grad_()
    assert torch.equal(excited(leaf), zoo_forms(leaf))


def test_original_model_is_untouched(x):
    model = ZooForms().double().eval()
    before = fingerprint(model)
    gm = excitation.excite(model)
    excitation.pullback(gm, x, TARGET)
    assert fingerprint(model) == before
    assert type(model.attn) is nn.MultiheadAttention and type(gm.attn) is ExcitedMultiheadAttention
    assert list(gm.state_dict()) == list(model.state_dict())
    assert gm.attn.in_proj_weight is model.attn.in_proj_weight


@pytest.mark.parametrize("rules,expected_off", [
    (["relu", "max_pool"], {"hardtanh", "leaky_relu", "silu", "gelu", "hardswish", "hardsigmoid", "layer_norm",
                            "softmax", "scaled_dot_product_attention", "multihead_attention"}),
    ({"attention": False}, {"softmax", "scaled_dot_product_attention", "multihead_attention"}),
    ({"layer_norm": False, "gelu": 2.0}, {"layer_norm"}),
])
def test_rules_switch_sites_off(zoo_forms, x, rules, expected_off):
    gm = excitation.excite(zoo_forms, rules=rules)
    report = excitation.report(gm)
    assert {u.op for u in report.unhandled} == expected_off
    assert all(u.reason == "rule off" for u in report.unhandled)
    assert not {s.kind for s in report.sites} & expected_off
    if isinstance(rules, dict) and "gelu" in rules:
        assert [s.temp for s in report.sites if s.kind == "gelu"] == [2.0]
    # A switched-off rule really is vanilla: compare with the reference that skips nothing but those sites.
    with torch.no_grad():
        assert torch.equal(gm(x), zoo_forms(x))


def test_rules_off_gives_the_vanilla_gradient(zoo_forms, x):
    with pytest.warns(UserWarning, match=r"found no site of the rules \[\]"):
        gm = excitation.excite(zoo_forms, rules=[])
    assert len(excitation.report(gm)) == 0
    assert rel_err(excitation.pullback(gm, x, TARGET), excitation.gradient(zoo_forms, x, TARGET)) < 1e-12


@pytest.mark.parametrize("rules,error,match", [
    (["relu", "gelus"], ValueError, "did you mean 'gelu'"),
    ({"attention": 0.5}, ValueError, "has no temperature"),
    ({"silu": -1.0}, ValueError, r"rules\['silu'\] must be finite and > 0"),
    ("relu", TypeError, "is a string"),
    (3, TypeError, "rules must be None"),
])
def test_bad_rules_are_refused_before_tracing(zoo_forms, rules, error, match):
    with pytest.raises(error, match=match):
        excitation.excite(zoo_forms, rules=rules)
    with pytest.raises(error, match=match):
        excitation.backend(rules=rules)


def test_temps_mapping_reaches_new_rules_and_refuses_temperature_free_sites(zoo_forms):
    gm = excitation.excite(zoo_forms, temps={"silu": 0.7})
    assert [s.temp for s in excitation.report(gm).sites if s.kind == "silu"] == [0.7]
    with pytest.raises(ValueError, match="do not exist"):
        excitation.excite(zoo_forms, temps={"norm1": 0.7})


def test_reexcite_keeps_sites_and_retempers(excited, x):
    again = excitation.excite(excited, rules={"silu": 3.0})
    report = excitation.report(again)
    assert report.counts() == ZOO_FORMS_KINDS and {s.form for s in report.sites} == {"excited"}
    assert [s.temp for s in report.sites if s.kind == "silu"] == [3.0]
    with torch.no_grad():
        assert torch.equal(again(x), excited(x))


# ------------------------------------------------------------------ runtimes
def _grad(module, x):
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(leaf)[:, TARGET].sum(), leaf)
    return grad


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_runtimes_agree_with_eager(zoo_forms, excited, x):
    eager = excitation.pullback(excited, x, TARGET)
    vanilla = excitation.gradient(zoo_forms, x, TARGET)

    def check(result, tol=1e-10):
        assert rel_err(result, vanilla) > 0.05, "returned the vanilla gradient"
        assert rel_err(result, eager) <= tol

    check(torch.func.grad(lambda t: excited(t)[:, TARGET].sum())(x))
    torch._dynamo.reset()
    check(_grad(torch.compile(excited, backend="aot_eager", fullgraph=True), x), 1e-8)
    exported = torch.export.export(excited, (x,))
    names = {str(n.target) for n in exported.graph.nodes}
    assert {"excitation.surrogate_activation.default", "excitation.surrogate_layer_norm.default",
            "excitation.constant_softmax.default", "excitation.stop_gradient.default"} <= names
    check(_grad(exported.module(), x))
    check(_grad(exported.run_decompositions().module(), x))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    check(_grad(torch.export.load(buffer).module(), x))
    traced = torch.jit.trace(copy.deepcopy(excited), (x,), check_trace=False)
    check(_grad(traced, x))


def test_backend_covers_inlined_rules(zoo_forms, x):
    # dynamo inlines nn.MultiheadAttention: its scaled_dot_product_attention call is the site there.
    torch._dynamo.reset()
    compiler = excitation.backend(inner="aot_eager")
    compiled = torch.compile(zoo_forms, backend=compiler)
    result = _grad(compiled, x)
    kinds = set()
    for report in compiler.reports:
        kinds |= {s.kind for s in report.sites}
    assert {"hardtanh", "leaky_relu", "silu", "gelu", "hardswish", "hardsigmoid", "layer_norm", "softmax",
            "scaled_dot_product_attention", "max_pool2d"} <= kinds
    assert rel_err(result, reference_pullback(zoo_forms, x, TARGET, rules=True)) < 1e-8


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_jit_script_runs_every_rule_but_attention(zoo_forms, x):
    with pytest.raises(excitation.ExcitationError, match="rules=\\{'attention': False\\}"):
        torch.jit.script(excitation.excite(zoo_forms))
    excited = excitation.excite(zoo_forms, rules={"attention": False})
    scripted = torch.jit.script(excited)
    eager = excitation.pullback(excited, x, TARGET)
    assert rel_err(_grad(scripted, x), eager) < 1e-10
    assert rel_err(eager, excitation.gradient(zoo_forms, x, TARGET)) > 0.05


def test_excited_model_with_every_rule_roundtrips(excited, x):
    import pickle

    eager = excitation.pullback(excited, x, TARGET)
    for clone in (copy.deepcopy(excited), pickle.loads(pickle.dumps(excited))):
        assert excitation.report(clone).counts() == ZOO_FORMS_KINDS
        assert type(clone.attn) is ExcitedMultiheadAttention
        assert torch.equal(excitation.pullback(clone, x, TARGET), eager)


def test_decomposed_graph_keeps_what_it_can_and_says_what_it_cannot(zoo_forms, x):
    # run_decompositions() breaks SiLU / Hardswish / Hardsigmoid into primitives: excite warns and
    # reports them; LayerNorm (native_layer_norm) and attention (_softmax) are still rewritten.
    decomposed = torch.export.export(zoo_forms, (x,)).run_decompositions()
    with pytest.warns(UserWarning, match="Excite before decomposing"):
        excited = excitation.excite(decomposed)
    report = excitation.report(excited)
    assert report.unhandled_counts() == {"silu (decomposed)": 1, "hardsigmoid/hardswish (decomposed)": 2}
    assert {u.reason for u in report.unhandled} == {"decomposed"} and report.smooth == []
    assert report.counts()["layer_norm"] == 2 and report.counts()["softmax"] == 3
    with torch.no_grad():
        assert torch.equal(excited(x), decomposed.module()(x))
    # What it did rewrite is the excitation backward: equal to the fx pass with those three rules off.
    partial = excitation.excite(zoo_forms, rules={"silu": False, "hardswish": False, "hardsigmoid": False})
    assert rel_err(_grad(excited, x), excitation.pullback(partial, x, TARGET)) < 1e-8


# ------------------------------------------- the rules timm brought: PReLU, ELU/CELU/SELU, Mish, hard_mish
@pytest.fixture(scope="module")
def more_forms():
    torch.manual_seed(0)
    return MoreForms().double().eval()


@pytest.fixture(scope="module")
def more_excited(more_forms):
    return excitation.excite(more_forms)


def test_more_forms_sites_are_found_and_reported(more_excited):
    report = excitation.report(more_excited)
    assert report.counts() == MORE_FORMS_KINDS
    assert report.unhandled == [] and report.smooth == []
    assert report.rule_counts() == {"prelu": 2, "elu": 3, "mish": 1, "hard_mish": 1}
    temps = {s.kind: s.temp for s in report.sites}
    assert temps == {"prelu": 0.3, "elu": 0.3, "celu": 0.3, "selu": 0.3, "mish": 1.6, "hard_mish": 1.6}
    # hard_mish's 0.5 * x, add and clamp are gone with it: no dead ops left in the forward.
    assert not [n for n in more_excited.graph.nodes if n.target == "clamp" or n.target is torch.clamp]


def test_more_forms_pullback_matches_reference_and_forward_is_bit_identical(more_forms, more_excited, x):
    ours = excitation.pullback(more_excited, x, TARGET)
    assert rel_err(ours, more_forms_reference(more_forms, x, TARGET)) < 1e-10
    assert rel_err(ours, excitation.gradient(more_forms, x, TARGET)) > 0.05
    with torch.no_grad():
        assert torch.equal(more_excited(x), more_forms(x))


def test_more_forms_original_is_untouched_and_slopes_are_shared(x):
    model = MoreForms().double().eval()
    before = fingerprint(model)
    gm = excitation.excite(model)
    excitation.pullback(gm, x, TARGET)
    assert fingerprint(model) == before
    assert gm.prelu.weight is model.prelu.weight and gm.slope is model.slope


def test_more_forms_rules_switch_off_to_vanilla(more_forms, x):
    with pytest.warns(UserWarning, match="found no site"):
        gm = excitation.excite(more_forms, rules={"prelu": False, "elu": False, "mish": False, "hard_mish": False})
    report = excitation.report(gm)
    assert {u.op: 0 for u in report.unhandled} == {k: 0 for k in ("prelu", "elu", "celu", "selu", "mish", "hard_mish")}
    assert rel_err(excitation.pullback(gm, x, TARGET), excitation.gradient(more_forms, x, TARGET)) < 1e-12


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_more_forms_runtimes_agree_with_eager(more_excited, x):
    eager = excitation.pullback(more_excited, x, TARGET)
    check = lambda result: rel_err(result, eager) <= 1e-10  # noqa: E731
    assert check(torch.func.grad(lambda t: more_excited(t)[:, TARGET].sum())(x))
    torch._dynamo.reset()
    assert check(_grad(torch.compile(more_excited, backend="aot_eager", fullgraph=True), x))
    exported = torch.export.export(more_excited, (x,))
    names = {str(n.target) for n in exported.graph.nodes}
    assert {"excitation.surrogate_activation.default", "excitation.surrogate_prelu.default"} <= names
    assert check(_grad(exported.run_decompositions().module(), x))
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    buffer.seek(0)
    assert check(_grad(torch.export.load(buffer).module(), x))
    assert check(_grad(torch.jit.trace(copy.deepcopy(more_excited), (x,), check_trace=False), x))
    assert check(_grad(torch.jit.script(more_excited), x))


def test_more_forms_through_the_backend(more_forms, x):
    torch._dynamo.reset()
    compiler = excitation.backend(inner="aot_eager")
    result = _grad(torch.compile(more_forms, backend=compiler), x)
    kinds = [s.kind for report in compiler.reports for s in report.sites]
    assert sorted(kinds) == sorted(k for k, n in MORE_FORMS_KINDS.items() for _ in range(n))
    assert not [u for report in compiler.reports for u in report.unhandled]
    assert rel_err(result, more_forms_reference(more_forms, x, TARGET)) < 1e-10


def test_more_forms_decomposed_graph_reports_what_it_cannot_rewrite(more_forms, x):
    # Core ATen keeps elu (SELU becomes elu too) and hard_mish's ops; PReLU, CELU and Mish become
    # where / expm1 / tanh(softplus) primitives: reported as decomposed, never silently vanilla.
    decomposed = torch.export.export(more_forms, (x,)).run_decompositions()
    with pytest.warns(UserWarning, match="Excite before decomposing"):
        excited = excitation.excite(decomposed)
    report = excitation.report(excited)
    assert report.counts()["elu"] == 2 and report.counts()["hard_mish"] == 1
    assert report.unhandled_counts() == {"prelu (decomposed)": 2, "celu (decomposed)": 1, "mish (decomposed)": 1}
    assert report.smooth == []
    with torch.no_grad():
        assert torch.equal(excited(x), decomposed.module()(x))


class InplaceTimmForms(nn.Module):
    """The in-place forms of the new rules, each followed by a read of its (overwritten) input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.elu = nn.ELU(0.5, inplace=True)
        self.mish = nn.Mish(inplace=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        a = self.lin(x)
        b = self.elu(a) + a              # module, in place: a is elu(a) afterwards
        c = F.celu(b, 0.5, inplace=True) + b
        d = F.selu_(c * 1.0) + torch.selu_(c)
        e = F.elu_(d * 1.0, 0.3) + self.mish(d) + F.mish(d, inplace=True) + d
        return self.head(e + d.prelu(torch.tensor([0.2], dtype=d.dtype)))


class OutOfPlaceTimmForms(InplaceTimmForms):
    """What :class:`InplaceTimmForms` computes, written out of place."""

    def forward(self, x):
        a = F.elu(self.lin(x), 0.5)
        b = a + a
        b = F.celu(b, 0.5)
        c = b + b
        c2 = F.selu(c)
        d = F.selu(c * 1.0) + c2
        m1 = F.mish(d)
        m2 = F.mish(m1)
        e = F.elu(d * 1.0, 0.3) + m1 + m2 + m2
        return self.head(e + F.prelu(m2, torch.tensor([0.2], dtype=d.dtype)))


def test_inplace_forms_of_the_new_rules_keep_the_forward_and_get_the_rule():
    torch.manual_seed(0)
    model = InplaceTimmForms().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.counts() == {"relu": 0, "max_pool2d": 0, "elu": 2, "celu": 1, "selu": 2, "mish": 2, "prelu": 1}
    assert sum(s.inplace for s in report.sites) == 7 and {s.form for s in report.sites} == {"module", "function", "method"}
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))
    reference = OutOfPlaceTimmForms().double().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(reference(x), model(x))  # the rewrite above is what the model computes
    assert rel_err(excitation.pullback(excited, x, 1), reference_pullback(reference, x, 1, rules=True)) < 1e-10
    # The ATen forms (torch.export) are sites too, with the same pullback.
    aten = excitation.excite(torch.export.export(model, (x,)))
    assert {s.form for s in excitation.report(aten).sites} == {"aten"}
    assert excitation.report(aten).counts() == report.counts()
    assert rel_err(excitation.pullback(aten, x, 1), excitation.pullback(excited, x, 1)) < 1e-12


def test_more_forms_reexcite_keeps_sites_and_retempers(more_excited, x):
    again = excitation.excite(more_excited, rules={"mish": 3.0, "hard_mish": 2.0, "elu": 0.5})
    report = excitation.report(again)
    assert report.counts() == MORE_FORMS_KINDS and {s.form for s in report.sites} == {"excited"}
    assert {s.kind: s.temp for s in report.sites} == {"prelu": 0.3, "elu": 0.5, "celu": 0.5, "selu": 0.5, "mish": 3.0,
                                                      "hard_mish": 2.0}
    with torch.no_grad():
        assert torch.equal(again(x), more_excited(x))
    assert rel_err(excitation.pullback(again, x, TARGET), excitation.pullback(more_excited, x, TARGET)) > 1e-3


@pytest.mark.parametrize("expression, is_site", [
    (lambda x: 0.5 * x * (x + 2).clamp(min=0, max=2), True),     # timm's hard_mish
    (lambda x: (x + 2).clamp(0, 2) * (x * 0.5), True),           # same ops, operands swapped
    (lambda x: 0.5 * x * (x + 2).clamp(min=0, max=3), False),    # another bound: a clamp, reported
    (lambda x: 0.5 * x * (x + 1).clamp(min=0, max=2), False),
    (lambda x: 0.4 * x * (x + 2).clamp(min=0, max=2), False),
    (lambda x: 0.5 * x * (x.detach() + 2).clamp(min=0, max=2), False),  # not the same x
    (lambda x: 0.5 * x * (x + torch.tensor(2.0)).clamp(min=0, max=2), False),
])
def test_hard_mish_is_recognised_only_in_its_exact_shape(expression, is_site):
    class Expression(nn.Module):
        def forward(self, x):
            return expression(x)

    model = nn.Sequential(nn.Linear(4, 4), Expression(), nn.Linear(4, 2)).double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no site" for the negatives
        excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.counts().get("hard_mish", 0) == int(is_site)
    assert report.unhandled_counts() == ({} if is_site else {"clamp": 1})
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))


# ------------------------------------------------- Threshold and eval-mode RReLU: rules made of one table entry
@pytest.fixture(scope="module")
def step_forms():
    torch.manual_seed(0)
    return StepForms().double().eval()


@pytest.fixture(scope="module")
def step_excited(step_forms):
    return excitation.excite(step_forms)


def test_step_forms_sites_are_found_and_reported(step_excited):
    report = excitation.report(step_excited)
    assert report.counts() == STEP_FORMS_KINDS
    assert report.unhandled == [] and report.smooth == []
    assert {s.kind: s.temp for s in report.sites} == {"threshold": 0.3, "rrelu": 0.3}
    assert {s.form for s in report.sites} == {"module", "function"}
    semantic = excitation.report(excitation.excite(step_excited, preset="semantic"))
    assert {s.temp for s in semantic.sites} == {0.6}  # the ReLU family follows the preset's temp


def test_step_forms_pullback_matches_reference_and_forward_is_bit_identical(step_forms, step_excited, x):
    ours = excitation.pullback(step_excited, x, TARGET)
    with ExcitationReference(rules=True) as mode:
        step_forms(x)
    assert mode.calls == {"relu": 0, "max_pool2d": 0, "threshold": 3, "rrelu": 2}
    assert rel_err(ours, reference_pullback(step_forms, x, TARGET, rules=True)) < 1e-10
    assert rel_err(ours, excitation.gradient(step_forms, x, TARGET)) > 0.05
    with torch.no_grad():
        assert torch.equal(step_excited(x), step_forms(x))


def test_rrelu_in_training_mode_is_reported_not_rewritten(x):
    # Training-mode RReLU draws a random slope per element: no deterministic forward to keep.
    model = StepForms().double().train()
    excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.counts() == {**STEP_FORMS_KINDS, "rrelu": 1}  # F.rrelu(training=False) is still a site
    assert report.unhandled_counts() == {"RReLU": 1}
    assert excitation.report(excitation.excite(model.eval())).counts() == STEP_FORMS_KINDS


def test_step_forms_rules_switch_off_to_vanilla(step_forms, x):
    with pytest.warns(UserWarning, match="found no site"):
        gm = excitation.excite(step_forms, rules={"threshold": False, "rrelu": False})
    assert excitation.report(gm).unhandled_counts() == {"threshold": 3, "rrelu": 2}
    assert rel_err(excitation.pullback(gm, x, TARGET), excitation.gradient(step_forms, x, TARGET)) < 1e-12


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_step_forms_runtimes_agree_with_eager(step_excited, x):
    eager = excitation.pullback(step_excited, x, TARGET)
    check = lambda result: rel_err(result, eager) <= 1e-10  # noqa: E731
    assert check(torch.func.grad(lambda t: step_excited(t)[:, TARGET].sum())(x))
    torch._dynamo.reset()
    assert check(_grad(torch.compile(step_excited, backend="aot_eager", fullgraph=True), x))
    exported = torch.export.export(step_excited, (x,))
    assert "excitation.surrogate_activation.default" in {str(n.target) for n in exported.graph.nodes}
    assert check(_grad(exported.module(), x))
    assert check(_grad(torch.jit.trace(copy.deepcopy(step_excited), (x,), check_trace=False), x))
    assert check(_grad(torch.jit.script(step_excited), x))


def test_step_forms_aten_and_backend_sites_equal_the_fx_ones(step_forms, step_excited, x):
    eager = excitation.pullback(step_excited, x, TARGET)
    aten = excitation.excite(torch.export.export(step_forms, (x,)))
    assert excitation.report(aten).counts() == STEP_FORMS_KINDS
    assert {s.form for s in excitation.report(aten).sites} == {"aten"}
    assert rel_err(excitation.pullback(aten, x, TARGET), eager) < 1e-12
    torch._dynamo.reset()
    compiler = excitation.backend(inner="aot_eager")
    result = _grad(torch.compile(step_forms, backend=compiler), x)
    kinds = sorted(s.kind for report in compiler.reports for s in report.sites)
    assert kinds == ["rrelu"] * 2 + ["threshold"] * 3
    assert rel_err(result, eager) < 1e-10


def test_step_forms_decomposed_graph_reports_what_it_cannot_rewrite(step_forms, x):
    # Core ATen turns threshold into where(x <= th, value, x) and RReLU into rrelu_with_noise: reported.
    decomposed = torch.export.export(step_forms, (x,)).run_decompositions()
    with pytest.warns(UserWarning, match="Excite before decomposing"):
        excited = excitation.excite(decomposed)
    report = excitation.report(excited)
    assert report.unhandled_counts() == {"threshold (decomposed)": 3, "rrelu_with_noise_functional": 2}


# ------------------------------------------------- the Hugging Face forms through every runtime
@pytest.fixture(scope="module")
def hf_forms():
    torch.manual_seed(0)
    return HFForms().double().eval()


@pytest.fixture(scope="module")
def hf_excited(hf_forms):
    return excitation.excite(hf_forms)


def test_hf_forms_sites_are_found_and_match_the_reference(hf_forms, hf_excited, x):
    report = excitation.report(hf_excited)
    assert report.counts() == HF_FORMS_KINDS and report.unhandled == [] and report.smooth == []
    assert {s.form for s in report.sites} == {"module", "function"}
    ours = excitation.pullback(hf_excited, x, TARGET)
    assert rel_err(ours, hf_forms_reference(hf_forms, x, TARGET)) < 1e-6  # the hand-written norm is float32
    assert rel_err(ours, excitation.gradient(hf_forms, x, TARGET)) > 0.05
    with torch.no_grad():
        assert torch.equal(hf_excited(x), hf_forms(x))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_hf_forms_runtimes_agree_with_eager(hf_forms, hf_excited, x):
    eager = excitation.pullback(hf_excited, x, TARGET)
    check = lambda result: rel_err(result, eager) <= 1e-10  # noqa: E731
    assert check(torch.func.grad(lambda t: hf_excited(t)[:, TARGET].sum())(x))
    torch._dynamo.reset()
    assert check(_grad(torch.compile(hf_excited, backend="aot_eager", fullgraph=True), x))
    exported = torch.export.export(hf_excited, (x,))
    assert "excitation.surrogate_rms_norm.default" in {str(n.target) for n in exported.graph.nodes}
    assert check(_grad(exported.module(), x))
    assert check(_grad(torch.jit.trace(copy.deepcopy(hf_excited), (x,), check_trace=False), x))
    assert check(_grad(torch.jit.script(hf_excited), x))
    torch._dynamo.reset()
    compiler = excitation.backend(inner="aot_eager")
    result = _grad(torch.compile(hf_forms, backend=compiler), x)
    kinds = sorted(s.kind for report in compiler.reports for s in report.sites)
    assert kinds == ["gelu_new", "quick_gelu"] + ["rms_norm"] * 3 and check(result)
    aten = excitation.excite(torch.export.export(hf_forms, (x,)))
    assert excitation.report(aten).counts() == HF_FORMS_KINDS
    assert rel_err(excitation.pullback(aten, x, TARGET), eager) < 1e-10


# ------------------------------------------------- the Hugging Face expressions: gelu_new, quick_gelu, RMSNorm
_C = math.sqrt(2.0 / math.pi)


@pytest.mark.parametrize("expression, kind, is_site", [
    (lambda x: 0.5 * x * (1.0 + torch.tanh(_C * (x + 0.044715 * torch.pow(x, 3.0)))), "gelu_new", True),
    (lambda x: x * 0.5 * (1.0 + torch.tanh(_C * (x + 0.044715 * torch.pow(x, 3.0)))), "gelu_new", True),
    (lambda x: 0.5 * x * (torch.tanh((x + 0.044715 * x.pow(3.0)) * _C) + 1.0), "gelu_new", True),
    (lambda x: 0.5 * x * (2.0 + torch.tanh(_C * (x + 0.044715 * torch.pow(x, 3.0)))), "gelu_new", False),
    (lambda x: 0.5 * x * (1.0 + torch.tanh(_C * (x.detach() + 0.044715 * torch.pow(x, 3.0)))), "gelu_new", False),
    (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu", True),
    (lambda x: torch.sigmoid(x * 1.702) * x, "quick_gelu", True),
    (lambda x: x * torch.sigmoid(1.702 * x.detach()), "quick_gelu", False),
])
def test_gelu_expressions_are_recognised_only_in_their_shape(expression, kind, is_site):
    class Expression(nn.Module):
        def forward(self, x):
            return expression(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), Expression(), nn.Linear(6, 2)).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.counts().get(kind, 0) == int(is_site)
    if is_site:  # no tanh / sigmoid left behind as a smooth op, and the graph holds none of the expression's ops
        assert not report.smooth and not report.unhandled
        assert len([n for n in excited.graph.nodes if n.op == "call_function"]) == 1
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))
    # The pullback: the GELU rule's gate on z = first layer's output (temp 1.0).
    z = model[0](x)
    gate = (torch.special.ndtr(z) if kind == "gelu_new" else torch.sigmoid(1.702 * z)) if is_site else None
    if gate is not None:
        expected = (model[2].weight[1] * gate) @ model[0].weight
        assert rel_err(excitation.pullback(excited, x, 1), expected.detach()) < 1e-10


class HandRMS(nn.Module):
    """Llama's RMSNorm, as transformers writes it."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.eps = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class DivRMS(HandRMS):
    """ImageGPT's: a division by the root mean square."""

    def forward(self, h):
        h = h / torch.sqrt(torch.mean(torch.square(h), axis=-1, keepdim=True) + self.eps)
        return h * self.weight


@pytest.mark.parametrize("norm", [HandRMS(8), DivRMS(8), nn.RMSNorm(8, eps=1e-6)], ids=["rsqrt", "sqrt", "nn.RMSNorm"])
def test_rms_norm_holds_the_root_mean_square_in_every_form(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), norm, nn.Linear(8, 3)).eval()
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.counts()["rms_norm"] == 1 and not report.unhandled
    x = torch.randn(5, 4)
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))
    leaf = x.clone().requires_grad_()
    h = model[0](leaf)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6).detach()  # the reference: the RMS a constant
    (expected,) = torch.autograd.grad(model[2](norm.weight * (h * rstd))[:, 1].sum(), leaf)
    assert rel_err(excitation.pullback(excited, x, 1), expected) < 1e-6
    assert rel_err(excitation.gradient(model, x, 1), expected) > 1e-3
    if not isinstance(norm, DivRMS):  # ImageGPT's torch.mean(..., axis=-1) is not TorchScript, excited or not
        scripted = torch.jit.script(excited)
        with torch.no_grad():
            assert torch.equal(scripted(x), model(x))


@pytest.mark.parametrize("expression, is_site", [
    (lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), True),
    (lambda h: h * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-6), True),
    (lambda h: h * torch.rsqrt(h.pow(2).mean(0, keepdim=True) + 1e-6), False),   # over the batch: not a norm
    (lambda h: h * torch.rsqrt(h.pow(3).mean(-1, keepdim=True) + 1e-6), False),  # not a square
    (lambda h: h * torch.rsqrt(h.pow(2).mean(-1)[:, None] + 1e-6), False),       # the mean does not keep dims
])
def test_only_a_mean_square_over_the_last_dims_is_an_rms_norm(expression, is_site):
    class Expression(nn.Module):
        def forward(self, h):
            return expression(h)

    model = nn.Sequential(nn.Linear(4, 8), Expression(), nn.Linear(8, 3)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = excitation.report(excitation.excite(model))
    assert report.counts().get("rms_norm", 0) == int(is_site)
