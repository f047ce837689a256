"""Mean intersection-over-union from a streamed confusion matrix (ignore pixels excluded)."""

from __future__ import annotations

import torch

from svq_fast import dist


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64)  # rows: truth, cols: prediction

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target (B, H, W) int class ids."""
        valid = target != self.ignore_index
        t, p = target[valid].long().cpu(), pred[valid].long().cpu()
        self.mat += torch.bincount(t * self.num_classes + p, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the matrix over ranks (a collective: every rank calls it in the same order); returns self."""
        dist.all_reduce_sum_(self.mat)
        return self

    def iou(self) -> torch.Tensor:
        """(C,) float64 IoU per class; NaN for classes absent from both truth and prediction."""
        m = self.mat.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))

    def miou(self) -> float:
        iou = self.iou()
        return float(iou[~iou.isnan()].mean()) if (~iou.isnan()).any() else float("nan")

    def pixel_accuracy(self) -> float:
        return float(self.mat.diag().sum().double() / self.mat.sum().clamp_min(1).double())
