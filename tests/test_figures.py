import pytest
import torch
from PIL import Image

from excitation.figures import accentuation_grid, pullback_grid, scale_each


def test_scale_each_maps_every_image_to_unit_range():
    t = torch.randn(2, 3, 1, 5, 5) * torch.tensor([1.0, 100.0, 1e-6]).view(1, 3, 1, 1, 1)
    s = scale_each(t)
    flat = s.flatten(2)
    torch.testing.assert_close(flat.min(-1).values, torch.zeros(2, 3))
    torch.testing.assert_close(flat.max(-1).values, torch.ones(2, 3))
    assert torch.equal(scale_each(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))  # flat cell: no NaN


@pytest.mark.parametrize("channels", [1, 3])
def test_pullback_grid_writes_png(tmp_path, channels):
    images = torch.rand(2, channels, 16, 16)
    path = pullback_grid(images, torch.randn(2, 3, channels, 16, 16), ["a", "b"], ["x", "y", "z"], tmp_path / "sub" / "g.png", title="t")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > img.height > 50


def test_accentuation_grid_writes_png(tmp_path):
    images = torch.rand(2, 3, 16, 16)
    moved = images[:, None].repeat(1, 3, 1, 1, 1) + 0.1 * torch.randn(2, 3, 3, 16, 16)
    path = accentuation_grid(images, moved, moved.flip(1), ["a", "b"], ["x", "y", "z"], tmp_path / "a.png")
    with Image.open(path) as img:
        assert img.height > img.width  # four rows per image


def test_grids_check_their_shapes(tmp_path):
    with pytest.raises(ValueError, match="need 2 images"):
        pullback_grid(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 1, 4, 4), ["a"], ["x", "y", "z"], tmp_path / "g.png")
    with pytest.raises(ValueError, match="must agree"):
        accentuation_grid(torch.rand(2, 1, 4, 4), torch.rand(2, 3, 1, 4, 4), torch.rand(2, 2, 1, 4, 4), ["a", "b"], ["x", "y", "z"], tmp_path / "g.png")
