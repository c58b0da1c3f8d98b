"""Evidence that pullbacks explain better: explainers x Quantus metrics, per image, with paired intervals.

>>> from excitation.evaluation import evaluate, load_inputs
>>> model, x, y, about = load_inputs()                 # in-repo digits model, held-out images
>>> result = evaluate(model, x[:32], y[:32], metrics=["Infidelity", "Sparseness"])
>>> print(result.table())                               # means, 95 % CIs, paired Δ vs gradient

Quantus (the ``eval`` extra) does the metrics; :mod:`.metrics` corrects its 0.6.0 defects, and
:mod:`.road` scores ROAD per image over every batch (Quantus' own keeps only the first).
:mod:`.localisation` scores attributions against ground-truth masks and :mod:`.focus` on
2 x 2 mosaics, both cross-checked against (and correcting) Quantus' localisation metrics.
"""

from .explainers import DEFAULT_EXPLAINERS, EXPLAINERS, Explainer, cam_layer_name, make_explainer, resolve_explainers
# The function focus() stays in its module: importing it here would hide the module excitation.evaluation.focus.
from .focus import AUTHOR_FOCUS_RESNET50, AUTHOR_FOCUS_SETTING, Mosaics, focus_scores, make_mosaics
from .localisation import (LOCALISATION_METRICS, energy_pointing_game, localisation_scores, mask_auc, pointing_game,
                           reduce_channels, relevance_mass_accuracy, relevance_rank_accuracy, summarise_scores,
                           target_specificity)
from .metrics import DEFAULT_METRICS, METRICS, MPRTResult, mprt, run_metric
from .road import ROADResult, road
from .run import HIGHER_IS_BETTER, Evaluation, evaluate, load_inputs
from .stats import Interval, bootstrap_mean, paired_difference

__all__ = ["evaluate", "load_inputs", "Evaluation", "EXPLAINERS", "DEFAULT_EXPLAINERS", "Explainer",
           "make_explainer", "resolve_explainers", "METRICS", "DEFAULT_METRICS", "HIGHER_IS_BETTER", "run_metric",
           "mprt", "MPRTResult", "road", "ROADResult", "Interval", "bootstrap_mean", "paired_difference",
           "cam_layer_name", "LOCALISATION_METRICS", "localisation_scores", "summarise_scores", "reduce_channels",
           "pointing_game", "energy_pointing_game", "relevance_rank_accuracy", "relevance_mass_accuracy", "mask_auc",
           "target_specificity", "focus_scores", "make_mosaics", "Mosaics", "AUTHOR_FOCUS_RESNET50",
           "AUTHOR_FOCUS_SETTING"]
