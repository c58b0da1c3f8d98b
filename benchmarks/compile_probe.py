"""Which excitation configurations does ``torch.compile`` get right on this device?  A bisection aid.

``python benchmarks/compile_probe.py [--device cuda]``.  Compiles ``tests.helpers.AllForms``
in every configuration (fusion on/off, which rules, backend) and prints one row per configuration
with the relative difference of the compiled pullback to the eager one and to zero, so one run on
a device shows which configuration, if any, breaks there.  Rows: ``ok`` (matches eager to 1e-3: TF32 convolutions differ by ~1e-3),
``ZERO`` (the silent failure), ``WRONG`` (anything else).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import excitation  # noqa: E402
from tests.helpers import AllForms  # noqa: E402


def _pullback(module, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    module(leaf)[:, 1].sum().backward()
    return leaf.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AllForms().eval().to(device)
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 17, 19, device=device)
    print(f"device {device}, torch {torch.__version__}")
    print("| fuse | rules | backend | rel. diff to eager | |compiled| / |eager| | verdict |")
    print("|---|---|---|---|---|---|")
    for fuse in (True, False):
        for rules in (None, ["relu"], ["max_pool"]):
            excited = excitation.excite(model, fuse=fuse, rules=rules)
            eager = _pullback(excited, x)
            for backend in ("aot_eager", "inductor"):
                torch._dynamo.reset()
                try:
                    got = _pullback(torch.compile(excited, backend=backend, fullgraph=True), x)
                except Exception as exc:  # a crash is a finding too
                    print(f"| {fuse} | {rules or 'all'} | {backend} | fails: {type(exc).__name__}: {str(exc)[:80]} | | |")
                    continue
                diff = float((got - eager).norm() / eager.norm())
                scale = float(got.norm() / eager.norm())
                verdict = "ok" if diff < 1e-3 else ("ZERO" if scale < 1e-6 else "WRONG")
                print(f"| {fuse} | {rules or 'all'} | {backend} | {diff:.2e} | {scale:.3f} | {verdict} |")


if __name__ == "__main__":
    main()
