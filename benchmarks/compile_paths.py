"""The two ways to compile a pullback, against compiled vanilla: ``torch.compile(excite(m))`` and ``backend="excitation"``.

    python benchmarks/compile_paths.py --model densenet121 --batch 4 [--rounds 8]

Times, in one process and interleaved round by round, the input gradient of one logit per
image (random weights, frozen, 224²) through:

* ``torch.compile(model)``: the vanilla gradient, the denominator;
* ``torch.compile(excite(model))``: the compile view (fused BatchNorm -> ReLU sites, C backward);
* ``torch.compile(model, backend="excitation")``: the backend, with its C backward at each ReLU;
* the backend with its C-backward lowering skipped (stem recompute kept), to show what it buys.

Prints the median ms per call, the saved bytes (autograd's saved storages, as ``excitation
bench`` counts them) and both as ratios to compiled vanilla, with the CPU named.  ``excitation
bench --compile`` has the first three rows too; this script adds the backend without the C
backward, the last column of docs/performance/intel-xeon.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict

import torch
import torchvision

import excitation
from excitation.bench import _input_gradient, _saved_bytes, cpu_model


def _without_c_backward() -> Callable:
    """The backend's steps with the lowering's C backward off (recompute tags kept): a benchmark-only compiler."""
    from torch._dynamo.backends.registry import lookup_backend

    from excitation.fxpass.dynamo_names import name_dynamo_nodes
    from excitation.fxpass.lowering import lower

    def compile_graph(gm, example_inputs):
        name_dynamo_nodes(gm)
        excitation.excite_graph(gm)
        if lower(gm, mark="tag", c_backward=False).code_changed:
            gm.recompile()
        return lookup_backend("inductor")(gm, example_inputs)

    return compile_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if args.model in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(args.model, weights=None, **kwargs).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    x = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.zeros(args.batch, dtype=torch.long)

    torch._dynamo.reset()
    modules: Dict[str, Callable] = {
        "vanilla, compiled": torch.compile(model),
        "excite(model), compiled (the compile view)": torch.compile(excitation.excite(model)),
        'backend="excitation"': torch.compile(model, backend=excitation.backend()),
        'backend="excitation", without the C backward': torch.compile(model, backend=_without_c_backward()),
    }
    methods = {name: (lambda module: lambda x, t: _input_gradient(module, x, t))(module)
               for name, module in modules.items()}

    results = {name: fn(x, target) for name, fn in methods.items()}  # warm-up and compile
    reference = results["excite(model), compiled (the compile view)"]
    for name, grad in results.items():
        if name != "vanilla, compiled":
            err = ((grad - reference).norm() / reference.norm()).item()
            if not err < 1e-4:
                raise SystemExit(f"{name} differs from the compile view's pullback (rel. {err:.2e})")
    times: Dict[str, list] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn(x, target)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["vanilla, compiled"])
    saved = {name: _saved_bytes(fn, x, target) for name, fn in methods.items()}
    print(f"{args.model}, batch {args.batch}, {args.size}², {cpu_model()}, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds")
    print("| method | ms (median) | time / compiled vanilla | saved MiB | memory / compiled vanilla |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e3:.1f} | {median / base:.3f} | {saved[name] / 2**20:.0f} | "
              f"{saved[name] / saved['vanilla, compiled']:.3f} |")


if __name__ == "__main__":
    main()
