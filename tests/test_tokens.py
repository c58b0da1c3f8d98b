"""excitation/tokens: the keyword task and the transformer trained on it in the repository."""

import json

import pytest
import torch

from excitation.tokens import CLASSES, CLS, KEYWORDS, LENGTH, make_sequences
from excitation.tokens.task import DISTRACTORS, token_names

pytest.importorskip("transformers")

#: Held-out sequences the tests use; neither the training seed nor the evaluation's.
TEST_SEED = 13


def test_each_sequence_is_cls_then_distractors_with_one_keyword_that_is_its_label():
    data = make_sequences(500, TEST_SEED)
    assert data.input_ids.shape == (500, LENGTH) and len(data) == 500
    assert (data.input_ids[:, 0] == CLS).all()
    is_keyword = torch.isin(data.input_ids, torch.tensor(KEYWORDS))
    assert (is_keyword.sum(1) == 1).all()
    assert torch.equal(is_keyword.float().argmax(1), data.keyword)
    assert torch.equal(data.input_ids[torch.arange(500), data.keyword] - KEYWORDS[0], data.labels)
    rest = data.input_ids[:, 1:][~is_keyword[:, 1:]]
    assert ((rest >= DISTRACTORS[0]) & (rest < DISTRACTORS[1])).all()
    assert set(data.labels.tolist()) == set(range(CLASSES)) and set(data.keyword.tolist()) == set(range(1, LENGTH))
    again = make_sequences(500, TEST_SEED)
    assert torch.equal(again.input_ids, data.input_ids)
    assert not torch.equal(make_sequences(500, TEST_SEED + 1).input_ids, data.input_ids)
    assert token_names(data.input_ids[:1])[0][0] == "[CLS]"
    with pytest.raises(ValueError, match="n must be at least 1"):
        make_sequences(0, 0)


def test_the_committed_model_solves_the_task_and_its_record_says_so():
    from excitation.tokens import load_model
    from excitation.tokens.model import WEIGHTS
    from excitation.tokens.train import accuracy

    model = load_model()
    assert not model.training
    assert accuracy(model, 1000, TEST_SEED) >= 0.98  # the aim the weights were trained to
    record = json.loads((WEIGHTS.parent / "training.json").read_text())
    assert record["held_out_accuracy"] >= 0.98 and record["command"] == "python -m excitation.tokens.train"


def test_training_a_few_steps_writes_weights_and_a_record(tmp_path):
    from excitation.tokens import build_model
    from excitation.tokens.train import train

    record = train(tmp_path / "w.pt", n=256, epochs=1, progress=False)
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(state) == set(build_model().state_dict())
    written = json.loads((tmp_path / "training.json").read_text())
    assert written["n"] == 256 and len(written["loss_per_epoch"]) == 1 and 0 <= written["held_out_accuracy"] <= 1
    assert record == written
