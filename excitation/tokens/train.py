"""Reproduce the keyword task's weights: ``python -m excitation.tokens.train``.

Draws the training sequences (seed :data:`TRAIN_SEED`) and held-out ones (:data:`HELD_OUT_SEED`,
never trained on), trains the classifier with AdamW and cross-entropy, then writes
``weights/keyword.pt`` (float32 state dict) and records seeds, wall time, CPU, library versions
and held-out accuracy in ``weights/training.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import CONFIG, WEIGHTS, build_model
from .task import make_sequences

#: Seed of the training sequences.
TRAIN_SEED = 11
#: Seed of the held-out sequences in ``training.json`` and of ``excitation evaluate --dataset tokens``.
HELD_OUT_SEED = 12

DEFAULTS = {"n": 8000, "held_out": 2000, "epochs": 12, "batch": 128, "lr": 3e-3}


def accuracy(model: torch.nn.Module, n: int, seed: int) -> float:
    """Held-out accuracy of ``model`` on ``n`` sequences drawn with ``seed``."""
    data = make_sequences(n, seed)
    with torch.no_grad():
        logits = model(input_ids=data.input_ids).logits
    return float((logits.argmax(1) == data.labels).float().mean())


def train(out: Path = WEIGHTS, *, n: int = DEFAULTS["n"], epochs: int = DEFAULTS["epochs"],
          batch: int = DEFAULTS["batch"], lr: float = DEFAULTS["lr"], seed: int = 0, progress: bool = True) -> dict:
    """Train, write ``out`` and ``training.json`` beside it; return the record."""
    from ..bench import cpu_model

    start = time.perf_counter()
    data = make_sequences(n, TRAIN_SEED)
    model = build_model(seed).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for i in range(0, n, batch):
            index = order[i:i + batch]
            loss = F.cross_entropy(model(input_ids=data.input_ids[index]).logits, data.labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / n)
        if progress:
            print(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}", flush=True)
    model.eval()
    held_out = accuracy(model, DEFAULTS["held_out"], HELD_OUT_SEED)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    import transformers

    record = {
        "command": "python -m excitation.tokens.train", "train_seed": TRAIN_SEED, "held_out_seed": HELD_OUT_SEED,
        "n": n, "epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "config": CONFIG,
        "loss_per_epoch": [round(v, 5) for v in losses], "held_out_accuracy": held_out,
        "held_out_n": DEFAULTS["held_out"], "seconds": round(time.perf_counter() - start, 1), "cpu": cpu_model(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    (out.parent / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--n", type=int, default=DEFAULTS["n"])
    args = parser.parse_args()
    record = train(args.out, n=args.n, epochs=args.epochs)
    print(f"held-out accuracy {record['held_out_accuracy']:.4f} in {record['seconds']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
