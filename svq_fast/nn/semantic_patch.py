"""Linear embedding of each latent's f x f label patch: a semantic-only input path to the semantic latent z_s.

Equal to nn.Conv2d(num_classes, out_channels, f, stride=f, bias=False) over onehot(s) (pixels equal to
ignore_index contribute nothing), computed without the one-hot: every pixel of a patch selects one row of a
(num_classes * f * f, out_channels) table, by its class and its position in the patch, and F.embedding_bag sums
the f * f rows of each patch in one native kernel (CPU and CUDA), so neither the (B, C, H, W) one-hot nor
per-pixel embeddings are ever held.

Why the coupled models want it (models/svq/model.py, `semantic_patch_input`): this path carries each patch's labels
to z_s through weights that only the semantic loss trains (the image decoder sees sg[z_s]). On the tiny sVQGAN it
raised held-out semantic mIoU after 100 / 300 steps from 0.30 / 0.76 to 0.73 / 0.85 (single-process probe) and
after the demo's 600 steps from 83.4% to 89.8%. Our reading (not separately tested): in the shared encoder the
semantic loss enters with weight lambda = 0.1, so Adam's per-parameter step size, set mostly by the image gradient,
moves the shared weights slowly along the semantic direction, and the thin objects (1-2 px poles and fences at
64x64) are learned last.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SemanticPatchEmbed(nn.Module):
    """labels (B, H, W) int -> (B, out_channels, H / factor, W / factor). Class ids must already be valid
    (0..num_classes-1 or ignore_index): the encoder's SemanticConv stem checks them first."""

    def __init__(self, num_classes: int, out_channels: int, factor: int, *, ignore_index: int = 255):
        super().__init__()
        if num_classes < 1 or out_channels < 1 or factor < 1:
            raise ValueError(
                f"SemanticPatchEmbed: need num_classes, out_channels, factor >= 1, got "
                f"{num_classes}, {out_channels}, {factor}"
            )
        self.num_classes, self.factor, self.ignore_index = num_classes, factor, ignore_index
        rows = num_classes * factor * factor
        # row class * f^2 + (i * f + j): pixel (i, j) of a patch showing `class`; the extra last row is the
        # padding row that ignore pixels select (embedding_bag skips it, and it gets no gradient)
        self.weight = nn.Parameter(torch.empty(rows + 1, out_channels))
        bound = 1.0 / math.sqrt(rows)  # nn.Conv2d's default init for fan_in = num_classes * f^2
        nn.init.uniform_(self.weight, -bound, bound)
        with torch.no_grad():
            self.weight[rows].zero_()
        self.register_buffer("position", torch.arange(factor * factor), persistent=False)  # (f^2,)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        b, h_img, w_img = labels.shape
        f = self.factor
        if h_img % f or w_img % f:
            raise ValueError(f"SemanticPatchEmbed: label map {h_img}x{w_img} is not a multiple of the factor {f}")
        h, w = h_img // f, w_img // f
        patches = labels.reshape(b, h, f, w, f).permute(0, 1, 3, 2, 4).reshape(b * h * w, f * f)  # (N, f^2)
        pad = self.weight.shape[0] - 1
        ignore = patches == self.ignore_index
        rows = torch.where(ignore, pad, patches.clamp(0, self.num_classes - 1) * (f * f) + self.position)
        out = F.embedding_bag(rows, self.weight, mode="sum", padding_idx=pad)  # (N, out_channels)
        return out.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return f"{self.num_classes}, {self.weight.shape[1]}, factor={self.factor}, ignore_index={self.ignore_index}"
