"""explain_dispatch: what each site runs, as the dispatch table says and as the kernels then do."""

import pytest
import torch
import torch.nn as nn

import excitation
from excitation.kernels import native


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 6, 3, padding=1), nn.SiLU(), nn.Hardswish(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 4)).to(dtype).eval()


def _table(model, x, runtime="eager"):
    return {d.kind: (d.forward, d.backward) for d in excitation.explain_dispatch(model, x, runtime=runtime)}


@pytest.mark.skipif(not native.available(), reason="the C kernels did not build here")
def test_float32_cpu_eager_runs_the_c_kernels():
    table = _table(_net(), torch.randn(2, 3, 8, 8))
    assert table == {"relu": ("eager (BatchNorm fused)", "c"), "max_pool2d": ("eager", "c"),
                     "silu": ("eager", "relu:c"), "hardswish": ("eager", "c")}


def test_float64_runs_torch_and_compiled_graphs_run_functional_torch_or_extern():
    x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    table = _table(_net(torch.float64), x64)
    assert table == {"relu": ("eager (BatchNorm fused)", "torch"), "max_pool2d": ("eager", "torch_chunked"),
                     "silu": ("eager", "torch"), "hardswish": ("eager", "torch")}
    compiled = _table(_net(), torch.randn(2, 3, 8, 8), runtime="dynamo")
    relu = "c (compiled)" if native.available() else "torch_functional"  # retargeted when compiled
    assert compiled == {"relu": ("twin", relu), "max_pool2d": ("twin", "extern"),
                        "silu": ("twin", "relu:torch_functional"), "hardswish": ("twin", "torch")}
    assert _table(_net(torch.float64), x64, runtime="dynamo")["relu"] == ("twin", "torch_functional")


def test_the_explanation_is_what_runs(monkeypatch):
    # Spy on the C kernels the table names: each must run, in the pullback of the explained model.
    if not native.available():
        pytest.skip("the C kernels did not build here")
    model, x = _net(), torch.randn(2, 3, 8, 8)
    calls = []
    for name in ("batch_norm_relu_gate_backward_unchecked", "soft_max_pool2d_backward", "hardswish_backward",
                 "relu_gate_backward"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    excitation.clear_cache()
    excitation.pullback(model, x, 1)
    assert set(calls) == {"batch_norm_relu_gate_backward_unchecked", "soft_max_pool2d_backward",
                          "hardswish_backward", "relu_gate_backward"}  # fused ReLU, pool, Hardswish, SiLU


def test_bad_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime='jit' is not known"):
        excitation.explain_dispatch(_net(), torch.randn(1, 3, 8, 8), runtime="jit")
