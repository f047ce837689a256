"""Batched inference in slices on a CPU: the evaluation samples at batch 64 (where the GPT's per-token cost is
lowest), but the 64x64 conv nets that decode and score the samples run 1.3-1.7x slower per image there than at batch
16 (decoder 31 vs 18 ms, segmenter 18 vs 14 ms per image on the 2-vCPU development VM: the activations leave the
cache), so they run in slices of CPU_SLICE. On a GPU the whole batch goes at once."""

from __future__ import annotations

from collections.abc import Callable

import torch

CPU_SLICE = 16


def in_slices(fn: Callable, *tensors: torch.Tensor):
    """fn(*tensors) with every tensor sliced along dim 0 on a CPU; outputs (a tensor or a tuple of tensors, each
    batch-first) concatenated back. Only for functions that treat samples independently."""
    b = tensors[0].shape[0]
    if tensors[0].device.type != "cpu" or b <= CPU_SLICE:
        return fn(*tensors)
    outs = [fn(*(t[i : i + CPU_SLICE] for t in tensors)) for i in range(0, b, CPU_SLICE)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)
