"""Evidence that pullbacks explain better: explainers x Quantus metrics, per image, with paired intervals.

>>> from excitation.evaluation import evaluate, load_inputs
>>> model, x, y, about = load_inputs()                 # in-repo digits model, held-out images
>>> result = evaluate(model, x[:32], y[:32], metrics=["Infidelity", "Sparseness"])
>>> print(result.table())                               # means, 95 % CIs, paired Δ vs gradient

Quantus (the ``eval`` extra) does the metrics; :mod:`.metrics` corrects its 0.6.0 defects, and
:mod:`.road` scores ROAD per image over every batch (Quantus' own keeps only the first).
"""

from .explainers import DEFAULT_EXPLAINERS, EXPLAINERS, Explainer, make_explainer, resolve_explainers
from .metrics import DEFAULT_METRICS, HIGHER_IS_BETTER, METRICS, MPRTResult, mprt, run_metric
from .road import ROADResult, road
from .run import Evaluation, evaluate, load_inputs
from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["evaluate", "load_inputs", "Evaluation", "EXPLAINERS", "DEFAULT_EXPLAINERS", "Explainer",
           "make_explainer", "resolve_explainers", "METRICS", "DEFAULT_METRICS", "HIGHER_IS_BETTER", "run_metric",
           "mprt", "MPRTResult", "road", "ROADResult", "Interval", "bootstrap_mean", "paired_difference"]
