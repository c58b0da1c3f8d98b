"""excitation.captum.ExcitationPullback and excitation.quantus_explain_func against excitation.pullback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

captum = pytest.importorskip("captum")

import excitation
from excitation.captum import ExcitationPullback


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).eval()


def _x():
    return torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("preset", [None, "semantic"])
def test_captum_attribute_equals_pullback_signed_with_int_and_tensor_targets(preset):
    model, x = _model(), _x()
    y = torch.tensor([0, 1, 2, 1])
    explainer = ExcitationPullback(model, preset=preset)
    assert torch.equal(explainer.attribute(x, target=y), excitation.pullback(model, x, y, preset=preset))
    assert torch.equal(explainer.attribute(x, target=2), excitation.pullback(model, x, 2, preset=preset))
    assert torch.equal(explainer.attribute(x, target=y, abs=True), excitation.pullback(model, x, y, preset=preset).abs())
    assert (explainer.attribute(x, target=y) < 0).any()  # signed by default
    with pytest.raises(ValueError, match="one class per input"):
        explainer.attribute(x, target=torch.tensor([0, 1]))


def test_captum_noise_tunnel_uses_the_wrapped_attribute():
    from captum.attr import NoiseTunnel

    model, x = _model(), _x()
    explainer = ExcitationPullback(model)
    assert hasattr(explainer.attribute, "__wrapped__")  # log_usage, which NoiseTunnel calls through
    # With zero noise every sample is x itself: the tunnel's mean is the pullback.
    still = NoiseTunnel(explainer).attribute(x, target=1, nt_type="smoothgrad", nt_samples=3, stdevs=0.0)
    torch.testing.assert_close(still, excitation.pullback(model, x, 1))
    torch.manual_seed(0)
    noisy = NoiseTunnel(explainer).attribute(x, target=1, nt_type="smoothgrad", nt_samples=4, stdevs=0.1)
    assert noisy.shape == x.shape and not torch.allclose(noisy, still)


def test_captum_metrics_infidelity_and_sensitivity_on_a_linear_model_are_zero():
    from captum.metrics import infidelity, sensitivity_max

    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()  # pullback = gradient = constant
    x = _x()
    explainer = ExcitationPullback(linear)
    attr = explainer.attribute(x, target=1)

    def perturb(inputs):
        noise = torch.randn_like(inputs) * 0.1
        return noise, inputs - noise

    inf = infidelity(linear, perturb, x, attr, target=1, n_perturb_samples=4)
    assert torch.allclose(inf, torch.zeros(4), atol=1e-8)
    sens = sensitivity_max(explainer.attribute, x, target=1, n_perturb_samples=3)
    assert torch.allclose(sens, torch.zeros(4), atol=1e-6)
    # ... and on the ReLU model the same calls run and are positive.
    relu = _model()
    assert (sensitivity_max(ExcitationPullback(relu).attribute, x, target=1, n_perturb_samples=3) > 0).all()


def test_quantus_explain_func_is_the_pullback_in_numpy():
    model, x = _model(), _x()
    y = np.array([2, 0, 1, 1])
    out = excitation.quantus_explain_func(model, x.numpy(), y, preset="semantic")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, excitation.pullback(model, x, torch.tensor(y), preset="semantic").numpy())
    np.testing.assert_array_equal(excitation.quantus_explain_func(model, x.numpy(), 1),
                                  excitation.pullback(model, x, 1).numpy())


def test_quantus_metric_runs_with_the_explain_func():
    quantus = pytest.importorskip("quantus")
    model, x = _model(), _x()
    y = np.array([2, 0, 1, 1])
    scores = quantus.MaxSensitivity(nr_samples=2, disable_warnings=True)(
        model=model, x_batch=x.numpy(), y_batch=y, a_batch=None, device="cpu",
        explain_func=excitation.quantus_explain_func, explain_func_kwargs={"temp": 0.5})
    assert len(scores) == 4 and np.all(np.isfinite(scores)) and np.all(np.asarray(scores) > 0)


# ------------------------------------------------------------------ excitation.captum.wrap

def _relu_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).eval()


def test_wrapped_integrated_gradients_is_the_path_integral_of_pullbacks():
    from captum.attr import IntegratedGradients

    from excitation.captum import wrap

    model, x = _relu_model(), _x()
    y = torch.tensor([0, 3, 2, 1])
    base = torch.full_like(x, 0.25)
    m = 8
    ig = wrap(IntegratedGradients)(model, preset="semantic")
    got = ig.attribute(x, baselines=base, target=y, n_steps=m, method="riemann_middle")
    mean = sum(excitation.pullback(model, base + (k + 0.5) / m * (x - base), y, preset="semantic")
               for k in range(m)) / m
    torch.testing.assert_close(got, mean * (x - base), rtol=1e-5, atol=1e-7)
    # And it is not the gradient's path integral.
    plain = IntegratedGradients(model).attribute(x, baselines=base, target=y, n_steps=m, method="riemann_middle")
    assert not torch.allclose(got, plain, atol=1e-6)


def test_wrap_maps_layers_by_name_and_keeps_the_model():
    from captum.attr import GuidedBackprop, LayerGradCam, Saliency

    from excitation.captum import wrap

    model, x = _relu_model(), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = torch.tensor([0, 1, 2, 3])
    saliency = wrap(Saliency)(model, preset="semantic").attribute(x, target=y, abs=False)
    torch.testing.assert_close(saliency, excitation.pullback(model, x, y, preset="semantic"))
    cam = wrap(LayerGradCam)(model, model[0], preset="semantic")
    assert cam.layer is not model[0] and isinstance(cam.layer, nn.Conv2d)
    assert cam.attribute(x, target=y).shape == (4, 1, 8, 8)
    with pytest.raises(ValueError, match="guided-pullback-cam"):
        wrap(GuidedBackprop)
    with pytest.raises(TypeError, match="Captum attribution class"):
        wrap(nn.ReLU)
    with pytest.raises(ValueError, match="not called as a module"):
        wrap(LayerGradCam)(model, model[1])          # the ReLU became a surrogate op
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(m, nn.ReLU) for m in model if not isinstance(m, (nn.Conv2d, nn.Flatten, nn.Linear)))


def test_captum_llm_attribution_is_the_text_pullback_of_each_target_token():
    """The one-line switch from Captum's LLMGradientAttribution: its result type, with pullbacks per target token."""
    transformers = pytest.importorskip("transformers")
    from captum.attr import TextTokenInput
    from tokenizers import Tokenizer, models, pre_tokenizers

    from excitation import text
    from excitation.captum import LLMPullbackAttribution

    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                                                 vocab_size=8, bos_token_id=0, eos_token_id=0)).eval()
    inp = TextTokenInput("the cat sat", tokenizer)
    result = LLMPullbackAttribution(model, tokenizer).attribute(inp, target="on the mat")
    assert result.input_tokens == ["the", "cat", "sat"] and result.output_tokens == ["on", "the", "mat"]
    assert result.token_attr.shape == (3, 3)
    prompt, wanted = torch.tensor([[1, 2, 3]]), [4, 1, 5]
    for k, token in enumerate(wanted):
        ids = torch.cat([prompt, torch.tensor([wanted[:k]], dtype=torch.long)], 1)
        expected = text.pullback(model, ids, token, score="log_prob").scores()[0, :3]
        torch.testing.assert_close(result.token_attr[k], expected)
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))
    with pytest.raises(TypeError, match="takes no \\['n_steps'\\]"):
        LLMPullbackAttribution(model, tokenizer).attribute(inp, target="on", n_steps=5)
