"""excitation/text.py: pullbacks of language models with respect to their input embeddings."""

import logging

import pytest
import torch
import torch.nn as nn

import excitation
import excitation.text as text
from excitation.gates import sigmoid_gate

from .helpers import fingerprint, rel_err

TEMP = excitation.presets.PRESETS["paper"].temp


class PooledClassifier(nn.Module):
    """Embedding -> Linear -> ReLU per token, mean over tokens, Linear: ``logits [N, classes]``; HF's calling convention."""

    def __init__(self, vocab=20, dim=6, hidden=12, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.head = nn.Linear(hidden, classes)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        e = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.relu(self.up(e))
        if attention_mask is None:
            pooled = h.mean(1)
        else:
            weights = attention_mask.to(h.dtype)[..., None]
            pooled = (h * weights).sum(1) / weights.sum(1)
        return {"logits": self.head(pooled)}


class TokenLM(PooledClassifier):
    """The same per-token MLP as a language-modelling head: ``logits [N, T, vocab]``."""

    def __init__(self, vocab=20, dim=6, hidden=12):
        super().__init__(vocab, dim, hidden, classes=vocab)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        e = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        return {"logits": self.head(torch.relu(self.up(e)))}


def _ids(n=2, t=5, vocab=20, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def test_the_pullback_and_its_token_scores_equal_the_hand_computed_ones():
    """d logit_c / d e_t = (1/T) W_up^T (W_head[c] * sigmoid(z_t / temp)), by hand; then both reductions."""
    torch.manual_seed(0)
    model = PooledClassifier().eval()
    ids = _ids()
    result = text.pullback(model, ids, [1, 2])
    e = model.embed(ids).detach()
    z = model.up(e)
    gate = sigmoid_gate(z, TEMP)
    w_head = model.head.weight[[1, 2]].detach()  # [N, hidden]
    expected = (w_head[:, None, :] * gate) @ model.up.weight.detach() / ids.shape[1]
    assert rel_err(result.attribution, expected) < 1e-6
    assert torch.allclose(result.scores("input_x_pullback"), (expected * e).sum(-1), atol=1e-7)
    assert torch.allclose(result.scores("l2"), expected.norm(dim=-1), atol=1e-7)
    assert torch.equal(result.target, torch.tensor([1, 2])) and result.position is None
    vanilla = text.gradient(model, ids, [1, 2])
    hard = (w_head[:, None, :] * (z > 0).to(z.dtype)) @ model.up.weight.detach() / ids.shape[1]
    assert rel_err(vanilla.attribution, hard) < 1e-6 and vanilla.method == "gradient"
    with pytest.raises(ValueError, match="reduction must be one of"):
        result.scores("sum")


def test_language_models_default_to_the_next_token_at_the_last_real_position():
    torch.manual_seed(1)
    model = TokenLM().eval()
    ids = _ids(t=6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # right padding: sequence 1 ends at position 3
    result = text.pullback(model, ids, attention_mask=mask)
    assert result.position.tolist() == [5, 3]
    logits = model(ids)["logits"]
    assert result.target.tolist() == [int(logits[0, 5].argmax()), int(logits[1, 3].argmax())]
    # Only the predicting position's embedding moves the logit (a per-token model).
    moved = result.attribution.norm(dim=-1) > 0
    assert moved.tolist() == [[False] * 5 + [True], [False] * 3 + [True] + [False] * 2]
    assert result.scores()[1, 4:].abs().sum() == 0  # padded tokens score 0
    at = text.pullback(model, ids, 7, position=-2)
    assert at.position.tolist() == [4, 4] and at.target.tolist() == [7, 7]


def test_log_prob_scores_subtract_the_expected_logit():
    """d log p_c = d logit_c - sum_j p_j d logit_j: the head row of c minus the probability-weighted rows."""
    torch.manual_seed(2)
    model = TokenLM().eval()
    ids = _ids(n=1, t=4)
    result = text.pullback(model, ids, 3, score="log_prob")
    e = model.embed(ids).detach()
    z = model.up(e[0, -1])
    p = model.head(torch.relu(z)).softmax(-1).detach()
    w = model.head.weight.detach()
    row = w[3] - p @ w
    expected = (row * sigmoid_gate(z, TEMP).detach()) @ model.up.weight.detach()
    torch.testing.assert_close(result.attribution[0, -1], expected, rtol=1e-5, atol=1e-7)
    assert result.attribution[0, :-1].abs().sum() == 0
    with pytest.raises(ValueError, match="score must be one of"):
        text.pullback(model, ids, 3, score="prob")


def test_bad_input_gets_clear_errors():
    model = TokenLM().eval()
    ids = _ids()
    with pytest.raises(IndexError, match=r"position 9 is outside the sequence of length 5 \(valid: -5 to 4\)"):
        text.pullback(model, ids, position=9)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor of token ids"):
        text.pullback(model, ids.float())
    with pytest.raises(IndexError, match=r"ids outside the vocabulary \[0, 20\)"):
        text.pullback(model, ids + 20)
    with pytest.raises(IndexError):
        text.pullback(model, ids, 25)  # a target past the logits
    with pytest.raises(ValueError, match="position= applies to language-modelling heads"):
        text.pullback(PooledClassifier().eval(), ids, 0, position=1)
    with pytest.raises(TypeError, match="has no get_input_embeddings"):
        text.pullback(nn.Linear(3, 3), ids)
    # The image entry point, given token ids, says where to go.
    with pytest.raises(TypeError, match=r"integer token ids .* use excitation.text.pullback"):
        excitation.pullback(model, ids, 0)


def test_display_of_a_result(tmp_path):
    model = PooledClassifier().eval()
    result = text.pullback(model, _ids(), 0)
    html = result._repr_html_()
    assert html.count("<span") == 5 and "pullback of &#x27;0&#x27;" in html  # the title, escaped
    page = result.save_html(tmp_path / "tokens.html")
    assert page.read_text().count('class="excitation-tokens"') == 2
    assert len(result.to_terminal(color=False).split()) == 5


# ------------------------------------------------------------------ Hugging Face models, tiny random configs
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _gpt2():
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, vocab_size=50, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(cls="LlamaForCausalLM", config="LlamaConfig"):
    config = getattr(transformers, config)(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, vocab_size=50,
                                           max_position_embeddings=32)
    return getattr(transformers, cls)(config).eval()


def _bert():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.mark.parametrize("build, sites", [
    (_gpt2, {"gelu_new": 2, "layer_norm": 5, "scaled_dot_product_attention": 2}),
    (_llama, {"silu": 2, "rms_norm": 5, "scaled_dot_product_attention": 2}),
    (lambda: _llama("Qwen2ForCausalLM", "Qwen2Config"), {"silu": 2, "rms_norm": 5, "scaled_dot_product_attention": 2}),
    (_bert, {"gelu": 2, "layer_norm": 5, "scaled_dot_product_attention": 2}),
], ids=["gpt2", "llama", "qwen2", "bert"])
def test_hugging_face_models_every_site_rewritten_logits_bit_identical_model_untouched(build, sites):
    torch.manual_seed(0)
    model = build()
    before = fingerprint(model)
    ids = _ids(t=7, vocab=50)
    result = text.pullback(model, ids)
    prepared = excitation.prepare(text.embeddings_model(model))
    report = prepared.report()
    assert {k: v for k, v in report.counts().items() if v} == sites and not report.unhandled
    embeddings, mask = model.get_input_embeddings()(ids), torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(prepared(embeddings, mask), model(inputs_embeds=embeddings, attention_mask=mask).logits)
    vanilla = text.gradient(model, ids, result.target)
    assert torch.isfinite(result.attribution).all() and rel_err(result.attribution, vanilla.attribution) > 1e-2
    assert fingerprint(model) == before


def test_eager_attention_is_held_at_its_softmax():
    torch.manual_seed(0)
    model = _llama()
    model.set_attn_implementation("eager")
    text.pullback(model, _ids(t=7, vocab=50))
    report = excitation.prepare(text.embeddings_model(model)).report()
    assert report.counts()["softmax"] == 2 and report.counts().get("scaled_dot_product_attention", 0) == 0
    assert not report.unhandled


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.1), (torch.float16, 0.02)])
def test_half_precision_pullbacks_follow_the_float32_one(dtype, tolerance):
    torch.manual_seed(0)
    model = _llama()
    ids = _ids(t=7, vocab=50)
    reference = text.pullback(model, ids, 3)
    half = text.pullback(model.to(dtype), ids, 3)
    assert half.attribution.dtype == dtype
    assert rel_err(half.attribution.float(), reference.attribution) < tolerance
