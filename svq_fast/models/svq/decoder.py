"""Upsampling conv decoder: latent -> mid -> per-resolution ResBlocks (+ attention) -> output channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import AttnBlock, ResBlock, Upsample, norm
from .spade import SPADE, SpadeResBlock


class Decoder(nn.Module):
    """(B, in_channels, r, r) -> (B, out_channels, r * 2^(len(ch_mult)-1), same).

    cond_channels > 0 makes it a SPADE decoder (models/svq/spade.py): every ResBlock and the output norm take
    a per-pixel scale and shift from a semantic input cond (B, cond_channels, H, W) passed to forward.
    forward(..., with_hidden=True) also returns the input of `conv_out`: the GAN's adaptive weight needs it to
    form the gradient w.r.t. conv_out's weight without touching the (possibly ZeRO-3 partitioned) parameter.
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
        cond_channels: int = 0,
        spade_hidden: int = 64,
    ):
        super().__init__()
        self.cond_channels = cond_channels

        def res_block(cin: int, cout: int) -> nn.Module:
            if cond_channels:
                return SpadeResBlock(cin, cout, groups, cond_channels, spade_hidden, dropout)
            return ResBlock(cin, cout, groups, dropout)

        cin = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, cin, 3, padding=1)
        self.mid = nn.Sequential(res_block(cin, cin), AttnBlock(cin, groups), res_block(cin, cin))
        blocks: list[nn.Module] = []
        for level in reversed(range(len(ch_mult))):
            cout = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(cin, cout))
                cin = cout
                if res in attn_resolutions:
                    blocks.append(AttnBlock(cin, groups))
            if level != 0:
                blocks.append(Upsample(cin))
                res *= 2
        self.up = nn.Sequential(*blocks)
        self.norm_out = SPADE(cin, groups, cond_channels, spade_hidden) if cond_channels else norm(cin, groups)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor, cond: torch.Tensor | None = None, *, with_hidden: bool = False):
        if self.cond_channels and cond is None:
            raise ValueError("this SPADE decoder needs its semantic input cond (B, C, H, W)")
        h = self.conv_in(z)
        for block in (*self.mid, *self.up):
            h = block(h, cond) if isinstance(block, SpadeResBlock) else block(h)
        h = F.silu(self.norm_out(h, cond) if self.cond_channels else self.norm_out(h))  # (B, C0, H, W)
        out = self.conv_out(h)
        return (out, h) if with_hidden else out
