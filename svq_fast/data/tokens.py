"""Token shards for stage 2: the frozen stage-1 model's codes per sample, so the GPT trains without the encoder.

A token shard is a tar of `{key}.sem.npy` (P,) and `{key}.img.npy` (N,) row-major code grids, int16 when the
vocabulary fits (else int32), plus `{key}.meta.json`; `index.json` beside them records the vocabularies, grid
and the stage-1 export it came from. They stream through the same loader machinery as image shards (exact
epochs, resampling, exact resume), yielding {"sem": (B, P) int64, "img": (B, N) int64, "key", "pad"}.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch

from svq_fast.data.loader import SemanticShardStream, list_shards, make_loader
from svq_fast.data.shards import INDEX_NAME, ShardFormatError


def token_dtype(vocab: int):
    return np.int16 if vocab <= np.iinfo(np.int16).max + 1 else np.int32


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(raw: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as e:
        raise ShardFormatError(f"{where}: cannot decode ({type(e).__name__}: {e})") from e


class TokenShardStream(SemanticShardStream):
    """SemanticShardStream over token shards: same order, split, padding and resume; no image transforms."""

    def decode(self, raw: dict[str, bytes], where: str):
        if "sem.npy" not in raw or "img.npy" not in raw:
            raise ShardFormatError(f"{where}: token sample lacks sem.npy or img.npy (has {sorted(raw)})")
        return decode_npy(raw["sem.npy"], where), decode_npy(raw["img.npy"], where)

    def make_sample(self, decoded, params):
        if decoded is None:  # nothing readable in the block: an all-zero sequence, flagged pad by the caller
            n = self.image_size  # for token streams image_size carries the number of tokens per grid
            return {"sem": torch.zeros(n, dtype=torch.long), "img": torch.zeros(n, dtype=torch.long)}
        sem, img = decoded
        return {"sem": torch.from_numpy(sem.astype(np.int64)), "img": torch.from_numpy(img.astype(np.int64))}


def read_token_index(spec: str) -> dict:
    folder = spec if os.path.isdir(spec) else os.path.dirname(list_shards(spec)[0])
    path = os.path.join(folder, INDEX_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: token shards are written by recipes/tokenize_shards.py")
    with open(path) as f:
        index = json.load(f)
    if index.get("kind") != "tokens":
        raise ValueError(f"{path} describes {index.get('kind', 'image')!r} shards, not token shards")
    return index


def make_token_loader(
    spec: str,
    *,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int = 0,
    num_workers: int = 0,
    resampled: bool = True,
    shuffle_buffer: int = 64,
):
    index = read_token_index(spec)
    return make_loader(
        list_shards(spec),
        batch_size=batch_size,
        image_size=index["grid"] ** 2,
        rank=rank,
        world_size=world_size,
        seed=seed,
        num_workers=num_workers,
        resampled=resampled,
        flip=False,
        shuffle_buffer=shuffle_buffer,
        stream_cls=TokenShardStream,
    )
