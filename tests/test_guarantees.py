"""Cross-cutting guarantees: dtypes, layouts, persistence, numerics, threads, devices."""

import copy
import io
import pickle
import threading

import pytest
import torch
import torch.nn as nn

import excitation

from .helpers import AllForms, fingerprint, reference_pullback, rel_err

# Relative L2 error of a pullback computed in `dtype` against the float64 reference.
DTYPE_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = AllForms().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_dtypes_full_model(dtype):
    model64 = _model()
    x64 = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    ref = reference_pullback(model64, x64, 3)
    model = _model(dtype)
    x = x64.to(dtype)
    excited = excitation.excite(model)
    with torch.no_grad():
        assert torch.equal(excited(x), model(x))
    ours = excitation.pullback(excited, x, 3)
    assert ours.dtype == dtype and torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= DTYPE_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dtypes_ops(dtype):
    z = torch.randn(64, 64, dtype=torch.float64)
    zr = z.to(dtype).requires_grad_(True)
    (grad,) = torch.autograd.grad(excitation.surrogate_relu(zr).sum(), zr)
    expected = torch.sigmoid(zr.detach().double() / 0.3)
    assert grad.dtype == dtype and rel_err(grad, expected) <= DTYPE_TOL[dtype] / 10


def test_channels_last_noncontiguous_and_batch_one():
    model = _model()
    x = torch.randn(3, 3, 17, 19, dtype=torch.float64)
    ref = reference_pullback(model, x, 2)
    excited = excitation.excite(model)
    cl = x.to(memory_format=torch.channels_last)
    assert rel_err(excitation.pullback(excited, cl, 2), ref) < 1e-10
    wide = torch.randn(3, 3, 17, 38, dtype=torch.float64)
    wide[..., ::2] = x
    strided = wide[..., ::2]
    assert not strided.is_contiguous()
    assert rel_err(excitation.pullback(excited, strided, 2), ref) < 1e-10
    assert rel_err(excitation.pullback(excited, x[1:2], 2), ref[1:2]) < 1e-10
    cl_model = _model().to(memory_format=torch.channels_last)
    assert rel_err(excitation.pullback(cl_model, cl, 2), ref) < 1e-10


@pytest.mark.parametrize("roundtrip", ["deepcopy", "pickle", "torch.save"])
def test_excited_model_roundtrips(roundtrip):
    model = _model()
    excited = excitation.excite(model)
    if roundtrip == "deepcopy":
        other = copy.deepcopy(excited)
    elif roundtrip == "pickle":
        other = pickle.loads(pickle.dumps(excited))
    else:
        buffer = io.BytesIO()
        torch.save(excited, buffer)
        buffer.seek(0)
        other = torch.load(buffer, weights_only=False)
    assert excitation.is_excited(other)
    assert excitation.report(other).counts() == excitation.report(excited).counts()
    x = torch.randn(2, 3, 17, 19, dtype=torch.float64)
    assert rel_err(excitation.pullback(other, x, 1), reference_pullback(model, x, 1)) < 1e-10


def test_huge_preactivations_and_tiny_temperatures_stay_finite():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, padding=1), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3)).eval()
    with torch.no_grad():
        model[0].weight.mul_(1e28)
    x = torch.randn(2, 1, 8, 8) * 10
    with torch.no_grad():
        assert model[0](x).abs().max() > 1e28
    for temp in (1e-6, 0.3, 1e6):
        grad = excitation.pullback(model, x, 1, temp=temp)
        assert torch.isfinite(grad).all(), temp
    inf_input = torch.tensor([[-float("inf"), -1.0, 0.0, 1.0, float("inf")]], requires_grad=True)
    (g,) = torch.autograd.grad(excitation.surrogate_relu(inf_input, 1e-6).sum(), inf_input)
    assert torch.equal(g, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_two_threads_share_one_excited_model():
    model = _model(torch.float32)
    excited = excitation.excite(model)
    inputs = [torch.randn(2, 3, 17, 19) for _ in range(2)]
    expected = [reference_pullback(model, x, t) for x, t in zip(inputs, (1, 7))]
    results, errors = [None, None], []
    barrier = threading.Barrier(2)

    def work(i, target):
        try:
            barrier.wait()
            for _ in range(5):
                results[i] = excitation.pullback(excited, inputs[i], target)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate((1, 7))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected):
        assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("repeat", range(5))
def test_threads_tracing_while_others_run(repeat):
    # symbolic_trace patches nn.Module.__call__ process-wide: a thread tracing one model
    # must not capture another thread's forward.  Four threads, each on a fresh model.
    models = [_model(torch.float32) for _ in range(4)]
    before = [fingerprint(m) for m in models]
    x = torch.randn(2, 3, 17, 19)
    out, errors = [None] * 4, []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                out[i] = excitation.pullback(models[i], x, 2)
                excitation.clear_cache()  # re-trace on the next call, while others run
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        assert torch.equal(out[i], out[0]) and fingerprint(models[i]) == before[i]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    model = _model(torch.float32)
    x = torch.randn(2, 3, 17, 19)
    cpu = excitation.pullback(model, x, 1)
    cuda_model = _model(torch.float32).cuda()
    assert rel_err(excitation.pullback(cuda_model, x.cuda(), 1).cpu(), cpu) <= 1e-5
