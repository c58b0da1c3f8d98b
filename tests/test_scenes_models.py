"""excitation.scenes' committed models: accuracy on held-out scenes, any input size, pullbacks."""

import json

import pytest
import torch

import excitation
from excitation.scenes import make_scenes
from excitation.scenes.models import MODELS, WEIGHTS_DIR, evaluate_model, load_model
from excitation.scenes.train import HELD_OUT_SEED, TEST_SEED, TRAIN_SEED

NAMES = sorted(MODELS)
# The aim the committed weights meet on the 2000 held-out scenes recorded in training.json.
TARGET_MAP, TARGET_EXACT = 0.95, 0.90
# A fresh check on 256 other held-out scenes: exact match has a standard error of ~0.02 there,
# so its floor sits three of them below the aim (it catches a broken model or generator).
MAP_FLOOR, EXACT_FLOOR = 0.95, 0.84


@pytest.fixture(scope="module")
def held_out():
    assert TEST_SEED not in (TRAIN_SEED, HELD_OUT_SEED)
    return make_scenes(256, seed=TEST_SEED)


@pytest.mark.parametrize("name", NAMES)
def test_committed_model_is_accurate_on_held_out_scenes(name, held_out):
    model = load_model(name)
    assert not model.training
    scores = evaluate_model(model, held_out)
    assert scores["n"] == 256
    assert scores["map"] >= MAP_FLOOR, scores
    assert scores["exact_match"] >= EXACT_FLOOR, scores


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_small_and_recorded(name):
    path = WEIGHTS_DIR / MODELS[name].file
    assert path.stat().st_size <= 5 * 2**20
    record = json.loads((WEIGHTS_DIR / "training.json").read_text())[name]
    assert record["train_seed"] == TRAIN_SEED and record["held_out_seed"] == HELD_OUT_SEED
    assert record["held_out_scenes"] >= 2000
    assert record["held_out_map"] >= TARGET_MAP and record["held_out_exact_match"] >= TARGET_EXACT
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert sum(v.numel() for k, v in state.items() if not k.endswith("num_batches_tracked")) >= record["parameters"]


@pytest.mark.parametrize("name", NAMES)
def test_any_input_size_and_cam_layer(name, held_out):
    model = load_model(name)
    mosaic = torch.cat([torch.cat([held_out.images[0], held_out.images[1]], 2),
                        torch.cat([held_out.images[2], held_out.images[3]], 2)], 1)[None]
    assert mosaic.shape == (1, 3, 128, 128)
    seen = {}

    def hook(module, args, out):
        seen["shape"] = out.shape  # returns None, so the output is left alone

    handle = model.get_submodule(model.cam_layer).register_forward_hook(hook)
    with torch.no_grad():
        logits = model(mosaic)
    handle.remove()
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()
    assert seen["shape"][2:] == (16, 16)  # 8 x 8 per 64 x 64 scene
    assert isinstance(model.cam_layer, str)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match=r"unknown scenes model 'alexnet'.*\['resnet', 'vgg'\]"):
        load_model("alexnet")


def test_evaluate_needs_labels_for_tensors(held_out):
    with pytest.raises(ValueError, match="labels="):
        evaluate_model(load_model("vgg"), held_out.images)


@pytest.mark.parametrize("name", NAMES)
def test_pullback_handles_the_models(name, held_out):
    model = load_model(name)
    excited = excitation.excite(model)
    report = excitation.report(excited)
    assert report.unhandled == []
    assert report.counts()["relu"] > 0 and report.counts()["max_pool2d"] > 0
    x = held_out.images[:4]
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))  # forward bit-exact
    target = held_out.labels[:4].argmax(1)
    pb = excitation.pullback(excited, x, target)
    grad = excitation.gradient(model, x, target)
    assert pb.shape == x.shape and torch.isfinite(pb).all()
    assert float(pb.abs().sum()) > 0
    assert not torch.allclose(pb, grad, rtol=1e-3, atol=1e-6)
