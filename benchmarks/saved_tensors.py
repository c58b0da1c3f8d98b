"""What a pullback keeps for its backward, tensor by tensor: vanilla against ours, eager or compiled.

    python benchmarks/saved_tensors.py --model googlenet --batch 4 [--compile] [--top 20]

Lists the unique storages autograd saves during one call (the same census as ``excitation
bench``'s memory column), grouped by dtype and shape, for the vanilla gradient and for our
pullback, side by side: the first thing to read when a memory ratio is off.  Counts are
bytes, so the result is the same on every machine.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Callable, Dict, Tuple

import torch
import torchvision

import excitation

Key = Tuple[str, Tuple[int, ...]]


def census(fn: Callable[[], object]) -> Dict[Key, int]:
    """``{(dtype, shape): count}`` of the unique storages saved for backward while ``fn`` runs."""
    seen: Dict[int, Key] = {}

    def pack(tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        # A storage saved as several views counts once, under its largest view.
        key = (str(tensor.dtype).replace("torch.", ""), tuple(tensor.shape))
        old = seen.get(storage.data_ptr())
        if old is None or tensor.numel() > torch.Size(old[1]).numel():
            seen[storage.data_ptr()] = key
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return Counter(seen.values())


def _bytes(key: Key) -> int:
    dtype, shape = key
    return torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="googlenet")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="census of torch.compile'd vanilla and ours")
    parser.add_argument("--top", type=int, default=25, help="rows to print, largest difference first")
    args = parser.parse_args()

    kwargs = {"aux_logits": False, "init_weights": True} if args.model in ("googlenet", "inception_v3") else {}
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, **kwargs).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ours = excitation.excite(model)
    if args.compile:
        model, ours = torch.compile(model), torch.compile(ours)
    x = torch.rand(args.batch, 3, args.size, args.size)

    def run(module):
        leaf = x.clone().requires_grad_(True)
        out = module(leaf)
        return torch.autograd.grad(out[:, 0].sum(), leaf)

    for module in (model, ours):
        run(module)  # compile / warm up outside the census
    counts = {"vanilla": census(lambda: run(model)), "ours": census(lambda: run(ours))}
    keys = set(counts["vanilla"]) | set(counts["ours"])
    rows = sorted(keys, key=lambda k: -abs(counts["ours"][k] - counts["vanilla"][k]) * _bytes(k))
    print(f"{args.model}, batch {args.batch}, {args.size}², {'compiled' if args.compile else 'eager'}: "
          f"saved storages by dtype and shape (MiB = count x size)")
    print("| dtype | shape | MiB each | vanilla | ours | difference, MiB |")
    print("|---|---|---|---|---|---|")
    for key in rows[: args.top]:
        v, o = counts["vanilla"][key], counts["ours"][key]
        print(f"| {key[0]} | {list(key[1])} | {_bytes(key) / 2**20:.2f} | {v} | {o} | {(o - v) * _bytes(key) / 2**20:+.1f} |")
    total = {name: sum(n * _bytes(k) for k, n in c.items()) / 2**20 for name, c in counts.items()}
    print(f"\ntotal: vanilla {total['vanilla']:.1f} MiB, ours {total['ours']:.1f} MiB, "
          f"ratio {total['ours'] / total['vanilla']:.3f}")


if __name__ == "__main__":
    main()
