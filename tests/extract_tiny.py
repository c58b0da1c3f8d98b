"""A tiny classifier for the extract tests, loadable as ``--model tests.extract_tiny:tiny``."""

import torch
from torch import nn


def tiny() -> nn.Module:
    """Conv -> ReLU -> max-pool -> conv -> ReLU -> mean -> linear (5 classes); fixed random weights."""
    gen = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


def micro() -> nn.Module:
    """Conv -> ReLU -> mean -> linear (5 classes): the fewest kernels for inductor to compile (``--compile`` test)."""
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 5))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net.eval()


def convit() -> nn.Module:
    """timm's ConViT (convit_tiny), shrunk to 32 x 32 inputs: torch.fx cannot trace it, so it takes the dynamo path."""
    import timm

    torch.manual_seed(2)
    return timm.create_model("convit_tiny", pretrained=False, num_classes=5, img_size=32, patch_size=8, embed_dim=16,
                             depth=1, num_heads=1, local_up_to_layer=1).eval()
