"""excitation.scenes' generator: determinism, exact masks, balance, input checks."""

import hashlib
import math
import socket

import numpy as np
import pytest
import torch

from excitation.scenes import CLASSES, Scenes, make_labels, make_scenes
from excitation.scenes.backgrounds import PHOTOS, photos
from excitation.scenes.generate import MIN_VISIBLE, render_scene, scene_spec
from excitation.scenes.shapes import _POLYGONS, ObjectSpec, object_mask

# SHA-256 of make_scenes(8, seed=0): images as uint8 bytes, then labels, then masks.
# A change here means scenes are no longer byte-identical to the committed models' data.
DIGEST_8_SEED_0 = "22fff0b352d5e8eb988e15adee450cc7cfc111ebf752d6ef4c7eb0bd63c2e19e"


def _digest(scenes: Scenes) -> str:
    h = hashlib.sha256()
    h.update((scenes.images * 255).round().to(torch.uint8).numpy().tobytes())
    h.update(scenes.labels.numpy().tobytes())
    h.update(scenes.masks.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def scenes() -> Scenes:
    return make_scenes(24, seed=5)


def test_same_seed_same_bytes():
    first, second = make_scenes(8, seed=0), make_scenes(8, seed=0)
    assert torch.equal(first.images, second.images)
    assert torch.equal(first.labels, second.labels)
    assert torch.equal(first.masks, second.masks)
    assert _digest(first) == DIGEST_8_SEED_0
    assert not torch.equal(make_scenes(8, seed=1).images, first.images)


def test_scene_does_not_depend_on_n():
    few, many = make_scenes(3, seed=0), make_scenes(8, seed=0)
    assert _digest(few) == _digest(many[:3])


def test_types_ranges_and_quantisation(scenes):
    n, size = len(scenes), 64
    assert scenes.images.shape == (n, 3, size, size) and scenes.images.dtype == torch.float32
    assert scenes.labels.shape == (n, 10) and scenes.labels.dtype == torch.float32
    assert scenes.masks.shape == (n, 10, size, size) and scenes.masks.dtype == torch.bool
    assert float(scenes.images.min()) >= 0.0 and float(scenes.images.max()) <= 1.0
    levels = scenes.images * 255
    assert torch.equal(levels, levels.round())
    assert set(scenes.labels.sum(1).tolist()) <= {1.0, 2.0}
    assert set(scenes.labels.unique().tolist()) == {0.0, 1.0}
    present = scenes.masks.flatten(2).any(2)
    assert torch.equal(present, scenes.labels.bool())  # masks empty exactly for absent classes
    assert int(scenes.masks.sum(1).max()) <= 1  # no pixel belongs to two objects
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10


def test_masks_are_exactly_the_visible_pixels(scenes):
    """Coverage is read back from painted pixels alone: on black and on white, an object's pixels agree."""
    two = 0
    for i in range(len(scenes)):
        spec = scene_spec(5, i)
        image, _ = render_scene(spec)
        assert np.array_equal(image.transpose(2, 0, 1), (scenes.images[i] * 255).round().to(torch.uint8).numpy())
        covered = []
        for k in range(len(spec.objects)):
            on_black, _ = render_scene(spec, objects=[k], flat=0.0)
            on_white, _ = render_scene(spec, objects=[k], flat=1.0)
            covered.append((on_black == on_white).all(2))
        background, _ = render_scene(spec, objects=[])
        union = np.zeros((64, 64), dtype=bool)
        for k, obj in enumerate(spec.objects):
            later = np.zeros_like(union)
            for j in range(k + 1, len(spec.objects)):
                later |= covered[j]
            expected = covered[k] & ~later
            mask = scenes.masks[i, obj.cls].numpy()
            assert np.array_equal(mask, expected), (i, CLASSES[obj.cls])
            alone, _ = render_scene(spec, objects=[k])
            assert np.array_equal(image[mask], alone[mask])  # visible pixels show this object
            union |= mask
        assert np.array_equal(image[~union], background[~union])  # everything else is background
        if len(spec.objects) == 2:
            first = scenes.masks[i, spec.objects[0].cls].numpy()
            assert first.sum() >= MIN_VISIBLE * covered[0].sum()  # partly hidden at most
            two += bool((covered[0] & covered[1]).any())
    assert two > 0  # the check covered at least one occlusion


@pytest.mark.parametrize("name", CLASSES)
def test_outline_area(name):
    """Each class's rasterised area matches its outline's analytic area (shoelace or circles)."""
    if name in _POLYGONS:
        xs, ys = np.array(_POLYGONS[name]).T
        area = 0.5 * abs(float(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))
    elif name == "disc":
        area = math.pi * 0.95**2
    elif name == "ring":
        area = math.pi * (1.0 - 0.55**2)
    else:  # crescent: unit disc minus its overlap with the disc of radius 0.8 at (0.5, 0)
        d, r1, r2 = 0.5, 1.0, 0.8
        lens = (
            r1**2 * math.acos((d**2 + r1**2 - r2**2) / (2 * d * r1))
            + r2**2 * math.acos((d**2 + r2**2 - r1**2) / (2 * d * r2))
            - 0.5 * math.sqrt((-d + r1 + r2) * (d + r1 - r2) * (d - r1 + r2) * (d + r1 + r2))
        )
        area = math.pi - lens
    radius, size = 60.0, 160
    spec = ObjectSpec(CLASSES.index(name), 80.0, 80.0, radius, math.cos(0.3), math.sin(0.3), 1.0, 0,
                      (1.0, 0.0, 0.0), (0.0, 0.0, 0.0), 2.0, 1.0, 0.0, np.zeros((6, 6)))
    measured = object_mask(spec, size).sum() / radius**2
    assert measured == pytest.approx(area, rel=0.02)


def test_class_balance():
    labels = make_labels(10_000, seed=0)
    counts = labels.sum(0)
    assert float(counts.min()) >= 0.95 * float(counts.mean())
    assert float(counts.max()) <= 1.05 * float(counts.mean())
    two = float((labels.sum(1) == 2).float().mean())
    assert 0.47 < two < 0.53


def test_labels_path_matches_generator(scenes):
    assert torch.equal(make_labels(len(scenes), seed=5), scenes.labels)


def test_other_sizes():
    big = make_scenes(3, seed=0, size=96)
    assert big.images.shape == (3, 3, 96, 96) and big.masks.shape == (3, 10, 96, 96)
    assert torch.equal(big.masks.flatten(2).any(2), big.labels.bool())
    assert torch.equal(big.labels, make_scenes(3, seed=0).labels)


def test_indexing(scenes):
    assert len(scenes[3]) == 1 and torch.equal(scenes[3].images[0], scenes.images[3])
    assert len(scenes[2:5]) == 3 and torch.equal(scenes[2:5].masks, scenes.masks[2:5])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(n=0, seed=0), ValueError, "n must be >= 1"),
        (dict(n=2.5, seed=0), TypeError, "n must be an int"),
        (dict(n=2, seed=-1), ValueError, "non-negative"),
        (dict(n=2, seed=0, size=16), ValueError, "size=32 or more"),
        (dict(n=True, seed=0), TypeError, "n must be an int"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_scenes(**kwargs)


def test_backgrounds_load_offline(monkeypatch):
    """The photos come from files inside scikit-image: loading them opens no connection."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    photos.cache_clear()
    loaded = photos()
    assert len(loaded) == len(PHOTOS)
    assert all(p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) >= 192 for p in loaded)
    assert all(0.0 <= p.min() and p.max() <= 1.0 and p.std() > 0.02 for p in loaded)
