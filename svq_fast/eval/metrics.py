"""Streaming metric states that merge exactly across batches, shards and ranks.

Every state is updated batch by batch (`update`), combined with another state of the same kind (`merge`), and
made global with `all_reduce()`, a collective that every rank must call in the same order (a no-op when
torch.distributed is not initialised). After `all_reduce()` every rank holds the same, global result, equal
(up to float64 round-off in FeatureStats) to one process having seen all the data.

- MeanStat: sum, sum of squares and count of per-sample values (SSIM, PSNR, LPIPS per image).
- FeatureStats: count, mean and centred second moment of feature vectors (FID / FSD statistics), updated and
  merged with Chan et al.'s pairwise formula in float64 (no E[x x^T] - mu mu^T cancellation). Ranks exchange
  their states with all_gather and merge them in rank order, so all ranks get bit-identical results.
- CodebookUsage: histogram of code ids -> fraction of codes used, perplexity exp(H(p)).
- per_class_stats: per-class rows of a (global) svq_fast.eval.miou.ConfusionMatrix
  and a per-class table (IoU, recall, pixel shares).

Collectives run on the device the process group's backend needs (CUDA for NCCL, CPU for gloo); the states
themselves live on the CPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from svq_fast import dist
from svq_fast.eval.miou import ConfusionMatrix


class MeanStat:
    """Mean (and standard deviation) of per-sample values; float64 sums."""

    def __init__(self):
        self.total = torch.zeros(3, dtype=torch.float64)  # (count, sum, sum of squares)

    def update(self, values: torch.Tensor) -> None:
        """values (B,) per-sample metric values (already restricted to the samples that count)."""
        v = values.detach().double().flatten().cpu()
        self.total += torch.stack([torch.tensor(float(v.numel()), dtype=torch.float64), v.sum(), v.square().sum()])

    def merge(self, other: MeanStat) -> MeanStat:
        self.total += other.total
        return self

    def all_reduce(self) -> MeanStat:
        dist.all_reduce_sum_(self.total)
        return self

    @property
    def count(self) -> int:
        return int(self.total[0])

    def mean(self) -> float:
        return float(self.total[1] / self.total[0]) if self.count else float("nan")

    def std(self) -> float:
        """Sample standard deviation over the values (NaN below two values)."""
        n, s, ss = (float(t) for t in self.total)
        if n < 2:
            return float("nan")
        return math.sqrt(max(ss - s * s / n, 0.0) / (n - 1))


class FeatureStats:
    """Streaming mean and covariance of feature vectors (D,), in float64.

    State: n, mean (D,), m2 (D, D) = sum_i (x_i - mean)(x_i - mean)^T. The covariance is m2 / (n - 1), the
    unbiased estimate that numpy.cov and pytorch-fid use.
    """

    def __init__(self, dim: int):
        self.dim = dim
        self.n = 0
        self.mean_ = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dim, dtype=torch.float64)

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        if n_b == 0:
            return
        n_a, n = self.n, self.n + n_b
        delta = mean_b - self.mean_
        self.mean_ = self.mean_ + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.n = n

    def update(self, feats: torch.Tensor) -> None:
        """feats (B, D), one row per sample that counts."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"FeatureStats({self.dim}): expected features (B, {self.dim}), got {tuple(feats.shape)}")
        f = feats.detach().double().cpu()
        if f.shape[0] == 0:
            return
        mean_b = f.mean(0)
        c = f - mean_b
        self._combine(f.shape[0], mean_b, c.T @ c)

    def merge(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge FeatureStats of dims {self.dim} and {other.dim}")
        self._combine(other.n, other.mean_, other.m2)
        return self

    def all_reduce(self) -> FeatureStats:
        """Gather every rank's state and merge in rank order (same result on every rank)."""
        if not dist.is_multi_rank():
            return self
        flat = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean_, self.m2.flatten()])
        parts = dist.all_gather(flat)
        d = self.dim
        merged = FeatureStats(d)
        for p in parts:
            part = FeatureStats(d)
            part.n, part.mean_, part.m2 = int(p[0]), p[1 : 1 + d].clone(), p[1 + d :].view(d, d).clone()
            merged.merge(part)
        self.n, self.mean_, self.m2 = merged.n, merged.mean_, merged.m2
        return self

    def mean(self) -> np.ndarray:
        return self.mean_.numpy().copy()

    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, these statistics hold {self.n}")
        return (self.m2 / (self.n - 1)).numpy().copy()

    def to_arrays(self) -> dict[str, np.ndarray]:
        """{"mu", "sigma", "n"}: the form the .npz statistics cache stores (pytorch-fid's names)."""
        return {"mu": self.mean(), "sigma": self.cov(), "n": np.asarray(self.n, np.int64)}

    @classmethod
    def from_arrays(cls, mu: np.ndarray, sigma: np.ndarray, n: int) -> FeatureStats:
        st = cls(int(mu.shape[0]))
        st.n = int(n)
        st.mean_ = torch.from_numpy(np.asarray(mu, np.float64).copy())
        st.m2 = torch.from_numpy(np.asarray(sigma, np.float64) * max(int(n) - 1, 0))
        return st


class CodebookUsage:
    """How many of K codes a set of token grids uses, and the perplexity of their empirical distribution."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.int64)

    def update(self, indices: torch.Tensor) -> None:
        """indices: any shape of code ids in [0, K) (one row per sample that counts)."""
        idx = indices.detach().flatten().long().cpu()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.codebook_size):
            raise ValueError(f"code ids outside [0, {self.codebook_size}): {int(idx.min())}..{int(idx.max())}")
        self.counts += torch.bincount(idx, minlength=self.codebook_size)

    def merge(self, other: CodebookUsage) -> CodebookUsage:
        self.counts += other.counts
        return self

    def all_reduce(self) -> CodebookUsage:
        dist.all_reduce_sum_(self.counts)
        return self

    def used(self) -> int:
        return int((self.counts > 0).sum())

    def used_fraction(self) -> float:
        return self.used() / self.codebook_size

    def perplexity(self) -> float:
        """exp of the entropy (nats) of the code frequencies: K for uniform use, 1 for a single code."""
        total = int(self.counts.sum())
        if total == 0:
            return float("nan")
        p = self.counts[self.counts > 0].double() / total
        return float(torch.exp(-(p * p.log()).sum()))

    def summary(self) -> dict:
        return {
            "codebook_size": self.codebook_size,
            "codes_used": self.used(),
            "used_fraction": self.used_fraction(),
            "perplexity": self.perplexity(),
            "tokens": int(self.counts.sum()),
        }


def confusion_update(cm: ConfusionMatrix, pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> None:
    """cm.update on the samples where keep (B,) is True (padded repeats are dropped)."""
    if bool(keep.any()):
        keep = keep.to(pred.device)
        cm.update(pred[keep], target.to(pred.device)[keep])


def per_class_stats(cm: ConfusionMatrix, names: list[str] | tuple[str, ...] | None = None) -> list[dict]:
    """One row per class: name, ground-truth pixel share, predicted pixel share, IoU and recall (NaN where the class
    is absent from both truth and prediction, resp. from the truth)."""
    m = cm.mat.double()
    total = m.sum().clamp_min(1)
    gt, pred, inter = m.sum(1), m.sum(0), m.diag()
    iou = cm.iou()
    rows = []
    for c in range(cm.num_classes):
        rows.append(
            {
                "class": names[c] if names is not None and c < len(names) else f"class_{c}",
                "id": c,
                "gt_pixel_share": float(gt[c] / total),
                "pred_pixel_share": float(pred[c] / total),
                "iou": float(iou[c]),
                "recall": float(inter[c] / gt[c]) if gt[c] > 0 else float("nan"),
            }
        )
    return rows


__all__ = [
    "MeanStat",
    "FeatureStats",
    "CodebookUsage",
    "confusion_update",
    "per_class_stats",
]
