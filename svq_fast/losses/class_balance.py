"""Per-class weights for the semantic cross-entropy, from per-class pixel counts (a tensor).

mIoU averages over classes, while plain cross-entropy averages over pixels: a class covering 0.2% of the pixels
(a pole, a fence) gets 1/100 of the gradient of the sky and is learned last. With `power` a > 0 class c is weighted
w_c ~ f_c^-a (f_c its pixel frequency in the training shards; a = 0.5 is inverse-sqrt frequency), normalised so that
sum_c f_c w_c = 1: the average pixel keeps weight 1 and the loss keeps plain cross-entropy's scale. Classes with no
pixels in the training data never occur as targets; their weight is 0.

The same weights can weight the image reconstruction per pixel (pixel_weights; LossConfig.image_class_balance):
the image terms then spend the decoder's capacity on the small objects' textures as much as on the sky's.

The counts come from the shards' index (svq_fast.data.index.class_pixel_counts); this file reads nothing.
"""

from __future__ import annotations

import torch


def balanced_class_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """(C,) float32 weights w_c ~ f_c^-power with sum_c f_c w_c = 1 (0 for classes without pixels)."""
    if power < 0:
        raise ValueError(f"semantic_class_balance must be >= 0, got {power}")
    freq = counts.double() / counts.sum()
    present = freq > 0
    weights = torch.zeros_like(freq)
    weights[present] = freq[present].pow(-power)
    return (weights / (freq * weights).sum()).float()


def pixel_weights(labels: torch.Tensor, class_weight: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(B, H, W) class ids -> (B, 1, H, W) float32 per-pixel weights class_weight[label]; ignore pixels (and ids
    outside the table) weigh 1, like an average pixel."""
    table = class_weight.to(labels.device, torch.float32)
    known = (labels != ignore_index) & (labels >= 0) & (labels < table.numel())
    weight = torch.where(known, table[labels.clamp(0, table.numel() - 1)], torch.ones((), device=labels.device))
    return weight.unsqueeze(1)
