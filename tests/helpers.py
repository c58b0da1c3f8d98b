"""Independent references and state checks for the test-suite.

Nothing here imports ``excitation``: the references intercept ReLU and
max-pool calls with a ``TorchFunctionMode`` and build the surrogate from plain
autograd (``temp * softplus(z / temp)`` and an explicit, loop-built soft pool),
so they share no code with the pass they check.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_RELU_OUT_OF_PLACE = {F.relu, torch.relu, Tensor.relu}
_RELU_IN_PLACE = {F.relu_, torch.relu_, Tensor.relu_}
_POOLS = {F.max_pool2d, F._max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}


def rel_err(a: Tensor, b: Tensor) -> float:
    """Relative L2 error ``|a - b| / |b|`` in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _straight_through(exact: Tensor, smooth: Tensor) -> Tensor:
    # Value of ``exact``, gradient of ``smooth``.
    return exact.detach() + (smooth - smooth.detach())


def soft_pool_reference(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool, temp: float) -> Tensor:
    """``sum_w softmax(x_w / temp) * x_w`` per window, built from strided slices (no unfold)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    kernel, padding, dilation = pair(kernel), pair(padding), pair(dilation)
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) else pair(stride)
    out_h, out_w = F.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil_mode).shape[-2:]
    height, width = x.shape[-2:]
    need_h = (out_h - 1) * stride[0] + dilation[0] * (kernel[0] - 1) + 1
    need_w = (out_w - 1) * stride[1] + dilation[1] * (kernel[1] - 1) + 1
    pads = (padding[1], max(need_w - width - padding[1], 0), padding[0], max(need_h - height - padding[0], 0))
    padded = F.pad(x, pads)
    valid = F.pad(torch.ones_like(x, dtype=torch.bool), pads, value=False)
    values, masks = [], []
    for a in range(kernel[0]):
        for b in range(kernel[1]):
            rows = slice(a * dilation[0], a * dilation[0] + (out_h - 1) * stride[0] + 1, stride[0])
            cols = slice(b * dilation[1], b * dilation[1] + (out_w - 1) * stride[1] + 1, stride[1])
            values.append(padded[..., rows, cols])
            masks.append(valid[..., rows, cols])
    values, masks = torch.stack(values, -1), torch.stack(masks, -1)
    logits = torch.where(masks, values / temp, torch.full_like(values, -math.inf))
    weights = torch.softmax(logits, dim=-1)
    return (weights * torch.where(masks, values, torch.zeros_like(values))).sum(-1)


class ExcitationReference(TorchFunctionMode):
    """Within this mode, every ReLU and 2-D max-pool call has the excitation backward.

    ReLU: forward ``relu(z)``, gradient of ``temp * softplus(z / temp)``.
    Max-pool: forward ``max_pool2d``, gradient of :func:`soft_pool_reference`.
    """

    def __init__(self, temp: float = 0.3, pool_temp: float | None = None, gate: str = "sigmoid") -> None:
        super().__init__()
        self.temp = temp
        self.pool_temp = temp if pool_temp is None else pool_temp
        self.gate = gate
        self.calls: Dict[str, int] = {"relu": 0, "max_pool2d": 0}

    def _smooth_relu(self, z: Tensor) -> Tensor:
        if self.gate == "sigmoid":
            return self.temp * F.softplus(z / self.temp)
        # Antiderivative of Phi(z/t): z*Phi(z/t) + t*phi(z/t).
        u = z / self.temp
        return z * torch.special.ndtr(u) + self.temp * torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_OUT_OF_PLACE or func in _RELU_IN_PLACE:
            self.calls["relu"] += 1
            z = args[0]
            inplace = func in _RELU_IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            source = z.clone() if inplace else z
            result = _straight_through(torch.relu(source), self._smooth_relu(source))
            if inplace:
                with torch.no_grad() if not z.requires_grad and not result.requires_grad else _null():
                    z.copy_(result)
                return z
            return result
        if func in _POOLS:
            self.calls["max_pool2d"] += 1
            names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
            bound = dict(zip(names, args))
            bound.update(kwargs)
            x = bound["input"]
            stride = bound.get("stride")
            stride = None if stride is None or (not isinstance(stride, int) and len(stride) == 0) else stride
            pool_args = (bound["kernel_size"], stride, bound.get("padding", 0), bound.get("dilation", 1), bool(bound.get("ceil_mode", False)))
            exact, indices = F.max_pool2d(x, *pool_args, return_indices=True)
            result = _straight_through(exact, soft_pool_reference(x, *pool_args, self.pool_temp))
            with_indices = func is F.max_pool2d_with_indices or bool(bound.get("return_indices", False))
            return (result, indices) if with_indices and func is not torch.max_pool2d else result
        return func(*args, **kwargs)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def reference_pullback(model: nn.Module, x: Tensor, target, temp: float = 0.3, pool_temp=None, gate="sigmoid") -> Tensor:
    """The excitation pullback of ``model`` (in its current mode) by interception."""
    leaf = x.detach().clone().requires_grad_(True)
    with ExcitationReference(temp, pool_temp, gate):
        out = model(leaf)
    if isinstance(target, int):
        target = torch.full((x.shape[0],), target, dtype=torch.long)
    score = out.gather(1, torch.as_tensor(target).reshape(-1, 1)).sum()
    (grad,) = torch.autograd.grad(score, leaf)
    return grad


def vanilla_gradient(model: nn.Module, x: Tensor, target: int) -> Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(leaf)[:, target].sum(), leaf)
    return grad


def fingerprint(model: nn.Module) -> Tuple:
    """Everything about a model that must never change: tensors, grads, flags, hooks."""
    digest = hashlib.sha256()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        digest.update(str((tensor.dtype, tuple(tensor.shape), tensor.requires_grad)).encode())
    for name, param in model.named_parameters():
        grad = param.grad
        digest.update(f"{name}.grad:".encode())
        digest.update(b"None" if grad is None else grad.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    structure = []
    for name, module in model.named_modules():
        hooks = tuple(
            (attr, tuple(getattr(module, attr).keys()))
            for attr in sorted(vars(module))
            if "hooks" in attr and isinstance(getattr(module, attr), dict)
        )
        structure.append((name, type(module).__name__, module.training, hooks, type(module).forward))
    return digest.hexdigest(), tuple(structure)


# --------------------------------------------------------------------- models
class AllForms(nn.Module):
    """Every ReLU and max-pool form the pass must find, incl. in-place ReLUs whose input is read again."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)  # called three times
        self.relu_plain = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool_mod = nn.MaxPool2d(3, stride=2, padding=1)
        self.pool_idx = nn.MaxPool2d(2, return_indices=True, ceil_mode=True)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: Tensor) -> Tensor:
        a = self.bn1(self.conv1(x))
        b = self.relu(a)  # in-place module
        c = self.conv2(b)
        d = F.relu(c, inplace=True)  # functional in-place...
        e = c * 0.5 + d  # ...whose input ``c`` is read again afterwards
        e = torch.relu(e) + torch.relu_(self.conv3(e) * 1.0)
        e = self.pool_mod(e)
        e = e.relu() + self.relu_plain(e)
        f = self.conv3(e)
        f.relu_()  # in-place method
        g = f + F.relu_(self.conv2(f))
        p, idx = self.pool_idx(g)
        q, idx2 = F.max_pool2d(g, 2, stride=1, dilation=2, return_indices=True)
        r = torch.max_pool2d(g, (2, 3), 1, (1, 1), 1, True)
        s = self.relu(F.max_pool2d(g, kernel_size=2) - 0.1)  # module reused...
        t = self.relu(p - 0.1) + idx.float().mean() * 0  # ...and again
        pooled = t.mean((2, 3)) + q.amax((2, 3)) + r.mean((2, 3)) + s.mean((2, 3)) + idx2.float().mean() * 0
        return self.fc(pooled)


# Counts of ALL_FORMS sites: ReLUs (3 module reuse + plain module + F.relu + torch.relu +
# torch.relu_ + .relu() + .relu_() + F.relu_) and pools (2 module calls + 2 F + 1 torch).
ALL_FORMS_RELUS = 10
ALL_FORMS_POOLS = 5
