"""An ``explain_func`` for Quantus: the excitation pullback, numpy in, numpy out.

With a classifier ``model``, images ``x`` and labels ``y`` (numpy arrays)::

    import quantus, excitation
    metric = quantus.MaxSensitivity(nr_samples=10, disable_warnings=True)
    scores = metric(model=model, x_batch=x, y_batch=y, a_batch=None, device="cpu",
                    explain_func=excitation.quantus_explain_func,
                    explain_func_kwargs={"preset": "semantic"})
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn

__all__ = ["quantus_explain_func"]


def quantus_explain_func(model: nn.Module, inputs: Any, targets: Any, *, preset: Optional[str] = None,
                         temp: Optional[float] = None, pool_temp: Optional[float] = None,
                         device: Optional[str] = None, **_: Any) -> np.ndarray:
    """Signed pullbacks of ``targets`` for ``inputs``, as Quantus calls explainers.

    ``inputs`` is a numpy array (or tensor) [N, C, H, W], ``targets`` an int array [N]
    (or one int); the result is a float32 numpy array of ``inputs``' shape.  Options
    (``preset``, ``temp``, ``pool_temp``) come through Quantus' ``explain_func_kwargs``;
    other keywords Quantus passes (``device``, ...) are accepted.  The model is never modified.

    Parameters
    ----------
    model : nn.Module
        The classifier Quantus evaluates.
    inputs : numpy array or Tensor [N, C, H, W]
        The images.
    targets : int or int array [N]
        The class to explain per image.
    preset, temp, pool_temp
        As for :func:`excitation.pullback`.
    device : str, optional
        Where to run; defaults to the model's parameters' device.

    Returns
    -------
    numpy.ndarray
        float32, the shape of ``inputs``: the signed pullbacks.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``.
    ValueError
        Inputs or targets :func:`excitation.pullback` rejects.

    Examples
    --------
    >>> import numpy as np, torch, excitation
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
    ...                           torch.nn.Linear(4 * 6 * 6, 3))
    >>> a = excitation.quantus_explain_func(net, np.random.rand(2, 1, 8, 8), np.array([0, 2]))
    >>> a.shape, a.dtype
    ((2, 1, 8, 8), dtype('float32'))
    """
    from .api import pullback

    if not isinstance(model, nn.Module):
        raise TypeError(f"quantus_explain_func explains torch models; got {type(model).__name__}. Pass the "
                        f"nn.Module itself as Quantus' model.")
    dev = torch.device(device) if device else next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=dev)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=dev).reshape(-1)
    if t.numel() == 1 and x.shape[0] > 1:
        t = t.expand(x.shape[0])
    if t.shape[0] != x.shape[0]:
        raise ValueError(f"targets must give one class per input: {t.shape[0]} targets for {x.shape[0]} inputs.")
    return pullback(model, x, t, preset=preset, temp=temp, pool_temp=pool_temp).detach().float().cpu().numpy()
