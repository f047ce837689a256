"""Semantic decoder that stays at latent resolution and unfolds each latent into its f x f label patch.

The VQGAN-style decoder upsamples through narrow full-resolution levels; at CPU budgets it learns label maps
slowly, because a thin object (a pole one pixel wide) has to survive nearest-neighbour upsampling and a 3x3 conv
at every level. Here all the work happens at latent resolution, where the width is cheap, and the last conv
predicts the class logits of all f * f pixels a latent covers at once (sub-pixel convolution, Shi et al. 2016):
one latent code maps directly to one label patch. Measured gains are in the configs' docstrings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import ResBlock, norm


class SubpixelDecoder(nn.Module):
    """(B, in_channels, r, r) -> (B, out_channels, r * factor, r * factor).

    conv_in -> `num_blocks` ResBlocks of `width` channels at r x r -> GroupNorm + SiLU ->
    3x3 conv to out_channels * factor^2 -> pixel shuffle.
    """

    def __init__(self, *, in_channels: int, out_channels: int, width: int, num_blocks: int, factor: int, groups: int):
        super().__init__()
        if factor < 1:
            raise ValueError(f"SubpixelDecoder: upsampling factor must be >= 1, got {factor}")
        self.factor = factor
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(width, width, groups) for _ in range(num_blocks)])
        self.norm_out = norm(width, groups)
        self.conv_out = nn.Conv2d(width, out_channels * factor * factor, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm_out(self.blocks(self.conv_in(z))))
        # (B, out * f * f, r, r) -> (B, out, r * f, r * f): channel (c, i, j) becomes pixel (i, j) of class c
        return F.pixel_shuffle(self.conv_out(h), self.factor)
