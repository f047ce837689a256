"""Spatially-adaptive normalisation (SPADE, Park et al. 2019) for the image decoder.

A SPADE layer normalises activations without learned affine parameters and then applies a per-pixel scale
and shift predicted from a semantic input: out = norm(h) * (1 + gamma(m)) + beta(m). Plain normalisation
layers wash a semantic input out after a few layers; SPADE re-injects the layout at every block, which is
what gives semantic image synthesis its layout fidelity.

Here the semantic input m is the class-probability map that the semantic decoder reads off sg[z_s]
(models/svq/model.py): it depends on z_s alone and is detached, so the image decoder can use the layout
without sending gradient into the semantic branch (the paper's stop-gradient still holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SPADE(nn.Module):
    """h (B, C, H, W), m (B, M, Hm, Wm) -> (B, C, H, W). m is resized to h's size (area-averaged when
    larger, nearest when smaller), then one shared 3x3 conv + ReLU and two 1x1 convs give gamma and beta.

    1x1 rather than SPADE's 3x3 for gamma and beta: the shared 3x3 conv already sees each pixel's neighbourhood,
    and at full resolution the two C-wide 3x3 convs would cost more than the rest of the tiny decoder."""

    def __init__(self, channels: int, groups: int, cond_channels: int, hidden: int):
        super().__init__()
        if channels % groups:
            raise ValueError(f"SPADE: {groups} groups do not divide {channels} channels")
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 1)
        self.beta = nn.Conv2d(hidden, channels, 1)
        # start as a plain (unit-scale, zero-shift) normalisation: training decides how much layout to inject
        for conv in (self.gamma, self.beta):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        if m.shape[-2:] != h.shape[-2:]:
            shrink = m.shape[-1] > h.shape[-1]
            m = F.adaptive_avg_pool2d(m, h.shape[-2:]) if shrink else F.interpolate(m, size=h.shape[-2:])
        a = self.shared(m.to(h.dtype))
        return self.norm(h) * (1 + self.gamma(a)) + self.beta(a)


class SpadeResBlock(nn.Module):
    """The decoder's ResBlock with both GroupNorms replaced by SPADE: (h, m) -> h'."""

    def __init__(self, cin: int, cout: int, groups: int, cond_channels: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = SPADE(cin, groups, cond_channels, hidden), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = SPADE(cout, groups, cond_channels, hidden), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x, m)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h, m))))
        return self.skip(x) + h
