"""Pixel reconstruction and semantic cross-entropy terms of equation (3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(t: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of t (B, C, h, w), each position weighted by weight (B, 1, h, w) when given (weights average ~1)."""
    return t.mean() if weight is None else (t * weight).mean()


def reconstruction_loss(
    x_hat: torch.Tensor,
    x: torch.Tensor,
    *,
    l1_weight: float = 1.0,
    l2_weight: float = 0.0,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean L1 (+ L2) over pixels; x, x_hat (B, 3, H, W) in [-1, 1]; pixel_weight (B, 1, H, W) or None
    (class_balance.pixel_weights: the pixels of rare classes count more)."""
    diff = x_hat.float() - x.float()
    loss = l1_weight * _mean(diff.abs(), pixel_weight)
    if l2_weight:
        loss = loss + l2_weight * _mean(diff.pow(2), pixel_weight)
    return loss


def texture_loss(
    x_hat: torch.Tensor, x: torch.Tensor, window: int = 4, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean L1 between the local texture energy of x_hat and of x; x, x_hat (B, 3, H, W) in [-1, 1];
    pixel_weight (B, 1, H, W) or None, averaged over each cell to weight it.

    Texture energy: |x - 3x3 box blur of x| (a high-pass, reflect-padded), averaged over window x window cells ->
    (B, 3, H / window, W / window). A blurred reconstruction of stripes, dots or checks has almost none of it, while
    a pattern of the right contrast costs nothing wherever its phase is: the cue L1 alone cannot give a decoder
    that does not know the phase. H and W must be divisible by `window`."""
    if x.shape[-1] % window or x.shape[-2] % window:
        raise ValueError(f"texture_loss: H and W {tuple(x.shape[-2:])} must be divisible by window={window}")

    def energy(t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        blurred = F.avg_pool2d(F.pad(t, (1, 1, 1, 1), mode="reflect"), 3, stride=1)
        return F.avg_pool2d((t - blurred).abs(), window)

    cell_weight = None if pixel_weight is None else F.avg_pool2d(pixel_weight.float(), window)
    return _mean((energy(x_hat) - energy(x)).abs(), cell_weight)


def semantic_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over classes; logits (B, C, H, W), labels (B, H, W); ignore pixels excluded.

    class_weight (C,): per-class weights (losses/class_balance.py). The weighted sum is divided by the number of
    valid pixels, not by the sum of their weights, so a batch's loss does not depend on which classes it holds.
    Returns 0 (with a graph) when a batch holds only ignore pixels, rather than NaN.
    """
    valid = (labels != ignore_index).sum()
    weight = None if class_weight is None else class_weight.to(logits.device, torch.float32)
    loss = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    return loss / valid.clamp_min(1)
