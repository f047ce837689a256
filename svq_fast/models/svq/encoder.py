"""Downsampling conv encoder: stem -> per-resolution ResBlocks (+ attention) -> mid -> latent channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, Downsample, ResBlock, norm


class Encoder(nn.Module):
    """(B, ch, R, R) stem features -> (B, out_channels, R / 2^(len(ch_mult)-1), same).

    The stem (first conv) is outside so the caller can feed image, semantic map, or both.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        out_channels: int,
        groups: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        cin, res = ch, resolution
        for level, mult in enumerate(ch_mult):
            cout = ch * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cin, cout, groups, dropout))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cin, groups))
            if level != len(ch_mult) - 1:
                blocks.append(Downsample(cin))
                res //= 2
        self.down = nn.Sequential(*blocks)
        self.mid = nn.Sequential(
            ResBlock(cin, cin, groups, dropout), AttnBlock(cin, groups), ResBlock(cin, cin, groups, dropout)
        )
        self.norm_out = norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, h):
        h = self.mid(self.down(h))
        return self.conv_out(F.silu(self.norm_out(h)))
