"""calibrate() on every timm model module that takes the dynamo path (the rows of docs/zoo-timm.json).

For each: the zoo's model at the zoo's input size (random weights, zero weights re-initialised),
``excitation.calibrate`` on two random batches, then ``excitation.pullback(..., temps=...)``.
A row records how many keys calibrate returned, how many of the compiled sites took their
calibrated temperature, whether the pullback is finite, how far it is from the default-temperature
pullback, and the seconds it all took (compiles included).

    python benchmarks/calibrate_dynamo_timm.py --out docs/calibrate-dynamo-timm.md
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import excitation
from excitation import api
from excitation.bench import cpu_model
from excitation.zoo_timm import reinit_zero_weights


def _row(module: str, name: str, side: int) -> dict:
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = timm.create_model(name, pretrained=False, img_size=side)
        except TypeError:
            model = timm.create_model(name, pretrained=False)
    model.eval()
    reinit_zero_weights(model)
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(1, 3, side, side, generator=generator) for _ in range(2)]
    start = time.perf_counter()
    temps = excitation.calibrate(model, batches, progress=False)
    default = excitation.pullback(model, batches[0], 1)
    got = excitation.pullback(model, batches[0], 1, temps=temps)
    seconds = time.perf_counter() - start
    prepared = api.prepare(model, temps=temps)
    tempered = [site for site in prepared.report().sites if site.temp is not None]
    applied = sum(site.temp == temps.get(site.node, temps.get(site.name)) for site in tempered)
    diff = float((got - default).norm() / default.norm().clamp_min(1e-30))
    return {"module": module, "model": name, "size": side, "path": api.path_of(prepared), "keys": len(temps),
            "tempered_sites": len(tempered), "applied": applied, "finite": bool(torch.isfinite(got).all()),
            "rel_diff_from_default": diff, "seconds": seconds,
            "temp_min": min(temps.values()) if temps else None, "temp_max": max(temps.values()) if temps else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path("docs/zoo-timm.json"))
    parser.add_argument("--out", type=Path, required=True, help="Markdown page (JSON beside it)")
    args = parser.parse_args()
    zoo = [row for row in json.loads(args.zoo.read_text()) if row.get("path") == "dynamo"]
    rows = []
    for entry in zoo:
        try:
            row = _row(entry["module"], entry["model"], entry["size"])
        except Exception as exc:  # noqa: BLE001 - one row per model
            row = {"module": entry["module"], "model": entry["model"], "size": entry["size"],
                   "error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        api.clear_cache()
        torch._dynamo.reset()
    ok = [row for row in rows if "error" not in row]
    complete = [row for row in ok if row["applied"] == row["tempered_sites"] == row["keys"] and row["finite"]]
    lines = [
        "# calibrate() on the dynamo-path timm modules",
        "",
        f"`python benchmarks/calibrate_dynamo_timm.py --out {args.out}` ({time.strftime('%Y-%m-%d')}, "
        f"{cpu_model()}, torch {torch.__version__}): every module of [zoo-timm.md](zoo-timm.md) that takes the dynamo "
        f"path, its zoo model at the zoo's input size, random weights, calibrated on two random images.",
        "",
        f"**{len(ok)}/{len(rows)} calibrated · {len(complete)}/{len(rows)} with every key applied to its site and a "
        f"finite pullback**",
        "",
        "| module | model | input | keys | tempered sites | applied | finite | rel. diff from default temps | temps (min-max) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['module']} | {row['model']} | {row['size']} | error: {row['error']} |||||||")
            continue
        lines.append(
            f"| {row['module']} | {row['model']} | {row['size']} | {row['keys']} | {row['tempered_sites']} | "
            f"{row['applied']} | {'yes' if row['finite'] else 'no'} | {row['rel_diff_from_default']:.3f} | "
            f"{row['temp_min']:.3g}-{row['temp_max']:.3g} | {row['seconds']:.1f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines[6:7]))


if __name__ == "__main__":
    main()
