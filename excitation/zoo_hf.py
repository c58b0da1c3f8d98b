"""``excitation zoo --source huggingface``: every image-classification architecture of the installed transformers.

One row per architecture that ``AutoModelForImageClassification`` knows, built offline from a
small random config (:func:`tiny_config`: two layers, narrow widths, a small image), checked
through the public API as any user would call it: ``excitation.pullback(model, pixel_values,
target)``, which takes the model output's ``logits`` and the fx or dynamo path by itself.
Zero-initialised layers are re-initialised first (the ``re-init`` column), since with them every
gradient is 0.  transformers is imported lazily: it is the ``hf`` extra, not a runtime dependency.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .bench import cpu_model
from .zoo import compare_with_gradient, seconds_per_call
from .zoo_timm import reinit_zero_weights

__all__ = ["HfRow", "WithInputs", "image_classification_architectures", "tiny_config", "build_tiny_model",
           "check_hf_model",
           "run_hf_zoo", "format_hf_table", "run"]

#: Small values for the size fields a vision config may have; a field the config lacks is skipped.
_TINY: Dict[str, Any] = {
    "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
    "image_size": 32, "num_labels": 5, "embed_dim": 16, "projection_dim": 16,
}
#: Per-architecture fields where the generic ones do not fit (stage lists, windows, channel plans).
_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4, "image_size": 32},
    "swinv2": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4, "image_size": 32},
    "donut-swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "window_size": 4, "image_size": 32},
    "dinat": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 2], "kernel_size": 3, "dilations": [[1], [1]]},
    "focalnet": {"embed_dim": 16, "depths": [1, 1], "focal_levels": [2, 2], "focal_windows": [3, 3],
                 "image_size": 32},
    "convnext": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "image_size": 32},
    "convnextv2": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2, "image_size": 32},
    "resnet": {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "image_size": 32},
    "regnet": {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "groups_width": 8},
    "bit": {"embedding_size": 16, "hidden_sizes": [16, 32], "depths": [1, 1], "num_groups": 8},
    "poolformer": {"layer_scale_init_value": 1.0, "hidden_sizes": [16, 32], "depths": [1, 1], "num_encoder_blocks": 2, "patch_sizes": [7, 3],
                   "strides": [4, 2], "padding": [2, 1], "pool_size": 3},
    "pvt": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_encoder_blocks": 2, "num_attention_heads": [1, 2],
            "sequence_reduction_ratios": [2, 1], "patch_sizes": [4, 2], "strides": [4, 2], "mlp_ratios": [2, 2],
            "image_size": 32},
    "pvt_v2": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_encoder_blocks": 2, "num_attention_heads": [1, 2],
               "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2]},
    "segformer": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_encoder_blocks": 2, "num_attention_heads": [1, 2],
                  "sr_ratios": [2, 1], "patch_sizes": [7, 3], "strides": [4, 2], "mlp_ratios": [2, 2]},
    "cvt": {"embed_dim": [16, 32], "depth": [1, 2], "num_heads": [1, 2], "patch_sizes": [7, 3],
            "patch_stride": [4, 2], "patch_padding": [2, 1], "mlp_ratio": [2.0, 2.0], "attention_drop_rate": [0.0, 0.0],
            "drop_rate": [0.0, 0.0], "drop_path_rate": [0.0, 0.0], "qkv_bias": [True, True], "cls_token": [False, True],
            "qkv_projection_method": ["dw_bn", "dw_bn"], "kernel_qkv": [3, 3], "padding_kv": [1, 1],
            "stride_kv": [2, 2], "padding_q": [1, 1], "stride_q": [1, 1]},
    "levit": {"hidden_sizes": [32, 48], "num_attention_heads": [2, 2], "depths": [1, 1], "key_dim": [8, 8],
              "drop_path_rate": 0, "mlp_ratio": [2, 2], "attention_ratio": [2, 2], "image_size": 64,
              "down_ops": [["Subsample", 8, 2, 4, 2, 2]]},
    "mobilevit": {"hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 24, 32], "image_size": 64},
    "mobilevitv2": {"width_multiplier": 0.25, "image_size": 64},
    "efficientnet": {"depth_coefficient": 0.25, "image_size": 64},
    "mobilenet_v1": {"depth_multiplier": 0.25, "image_size": 64},
    "mobilenet_v2": {"depth_multiplier": 0.25, "image_size": 64},
    "swiftformer": {"embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1], "image_size": 64},
    "hiera": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "image_size": [64, 64], "patch_stride": [4, 4],
              "masked_unit_size": [8, 8], "query_stride": [2, 2], "num_query_pool": 1},
    "perceiver": {"d_latents": 32, "num_latents": 8, "num_blocks": 1, "num_self_attends_per_block": 1,
                  "num_self_attention_heads": 2, "num_cross_attention_heads": 1, "d_model": 32, "image_size": 32},
    "shieldgemma2": {"image_size": 28, "patch_size": 14, "mm_tokens_per_image": 4, "num_key_value_heads": 1,
                     "head_dim": 16},
    "imagegpt": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 64, "vocab_size": 33},
}


@dataclass
class HfRow:
    """One architecture's result.  ``rel_diff`` is ``||pullback - gradient|| / ||gradient||``."""

    architecture: str
    model_class: str
    size: int = 0
    params_m: float = math.nan
    path: str = "?"  # "fx" or "dynamo"
    sites: Dict[str, int] = field(default_factory=dict)
    unhandled: Dict[str, int] = field(default_factory=dict)
    smooth: Dict[str, int] = field(default_factory=dict)
    forward_identical: Optional[bool] = None
    finite: Optional[bool] = None
    rel_diff: Optional[float] = None
    first_call_s: Optional[float] = None
    time_ratio: Optional[float] = None
    reinit: List[str] = field(default_factory=list)
    error: str = ""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ImportError("the Hugging Face zoo needs transformers: pip install -e .[hf]") from None
    return transformers


def image_classification_architectures() -> Dict[str, str]:
    """``{model type: class name}`` for every architecture ``AutoModelForImageClassification`` builds."""
    _transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return {kind: names if isinstance(names, str) else names[0]
            for kind, names in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.items()}


def tiny_config(architecture: str, **overrides: Any) -> Any:
    """The architecture's default config, shrunk: the fields of ``_TINY`` it has, then its own overrides."""
    transformers = _transformers()
    config = transformers.AutoConfig.for_model(architecture)
    targets = [config]
    for name in ("vision_config", "text_config"):  # composite configs (CLIP, SigLIP) keep the vision part in one
        sub = getattr(config, name, None)
        if sub is not None:
            targets.append(sub)
    for target in targets:
        for key, value in {**_TINY, **_OVERRIDES.get(architecture, {}), **overrides}.items():
            if hasattr(target, key):
                setattr(target, key, value)
    config.num_labels = overrides.get("num_labels", _TINY["num_labels"])
    return config


def _image_side(config: Any) -> int:
    for source in (getattr(config, "vision_config", None), config):
        side = getattr(source, "image_size", None) if source is not None else None
        if isinstance(side, (list, tuple)):
            side = side[0]
        if isinstance(side, int) and side > 0:
            return side
    return 64


def _channels(config: Any) -> int:
    for source in (getattr(config, "vision_config", None), config):
        channels = getattr(source, "num_channels", None) if source is not None else None
        if isinstance(channels, int) and channels > 0:
            return channels
    return 3


#: The field holding the class scores where it is not ``logits`` (PP-LCNet's head returns them as its
#: ``last_hidden_state``): what a user passes as ``output=``.
_OUTPUTS: Dict[str, str] = {"pp_lcnet": "last_hidden_state"}


class WithInputs(nn.Module):
    """``model(pixel_values=x, **inputs)``: a model that takes other inputs beside the pixels (held fixed), as a
    function of the pixels."""

    def __init__(self, model: nn.Module, **inputs: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.inputs = inputs

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(pixel_values=x, **self.inputs)


def build_tiny_model(architecture: str, seed: int = 0) -> "tuple[nn.Module, torch.Tensor]":
    """A random-weight model of ``architecture`` from :func:`tiny_config` in eval mode, and one input batch
    (pixels; token ids for ImageGPT).

    Models that take more than pixels come wrapped in :class:`WithInputs` (SigLIP 2's patch mask and
    grid, ShieldGemma 2's prompt); the model is then ``wrapper.model``.
    """
    transformers = _transformers()
    config = tiny_config(architecture)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    cls = getattr(transformers, image_classification_architectures()[architecture])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(config).eval()
    if architecture == "siglip2":  # pre-patchified pixels, one row per patch, with their mask and grid
        vision = config.vision_config
        grid = 4
        x = torch.rand(1, grid * grid, vision.num_channels * vision.patch_size ** 2, generator=generator)
        return WithInputs(model, pixel_attention_mask=torch.ones(1, grid * grid, dtype=torch.long),
                          spatial_shapes=torch.tensor([[grid, grid]])).eval(), x
    if architecture == "shieldgemma2":  # a vision-language classifier: the image between a prompt's tokens
        ids = torch.tensor([[2] + [config.image_token_index] * config.mm_tokens_per_image + [10, 11]])
        side = config.vision_config.image_size
        return WithInputs(model, input_ids=ids).eval(), torch.rand(1, 3, side, side, generator=generator)
    if architecture == "imagegpt":  # ImageGPT reads colour-cluster ids: a token model (excitation.text)
        return model, torch.randint(0, config.vocab_size - 1, (1, 16), generator=generator)
    side = _image_side(config)
    return model, torch.rand(1, _channels(config), side, side, generator=generator)


def _batch_norm_statistics(model: nn.Module, x: torch.Tensor, seed: int) -> str:
    """Set every BatchNorm's running statistics from ``x`` (one train-mode forward), as training would."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: after one batch, that batch's statistics
            norm.train()
        model(x)
    for norm in norms:
        norm.eval()
    return "BatchNorm statistics from the input"


def _torch_init(model: nn.Module, x: torch.Tensor, seed: int) -> str:
    """torch's own initialisation for every ``Conv2d`` and ``Linear``, then the BatchNorm statistics again."""
    torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    _batch_norm_statistics(model, x, seed)
    return "every Conv2d / Linear (torch's init)"


def check_hf_model(model: nn.Module, x: torch.Tensor, *, architecture: str, repeats: int = 1, seed: int = 0,
                   output: Optional[str] = None) -> HfRow:
    """Check one model through :func:`excitation.pullback` (its ``logits``, or ``output``; fx or dynamo path by itself)."""
    from . import api
    from .outputs import select_output

    inner = model.model if isinstance(model, WithInputs) else model
    row = HfRow(architecture=architecture, model_class=type(inner).__name__, size=int(x.shape[-1]),
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    row.reinit = reinit_zero_weights(model, seed)
    with torch.no_grad():
        expected = select_output(model(x), output)
    for repair in (_batch_norm_statistics, _torch_init):
        if float(api.gradient(model, x, int(expected[0].argmax()), output=output).norm()) != 0.0:
            break
        # Random weights through many narrow layers, BatchNorm at its initial statistics: the signal underflows.
        row.reinit.append(repair(model, x, seed))
        api.clear_cache()
        with torch.no_grad():
            expected = select_output(model(x), output)
    target = int(expected[0].argmax())
    row.first_call_s = seconds_per_call(lambda: api.pullback(model, x, target, output=output))
    prepared = api.prepare(model)
    row.path = api.path_of(prepared)
    result = prepared.report() if row.path == "dynamo" else __import__("excitation").report(prepared)
    row.sites = {k: v for k, v in result.counts().items() if v}
    row.unhandled = result.unhandled_counts()
    row.smooth = dict(Counter(u.op for u in result.smooth))
    with torch.no_grad():
        row.forward_identical = bool(torch.equal(select_output(prepared(x), output), expected))
    row.finite, row.rel_diff, row.time_ratio = compare_with_gradient(
        lambda: api.pullback(model, x, target, output=output), lambda: api.gradient(model, x, target, output=output),
        repeats)
    return row


def check_token_model(model: nn.Module, ids: torch.Tensor, *, architecture: str, repeats: int = 1,
                      seed: int = 0) -> HfRow:
    """Check a model that reads token ids (ImageGPT's colour clusters) through :mod:`excitation.text`."""
    from . import api, text

    row = HfRow(architecture=architecture, model_class=type(model).__name__, size=int(ids.shape[-1]),
                params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    row.reinit = reinit_zero_weights(model, seed)
    row.first_call_s = seconds_per_call(lambda: text.pullback(model, ids))
    prepared = api.prepare(text.embeddings_model(model))
    row.path = api.path_of(prepared) + " (excitation.text)"
    result = prepared.report() if api.path_of(prepared) == "dynamo" else __import__("excitation").report(prepared)
    row.sites = {k: v for k, v in result.counts().items() if v}
    row.unhandled = result.unhandled_counts()
    row.smooth = dict(Counter(u.op for u in result.smooth))
    embeddings, mask = model.get_input_embeddings()(ids).detach(), torch.ones_like(ids)
    with torch.no_grad():
        expected = text.embeddings_model(model)(embeddings, mask)
        row.forward_identical = bool(torch.equal(prepared(embeddings, mask), expected))
    target = text.pullback(model, ids).target
    row.finite, row.rel_diff, row.time_ratio = compare_with_gradient(
        lambda: text.pullback(model, ids, target).attribution, lambda: text.gradient(model, ids, target).attribution,
        repeats)
    return row


def run_hf_zoo(architectures: Optional[Sequence[str]] = None, *, repeats: int = 1, seed: int = 0,
               progress: bool = True, on_row: Optional[Callable[[HfRow], None]] = None) -> List[HfRow]:
    """Check each architecture (default: all of :func:`image_classification_architectures`); a failure is a row."""
    from . import api

    known = image_classification_architectures()
    chosen = list(architectures) if architectures else sorted(known)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"not image-classification architectures of this transformers: {unknown}; "
                         f"choose from {sorted(known)}.")
    iterator: Any = chosen
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(chosen, desc="zoo huggingface", unit="model")
    rows: List[HfRow] = []
    for architecture in iterator:
        try:
            model, x = build_tiny_model(architecture, seed)
            if not x.is_floating_point():
                row = check_token_model(model, x, architecture=architecture, repeats=repeats, seed=seed)
            else:
                row = check_hf_model(model, x, architecture=architecture, repeats=repeats, seed=seed,
                                     output=_OUTPUTS.get(architecture))
        except Exception as exc:  # noqa: BLE001 - one row per architecture, whatever happens
            row = HfRow(architecture=architecture, model_class=known[architecture],
                        error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        if on_row is not None:
            on_row(row)
        api.clear_cache()
        torch._dynamo.reset()  # each model's graphs are its own
    return rows


def _one_line(error: str) -> str:
    return " ".join(error.split())[:200].replace("|", "/")


def _yes(value: Optional[bool]) -> str:
    return "?" if value is None else ("yes" if value else "**no**")


def format_hf_table(rows: List[HfRow]) -> str:
    """A Markdown page body: summary line, then one row per architecture."""
    ran = [r for r in rows if not r.error]
    finite = sum(bool(r.finite) for r in ran)
    identical = sum(bool(r.forward_identical) for r in ran)
    unhandled = sum(sum(r.unhandled.values()) for r in ran)
    dynamo = sum(r.path == "dynamo" for r in ran)
    ratios = [r.time_ratio for r in ran if r.time_ratio is not None]
    lines = [
        f"{len(rows)} architectures, {date.today().isoformat()}, torch {torch.__version__}, transformers "
        f"{_transformers().__version__}, {cpu_model()}, {platform.machine()}, {torch.get_num_threads()} threads, "
        f"batch 1, random weights from a small config, eval mode.",
        "",
        f"**ran {len(ran)}/{len(rows)} · pullback finite {finite}/{len(rows)} · forward bit-identical "
        f"{identical}/{len(rows)} · dynamo path {dynamo} · unhandled activation sites {unhandled}**"
        + (f" · steady-state time / vanilla median {statistics.median(ratios):.2f}" if ratios else ""),
        "",
        "| architecture | class | input | params (M) | path | sites rewritten | unhandled | smooth (vanilla) "
        "| forward identical | finite | rel. diff | first call (s) | time / vanilla | re-init |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.architecture} | {r.model_class} | - | - | - | {_one_line(r.error)} | - | - | - | - | - "
                         f"| - | - | - |")
            continue
        sites = ", ".join(f"{k} {v}" for k, v in r.sites.items()) or "-"
        left = ", ".join(f"{k} {v}" for k, v in r.unhandled.items()) or "0"
        smooth = ", ".join(f"{k} {v}" for k, v in r.smooth.items()) or "-"
        diff = "-" if r.rel_diff is None or math.isnan(r.rel_diff) else f"{r.rel_diff:.3f}"
        lines.append(
            f"| {r.architecture} | {r.model_class} | {r.size} | {r.params_m:.3f} | {r.path} | {sites} | {left} | "
            f"{smooth} | {_yes(r.forward_identical)} | {_yes(r.finite)} | {diff} | {r.first_call_s:.1f} | "
            f"{r.time_ratio:.2f} | {', '.join(r.reinit) or '-'} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``excitation zoo --source huggingface``."""
    done: List[HfRow] = []

    def write(rows: List[HfRow]) -> None:
        if args.out:
            Path(args.out).write_text("# The Hugging Face zoo\n\nMade by `excitation zoo --source huggingface`.\n\n"
                                      + format_hf_table(rows) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))

    def on_row(row: HfRow) -> None:  # written as it goes: a killed run keeps its rows
        done.append(row)
        write(done)

    rows = run_hf_zoo(args.models, repeats=args.repeats, progress=not args.no_progress, on_row=on_row)
    write(rows)
    print(format_hf_table(rows))
    return 0
