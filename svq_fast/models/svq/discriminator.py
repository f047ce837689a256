"""PatchGAN discriminator (Isola et al.), as used by VQGAN: per-patch real/fake logits."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """lecam=True adds a (2,) buffer `lecam_ema` (running means of the real and fake logits, for the LeCam
    regulariser); as a buffer it is checkpointed with the discriminator, so a resumed run continues it exactly."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, lecam: bool = False):
        super().__init__()
        if lecam:
            self.register_buffer("lecam_ema", torch.zeros(2))
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ch * prev, ch * mult, 4, stride=stride, padding=1, bias=False),
                # taming uses BatchNorm; its per-rank statistics make results depend on the
                # number of ranks, so a batch-independent GroupNorm(1) (layer norm over C,H,W) is used.
                nn.GroupNorm(1, ch * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ch * mult, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        self.apply(_init)

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.net(x)


def _init(m):
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.GroupNorm):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
