"""The `excitation` command: demo, explain, errors."""

import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from excitation.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    from excitation.demo.run import run_demo

    return out, run_demo(out, progress=False)


def test_demo_numbers_and_figures(demo_run):
    out, result = demo_run
    assert result.accuracy["a"] > 0.95 and result.accuracy["b"] > 0.95
    assert (out / "pullback_grid.png").stat().st_size > 10_000
    assert (out / "accentuation_grid.png").stat().st_size > 10_000
    for (direction, radius), (hits, trials) in result.transfer.items():
        assert trials == result.baseline[1] > 1000 and 0 <= hits <= trials
        white_hits, _ = result.white_box[(direction, radius)]
        assert white_hits / trials > 0.5  # the ascent works on the model it follows
    rate, low, high = result.rate("pullback")
    assert low <= rate <= high
    assert "transfer test" in result.summary()


def test_wilson_interval_known_values():
    from excitation.demo.run import wilson_interval

    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3
    assert wilson_interval(0, 10)[0] == 0.0


def test_demo_command_prints_summary(tmp_path, capsys, monkeypatch):
    from excitation.demo import run as demo_module

    class Stub:
        def summary(self):
            return "SUMMARY"

    monkeypatch.setattr(demo_module, "run_demo", lambda out, progress, seed: Stub())
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == "SUMMARY"


@pytest.fixture(scope="module")
def local_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), folder / "resnet18.pt")
    paths = []
    for i in range(2):
        image = Image.fromarray((torch.rand(80, 100, 3) * 255).byte().numpy())
        image.save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return folder, paths


def test_explain_with_local_weights_writes_both_grids(local_weights):
    folder, images = local_weights
    out = folder / "fig.png"
    code = main(["explain", "--model", "resnet18", "--weights-file", str(folder / "resnet18.pt"), "--images", *images,
                 "--targets", "0", "482", "--extra", "9", "--out", str(out), "--steps", "2", "--radius", "5", "--step-size", "2"])
    assert code == 0
    assert out.stat().st_size > 10_000 and (folder / "fig_accentuation.png").stat().st_size > 10_000


@pytest.mark.parametrize("view", ["heatmap", "overlay", "rgb"])
def test_explain_figures_are_the_apis_figures(local_weights, tmp_path, view):
    """Both figures the command writes, pixel for pixel what the API draws from the same pullbacks."""
    from excitation import ascend, pullbacks
    from excitation.figures import accentuation_grid, pullback_grid
    from excitation.images import load_image
    from excitation.models import load_classifier

    folder, images = local_weights
    weights = str(folder / "resnet18.pt")
    out = tmp_path / "cli.png"
    code = main(["explain", "--model", "resnet18", "--weights-file", weights, "--images", images[0], "--targets", "0",
                 "7", "--out", str(out), "--steps", "1", "--radius", "5", "--step-size", "2", "--view", view])
    assert code == 0
    loaded = load_classifier("resnet18", weights_file=weights)
    model = loaded.pixel_model("cpu")
    x = torch.stack([load_image(images[0], loaded.preprocess)])
    rows, columns = [Path(images[0]).stem], ["class 0", "class 7"]
    api = pullback_grid(x, pullbacks(model, x, [0, 7]), rows, columns, tmp_path / "api.png",
                        title="resnet18: excitation pullbacks", view=view)
    common = dict(steps=1, step_size=2.0, radius=5.0, progress=False)
    wanted, repeated = torch.tensor([0, 7]), x.repeat_interleave(2, 0)
    by_pb = ascend(model, repeated, wanted, direction="pullback", **common).view(1, 2, *x.shape[1:])
    by_gr = ascend(model, repeated, wanted, direction="gradient", **common).view(1, 2, *x.shape[1:])
    api_acc = accentuation_grid(x, by_pb, by_gr, rows, columns, tmp_path / "api_acc.png",
                                title="resnet18: accentuation, pullback vs gradient", view=view)
    for cli_path, api_path in ((out, api), (tmp_path / "cli_accentuation.png", api_acc)):
        with Image.open(cli_path) as a, Image.open(api_path) as b:
            assert a.size == b.size
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{cli_path.name} differs from the API's figure"


def test_explain_weights_names_come_from_metadata(local_weights, monkeypatch):
    folder, images = local_weights
    # No download here: the weights enum must still provide class names and transforms.
    code = main(["explain", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--weights-file", str(folder / "resnet18.pt"),
                 "--images", images[0], "--targets", "0", "--out", str(folder / "named.png"), "--steps", "0"])
    assert code == 0 and (folder / "named.png").exists()


def test_explain_download_failure_is_one_clear_line(local_weights, monkeypatch, capsys):
    folder, images = local_weights

    def offline(self, *args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    code = main(["explain", "--model", "resnet18", "--weights", "IMAGENET1K_V1", "--images", images[0], "--targets", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "could not load resnet18 weights IMAGENET1K_V1" in err[0] and "--weights-file" in err[0]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["explain", "--model", "resnet18", "--weights", "NOPE", "--images", "x.png", "--targets", "0"], "not a weight set"),
        (["explain", "--model", "resnet18", "--images", "x.png", "--targets", "0"], "pass --weights"),
        (["explain", "--model", "resnet18", "--weights-file", "missing.pt", "--images", "x.png", "--targets", "0"], "does not exist"),
        (["app", "--model", "resnet18", "--weights-file", "missing.pt"], "does not exist"),
        (["app", "--weights-file", "w.pt"], "needs --model"),
    ],
)
def test_cli_errors_are_one_line(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("excitation: error:") and match in err[0]


def test_explain_target_out_of_range(local_weights, capsys):
    folder, images = local_weights
    code = main(["explain", "--model", "resnet18", "--weights-file", str(folder / "resnet18.pt"), "--images", images[0],
                 "--targets", "1000", "--steps", "0", "--out", str(folder / "x.png")])
    assert code == 2 and "out of range for 1000 classes" in capsys.readouterr().err


def test_console_script_help():
    done = subprocess.run([sys.executable, "-m", "excitation.cli", "explain", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--weights-file" in done.stdout


def test_bench_command_prints_a_table(capsys, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "resnet18", "--batch", "1", "--size", "32", "--repeats", "2", "--warmup", "1",
                 "--no-peers", "--no-progress", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "| excitation (ours) |" in text and "| vanilla gradient |" in text
    import json

    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["excitation (ours)"]["equals_ours"] is True
    assert rows["vanilla gradient"]["equals_ours"] is False and rows["vanilla gradient"]["ratio"] == 1.0
    assert rows["paper-style: nn.ReLU -> autograd.Function"]["ms_median"] > 0


def test_bench_rejects_unknown_model(capsys):
    assert main(["bench", "--model", "not_a_model", "--no-progress"]) == 2
    assert "not a torchvision classification model" in capsys.readouterr().err


def test_zoo_command_writes_table_and_json(capsys, tmp_path):
    import json

    out, js = tmp_path / "zoo.md", tmp_path / "zoo.json"
    code = main(["zoo", "--models", "squeezenet1_1", "--repeats", "1", "--no-progress", "--out", str(out),
                 "--json", str(js)])
    text = capsys.readouterr().out
    assert code == 0 and "| squeezenet1_1 | 64 |" in text and "traced 1/1" in text
    assert "| squeezenet1_1 |" in out.read_text()
    row = json.loads(js.read_text())[0]
    assert row["model"] == "squeezenet1_1" and row["forward_identical"] and row["sites"] == {"relu": 26, "max_pool2d": 3}


def test_zoo_rejects_unknown_model(capsys):
    assert main(["zoo", "--models", "resnet5", "--no-progress"]) == 2
    assert "not torchvision classification models: ['resnet5']" in capsys.readouterr().err
