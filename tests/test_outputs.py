"""excitation/outputs.py: which tensor of a model's output the target indexes."""

from collections import OrderedDict, namedtuple

import pytest
import torch
import torch.nn as nn

import excitation
from excitation.outputs import output_fields, select_output

from .helpers import rel_err


class Fields(OrderedDict):
    """A stand-in for a Hugging Face ``ModelOutput``: an ordered dict whose fields are attributes too."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DictHead(nn.Module):
    def __init__(self, with_logits: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)
        self.with_logits = with_logits

    def forward(self, x):
        hidden = self.body(x)
        out = Fields(hidden_states=hidden)
        if self.with_logits:
            out["logits"] = self.head(hidden)
        return out


def test_a_tensor_is_its_own_output_and_logits_are_taken_from_a_mapping():
    t = torch.randn(2, 3)
    assert select_output(t) is t
    assert select_output({"logits": t, "loss": None}) is t
    assert select_output(Fields(logits=t)) is t
    pair = namedtuple("Pair", "logits aux")(t, t + 1)
    assert select_output(pair) is t and torch.equal(select_output(pair, "aux"), t + 1)
    assert torch.equal(select_output((t, t + 1), 1), t + 1)
    assert torch.equal(select_output({"a": t}, lambda out: out["a"] * 2), t * 2)


def test_no_logits_names_the_fields_and_the_fix():
    out = Fields(last_hidden_state=torch.randn(2, 3), pooler_output=torch.randn(2, 3), attentions=None)
    with pytest.raises(ValueError, match=r"Fields, not a tensor, and it has no 'logits' \(its fields: "
                                         r"last_hidden_state, pooler_output\); pass output="):
        select_output(out)
    with pytest.raises(ValueError, match=r"output='missing' gave a NoneType, not a tensor"):
        select_output(out, "missing")
    with pytest.raises(TypeError, match="output must be a field name"):
        select_output(out, 1.5)
    assert output_fields((1, 2)) == ["0", "1"] and output_fields(torch.zeros(1)) == []


def test_pullback_and_gradient_take_the_logits_of_a_mapping_output():
    torch.manual_seed(0)
    model = DictHead().eval()
    x = torch.randn(3, 6)
    plain = nn.Sequential(model.body, model.head).eval()
    assert rel_err(excitation.pullback(model, x, [0, 1, 2]), excitation.pullback(plain, x, [0, 1, 2])) < 1e-6
    assert rel_err(excitation.gradient(model, x, 1), excitation.gradient(plain, x, 1)) < 1e-6
    grid = excitation.pullbacks(model, x, [0, 3])
    assert rel_err(grid, excitation.pullbacks(plain, x, [0, 3])) < 1e-6
    by_field = excitation.pullback(model, x, lambda out: out.sum(1), output="hidden_states")
    assert rel_err(by_field, excitation.pullback(model.body, x, lambda out: out.sum(1))) < 1e-6


def test_a_mapping_without_logits_is_refused_with_its_fields():
    model = DictHead(with_logits=False).eval()
    with pytest.raises(ValueError, match=r"its fields: hidden_states"):
        excitation.pullback(model, torch.randn(2, 6), 0)
