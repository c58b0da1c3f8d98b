"""excitation.evaluation.focus: mosaics, a hand-computed score, Quantus' Focus, the author's numbers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from excitation.evaluation import focus as F

quantus = pytest.importorskip("quantus")


def _images(per_class: int = 3, classes: int = 4, side: int = 4):
    """Image i is filled with the value i, so every quadrant can be traced back to its source."""
    n = per_class * classes
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, side, side).clone()
    labels = torch.arange(classes).repeat_interleave(per_class)
    return images, labels


def test_mosaics_put_the_target_in_exactly_two_quadrants():
    images, labels = _images()
    m = F.make_mosaics(images, labels, n=20, seed=1)
    assert m.images.shape == (20, 3, 8, 8) and m.targets.shape == (20,) and m.positions.shape == (20, 4)
    np.testing.assert_array_equal(m.positions.sum(axis=1), 2)
    for i in range(20):
        quadrants = [m.images[i, 0, r:r + 4, c:c + 4] for r, c in ((0, 0), (0, 4), (4, 0), (4, 4))]
        for q, tile in enumerate(quadrants):
            assert torch.all(tile == m.sources[i, q])                      # the tile is its source image
            is_target = int(labels[m.sources[i, q]]) == int(m.targets[i])
            assert is_target == bool(m.positions[i, q])
        target_sources = m.sources[i][m.positions[i] == 1]
        assert target_sources[0] != target_sources[1]                      # two different target images
    again = F.make_mosaics(images, labels, n=20, seed=1)
    assert torch.equal(again.images, m.images)


def test_mosaics_from_multi_hot_labels_skip_multi_object_images():
    images, labels = _images()
    hot = torch.nn.functional.one_hot(labels, 4)
    hot[0, 1] = 1                                                         # image 0 holds two objects
    m = F.make_mosaics(images, hot, n=30, seed=0)
    assert 0 not in m.sources
    with pytest.raises(ValueError, match="at least two classes"):
        F.make_mosaics(images[:3], labels[:3], n=1)


def test_focus_hand_computed():
    a = np.zeros((1, 2, 4, 4))
    a[0, 0, :2, :2] = 3.0        # top-left: 3 per pixel, 4 pixels -> 12
    a[0, 1, :2, 2:] = -1.0       # top-right: negative only, 0 energy
    a[0, 0, 2:, :2] = 1.0        # bottom-left: 4
    a[0, 0, 2:, 2:] = 2.0        # bottom-right: 8 ...
    a[0, 1, 2:, 2:] = -1.0       # ... minus 1 on the other channel: 4
    assert F.focus_scores(a, np.array([[1, 1, 0, 0]]))[0] == pytest.approx(12 / 20)
    assert F.focus_scores(a, np.array([[0, 0, 1, 1]]))[0] == pytest.approx(8 / 20)
    assert F.focus_scores(-np.abs(a), np.array([[1, 0, 0, 1]]))[0] == 0.0


def test_focus_equals_quantus_focus_on_one_channel_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 1, 8, 8)).astype(np.float32)
    positions = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 0, 1], [0, 1, 1, 0]])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64, 4)).eval()
    x = rng.random((6, 3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.Focus(abs=False, normalise=False, disable_warnings=True, display_progressbar=False)(
            model=model, x_batch=x, y_batch=np.zeros(6, int), a_batch=a, custom_batch=positions,
            channel_first=True, device="cpu")
    np.testing.assert_allclose(np.asarray(theirs, float), F.focus_scores(a, positions), rtol=1e-6)


def test_focus_runs_the_explainer_and_can_weight_by_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 3)).eval()
    images, labels = _images(per_class=2, classes=3)
    m = F.make_mosaics(images / 12, labels, n=5, seed=0)
    from excitation.evaluation.explainers import make_explainer

    explain = make_explainer("gradient")
    a = explain(model, m.images, m.targets)
    np.testing.assert_allclose(F.focus(model, explain, m.images, m.targets, m.positions, batch_size=2),
                               F.focus_scores(a, m.positions))
    np.testing.assert_allclose(F.focus(model, explain, m.images, m.targets, m.positions, times_input=True),
                               F.focus_scores(a * m.images, m.positions))


def test_author_numbers_are_labelled_as_his():
    assert F.AUTHOR_FOCUS_RESNET50 == {"guided-grad-cam": 0.849, "pullback-semantic": 0.748, "gradient": 0.634}
    assert "author" in F.AUTHOR_FOCUS_SETTING and "input x attribution" in F.AUTHOR_FOCUS_SETTING


def test_quantus_focus_clips_each_channel_where_ours_clips_the_channel_sum():
    a = np.zeros((1, 3, 4, 4), np.float32)
    a[0, 0, :2, :2] = 2.0                   # target quadrant (top-left): +2 and -2 cancel in the channel sum
    a[0, 1, :2, :2] = -2.0
    a[0, 0, 2:, 2:] = 1.0                   # bottom-right: +1
    positions = np.array([[1, 0, 0, 0]])
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16, 2)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.Focus(abs=False, normalise=False, disable_warnings=True, display_progressbar=False)(
            model=model, x_batch=np.ones((1, 3, 4, 4), np.float32), y_batch=np.zeros(1, int), a_batch=a,
            custom_batch=positions, channel_first=True, device="cpu")
    assert float(theirs[0]) == pytest.approx(8 / 12)     # 4 px x 2 inside, 4 px x 1 outside
    assert F.focus_scores(a, positions)[0] == 0.0        # the map is 0 inside, +1 outside
