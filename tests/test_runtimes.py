"""One excited graph, every PyTorch runtime: each cell must give the eager excitation pullback.

Every cell asserts two things: the result matches the eager pullback, and it is
*not* the vanilla gradient (torch.export silently dropping an autograd.Function's
backward is the failure this guards against).  The rows of the documentation's
"Runtimes" table name these tests (see excitation/runtimes.py).
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torchvision

import excitation

from .helpers import (ALL_FORMS_RELUS, AllForms, compiled_gradient_and_saved_bytes, eval_with_statistics,
                      frozen_conv_relu_conv, reference_pullback, rel_err, without_recompute_tags)

TARGET = 3
EAGER_TOL = 1e-5
COMPILED_TOL = 1e-4  # compiled kernels reorder floating-point sums


def _all_forms():
    model = AllForms().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 17, 19)


def _torchvision(build):
    model = build().eval()
    return model, torch.randn(2, 3, 64, 64)


# torchvision's own ResNet and DenseNet classes at a depth that compiles in seconds: the same
# op forms as resnet50 and densenet121 (bottlenecks with downsample shortcuts, BatchNorm -> ReLU,
# the max-pool stem; concatenated pre-activation BatchNorm -> ReLU, average-pool transitions),
# where graph size, not op variety, is what makes the full-depth models slow to compile.
# The full-depth models run eagerly in the zoo tests.
BUILDERS = {
    "all_forms": _all_forms,
    "resnet": lambda: _torchvision(
        lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
    ),
    "densenet": lambda: _torchvision(
        lambda: torchvision.models.DenseNet(growth_rate=12, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2)
    ),
}
# Inductor's C++ build of a DenseNet's many concatenations is slow on two cores, so its torch.compile
# cells use aot_eager (dynamo + AOTAutograd, where a dropped backward would show); Inductor still
# compiles it in test_backend_by_name.
COMPILE_BACKEND = {"all_forms": "inductor", "resnet": "inductor", "densenet": "aot_eager"}


class Case:
    def __init__(self, name):
        torch.manual_seed(0)
        self.name = name
        self.model, self.x = BUILDERS[name]()
        self.excited = excitation.excite(self.model)
        self.eager = excitation.pullback(self.excited, self.x, TARGET)
        self.vanilla = excitation.gradient(self.model, self.x, TARGET)
        assert rel_err(self.eager, self.vanilla) > 0.05  # the guard below is meaningful

    def check(self, result, tol=EAGER_TOL):
        assert rel_err(result, self.vanilla) > 0.05, "returned the vanilla gradient"
        assert rel_err(result, self.eager) <= tol

    def score(self, module):
        return lambda inp: module(inp)[:, TARGET].sum()


_CASES = {}


def _case(name):
    if name not in _CASES:
        _CASES[name] = Case(name)
    return _CASES[name]


@pytest.fixture(params=sorted(BUILDERS))
def case(request):
    return _case(request.param)


def _leaf(x):
    return x.detach().clone().requires_grad_(True)


def test_eager(case):
    assert rel_err(case.eager, reference_pullback(case.model, case.x, TARGET)) <= EAGER_TOL
    leaf = _leaf(case.x)
    case.excited(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad)
    leaf = _leaf(case.x)
    (grad,) = torch.autograd.grad(case.excited(leaf)[:, TARGET].sum(), leaf)
    case.check(grad)


def test_compile_cpu(case):
    torch._dynamo.reset()
    compiled = torch.compile(case.excited, fullgraph=True, backend=COMPILE_BACKEND[case.name])
    leaf = _leaf(case.x)
    out = compiled(leaf)
    assert rel_err(out, case.excited(case.x)) <= 1e-5
    out[:, TARGET].sum().backward()
    case.check(leaf.grad, COMPILED_TOL)


@pytest.mark.parametrize("name", ["all_forms", "resnet"])
def test_compile_dynamic_shapes(name):
    """dynamic=True: one compiled graph serves other input sizes (symbolic sizes reach every surrogate)."""
    case = _case(name)
    torch._dynamo.reset()
    compiled = torch.compile(case.excited, dynamic=True, backend="aot_eager")
    for x in (case.x, torch.randn(case.x.shape[0] + 1, 3, case.x.shape[2] + 5, case.x.shape[3] + 3)):
        leaf = _leaf(x)
        compiled(leaf)[:, TARGET].sum().backward()
        assert rel_err(leaf.grad, excitation.pullback(case.excited, x, TARGET)) <= COMPILED_TOL
        assert rel_err(leaf.grad, excitation.gradient(case.model, x, TARGET)) > 0.05


def _compiled_ops(fn, x, backend=None, select=lambda out: out.sum()):
    """Compile ``fn`` through AOTAutograd (inside ``backend(inner)`` if given), capturing its forward and backward
    graphs: the input gradient of ``select(fn(x))``, the number of graphs and the ops they call."""
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    inner = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    torch._dynamo.reset()
    leaf = _leaf(x)
    select(torch.compile(fn, backend=inner if backend is None else backend(inner), fullgraph=True)(leaf)).backward()
    return leaf.grad, len(graphs), [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


def _with_or_without_c_kernels(c_kernels, monkeypatch):
    from excitation.kernels import compiled, native

    if c_kernels and not native.available():
        pytest.skip(f"the C kernels did not build here: {native.status()}")
    if not c_kernels:
        monkeypatch.setattr(compiled, "_c_kernels_built", lambda: False)


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c_kernels", "torch_gate"])
def test_compile_inlines_the_surrogates_and_export_keeps_the_ops(c_kernels, monkeypatch):
    """Compiled, no surrogate op is called: on the CPU each ReLU's backward is one extern call of its C kernel
    (``kernels/compiled.py``), or, without the kernels, the gate Inductor compiles; export keeps our ops."""
    _with_or_without_c_kernels(c_kernels, monkeypatch)
    case = _case("all_forms")
    grad, n_graphs, targets = _compiled_ops(case.excited, case.x, select=lambda out: out[:, TARGET].sum())
    case.check(grad)
    assert n_graphs == 2 and "aten.threshold_backward.default" not in targets
    assert not [t for t in targets if t.startswith("excitation.surrogate_")]
    externs = sum(targets.count(f"excitation.{op}.default")
                  for op in ("relu_gate_backward_cpu", "batch_norm_relu_backward_cpu"))
    if c_kernels:
        assert externs == ALL_FORMS_RELUS and "aten.softplus_backward.default" not in targets
    else:
        assert externs == 0 and "aten.softplus_backward.default" in targets  # the gate, visible to the compiler
    # ... while the CPU soft-pool backward stays one extern call (Inductor's own code for it is ~18x slower).
    pools = sum(site.kind == "max_pool2d" for site in excitation.report(case.excited).sites)
    assert pools == 5 and targets.count("excitation.soft_max_pool2d_backward.default") == pools
    exported = [str(n.target) for n in torch.export.export(case.excited, (case.x,)).graph.nodes]
    relu_ops = ("excitation.surrogate_relu.default", "excitation.surrogate_batch_norm_relu.default")
    assert any(op in exported for op in relu_ops) and "excitation.surrogate_max_pool2d.default" in exported


def test_compile_has_no_graph_breaks(case):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(case.excited)(case.x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_compile_cuda(case):
    torch._dynamo.reset()
    model = case.excited.cuda()
    try:
        leaf = _leaf(case.x.cuda())
        torch.compile(model, fullgraph=True)(leaf)[:, TARGET].sum().backward()
        case.check(leaf.grad.cpu(), COMPILED_TOL)
    finally:
        case.excited.cpu()


def test_export(case):
    ep = torch.export.export(case.excited, (case.x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    report = excitation.report(case.excited).counts()
    fused = sum(site.fused is not None for site in excitation.report(case.excited).sites)
    assert targets.count("excitation.surrogate_batch_norm_relu.default") == fused  # BatchNorm -> ReLU fused
    assert targets.count("excitation.surrogate_relu.default") == report["relu"] - fused
    assert targets.count("excitation.surrogate_max_pool2d.default") == report["max_pool2d"]
    leaf = _leaf(case.x)
    ep.module()(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad)


def test_export_save_load_fresh_process(case, tmp_path):
    ep = torch.export.export(case.excited, (case.x,))
    torch.export.save(ep, tmp_path / "excited.pt2")
    torch.save(case.x, tmp_path / "x.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        {{imports}}
        ep = torch.export.load(sys.argv[1] + "/excited.pt2")
        x = torch.load(sys.argv[1] + "/x.pt").requires_grad_(True)
        ep.module()(x)[:, {TARGET}].sum().backward()
        torch.save(x.grad, sys.argv[1] + "/grad.pt")
        """
    )
    run = lambda imports: subprocess.run(
        [sys.executable, "-c", script.replace("{imports}", imports), str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    done = run("import excitation")
    assert done.returncode == 0, done.stderr[-2000:]
    case.check(torch.load(tmp_path / "grad.pt"))
    # Without the import the load fails loudly instead of returning vanilla gradients.
    (tmp_path / "grad.pt").unlink()
    failed = run("")
    assert failed.returncode != 0 and not (tmp_path / "grad.pt").exists()


def test_run_decompositions(case):
    ep = torch.export.export(case.excited, (case.x,)).run_decompositions()
    relu_ops = ("excitation.surrogate_relu.default", "excitation.surrogate_batch_norm_relu.default")
    assert any(str(n.target) in relu_ops for n in ep.graph.nodes)
    leaf = _leaf(case.x)
    ep.module()(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad)


def test_excite_exported_program(case):
    vanilla_ep = torch.export.export(case.model, (case.x,))
    aten_targets = {str(n.target) for n in vanilla_ep.graph.nodes}
    assert aten_targets & {"aten.relu.default", "aten.relu_.default"}
    for source in (vanilla_ep, vanilla_ep.module(), vanilla_ep.run_decompositions()):
        excited = excitation.excite(source)
        assert excitation.report(excited).counts() == excitation.report(case.excited).counts()
        leaf = _leaf(case.x)
        excited(leaf)[:, TARGET].sum().backward()
        case.check(leaf.grad)
    again = torch.export.export(excited, (case.x,))
    leaf = _leaf(case.x)
    again.module()(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad)


def test_func_transforms(case):
    score = case.score(case.excited)
    case.check(torch.func.grad(score)(case.x))
    out, vjp = torch.func.vjp(case.excited, case.x)
    cotangent = torch.zeros_like(out)
    cotangent[:, TARGET] = 1
    case.check(vjp(cotangent)[0])
    # jacrev of the target logits: [N, N, C, H, W]; sample i's pullback sits on the diagonal.
    jacobian = torch.func.jacrev(lambda inp: case.excited(inp)[:, TARGET])(case.x)
    case.check(torch.stack([jacobian[i, i] for i in range(case.x.shape[0])]))


def test_vmap_pullbacks(case):
    grids = excitation.pullbacks(case.excited, case.x, [TARGET, 0])
    case.check(grids[:, 0])
    assert rel_err(grids[:, 1], excitation.pullback(case.excited, case.x, 0)) <= EAGER_TOL


def test_compile_func_grad(case):
    torch._dynamo.reset()
    grad = torch.compile(torch.func.grad(case.score(case.excited)), backend=COMPILE_BACKEND[case.name])(case.x)
    case.check(grad, COMPILED_TOL)


def test_jit_trace(case):
    traced = torch.jit.trace(case.excited, case.x, check_trace=False)
    leaf = _leaf(case.x)
    traced(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad)


@pytest.mark.skipif(not hasattr(torch.jit, "script"), reason="this torch has no TorchScript")
def test_jit_script(case):
    scripted = torch.jit.script(case.excited)
    leaf = _leaf(case.x)
    out = scripted(leaf)
    assert torch.equal(out, case.excited(case.x))
    out[:, TARGET].sum().backward()
    case.check(leaf.grad)


def test_backend_by_name(case):
    torch._dynamo.reset()
    compiled = torch.compile(case.model, backend="excitation")
    leaf = _leaf(case.x)
    compiled(leaf)[:, TARGET].sum().backward()
    case.check(leaf.grad, COMPILED_TOL)


def test_backend_with_options(case):
    torch._dynamo.reset()
    backend = excitation.backend(temp=0.5, pool_temp=0.2, inner="aot_eager")
    leaf = _leaf(case.x)
    torch.compile(case.model, backend=backend)(leaf)[:, TARGET].sum().backward()
    expected = excitation.pullback(case.model, case.x, TARGET, temp=0.5, pool_temp=0.2)
    assert rel_err(leaf.grad, expected) <= COMPILED_TOL
    counts = {"relu": 0, "max_pool2d": 0}
    for report in backend.reports:
        for kind, n in report.counts().items():
            counts[kind] += n
    assert counts == excitation.report(case.excited).counts()


@pytest.mark.parametrize("c_kernels", [True, False], ids=["c_kernels", "torch_gate"])
def test_backend_runs_the_c_kernels_as_each_relu_backward(c_kernels, monkeypatch):
    """On float32 CPU graphs the backend, like the compile view, makes each ReLU's backward one extern C call
    (not without the kernels)."""
    _with_or_without_c_kernels(c_kernels, monkeypatch)
    case = _case("all_forms")
    grad, _, targets = _compiled_ops(case.model, case.x, lambda inner: excitation.backend(inner=inner),
                                     select=lambda out: out[:, TARGET].sum())
    case.check(grad, COMPILED_TOL)
    externs = targets.count("excitation.relu_gate_backward_cpu.default")
    if c_kernels is True:
        assert externs == ALL_FORMS_RELUS and "aten.softplus_backward.default" not in targets
    else:
        assert externs == 0 and targets.count("aten.softplus_backward.default") == ALL_FORMS_RELUS


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained"])
def test_backend_fuses_a_frozen_batch_norm_into_its_relus_c_backward(frozen):
    """A frozen eval-mode BatchNorm feeding a ReLU site alone: one C call for both backwards, values unchanged.

    BatchNorms whose parameters need gradients keep the separate backward (the C kernel returns the
    input's gradient only): their gradients must equal the eager pullback's.
    """
    from excitation.kernels import native

    if not native.available():
        pytest.skip(f"the C kernels did not build here: {native.status()}")
    torch.manual_seed(0)
    model = eval_with_statistics(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                               nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), frozen=frozen)
    x = torch.randn(2, 3, 12, 12)
    grad, _, targets = _compiled_ops(model, x, lambda inner: excitation.backend(inner=inner))
    bn_params = {name: p.grad for name, p in model.named_parameters() if name.startswith(("1.", "4."))}
    model.zero_grad(set_to_none=True)
    leaf = _leaf(x)
    excitation.excite(model, fuse=False)(leaf).sum().backward()
    assert rel_err(grad, leaf.grad) <= COMPILED_TOL
    fused = targets.count("excitation.batch_norm_relu_backward_cpu.default")
    unfused = targets.count("excitation.relu_gate_backward_cpu.default")
    if frozen:
        assert (fused, unfused) == (2, 0)
    else:
        assert (fused, unfused) == (0, 2)
        for name, value in bn_params.items():
            assert rel_err(value, dict(model.named_parameters())[name].grad) <= COMPILED_TOL, name


def test_backend_leaves_other_dtypes_to_the_compiler():
    """A float64 graph has no C kernel: its sites keep the gate the compiler writes, with the same values."""
    model, x, _ = frozen_conv_relu_conv()
    model, x = model.double(), x.double()
    grad, _, targets = _compiled_ops(model, x, lambda inner: excitation.backend(inner=inner))
    expected = excitation.pullback(model, x, lambda out: out.sum((1, 2, 3)))
    assert rel_err(grad, expected) <= 1e-12
    assert "aten.softplus_backward.default" in targets
    assert "excitation.relu_gate_backward_cpu.default" not in targets


@pytest.mark.parametrize("inner", ["inductor", "aot_eager"])
def test_backend_keeps_the_pre_activation_in_place_of_relu_output(inner):
    """The backend tags each exact ReLU for recompute: compiled, it keeps z where vanilla keeps relu(z)."""
    from excitation.kernels import surrogate_relu
    from excitation.kernels.compiled import relu_with_c_backward

    model, x, z_bytes = frozen_conv_relu_conv()
    expected = excitation.pullback(model, x, lambda out: out.sum((1, 2, 3)))
    _, vanilla_bytes = compiled_gradient_and_saved_bytes(model, x, inner)
    grad, ours_bytes = compiled_gradient_and_saved_bytes(model, x, excitation.backend(inner=inner))
    assert rel_err(grad, expected) <= COMPILED_TOL and ours_bytes == vanilla_bytes
    untagged = excitation.backend(inner=without_recompute_tags((surrogate_relu, relu_with_c_backward), inner))
    grad, both_bytes = compiled_gradient_and_saved_bytes(model, x, untagged)
    assert rel_err(grad, expected) <= COMPILED_TOL and both_bytes == vanilla_bytes + z_bytes


def test_backend_keeps_concatenated_relus_as_their_pre_activations():
    """A cat of tagged ReLUs is tagged too: the backend's graph keeps the z's, not the concatenation beside them."""
    from .test_compiled import Inception, _eval_model

    model = _eval_model(Inception())
    x = torch.rand(2, 8, 16, 16)
    expected = excitation.pullback(model, x, lambda out: out.sum(1))
    _, vanilla_bytes = compiled_gradient_and_saved_bytes(model, x, "inductor")
    grad, ours_bytes = compiled_gradient_and_saved_bytes(model, x, excitation.backend())
    assert rel_err(grad, expected) <= COMPILED_TOL
    z_bytes = 2 * 32 * 16 * 16 * 4
    assert z_bytes <= ours_bytes < z_bytes + 2 * 8 * 16 * 16 * 4 + 4096 and ours_bytes < vanilla_bytes


class DataDependent(nn.Module):
    """``symbolic_trace`` cannot follow ``if x.sum() > 0``; dynamo can (a graph break)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        if h.mean() > 0.25:
            h = nn.functional.max_pool2d(h, 2)
        else:
            h = nn.functional.relu(h - 0.1)
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("shift", [0.0, 3.0], ids=["relu-branch", "pool-branch"])
def test_backend_handles_data_dependent_control_flow(shift):
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(2, 3, 8, 8) + shift
    with pytest.raises(excitation.ExcitationTraceError):
        excitation.excite(model)
    torch._dynamo.reset()
    backend = excitation.backend(inner="aot_eager")
    leaf = _leaf(x)
    torch.compile(model, backend=backend)(leaf)[:, 1].sum().backward()
    expected = reference_pullback(model, x, 1)
    assert rel_err(leaf.grad, expected) <= COMPILED_TOL
    leaf2 = _leaf(x)
    model(leaf2)[:, 1].sum().backward()
    assert rel_err(leaf.grad, leaf2.grad) > 0.05
    assert sum(r.counts()["relu"] for r in backend.reports) >= 2


def test_backend_rejects_bad_options():
    with pytest.raises(ValueError, match="temp"):
        excitation.backend(temp=-1)
    with pytest.raises(ValueError, match="gate"):
        excitation.backend(gate="step")
    with pytest.raises(TypeError, match="inner"):
        excitation.backend(inner=3)


def test_compile_dynamic_shapes_with_the_semantic_preset():
    """dynamic=True with the Phi gate and the weights-only pool: their backward constants stay constants.

    Why a test: dynamo (2.14) makes module-level floats symbolic under dynamic=True and then cannot
    lift them into a traced custom backward; the constants are read through ``traced_constant``.
    """
    torch.manual_seed(0)
    model, x = torchvision.models.resnet18(weights=None).eval(), torch.randn(2, 3, 40, 40)
    excited = excitation.excite(model, preset="semantic")
    torch._dynamo.reset()
    compiled = torch.compile(excited, dynamic=True, backend="aot_eager")
    for sample in (x, torch.randn(3, 3, 45, 43)):
        leaf = _leaf(sample)
        compiled(leaf)[:, TARGET].sum().backward()
        assert rel_err(leaf.grad, excitation.pullback(excited, sample, TARGET)) <= COMPILED_TOL
        assert rel_err(leaf.grad, excitation.gradient(model, sample, TARGET)) > 0.05
