"""Loading classifiers by name: torchvision, timm and entry points, weights from files, preprocessing."""

import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image

from excitation.ascent import IMAGENET_NORMALIZE
from excitation.models import load_classifier, pixel_transform


def _equal_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_torchvision_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18()
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = load_classifier("resnet18", weights_file=tmp_path / "w.pt")
    assert loaded.source == "torchvision" and _equal_state(loaded.model, source)
    assert not loaded.model.training and loaded.normalize == IMAGENET_NORMALIZE
    assert loaded.weights == str(tmp_path / "w.pt")


def test_checkpoint_dicts_and_safetensors_load(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(2)
    source = torchvision.models.resnet18()
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pth", "w.safetensors"):
        assert _equal_state(load_classifier("resnet18", weights_file=tmp_path / name).model, source)


def test_googlenet_checkpoint_with_auxiliary_heads_loads(tmp_path):
    torch.manual_seed(3)
    full = torchvision.models.googlenet(aux_logits=True, init_weights=True)
    torch.save(full.state_dict(), tmp_path / "g.pt")
    model = load_classifier("googlenet", weights_file=tmp_path / "g.pt").model
    assert torch.equal(model.fc.weight, full.fc.weight) and model.aux1 is None


def test_weight_set_gives_categories_and_the_weights_transforms(tmp_path, monkeypatch):
    torch.manual_seed(4)
    state = torchvision.models.resnet18().state_dict()
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setattr(type(weights), "get_state_dict", lambda self, *a, **k: state)  # no download here
    loaded = load_classifier("resnet18", weights="IMAGENET1K_V1")
    assert len(loaded.categories) == 1000 and loaded.categories[0] == "tench"
    assert (loaded.preprocess.resize, loaded.preprocess.crop) == (256, 224)
    assert torch.equal(loaded.model.fc.weight, state["fc.weight"])


def test_timm_model_by_name_with_its_own_preprocessing(tmp_path):
    import timm
    torch.manual_seed(5)
    source = timm.create_model("resnet10t", pretrained=False)
    torch.save(source.state_dict(), tmp_path / "t.pt")
    loaded = load_classifier("resnet10t", weights_file=tmp_path / "t.pt")
    assert loaded.source == "timm" and _equal_state(loaded.model, source)
    config = timm.data.resolve_data_config({}, model=source)
    assert loaded.preprocess.crop == config["input_size"][-1]
    assert loaded.normalize == (tuple(config["mean"]), tuple(config["std"]))


def tiny_model() -> nn.Module:  # the entry point the test names
    torch.manual_seed(6)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def test_entry_point_and_preprocessing_overrides():
    loaded = load_classifier("tests.test_models:tiny_model", size=32, normalize=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert loaded.source == "entry point" and isinstance(loaded.model, nn.Sequential)
    pixels = loaded.preprocess(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert pixels.shape == (3, 32, 32) and float(pixels[0].min()) == 1.0 and float(pixels[1].max()) == 0.0
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded.pixel_model()(x), loaded.model((x - 0.5) / 0.25))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="no_such_net"), "not a torchvision classifier"),
        (dict(name="resnet18", weights="NOPE"), "not a weight set"),
        (dict(name="resnet18", weights_file="/nonexistent.pt"), "does not exist"),
        (dict(name="tests.test_models:nothing"), "has no function"),
        (dict(name="no_such_module_x:f"), "cannot import"),
        (dict(name="resnet18", size=3), "--size"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(Exception, match=message):
        load_classifier(name, **kwargs)


def test_wrong_architecture_file_is_a_clear_error(tmp_path):
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="does not fit ResNet"):
        load_classifier("resnet18", weights_file=tmp_path / "r34.pt")


def test_pixel_transform_resizes_short_side_then_crops():
    out = pixel_transform(40, 32)(Image.new("L", (80, 60), 128))
    assert out.shape == (3, 32, 32) and torch.allclose(out, torch.full_like(out, 128 / 255), atol=1e-6)
