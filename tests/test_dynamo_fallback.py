"""The automatic dynamo path of the public API, for models torch.fx cannot trace."""

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import excitation
from excitation import api
from excitation.dynamo_path import DEFAULT_INNER, CompiledExcited, count_activation_calls

from .helpers import GraphBreakInBlocks, HardMish, fingerprint, hard_mish, more_forms_reference, reference_pullback, rel_err, vanilla_gradient


class Branchy(nn.Module):
    """A forward that branches on data: fx cannot trace it, dynamo splits it into graphs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pos = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.neg = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.ReLU())
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if x.mean() > 0:  # data-dependent: TraceError in symbolic_trace
            h = self.pos(h)
        else:
            h = self.neg(h)
        return self.head(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """One model for the module: each compile costs seconds, and prepare() caches it."""
    torch.manual_seed(0)
    return Branchy()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    return x.abs() + 0.1, -x.abs() - 0.1  # one input per branch


def test_excite_still_raises_the_fx_error(model):
    with pytest.raises(excitation.ExcitationTraceError, match="x.mean\\(\\) > 0"):
        excitation.excite(model)


def test_fallback_takes_dynamo_path_and_says_so(model, caplog):
    x, _ = _inputs()
    with caplog.at_level(logging.INFO, logger="excitation"):
        excitation.pullback(model, x, 1)
    prepared = api.prepare(model)
    assert isinstance(prepared, CompiledExcited)
    assert api.path_of(prepared) == "dynamo" and prepared.excitation_path == "dynamo"
    assert any("torch.compile path" in r.getMessage() for r in caplog.records)
    assert "x.mean() > 0" in prepared.trace_error
    assert excitation.report(prepared).counts()["relu"] >= 2 and not excitation.report(prepared).unhandled
    # fx-traceable models keep the fx path
    plain = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert api.path_of(api.prepare(plain)) == "fx"


def test_both_branches_match_the_reference(model):
    """Each branch's pullback equals the interception reference (ReLU, LeakyReLU, max-pool rules)."""
    for x in _inputs():
        got = excitation.pullback(model, x, 3)
        model.eval()
        want = reference_pullback(model, x, 3, rules=True)
        assert rel_err(got, want) < 1e-5
        assert rel_err(got, vanilla_gradient(model, x, 3)) > 1e-3  # it is not the gradient


def test_fallback_equals_backend_by_hand(model):
    x, y = _inputs()
    # Bit for bit with the default inner backend ("eager"); aot_eager re-traces to ATen, so only
    # to float32 rounding.
    assert DEFAULT_INNER == "eager"
    for inner in ("eager", "aot_eager"):
        compiled = torch.compile(api.clone_module_tree(model).eval(), backend=excitation.backend(inner=inner))
        for inp in (x, y):
            leaf = inp.clone().requires_grad_(True)
            (by_hand,) = torch.autograd.grad(compiled(leaf)[:, 2].sum(), leaf)
            ours = excitation.pullback(model, inp, 2)
            assert torch.equal(ours, by_hand) if inner == "eager" else rel_err(ours, by_hand) < 1e-5


def test_forward_equal_and_original_untouched(model):
    x, y = _inputs()
    model.train()
    before = fingerprint(model)
    for inp in (x, y):
        excitation.pullback(model, inp, 0)
    assert fingerprint(model) == before and model.training
    prepared = api.prepare(model)
    for inp in (x, y):
        with torch.no_grad():
            assert torch.equal(prepared(inp), model.eval()(inp))
    model.train()
    assert prepared.forward_max_diff == 0.0
    assert not any(p is q for p, q in zip(model.modules(), prepared.model.modules()))


def test_no_recompilation_at_a_fixed_shape(model):
    x, y = _inputs()
    excitation.pullback(model, x, 1)
    excitation.pullback(model, y, 1)
    prepared = api.prepare(model)
    compiles = prepared.compiles
    assert compiles >= 2  # a graph break: several graphs
    first = excitation.pullback(model, x, 1)
    for _ in range(3):
        assert torch.equal(excitation.pullback(model, x, 1), first)
        excitation.pullback(model, y, 4)
    assert prepared.compiles == compiles
    assert api.prepare(model) is prepared  # cached per model and options


def test_pullbacks_and_ascend_on_dynamo_path(model):
    x, _ = _inputs()
    many = excitation.pullbacks(model, x, [0, 3])
    assert many.shape == (2, 2, 3, 8, 8)
    for k, t in enumerate((0, 3)):
        assert torch.equal(many[:, k], excitation.pullback(model, x, t))
    moved = excitation.ascend(model, x, 3, steps=2, step_size=0.1, radius=1.0, pixel_range=None, progress=False)
    # one step by hand: x + step_size * pb / ||pb||
    pb = excitation.pullback(model, x, 3)
    step = x + 0.1 * pb / pb.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    once = excitation.ascend(model, x, 3, steps=1, step_size=0.1, radius=1.0, pixel_range=None, progress=False)
    assert torch.allclose(once, step, atol=1e-6) and moved.shape == x.shape


def test_temps_mapping_on_the_dynamo_path_is_checked(model, caplog):
    x, _ = _inputs()
    # No key names any site: the mapping is for another model (or mistyped throughout).
    with pytest.raises(ValueError, match="temps names no site"):
        excitation.pullback(model, x, 1, temps={"layer1.0.relu": 0.5})
    # A module path that exists applies; an unknown key beside it is a warning, named.
    with caplog.at_level(logging.INFO, logger="excitation"):
        excitation.pullback(model, x, 1, temps={"pos.1": 0.7, "pos.9": 0.5})
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("pos.9" in message for message in warned)
    prepared = api.prepare(model, temps={"pos.1": 0.7, "pos.9": 0.5})
    assert [site.temp for site in prepared.report().sites if site.name == "pos.1"] == [0.7]


def test_dynamo_site_keys_are_stable_and_name_shared_graphs_as_shared():
    # Both blocks' ReLUs run in a resume frame of Block.forward, whose graph dynamo compiles once
    # and runs for each block (their parameters are graph inputs): one site, keyed from the
    # block ("act:relu@<line>"), not by the first block's path.
    torch.manual_seed(0)
    model = GraphBreakInBlocks().eval()
    x = torch.randn(2, 4, 6, 6)
    excitation.pullback(model, x, 0)
    sites = api.prepare(model).report().sites
    assert [site.name for site in sites] == ["act"] and sites[0].node.startswith("act:relu@")
    # The same keys in another compile of another clone (by hand, inner aot_eager) ...
    backend = excitation.backend(inner="aot_eager")
    torch.compile(api.clone_module_tree(model), backend=backend)(x)
    assert [site.node for part in backend.reports for site in part.sites] == [sites[0].node]
    # ... and in a model whose top frame holds the sites: its own ReLU calls, each keyed apart.
    flat = Branchy().eval()
    excitation.pullback(flat, _inputs()[0], 0)
    excitation.pullback(flat, _inputs()[1], 0)
    keys = [site.node for site in api.prepare(flat).report().sites]
    assert len(keys) == len(set(keys)) == 5
    assert {key.split("@")[0] for key in keys} == {"relu", "pos.1:relu", "pos.2:max_pool2d", "neg.1:leaky_relu",
                                                   "neg.2:relu"}


class Hidden(nn.Module):
    """An activation inside a frame dynamo must not compile: it would run eagerly (vanilla)."""

    def forward(self, x):
        return _hidden_relu(x) + x.sum() * 0 if x.sum() > -1e9 else x


@torch._dynamo.disable
def _hidden_relu(x):
    return torch.relu(x)


class HiddenNorm(nn.Module):
    """A LayerNorm inside a frame dynamo must not compile: its vanilla backward would go unnoticed but for the census."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return _hidden_norm(self.norm, x) + x.sum() * 0 if x.sum() > -1e9 else x


@torch._dynamo.disable
def _hidden_norm(norm, x):
    return norm(x).softmax(-1)


def test_a_norm_or_softmax_outside_the_graphs_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), HiddenNorm(), nn.Linear(4, 2))
    assert count_activation_calls(model, torch.randn(1, 4))[0] == 2  # layer_norm and softmax
    with pytest.raises(excitation.ExcitationError, match="2 activation, norm and softmax calls ran"):
        excitation.pullback(model, torch.randn(1, 4), 0)
    inside = BranchyNorm()
    excitation.pullback(inside, torch.randn(1, 4), 0)  # counted in the graphs: no error
    assert excitation.api.path_of(excitation.prepare(inside)) == "dynamo"


class BranchyNorm(nn.Module):
    """fx cannot trace it; dynamo's graphs hold its LayerNorm and a softmax that is no attention (it feeds a Linear)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.norm(self.lin(x))
        h = h.softmax(-1) if h.sum() > 0 else torch.softmax(2 * h, -1)
        return self.head(h)


def test_activation_outside_the_graphs_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), Hidden(), nn.Linear(4, 2))
    assert count_activation_calls(model, torch.randn(1, 4))[0] == 1
    with pytest.raises(excitation.ExcitationError, match="ran outside them"):
        excitation.pullback(model, torch.randn(1, 4), 0)


class BranchyTimmActivations(nn.Module):
    """The rules timm brought (PReLU, ELU, CELU, SELU, Mish, hard_mish) on both sides of a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pos = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.PReLU(6), nn.Mish(), HardMish())
        self.neg = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ELU(0.5), nn.CELU(0.5), nn.SELU())
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = self.pos(h) if x.mean() > 0 else self.neg(h)
        return self.head(h.mean(dim=(2, 3)))


def test_timm_rules_on_the_dynamo_path_match_the_reference_on_both_branches():
    torch.manual_seed(0)
    model = BranchyTimmActivations().eval()
    for x in _inputs():
        got = excitation.pullback(model, x, 2)
        assert rel_err(got, more_forms_reference(model, x, 2)) < 1e-5
        assert rel_err(got, vanilla_gradient(model, x, 2)) > 1e-3
    prepared = api.prepare(model)
    assert api.path_of(prepared) == "dynamo" and not prepared.report().unhandled
    assert {s.kind for s in prepared.report().sites} == {"prelu", "mish", "hard_mish", "elu", "celu", "selu"}


class BranchyStep(nn.Module):
    """Threshold and eval-mode RReLU on both sides of a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pos = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.Threshold(0.1, -0.5))
        self.neg = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.RReLU(0.1, 0.3))
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.threshold(self.conv(x), -0.1, 0.0)
        h = self.pos(h) if x.mean() > 0 else self.neg(h)
        return self.head(h.mean(dim=(2, 3)))


def test_threshold_and_rrelu_on_the_dynamo_path_match_the_reference_on_both_branches():
    torch.manual_seed(0)
    model = BranchyStep().eval()
    for x in _inputs():
        got = excitation.pullback(model, x, 2)
        assert rel_err(got, reference_pullback(model, x, 2, rules=True)) < 1e-5
        assert rel_err(got, vanilla_gradient(model, x, 2)) > 1e-3
    prepared = api.prepare(model)
    assert api.path_of(prepared) == "dynamo" and not prepared.report().unhandled
    assert {s.kind for s in prepared.report().sites} == {"threshold", "rrelu"}


class HiddenTimmActivation(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.act = torch._dynamo.disable(act)  # runs eagerly, outside every graph

    def forward(self, x):
        return self.act(x) + x.sum() * 0 if x.sum() > -1e9 else x


@pytest.mark.parametrize("act", [F.elu, F.selu, F.mish, hard_mish, lambda x: F.prelu(x, torch.tensor([0.2])),
                                 lambda x: F.threshold(x, 0.1, 0.0), lambda x: F.rrelu(x, 0.1, 0.3)],
                         ids=["elu", "selu", "mish", "hard_mish", "prelu", "threshold", "rrelu"])
def test_timm_activation_outside_the_graphs_is_refused(act):
    model = nn.Sequential(nn.Linear(4, 4), HiddenTimmActivation(act), nn.Linear(4, 2))
    assert count_activation_calls(model, torch.randn(1, 4))[0] == 1
    with pytest.raises(excitation.ExcitationError, match="ran outside them"):
        excitation.pullback(model, torch.randn(1, 4), 0)


def test_census_counts_zero_floor_clamps_only():
    # hard_mish's clamp(0, 2) counts (it is one activation); other clamps do not.
    x = torch.randn(3, requires_grad=True)
    counted = [count_activation_calls(lambda t, f=f: f(t), x)[0] for f in (
        lambda t: t.clamp(0, 2), lambda t: torch.clamp(t, min=0), lambda t: t.clamp(-1, 1), lambda t: t.clamp(max=0),
        lambda t: t.clamp_min(0))]
    assert counted == [1, 1, 0, 0, 0]
    # A clamp through which no gradient flows is no gate: neither counted here nor reported in a graph.
    assert count_activation_calls(lambda t: t.clamp(0, 2), x.detach())[0] == 0


class GridClamp(nn.Module):
    """SigLIP 2's pattern: weights made from constants and clamped at 0, then applied to the input."""

    def forward(self, x):
        grid = (1 - (torch.arange(4.0) - 1.5).abs() / 2).clamp_(min=0)
        return torch.relu(x * grid) if x.sum() > -1e9 else x


def test_a_constant_clamp_is_neither_counted_nor_reported_on_the_dynamo_path():
    model = nn.Sequential(nn.Linear(4, 4), GridClamp(), nn.Linear(4, 2))
    x = torch.randn(2, 4)
    excitation.pullback(model, x, 0)  # the census agrees with the graphs: no error
    report = excitation.prepare(model).report()
    assert report.counts()["relu"] == 1 and report.unhandled == []


def test_an_integer_clamp_is_an_index_not_an_activation():
    # gemma4_vit clamps its integer position ids with clamp(min=0): no gradient flows through an
    # index, so it is neither counted by the census nor reported as an unhandled site.
    assert count_activation_calls(lambda t: t.clamp(min=0), torch.arange(-2, 3))[0] == 0

    class IndexedRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(5, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            ids = (x.sum(-1) * 10).long().clamp(min=0, max=4)
            h = torch.relu(x + self.table(ids)) if x.mean() > -100 else x  # data-dependent: no fx trace
            return self.head(h)

    torch.manual_seed(0)
    model, x = IndexedRelu().eval(), torch.randn(2, 4)
    torch._dynamo.reset()
    ours = excitation.pullback(model, x, 1)
    prepared = api.prepare(model)
    assert api.path_of(prepared) == "dynamo" and not prepared.report().unhandled
    assert [s.kind for s in prepared.report().sites] == ["relu"]
    assert rel_err(ours, reference_pullback(model, x, 1)) < 1e-5


def test_backend_by_hand_applies_a_temps_mapping_across_graph_breaks(model, caplog):
    # "pos.1" lives in the graph after the break: the first graph must not refuse it (it did,
    # before: each graph checked the mapping against its own sites), and says once that it is unused so far.
    x, _ = _inputs()
    backend = excitation.backend(temps={"pos.1": 0.7}, inner="eager")
    with caplog.at_level(logging.WARNING, logger="excitation"):
        torch.compile(api.clone_module_tree(model).eval(), backend=backend)(x)
    assert backend.unused_temps == []
    temps = [site.temp for part in backend.reports for site in part.sites if site.name == "pos.1"]
    assert temps == [0.7]
    assert sum("name no site of the 1 graph(s)" in r.getMessage() for r in caplog.records) == 1
