"""A small fully-convolutional segmentation net (U-Net shaped) that scores generated images by their semantics.

It is trained on real images (recipes/train_segmenter.py) to predict the label map; evaluate.py then reports
the mIoU of its predictions on generated images against the map they were generated from, and the Frechet
distance between real and generated images in its feature space ("FSD", Frechet segmenter distance: the
global average of the penultimate feature map, `width` dims). Both are only as good as the segmenter: the
recipe prints its mIoU on real held-out images, and evaluate.py reports it beside the generated-image score.

Shape, for width w and L levels: stem (3 -> w, full resolution) -> L x [stride-2 conv, doubling the width
(capped at 8w), two 3x3 conv blocks] -> L x [nearest 2x upsample, 3x3 conv, + skip, 3x3 conv block] ->
penultimate (B, w, H, W) -> 1x1 classifier. Inputs (B, 3, H, W) in [-1, 1], H and W divisible by 2^L.

Saved and loaded by svq_fast.export (export_segmenter / load_segmenter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(kw_only=True)
class SegmenterConfig:
    num_classes: int = 16
    ignore_index: int = 255
    width: int = 32  # full-resolution width = the FSD feature dimension
    levels: int = 3  # downsamplings
    groups: int = 8  # GroupNorm groups (divide width)
    image_size: int = 64  # the resolution it was trained at (informational: the net is fully convolutional)

    def __post_init__(self):
        if self.width % self.groups:
            raise ValueError(f"SegmenterConfig: groups={self.groups} does not divide width={self.width}")
        if self.levels < 1 or self.num_classes < 2:
            raise ValueError("SegmenterConfig: needs levels >= 1 and num_classes >= 2")


def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class Segmenter(nn.Module):
    def __init__(self, cfg: SegmenterConfig):
        super().__init__()
        self.cfg = cfg
        w, g = cfg.width, cfg.groups
        widths = [min(w * 2**i, 8 * w) for i in range(cfg.levels + 1)]
        self.stem = nn.Sequential(_block(3, w, g), _block(w, w, g))
        self.down = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                nn.GroupNorm(g, widths[i + 1]),
                nn.SiLU(),
                _block(widths[i + 1], widths[i + 1], g),
                _block(widths[i + 1], widths[i + 1], g),
            )
            for i in range(cfg.levels)
        )
        self.up_conv = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(cfg.levels))
        self.up_block = nn.ModuleList(_block(widths[i], widths[i], g) for i in range(cfg.levels))
        self.head = nn.Conv2d(w, cfg.num_classes, 1)

    @property
    def feature_dim(self) -> int:
        return self.cfg.width

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (logits (B, C, H, W), pooled penultimate features (B, width))."""
        f = 2**self.cfg.levels
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"Segmenter: H and W must be divisible by {f}, got {tuple(x.shape[-2:])}")
        h = self.stem(x)  # (B, w, H, W)
        skips = [h]
        for down in self.down:
            h = down(h)
            skips.append(h)
        skips.pop()
        for i in reversed(range(self.cfg.levels)):
            h = self.up_conv[i](F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips[i]
            h = self.up_block[i](h)
        return self.head(h), h.mean((2, 3))  # (B, C, H, W), (B, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """-> (B, H, W) int64 class ids."""
        return self.forward(x).argmax(1)


__all__ = ["SegmenterConfig", "Segmenter"]
