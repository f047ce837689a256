"""The loader of (image, semantic map) shards: `make_loader` -> batches {"image": (B, 3, S, S) float in [-1, 1],
"label": (B, S, S) int64 (255 = ignore), "key": list[str], "pad": (B,) bool}.

Shards are given as URLs of any kind (index.py: local paths, globs, brace patterns, http(s)://, pipe:, a list
file), read through WebDataset (reader.py); order, splitting over ranks and workers, exact epochs, the
resampled stream, exact resume and fault handling are the codec-agnostic stream's (stream.py, plan.py). This
file adds what an image sample is: decoded PNG/JPEG + label PNG, the joint crop/flip (transforms.py).
"""

from __future__ import annotations

import numpy as np

from svq_fast.data.index import list_shards, read_index, shard_counts
from svq_fast.data.labels import IGNORE
from svq_fast.data.reader import FaultPolicy
from svq_fast.data.shards import decode_sample
from svq_fast.data.stream import ShardLoader, ShardStream
from svq_fast.data.transforms import collate, joint_transform, to_tensors


class SemanticShardStream(ShardStream):
    """ShardStream of (image, label) samples, cropped and flipped jointly to image_size x image_size."""

    def __init__(self, shards: list[str], *, image_size: int, flip: bool = True, crop: str = "random", **kwargs):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.image_size, self.flip, self.crop = image_size, flip, crop
        super().__init__(shards, **kwargs)

    def decode(self, raw: dict[str, bytes], where: str):
        return decode_sample(raw, where=where)[:2]

    def make_sample(self, decoded, params: np.ndarray) -> dict:
        image, label = joint_transform(*decoded, self.image_size, params, self.flip, self.crop)
        x, s = to_tensors(image, label)
        return {"image": x, "label": s}

    def blank_sample(self) -> dict:
        s = self.image_size
        x, lab = to_tensors(np.zeros((s, s, 3), np.uint8), np.full((s, s), IGNORE, np.uint8))
        return {"image": x, "label": lab}


def make_loader(
    shards: list[str],
    *,
    batch_size: int,
    image_size: int,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    resampled: bool = True,
    flip: bool = True,
    shuffle_buffer: int = 64,
    remainder: str = "pad",
    crop: str = "random",
    shuffle: bool = True,
    epoch: int = 0,
    pin_memory: bool = False,
    stream_cls: type[SemanticShardStream] | None = None,
    faults: FaultPolicy | None = None,
    log_dir: str | None = None,
) -> ShardLoader:
    """A ShardLoader (a DataLoader) yielding {"image", "label", "key", "pad"} batches; see the module docstring.
    rank / world_size default to torch.distributed's when it is initialised (else 0 / 1). `faults`: retries,
    backoff and timeouts for streamed shards (reader.FaultPolicy); `log_dir`: a TensorBoard folder for the
    data fault counters (faults.py)."""
    dataset = (stream_cls or SemanticShardStream)(
        shards,
        image_size=image_size,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resampled=resampled,
        flip=flip,
        shuffle_buffer=shuffle_buffer,
        remainder=remainder,
        crop=crop,
        shuffle=shuffle,
        epoch=epoch,
        faults=faults,
    )
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, log_dir=log_dir)


__all__ = [
    "IGNORE",
    "FaultPolicy",
    "list_shards",
    "read_index",
    "shard_counts",
    "joint_transform",
    "to_tensors",
    "collate",
    "SemanticShardStream",
    "ShardLoader",
    "make_loader",
]
