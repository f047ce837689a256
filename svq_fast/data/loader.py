"""Streaming loader over WebDataset shards of (image, semantic map) pairs.

Work is split over (rank, worker) slots: slot = rank * num_workers + worker_id.
- resampled mode (default for training): an infinite stream; each slot draws shards at random with its
  own generator seeded by (seed, rank, worker), so runs are reproducible and ranks never run dry together.
- epoch mode: shards are dealt round-robin to slots after an epoch-seeded shuffle; each sample once.
A corrupt tar member is skipped with a warning and counted; it never stops a run.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from svq_fast.data.shards import ShardFormatError, decode_sample


def list_shards(spec: str) -> list[str]:
    """A directory (all *.tar inside), a glob, a brace pattern (`a-{000..009}.tar`), or comma-separated."""
    if not spec:
        raise FileNotFoundError("no shards given (data.train_shards is empty)")
    out: list[str] = []
    for part in spec.split(","):
        if os.path.isdir(part):
            out += sorted(glob.glob(os.path.join(part, "*.tar")))
        elif "{" in part:
            import braceexpand

            out += [p for p in braceexpand.braceexpand(part)]
        else:
            out += sorted(glob.glob(part))
    if not out:
        raise FileNotFoundError(f"no .tar shards found for {spec!r}")
    return out


def iter_tar_samples(path: str, stats: dict | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {suffix: bytes}) grouped by key, in tar order. Corrupt members are skipped and counted."""
    current_key, members = None, {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                if "." not in base:
                    continue
                key, suffix = base.split(".", 1)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, members
                    current_key, members = key, {}
                fobj = tar.extractfile(info)
                members[suffix] = fobj.read() if fobj is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        warnings.warn(
            f"shard {path}: unreadable after key {current_key!r} ({e}); skipping the rest", stacklevel=2
        )
        if stats is not None:
            stats["corrupt"] = stats.get("corrupt", 0) + 1
        return
    if current_key is not None:
        yield current_key, members


def joint_transform(image: np.ndarray, label: np.ndarray, size: int, rng: np.random.Generator, flip: bool):
    """Random crop to `size` and horizontal flip, the same for image (H, W, 3) and label (H, W)."""
    h, w = label.shape
    if h < size or w < size:
        raise ValueError(f"sample of size {h}x{w} is smaller than the crop {size}")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    image = image[top : top + size, left : left + size]
    label = label[top : top + size, left : left + size]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (3, H, W) float in [-1, 1], label (H, W) int64."""
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    s = torch.from_numpy(np.array(label)).long()
    return x, s


class SemanticShardStream(IterableDataset):
    def __init__(
        self,
        shards: list[str],
        *,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resampled: bool = True,
        flip: bool = True,
        shuffle_buffer: int = 64,
        epoch: int = 0,
    ):
        super().__init__()
        self.shards, self.image_size = list(shards), image_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.flip, self.shuffle_buffer, self.epoch = resampled, flip, shuffle_buffer, epoch
        self.stats: dict = {}

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * nw + wid, self.world_size * nw

    def _shard_order(self, slot: int, nslots: int, rng) -> Iterator[str]:
        if self.resampled:
            while True:
                yield self.shards[int(rng.integers(len(self.shards)))]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.shards))
        yield from (self.shards[i] for i in order[slot::nslots])

    def _samples(self, rng) -> Iterator[dict]:
        slot, nslots = self._slot()
        for path in self._shard_order(slot, nslots, rng):
            for key, members in iter_tar_samples(path, self.stats):
                try:
                    image, label, _ = decode_sample(members, where=f"{path}:{key}")
                except ShardFormatError as e:
                    warnings.warn(str(e), stacklevel=2)
                    self.stats["bad_samples"] = self.stats.get("bad_samples", 0) + 1
                    continue
                image, label = joint_transform(image, label, self.image_size, rng, self.flip)
                x, s = to_tensors(image, label)
                yield {"image": x, "label": s, "key": key}

    def __iter__(self):
        slot, _ = self._slot()
        rng = np.random.default_rng([self.seed, slot, self.epoch])
        buf: list[dict] = []
        for sample in self._samples(rng):
            if len(buf) < self.shuffle_buffer:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], sample = sample, buf[i]
            yield sample
        rng.shuffle(buf)
        yield from buf


def make_loader(
    shards: list[str],
    *,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    resampled: bool = True,
    flip: bool = True,
    shuffle_buffer: int = 64,
) -> DataLoader:
    dataset = SemanticShardStream(
        shards,
        image_size=image_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resampled=resampled,
        flip=flip,
        shuffle_buffer=shuffle_buffer,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=resampled,
        persistent_workers=num_workers > 0,
    )


def read_index(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, "index.json")
    with open(path) as f:
        return json.load(f)


__all__ = ["list_shards", "iter_tar_samples", "SemanticShardStream", "make_loader", "read_index"]
