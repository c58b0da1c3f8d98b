"""Attention with constant weights: softmax, scaled-dot-product attention, MultiheadAttention, frozen functions."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from excitation.kernels import (
    ExcitedMultiheadAttention,
    freeze_attention,
    stop_gradient,
    surrogate_scaled_dot_product_attention,
    surrogate_softmax,
)


def test_softmax_forward_exact_backward_zero():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    out = surrogate_softmax(x, dim=-1)
    assert torch.equal(out, F.softmax(x, dim=-1))
    assert torch.equal(surrogate_softmax(x.float(), 0, dtype=torch.float64), F.softmax(x.float(), 0, dtype=torch.float64))
    (grad,) = torch.autograd.grad((out * torch.randn(3, 5, dtype=torch.float64)).sum(), x, allow_unused=True)
    assert grad is None or torch.equal(grad, torch.zeros_like(x))


def test_stop_gradient_copies_and_blocks():
    x = torch.randn(4, requires_grad=True)
    y = stop_gradient(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    (grad,) = torch.autograd.grad((y * 3).sum(), x, allow_unused=True)
    assert grad is None or torch.equal(grad, torch.zeros_like(x))


@pytest.mark.parametrize("mask", [None, "bool", "float", "causal"])
def test_sdpa_value_path_only(mask):
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attn_mask = {"bool": torch.rand(5, 5) > 0.3, "float": torch.randn(5, 5, dtype=torch.float64)}.get(mask)
    if mask == "bool":
        attn_mask[:, 0] = True  # no fully masked row
    kwargs = {"attn_mask": attn_mask, "is_causal": mask == "causal"}
    out = surrogate_scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kwargs))
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    assert dq is None and dk is None
    logits = q @ k.transpose(-1, -2) / math.sqrt(4)
    if mask == "bool":
        logits = logits.masked_fill(~attn_mask, -math.inf)
    elif mask == "float":
        logits = logits + attn_mask
    elif mask == "causal":
        logits = logits.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), -math.inf)
    weights = torch.softmax(logits, -1).detach()
    torch.testing.assert_close(dv, weights.transpose(-1, -2) @ g, rtol=1e-10, atol=1e-12)


def _frozen_reference(mha, x, batch_first):
    """MHA with detached attention weights, written out."""
    xb = x if batch_first else x.transpose(0, 1)
    n, t, d = xb.shape
    h = mha.num_heads
    q, k, v = F.linear(xb, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
    heads = lambda u: u.reshape(n, t, h, d // h).transpose(1, 2)  # noqa: E731
    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // h), -1).detach()
    out = mha.out_proj((a @ heads(v)).transpose(1, 2).reshape(n, t, d))
    return out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_is_exact_forward_and_frozen_backward(batch_first, need_weights):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=torch.float64).eval()
    excited = copy.deepcopy(mha)
    excited.__class__ = ExcitedMultiheadAttention
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    ours, weights = excited(x, x, x, need_weights=need_weights)
    theirs, their_weights = mha(x, x, x, need_weights=need_weights)
    assert torch.equal(ours, theirs)
    assert (weights is None and their_weights is None) or torch.equal(weights, their_weights)
    with torch.no_grad():  # torch's fast path: still the module's own result
        assert torch.equal(excited(x, x, x)[0], mha(x, x, x)[0])
    g = torch.randn_like(ours)
    (mine,) = torch.autograd.grad(ours, x, g)
    (ref,) = torch.autograd.grad(_frozen_reference(mha, x, batch_first), x, g)
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)


def test_multihead_attention_with_key_padding_mask_keeps_forward():
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64).eval()
    excited = copy.deepcopy(mha)
    excited.__class__ = ExcitedMultiheadAttention
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False] * 5, [False, False, False, True, True]])
    assert torch.equal(excited(x, x, x, key_padding_mask=mask)[0], mha(x, x, x, key_padding_mask=mask)[0])


def test_freeze_attention_on_swin_keeps_forward_and_zeroes_logit_path():
    from torchvision.models.swin_transformer import shifted_window_attention

    torch.manual_seed(0)
    frozen = freeze_attention(shifted_window_attention)
    assert frozen is freeze_attention(shifted_window_attention)  # cached: one copy per function
    assert frozen.__code__ is shifted_window_attention.__code__  # the same code, not a copy of it
    dim, heads, window = 8, 2, [4, 4]
    x = torch.randn(1, 8, 8, dim, dtype=torch.float64, requires_grad=True)
    args = (torch.randn(3 * dim, dim, dtype=torch.float64), torch.randn(dim, dim, dtype=torch.float64),
            torch.randn(heads, 16, 16, dtype=torch.float64), window, heads)
    kwargs = dict(shift_size=[2, 2], qkv_bias=torch.randn(3 * dim, dtype=torch.float64),
                  proj_bias=torch.randn(dim, dtype=torch.float64), training=False)
    assert torch.equal(frozen(x, *args, **kwargs), shifted_window_attention(x, *args, **kwargs))
    g = torch.randn(1, 8, 8, dim, dtype=torch.float64)
    (ours,) = torch.autograd.grad(frozen(x, *args, **kwargs), x, g)
    (vanilla,) = torch.autograd.grad(shifted_window_attention(x, *args, **kwargs), x, g)
    assert (ours - vanilla).abs().max() > 1e-6
    # Reference: the original function with every softmax output detached by interception.
    from torch.overrides import TorchFunctionMode

    class DetachSoftmax(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            return out.detach() if func in (F.softmax, torch.softmax, torch.Tensor.softmax) else out

    with DetachSoftmax():
        reference = shifted_window_attention(x, *args, **kwargs)
    (ref,) = torch.autograd.grad(reference, x, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
