"""Streaming loader over WebDataset shards of (image, semantic map) pairs, with exact epochs and exact resume.

Samples are addressed by position, not by reading order: every shard's sample count comes from the
`index.json` beside it (or a one-off header scan), and a shard member is read at its byte offset. Work is
split over ranks and, inside a rank, over DataLoader workers ("logical workers"; worker l produces the rank's
batches l, l + W, l + 2W, ... which the DataLoader's round-robin returns in order).

Exact epochs (`resampled=False`): epoch e concatenates the shards in a (seed, e)-shuffled order into one
sequence of N samples. Every rank yields the same number of batches, nb = ceil(N / (R * B)) with
remainder="pad" (default) or floor(N / (R * B)) with remainder="drop":
- pad: the sequence is extended cyclically to nb * R * B positions; the extra samples are repeats flagged
  `pad = True` in the batch, so metrics can drop them. Every sample is seen exactly once with pad False.
- drop: the last N - nb * R * B samples of the epoch's order are not seen this epoch (a different set each
  epoch); the count is printed on rank 0.
Rank r takes positions [r * nb * B, (r + 1) * nb * B); its logical worker l takes a contiguous run of
nb_l * B of those (nb_l = nb // W, +1 for l < nb % W).

Resampled (`resampled=True`, training): an infinite stream; logical worker l of rank r draws whole shards
with replacement (probability proportional to their sample count) from a generator seeded by (seed, r, l).
Ranks and workers are not given disjoint shards in this mode; it is reproducible for a fixed seed, world size
and worker count.

Shuffling: a worker's sequence is cut into blocks of `shuffle_buffer` samples; each block is read (raw bytes)
and permuted with a generator seeded by (seed, epoch, rank, worker, block). Crop and flip parameters come from
the same generator, so a sample's transform does not depend on what was read before it.

Exact resume: `loader.state_dict()` holds (epoch, batches consumed on this rank); after `load_state_dict` the
next batch is the one the interrupted run would have seen next, with num_workers 0 or > 0 (it must equal the
saved num_workers, as must world size and batch size). Resuming skips whole blocks by arithmetic and decodes
nothing it skips.

Damage never stops a run: a corrupt tar member, an undecodable sample, or a shard shorter than its index says
is replaced by a repeat of a readable sample of the same block flagged `pad = True` (a zero image with an
all-ignore label if the whole block is unreadable), warned about, and counted in `dataset.stats` (per worker
process). Batch counts stay equal across ranks, so no rank waits forever at the end of an epoch.

Batches: {"image": (B, 3, S, S) float in [-1, 1], "label": (B, S, S) int64 (255 = ignore), "key": list[str],
"pad": (B,) bool}.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from svq_fast.data.shards import INDEX_NAME, SampleRef, ShardFormatError, decode_sample, read_members, scan_tar

IGNORE = 255


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
    """Yield (key, {suffix: bytes}) grouped by key, in tar order, streaming (for whole-shard passes such as
    tokenisation). A damaged tar stops after the last complete sample, with a warning and stats["corrupt"] += 1."""
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
        warnings.warn(f"shard {path}: unreadable after key {current_key!r} ({e}); skipping the rest", stacklevel=2)
        if stats is not None:
            stats["corrupt"] = stats.get("corrupt", 0) + 1
        return
    if current_key is not None:
        yield current_key, members


def read_index(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, INDEX_NAME)
    with open(path) as f:
        return json.load(f)


def shard_counts(shards: list[str]) -> list[int]:
    """Samples per shard, from each directory's index.json; shards it does not list are scanned (slower)."""
    indexes: dict[str, dict] = {}
    counts, scanned = [], []
    for path in shards:
        d = os.path.dirname(os.path.abspath(path))
        if d not in indexes:
            try:
                indexes[d] = {s["name"]: int(s["samples"]) for s in read_index(d)["shards"]}
            except (OSError, ValueError, KeyError):
                indexes[d] = {}
        n = indexes[d].get(os.path.basename(path))
        if n is None:
            n = len(scan_tar(path))
            scanned.append(path)
        counts.append(n)
    if scanned:
        warnings.warn(
            f"{len(scanned)} shard(s) not listed in an index.json (e.g. {scanned[0]}): counted their samples by "
            "scanning the tar headers; write shards with make_shards to get an index",
            stacklevel=2,
        )
    return counts


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def joint_transform(
    image: np.ndarray,
    label: np.ndarray,
    size: int,
    params: np.ndarray,
    flip: bool,
    crop: str = "random",
) -> tuple[np.ndarray, np.ndarray]:
    """The same crop to `size` and horizontal flip for image (H, W, 3) and label (H, W).
    params: 3 floats in [0, 1) (crop top, crop left, flip coin). A sample smaller than `size` is first resized
    (shorter side to size; bicubic image, nearest label)."""
    h, w = label.shape
    if min(h, w) < size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        h, w = nh, nw
    if crop == "random":
        top, left = int(params[0] * (h - size + 1)), int(params[1] * (w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    image = image[top : top + size, left : left + size]
    label = label[top : top + size, left : left + size]
    if flip and params[2] < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return image, label


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """-> image (3, H, W) float in [-1, 1], label (H, W) int64. The arithmetic is done in numpy: torch's
    intra-op threads make these small per-sample ops many times slower in the main process (num_workers=0)."""
    x = np.ascontiguousarray(np.transpose(image, (2, 0, 1)), dtype=np.float32)
    x *= 1 / 127.5
    x -= 1.0
    return torch.from_numpy(x), torch.from_numpy(np.array(label, np.int64))


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch. In a worker: torch's default collate (it stacks straight into shared memory;
    workers run one intra-op thread). In the main process (num_workers=0): numpy's stack, because torch.stack
    with several intra-op threads was measured 10-40x slower per batch on a 2-vCPU VM."""
    if get_worker_info() is not None:
        return default_collate(samples)
    batch = {}
    for name, first in samples[0].items():
        column = [s[name] for s in samples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.from_numpy(np.stack([t.numpy() for t in column]))
        elif isinstance(first, bool):
            batch[name] = torch.tensor(column, dtype=torch.bool)
        else:
            batch[name] = column
    return batch


@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of shard number `shard`; `pad` marks repeats that extend an exact epoch."""

    shard: int
    start: int
    stop: int
    pad: bool = False


class SemanticShardStream(IterableDataset):
    """Yields single samples {"image", "label", "key", "pad"}; the DataLoader batches them per worker.
    Each worker yields a multiple of batch_size samples, so every batch comes from one worker."""

    def __init__(
        self,
        shards: list[str],
        *,
        image_size: int,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        resampled: bool = True,
        flip: bool = True,
        shuffle_buffer: int = 64,
        epoch: int = 0,
        remainder: str = "pad",
        crop: str = "random",
        shuffle: bool = True,
        counts: list[int] | None = None,
        verbose: bool = True,
    ):
        super().__init__()
        if rank is None or world_size is None:
            r, w = _dist_rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if remainder not in ("pad", "drop"):
            raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.shards, self.image_size, self.batch_size = list(shards), image_size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.flip, self.epoch = resampled, flip, epoch
        self.block = max(1, shuffle_buffer)
        self.remainder, self.crop, self.shuffle = remainder, crop, shuffle
        self.counts = list(counts) if counts is not None else shard_counts(self.shards)
        if len(self.counts) != len(self.shards):
            raise ValueError(f"{len(self.counts)} counts for {len(self.shards)} shards")
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise ValueError(f"the {len(self.shards)} shards hold no samples (first: {self.shards[:1]})")
        self.start_batch = 0  # batches of this rank already consumed in `epoch` (set by the loader on resume)
        self.stats: dict[str, int] = {}
        self._refs: OrderedDict[int, list[SampleRef]] = OrderedDict()
        if not resampled:
            per_step = world_size * batch_size
            if remainder == "pad":
                self.batches_per_rank = -(-self.num_samples // per_step)
            else:
                self.batches_per_rank = self.num_samples // per_step
                if self.batches_per_rank == 0:
                    raise ValueError(
                        f"remainder='drop' leaves no batch: {self.num_samples} samples < {world_size} ranks x "
                        f"batch {batch_size}; use remainder='pad' or a smaller batch"
                    )
            extra = self.batches_per_rank * per_step - self.num_samples
            if extra and verbose and rank == 0:
                what = "padded with repeats flagged pad=True" if extra > 0 else "dropped (not seen this epoch)"
                print(
                    f"svq_fast.data: exact epochs of {self.num_samples} samples over {world_size} rank(s) x batch "
                    f"{batch_size}: {self.batches_per_rank} batches per rank, {abs(extra)} samples {what}",
                    flush=True,
                )

    # ---- sizes -------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Samples this rank yields per epoch (exact mode); the DataLoader turns it into batches."""
        if self.resampled:
            raise TypeError("a resampled stream is infinite and has no length")
        return self.batches_per_rank * self.batch_size

    def worker_batches(self, logical: int, num_workers: int) -> int:
        nb = self.batches_per_rank
        return nb // num_workers + (logical < nb % num_workers)

    # ---- where each logical worker's samples are -------------------------------------------------------------
    def _epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(self.shards))

    def _exact_pieces(self, logical: int, num_workers: int) -> tuple[list[Piece], int]:
        """(pieces covering this worker's run of the epoch sequence, its length in samples)."""
        order = self._epoch_order()
        counts = [self.counts[i] for i in order]
        cum = np.concatenate([[0], np.cumsum(counts)])
        n, B = self.num_samples, self.batch_size
        rank_start = self.rank * self.batches_per_rank * B
        before = sum(self.worker_batches(m, num_workers) for m in range(logical))
        start = rank_start + before * B
        length = self.worker_batches(logical, num_workers) * B
        pieces: list[Piece] = []
        pos, stop = start, start + length
        while pos < stop:
            wrapped, pad = pos % n, pos >= n
            j = bisect.bisect_right(cum, wrapped) - 1  # shard (in epoch order) holding position `wrapped`
            take = min(stop - pos, int(cum[j + 1]) - wrapped, n - wrapped)
            pieces.append(Piece(int(order[j]), int(wrapped - cum[j]), int(wrapped - cum[j] + take), pad))
            pos += take
        return pieces, length

    def _resampled_pieces(self, logical: int) -> Iterator[Piece]:
        """Whole shards drawn with replacement, with probability proportional to their sample count (so every
        sample is equally likely however uneven the shards are)."""
        rng = np.random.default_rng([self.seed, self.rank, logical, 3])
        weights = np.asarray(self.counts, np.float64) / self.num_samples
        while True:
            for i in rng.choice(len(self.counts), size=256, p=weights):
                yield Piece(int(i), 0, self.counts[int(i)])

    @staticmethod
    def _blocks(pieces: Iterator[Piece], size: int, first: int, length: int | None = None) -> Iterator[list[Piece]]:
        """Cut the concatenated `pieces` into blocks of `size` positions (the last one ends at `length` when
        given), starting with block number `first`. Pieces before it are skipped by arithmetic, not read."""

        def bounds(lo):
            return lo, (lo + size if length is None else min(lo + size, length))

        lo, hi = bounds(first * size)
        pos, block = 0, []
        for p in pieces:
            n = p.stop - p.start  # this piece covers sequence positions [pos, pos + n)
            while True:
                a, b = max(pos, lo), min(pos + n, hi)
                if a < b:
                    block.append(Piece(p.shard, p.start + a - pos, p.start + b - pos, p.pad))
                if pos + n < hi:
                    break
                yield block  # the piece reaches the end of the block
                block = []
                lo, hi = bounds(hi)
                if length is not None and lo >= length:
                    return
            pos += n
        if block:
            yield block

    # ---- reading ---------------------------------------------------------------------------------------------
    def _shard_refs(self, i: int) -> list[SampleRef]:
        if i in self._refs:
            self._refs.move_to_end(i)
            return self._refs[i]
        refs = scan_tar(self.shards[i], self.stats)
        if len(refs) != self.counts[i]:
            self._count("count_mismatch")
            warnings.warn(
                f"shard {self.shards[i]}: {len(refs)} samples on disk, index says {self.counts[i]}; "
                "missing ones are replaced by padded repeats",
                stacklevel=2,
            )
        self._refs[i] = refs
        if len(self._refs) > 8:
            self._refs.popitem(last=False)
        return refs

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    def _read_block(self, pieces: list[Piece]) -> list[tuple[str, dict | None, bool, str]]:
        """[(key, raw members or None if unreadable, pad, where)] for the block's positions, in order."""
        out = []
        for p in pieces:
            path = self.shards[p.shard]
            refs = self._shard_refs(p.shard)
            try:
                f = open(path, "rb")
            except OSError as e:
                warnings.warn(f"shard {path}: cannot open ({e}); its samples are replaced", stacklevel=2)
                self._count("unreadable_shards")
                out += [(f"{os.path.basename(path)}#{k}", None, p.pad, path) for k in range(p.start, p.stop)]
                continue
            with f:
                for k in range(p.start, p.stop):
                    if k >= len(refs):
                        out.append((f"{os.path.basename(path)}#{k}", None, p.pad, path))
                        continue
                    ref = refs[k]
                    try:
                        out.append((ref.key, read_members(f, ref), p.pad, f"{path}:{ref.key}"))
                    except (ShardFormatError, OSError) as e:
                        warnings.warn(f"{path}: {e}; sample replaced", stacklevel=2)
                        out.append((ref.key, None, p.pad, f"{path}:{ref.key}"))
        return out

    def _block_samples(self, pieces: list[Piece], block_id: tuple, skip: int) -> Iterator[dict]:
        rows = self._read_block(pieces)
        rng = np.random.default_rng([self.seed, *block_id])
        perm = rng.permutation(len(rows)) if self.shuffle and len(rows) > 1 else np.arange(len(rows))
        params = rng.random((len(rows), 3))
        rows = [rows[i] for i in perm]
        failed: set[int] = {i for i, r in enumerate(rows) if r[1] is None}
        self._count("unreadable_samples", len(failed))

        def decode(i):
            if i in failed:
                return None
            key, raw, _, where = rows[i]
            try:
                return self.decode(raw, where)
            except ShardFormatError as e:
                warnings.warn(f"{e}; sample replaced by a padded repeat", stacklevel=2)
                self._count("bad_samples")
                failed.add(i)
                return None

        for i in range(skip, len(rows)):
            key, _, pad, _ = rows[i]
            decoded = decode(i)
            if decoded is None:  # replace by the next readable sample of the block, flagged pad
                self._count("replaced")
                pad = True
                for j in range(1, len(rows)):
                    decoded = decode((i + j) % len(rows))
                    if decoded is not None:
                        key = rows[(i + j) % len(rows)][0]
                        break
            yield {**self.make_sample(decoded, params[i]), "key": key, "pad": bool(pad)}

    # ---- what a sample is (overridden by other shard kinds, e.g. token shards) --------------------------------
    def decode(self, raw: dict[str, bytes], where: str):
        """Raw tar members of one sample -> decoded arrays; raises ShardFormatError naming `where`."""
        return decode_sample(raw, where=where)[:2]

    def make_sample(self, decoded, params: np.ndarray) -> dict:
        """Decoded arrays (None: nothing readable in the block) -> tensors, with the sample's random params."""
        if decoded is None:
            s = self.image_size
            image, label = np.zeros((s, s, 3), np.uint8), np.full((s, s), IGNORE, np.uint8)
        else:
            image, label = joint_transform(*decoded, self.image_size, params, self.flip, self.crop)
        x, s = to_tensors(image, label)
        return {"image": x, "label": s}

    # ---- iteration -------------------------------------------------------------------------------------------
    def _logical_worker(self) -> tuple[int, int]:
        """(logical worker id, number of workers). Physical worker i plays logical (i + start_batch) % W so that
        after a resume the DataLoader's round-robin, which restarts at worker 0, continues the batch order."""
        info = get_worker_info()
        i, w = (info.id, info.num_workers) if info is not None else (0, 1)
        return (i + self.start_batch) % w, w

    def __iter__(self) -> Iterator[dict]:
        logical, nw = self._logical_worker()
        # batches of this logical worker already consumed: rank batches j < start_batch with j % nw == logical
        done = self.start_batch // nw + (logical < self.start_batch % nw)
        skip, K = done * self.batch_size, self.block
        if self.resampled:
            pieces, length, tag = self._resampled_pieces(logical), None, (self.rank, logical)
        else:
            plist, length = self._exact_pieces(logical, nw)
            pieces, tag = iter(plist), (self.epoch, self.rank, logical)
        if length is not None and skip >= length:
            return
        b = skip // K
        for block in self._blocks(pieces, K, b, length):
            yield from self._block_samples(block, (*tag, b, 4 if self.resampled else 5), skip - b * K)
            skip, b = b * K + K, b + 1


class ShardLoader(DataLoader):
    """A DataLoader over a SemanticShardStream that knows its position: `state_dict()` / `load_state_dict()`
    give exact resume; iterating again after a break continues where it stopped; a finished pass over an exact
    epoch moves to the next epoch. Workers are not persistent (each pass forks them with the current position)."""

    def __init__(self, dataset: SemanticShardStream, *, batch_size: int, num_workers: int = 0, **kwargs):
        if dataset.batch_size != batch_size:
            raise ValueError(f"dataset batch_size {dataset.batch_size} != loader batch_size {batch_size}")
        kwargs.setdefault("collate_fn", collate)
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, **kwargs)
        self._epoch = dataset.epoch
        self._consumed = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        self._epoch, self._consumed = epoch, 0

    def __iter__(self):
        ds = self.dataset
        if not ds.resampled and self._consumed >= ds.batches_per_rank:
            self._epoch, self._consumed = self._epoch + 1, 0
        ds.epoch, ds.start_batch = self._epoch, self._consumed
        for batch in super().__iter__():
            self._consumed += 1
            yield batch
        if not ds.resampled:
            self._epoch, self._consumed = self._epoch + 1, 0

    def _identity(self) -> dict:
        ds = self.dataset
        return {
            "rank": ds.rank,
            "world_size": ds.world_size,
            "num_workers": self.num_workers,
            "batch_size": ds.batch_size,
            "seed": ds.seed,
            "resampled": ds.resampled,
            "num_samples": ds.num_samples,
            "num_shards": len(ds.shards),
            "shuffle_buffer": ds.block,
        }

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches": self._consumed, **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        wrong = {k: (state.get(k), v) for k, v in mine.items() if k != "rank" and state.get(k) != v}
        if wrong:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(f"cannot resume the data stream exactly, the setup differs ({what})")
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches"])


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
) -> ShardLoader:
    """A ShardLoader (a DataLoader) yielding {"image", "label", "key", "pad"} batches; see the module docstring.
    rank / world_size default to torch.distributed's when it is initialised (else 0 / 1)."""
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
    )
    return ShardLoader(dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)


__all__ = [
    "list_shards",
    "iter_tar_samples",
    "read_index",
    "shard_counts",
    "joint_transform",
    "to_tensors",
    "collate",
    "SemanticShardStream",
    "ShardLoader",
    "make_loader",
]
