"""excitation.scenes.train: the command that reproduces the committed weights, on a tiny run."""

import json

import pytest
import torch

from excitation.scenes.models import MODELS
from excitation.scenes.train import HELD_OUT_SEED, TEST_SEED, cpu_model, main


def test_tiny_run_writes_loadable_weights_and_record(tmp_path, capsys):
    main(["--model", "all", "--n", "64", "--held-out", "64", "--epochs", "1", "--seed", "7", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "training.json").read_text())
    assert sorted(record) == sorted(MODELS)
    for name, spec in MODELS.items():
        entry = record[name]
        assert entry["train_seed"] == 7 and entry["held_out_seed"] == HELD_OUT_SEED
        assert entry["train_scenes"] == 64 and entry["epochs"] == 1
        assert 0.0 <= entry["held_out_map"] <= 1.0 and 0.0 <= entry["held_out_exact_match"] <= 1.0
        assert entry["cpu"] == cpu_model() and entry["torch"] == torch.__version__
        model = spec.build()
        model.load_state_dict(torch.load(tmp_path / spec.file, map_location="cpu", weights_only=True))
    out = capsys.readouterr().out
    assert "held-out mAP" in out and "exact-match" in out


@pytest.mark.parametrize("seed", [HELD_OUT_SEED, TEST_SEED])
def test_held_out_seeds_cannot_be_trained_on(seed, tmp_path):
    with pytest.raises(SystemExit):
        main(["--seed", str(seed), "--out", str(tmp_path)])
