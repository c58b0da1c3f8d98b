"""Op-level profile of one pullback against one vanilla gradient: where the extra time goes.

``python benchmarks/profile_pullback.py [--model resnet50] [--batch 8] [--device cpu|cuda] [--compile]``
prints, for each, the ops with the most self time (device time on CUDA) over a few
calls, from ``torch.profiler``.  ``--compile`` profiles ``torch.compile``d modules (Inductor):
each compiled graph is one "Call CompiledFxGraph" row, so the forward and backward graphs'
own kernels show as their self time beside the extern convolutions.
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch.profiler import ProfilerActivity, profile

import excitation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--compile", action="store_true", help="profile torch.compile'd modules (both)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": True} if args.model in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(args.model, weights=None, **kwargs).eval().to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    excited = excitation.excite(model)
    plain = excitation.prepare(model, excited=False)  # a clone: compiling it leaves the model as it is
    x = torch.rand(args.batch, 3, args.size, args.size, device=device)
    if args.compile:
        excited, plain = torch.compile(excited), torch.compile(plain)

    def input_gradient(module):
        leaf = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(leaf)[:, 1].sum(), leaf)
        return grad

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in (("vanilla gradient", lambda: input_gradient(plain)),
                     ("excitation pullback", lambda: input_gradient(excited))):
        fn()  # warm-up: cuDNN algorithm choice, Triton and Inductor compilation
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        mode = "compiled" if args.compile else "eager"
        print(f"\n## {name}: {args.model}, batch {args.batch}, {device}, {mode}, {args.calls} calls")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
