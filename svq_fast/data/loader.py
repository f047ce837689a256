"""The loader of (image, semantic map) shards: `make_loader` -> batches {"image": (B, 3, S, S) float in [-1, 1],
"label": (B, S, S) int64 (255 = ignore), "key": list[str], "pad": (B,) bool}.

Shards are given as URLs of any kind (index.py: local paths, globs, brace patterns, http(s)://, pipe:, a list
file), read through WebDataset (reader.py); order, splitting over ranks and workers, exact epochs, the
resampled stream, exact resume and fault handling are the codec-agnostic stream's (stream.py, plan.py). This
file adds what an image sample is: decoded PNG/JPEG + label PNG, the joint crop/flip (transforms.py).

A sample is bad (replaced by a repeat flagged pad, counted and logged as `shard:key`, never passed on) when it
does not decode, its image and label differ in size, its bytes do not match the sha256 its meta.json records
(shards.check_hashes; `check_hashes=False` skips this), or, with `num_classes` given, its label holds an id
outside 0..num_classes-1 that is not `ignore_index`. `max_bad_fraction` bounds the replaced samples per window
of `window` batches (stream.ShardLoader): above it the loader raises TooManyBadSamples naming them.
"""

from __future__ import annotations

import numpy as np

from svq_fast.data.index import list_shards, read_index, shard_counts
from svq_fast.data.labels import IGNORE
from svq_fast.data.reader import FaultPolicy
from svq_fast.data.shards import ShardFormatError, decode_sample
from svq_fast.data.stream import ShardLoader, ShardStream, TooManyBadSamples
from svq_fast.data.transforms import collate, joint_transform, to_tensors


class SemanticShardStream(ShardStream):
    """ShardStream of (image, label) samples, cropped and flipped jointly to image_size x image_size."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_size: int,
        flip: bool = True,
        crop: str = "random",
        num_classes: int | None = None,
        ignore_index: int = IGNORE,
        check_hashes: bool = True,
        raw: bool = False,
        **kwargs,
    ):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.image_size, self.flip, self.crop = image_size, flip, crop
        self.num_classes, self.ignore_index, self.check_hashes = num_classes, ignore_index, check_hashes
        self.raw = raw  # uint8 images and labels (transforms.to_tensors)
        self._valid = None  # (256,) bool: which uint8 label values are valid ids (None: not checked)
        if num_classes is not None:
            valid = np.zeros(256, bool)
            valid[: min(num_classes, 256)] = True
            if 0 <= ignore_index < 256:
                valid[ignore_index] = True
            self._valid = valid
        super().__init__(shards, **kwargs)

    def decode(self, raw: dict[str, bytes], where: str):
        image, label, _ = decode_sample(raw, where=where, verify=self.check_hashes)
        if self._valid is not None:
            check_label_ids(label, self._valid, self.num_classes, self.ignore_index, where)
        return image, label

    def make_sample(self, decoded, params: np.ndarray) -> dict:
        image, label = joint_transform(*decoded, self.image_size, params, self.flip, self.crop)
        x, s = to_tensors(image, label, raw=self.raw)
        return {"image": x, "label": s}

    def blank_sample(self) -> dict:
        s = self.image_size
        x, lab = to_tensors(np.zeros((s, s, 3), np.uint8), np.full((s, s), IGNORE, np.uint8), raw=self.raw)
        return {"image": x, "label": lab}


def check_label_ids(label: np.ndarray, valid: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
    """Raise ShardFormatError naming `where` and the ids (up to 8) of a uint8 label map that are not valid."""
    if label.max() < num_classes:  # the common case without ignore pixels: one reduction
        return
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = present[~valid[present]]
    if bad.size:
        ids = ", ".join(map(str, bad[:8].tolist())) + (", ..." if bad.size > 8 else "")
        raise ShardFormatError(
            f"{where}: label ids {ids} outside the run's classes 0..{num_classes - 1} (ignore id {ignore_index})"
        )


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
    num_classes: int | None = None,
    ignore_index: int = IGNORE,
    check_hashes: bool = True,
    max_bad_fraction: float | None = None,
    window: int = 10,
    raw: bool = False,
) -> ShardLoader:
    """A ShardLoader (a DataLoader) yielding {"image", "label", "key", "pad"} batches; see the module docstring.
    rank / world_size default to torch.distributed's when it is initialised (else 0 / 1). `faults`: retries,
    backoff and timeouts for streamed shards (reader.FaultPolicy); `log_dir`: a TensorBoard folder for the
    data fault counters (faults.py). `num_classes` / `ignore_index`: the label ids a sample may hold (None: not
    checked); `check_hashes`: verify meta.json's sha256; `max_bad_fraction` (None: no limit) per `window`
    batches: see stream.ShardLoader. `raw`: uint8 images and labels, normalised on the device by the consumer
    (transforms.normalize_on_device); `pin_memory`: page-locked batches for non-blocking copies to a GPU."""
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
        num_classes=num_classes,
        ignore_index=ignore_index,
        check_hashes=check_hashes,
        raw=raw,
    )
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                       log_dir=log_dir, max_bad_fraction=max_bad_fraction, window=window)  # fmt: skip


def ordered_loader(shards: list[str], *, batch_size: int, image_size: int, num_workers: int = 0, **kwargs):
    """Every sample once, in shard-list order, center-cropped and unflipped, as one global sequence (world size 1,
    whatever the process group): what evaluation, tokenization and held-out batches read. Read in blocks of one
    batch (the order does not depend on it). `kwargs` go to make_loader (faults, ...)."""
    return make_loader(
        shards,
        batch_size=batch_size,
        image_size=image_size,
        rank=0,
        world_size=1,
        num_workers=num_workers,
        resampled=False,
        flip=False,
        shuffle=False,
        shuffle_buffer=batch_size,
        crop="center",
        **kwargs,
    )


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
    "TooManyBadSamples",
    "check_label_ids",
    "make_loader",
    "ordered_loader",
]
