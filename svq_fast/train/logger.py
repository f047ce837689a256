"""Rank-0 TensorBoard scalars/images and a tqdm progress bar; every other rank stays silent."""

from __future__ import annotations

import os
import time

import torch
from tqdm import tqdm


class RunLogger:
    def __init__(
        self,
        out_dir: str,
        *,
        rank: int,
        total_steps: int,
        initial_step: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        desc: str = "train",
    ):
        self.rank = rank
        self.writer = None
        self.write_seconds = 0.0  # time spent in TensorBoard writer calls (the cost of logging, on rank 0)
        if rank == 0 and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(out_dir, "tb"))
        self.bar = tqdm(
            total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True, disable=rank != 0 or not progress
        )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            t0 = time.perf_counter()
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.write_seconds += time.perf_counter() - t0

    def image(self, step: int, tag: str, grid: torch.Tensor) -> None:
        """grid (3, H, W) float in [0, 1]."""
        if self.writer is not None:
            t0 = time.perf_counter()
            self.writer.add_image(tag, grid.clamp(0, 1), step)
            self.write_seconds += time.perf_counter() - t0

    def advance(self, postfix: dict[str, float] | None = None) -> None:
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
