"""A run's shards (the configured ones, or the built-in synthetic set written on first use) and its loader."""

from __future__ import annotations

import json
import os
import shutil

from svq_fast import dist
from svq_fast.config import DataConfig
from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.reader import FaultPolicy
from svq_fast.data.synthetic import SYNTHETIC_VERSION


def _synthetic_ready(out: str, num_samples: int) -> bool:
    try:
        with open(os.path.join(out, "index.json")) as f:
            return json.load(f).get("num_samples") == num_samples
    except (OSError, ValueError):
        return False


def ensure_synthetic(cfg: DataConfig, split: str, num_samples: int, rank: int) -> str:
    """Directory of synthetic shards for `split`, keyed by generator version, size and seed; rank 0 (re)writes
    them when absent or of another size, the other ranks wait."""
    from svq_fast.data.make_shards import write_synthetic

    out = os.path.join(cfg.synthetic_default, f"v{SYNTHETIC_VERSION}", f"{cfg.image_size}px-seed{cfg.seed}", split)
    if rank == 0 and not _synthetic_ready(out, num_samples):
        shutil.rmtree(out, ignore_errors=True)
        write_synthetic(
            out,
            split=split,
            size=cfg.image_size,
            num_samples=num_samples,
            seed=cfg.seed,
            samples_per_shard=max(50, num_samples // 8),
        )
    dist.barrier()
    return out


def shards_or_synthetic(cfg: DataConfig, split: str, rank: int) -> list[str]:
    """The shards the config names for `split`, or, when it names none, the built-in synthetic set: written on
    first use by rank 0 (ensure_synthetic) and reused after. Collective: every rank must call it."""
    spec = cfg.train_shards if split == "train" else cfg.val_shards
    if not spec:
        spec = ensure_synthetic(cfg, split, cfg.synthetic_train_samples if split == "train" else 256, rank)
    return list_shards(spec)


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
    """Endless loader of this rank's micro-batches; `shards` = already resolved training shards (else resolved
    here); streamed shards are retried as cfg.stream_* say, and the data fault counters go to TensorBoard under
    `log_dir` (None: the run log only). Label ids outside 0..num_classes-1 that are not ignore_index make a
    sample bad (replaced, counted, logged as shard:key; num_classes None: not checked); more than
    cfg.max_bad_fraction replaced samples in a window of `window` batches (the run's logging window) stop the run
    with TooManyBadSamples (svq_fast/data/faults.py)."""
    shards = shards if shards is not None else shards_or_synthetic(cfg, "train", rank)
    common = dict(image_size=cfg.image_size, seed=cfg.seed, num_workers=cfg.num_workers, resampled=True,
                  flip=cfg.random_flip, shuffle_buffer=cfg.shuffle_buffer, faults=FaultPolicy.of(cfg),
                  log_dir=log_dir, num_classes=num_classes, ignore_index=ignore_index,
                  max_bad_fraction=cfg.max_bad_fraction, window=max(1, window))  # fmt: skip
    if cfg.global_stream:  # one global stream of micro_batch * world samples; each rank keeps its rows
        loader = make_loader(shards, batch_size=micro_batch * world_size, rank=0, world_size=1, **common)
        return _RankSlice(loader, rank, micro_batch)
    return make_loader(shards, batch_size=micro_batch, rank=rank, world_size=world_size, **common)


def tensorboard_dir(cfg) -> str | None:
    """The run's TensorBoard folder (where RunLogger writes too), or None with log.tensorboard off."""
    return os.path.join(cfg.run.out_dir, "tb") if cfg.log.tensorboard else None
