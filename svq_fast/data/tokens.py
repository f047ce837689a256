"""Token shards for stage 2, written and read: the frozen stage-1 model's codes per sample, so the GPT trains
without the encoder.

A token shard is a tar of `{key}.sem.npy` (P,) and `{key}.img.npy` (N,) row-major code grids, int16 when the
vocabulary fits (else int32), plus `{key}.meta.json` (the source shard's name); `index.json` beside them
records kind "tokens", the grid, the vocabularies, the stage-1 export it came from and the condition ("reference":
z_s read from (image, map); "map": from the map alone, models/tokenizer.py).

Writing (`tokenize_shard`, `write_token_index`; recipes/tokenize_shards.py is the command line): every sample
of an image shard, center-cropped and unflipped, through the tokenizer; the image shards may be any URLs the
loader reads. Reading (`make_token_loader`): the same stream machinery as image shards (exact epochs,
resampling, exact resume, faults), yielding {"sem": (B, P) int64, "img": (B, N) int64, "key", "pad"}.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable

import numpy as np
import torch

from svq_fast.data.index import MissingIndex, list_shards, read_index, shard_name
from svq_fast.data.loader import ordered_loader
from svq_fast.data.reader import FaultPolicy
from svq_fast.data.shards import INDEX_NAME, ShardFormatError, write_tar
from svq_fast.data.stream import ShardLoader, ShardStream


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


# ---- writing ---------------------------------------------------------------------------------------------------
Tokenizer = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (x, s) -> (z_s, z_x) ids


@torch.no_grad()
def tokenize_shard(
    tokenizer: Tokenizer,
    shard: str,
    out_dir: str,
    *,
    semantic_vocab: int,
    image_vocab: int,
    image_size: int,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    faults: FaultPolicy | None = None,
) -> dict:
    """Encode every sample of one image shard and write `{out_dir}/{shard name}`. Returns {"name", "samples"}.
    Samples that could not be read (flagged pad by the loader) are left out; the count says how many were kept."""
    name = shard_name(shard)
    sem_dtype, img_dtype = token_dtype(semantic_vocab), token_dtype(image_vocab)
    loader = ordered_loader([shard], batch_size=batch_size, image_size=image_size, faults=faults)
    members = []
    for batch in loader:
        keep = ~batch["pad"]
        sem, img = tokenizer(batch["image"][keep].to(device), batch["label"][keep].to(device))
        keys = [k for k, m in zip(batch["key"], keep.tolist()) if m]
        for key, zs, zx in zip(keys, sem.cpu().numpy(), img.cpu().numpy()):
            members += [
                (f"{key}.sem.npy", encode_npy(zs.astype(sem_dtype))),
                (f"{key}.img.npy", encode_npy(zx.astype(img_dtype))),
                (f"{key}.meta.json", json.dumps({"source_shard": name}).encode()),
            ]
    os.makedirs(out_dir, exist_ok=True)
    write_tar(os.path.join(out_dir, name), members)
    return {"name": name, "samples": len(members) // 3}


def write_token_index(
    out_dir: str,
    shards: list[dict],
    *,
    grid: int,
    semantic_vocab: int,
    image_vocab: int,
    stage1: str,
    stage1_semantic: str = "",
    source: str = "",
    condition: str = "reference",
) -> dict:
    """Write `{out_dir}/index.json` for token shards ({"name", "samples"} rows, from every process); returns it."""
    index = {
        "kind": "tokens",
        "shards": sorted(shards, key=lambda r: r["name"]),
        "num_samples": sum(r["samples"] for r in shards),
        "grid": grid,
        "semantic_vocab": semantic_vocab,
        "image_vocab": image_vocab,
        "stage1": os.path.abspath(stage1),
        "stage1_semantic": os.path.abspath(stage1_semantic) if stage1_semantic else "",
        "source": source,
        "condition": condition,
    }
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, INDEX_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, INDEX_NAME))
    return index


# ---- reading ---------------------------------------------------------------------------------------------------
class TokenShardStream(ShardStream):
    """ShardStream over token shards: same order, split, padding, resume and faults; no transforms."""

    def __init__(self, shards: list[str], *, tokens: int, **kwargs):
        self.tokens = tokens  # tokens per code grid (grid ** 2): the length of a blank sample
        super().__init__(shards, **kwargs)

    def decode(self, raw: dict[str, bytes], where: str):
        if "sem.npy" not in raw or "img.npy" not in raw:
            raise ShardFormatError(f"{where}: token sample lacks sem.npy or img.npy (has {sorted(raw)})")
        return decode_npy(raw["sem.npy"], where), decode_npy(raw["img.npy"], where)

    def make_sample(self, decoded, params):
        sem, img = decoded
        return {"sem": torch.from_numpy(sem.astype(np.int64)), "img": torch.from_numpy(img.astype(np.int64))}

    def blank_sample(self) -> dict:
        return {"sem": torch.zeros(self.tokens, dtype=torch.long), "img": torch.zeros(self.tokens, dtype=torch.long)}


def read_token_index(spec: str) -> dict:
    """The index.json of token shards (a folder, pattern or URL of them); refuses the index of image shards."""
    first = spec if os.path.isdir(spec) else list_shards(spec)[0]
    try:
        index = read_index(first)
    except MissingIndex as e:
        raise MissingIndex(f"{e}. Token shards and their index are written by recipes/tokenize_shards.py") from e
    if index.get("kind") != "tokens":
        raise ValueError(f"the index of {spec} describes {index.get('kind', 'image')!r} shards, not token shards")
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
    faults: FaultPolicy | None = None,
    log_dir: str | None = None,
) -> ShardLoader:
    index = read_token_index(spec)
    dataset = TokenShardStream(
        list_shards(spec),
        tokens=index["grid"] ** 2,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        resampled=resampled,
        shuffle_buffer=shuffle_buffer,
        faults=faults,
    )
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, log_dir=log_dir)
