import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import excitation
from excitation.calibrate import robust_std
from excitation.demo.digits import load_digits, load_model

from .helpers import GraphBreakInBlocks, _straight_through, fingerprint, rel_err, softplus


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


class ScaledBranchy(nn.Module):
    """fx cannot trace it (a branch on data); each ReLU sees inputs of another scale; ``act`` runs twice."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(4))
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = self.act(self.c1(x))
        if x.mean() > 0:
            h = F.relu(self.c2(h) * 4)
        else:
            h = torch.relu(self.c3(h) * 0.25)
        h = self.act(self.c4(h))
        return self.head(h.mean(dim=(2, 3)))


class _ReluInputs(TorchFunctionMode):
    """Records the input of every ReLU call, in call order; or, given temps, gives call k the pullback at temps[k]."""

    def __init__(self, temps=None) -> None:
        super().__init__()
        self.inputs, self.temps = [], temps

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.relu, torch.relu):
            z = args[0]
            self.inputs.append(z.detach().flatten())
            if self.temps is not None:
                t = self.temps[len(self.inputs) - 1]
                return _straight_through(torch.relu(z), t * softplus(z / t))
        return func(*args, **(kwargs or {}))


def _numpy_robust_std(values: torch.Tensor) -> float:
    # The lower median of an even count, as torch.median takes it (numpy's mean of the two middle
    # values differs by ~1 % on a thousand values).
    def lower_median(v):
        return float(np.sort(v)[(v.size - 1) // 2])

    v = values.double().numpy()
    return 1.4826 * lower_median(np.abs(v - lower_median(v)))


def test_calibrate_on_the_dynamo_path_matches_an_eager_reference_on_both_branches():
    torch.manual_seed(0)
    model = ScaledBranchy().eval()
    before = fingerprint(model)
    g = torch.Generator().manual_seed(1)
    pos = [torch.randn(3, 3, 8, 8, generator=g).abs() + 0.1 for _ in range(2)]
    neg = [-torch.randn(3, 3, 8, 8, generator=g).abs() - 0.1]
    with pytest.raises(excitation.ExcitationTraceError):
        excitation.excite(model)
    temps = excitation.calibrate(model, pos + neg, progress=False)
    assert fingerprint(model) == before

    # The reference: ReLU inputs recorded eagerly, call by call.  Calls 0 and 2 are the same sites
    # on both branches (act before and after the branch), call 1 is the branch's own ReLU.
    calls = {"pos": [], "neg": []}
    for branch, batches in (("pos", pos), ("neg", neg)):
        for batch in batches:
            with torch.no_grad(), _ReluInputs() as mode:
                model(batch)
            calls[branch].append(mode.inputs)
    everywhere = [torch.cat([inputs[k] for runs in calls.values() for inputs in runs]) for k in (0, 2)]
    expected = {
        "first": 0.3 * _numpy_robust_std(everywhere[0]),
        "pos": 0.3 * _numpy_robust_std(torch.cat([inputs[1] for inputs in calls["pos"]])),
        "neg": 0.3 * _numpy_robust_std(torch.cat([inputs[1] for inputs in calls["neg"]])),
        "last": 0.3 * _numpy_robust_std(everywhere[1]),
    }
    assert len(temps) == 4 and len(set(temps.values())) == 4
    got = sorted(temps.values())
    for want, value in zip(sorted(expected.values()), got):
        assert abs(value - want) / want < 1e-5
    assert expected["pos"] > 10 * expected["neg"]  # the x4 and x0.25 branches: distinct scales

    # The keys are the sites of the model's dynamo graphs, as pullback names them ...
    excitation.pullback(model, pos[0], 1)
    excitation.pullback(model, neg[0], 1)
    assert set(temps) == {site.node for site in excitation.prepare(model).report().sites}

    # ... and pullback(temps=...) applies each where it was measured: the reference pullback
    # with each call's own temperature, on both branches.
    def nearest(value):
        return min(temps.values(), key=lambda t: abs(t - value))

    for branch, x in (("pos", pos[0]), ("neg", neg[0])):
        per_call = [nearest(expected["first"]), nearest(expected[branch]), nearest(expected["last"])]
        leaf = x.clone().requires_grad_(True)
        with _ReluInputs(per_call):
            score = model(leaf)[:, 2].sum()
        (want,) = torch.autograd.grad(score, leaf)
        ours = excitation.pullback(model, x, 2, temps=temps)
        assert rel_err(ours, want) < 1e-5
        assert rel_err(excitation.pullback(model, x, 2), want) > 1e-3  # the default temps differ
    assert fingerprint(model) == before


def test_one_graph_run_for_several_blocks_is_calibrated_on_all_their_inputs():
    # dynamo runs Block.forward's resume graph for both blocks: one site, one temperature, from
    # the inputs of both ReLU calls.
    torch.manual_seed(0)
    model = GraphBreakInBlocks().eval()
    x = torch.randn(3, 4, 6, 6)
    temps = excitation.calibrate(model, x, progress=False)
    with torch.no_grad(), _ReluInputs() as mode:
        model(x)
    assert len(mode.inputs) == 2 and len(temps) == 1
    (value,) = temps.values()
    want = 0.3 * _numpy_robust_std(torch.cat(mode.inputs))
    assert abs(value - want) / want < 1e-5


class FrozenBatchNormBranchy(nn.Module):
    """Conv -> eval BatchNorm -> ReLU blocks around a data-dependent branch (fx cannot trace it)."""

    def __init__(self, branch: bool = True) -> None:
        super().__init__()
        self.branch = branch
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        if not self.branch or x.mean() > -1e9:
            h = F.relu(self.bn2(self.c2(h)))
        return self.head(h.mean(dim=(2, 3)))


def test_calibrate_reads_the_backends_c_backward_sites_as_the_fx_path_reads_its_fused_ones():
    # On the dynamo path the backend lowers each float32 CPU ReLU site (and a frozen BatchNorm
    # feeding it) to its C-backward form; calibration must read those sites' pre-activations.
    torch.manual_seed(0)
    model = FrozenBatchNormBranchy().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 3.0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)  # frozen: the backend fuses BatchNorm into the C backward
    twin = FrozenBatchNormBranchy(branch=False).eval()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    dynamo = excitation.calibrate(model, x, progress=False)
    fx = excitation.calibrate(twin, x, progress=False)
    assert excitation.api.path_of(excitation.prepare(model)) == "dynamo"
    assert len(dynamo) == len(fx) == 2
    for ours, want in zip(sorted(dynamo.values()), sorted(fx.values())):
        assert abs(ours - want) / want < 1e-5
