"""excitation.visualize: heatmaps, overlays and grids."""

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from excitation import visualize
from excitation.visualize import GridFigure, grid, heatmap, heatmaps, overlay, save, shared_scale


def centre_colour(name):
    """The colour map evaluated at exactly 0.5, from matplotlib (independent of the module's table)."""
    return tuple(np.round(np.array(matplotlib.colormaps[name].resampled(3)(1)[:3]) * 255).astype(np.uint8))


def end_colours(name):
    cmap = matplotlib.colormaps[name].resampled(3)
    return [tuple(np.round(np.array(cmap(i)[:3]) * 255).astype(np.uint8)) for i in (0, 2)]


def signed_map(seed=0, shape=(3, 20, 30)):
    generator = np.random.default_rng(seed)
    a = generator.normal(size=shape)
    a[:, :2, :2] = 0.0  # zero in every channel: sum is exactly zero
    return a


# ------------------------------------------------------------------ heatmap: signed
@pytest.mark.parametrize("cmap", [None, "RdBu_r", "PuOr", "coolwarm"])
def test_zero_is_the_colour_maps_exact_centre(cmap):
    hm = heatmap(signed_map(), cmap=cmap)
    name = cmap or visualize.SIGNED_CMAP
    assert hm.signed and hm.rgb.dtype == np.uint8 and hm.rgb.shape == (20, 30, 3)
    assert (hm.rgb[:2, :2] == centre_colour(name)).all()
    assert tuple(heatmap(np.zeros((3, 4, 4)), cmap=cmap).rgb[0, 0]) == centre_colour(name)


def test_default_colour_maps_are_colour_blind_safe_choices():
    assert visualize.SIGNED_CMAP == "RdBu_r" and visualize.UNSIGNED_CMAP == "cividis"
    assert heatmap(signed_map()).cmap == "RdBu_r"
    assert heatmap(signed_map(), sign="absolute").cmap == "cividis"


def test_clipping_is_symmetric_and_both_ends_saturate():
    a = np.linspace(-1.0, 1.0, 2001).reshape(1, 1, -1)
    a[0, 0, 0], a[0, 0, -1] = -1000.0, 1000.0  # one outlier of each sign must not wash out the map
    hm = heatmap(a, clip=99.0)
    expected = np.percentile(np.abs(a), 99.0)
    assert hm.scale == pytest.approx(expected) and hm.limits == (-hm.scale, hm.scale)
    low, high = end_colours("RdBu_r")
    row = hm.rgb[0]
    values = a[0, 0]
    assert (row[values >= expected] == high).all() and (row[values <= -expected] == low).all()
    inside = np.abs(values) < 0.95 * expected
    assert not (row[inside] == high).all(-1).any() and not (row[inside] == low).all(-1).any()
    # Symmetric: on a linear grey map, v and -v are equally far from the middle grey.
    mirrored = heatmap(-a, clip=99.0, cmap="gray")
    assert mirrored.scale == hm.scale
    total = mirrored.rgb.astype(int) + heatmap(a, clip=99.0, cmap="gray").rgb.astype(int)
    assert np.abs(total - 255).max() <= 1


def test_clip_none_uses_the_maximum_and_bad_clips_are_refused():
    a = signed_map()
    assert heatmap(a, clip=None).scale == pytest.approx(np.abs(a.sum(0)).max())
    assert heatmap(a, clip=100).scale == pytest.approx(np.abs(a.sum(0)).max())
    for bad in (0, -1, 101, True):
        with pytest.raises(ValueError, match="clip"):
            heatmap(a, clip=bad)


def test_shared_scale_gives_equal_colours_for_equal_values():
    first, second = signed_map(1), 10 * signed_map(2)
    first[0, 5, 5:8] = [0.7, 0.0, 0.0]
    second[:, 5, 5] = [0.7, 0.0, 0.0]
    first[1:, 5, 5] = 0.0
    scale = shared_scale([first, second])
    assert scale == pytest.approx(np.percentile(np.abs(np.concatenate([first.sum(0).ravel(), second.sum(0).ravel()])), 99.5))
    h1, h2 = heatmap(first, scale=scale), heatmap(second, scale=scale)
    assert h1.scale == h2.scale == scale
    assert (h1.rgb[5, 5] == h2.rgb[5, 5]).all()
    # Without sharing the same value gets different colours (the second map is 10x larger).
    assert not (heatmap(first).rgb[5, 5] == heatmap(second).rgb[5, 5]).all()
    shared = heatmaps(np.stack([first, second]), share=True)
    assert shared[0].scale == shared[1].scale == pytest.approx(scale)


def test_sign_positive_draws_no_negative_value():
    a = signed_map()
    v = a.sum(0)
    hm = heatmap(a, sign="positive")
    zero = tuple(np.round(np.array(matplotlib.colormaps["cividis"].resampled(3)(0)[:3]) * 255).astype(np.uint8))
    assert not hm.signed and hm.limits == (0.0, hm.scale)
    assert (hm.rgb[v <= 0] == zero).all()
    assert not (hm.rgb[v > 0.05 * hm.scale] == zero).all(-1).any()
    negative = heatmap(a, sign="negative")
    assert (negative.rgb[v >= 0] == zero).all()
    np.testing.assert_array_equal(heatmap(-a, sign="positive").rgb, negative.rgb)
    np.testing.assert_array_equal(heatmap(a, sign="absolute").values, np.abs(v))


@pytest.mark.parametrize(
    "reduce,formula",
    [
        ("sum", lambda a: a.sum(0)),
        ("abs-sum", lambda a: np.abs(a).sum(0)),
        ("l2", lambda a: np.sqrt((a ** 2).sum(0))),
        ("mean", lambda a: a.mean(0)),
    ],
)
def test_reductions_match_numpy(reduce, formula):
    a = signed_map(3)
    hm = heatmap(torch.from_numpy(a).float(), reduce=reduce, clip=None)
    np.testing.assert_allclose(hm.values, formula(a.astype(np.float32)), rtol=1e-5, atol=1e-6)
    assert hm.scale == pytest.approx(np.abs(formula(a)).max(), rel=1e-5)


def test_reduce_rgb_is_the_paper_convention():
    a = signed_map(4)
    hm = heatmap(a, reduce="rgb", clip=None)
    scale = np.abs(a).max()
    expected = np.round(np.clip(0.5 + 0.5 * a / scale, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    np.testing.assert_array_equal(hm.rgb, expected)
    assert (hm.rgb[:2, :2] == 128).all()  # zero is mid grey
    grey = heatmap(a[:1], reduce="rgb").rgb
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    with pytest.raises(ValueError, match="takes no cmap"):
        heatmap(a, reduce="rgb", cmap="RdBu_r")


def test_input_x_attribution_multiplies_by_the_image():
    a, x = signed_map(5), np.random.default_rng(0).random((3, 20, 30))
    np.testing.assert_allclose(heatmap(a, image=x, view="input-x-attribution").values, (a * x).sum(0))
    with pytest.raises(ValueError, match="pass image="):
        heatmap(a, view="input-x-attribution")


def test_heatmap_accepts_hw_tensors_with_grad_and_shows_inline(tmp_path):
    a = torch.randn(16, 12, requires_grad=True)
    hm = heatmap(a)
    assert hm.rgb.shape == (16, 12, 3)
    with Image.open(io.BytesIO(hm._repr_png_())) as png:
        assert png.size == (12, 16) and png.mode == "RGB"
    assert hm.to_pil().size == (12, 16)
    path = hm.save(tmp_path / "h" / "map.png")
    with Image.open(path) as png:
        np.testing.assert_array_equal(np.asarray(png), hm.rgb)
    assert "scale=" in repr(hm)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attribution=np.zeros((2, 3, 4, 4))), r"\[C, H, W\] or \[H, W\].*heatmaps"),
        (dict(attribution=np.zeros(5)), r"\[C, H, W\] or \[H, W\]"),
        (dict(attribution=np.zeros((32, 32, 3))), "channels-last"),
        (dict(attribution=np.full((1, 2, 2), np.nan)), "NaN"),
        (dict(attribution=np.zeros((1, 2, 2)), reduce="max"), "reduce='max' is not known"),
        (dict(attribution=np.zeros((1, 2, 2)), sign="pos"), "sign='pos' is not known"),
        (dict(attribution=np.zeros((1, 2, 2)), scale=0.0), "scale=0.0 must be a positive"),
        (dict(attribution=np.zeros((1, 2, 2)), cmap="nope"), "not a matplotlib colour map"),
    ],
)
def test_heatmap_errors_name_the_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        heatmap(**kwargs)


# ------------------------------------------------------------------ overlay
@pytest.mark.parametrize("channels", [1, 3])
def test_overlay_ends_are_exactly_image_and_heatmap(channels):
    x = torch.rand(channels, 20, 30)
    a = signed_map(6)
    at_zero = overlay(x, a, alpha=0).rgb
    expected = np.round(x.double().numpy() * 255).astype(np.uint8)
    expected = np.repeat(expected, 3, 0) if channels == 1 else expected
    np.testing.assert_array_equal(at_zero, expected.transpose(1, 2, 0))
    np.testing.assert_array_equal(overlay(x, a, alpha=1).rgb, heatmap(a).rgb)
    np.testing.assert_array_equal(overlay(x, a, alpha=1, sign="absolute").rgb, heatmap(a, sign="absolute").rgb)
    half = overlay(x, a, alpha=0.5)
    assert half.scale == heatmap(a).scale
    assert np.abs(half.rgb.astype(int) - (at_zero.astype(int) + heatmap(a).rgb.astype(int)) / 2).max() <= 0.5


def test_overlay_grey_image_and_errors():
    x = torch.rand(3, 8, 8)
    grey = overlay(x, torch.randn(3, 8, 8), alpha=0, grey_image=True).rgb
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    with pytest.raises(ValueError, match="alpha=1.5"):
        overlay(x, torch.randn(3, 8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="resize one"):
        overlay(x, torch.randn(3, 9, 8))
    with pytest.raises(ValueError, match="divide by 255"):
        overlay(x * 255, torch.randn(3, 8, 8))


# ------------------------------------------------------------------ grid
def _columns(n=2, size=(16, 20)):
    torch.manual_seed(0)
    return torch.rand(n, 3, *size), {"pullback": torch.randn(n, 3, *size), "gradient": torch.randn(n, 3, *size)}


@pytest.mark.parametrize("view", ["heatmap", "overlay", "rgb"])
@pytest.mark.parametrize("share", ["row", "figure", "none"])
def test_grid_is_a_figure_that_writes_png(tmp_path, view, share):
    images, columns = _columns()
    fig = grid(images, columns, view=view, share=share, row_labels=["a", "b"], title="t")
    assert isinstance(fig, matplotlib.figure.Figure) and isinstance(fig, GridFigure)
    path = save(fig, tmp_path / "g.png", dpi=100)
    width, height = fig.get_size_inches() * 100
    with Image.open(path) as png:
        png.load()
        assert png.format == "PNG"
        # bbox_inches="tight" trims or pads a little around the drawn area.
        assert abs(png.width - width) < 0.25 * width and abs(png.height - height) < 0.25 * height
    with Image.open(io.BytesIO(fig._repr_png_())) as inline:
        assert inline.width > 100


def test_grid_cells_are_the_heatmaps_with_the_shared_scale():
    images, columns = _columns(n=2)
    fig = grid(images, columns, share="row", clip=None)
    ax = fig.axes[1 * 3 + 2]  # row 1, "gradient"
    scale = max(np.abs(columns[k][1].sum(0).numpy()).max() for k in columns)
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), heatmap(columns["gradient"][1], scale=scale).rgb)
    np.testing.assert_array_equal(fig.axes[0].get_images()[0].get_array(),
                                  np.round(images[0].permute(1, 2, 0).double().numpy() * 255).astype(np.uint8))
    assert fig.axes[1].get_title() == "pullback" and fig.axes[0].get_title() == "input"
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colorbars) == 2  # one per row


def test_grid_titles_per_cell_as_images_and_no_image_column():
    images, columns = _columns(n=2)
    columns["mask"] = torch.rand(2, 1, 16, 20)
    fig = grid(images, columns, as_images=["mask"], titles=[["cat", "cat", "m"], ["dog", "dog", "m"]], share="figure")
    assert fig.axes[1].get_title() == "cat" and fig.axes[5].get_title() == "dog" and fig.axes[3].get_title() == "m"
    assert len([ax for ax in fig.axes if ax.get_label() == "<colorbar>"]) == 1
    fig = grid(None, {"pb": torch.randn(3, 1, 8, 8)}, colorbar=False)
    assert len(fig.axes) == 3


@pytest.mark.parametrize("suffix", [".svg", ".pdf"])
def test_grid_writes_svg_and_pdf(tmp_path, suffix):
    images, columns = _columns(n=1)
    path = grid(images, columns).save(tmp_path / f"g{suffix}")
    head = path.read_bytes()[:200]
    assert (b"<svg" in head or b"<?xml" in head) if suffix == ".svg" else head.startswith(b"%PDF")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, c: grid(x, {}), "non-empty mapping"),
        (lambda x, c: grid(x[:1], c), "one image per row"),
        (lambda x, c: grid(x, c, view="hm"), "view='hm' is not known"),
        (lambda x, c: grid(x, c, share="col"), "share='col' is not known"),
        (lambda x, c: grid(x, c, titles=["one"]), "titles has 1 entries for 2 columns"),
        (lambda x, c: grid(x, c, row_labels=["a"]), "row_labels has 1 entries for 2 rows"),
        (lambda x, c: grid(None, c, view="overlay"), "need the images"),
        (lambda x, c: grid(x, c, as_images=["nope"]), "not keys of attributions"),
        (lambda x, c: grid(x, {"a": torch.zeros(2, 3, 4, 4), "b": torch.zeros(3, 3, 4, 4)}), "same N"),
        (lambda x, c: save(grid(x, c), "fig.jpg"), "name a .png, .svg or .pdf"),
    ],
)
def test_grid_errors_name_the_fix(call, match):
    images, columns = _columns()
    with pytest.raises(ValueError, match=match):
        call(images, columns)
