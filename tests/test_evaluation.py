"""excitation.evaluation: Quantus wrappers against hand-computed values, the 0.6.0 defects, the bootstrap,
ROAD per image, the explainers, the CLI end to end on a generated image folder."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip("quantus")
pytest.importorskip("captum")

import excitation
from excitation.evaluation import (DEFAULT_METRICS, HIGHER_IS_BETTER, METRICS, Evaluation, bootstrap_mean, evaluate,
                                   make_explainer, mprt, paired_difference, run_metric)
from excitation.evaluation.metrics import numpy_trapz_shim, per_sample_normalise
from excitation.evaluation.road import road

from .helpers import rel_err

ROOT = Path(__file__).resolve().parents[1]


class Linear(nn.Module):
    """f(x) = W flatten(x) + b: every attribution quantity has a closed form."""

    def __init__(self, classes: int = 3, side: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.fc = nn.Linear(side * side, classes)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, side * side, generator=g))
            self.fc.bias.copy_(torch.randn(classes, generator=g))

    def forward(self, x):
        return self.fc(x.flatten(1))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))


def _data(n=4, side=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.8 * torch.rand(n, 1, side, side, generator=g)
    x[:, 0, 0, 0] = 0.0  # Quantus' "black" baseline is each image's minimum: make it 0
    return x, torch.arange(n) % 3


def input_x_gradient(model, x, target):
    return excitation.gradient(model, x, target) * x


# ------------------------------------------------------------------ metric wrappers vs closed forms
def test_infidelity_is_zero_for_the_gradient_of_a_linear_model_and_w_dot_x_squared_when_doubled():
    model, (x, y) = Linear(), _data()
    grad = make_explainer("gradient")
    a = grad(model, x, y)
    exact = run_metric("Infidelity", model, x, y, a, grad, classes=3, patch_sizes=[8])
    assert np.allclose(exact, 0.0, atol=1e-6)
    # One patch = the whole image, replaced by the black baseline b: loss = (2 w.(x-b) - w.(x-b))^2 = (w.(x-b))^2.
    doubled = run_metric("Infidelity", model, x, y, 2 * a, grad, classes=3, patch_sizes=[8])
    w = model.fc.weight.detach()[y]
    baseline = x.flatten(1).amin(1, keepdim=True)  # Quantus' "black" baseline: the image's minimum (0 here)
    hand = ((w * (x.flatten(1) - baseline)).sum(1) ** 2).numpy()
    np.testing.assert_allclose(doubled, hand, rtol=1e-4)


@pytest.mark.parametrize("name", ["FaithfulnessCorrelation", "FaithfulnessEstimate"])
def test_faithfulness_of_input_x_gradient_on_a_linear_model_is_one(name):
    # Removing a set S (to black, 0) drops the logit by sum_S w_i x_i = sum_S a_i: Pearson correlation 1.
    model, (x, y) = Linear(), _data()
    a = input_x_gradient(model, x, y)
    scores = run_metric(name, model, x, y, a, input_x_gradient, classes=3, runs=20, subset=8, step=4)
    np.testing.assert_allclose(scores, 1.0, atol=1e-5)
    # ... and a sign-flipped attribution is perfectly anti-faithful.
    flipped = run_metric(name, model, x, y, -a, input_x_gradient, classes=3, runs=20, subset=8, step=4)
    np.testing.assert_allclose(flipped, -1.0, atol=1e-5)


def test_monotonicity_correlation_of_input_x_gradient_on_a_linear_model_is_one():
    # Removing feature i (to black, 0) moves the logit by w_i x_i = a_i: the squared change (a_i^2, times a
    # per-image constant) is a monotone function of |a_i|, so the Spearman correlation is exactly 1.
    model, (x, y) = Linear(), _data()
    a = input_x_gradient(model, x, y)
    scores = run_metric("MonotonicityCorrelation", model, x, y, a, input_x_gradient, classes=3, samples=1, step=1,
                        baseline="black")
    np.testing.assert_allclose(scores, 1.0, atol=1e-6)


def test_max_sensitivity_is_zero_for_a_constant_explanation_and_matches_hand_for_input_x_gradient():
    model, (x, y) = Linear(), _data()
    grad = make_explainer("gradient")
    assert np.allclose(run_metric("MaxSensitivity", model, x, y, grad(model, x, y), grad, classes=3), 0.0)
    # For a = w * x, a(x+d) - a(x) = w * d, so the ratio ||w d|| / ||w x|| is below max|w| r sqrt(D) / ||w x||.
    s = run_metric("MaxSensitivity", model, x, y, input_x_gradient(model, x, y), input_x_gradient, classes=3,
                   radius=0.1)
    w = model.fc.weight.detach()[y]
    bound = (w.abs().amax(1) * 0.1 * 8 / (w * x.flatten(1)).norm(dim=1)).numpy()
    assert np.all(s > 0) and np.all(s <= bound + 1e-6)


def test_random_logit_with_two_classes_compares_with_the_other_class():
    model, (x, _) = Linear(classes=2), _data()
    y = torch.tensor([0, 1, 0, 1])
    grad = make_explainer("gradient")

    def l1(a, b, batched=False, **_):  # Quantus calls it on [N, D] rows
        return np.abs(a - b).sum(axis=-1)

    scores = run_metric("RandomLogit", model, x, y, grad(model, x, y), grad, classes=2, similarity=l1)
    w = model.fc.weight.detach().numpy()
    hand = []
    for t in y.tolist():
        mine, other = w[t] / np.abs(w[t]).max(), w[1 - t] / np.abs(w[1 - t]).max()
        hand.append(np.abs(mine - other).sum())
    np.testing.assert_allclose(scores, hand, rtol=1e-5)


def test_sparseness_is_the_gini_index_per_image():
    model, (x, y) = Tiny(), _data()
    explain = make_explainer("pullback")
    a = explain(model, x, y)
    scores = run_metric("Sparseness", model, x, y, a, explain, classes=3)
    hand = []
    for v in a.abs().flatten(1).double().numpy():
        v = np.sort(v)
        n = v.size
        hand.append(np.sum((2 * np.arange(1, n + 1) - n - 1) * v) / (n * v.sum()))
    np.testing.assert_allclose(scores, hand, rtol=1e-6)


# ------------------------------------------------------------------ Quantus 0.6.0 defects
def test_mprt_average_excludes_the_original_models_self_similarity():
    import quantus

    model, (x, y) = Tiny(), _data()
    explain = make_explainer("pullback")
    a = explain(model, x, y)
    result = mprt(model, x, y, a, explain)
    layers = [k for k in result.curve if k != "original"]
    assert list(result.curve)[0] == "original" and layers == ["fc", "conv"]  # top-down
    np.testing.assert_allclose(result.curve["original"], 1.0)
    np.testing.assert_allclose(result.average, np.mean([result.curve[k] for k in layers], axis=0))
    # Quantus' own average wrongly includes "original" (it skips the key "orig").
    from excitation.evaluation.metrics import as_quantus_explain_func

    theirs = quantus.MPRT(layer_order="top_down", seed=42, return_average_correlation=True, abs=True,
                          normalise_func=per_sample_normalise, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(),
        explain_func=as_quantus_explain_func(explain), softmax=False, device="cpu")
    np.testing.assert_allclose(theirs, np.mean([result.curve[k] for k in result.curve], axis=0), rtol=1e-6)
    assert not np.allclose(theirs, result.average)


def test_trapz_shim_restores_np_trapz_only_inside_and_only_when_missing():
    from quantus.helpers.utils import calculate_auc

    had = hasattr(np, "trapz")
    with numpy_trapz_shim():
        assert calculate_auc(np.array([0.0, 1.0, 2.0])) == pytest.approx(2.0)  # hand: 0.5 + 1.5
    assert hasattr(np, "trapz") == had


def test_normalisation_is_per_sample_not_over_the_batch():
    from quantus.functions.normalise_func import normalise_by_max

    a = np.stack([np.full((1, 2, 2), 1.0), np.full((1, 2, 2), -100.0)])
    a[0, 0, 0, 0] = 0.5
    ours = per_sample_normalise(a)
    np.testing.assert_allclose(ours[0], a[0] / 1.0)
    np.testing.assert_allclose(ours[1], a[1] / 100.0)
    assert np.abs(normalise_by_max(a)[0]).max() == pytest.approx(0.01)  # the defect: batch-wide max


def test_extras_depend_on_plain_quantus():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for group in ("eval", "dev"):
        deps = " ".join(extras[group])
        assert "quantus>=0.6" in deps and "quantus[" not in deps and "captum>=0.7" in deps


def test_mprt_curve_is_the_spearman_correlation_per_cascading_randomised_layer():
    # Independent reference: randomise the layers top-down, cumulatively, as Adebayo et al. (and Quantus:
    # reset_parameters() under the seed + 1), explain each copy, and rank-correlate |a| per image with scipy.
    from scipy.stats import spearmanr

    model, (x, y) = Tiny(), _data()
    explain = make_explainer("pullback")
    a = explain(model, x, y)
    result = mprt(model, x, y, a, explain, seed=42)
    randomised = copy.deepcopy(model)
    for layer in ("fc", "conv"):
        torch.manual_seed(43)
        getattr(randomised, layer).reset_parameters()
        b = explain(randomised, x, y)
        hand = [spearmanr(a[i].abs().flatten().numpy(), b[i].abs().flatten().numpy())[0] for i in range(len(x))]
        np.testing.assert_allclose(result.curve[layer], hand, rtol=1e-6, atol=1e-9)
    assert not np.allclose(result.curve["fc"], result.curve["conv"])  # each layer's own value, not one repeated
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), Tiny().parameters()))  # user model untouched


# ------------------------------------------------------------------ ROAD
def _zero_pixels(arr, indices):
    """A deterministic stand-in for the noisy linear imputation: removed pixels become 0 in every channel."""
    out = arr.reshape(arr.shape[0], -1).copy()
    out[:, indices] = 0.0
    return out.reshape(arr.shape)


def test_road_by_hand_on_a_linear_model_with_a_deterministic_imputation():
    model, (x, _) = Linear(), _data(n=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    a = input_x_gradient(model, x, y)
    percentages = [0, 25, 50, 100]
    scores = run_metric("ROAD", model, x, y, a, input_x_gradient, classes=3, percentages=percentages,
                        perturb_func=_zero_pixels)
    w, b = model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    hand_auc, curves = [], []
    for xi, ai, yi in zip(x.flatten(1).double().numpy(), a.flatten(1).double().numpy(), y.tolist()):
        ranked = sorted(range(64), key=lambda i: -ai[i])  # most relevant first
        curve = []
        for k in (0, 16, 32, 64):  # int(64 * p / 100)
            kept = xi.copy()
            kept[ranked[:k]] = 0.0
            curve.append(float(np.argmax(w @ kept + b) == yi))
        curves.append(curve)
        c0, c1, c2, c3 = curve  # trapezoids over the fractions 0, .25, .5, 1, divided by the span 1
        hand_auc.append(0.25 * (c0 + c1) / 2 + 0.25 * (c1 + c2) / 2 + 0.5 * (c2 + c3) / 2)
    np.testing.assert_allclose(scores, hand_auc)
    assert 0 < np.mean(curves) < 1 and len(set(hand_auc)) > 1  # the curves do break: the test can fail
    assert HIGHER_IS_BETTER["ROAD"] is False and "ROAD" in METRICS and "ROAD" in DEFAULT_METRICS


def test_quantus_road_keeps_only_the_first_batch_ours_keeps_every_image_and_handles_rgb():
    import quantus

    model, (x, _) = Tiny().eval(), _data(n=6)  # Quantus insists on eval mode
    with torch.no_grad():
        y = model(x).argmax(1)
    a = make_explainer("pullback")(model, x, y)
    percentages = [10, 30, 50, 70, 90]
    np.random.seed(0)
    with numpy_trapz_shim():
        theirs = quantus.ROAD(percentages=percentages, normalise_func=per_sample_normalise, disable_warnings=True)(
            model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), softmax=False, device="cpu",
            batch_size=3)
    ours = road(model, x, y, a, percentages=percentages, batch_size=3, seed=0)
    # Same imputation, same noise stream: Quantus' per-percentage accuracy is the mean of OUR first batch only.
    np.testing.assert_allclose(list(theirs.values()), ours.curves[:3].mean(0))
    assert not np.allclose(ours.curves[:3].mean(0), ours.curves.mean(0))  # the other batch differs
    assert ours.curves.shape == (6, 5)
    np.testing.assert_allclose(ours.auc, [np.trapezoid(c, [.1, .3, .5, .7, .9]) / 0.8 for c in ours.curves])
    # RGB: Quantus ranks C*H*W entries but imputes H*W pixels and fails; ours ranks pixels (channel sum).
    rgb = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 3)).eval()
    x3 = x.repeat(1, 3, 1, 1)
    with pytest.raises(IndexError):
        quantus.ROAD(percentages=percentages, disable_warnings=True)(
            model=rgb, x_batch=x3.numpy(), y_batch=y.numpy(), a_batch=x3.numpy(), softmax=False, device="cpu")
    assert road(rgb, x3, y, x3, percentages=percentages).curves.shape == (6, 5)
    with pytest.raises(ValueError, match="percentages must be increasing"):
        road(model, x, y, a, percentages=[50, 10])


def test_evaluate_records_the_road_curve_and_the_table_reads_lower_as_better(tmp_path):
    model, (x, _) = Linear(), _data(n=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    options = {"ROAD": {"percentages": [0, 25, 50, 100], "perturb_func": _zero_pixels}}
    result = evaluate(model, x, y, explainers={"ixg": input_x_gradient}, metrics=["ROAD"], progress=False,
                      metric_options=options)
    direct = road(model, x, y, input_x_gradient(model, x, y), **options["ROAD"])
    np.testing.assert_allclose(result.scores["ixg"]["ROAD"], direct.auc)
    assert result.road_curves["ixg"] == pytest.approx(dict(zip(["0", "25", "50", "100"], direct.curves.mean(0))))
    assert "ROAD curve" in result.table() and result.to_dict()["road_curves"] == result.road_curves
    assert result.figure(tmp_path / "road.png").stat().st_size > 1000  # bars and the curve panel draw
    # Direction: an explainer whose ROAD area is lower on every image is marked better (✓), higher worse (✗).
    base = np.linspace(0.5, 0.9, 20)
    made = Evaluation(scores={"low": {"ROAD": base - 0.2}, "high": {"ROAD": base + 0.1}, "gradient": {"ROAD": base}},
                      metrics=["ROAD"], explainers=["low", "high", "gradient"], n=20)
    rows = {line.split(" | ")[0]: line for line in made.table().splitlines() if line.startswith("| ")}
    assert "ROAD ↓" in rows["| explainer"] and rows["| low"].endswith("✓ |") and rows["| high"].endswith("✗ |")


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_matches_the_normal_theory_and_covers():
    rng = np.random.default_rng(0)
    v = rng.normal(0.5, 2.0, size=2000)
    i = bootstrap_mean(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(v.size)
    assert i.mean == pytest.approx(v.mean())
    assert (i.high - i.low) / 2 == pytest.approx(half, rel=0.1)
    assert i.low < 0.5 < i.high
    hits = 0
    for k in range(150):
        s = rng.normal(0.5, 2.0, 60)
        j = bootstrap_mean(s, resamples=500, seed=k)
        hits += j.low < 0.5 < j.high
    assert 0.88 <= hits / 150 <= 0.99  # nominal 0.95


def test_paired_difference_removes_the_shared_per_image_variance_and_drops_nans():
    rng = np.random.default_rng(1)
    shared = rng.normal(0, 10, 500)
    d = rng.normal(0.3, 0.5, 500)
    b, a = shared, shared + d
    a_nan = a.copy()
    a_nan[:3] = np.nan
    paired = paired_difference(a_nan, b)
    assert paired.n == 497 and paired.mean == pytest.approx(d[3:].mean())
    assert paired.high - paired.low < 0.2 < 2 * 1.96 * 10 * np.sqrt(2 / 500)  # unpaired width would be ~2.5
    assert paired.low < 0.3 < paired.high


# ------------------------------------------------------------------ explainers
def test_smooth_pullback_and_ascent_match_plain_loops_and_captum_leaves_the_model_alone():
    model, (x, y) = Tiny(), _data()
    smooth = make_explainer("smooth-pullback")(model, x, y)
    g = torch.Generator().manual_seed(0)
    spread = (x.amax((1, 2, 3), keepdim=True) - x.amin((1, 2, 3), keepdim=True))
    ref = sum(excitation.pullback(model, x + torch.randn(x.shape, generator=g) * 0.15 * spread, y)
              for _ in range(8)) / 8
    torch.testing.assert_close(smooth, ref)
    moved = excitation.ascend(model, x, y, steps=3, step_size=1.0, radius=5.0, pixel_range=(0.0, 1.0),
                              progress=False)
    torch.testing.assert_close(make_explainer("pullback-ascent")(model, x, y), moved - x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("guided-backprop", "integrated-gradients", "smoothgrad"):
        out = make_explainer(name)(model, x, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model._forward_hooks and not model._backward_hooks and not model.conv._forward_hooks


def test_evaluate_api_pairs_user_callables_with_the_gradient():
    model, (x, y) = Linear(), _data(n=6)
    model.train()  # evaluate must not switch the user's model to eval mode
    result = evaluate(model, x, y, explainers={"ixg": input_x_gradient}, metrics=["FaithfulnessCorrelation"],
                      progress=False, metric_options={"FaithfulnessCorrelation": {"runs": 10, "subset": 8}})
    assert result.explainers == ["ixg", "gradient"]
    np.testing.assert_allclose(result.scores["ixg"]["FaithfulnessCorrelation"], 1.0, atol=1e-5)
    d = result.versus_gradient("ixg", "FaithfulnessCorrelation")
    assert d.mean == pytest.approx(1.0 - np.mean(result.scores["gradient"]["FaithfulnessCorrelation"]))
    assert "ixg" in result.table() and result.seconds > 0
    assert model.training


# ------------------------------------------------------------------ CLI, folder path end to end
def test_cli_on_a_generated_image_folder_with_random_weights(tmp_path, capsys):
    from PIL import Image

    from excitation.cli import main

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{k}.png")
    out = tmp_path / "res" / "ev"
    rc = main(["evaluate", "--model", "resnet18", "--images", str(tmp_path / "imgs"), "--n", "3", "--size", "32",
               "--explainers", "pullback", "--metrics", "Sparseness", "--temp-sweep", "0.3", "--out", str(out),
               "--no-progress"])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 1000 and "Sparseness" in out.with_suffix(".md").read_text()
    assert data["n"] == 3 and data["explainers"] == ["pullback", "gradient"] and data["seconds"] > 0
    assert data["calibrated"] and data["sweep"][0]["temp"] == 0.3
    # Independent reference: the Gini index of the gradient of the same classifier on the same pixels.
    from excitation.images import ImageDataset, list_images
    from excitation.models import load_classifier

    loaded = load_classifier("resnet18", size=32)
    x = torch.stack([ImageDataset(list_images(tmp_path / "imgs"), loaded.preprocess)[i][0] for i in range(3)])
    model = loaded.pixel_model()
    # random weights: the CLI's model was built with its own random init, so compare structure, not values
    per_image = data["results"]["gradient"]["Sparseness"]["per_image"]
    assert len(per_image) == 3 and all(0 < v < 1 for v in per_image)
    assert x.shape == (3, 3, 32, 32) and model(x).shape == (3, 1000)


def test_cli_errors_are_one_line(capsys):
    from excitation.cli import main

    assert main(["evaluate", "--images", "somewhere"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--images needs --model" in err[0]


def test_demo_headline_evaluation_matches_a_direct_evaluate_call():
    from excitation.demo.digits import load_digits, load_model
    from excitation.demo.run import DemoResult, _headline_evaluation

    model = load_model("a")
    (_, _), (x, _) = load_digits()
    ev = _headline_evaluation(model, x[:4], 0, False)
    with torch.no_grad():
        target = model(x[:4]).argmax(1)
    direct = run_metric("Sparseness", model, x[:4], target, excitation.pullback(model, x[:4], target),
                        make_explainer("pullback"), classes=10)
    np.testing.assert_allclose(ev.scores["pullback"]["Sparseness"], direct)
    from excitation.demo.run import RADII

    filled = {(d, r): (1, 10) for d in ("pullback", "gradient") for r in RADII}
    text = DemoResult(accuracy={"a": 1.0, "b": 1.0}, baseline=(0, 10), transfer=filled, white_box=filled,
                      evaluation=ev).summary()
    assert ev.n == 4 and ev.metrics == ["FaithfulnessCorrelation", "MaxSensitivity", "Sparseness"]
    d = ev.versus_gradient("pullback", "Sparseness")
    assert "evaluation on 4 held-out images" in text and f"Δ {d.mean:+.3g} [{d.low:+.3g}, {d.high:+.3g}]" in text


def test_evidence_page_tables_are_the_committed_runs():
    readme = (ROOT / "docs" / "evidence.md").read_text()
    for name in ("digits", "digits_sweep", "digits_peers", "digits_road"):
        text = (ROOT / "docs" / "evidence" / f"{name}.md").read_text()
        table = text.split("# Evaluation\n\n", 1)[1].split("\n\n![metrics]", 1)[0]
        if name == "digits_sweep":
            table = table.split("mean per metric):\n\n", 1)[1]
        assert table.strip() in readme, name
    data = json.loads((ROOT / "docs" / "evidence" / "digits.json").read_text())
    assert data["n"] == 449 and (ROOT / "docs" / "evidence" / "digits.png").is_file()
    # The table's numbers are the per-image scores' means (recomputed here, not read from the table).
    gini = np.mean(data["results"]["gradient"]["Sparseness"]["per_image"])
    assert f"| gradient | {data['results']['gradient']['Infidelity']['mean']:.3g} [" in readme
    assert f"{gini:.3g} [" in readme
    road = json.loads((ROOT / "docs" / "evidence" / "digits_road.json").read_text())
    delta = paired_difference(road["results"]["pullback"]["ROAD"]["per_image"],
                              road["results"]["gradient"]["ROAD"]["per_image"])
    assert road["n"] == 449 and f"Δ {delta.mean:+.3g} [{delta.low:+.3g}, {delta.high:+.3g}] ✗" in readme


# ------------------------------------------------------------------ CAM, LRP and pullback-based Captum explainers

class _CamNet(nn.Module):
    """conv -> ReLU -> conv -> ReLU (the CAM block) -> mean -> linear; no pools, so the pullback is the gate alone."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(5, 4)
        self.cam_layer = "features"

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class _SoftReLU(torch.autograd.Function):
    """ReLU forward; backward grad * Phi(z / 0.6) (preset 'semantic'), clipped at zero when guided."""

    @staticmethod
    def forward(ctx, z, guided):
        ctx.save_for_backward(z)
        ctx.guided = guided
        return z.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        g = grad * torch.special.ndtr(z / 0.6)
        return (g.clamp_min(0) if ctx.guided else g), None


def _by_hand(net, x, guided):
    """The activations of the CAM block (kept for grad) and the logits, with soft (optionally guided) ReLUs."""
    f = net.features
    a = _SoftReLU.apply(f[2](_SoftReLU.apply(f[0](x), guided)), guided)
    return a, net.head(a.mean(dim=(2, 3)))


def _cam_from(a, out, y, size, mode):
    (da,) = torch.autograd.grad(out[torch.arange(len(y)), y].sum(), a, retain_graph=True)
    cam = torch.relu((da.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return torch.nn.functional.interpolate(cam, size=size, mode=mode)


def test_grad_cam_is_its_definition_and_one_channel():
    net, x, y = _CamNet().eval(), torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    got = make_explainer("grad-cam")(net, x, y)
    feats = {}
    handle = net.features.register_forward_hook(lambda m, i, o: feats.setdefault("a", o))
    out = net(x)
    handle.remove()
    want = _cam_from(feats["a"], out, y, (8, 8), "bilinear")
    assert got.shape == (2, 1, 8, 8)
    torch.testing.assert_close(got, want.detach())


def test_guided_pullback_cam_is_guided_pullback_times_pullback_grad_cam():
    net, x, y = _CamNet().eval(), torch.rand(2, 3, 8, 8), torch.tensor([0, 3])
    got = make_explainer("guided-pullback-cam")(net, x, y)
    a, out = _by_hand(net, x, guided=False)
    cam = _cam_from(a, out, y, (8, 8), "nearest")
    xg = x.clone().requires_grad_(True)
    _, out_g = _by_hand(net, xg, guided=True)
    (guided,) = torch.autograd.grad(out_g[torch.arange(2), y].sum(), xg)
    torch.testing.assert_close(got, (guided * cam).detach(), rtol=1e-5, atol=1e-8)
    # The unguided product would differ: the clip matters.
    xs = x.clone().requires_grad_(True)
    _, out_s = _by_hand(net, xs, guided=False)
    (soft,) = torch.autograd.grad(out_s[torch.arange(2), y].sum(), xs)
    assert not torch.allclose(got, (soft * cam).detach(), atol=1e-7)


def test_integrated_pullback_is_captum_ig_on_the_excited_model():
    from captum.attr import IntegratedGradients

    net, x, y = _CamNet().eval(), torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    got = make_explainer("integrated-pullback")(net, x, y)
    ig = IntegratedGradients(excitation.excite(net, preset="semantic"))
    want = ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_guided_grad_cam_is_captums_and_lrp_conserves_on_a_bias_free_mlp():
    from captum.attr import GuidedGradCam

    net, x, y = _CamNet().eval(), torch.rand(2, 3, 8, 8), torch.tensor([1, 2])
    work = copy.deepcopy(net)
    want = GuidedGradCam(work, work.features).attribute(x.clone().requires_grad_(True), target=y)
    torch.testing.assert_close(make_explainer("guided-grad-cam")(net, x, y), want.detach())
    pytest.importorskip("zennit")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(12, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False)).eval()
    xs = torch.rand(4, 3, 2, 2)
    ys = mlp(xs).argmax(1)
    relevance = make_explainer("lrp")(mlp, xs, ys)
    assert relevance.shape == xs.shape
    # Flat rule first, epsilon rule on the dense layer: the relevance sums to the logit.
    torch.testing.assert_close(relevance.sum(dim=(1, 2, 3)), mlp(xs)[torch.arange(4), ys].detach(), rtol=1e-4, atol=1e-6)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.mark.parametrize("name", ["grad-cam", "guided-grad-cam", "lrp", "integrated-pullback", "guided-pullback-cam"])
def test_new_explainers_leave_the_model_unchanged(name):
    if name == "lrp":
        pytest.importorskip("zennit")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
    state = copy.deepcopy(net.state_dict())
    structure = repr(net)
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 2])
    out = make_explainer(name)(net, x, y)
    assert out.shape[0] == 2 and out.shape[-2:] == (8, 8) and torch.isfinite(out).all()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert repr(net) == structure and net[2].inplace and _hooks(net) == 0 and not net.training


def test_cam_layer_errors_name_the_fix():
    from excitation.evaluation.explainers import cam_layer_name

    net = _CamNet()
    net.cam_layer = "featurez"
    with pytest.raises(ValueError, match="names no submodule"):
        cam_layer_name(net)
    with pytest.raises(ValueError, match="cam_layer"):
        cam_layer_name(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
    assert cam_layer_name(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.Conv2d(1, 1, 1))) == "2"


# ------------------------------------------------------------------ --dataset scenes end to end
def test_cli_dataset_scenes_scores_the_committed_model_against_its_masks(tmp_path):
    from excitation.cli import main
    from excitation.evaluation.localisation import pointing_game
    from excitation.evaluation.scenes import HELD_OUT_SEED, scene_targets
    from excitation.scenes import load_model, make_scenes

    out = tmp_path / "scenes"
    rc = main(["evaluate", "--dataset", "scenes", "--model", "resnet", "--n", "16", "--faithfulness-n", "0",
               "--focus-n", "4", "--explainers", "pullback", "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    targets = scene_targets(make_scenes(16, HELD_OUT_SEED))
    loc = data["localisation"]["resnet"]
    assert data["n_scenes"] == 16 and loc["n"] == len(targets) > 16 and loc["explainers"] == ["pullback", "gradient"]
    # Independent reference: the pointing game of the gradient, computed here from the masks.
    model = load_model("resnet")
    expected = pointing_game(excitation.gradient(model, targets.x, targets.target), targets.mask)
    assert np.allclose(loc["results"]["gradient"]["PointingGame"]["per_image"], expected)
    assert len(data["focus"]["resnet"]["gradient"]) == 4
    assert (tmp_path / "scenes_scenes.png").stat().st_size > 10_000
    assert "TargetSpecificity" in out.with_suffix(".md").read_text()


def test_cli_dataset_scenes_refuses_options_that_do_not_apply(capsys):
    from excitation.cli import main

    assert main(["evaluate", "--dataset", "scenes", "--images", "somewhere"]) == 2
    assert "--images do not apply" in capsys.readouterr().err
    assert main(["evaluate", "--metrics", "PointingGame"]) == 2
    assert "need ground-truth masks" in capsys.readouterr().err


def test_scene_summary_cells_are_the_means_and_paired_differences():
    from excitation.evaluation.run import Evaluation
    from excitation.evaluation.scenes import SceneReport

    scores = {"pullback": {"PointingGame": np.array([1.0, 1.0, 0.0, 1.0]),
                           "TargetSpecificity": np.array([0.5, np.nan, 0.3, np.nan])},
              "gradient": {"PointingGame": np.array([0.0, 1.0, 0.0, 0.0]),
                           "TargetSpecificity": np.array([0.1, np.nan, 0.1, np.nan])}}
    ev = Evaluation(scores=scores, metrics=["PointingGame", "TargetSpecificity"], explainers=["pullback", "gradient"], n=4)
    report = SceneReport(localisation={"m": ev}, focus={"m": {"pullback": np.array([0.9, 0.7]),
                                                              "gradient": np.array([0.5, 0.5])}},
                         accuracy={"m": {"mAP": 0.97, "exact": 0.91}}, n_scenes=3)
    text = report.summary()
    pullback_row = next(line for line in text.splitlines() if line.startswith("| pullback |"))
    cells = [cell.strip() for cell in pullback_row.strip("|").split("|")][1:]
    # PointingGame 3/4 vs 1/4; TargetSpecificity over the two finite pairs: 0.4 vs 0.1; Focus 0.8 vs 0.5.
    assert cells[0].startswith("0.750 (+0.500 [")
    assert cells[1].startswith("0.400 (+0.300 [")
    assert cells[2].startswith("0.800 (+0.300 [")
    assert "| gradient | 0.250 | 0.100 | 0.500 |" in text
    assert "exact match 91.0%" in text and "Focus on 2 mosaics" in text
    assert text in report.table()


def test_evaluate_takes_the_dynamo_path_for_a_model_fx_cannot_trace():
    """timm's ConViT fails symbolic_trace; evaluate's pullback is then the dynamo path's, as pullback's is."""
    from excitation.evaluation.localisation import pointing_game
    from tests.extract_tiny import convit

    model = convit()
    with pytest.raises(excitation.ExcitationTraceError):
        excitation.excite(model)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(4, 3, 32, 32, generator=gen)
    target = torch.tensor([0, 1, 2, 3])
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 8:20, 4:24] = True
    ev = evaluate(model, x, target, explainers=["pullback"], metrics=["PointingGame"], masks=masks, progress=False)
    assert excitation.api.path_of(excitation.prepare(model)) == "dynamo"
    pullback = excitation.pullback(model, x, target)
    assert rel_err(pullback, excitation.gradient(model, x, target)) > 1e-3  # neither zero nor vanilla
    expected = pointing_game(pullback, masks)
    assert np.allclose(ev.scores["pullback"]["PointingGame"], expected)
