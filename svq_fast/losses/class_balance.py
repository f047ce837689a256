"""Per-class weights for the semantic cross-entropy, from the class pixel counts that make_shards records.

mIoU averages over classes, while plain cross-entropy averages over pixels: a class covering 0.2% of the pixels
(a pole, a fence) gets 1/100 of the gradient of the sky and is learned last. With `power` a > 0 class c is weighted
w_c ~ f_c^-a (f_c its pixel frequency in the training shards; a = 0.5 is inverse-sqrt frequency), normalised so that
sum_c f_c w_c = 1: the average pixel keeps weight 1 and the loss keeps plain cross-entropy's scale. Classes with no
pixels in the training data never occur as targets; their weight is 0.
"""

from __future__ import annotations

import os

import torch

from svq_fast.data.loader import read_index
from svq_fast.data.shards import INDEX_NAME


def class_pixel_counts(shards: list[str], num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(num_classes,) float64 pixel counts summed over the index.json of every directory holding a shard.

    A directory's histogram covers all of its shards, also when the shard list names only some of them."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for shard_dir in sorted({os.path.dirname(os.path.abspath(p)) for p in shards}):
        path = os.path.join(shard_dir, INDEX_NAME)
        try:
            histogram = read_index(shard_dir)["class_histogram"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(
                f"semantic class balancing needs the class_histogram of {path} ({type(e).__name__}: {e}); "
                "write the shards with `python -m svq_fast.data.make_shards` or set loss.semantic_class_balance=0"
            ) from e
        for key, n in histogram.items():
            cls = int(key)
            if cls == ignore_index:
                continue
            if not 0 <= cls < num_classes:
                raise ValueError(
                    f"{path}: class_histogram has class id {cls}, outside the model's 0..{num_classes - 1}"
                )
            counts[cls] += float(n)
    if counts.sum() <= 0:
        raise ValueError(f"semantic class balancing: the class histograms of {len(shards)} shard(s) count no pixels")
    return counts


def balanced_class_weights(counts: torch.Tensor, power: float) -> torch.Tensor:
    """(C,) float32 weights w_c ~ f_c^-power with sum_c f_c w_c = 1 (0 for classes without pixels)."""
    if power < 0:
        raise ValueError(f"semantic_class_balance must be >= 0, got {power}")
    freq = counts.double() / counts.sum()
    present = freq > 0
    weights = torch.zeros_like(freq)
    weights[present] = freq[present].pow(-power)
    return (weights / (freq * weights).sum()).float()
