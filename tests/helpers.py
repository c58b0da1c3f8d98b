"""Independent references and state checks for the test-suite.

Nothing here imports ``excitation``: the references intercept ReLU and
max-pool calls (and, with ``rules=True``, every other rule's op) with a
``TorchFunctionMode`` and build the surrogate from plain autograd on smooth
stand-ins (``temp * softplus(z / temp)``, an explicit loop-built soft pool,
straight-through detaches), so they share no code with the pass they check.
"""

from __future__ import annotations

import hashlib
import math
from typing import Dict, Optional, Tuple

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


# ------------------------------------------------- smooth stand-ins of every rule
def softplus(x: Tensor) -> Tensor:
    # torch's default threshold (20) switches to the identity, whose derivative 1 is 2e-9 off sigmoid(20).
    return F.softplus(x, threshold=700.0)


def soft_clamp(z: Tensor, lo: float, hi: float, t: float) -> Tensor:
    """Derivative ``sigmoid((z - lo)/t) - sigmoid((z - hi)/t)``."""
    return lo + t * softplus((z - lo) / t) - t * softplus((z - hi) / t)


def gaussian_smoothed_relu(z: Tensor, t: float) -> Tensor:
    """``E[relu(z + t * eps)]``, eps ~ N(0, 1); derivative ``Phi(z / t)``."""
    x = z / t
    return t * (x * torch.special.ndtr(x) + torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi))


def soft_hardswish_standin(z: Tensor, t: float) -> Tensor:
    """Derivative ``clamp(z / (6 t) + 1/2, 0, 1)``."""
    w = z / (6 * t) + 0.5
    return 3 * t * (F.relu(w) ** 2 - F.relu(w - 1) ** 2)


def soft_mish_standin(z: Tensor, t: float) -> Tensor:
    """Derivative ``tanh(softplus(z / t))``: ``t * (log(e^{2u} + 2 e^u + 2) / 2 + atan(e^u + 1))``, ``u = z / t``.

    (Partial fractions of ``1 - 2 / ((1 + e^u)^2 + 1)``; written with ``logsumexp`` and
    ``atan(e^u + 1) = pi/2 - atan(sigmoid(-u))`` so that it stays finite at any ``u``.)
    """
    u = z / t
    log2 = torch.full_like(u, math.log(2.0))
    return t * (0.5 * torch.logsumexp(torch.stack([2 * u, u + log2, log2]), 0) - torch.atan(torch.sigmoid(-u)))


def soft_hard_mish_standin(z: Tensor, t: float) -> Tensor:
    """Derivative ``clamp(z / (2 t) + 1, 0, 1)``.  (``clamp_min``, not ``F.relu``: it runs inside the
    interception reference too, which would soften a ReLU.)"""
    w = z / (2 * t) + 1
    return t * (w.clamp_min(0) ** 2 - (w - 1).clamp_min(0) ** 2)


def hard_mish(x: Tensor) -> Tensor:
    """timm.layers.hard_mish, as timm writes it (the tests that need no timm use this copy)."""
    return 0.5 * x * (x + 2).clamp(min=0, max=2)


def elu_switch_gradient(op, z: Tensor, t: float) -> Tensor:
    """``s * op'(z>0 branch) + (1 - s) * op'(z<0 branch)``, ``s = sigmoid(z / t)``, from torch's own derivative of ``op``.

    Each branch's slope is torch's vanilla derivative of ``op`` (ELU, CELU, SELU) on that branch:
    at ``max(z, 1)`` (the constant positive slope) and at ``min(z, -tiny)`` (the exponential
    branch, held at its value at 0 for ``z > 0``).  No constant of the unit is written here.
    """
    def slope(at: Tensor) -> Tensor:
        leaf = at.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad(op(leaf).sum(), leaf)
        return grad

    s = torch.sigmoid(z.detach() / t)
    return s * slope(z.clamp_min(1.0)) + (1 - s) * slope(z.clamp_max(-1e-300))


def elu_switch_standin(op, z: Tensor, t: float) -> Tensor:
    """A function of ``z`` with gradient :func:`elu_switch_gradient` (the gate, detached, times ``z``)."""
    return z * elu_switch_gradient(op, z, t)


# Published / documented default temperatures of the non-ReLU rules.
RULE_TEMPS = {"silu": 1.6, "gelu": 1.0, "hardswish": 1.6, "mish": 1.6, "hard_mish": 1.6}


def _arg(args, kwargs, index, name, default):
    return kwargs.get(name, args[index] if len(args) > index else default)


def _frozen_mha(query, key, value, num_heads, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                batch_first_input: bool) -> Tensor:
    """Self-attention with detached attention weights, written out (no masks, no dropout)."""
    x = query.transpose(0, 1) if not batch_first_input else query  # (batch, tokens, dim)
    batch, tokens, dim = x.shape
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    heads = lambda t: t.reshape(batch, tokens, num_heads, dim // num_heads).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(dim // num_heads), -1).detach()
    out = F.linear((weights @ heads(v)).transpose(1, 2).reshape(batch, tokens, dim), out_proj_weight, out_proj_bias)
    return out if batch_first_input else out.transpose(0, 1)


def soft_pool_reference(x: Tensor, kernel, stride, padding, dilation, ceil_mode: bool, temp: float,
                        weights_only: bool = False) -> Tensor:
    """``sum_w softmax(x_w / temp) * x_w`` per window, built from strided slices (no unfold).

    ``weights_only``: the softmax weights are detached (constants), as the "weights" pool backward has it.
    """
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
    if weights_only:
        weights = weights.detach()
    return (weights * torch.where(masks, values, torch.zeros_like(values))).sum(-1)


class ExcitationReference(TorchFunctionMode):
    """Within this mode, every ReLU and 2-D max-pool call has the excitation backward.

    ReLU: forward ``relu(z)``, gradient of ``temp * softplus(z / temp)``.
    Max-pool: forward ``max_pool2d``, gradient of :func:`soft_pool_reference`.
    """

    def __init__(self, temp: float = 0.3, pool_temp: float | None = None, gate: str = "sigmoid",
                 rules: bool = False, pool_backward: str = "soft") -> None:
        super().__init__()
        self.temp = temp
        self.pool_temp = temp if pool_temp is None else pool_temp
        self.gate = gate
        self.weights_only = pool_backward == "weights"
        self.rules = rules
        self.calls: Dict[str, int] = {"relu": 0, "max_pool2d": 0}

    def _other_rule(self, func, args, kwargs):
        """The non-ReLU rules, out-of-place forms as nn modules call them; ``None`` if ``func`` is none of them."""
        t = self.temp
        if func is F.hardtanh:
            z, lo, hi = args[0], _arg(args, kwargs, 1, "min_val", -1.0), _arg(args, kwargs, 2, "max_val", 1.0)
            kind, exact, smooth = "hardtanh", F.hardtanh(z, lo, hi), soft_clamp(z, lo, hi, t)
        elif func is F.relu6:
            z = args[0]
            kind, exact, smooth = "hardtanh", F.relu6(z), soft_clamp(z, 0.0, 6.0, t)
        elif func is F.leaky_relu:
            z, a = args[0], _arg(args, kwargs, 1, "negative_slope", 0.01)
            kind, exact, smooth = "leaky_relu", F.leaky_relu(z, a), a * z + (1 - a) * t * softplus(z / t)
        elif func in (F.threshold, torch.threshold):
            z, th, value = args[0], _arg(args, kwargs, 1, "threshold", None), _arg(args, kwargs, 2, "value", None)
            kind, exact, smooth = "threshold", func(z, th, value), th + t * softplus((z - th) / t)
        elif func is F.rrelu and _arg(args, kwargs, 3, "training", False) is False:
            z, lower, upper = args[0], _arg(args, kwargs, 1, "lower", 1 / 8), _arg(args, kwargs, 2, "upper", 1 / 3)
            a = (lower + upper) / 2  # eval mode: a LeakyReLU of the mean slope
            kind, exact, smooth = "rrelu", F.rrelu(z, lower, upper), a * z + (1 - a) * t * softplus(z / t)
        elif func in (F.elu, F.celu, F.selu, torch.celu, torch.selu):
            z = args[0]
            exact = func(z) if func in (F.selu, torch.selu) else func(z, _arg(args, kwargs, 1, "alpha", 1.0))
            kind = {F.elu: "elu", F.celu: "celu", torch.celu: "celu", F.selu: "selu", torch.selu: "selu"}[func]
            alpha = _arg(args, kwargs, 1, "alpha", 1.0)
            op = func if func in (F.selu, torch.selu) else (lambda v: func(v, alpha))  # noqa: E731
            smooth = elu_switch_standin(op, z, t)
        elif func is F.prelu:
            z, a = args[0], _arg(args, kwargs, 1, "weight", None)
            slope = a.detach().reshape(-1, *[1] * (z.dim() - 2)) if a.numel() > 1 else a.detach().reshape(())
            # input: the LeakyReLU stand-in with slope a; the slope itself: torch's exact gradient.
            kind, exact = "prelu", F.prelu(z, a)
            smooth = slope * z + (1 - slope) * t * softplus(z / t) + F.prelu(z.detach(), a)
        elif func is F.mish:
            z, ts = args[0], RULE_TEMPS["mish"]
            kind, exact, smooth = "mish", F.mish(z), soft_mish_standin(z, ts)
        elif func is F.silu:
            z, ts = args[0], RULE_TEMPS["silu"]
            kind, exact, smooth = "silu", F.silu(z), ts * softplus(z / ts)
        elif func is F.gelu:
            z = args[0]
            exact = F.gelu(z, approximate=_arg(args, kwargs, 1, "approximate", "none"))
            kind, smooth = "gelu", gaussian_smoothed_relu(z, RULE_TEMPS["gelu"])
        elif func is F.hardswish:
            z = args[0]
            kind, exact, smooth = "hardswish", F.hardswish(z), soft_hardswish_standin(z, RULE_TEMPS["hardswish"])
        elif func is F.hardsigmoid:
            z = args[0]
            kind, exact, smooth = "hardsigmoid", F.hardsigmoid(z), soft_clamp(z + 3, 0.0, 6.0, t) / 6
        elif func is F.layer_norm:
            z, shape = args[0], _arg(args, kwargs, 1, "normalized_shape", None)
            weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
            eps = _arg(args, kwargs, 4, "eps", 1e-5)
            dims = tuple(range(-len(shape), 0))
            mean = z.mean(dims, keepdim=True).detach()
            rstd = torch.rsqrt(z.var(dims, unbiased=False, keepdim=True) + eps).detach()
            smooth = (z - mean) * rstd * (1 if weight is None else weight) + (0 if bias is None else bias)
            kind, exact = "layer_norm", F.layer_norm(z, shape, weight, bias, eps)
        elif func is F.rms_norm:
            z, shape = args[0], _arg(args, kwargs, 1, "normalized_shape", None)
            weight, eps = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "eps", None)
            dims = tuple(range(-len(shape), 0))
            eps = torch.finfo(z.dtype).eps if eps is None else eps
            rstd = torch.rsqrt(z.pow(2).mean(dims, keepdim=True) + eps).detach()
            smooth = z * rstd * (1 if weight is None else weight)
            kind, exact = "rms_norm", F.rms_norm(z, shape, weight, eps)
        elif func in (F.softmax, torch.softmax, Tensor.softmax):
            self.calls["softmax"] = self.calls.get("softmax", 0) + 1
            return func(*args, **kwargs).detach()  # in the models we check, every softmax is attention
        elif func is F.scaled_dot_product_attention:
            self.calls["sdpa"] = self.calls.get("sdpa", 0) + 1
            return func(args[0].detach(), args[1].detach(), *args[2:], **kwargs)
        elif func is F.multi_head_attention_forward:
            self.calls["mha"] = self.calls.get("mha", 0) + 1
            exact = func(*args, **kwargs)
            query, key, value, _, num_heads, in_w, in_b = args[:7]
            out_w, out_b = args[11], args[12]
            # F.multi_head_attention_forward takes (tokens, batch, dim) inputs.
            smooth = _frozen_mha(query, key, value, num_heads, in_w, in_b, out_w, out_b, batch_first_input=False)
            return _straight_through(exact[0], smooth), exact[1]
        else:
            return None
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return _straight_through(exact, smooth)

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
            result = _straight_through(exact, soft_pool_reference(x, *pool_args, self.pool_temp, self.weights_only))
            with_indices = func is F.max_pool2d_with_indices or bool(bound.get("return_indices", False))
            return (result, indices) if with_indices and func is not torch.max_pool2d else result
        if self.rules:
            found = self._other_rule(func, args, kwargs)
            if found is not None:
                return found
        return func(*args, **kwargs)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def reference_pullback(model: nn.Module, x: Tensor, target, temp: float = 0.3, pool_temp=None, gate="sigmoid",
                       rules: bool = False, pool_backward: str = "soft") -> Tensor:
    """The excitation pullback of ``model`` (in its current mode) by interception.

    ``rules=True`` also intercepts every other rule's op (default temperatures).
    """
    leaf = x.detach().clone().requires_grad_(True)
    with ExcitationReference(temp, pool_temp, gate, rules, pool_backward):
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


class ZooForms(nn.Module):
    """One site of every rule beyond ReLU: a small conv stem, then a transformer block.

    Hardtanh/ReLU6 (in place), LeakyReLU, SiLU (in place), Hardswish, Hardsigmoid (SE gate),
    2-D max-pool, LayerNorm (module and functional), nn.MultiheadAttention, an explicit
    softmax attention, F.scaled_dot_product_attention and GELU.
    """

    def __init__(self, classes: int = 10, dim: int = 16) -> None:
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(dim)
        self.six = nn.ReLU6(inplace=True)
        self.silu = nn.SiLU(inplace=True)
        self.hswish = nn.Hardswish()
        self.squeeze = nn.Linear(dim, dim)
        self.gate = nn.Hardsigmoid()
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.silu(F.leaky_relu(self.six(self.bn(self.conv(x))), 0.1))
        h = self.hswish(h)
        h = h * self.gate(self.squeeze(h.mean((2, 3))))[:, :, None, None]
        tokens = self.pool(h).flatten(2).transpose(1, 2)  # (batch, tokens, dim)
        a = self.norm1(tokens)
        tokens = tokens + self.attn(a, a, a, need_weights=False)[0]
        q, k, v = self.qkv(F.layer_norm(tokens, (self.dim,))).chunk(3, dim=-1)
        weights = (q @ k.transpose(-1, -2) / 4.0).softmax(dim=-1)
        tokens = tokens + weights @ v + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        tokens = tokens + self.mlp(tokens)
        return self.head(tokens.mean(1))


# Sites per kind in ZooForms.
ZOO_FORMS_KINDS = {
    "relu": 0, "hardtanh": 1, "leaky_relu": 1, "silu": 1, "gelu": 1, "hardswish": 1, "hardsigmoid": 1,
    "max_pool2d": 1, "layer_norm": 2, "softmax": 1, "scaled_dot_product_attention": 1, "multihead_attention": 1,
}


def saved_bytes(fn) -> int:
    """Bytes of the unique storages autograd saves for backward while ``fn()`` runs."""
    storages: Dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def frozen_conv_relu_conv() -> Tuple[nn.Module, Tensor, int]:
    """conv -> ReLU -> conv, frozen, an input and the bytes of its pre-activation ``z``.

    Compiled, vanilla keeps ``relu(z)`` (the second convolution's backward reads its
    input) and nothing else but the weights, so an exact pullback can keep ``z`` in its place.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, torch.randn(2, 3, 16, 16), 2 * 8 * 14 * 14 * 4


def eval_with_statistics(model: nn.Module, frozen: bool = True) -> nn.Module:
    """``model`` in eval mode with non-trivial BatchNorm statistics and affine parameters (seeded), its
    parameters frozen unless ``frozen=False``: fresh BatchNorms (mean 0, variance 1, weight 1) would
    hide mistakes in the per-channel arithmetic of the fused and compiled paths."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    for param in model.parameters():
        param.requires_grad_(not frozen)
    return model.eval()


def compiled_gradient_and_saved_bytes(fn, x: Tensor, backend) -> Tuple[Tensor, int]:
    """``torch.compile(fn, backend=backend)``: the input gradient of ``sum(fn(x))`` and the bytes it saves."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(compiled(leaf).sum(), leaf)
    return grad, saved_bytes(lambda: compiled(x.clone().requires_grad_()))


def without_recompute_tags(targets, inner: str = "inductor"):
    """An inner backend for ``excitation.backend(inner=...)`` that drops the lowering's recompute tags from the
    nodes calling one of ``targets``, then compiles with ``inner``: what the graph keeps without them."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_graph(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in targets:
                node.meta.pop("recompute", None)
        return lookup_backend(inner)(gm, example_inputs)

    return compile_graph


# ------------------------------------------------------------------ subnormals
from excitation.subnormals import SubnormalCounter  # noqa: E402,F401  (re-exported for the tests)


class HardMish(nn.Module):
    """timm's ``HardMish`` (out of place), without timm: ``0.5 * x * (x + 2).clamp(0, 2)``."""

    def forward(self, x: Tensor) -> Tensor:
        return hard_mish(x)


class ReferenceHardMish(nn.Module):
    """The module swapped in for :class:`HardMish` by the references: its value, the stand-in's gradient."""

    def __init__(self, temp: float = RULE_TEMPS["hard_mish"]) -> None:
        super().__init__()
        self.temp = temp

    def forward(self, x: Tensor) -> Tensor:
        return _straight_through(hard_mish(x), soft_hard_mish_standin(x, self.temp))


class MoreForms(nn.Module):
    """One site of each rule timm brought in: PReLU (per channel, and a scalar slope through ``F.prelu``),
    ELU, CELU, SELU, Mish and hard_mish, in module, functional and ``torch.`` forms."""

    def __init__(self, classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.prelu = nn.PReLU(dim, init=0.2)
        self.celu = nn.CELU(0.5)  # a power of 2: torch's own CELU backward rounds 1 / alpha to float32
        self.mish = nn.Mish()
        self.hmish = HardMish()
        self.slope = nn.Parameter(torch.tensor([-0.1]))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.celu(F.elu(self.prelu(self.conv(x)), 0.5))
        h = self.hmish(self.mish(torch.selu(h)))
        return self.head(F.prelu(h, self.slope).mean((2, 3)))


# Sites per kind in MoreForms.
MORE_FORMS_KINDS = {"relu": 0, "max_pool2d": 0, "prelu": 2, "elu": 1, "celu": 1, "selu": 1, "mish": 1, "hard_mish": 1}


class StepForms(nn.Module):
    """Threshold and eval-mode RReLU in module, functional and ``torch.`` forms."""

    def __init__(self, classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.threshold = nn.Threshold(0.1, -0.5)
        self.rrelu = nn.RReLU(0.1, 0.3)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.rrelu(self.threshold(self.conv(x)))
        h = F.rrelu(F.threshold(h, -0.2, 0.05), 0.2, 0.4, training=False)
        return self.head(torch.threshold(h * 2, 0.3, 0.0).mean((2, 3)))


# Sites per kind in StepForms.
STEP_FORMS_KINDS = {"relu": 0, "max_pool2d": 0, "threshold": 3, "rrelu": 2}


def more_forms_reference(model: nn.Module, x: Tensor, target: int, hard_mish_types: Tuple[type, ...] = (HardMish,)
                         ) -> Tensor:
    """:func:`reference_pullback` (``rules=True``) of a copy of ``model`` whose hard_mish modules
    (``hard_mish_types``: ours, or timm's ``HardMish``) are swapped for :class:`ReferenceHardMish`."""
    import copy

    swapped = copy.deepcopy(model)
    for module in list(swapped.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, hard_mish_types):
                setattr(module, child_name, ReferenceHardMish())
    return reference_pullback(swapped, x, target, rules=True)


# ------------------------------------------------- the Hugging Face forms: RMSNorm, gelu_new, quick_gelu
def gelu_new(x: Tensor) -> Tensor:
    """transformers' ``NewGELUActivation`` (GPT-2), as written there."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: Tensor) -> Tensor:
    """transformers' ``QuickGELUActivation`` (CLIP), as written there."""
    return x * torch.sigmoid(1.702 * x)


class GeluNew(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return gelu_new(x)


class QuickGelu(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return quick_gelu(x)


class LlamaRMSNorm(nn.Module):
    """Llama's RMSNorm as transformers writes it (float32 statistics, cast back)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.eps = eps

    def forward(self, h: Tensor) -> Tensor:
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class ReferenceExpression(nn.Module):
    """Swapped in for an expression module by :func:`hf_forms_reference`: its value, the GELU rule's gradient."""

    def __init__(self, kind: str, weight: Optional[Tensor] = None) -> None:
        super().__init__()
        self.kind, self.weight = kind, weight

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "gelu_new":
            return _straight_through(gelu_new(x), gaussian_smoothed_relu(x, RULE_TEMPS["gelu"]))
        if self.kind == "quick_gelu":
            return _straight_through(quick_gelu(x), softplus(1.702 * x) / 1.702)  # temp 1: sigmoid(1.702 z)
        h = x.to(torch.float32)  # the RMS held constant
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6).detach()
        return self.weight * (h * rstd).to(x.dtype)


class HFForms(nn.Module):
    """One site of each rule transformers brought: RMSNorm as ``nn.RMSNorm``, ``F.rms_norm`` and Llama's
    hand-written form, GPT-2's gelu_new and CLIP's quick_gelu expressions."""

    def __init__(self, classes: int = 10, dim: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(12, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.llama_norm = LlamaRMSNorm(dim)
        self.gelu_new, self.quick_gelu = GeluNew(), QuickGelu()
        self.scale = nn.Parameter(torch.linspace(1.5, 0.5, dim))
        self.head = nn.Linear(dim, classes)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        h = self.gelu_new(self.norm(self.up(x.flatten(1)[:, :12])))
        h = self.quick_gelu(F.rms_norm(h * 2, (self.dim,), self.scale, 1e-6))
        return self.head(self.llama_norm(h))


# Sites per kind in HFForms.
HF_FORMS_KINDS = {"relu": 0, "max_pool2d": 0, "rms_norm": 3, "gelu_new": 1, "quick_gelu": 1}


def hf_forms_reference(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """:func:`reference_pullback` (``rules=True``) of a copy of :class:`HFForms` whose expression modules and
    hand-written RMSNorm are swapped for :class:`ReferenceExpression` (``nn.RMSNorm`` and ``F.rms_norm`` are
    intercepted by the reference itself)."""
    import copy

    swapped = copy.deepcopy(model)
    swapped.gelu_new, swapped.quick_gelu = ReferenceExpression("gelu_new"), ReferenceExpression("quick_gelu")
    swapped.llama_norm = ReferenceExpression("rms_norm", swapped.llama_norm.weight)
    return reference_pullback(swapped, x, target, rules=True)


class GraphBreakInBlocks(nn.Module):
    """Two blocks with a data-dependent branch inside each: the resume frames' ``self`` is the block."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU()

        def forward(self, x):
            h = self.conv(x)
            if h.mean() > 0:
                h = h * 2
            return self.act(h)

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(self.Block(), self.Block())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean(dim=(2, 3)))
