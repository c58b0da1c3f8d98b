"""excitation.evaluation.localisation: hand-computed values, Quantus 0.6.0 where it is right, its defects where not."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from excitation.evaluation import localisation as L

quantus = pytest.importorskip("quantus")

H = W = 8
N = 5


# ------------------------------------------------------------------ hand-computed tiny cases (4 x 4)

def _tiny():
    """One 4x4 map and a 2x2 mask in its top-left corner."""
    m = np.array([[4., 1., 0., -2.],
                  [2., -1., 0., 0.],
                  [0., 0., 3., 0.],
                  [-1., 0., 0., 1.]])
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    return m[None, None], mask[None]


def test_reduce_channels_is_the_channel_sum():
    a = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    np.testing.assert_array_equal(L.reduce_channels(a), a.sum(axis=1))
    np.testing.assert_array_equal(L.reduce_channels(torch.as_tensor(a)), a.sum(axis=1))
    one = a[:, :1]
    np.testing.assert_array_equal(L.reduce_channels(one), one[:, 0])
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        L.reduce_channels(a[0, 0, 0])


def test_hand_computed_tiny_case():
    a, mask = _tiny()
    # The maximum 4 is at (0, 0), inside.
    assert L.pointing_game(a, mask)[0] == 1.0
    # Positive energy: 4+1+2+3+1 = 11; inside: 4+1+2 = 7.
    assert L.energy_pointing_game(a, mask)[0] == pytest.approx(7 / 11)
    assert L.relevance_mass_accuracy(a, mask)[0] == pytest.approx(7 / 11)
    # K = 4; the top 4 values are 4, 3, 2, 1, 1 -> 4, 3, 2 and one of the two 1s (one inside, one outside):
    # inside 4, 2 and half a pixel -> 2.5 / 4.
    assert L.relevance_rank_accuracy(a, mask)[0] == pytest.approx(2.5 / 4)
    # AUC: positives {4, 1, 2, -1}, negatives the other 12 values {0 x 8, -2, 3, -1, 1}.
    pos, neg = [4, 1, 2, -1], [0] * 8 + [-2, 3, -1, 1]
    u = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    assert L.mask_auc(a, mask)[0] == pytest.approx(u / 48)
    # The energy box of a 2x2 mask is the mask itself.
    assert L.energy_pointing_game(a, mask, box=True)[0] == pytest.approx(7 / 11)


def test_target_specificity_hand_computed():
    a, mask = _tiny()
    other = np.zeros_like(mask)
    other[0, 2:, 2:] = True                       # holds 3 + 1 = 4 of the 11
    assert L.target_specificity(a, mask, other)[0] == pytest.approx(7 / 11 - 4 / 11)
    assert np.isnan(L.target_specificity(a, mask, np.zeros_like(mask))[0])


def test_pointing_game_tolerance_and_ties():
    m = np.zeros((1, 1, 8, 8))
    m[0, 0, 0, 0] = 1.0
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 3:, 3:] = True                         # nearest mask pixel (3, 3): distance sqrt(18) = 4.24
    assert L.pointing_game(m, mask)[0] == 0.0
    assert L.pointing_game(m, mask, tolerance=4)[0] == 0.0
    assert L.pointing_game(m, mask, tolerance=4.25)[0] == 1.0
    assert L.POINTING_TOLERANCE_64 == int(15 * 64 / 224)
    # A constant map scores the chance level: 25 of 64 tied maxima hit.
    assert L.pointing_game(np.ones((1, 1, 8, 8)), mask)[0] == pytest.approx(25 / 64)


def test_ties_score_the_chance_level():
    flat = np.full((1, 1, 4, 4), 2.0)
    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0] = True
    assert L.relevance_rank_accuracy(flat, mask)[0] == pytest.approx(4 / 16)
    assert L.mask_auc(flat, mask)[0] == pytest.approx(0.5)
    assert L.energy_pointing_game(flat, mask)[0] == pytest.approx(4 / 16)


def test_empty_masks_give_nan_and_are_counted():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 3, 4, 4))
    masks = np.zeros((3, 4, 4), bool)
    masks[0, :2] = True
    masks[2, 1:3, 1:3] = True
    for name in L.LOCALISATION_METRICS:
        scores = L.localisation_scores(name, a, masks, other_masks=masks[[2, 2, 0]])
        assert np.isnan(scores[1]), name
        report = L.summarise_scores(scores)
        assert report["excluded"] >= 1 and report["n"] + report["excluded"] == 3, name
    # A full mask leaves the AUC without negatives.
    assert np.isnan(L.mask_auc(a[:1], np.ones((1, 4, 4), bool))[0])
    assert L.summarise_scores(np.array([np.nan, 1.0, 0.0])) == {"mean": 0.5, "n": 2, "excluded": 1}


def test_missing_masks_raise_naming_the_metrics():
    a = np.ones((1, 3, 4, 4))
    with pytest.raises(ValueError, match="PointingGame.*needs ground-truth masks.*RelevanceMassAccuracy"):
        L.localisation_scores("PointingGame", a)
    with pytest.raises(ValueError, match="other_masks"):
        L.localisation_scores("TargetSpecificity", a, np.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match="unknown localisation metric"):
        L.localisation_scores("Pointing", a, np.ones((1, 4, 4), bool))
    with pytest.raises(ValueError, match=r"masks\[range\(N\), target\]"):
        L.pointing_game(a, np.ones((1, 10, 4, 4), bool))
    assert set(L.HIGHER_IS_BETTER) == set(L.LOCALISATION_METRICS) and all(L.HIGHER_IS_BETTER.values())


# ------------------------------------------------------------------ Quantus 0.6.0 cross-checks

@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * H * W, 4)).eval()
    x = rng.random((N, 3, H, W)).astype(np.float32)
    y = np.arange(N) % 4
    a = rng.normal(size=(N, 1, H, W)).astype(np.float32)     # continuous: no ties
    s = np.zeros((N, 1, H, W), np.float32)
    for i in range(N):
        s[i, 0, i:i + 3, 1:5] = 1                            # 12 pixels each
    return model, x, y, a, s


def _q(metric, batch, a=None, s=None):
    model, x, y, a0, s0 = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=model, x_batch=x, y_batch=y, a_batch=a0 if a is None else a, s_batch=s0 if s is None else s,
                     channel_first=True, device="cpu")
    return np.asarray(out, dtype=np.float64)


COMMON = dict(normalise=False, disable_warnings=True, display_progressbar=False)


def test_quantus_agrees_where_it_is_right(batch):
    _, _, _, a, s = batch
    np.testing.assert_array_equal(_q(quantus.PointingGame(**COMMON), batch), L.pointing_game(a, s))
    np.testing.assert_allclose(_q(quantus.AttributionLocalisation(abs=False, positive_attributions=True, **COMMON),
                                  batch), L.energy_pointing_game(a, s), rtol=1e-6)
    np.testing.assert_allclose(_q(quantus.RelevanceRankAccuracy(**COMMON), batch), L.relevance_rank_accuracy(a, s))
    np.testing.assert_allclose(_q(quantus.TopKIntersection(k=12, **COMMON), batch), L.relevance_rank_accuracy(a, s))
    np.testing.assert_allclose(_q(quantus.AUC(**COMMON), batch), L.mask_auc(a, s), rtol=1e-12)
    # On non-negative maps signed and positive relevance coincide.
    np.testing.assert_allclose(_q(quantus.RelevanceMassAccuracy(**COMMON), batch, a=np.abs(a)),
                               L.relevance_mass_accuracy(np.abs(a), s), rtol=1e-6)
    # Normalising by the batch maximum divides by one positive number: no score changes.
    np.testing.assert_allclose(_q(quantus.AUC(normalise=True, disable_warnings=True), batch), L.mask_auc(a, s))


def test_quantus_pointing_game_scores_an_empty_mask_as_a_hit(batch):
    _, _, _, a, s = batch
    empty = s.copy()
    empty[0] = 0
    theirs = _q(quantus.PointingGame(**COMMON), batch, s=empty)
    ours = L.pointing_game(a, empty)
    assert theirs[0] == 1.0 and np.isnan(ours[0])        # NaN stored in a bool array reads True
    np.testing.assert_array_equal(theirs[1:], ours[1:])


def test_quantus_pointing_game_and_rank_accuracy_break_ties_by_index(batch):
    _, _, _, a, s = batch
    flat = np.full_like(a, 2.0)
    flat[-1] = a[-1]                                     # Quantus refuses a batch of constant maps
    top = np.zeros_like(s)
    top[:, 0, 0, :] = 1                                  # the first 12 pixels in raster order
    top[:, 0, 1, :4] = 1
    theirs_pg = _q(quantus.PointingGame(**COMMON), batch, a=flat, s=top)
    theirs_rra = _q(quantus.RelevanceRankAccuracy(**COMMON), batch, a=flat, s=top)
    # Any tied maximum in the mask is a hit; argsort puts the first pixels first.
    np.testing.assert_array_equal(theirs_pg[:-1], 1.0)
    np.testing.assert_array_equal(theirs_rra[:-1], 1.0)
    # Ours: the chance level, 12 of 64 pixels.
    np.testing.assert_allclose(L.pointing_game(flat, top)[:-1], 12 / 64)
    np.testing.assert_allclose(L.relevance_rank_accuracy(flat, top)[:-1], 12 / 64)


def test_quantus_relevance_mass_accuracy_uses_signed_relevance(batch):
    _, _, _, a, s = batch
    theirs = _q(quantus.RelevanceMassAccuracy(**COMMON), batch)
    ours = L.relevance_mass_accuracy(a, s)
    flat, region = a.reshape(N, -1).astype(np.float64), s.reshape(N, -1).astype(bool)
    np.testing.assert_allclose(theirs, (flat * region).sum(1) / flat.sum(1), rtol=1e-5)
    assert np.all((ours >= 0) & (ours <= 1))
    assert np.any((theirs < 0) | (theirs > 1))          # outside [0, 1] on these signed maps


def test_quantus_weighted_attribution_localisation_divides_by_the_wrong_size(batch):
    _, x, _, a, s = batch
    theirs = _q(quantus.AttributionLocalisation(abs=False, positive_attributions=True, weighted=True, **COMMON), batch)
    share = L.energy_pointing_game(a, s)
    right = share * 12 / (H * W)                         # mask size over one image's pixels
    wrong = share * 12 / x[2:].size                      # Quantus: the images from the third on, all channels
    np.testing.assert_allclose(theirs, wrong, rtol=1e-5)
    assert not np.allclose(theirs, right)


def test_quantus_default_attribution_localisation_counts_negative_relevance(batch):
    _, _, _, a, s = batch
    theirs = _q(quantus.AttributionLocalisation(**COMMON), batch)           # abs=True by default
    np.testing.assert_allclose(theirs, L.energy_pointing_game(np.abs(a), s), rtol=1e-6)
    assert not np.allclose(theirs, L.energy_pointing_game(a, s))
