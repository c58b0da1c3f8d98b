import numpy as np
import pytest
import torch
from PIL import Image

from excitation import visualize
from excitation.figures import accentuation_grid, pullback_grid


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("view", ["heatmap", "overlay", "rgb"])
def test_pullback_grid_writes_png(tmp_path, channels, view):
    images = torch.rand(2, channels, 16, 16)
    path = pullback_grid(images, torch.randn(2, 3, channels, 16, 16), ["a", "b"], ["x", "y", "z"],
                         tmp_path / "sub" / "g.png", title="t", view=view)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > img.height > 50


def test_pullback_grid_is_visualize_grid(tmp_path):
    torch.manual_seed(0)
    images, pbs = torch.rand(2, 3, 16, 16), torch.randn(2, 3, 3, 16, 16)
    path = pullback_grid(images, pbs, ["a", "b"], ["x", "y", "z"], tmp_path / "g.png", title="t", view="overlay")
    fig = visualize.grid(images, {"x": pbs[:, 0], "y": pbs[:, 1], "z": pbs[:, 2]}, row_labels=["a", "b"], title="t",
                         view="overlay", cell=1.3)
    np.testing.assert_array_equal(pixels(path), pixels(visualize.save(fig, tmp_path / "api.png")))


def test_pullback_grid_other_formats(tmp_path):
    path = pullback_grid(torch.rand(1, 3, 8, 8), torch.randn(1, 2, 3, 8, 8), ["a"], ["x", "y"], tmp_path / "g.pdf")
    assert path.read_bytes().startswith(b"%PDF")


def test_accentuation_grid_writes_png(tmp_path):
    images = torch.rand(2, 3, 16, 16)
    moved = (images[:, None].repeat(1, 3, 1, 1, 1) + 0.1 * torch.randn(2, 3, 3, 16, 16)).clamp(0, 1)
    path = accentuation_grid(images, moved, moved.flip(1), ["a", "b"], ["x", "y", "z"], tmp_path / "a.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 200
    fig = visualize.grid(
        images.repeat_interleave(2, 0),
        {key: value for j in range(3) for key, value in (
            (f"r{j}", torch.stack([moved, moved.flip(1)], 1).flatten(0, 1)[:, j]),
            (f"d{j}", torch.stack([moved, moved.flip(1)], 1).flatten(0, 1)[:, j] - images.repeat_interleave(2, 0)))},
        as_images=["r0", "r1", "r2"], titles=["x", "Δ", "y", "Δ", "z", "Δ"],
        row_labels=["a · pullback", "a · gradient", "b · pullback", "b · gradient"], view="rgb", share="figure",
        cell=1.1)
    np.testing.assert_array_equal(pixels(path), pixels(visualize.save(fig, tmp_path / "api.png")))


def test_grids_check_their_shapes(tmp_path):
    with pytest.raises(ValueError, match="need 2 images"):
        pullback_grid(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 1, 4, 4), ["a"], ["x", "y", "z"], tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"\[N, K, C, H, W\]"):
        pullback_grid(torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4), ["a", "b"], ["x"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="must agree"):
        accentuation_grid(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 1, 4, 4), torch.rand(2, 2, 1, 4, 4), ["a", "b"], ["x", "y", "z"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="view='nope'"):
        pullback_grid(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 1, 4, 4), ["a"], ["x"], tmp_path / "g.png", view="nope")
