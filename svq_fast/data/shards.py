"""WebDataset shard format for (image, semantic map) pairs: writing, and decoding one sample.

A shard is a plain tar readable by `webdataset.WebDataset`: members `{key}.image.png|jpg`,
`{key}.label.png` (8-bit, unified class ids, 255 = ignore) and `{key}.meta.json`. Shards are written to a
temporary name and renamed when complete, so a crashed writer never leaves a shard that looks finished.
meta.json records the sha256 of the sample's image and label bytes (`"sha256": {"image.png": hex, "label.png":
hex}`); `decode_sample` checks them when present, so a damaged PNG that still decodes (into wrong class ids)
is caught. Shards of older versions have no hashes and load unchecked.
`index.json` beside the shards lists shard names, sample counts and the class histogram.

Reading is reader.py's (WebDataset's openers and tar iteration, from any URL); `decode_sample` turns one
sample's members into arrays.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

INDEX_NAME = "index.json"


class ShardFormatError(ValueError):
    """A shard member could not be decoded; the message names shard and key."""


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_jpg(array: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def content_hashes(members: dict[str, bytes]) -> dict[str, str]:
    """{member suffix: sha256 hex} of a sample's image and label bytes (what meta.json records)."""
    return {k: hashlib.sha256(v).hexdigest() for k, v in members.items() if k.startswith(("image.", "label."))}


def check_hashes(members: dict[str, bytes], meta: dict, *, where: str = "") -> None:
    """Raise ShardFormatError naming `where` and the member when a hash recorded in meta differs (no hashes: ok)."""
    recorded = meta.get("sha256") if isinstance(meta, dict) else None
    if not recorded:
        return
    if not isinstance(recorded, dict):
        raise ShardFormatError(f"{where}: meta.json sha256 is {type(recorded).__name__}, expected a dict")
    for name, want in recorded.items():
        data = members.get(name)
        if data is None:
            raise ShardFormatError(f"{where}: meta.json records a sha256 of {name}, which the sample lacks")
        if hashlib.sha256(data).hexdigest() != want:
            raise ShardFormatError(f"{where}: {name} does not match its sha256 in meta.json (damaged bytes)")


def decode_sample(
    members: dict[str, bytes], *, where: str = "", verify: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """members: {'image.png'|'image.jpg': bytes, 'label.png': bytes, 'meta.json': bytes (optional)}
    -> (image (H, W, 3) uint8, label (H, W) uint8, meta). Raises ShardFormatError naming `where`.
    `verify`: check the sha256 hashes meta.json records (check_hashes)."""
    img_key = "image.png" if "image.png" in members else "image.jpg"
    if img_key not in members or "label.png" not in members:
        raise ShardFormatError(f"{where}: sample lacks image.(png|jpg) or label.png (has {sorted(members)})")
    try:
        meta = json.loads(members["meta.json"]) if "meta.json" in members else {}
        if verify:
            check_hashes(members, meta, where=where)
        image = np.asarray(Image.open(io.BytesIO(members[img_key])).convert("RGB"))
        label_img = Image.open(io.BytesIO(members["label.png"]))
        if label_img.mode not in ("L", "P"):
            raise ShardFormatError(f"{where}: label.png has mode {label_img.mode}, expected 8-bit L")
        label = np.asarray(label_img)
    except ShardFormatError:
        raise
    except Exception as e:
        raise ShardFormatError(f"{where}: cannot decode ({type(e).__name__}: {e})") from e
    if image.shape[:2] != label.shape:
        raise ShardFormatError(f"{where}: image {image.shape[:2]} and label {label.shape} differ in size")
    return image, label, meta


def sample_members(
    key: str, image: bytes, label: bytes, meta: dict, image_format: str = "jpg"
) -> list[tuple[str, bytes]]:
    """The tar members of one sample, in the order they are written; meta.json gains the content hashes."""
    if "." in key or "/" in key:
        raise ValueError(f"{key}: keys must not contain '.' or '/' (WebDataset splits member names on '.')")
    meta = {**meta, "sha256": content_hashes({f"image.{image_format}": image, "label.png": label})}
    return [
        (f"{key}.image.{image_format}", image),
        (f"{key}.label.png", label),
        (f"{key}.meta.json", json.dumps(meta, sort_keys=True).encode()),
    ]


def write_tar(path: str, members: Iterable[tuple[str, bytes]]) -> int:
    """Write (name, bytes) members to `path` atomically (a `.tmp` file renamed when complete). Headers are
    deterministic (mtime 0, mode 0o444, no owner), so the same members give byte-identical shards.
    Returns the number of members written."""
    tmp = path + ".tmp"
    count = 0
    try:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return count


@dataclass
class ShardWriter:
    """Writes samples into `{out_dir}/{prefix}-{NNNNNN}.tar`, rolling over every `samples_per_shard`."""

    out_dir: str
    prefix: str = "shard"
    samples_per_shard: int = 1000
    image_format: str = "png"  # png (lossless, default for synthetic) or jpg
    num_classes: int = 256
    shards: list[dict] = field(default_factory=list)
    _tar: object = None
    _tmp: str = ""
    _count: int = 0
    _hist: np.ndarray = None

    def __post_init__(self):
        os.makedirs(self.out_dir, exist_ok=True)
        self._hist = np.zeros(256, np.int64)

    def _open(self):
        import webdataset as wds

        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = os.path.join(self.out_dir, name + ".tmp")
        self._tar = wds.TarWriter(self._tmp)
        self.shards.append({"name": name, "samples": 0})

    def _close_shard(self):
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, os.path.join(self.out_dir, self.shards[-1]["name"]))
        self._tar = None

    def write(self, key: str, image: np.ndarray, label: np.ndarray, meta: dict | None = None) -> None:
        """image (H, W, 3) uint8, label (H, W) uint8 unified ids (255 = ignore)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{key}: image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        if label.dtype != np.uint8 or label.shape != image.shape[:2]:
            raise ValueError(f"{key}: label must be (H, W) uint8 matching the image, got {label.shape} {label.dtype}")
        if "." in key:
            raise ValueError(f"{key}: keys must not contain '.' (WebDataset splits member names on it)")
        if self._tar is None:
            self._open()
        encode = encode_png if self.image_format == "png" else encode_jpg
        content = {f"image.{self.image_format}": encode(image), "label.png": encode_png(label)}
        meta = {**(meta or {}), "sha256": content_hashes(content)}
        sample = {"__key__": key, **content, "meta.json": json.dumps(meta).encode()}
        self._tar.write(sample)
        self._hist += np.bincount(label.ravel(), minlength=256)
        self.shards[-1]["samples"] += 1
        self._count += 1
        if self.shards[-1]["samples"] >= self.samples_per_shard:
            self._close_shard()

    def close(self, extra: dict | None = None) -> dict:
        """Finish the last shard and write index.json; returns the index."""
        self._close_shard()
        index = {
            "shards": self.shards,
            "num_samples": self._count,
            "class_histogram": {str(i): int(c) for i, c in enumerate(self._hist) if c},
            **(extra or {}),
        }
        tmp = os.path.join(self.out_dir, INDEX_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, INDEX_NAME))
        return index

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            os.remove(self._tmp)
