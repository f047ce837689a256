"""What a swapped decode is trained towards (model.latent_swap_target="recoloured").

The latent swap decodes (z_s of A, z_x of B). Trained towards image A, the decoder is told to ignore B's appearance
in z_x and guess A's from z_s; trained towards A recoloured with B's per-class mean colours, it is told to take the
layout from z_s and the colours from z_x, which is the split a map-only z_s needs (issue 29).
"""

from __future__ import annotations

import torch


def _class_bins(s: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, HW) bins: the class, or the extra bin num_classes for ignore_index pixels."""
    return torch.where(s == ignore_index, num_classes, s).flatten(1)


def class_mean_colours(
    x: torch.Tensor, s: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) images and (B, H, W) class ids -> ((B, C, 3) mean colour of each class, (B, C) pixel counts);
    classes absent from a map get colour 0 and count 0, pixels labelled ignore_index count for no class."""
    b = x.shape[0]
    labels = _class_bins(s, num_classes, ignore_index)  # (B, HW)
    pixels = x.float().flatten(2).transpose(1, 2)  # (B, HW, 3)
    sums = pixels.new_zeros(b, num_classes + 1, 3).scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, 3), pixels)
    counts = pixels.new_zeros(b, num_classes + 1).scatter_add_(1, labels, torch.ones_like(labels, dtype=pixels.dtype))
    means = sums / counts.clamp_min(1.0).unsqueeze(-1)
    return means[:, :num_classes], counts[:, :num_classes]


def recoloured_swap_target(
    x: torch.Tensor, s: torch.Tensor, swapped: torch.Tensor, num_classes: int, ignore_index: int
) -> torch.Tensor:
    """Targets of a batch whose decodes took z_x from the previous sample (x.roll(1, 0)) where `swapped` (B,) is true:
    there, x with every class's pixels shifted by (donor's mean colour of the class - x's), for the classes both maps
    have, clamped to [-1, 1]; classes the donor lacks and ignored pixels keep x's colours. Elsewhere x itself.
    x (B, 3, H, W) in [-1, 1], s (B, H, W) int64 -> (B, 3, H, W) in x's dtype."""
    means, counts = class_mean_colours(x, s, num_classes, ignore_index)
    shared = (counts > 0) & (counts.roll(1, 0) > 0)  # (B, C)
    shift = torch.where(shared.unsqueeze(-1), means.roll(1, 0) - means, 0.0)  # (B, C, 3)
    shift = torch.cat([shift, shift.new_zeros(shift.shape[0], 1, 3)], 1)  # ignored pixels: no shift
    labels = _class_bins(s, num_classes, ignore_index)  # (B, HW)
    per_pixel = shift.gather(1, labels.unsqueeze(-1).expand(-1, -1, 3))  # (B, HW, 3)
    recoloured = (x.float() + per_pixel.transpose(1, 2).reshape(x.shape)).clamp(-1.0, 1.0)
    return torch.where(swapped.view(-1, 1, 1, 1), recoloured, x.float()).to(x.dtype)
