"""Convolution over the one-hot of a semantic map: the semantic half of the encoder's first layer.

conv(concat(x, onehot(s))) == conv_x(x) + conv_s(onehot(s)); this module is conv_s. Pixels equal to
`ignore_index` contribute nothing (an all-zero one-hot column).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def semantic_conv_ref(
    labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """labels (B, H, W) int64, weight (Cout, num_classes, k, k) -> (B, Cout, H, W) (same padding)."""
    num_classes = weight.shape[1]
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        ids = torch.unique(labels[bad]).tolist()[:8]
        raise ValueError(f"semantic map holds class ids {ids} outside [0, {num_classes}) (ignore id {ignore_index})")
    onehot = F.one_hot(torch.where(valid, labels, 0), num_classes).permute(0, 3, 1, 2)  # (B, C, H, W)
    onehot = (onehot * valid[:, None]).to(weight.dtype)
    return F.conv2d(onehot, weight, bias, padding=weight.shape[-1] // 2)


class SemanticConv(nn.Module):
    def __init__(
        self, num_classes: int, out_channels: int, *, kernel_size: int = 3, ignore_index: int = 255, bias: bool = True
    ):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weight = nn.Parameter(torch.empty(out_channels, num_classes, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # same init as nn.Conv2d with num_classes input channels
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, Cout, H, W)
        return semantic_conv_ref(labels, self.weight, self.bias, self.ignore_index)
