"""The options object: built once from a preset and keywords, checked, hashable, and the same at every entry point."""

import pytest
import torch
import torch.nn as nn

import excitation
from excitation import Options
from excitation.evaluation.explainers import make_explainer

from .helpers import rel_err


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3, padding=1),
                         nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_build_applies_the_preset_and_explicit_choices_win():
    semantic = Options.build("semantic")
    assert (semantic.temp, semantic.pool_temp, semantic.gate, semantic.pool_backward) == (0.6, 0.3, "normal_cdf",
                                                                                         "weights")
    mixed = Options.build("semantic", temp=0.5, gate="sigmoid")
    assert (mixed.preset, mixed.temp, mixed.pool_temp, mixed.gate) == ("semantic", 0.5, 0.3, "sigmoid")
    # Without a preset, pool_temp follows temp (as the keywords always have).
    assert Options.build(temp=0.7).pool_temp == 0.7 and Options.build().preset == "paper"


def test_equal_choices_make_equal_hashable_options():
    a = Options.build("paper", temp=0.4, temps={"b": 1.0, "a": 2.0}, rules={"silu": 2.0, "layer_norm": False})
    b = Options.build("paper", temp=0.4, temps={"a": 2.0, "b": 1.0}, rules={"layer_norm": False, "silu": 2.0})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.temps == (("a", 2.0), ("b", 1.0)) and a.temps_spec == {"a": 2.0, "b": 1.0}
    assert a != Options.build("paper", temp=0.4) and Options.build(temp=0.4) != Options.build("paper", temp=0.4)


def test_active_rules_resolve_names_mappings_and_temperatures():
    assert Options.build(rules=["relu", "max_pool"], temp=0.2).active_rules == {"relu": 0.2, "max_pool": 0.2}
    active = Options.build(rules={"silu": 2.5, "attention": False}).active_rules
    assert active["silu"] == 2.5 and "attention" not in active and active["relu"] == 0.3
    assert set(Options.build().active_rules) == set(excitation.RULES)


@pytest.mark.parametrize("keywords, error, message", [
    ({"temp": -1.0}, ValueError, "temp must be finite and > 0"),
    ({"gate": "relu"}, ValueError, "not a known gate"),
    ({"preset": "papr"}, ValueError, "did you mean 'paper'"),
    ({"rules": ["reLU"]}, ValueError, "unknown rules"),
    ({"rules": "relu"}, TypeError, "is a string"),
    ({"saved": "int4"}, ValueError, "saved='int4' is not known"),
    ({"fuse": "yes"}, TypeError, "fuse must be True or False"),
    ({"temps": ["a"]}, TypeError, "temps must be a mapping"),
    ({"temps": {"a": 0.0}}, ValueError, r"temps\['a'\] must be finite and > 0"),
])
def test_bad_choices_are_refused_when_built(keywords, error, message):
    with pytest.raises(error, match=message):
        Options.build(**keywords)


def test_replace_checks_again_and_keeps_the_other_choices():
    options = Options.build("semantic", rules={"silu": 2.0})
    changed = options.replace(temp=0.2)
    assert (changed.temp, changed.pool_temp, changed.gate, changed.active_rules["silu"]) == (0.2, 0.3, "normal_cdf", 2.0)
    assert changed.active_rules["relu"] == 0.2  # the ReLU family follows the new temp
    with pytest.raises(ValueError, match="temp must be finite"):
        options.replace(temp=0.0)
    with pytest.raises(TypeError, match="no field"):
        options.replace(temperature=0.2)


def test_options_or_keywords_but_not_both():
    options = Options.build(temp=0.5)
    with pytest.raises(ValueError, match=r"pass either options= or the keywords \['temp'\]"):
        excitation.excite(_net(), options=options, temp=0.4)
    with pytest.raises(TypeError, match="options must be an excitation.Options"):
        excitation.pullback(_net(), X, 0, options={"temp": 0.5})


def test_prepare_caches_by_the_options():
    net = _net()
    options = Options.build("semantic", temp=0.5)
    assert excitation.prepare(net, options=options) is excitation.prepare(net, preset="semantic", temp=0.5)
    assert excitation.prepare(net, options=Options.build()) is excitation.prepare(net)
    assert excitation.prepare(net, options=options) is not excitation.prepare(net)


def test_every_entry_point_takes_the_options_as_its_keywords():
    net = _net()
    options = Options.build("semantic", temp=0.4, rules={"silu": 2.0})
    keywords = {"preset": "semantic", "temp": 0.4}
    report = excitation.report(excitation.excite(net, options=options))
    assert (report.preset, report.temp, report.gate, report.pool_backward) == ("semantic", 0.4, "normal_cdf", "weights")
    assert {s.kind: s.temp for s in report.sites} == {"relu": 0.4, "max_pool2d": 0.3, "silu": 2.0}
    plain = Options.build("semantic", temp=0.4)
    ours = excitation.pullback(net, X, 1, options=plain)
    assert torch.equal(ours, excitation.pullback(net, X, 1, **keywords))
    assert rel_err(ours, excitation.pullback(net, X, 1)) > 1e-3  # not the default options
    grid = excitation.pullbacks(net, X, [0, 1], options=plain)
    assert torch.allclose(grid[:, 1], ours, atol=1e-6)
    assert torch.equal(excitation.ascend(net, X, 1, steps=1, options=plain, progress=False),
                       excitation.ascend(net, X, 1, steps=1, progress=False, **keywords))
    temps = excitation.calibrate(net, X, options=Options.build(rules=["relu"]), progress=False)
    assert len(temps) == 1  # only the ReLU rule's site
    assert excitation.backend(options=options).options == options
    explained = make_explainer("pullback", options=plain)(net, X, torch.tensor([1, 1]))
    assert torch.equal(explained, ours)
