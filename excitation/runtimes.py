"""Which PyTorch runtimes keep the excitation backward, as a table the documentation shows.

``tests/test_runtimes.py`` has one test per row (named in the last column), and the
documentation's Runtimes page is generated from :func:`markdown_table` when it is built
(``docs/_ext/excitation_docs.py``), so it cannot drift from what is tested.
"""

from __future__ import annotations

from typing import List, NamedTuple

__all__ = ["Runtime", "RUNTIMES", "markdown_table"]


class Runtime(NamedTuple):
    name: str
    status: str
    notes: str
    test: str


RUNTIMES: List[Runtime] = [
    Runtime("eager autograd: `torch.autograd.grad`, `.backward()`", "yes", "the reference for every other row", "test_eager"),
    Runtime("`torch.compile(excited, fullgraph=True)`, CPU (Inductor C++)", "yes",
            "no graph breaks; matches eager to 1e-4 (kernels reorder float sums)", "test_compile_cpu"),
    Runtime("`torch.compile(excited, dynamic=True)`", "yes",
            "one graph for every input size; the gates' constants are read through "
            "`torch.compiler.assume_constant_result`, so dynamo never makes them symbolic inputs of a backward",
            "test_compile_dynamic_shapes"),
    Runtime("what `torch.compile` sees", "yes",
            "the surrogates' forward and backward inlined as ATen ops (no `excitation::surrogate_*` call left for "
            "Inductor to treat as opaque), except on the CPU the soft-pool backward: one extern "
            "`excitation::soft_max_pool2d_backward` call per pool, 18x faster than Inductor's code for it. "
            "Each exact ReLU runs in a non-reentrant checkpoint there, so the graph keeps `z` and recomputes "
            "`relu(z)` in the backward instead of keeping both (`test_kernels.py::"
            "test_compiled_relu_keeps_the_pre_activation_in_place_of_its_output`). "
            "`torch.export` of the same model keeps the ops",
            "test_compile_inlines_the_surrogates_and_export_keeps_the_ops"),
    Runtime("`torch.compile`, CUDA", "unverified at this version",
            "the test runs wherever a GPU is present and is skipped on CPU-only machines such as CI; "
            "`bash benchmarks/cuda_check.sh` runs it with `benchmarks/compile_probe.py`, which compiles the "
            "all-forms model per rule, per backend and with fusion on and off, and flags any compiled pullback "
            "that is zero or differs from eager",
            "test_compile_cuda"),
    Runtime("`torch.export.export(excited, (x,))` + `ep.module()`", "yes",
            "the graph holds `excitation::surrogate_relu` / `surrogate_batch_norm_relu` / `surrogate_max_pool2d`",
            "test_export"),
    Runtime("`torch.export.save` / `torch.export.load` in a fresh process", "yes",
            "run `import excitation` before `torch.export.load`; without it the load raises (never silently vanilla)",
            "test_export_save_load_fresh_process"),
    Runtime("`ep.run_decompositions()`", "yes", "custom ops are opaque to decompositions: the surrogates stay", "test_run_decompositions"),
    Runtime("`excite(ExportedProgram)` / `excite(ep.module())` (ATen graphs)", "yes",
            "rewrites the ATen form of every rule's op (`aten.relu`, `aten.max_pool2d*`, `aten.gelu`, "
            "`aten.native_layer_norm`, `aten._softmax`, ...); the result exports again. After `run_decompositions()` "
            "SiLU / Hardswish / Hardsigmoid exist only as primitives: excite warns and reports them, so excite first",
            "test_excite_exported_program"),
    Runtime("`torch.func.grad`, `vjp`, `jacrev`", "yes", "an `autograd.Function` twin runs under transforms", "test_func_transforms"),
    Runtime("`torch.func.vmap` over a vjp's cotangents (`excitation.pullbacks`)", "yes",
            "K class pullbacks per input from one forward", "test_vmap_pullbacks"),
    Runtime("`torch.compile(torch.func.grad(...))`", "yes", "", "test_compile_func_grad"),
    Runtime("`torch.jit.trace(excited, x)`", "yes", "TorchScript is deprecated upstream", "test_jit_trace"),
    Runtime("`torch.jit.script(excited)`", "yes",
            "scripts a copy calling `torch.ops.excitation.*` directly (`__prepare_scriptable__`); the attention "
            "rule cannot be scripted and says so (`rules={'attention': False}` or `jit.trace`)", "test_jit_script"),
    Runtime("`torch.compile(model, backend=\"excitation\")`", "yes",
            "rewrites dynamo's graphs; works where `symbolic_trace` fails (data-dependent control flow); tags each "
            "exact ReLU for recompute, as the checkpoint above does (`test_backend_keeps_the_pre_activation_in_place_of_relu_output`); "
            "on float32 CPU graphs each ReLU's backward is one C call, as in the compile view "
            "(`test_backend_runs_the_c_kernels_as_each_relu_backward`)",
            "test_backend_by_name"),
    Runtime("`torch.compile(model, backend=excitation.backend(temp=..., inner=...))`", "yes",
            "options and any inner backend", "test_backend_with_options"),
]


def markdown_table() -> str:
    """The "Runtimes" table, as Markdown."""
    lines = ["| runtime | works | notes | test |", "|---|---|---|---|"]
    for row in RUNTIMES:
        lines.append(f"| {row.name} | {row.status} | {row.notes} | `{row.test}` |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(markdown_table())
