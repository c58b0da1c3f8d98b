"""The timm zoo's zero-weight guard, its row checks and its table (tiny models only)."""

import argparse

import pytest
import torch
import torch.nn as nn

import excitation
from excitation import zoo_timm

from .helpers import vanilla_gradient


def _zero_head_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    nn.init.zeros_(model[2].weight)
    return model


def test_zero_head_makes_every_gradient_zero_and_the_guard_reinitialises_it():
    model = _zero_head_model()
    x = torch.randn(2, 5)
    assert not vanilla_gradient(model, x, 1).any()  # why the guard exists
    assert zoo_timm.reinit_zero_weights(model, seed=0) == ["2"]
    assert model[2].weight.abs().min() > 0 and vanilla_gradient(model, x, 1).any()
    assert zoo_timm.reinit_zero_weights(model, seed=0) == []  # nothing left to fix


def test_check_row_against_independent_numbers():
    model = _zero_head_model()
    x = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    row = zoo_timm.check_timm_model(model, x, module="toy", name="toy", repeats=1)
    assert row.reinit == ["2"] and row.path == "fx" and row.sites == {"relu": 1} and row.unhandled == {}
    assert row.forward_identical and row.finite
    target = int(model(x)[0].argmax())
    pb, g = excitation.pullback(model, x, target), vanilla_gradient(model, x, target)
    assert abs(row.rel_diff - float((pb - g).norm() / g.norm())) < 1e-6
    table = zoo_timm.format_timm_table([row, zoo_timm.TimmRow(module="m", model="n", size=0, error="not run: budget")])
    assert "| toy | toy | 5 |" in table and "re-init" in table and "| 2 |" in table
    assert "ran 1/2" in table and "not run: budget" in table


def test_smallest_per_module_by_name():
    chosen = zoo_timm.smallest_per_module(["convnext", "resnet", "vgg"], progress=False)
    assert chosen == {"convnext": "convnext_atto", "resnet": "resnet18", "vgg": "vgg11"}


def test_cli_registers_zoo_timm():
    from excitation.cli import build_parser

    args = build_parser().parse_args(["zoo-timm", "--modules", "vgg", "--size", "32", "--budget", "0"])
    assert args.func is zoo_timm.run and args.modules == ["vgg"] and args.size == 32
    assert isinstance(args, argparse.Namespace)


def test_a_model_that_breaks_at_the_requested_size_is_rebuilt_at_its_own(monkeypatch):
    # crossvit accepts img_size=64 and then fails in its forward (its two patch grids disagree):
    # the zoo must rebuild it at its configured size, not report a failure.
    class Picky(nn.Module):
        def __init__(self, img_size=None):
            super().__init__()
            self.img_size, self.pretrained_cfg = img_size, {"input_size": (3, 12, 12)}
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            if self.img_size is not None:
                raise RuntimeError("The size of tensor a (26) must match the size of tensor b (27)")
            return self.head(torch.relu(self.conv(x)).mean((2, 3)))

    class FakeTimm:
        @staticmethod
        def create_model(name, pretrained=False, **kwargs):
            return Picky(**kwargs)

    monkeypatch.setattr(zoo_timm, "_timm", lambda: FakeTimm)
    (row,) = zoo_timm.run_timm_zoo({"picky": ["picky_tiny"]}, size=64, progress=False)
    assert row.error == "" and row.size == 12 and row.finite and row.forward_identical


def test_zoo_source_timm_runs_the_timm_zoo_with_its_options(monkeypatch, capsys):
    from excitation.cli import main

    seen = {}
    monkeypatch.setattr(zoo_timm, "run", lambda args: seen.update(vars(args)) or 0)  # the real run is long
    assert main(["zoo", "--source", "timm", "--modules", "vgg", "resnet", "--size", "32", "--budget", "5",
                 "--out", "t.md", "--no-progress"]) == 0
    assert seen["modules"] == ["vgg", "resnet"] and seen["size"] == 32 and seen["budget"] == 5.0
    assert seen["repeats"] == 1 and seen["out"] == "t.md" and seen["no_progress"] and not seen["all"]
    seen.clear()
    assert main(["zoo", "--source", "timm", "--all", "--repeats", "2"]) == 0
    assert seen["all"] and seen["repeats"] == 2 and seen["modules"] is None
    # zoo-timm still works and takes the same options.
    seen.clear()
    assert main(["zoo-timm", "--modules", "vgg", "--all"]) == 0 and seen["modules"] == ["vgg"] and seen["all"]


def test_zoo_source_options_that_do_not_apply_are_refused(monkeypatch, capsys):
    from excitation import zoo as tv_zoo
    from excitation.cli import main

    monkeypatch.setattr(zoo_timm, "run", lambda args: 0)
    monkeypatch.setattr(tv_zoo, "run_zoo", lambda *a, **k: (_ for _ in ()).throw(AssertionError("must not run")))
    assert main(["zoo", "--modules", "vgg"]) == 2
    assert "--modules apply to the timm zoo only; add --source timm" in capsys.readouterr().err
    assert main(["zoo", "--all", "--budget", "3"]) == 2
    assert "--all --budget apply to the timm zoo only" in capsys.readouterr().err
    assert main(["zoo", "--source", "timm", "--models", "resnet18"]) == 2
    assert "with --source timm choose timm model modules with --modules" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["zoo", "--source", "caffe"])
    assert "invalid choice: 'caffe'" in capsys.readouterr().err
