"""Image collections: ImageFolder tree, flat folder, list file; order, labels and decode errors."""

import pytest
import torch
from PIL import Image

from excitation.images import ImageDataset, ImageDecodeError, list_images, load_image
from excitation.models import pixel_transform


def _write(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), (value, value, value)).save(path)


def test_image_folder_layout_matches_torchvision(tmp_path):
    from torchvision.datasets import ImageFolder

    for cls, names in {"zebra": ["b.png", "a.png"], "ant": ["c.jpg"], "a-b": ["x.png"]}.items():
        for i, name in enumerate(names):
            _write(tmp_path / cls / name, 10 * i)
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    images = list_images(tmp_path)
    reference = ImageFolder(str(tmp_path))
    assert images.paths == [p for p, _ in reference.samples]
    assert images.labels == [label for _, label in reference.samples]
    assert images.classes == reference.classes


def test_flat_folder_is_sorted_without_labels(tmp_path):
    for name in ("b.png", "a.png", "c.bmp"):
        _write(tmp_path / name, 0)
    images = list_images(tmp_path)
    assert [p.split("/")[-1] for p in images.paths] == ["a.png", "b.png", "c.bmp"] and images.labels == [-1] * 3
    assert len(images.head(2)) == 2 and images.head(None) is images


def test_list_file_keeps_its_order_and_labels(tmp_path):
    _write(tmp_path / "img" / "one.png", 0)
    _write(tmp_path / "img" / "two.png", 0)
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\nimg/two.png 7\n\nimg/one.png\n")
    images = list_images(listing)
    assert images.paths == [str(tmp_path / "img" / "two.png"), str(tmp_path / "img" / "one.png")]
    assert images.labels == [7, -1]


def test_dataset_yields_pixels_label_index(tmp_path):
    _write(tmp_path / "k" / "a.png", 255)
    dataset = ImageDataset(list_images(tmp_path), pixel_transform(8, 8))
    pixels, label, index = dataset[0]
    assert pixels.shape == (3, 8, 8) and torch.allclose(pixels, torch.ones_like(pixels)) and (label, index) == (0, 0)


def test_corrupt_image_error_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageDecodeError, match="broken.png") as info:
        load_image(bad, pixel_transform(8, 8))
    assert info.value.path == str(bad) and "--on-error skip" in str(info.value)


@pytest.mark.parametrize("kind, message", [("missing", "does not exist"), ("empty", "holds no images"),
                                           ("notlist", "not a .txt list"), ("badline", "does not exist")])
def test_bad_collections_are_named(tmp_path, kind, message):
    target = {"missing": tmp_path / "nope", "empty": tmp_path, "notlist": tmp_path / "a.csv",
              "badline": tmp_path / "l.txt"}[kind]
    if kind == "notlist":
        target.write_text("x")
    if kind == "badline":
        target.write_text("missing.png\n")
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        list_images(target)
    with pytest.raises(ValueError, match="positive integer"):
        list_images.__globals__["ImageList"]([], []).head(0)
