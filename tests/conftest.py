import os

import pytest
import torch

# Two cores: avoid oversubscription when torch and pytest share the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


TORCH_CONFIGS = ("torch._inductor.config", "torch._dynamo.config", "torch._functorch.config")


def unreadable_config_entries() -> list:
    """Entries of torch's config modules that can no longer be read.

    A config module keeps its values outside ``__dict__``, so ``monkeypatch.setattr`` on it (pytest >= 9.2)
    undoes with ``delattr``, which hides the entry and breaks every later compile in the process.  Patch
    torch configs with ``torch._inductor.config.patch(...)`` and its kin instead.
    """
    import importlib
    import warnings

    broken = []
    for name in TORCH_CONFIGS:
        config = importlib.import_module(name)
        for key in config.get_config_copy():
            try:
                with warnings.catch_warnings():  # reading a deprecated entry warns; only its presence matters
                    warnings.simplefilter("ignore")
                    getattr(config, key)
            except AttributeError:
                broken.append(f"{name}.{key}")
    return broken


@pytest.fixture(scope="session", autouse=True)
def _torch_configs_stay_readable():
    yield
    broken = unreadable_config_entries()
    assert not broken, (f"a test deleted torch config entries {broken}: patch torch configs with "
                        "torch._inductor.config.patch(...) (or torch._dynamo.config.patch), never monkeypatch.setattr")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def all_forms():
    from .helpers import AllForms

    model = AllForms().eval().double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model
