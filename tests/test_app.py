"""``excitation app``: the page served on a loopback port and driven through gradio_client."""

import socket

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

import excitation  # noqa: E402
from excitation import visualize  # noqa: E402
from excitation.app import build_app, launch  # noqa: E402

SIZE = 32
CLASSES = ["disc", "square", "stripes", "noise"]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, len(CLASSES)),
    ).eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = tiny_model()
    examples = [(f"example {i}", torch.rand(3, SIZE, SIZE)) for i in range(2)]
    demo = build_app(model, classes=CLASSES, examples=examples, photos=False)
    launch(demo, host="127.0.0.1", port=free_port(), block=False, quiet=True)
    downloads = tmp_path_factory.mktemp("downloads")
    client = gradio_client.Client(demo.local_url, verbose=False, download_files=str(downloads))
    yield model, client, tmp_path_factory.mktemp("inputs")
    demo.close()


def explain(client, path, target=-1, preset="paper", temp=0.3, steps=2, step_size=0.5, radius=2.0, view="overlay"):
    return client.predict(gradio_client.handle_file(str(path)), target, preset, temp, steps, step_size, radius, view,
                          api_name="/explain")


def read(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_image_in_pullback_out_equals_the_api(served):
    model, client, folder = served
    pixels = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    path = folder / "input.png"
    Image.fromarray(pixels).save(path)
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255

    out = explain(client, path, target=2, preset="paper", temp=0.3)
    top5, pb_png, grad_png, before_png, after_pb_png, after_g_png, timing, raw, status = out
    expected = excitation.pullback(model, x, 2, preset="paper", temp=0.3)[0]
    # An all-zero map (a dead random head) would make every equality below hold trivially.
    assert expected.abs().sum() > 0
    np.testing.assert_array_equal(np.load(raw), expected.numpy())
    # The pictures are visualize's, of the library's own results.
    np.testing.assert_array_equal(read(pb_png), visualize.overlay(x[0], expected, alpha=0.6, grey_image=True).rgb)
    grad = excitation.gradient(model, x, 2)[0]
    np.testing.assert_array_equal(read(grad_png), visualize.overlay(x[0], grad, alpha=0.6, grey_image=True).rgb)
    np.testing.assert_array_equal(read(before_png), pixels)
    assert read(after_pb_png).shape == read(after_g_png).shape == (SIZE, SIZE, 3)
    assert "pullback" in timing and " ms" in timing and "accentuation" in timing
    assert status.startswith("Explained 2: stripes")
    labels = [c["label"] for c in top5["confidences"]]
    assert len(labels) == 4 and set(labels) == {f"{i}: {n}" for i, n in enumerate(CLASSES)}

    # Another preset and temperature, the paper's RGB view, and no accentuation.
    out = explain(client, path, target=1, preset="semantic", temp=0.6, steps=0, view="rgb")
    expected = excitation.pullback(model, x, 1, preset="semantic", temp=0.6)[0]
    np.testing.assert_array_equal(np.load(out[7]), expected.numpy())
    np.testing.assert_array_equal(read(out[1]), visualize.heatmap(expected, reduce="rgb").rgb)
    assert out[4] is None and out[5] is None


def test_bad_inputs_give_messages_and_the_server_keeps_answering(served):
    _, client, folder = served
    path = folder / "ok.png"
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(path)
    text = folder / "notes.png"
    text.write_text("not an image")
    for call, match in (
        (lambda: explain(client, path, temp=-1.0), "temperature -1.0 is out of range"),
        (lambda: explain(client, path, temp=1e6), "out of range"),
        (lambda: explain(client, path, steps=-3), "accentuation steps"),
        (lambda: explain(client, path, radius=0.0), "radius"),
        (lambda: explain(client, path, target=99), "not in the list of choices"),
        (lambda: explain(client, text), "not an image"),
    ):
        with pytest.raises(gradio_client.exceptions.AppError, match=match):
            call()
    with pytest.raises(gradio_client.exceptions.AppError, match="missing.pt does not exist"):
        client.predict("resnet18", str(folder / "missing.pt"), "", api_name="/load_model")
    with pytest.raises(gradio_client.exceptions.AppError, match="not a torchvision classifier"):
        client.predict("no_such_net", "", "", api_name="/load_model")
    # Still serving, and still right.
    out = explain(client, path, target=0, steps=0)
    assert out[-1].startswith("Explained 0: disc")


def test_predict_endpoint_and_examples(served):
    _, client, folder = served
    path = folder / "big.png"
    Image.fromarray((np.random.default_rng(1).random((50, 70, 3)) * 255).astype(np.uint8)).save(path)
    top5, target, status = client.predict(gradio_client.handle_file(str(path)), api_name="/predict")
    assert len(top5["confidences"]) == 4 and target == -1 and status.startswith("Predicted")


def test_example_photos_ship_without_download():
    from excitation.app import example_photos

    photos = dict(example_photos())
    assert {"astronaut", "chelsea", "coffee"} <= set(photos)
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[-1] == 3 for p in photos.values())


def test_default_model_is_the_scene_classifier_with_held_out_examples(monkeypatch):
    """The default path against excitation.scenes' API (a stand-in network keeps it fast)."""
    import excitation.scenes.models as scene_models
    from excitation.app import load_app_model
    from excitation.scenes import CLASSES as SCENE_CLASSES

    kinds = []

    def stand_in(kind):
        kinds.append(kind)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    monkeypatch.setattr(scene_models, "load_model", stand_in)
    loaded = load_app_model()
    assert kinds == ["resnet"] and loaded.classes == list(SCENE_CLASSES) and loaded.multi_label
    assert loaded.size == 64 and len(loaded.examples) == 6
    name, image = loaded.examples[0]
    assert name.startswith("scene 0: ") and image.shape == (3, 64, 64) and 0 <= image.min() <= image.max() <= 1
    with pytest.raises(ValueError, match="needs --model"):
        load_app_model(None, "weights.pt")
