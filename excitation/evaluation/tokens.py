"""``excitation evaluate --dataset tokens``: token attributions against a known deciding token.

On held-out sequences of the keyword task (:mod:`excitation.tokens`) the in-repo transformer is
explained for its predicted class by each explainer, one score per token, and each explainer is
scored per sequence (``[CLS]`` excluded, tokens ranked by ``|score|``):

* ``top1``: 1 if the keyword is ranked first, else 0;
* ``share``: ``|score(keyword)| / sum_t |score(t)|``;
* ``rank``: the keyword's rank (1 is best).

Explainers, all in embedding space (:mod:`excitation.text`): the pullback reduced two ways
(``input_x_pullback``, ``pullback_l2``), the gradient reduced the same two ways
(``gradient_x_input``, ``gradient_l2``), and Integrated Gradients from a zero embedding
(``integrated_gradients``, summed over the embedding dimension).  Each pullback is compared with
the gradient of the same reduction by a paired bootstrap interval of the per-sequence difference.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["TOKEN_EXPLAINERS", "TOKEN_METRICS", "PAIRS", "TokenReport", "keyword_scores", "token_attributions",
           "evaluate_tokens"]

TOKEN_EXPLAINERS = ("input_x_pullback", "pullback_l2", "gradient_x_input", "gradient_l2", "integrated_gradients")
TOKEN_METRICS = ("top1", "share", "rank")
#: Each pullback reduction beside the gradient of the same reduction.
PAIRS = (("input_x_pullback", "gradient_x_input"), ("pullback_l2", "gradient_l2"))
#: Metrics where lower is better.
_LOWER_BETTER = {"rank"}


def keyword_scores(scores: Tensor, keyword: Tensor) -> Dict[str, np.ndarray]:
    """Per sequence: ``top1``, ``share`` and ``rank`` of the keyword under ``scores [N, T]`` (position 0 excluded)."""
    magnitude = scores[:, 1:].abs().double()
    target = (keyword - 1).long()
    own = magnitude.gather(1, target[:, None])[:, 0]
    # Ties count against the keyword: its rank is 1 + the number of tokens scored at least as high, others.
    above = (magnitude >= own[:, None]).sum(1) - 1
    rank = (1 + above).numpy().astype(np.float64)
    total = magnitude.sum(1)
    share = torch.where(total > 0, own / total.clamp_min(1e-300), torch.zeros_like(total)).numpy()
    return {"top1": (rank == 1).astype(np.float64), "share": share, "rank": rank}


def token_attributions(model: nn.Module, input_ids: Tensor, target: Tensor, *, ig_steps: int = 32,
                       explainers: Sequence[str] = TOKEN_EXPLAINERS) -> Dict[str, Tensor]:
    """``{explainer: scores [N, T]}`` for ``target`` (one class per sequence)."""
    from .. import api, text

    unknown = sorted(set(explainers) - set(TOKEN_EXPLAINERS))
    if unknown:
        raise ValueError(f"unknown token explainers {unknown}; choose from {list(TOKEN_EXPLAINERS)}.")
    found: Dict[str, Tensor] = {}
    if {"input_x_pullback", "pullback_l2"} & set(explainers):
        pulled = text.pullback(model, input_ids, target)
        found["input_x_pullback"], found["pullback_l2"] = pulled.scores("input_x_pullback"), pulled.scores("l2")
    if {"gradient_x_input", "gradient_l2"} & set(explainers):
        plain = text.gradient(model, input_ids, target)
        found["gradient_x_input"], found["gradient_l2"] = plain.scores("input_x_pullback"), plain.scores("l2")
    if "integrated_gradients" in explainers:
        vanilla = api.prepare(text.embeddings_model(model), excited=False)
        embeddings = model.get_input_embeddings()(input_ids).detach()
        mask = torch.ones_like(input_ids)
        total = torch.zeros_like(embeddings)
        for k in range(ig_steps):  # midpoint rule on the straight path from a zero embedding
            point = (embeddings * ((k + 0.5) / ig_steps)).requires_grad_(True)
            with torch.enable_grad():
                score = vanilla(point, mask).gather(1, target[:, None]).sum()
                (grad,) = torch.autograd.grad(score, point)
            total += grad
        found["integrated_gradients"] = (embeddings * total / ig_steps).sum(-1)
    return {name: found[name].detach() for name in explainers}


@dataclass
class TokenReport:
    """Per-sequence metric values per explainer, their means with intervals, and the paired differences."""

    n: int
    accuracy: float
    values: Dict[str, Dict[str, List[float]]]
    means: Dict[str, Dict[str, Interval]] = field(default_factory=dict)
    differences: Dict[str, Dict[str, Interval]] = field(default_factory=dict)
    seconds: float = 0.0
    machine: str = ""

    def table(self) -> str:
        """Markdown: one row per explainer (mean [95 % interval]), then the paired differences."""
        lines = [f"Keyword task, {self.n} held-out sequences, model accuracy {self.accuracy:.3f}; {self.machine}.",
                 "", "| explainer | keyword ranked first | share of |attribution| | keyword rank (1 best) |",
                 "|---|---|---|---|"]
        for name, metrics in self.means.items():
            lines.append(f"| {name} | " + " | ".join(str(metrics[m]) for m in TOKEN_METRICS) + " |")
        lines += ["", "Paired difference per sequence (pullback - gradient, same reduction; rank: lower is better):",
                  "", "| pair | top1 | share | rank |", "|---|---|---|---|"]
        for pair, metrics in self.differences.items():
            lines.append(f"| {pair} | " + " | ".join(str(metrics[m]) for m in TOKEN_METRICS) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1)

    def write(self, prefix: Union[str, Path]) -> List[Path]:
        """``PREFIX.md`` and ``PREFIX.json``."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        md, js = prefix.with_name(prefix.name + ".md"), prefix.with_name(prefix.name + ".json")
        md.write_text("# Token attribution on the keyword task\n\n" + self.table() + "\n")
        js.write_text(self.to_json())
        return [md, js]


def evaluate_tokens(n: int = 512, *, seed: Optional[int] = None, explainers: Sequence[str] = TOKEN_EXPLAINERS,
                    batch_size: int = 128, ig_steps: int = 32, model: Optional[nn.Module] = None,
                    progress: bool = True) -> TokenReport:
    """Score every explainer on ``n`` held-out keyword sequences (the module docstring says how)."""
    from ..bench import cpu_model
    from ..tokens import load_model, make_sequences
    from ..tokens.train import HELD_OUT_SEED

    start = time.perf_counter()
    model = load_model() if model is None else model
    data = make_sequences(n, HELD_OUT_SEED if seed is None else seed)
    values: Dict[str, Dict[str, List[float]]] = {name: {m: [] for m in TOKEN_METRICS} for name in explainers}
    correct = 0
    batches = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="tokens", unit="batch")
    for i in batches:
        ids, keyword = data.input_ids[i:i + batch_size], data.keyword[i:i + batch_size]
        with torch.no_grad():
            predicted = model(input_ids=ids).logits.argmax(1)
        correct += int((predicted == data.labels[i:i + batch_size]).sum())
        for name, scores in token_attributions(model, ids, predicted, ig_steps=ig_steps, explainers=explainers).items():
            for metric, per in keyword_scores(scores, keyword).items():
                values[name][metric].extend(per.tolist())
    report = TokenReport(n=n, accuracy=correct / n, values=values, seconds=time.perf_counter() - start,
                         machine=f"{cpu_model()}, torch {torch.__version__}")
    report.means = {name: {m: bootstrap_mean(np.array(v[m])) for m in TOKEN_METRICS} for name, v in values.items()}
    for ours, theirs in PAIRS:
        if ours in values and theirs in values:
            report.differences[f"{ours} - {theirs}"] = {
                m: paired_difference(np.array(values[ours][m]), np.array(values[theirs][m])) for m in TOKEN_METRICS}
    return report
