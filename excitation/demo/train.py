"""Reproduce the demo's weights: ``python -m excitation.demo.train``.

Trains DigitsA (seed 1) and DigitsB (seed 2) on the digits training split with
Adam and random +-2 pixel shifts, then writes ``weights/digits_{a,b}.pt`` and
prints the held-out accuracy of each.  Takes about half a minute on 2 cores.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .digits import MODELS, WEIGHTS_DIR, load_digits

EPOCHS = 30
BATCH = 64


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    dx, dy = (torch.randint(-2, 3, (2,), generator=generator)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def train(name: str, epochs: int = EPOCHS) -> float:
    spec = MODELS[name]
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    (x_train, y_train), (x_test, y_test) = load_digits()
    model = spec.cls()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            loss = F.cross_entropy(model(_shift(x_train[idx], generator)), y_train[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        schedule.step()
    WEIGHTS_DIR.mkdir(exist_ok=True)
    torch.save(model.state_dict(), WEIGHTS_DIR / spec.file)
    return accuracy(model, x_test, y_test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in MODELS:
        acc = train(name, args.epochs)
        print(f"model {name} (seed {MODELS[name].seed}): held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
