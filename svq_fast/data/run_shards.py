"""A run's shards: the ones its DataConfig names for a split, or the built-in synthetic set, written on first use
(keyed by generator version, image size and seed) and reused after. Training, evaluation, sampling and the segmenter
recipe all resolve their shards here."""

from __future__ import annotations

import json
import os
import shutil

from svq_fast import dist
from svq_fast.config import DataConfig
from svq_fast.data.index import list_shards
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
