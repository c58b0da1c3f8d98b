"""excitation/zoo_hf.py: transformers image classifiers through excitation.pullback, from small random configs."""

import argparse
import json
import math

import pytest
import torch

import excitation
from excitation import cli

transformers = pytest.importorskip("transformers")
zoo_hf = pytest.importorskip("excitation.zoo_hf")

# One model per kind of site a transformers vision model holds: attention by sdpa (ViT) and by a softmax
# (Swin v2), convolutions with ReLU and max-pool (ResNet), GELU and LayerNorm without attention (ConvNeXt),
# an output field other than logits (PP-LCNet), token ids (ImageGPT: excitation.text).
SUBSET = ["vit", "swinv2", "resnet", "convnext", "pp_lcnet", "imagegpt"]


@pytest.fixture(scope="module")
def rows():
    return {row.architecture: row for row in zoo_hf.run_hf_zoo(SUBSET, progress=False)}


def test_every_architecture_of_the_subset_passes_every_check(rows):
    for name in SUBSET:
        row = rows[name]
        assert not row.error, (name, row.error)
        assert row.finite and row.forward_identical and not row.unhandled, name
        assert row.path.startswith("dynamo")  # transformers' forwards do not trace with torch.fx
        assert 0 < row.rel_diff < math.inf and row.time_ratio > 0, name
    assert rows["vit"].sites == {"gelu": 2, "layer_norm": 5, "scaled_dot_product_attention": 2}
    assert rows["swinv2"].sites.get("softmax") == 2 and rows["resnet"].sites.get("max_pool2d") == 1
    assert rows["imagegpt"].path == "dynamo (excitation.text)" and rows["imagegpt"].sites == {
        "quick_gelu": 2, "rms_norm": 5, "softmax": 2}


def test_the_row_agrees_with_an_independent_pullback():
    """The table's numbers, recomputed: the forward, and the rel. diff from excitation.pullback / gradient."""
    model, x = zoo_hf.build_tiny_model("vit")
    row = zoo_hf.check_hf_model(model, x, architecture="vit")
    with torch.no_grad():
        logits = model(x).logits
    target = int(logits[0].argmax())
    pulled, vanilla = excitation.pullback(model, x, target), excitation.gradient(model, x, target)
    assert row.rel_diff == pytest.approx(float((pulled - vanilla).norm() / vanilla.norm()), rel=1e-6)
    prepared = excitation.prepare(model)
    with torch.no_grad():
        assert torch.equal(prepared(x).logits, logits)


def test_every_architecture_is_listed_and_unknown_ones_are_refused():
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    assert set(zoo_hf.image_classification_architectures()) == set(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)
    with pytest.raises(ValueError, match=r"not image-classification architectures .*\['bert'\]"):
        zoo_hf.run_hf_zoo(["bert"], progress=False)


def test_a_failure_is_a_row_and_the_table_and_json_say_so(monkeypatch, tmp_path, capsys):
    def broken(architecture, seed=0):
        raise RuntimeError("no such | model")

    monkeypatch.setattr(zoo_hf, "build_tiny_model", broken)
    out, js = tmp_path / "zoo.md", tmp_path / "zoo.json"
    code = cli.main(["zoo", "--source", "huggingface", "--models", "vit", "--out", str(out), "--json", str(js),
                     "--no-progress"])
    assert code == 0
    assert "RuntimeError: no such / model" in out.read_text() and "ran 0/1" in out.read_text()
    assert json.loads(js.read_text())[0]["error"] == "RuntimeError: no such | model"


def test_timm_options_are_refused_with_the_huggingface_source(capsys):
    assert cli.main(["zoo", "--source", "huggingface", "--all", "--no-progress"]) == 2
    assert "--all apply to the timm zoo only; with --source huggingface" in capsys.readouterr().err
