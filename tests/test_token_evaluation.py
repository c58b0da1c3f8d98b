"""excitation/evaluation/tokens.py: token attributions scored against the keyword's known position."""

import numpy as np
import pytest
import torch

from excitation.evaluation.tokens import PAIRS, TOKEN_EXPLAINERS, evaluate_tokens, keyword_scores, token_attributions

pytest.importorskip("transformers")


def test_keyword_scores_by_hand():
    # Position 0 ([CLS]) is never ranked.  Row 0: the keyword (position 2) has |-3| = 3, the largest: rank 1,
    # share 3 / (1 + 3 + 2) = 0.5.  Row 1: the keyword (position 1) scores 1 of 1 + 2 + 2: rank 3, share 0.2.
    scores = torch.tensor([[9.0, 1.0, -3.0, 2.0], [9.0, 1.0, 2.0, -2.0]])
    found = keyword_scores(scores, torch.tensor([2, 1]))
    np.testing.assert_allclose(found["top1"], [1.0, 0.0])
    np.testing.assert_allclose(found["rank"], [1.0, 3.0])
    np.testing.assert_allclose(found["share"], [0.5, 0.2])
    tie = keyword_scores(torch.tensor([[0.0, 1.0, 1.0]]), torch.tensor([1]))
    assert tie["rank"][0] == 2 and tie["top1"][0] == 0  # a tie counts against the keyword


@pytest.fixture(scope="module")
def report():
    return evaluate_tokens(24, batch_size=16, ig_steps=8, progress=False)


def test_the_report_is_the_per_sequence_scores_recomputed(report):
    from excitation.tokens import load_model, make_sequences
    from excitation.tokens.train import HELD_OUT_SEED

    assert set(report.values) == set(TOKEN_EXPLAINERS) and report.n == 24 and report.accuracy > 0.9
    model, data = load_model(), make_sequences(24, HELD_OUT_SEED)
    with torch.no_grad():
        predicted = model(input_ids=data.input_ids).logits.argmax(1)
    scores = token_attributions(model, data.input_ids, predicted, ig_steps=8)
    for name in TOKEN_EXPLAINERS:
        expected = keyword_scores(scores[name], data.keyword)
        for metric, values in expected.items():
            np.testing.assert_allclose(report.values[name][metric], values, rtol=1e-5, atol=1e-7)
            assert report.means[name][metric].mean == pytest.approx(float(np.mean(values)), rel=1e-9)
    for ours, theirs in PAIRS:
        difference = np.array(report.values[ours]["share"]) - np.array(report.values[theirs]["share"])
        assert report.differences[f"{ours} - {theirs}"]["share"].mean == pytest.approx(float(difference.mean()))
    assert "| input_x_pullback |" in report.table() and "input_x_pullback - gradient_x_input" in report.table()


def test_integrated_gradients_sums_to_the_logit_change_from_a_zero_embedding():
    """Completeness: IG's token scores add up to f(e) - f(0), to the midpoint rule's error."""
    from excitation import api, text
    from excitation.tokens import load_model, make_sequences

    model, data = load_model(), make_sequences(4, 99)
    target = torch.tensor([0, 1, 2, 3])
    scores = token_attributions(model, data.input_ids, target, ig_steps=64, explainers=["integrated_gradients"])
    vanilla = api.prepare(text.embeddings_model(model), excited=False)
    e = model.get_input_embeddings()(data.input_ids).detach()
    mask = torch.ones_like(data.input_ids)
    with torch.no_grad():
        change = vanilla(e, mask).gather(1, target[:, None])[:, 0] - vanilla(0 * e, mask).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(scores["integrated_gradients"].sum(1), change, rtol=2e-2, atol=2e-2)


def test_cli_writes_the_table_the_json_and_the_token_page(tmp_path, capsys):
    from excitation import cli

    out = tmp_path / "tok"
    assert cli.main(["evaluate", "--dataset", "tokens", "--n", "8", "--out", str(out), "--no-progress"]) == 0
    assert (tmp_path / "tok.md").read_text().startswith("# Token attribution on the keyword task")
    page = (tmp_path / "tok_tokens.html").read_text()
    assert page.count('class="excitation-tokens"') == 12 and "KEY" in page
    capsys.readouterr()
    assert cli.main(["evaluate", "--dataset", "tokens", "--model", "digits-a", "--out", str(out)]) == 2
    assert "--model do not apply" in capsys.readouterr().err
