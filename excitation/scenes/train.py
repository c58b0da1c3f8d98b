"""Reproduce the scenes models' weights: ``python -m excitation.scenes.train [--model resnet|vgg|all]``.

Renders the training scenes once (seed :data:`TRAIN_SEED`) and a held-out set from a
seed never used for training (:data:`HELD_OUT_SEED`), trains each model with AdamW,
a one-cycle schedule, BCE-with-logits and random flips / transposes (every class is
closed under them), then writes ``weights/<model>.pt`` (float32 state dict) and
records seeds, wall time, CPU, library versions, held-out mAP and exact-match in
``weights/training.json``.

The committed weights come from::

    python -m excitation.scenes.train                                  # both models, 15 epochs each
    python -m excitation.scenes.train --model vgg --resume --epochs 3 --lr 1e-3

``training.json`` records the machine and the times.  ``--resume`` continues from the
weights in ``--out`` as a further stage; every stage is then recorded under ``stages``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .generate import render_batch
from .models import MODELS, WEIGHTS_DIR, evaluate_model

#: Seed of the training scenes.
TRAIN_SEED = 1
#: Seed of the held-out scenes reported in ``training.json``; never used for training.
HELD_OUT_SEED = 2
#: Seed of the held-out scenes the tests use; never used for training either.
TEST_SEED = 3

DEFAULTS = {"n": 24000, "held_out": 2000, "epochs": 15, "batch": 64, "lr": 3e-3, "size": 64}


def cpu_model() -> str:
    """The CPU's model name, as ``lscpu`` reports it (or the platform's best guess)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or platform.machine()


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """One random flip / transpose for the whole batch; every class is closed under these."""
    flip_x, flip_y, transpose = (torch.rand(3, generator=generator) < 0.5).tolist()
    if flip_x:
        x = x.flip(3)
    if flip_y:
        x = x.flip(2)
    if transpose:
        x = x.transpose(2, 3)
    return x


def train_model(
    name: str,
    train: Tuple[Tensor, Tensor],
    *,
    epochs: int,
    batch: int,
    lr: float,
    init: Optional[Dict[str, Tensor]] = None,
) -> torch.nn.Module:
    """Train model ``name`` from its fixed seed on ``(uint8 images, labels)``; returns it in eval mode.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    train : tuple of Tensor
        ``uint8 [N, 3, H, W]`` images and ``[N, 10]`` multi-hot labels.
    epochs, batch : int
        Passes over the data and scenes per step.
    lr : float
        Peak learning rate of the one-cycle schedule.
    init : dict, optional
        A state dict to continue from instead of the seeded initialisation.

    Returns
    -------
    torch.nn.Module
    """
    from tqdm.auto import tqdm

    spec = MODELS[name]
    torch.manual_seed(spec.seed)
    generator = torch.Generator().manual_seed(spec.seed)
    images, labels = train
    # channels_last roughly doubles oneDNN's convolution speed on CPU.
    model = spec.build()
    if init is not None:
        model.load_state_dict(init)
    else:
        with torch.no_grad():
            # Start the logits at the class prior, so no early steps are spent learning it.
            prior = labels.mean(0).clamp(1e-3, 1 - 1e-3)
            model.head.bias.copy_(torch.log(prior / (1 - prior)))
    model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * ((len(labels) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(total=steps, desc=f"train {name}", unit="step")
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for step, start in enumerate(range(0, len(order), batch)):
            idx = order[start : start + batch]
            x = _augment(images[idx].float() / 255.0, generator).contiguous(memory_format=torch.channels_last)
            loss = F.binary_cross_entropy_with_logits(model(x), labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running:.4f}")
    bar.close()
    return model.to(memory_format=torch.contiguous_format).eval()


def _record(path: Path, name: str, entry: Dict[str, object]) -> None:
    """Merge ``entry`` under ``name`` into the JSON file at ``path``, locked: models may train in parallel."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        text = handle.read()
        record = json.loads(text) if text.strip() else {}
        record[name] = entry
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(record, indent=2, sort_keys=True) + "\n")


def main(argv: Optional[list] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--n", type=int, default=DEFAULTS["n"], help="training scenes")
    parser.add_argument("--held-out", type=int, default=DEFAULTS["held_out"], help="held-out scenes")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    parser.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--seed", type=int, default=TRAIN_SEED, help="seed of the training scenes")
    parser.add_argument("--resume", action="store_true", help="continue from the weights in --out (a further stage)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 is faster on a busy machine)")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where weights and training.json go")
    args = parser.parse_args(argv)
    if args.seed in (HELD_OUT_SEED, TEST_SEED):
        parser.error(f"--seed {args.seed} is reserved for held-out scenes; pick another.")
    torch.set_num_threads(args.threads)
    size = DEFAULTS["size"]

    start = time.perf_counter()
    images, labels, _ = render_batch(args.n, args.seed, size, masks=False, progress=True)
    train = (torch.from_numpy(images), torch.from_numpy(labels))
    held_images, held_labels, _ = render_batch(args.held_out, HELD_OUT_SEED, size, masks=False, progress=True)
    held = (torch.from_numpy(held_images).float() / 255.0, torch.from_numpy(held_labels))
    render_s = time.perf_counter() - start
    print(f"rendered {args.n} training + {args.held_out} held-out scenes in {render_s:.0f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    names = list(MODELS) if args.model == "all" else [args.model]
    for name in names:
        path = args.out / MODELS[name].file
        init, earlier = None, []
        if args.resume:
            init = torch.load(path, map_location="cpu", weights_only=True)
            record = json.loads((args.out / "training.json").read_text()) if (args.out / "training.json").exists() else {}
            previous = dict(record.get(name, {}))
            earlier = previous.pop("stages", None) or ([previous] if previous else [])
        start = time.perf_counter()
        model = train_model(name, train, epochs=args.epochs, batch=args.batch, lr=args.lr, init=init)
        train_s = time.perf_counter() - start
        scores = evaluate_model(model, held[0], held[1])
        torch.save({key: value.detach().clone() for key, value in model.state_dict().items()}, path)
        entry = {
            "model": name,
            "init_seed": MODELS[name].seed,
            "train_seed": args.seed,
            "train_scenes": args.n,
            "held_out_seed": HELD_OUT_SEED,
            "held_out_scenes": args.held_out,
            "size": size,
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "threads": args.threads,
            "parameters": sum(p.numel() for p in model.parameters()),
            "weights_bytes": path.stat().st_size,
            "render_seconds": round(render_s, 1),
            "train_seconds": round(train_s, 1),
            "cpu": cpu_model(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "held_out_map": round(scores["map"], 4),
            "held_out_exact_match": round(scores["exact_match"], 4),
        }
        if args.resume:
            # Each stage as it ran; the top-level numbers describe the final weights.
            entry["stages"] = earlier + [dict(entry, resumed=True)]
            entry["train_seconds"] = round(sum(stage["train_seconds"] for stage in entry["stages"]), 1)
        _record(args.out / "training.json", name, entry)
        print(
            f"{name} (init seed {MODELS[name].seed}, data seed {args.seed}): held-out mAP {scores['map']:.4f}, "
            f"exact-match {scores['exact_match']:.4f} on {args.held_out} scenes of seed {HELD_OUT_SEED}; "
            f"trained in {train_s / 60:.1f} min; {path} ({path.stat().st_size / 1e6:.2f} MB)"
        )


if __name__ == "__main__":
    main()
