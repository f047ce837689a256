"""Convolution over the one-hot of a semantic map: the semantic half of the encoder's first layer.

conv(concat(x, onehot(s))) == conv_x(x) + conv_s(onehot(s)); this module is conv_s. Pixels equal to
`ignore_index` contribute nothing (an all-zero one-hot column). The fused op (svq_fast.kernels.semantic_conv)
gathers weight columns by class id instead of building the (B, num_classes, H, W) one-hot; the parameters are
those of an nn.Conv2d(num_classes, out_channels, kernel_size, padding=kernel_size // 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from svq_fast.kernels.semantic_conv import BACKENDS, semantic_conv, semantic_conv_ref

__all__ = ["SemanticConv", "semantic_conv_ref"]


class SemanticConv(nn.Module):
    """labels (B, H, W) int -> (B, out_channels, H, W). Class ids outside [0, num_classes) that are not
    ignore_index raise ValueError. backend: "auto" | "triton" | "native" | "ref" (see semantic_conv)."""

    def __init__(
        self,
        num_classes: int,
        out_channels: int,
        *,
        kernel_size: int = 3,
        ignore_index: int = 255,
        bias: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"SemanticConv: unknown backend {backend!r} (one of {'|'.join(BACKENDS)})")
        self.num_classes, self.ignore_index, self.backend = num_classes, ignore_index, backend
        self.weight = nn.Parameter(torch.empty(out_channels, num_classes, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        # same init as nn.Conv2d with num_classes input channels
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, labels: torch.Tensor) -> torch.Tensor:  # (B, H, W) -> (B, Cout, H, W)
        return semantic_conv(labels, self.weight, self.bias, ignore_index=self.ignore_index, backend=self.backend)

    def extra_repr(self) -> str:
        k = self.weight.shape[-1]
        return (
            f"{self.num_classes}, {self.weight.shape[0]}, kernel_size={k}, ignore_index={self.ignore_index}, "
            f"bias={self.bias is not None}, backend={self.backend!r}"
        )
