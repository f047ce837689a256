"""Upsampling conv decoder: latent -> mid -> per-resolution ResBlocks (+ attention) -> output channels."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, ResBlock, Upsample, norm


class Decoder(nn.Module):
    """(B, in_channels, r, r) -> (B, out_channels, r * 2^(len(ch_mult)-1), same).

    `last_hidden` keeps the input of `conv_out` from the latest forward: the GAN's adaptive weight needs
    it to form the gradient w.r.t. conv_out's weight without touching the (possibly ZeRO-3 partitioned)
    parameter itself.
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        resolution: int,
        in_channels: int,
        out_channels: int,
        groups: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(
            ResBlock(cin, cin, groups, dropout), AttnBlock(cin, groups), ResBlock(cin, cin, groups, dropout)
        )
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(cin, cout, groups, dropout))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cin, groups))
            if level != 0:
                blocks.append(Upsample(cin))
                res *= 2
        self.up = nn.Sequential(*blocks)
        self.norm_out = norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)
        self.last_hidden = None

    def forward(self, z):
        h = self.up(self.mid(self.conv_in(z)))
        h = F.silu(self.norm_out(h))
        self.last_hidden = h
        return self.conv_out(h)
