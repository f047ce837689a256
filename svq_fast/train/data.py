"""A training run's loader over its shards (svq_fast/data/run_shards.py resolves them)."""

from __future__ import annotations

import os

import torch

from svq_fast.config import DataConfig
from svq_fast.data.loader import make_loader
from svq_fast.data.reader import FaultPolicy
from svq_fast.data.run_shards import shards_or_synthetic


class _RankSlice:
    """Iterates a loader of global batches (micro_batch * world) and yields this rank's rows."""

    def __init__(self, loader, rank: int, micro_batch: int):
        self.loader, self.rank, self.micro = loader, rank, micro_batch

    def __iter__(self):
        lo, hi = self.rank * self.micro, (self.rank + 1) * self.micro
        for batch in self.loader:
            yield {k: v[lo:hi] for k, v in batch.items()}

    @property
    def stats(self) -> dict[str, int]:
        return self.loader.stats

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def train_loader(cfg: DataConfig, micro_batch: int, rank: int, world_size: int, shards: list[str] | None = None,
                 log_dir: str | None = None, *, num_classes: int | None = None, ignore_index: int = 255,
                 window: int = 10):  # fmt: skip
    """Endless loader of this rank's micro-batches (uint8 images and labels: normalise with
    data.transforms.normalize_on_device); `shards` = already resolved training shards (else resolved
    here); streamed shards are retried as cfg.stream_* say, and the data fault counters go to TensorBoard under
    `log_dir` (None: the run log only). Label ids outside 0..num_classes-1 that are not ignore_index make a
    sample bad (replaced, counted, logged as shard:key; num_classes None: not checked); more than
    cfg.max_bad_fraction replaced samples in a window of `window` batches (the run's logging window) stop the run
    with TooManyBadSamples (svq_fast/data/faults.py)."""
    shards = shards if shards is not None else shards_or_synthetic(cfg, "train", rank)
    # uint8 batches (a quarter of float32's bytes through shared memory and PCIe), pinned on GPU runs so that the
    # stages' non_blocking copies overlap; the stages normalise on the device (data.transforms.normalize_on_device)
    common = dict(raw=True, pin_memory=torch.cuda.is_available(), image_size=cfg.image_size, seed=cfg.seed,
                  num_workers=cfg.num_workers, resampled=True, flip=cfg.random_flip, shuffle_buffer=cfg.shuffle_buffer,
                  faults=FaultPolicy.of(cfg), log_dir=log_dir, num_classes=num_classes, ignore_index=ignore_index,
                  max_bad_fraction=cfg.max_bad_fraction, window=max(1, window))  # fmt: skip
    if cfg.global_stream:  # one global stream of micro_batch * world samples; each rank keeps its rows
        loader = make_loader(shards, batch_size=micro_batch * world_size, rank=0, world_size=1, **common)
        return _RankSlice(loader, rank, micro_batch)
    return make_loader(shards, batch_size=micro_batch, rank=rank, world_size=world_size, **common)


def tensorboard_dir(cfg) -> str | None:
    """The run's TensorBoard folder (where RunLogger writes too), or None with log.tensorboard off."""
    return os.path.join(cfg.run.out_dir, "tb") if cfg.log.tensorboard else None
