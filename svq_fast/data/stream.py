"""The shard stream, whatever a sample holds: exact epochs or a resampled stream, split by rank and worker,
shuffled in blocks, exactly resumable, and never stopped by a bad shard. Subclasses say what a sample is
(`decode`, `make_sample`, `blank_sample`): image shards in loader.py, token shards in tokens.py.

Order (plan.py): positions (shard, sample) are planned by arithmetic; a logical worker reads its positions in
blocks of `shuffle_buffer`, each read whole (raw bytes, through reader.ShardCursor, which keeps a shard's
stream open from one block to the next) and permuted with a generator seeded by (seed, epoch, rank, worker,
block), which also draws each sample's random transform parameters.

Exact resume: `loader.state_dict()` holds (epoch, batches consumed on this rank) and, for every logical worker,
where its stream continues: the shard URL and the sample offset of the block in progress (`resume`); after
`load_state_dict` the next batch is the one the interrupted run would have seen next. Resuming re-opens that
shard, skips to that offset without decoding anything, re-reads the block and drops the samples of it already
consumed. World size, worker count, batch size, seed, shuffle buffer and the shard set (names and counts)
must equal the saved ones; the shards may be read through another kind of URL (local files, http, pipe:).

Faults never change the plan: a sample that cannot be read (a shard given up after its retries, a damaged
member, a shard shorter than its index says) is replaced by a repeat of a readable sample of the same block
flagged `pad = True` (a blank sample if the whole block is unreadable), so every rank still yields the same
number of batches and no rank waits forever at the end of an epoch. See faults.py for how they are reported,
and for the bound (`max_bad_fraction` of the samples of a window of batches) above which the loader stops.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from svq_fast import dist
from svq_fast.data import plan
from svq_fast.data.faults import EVENTS, FaultLog, TooManyBadSamples, warn
from svq_fast.data.index import shard_counts, shard_name
from svq_fast.data.reader import FaultPolicy, ShardCursor
from svq_fast.data.shards import ShardFormatError
from svq_fast.data.transforms import NUM_PARAMS, collate

__all__ = ["ShardStream", "ShardLoader", "TooManyBadSamples"]


class ShardStream(IterableDataset):
    """Yields single samples {..., "key", "pad", EVENTS}; the DataLoader batches them per worker. Each worker
    yields a multiple of batch_size samples, so every batch comes from one worker."""

    def __init__(
        self,
        shards: list[str],
        *,
        batch_size: int = 1,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        resampled: bool = True,
        shuffle_buffer: int = 64,
        epoch: int = 0,
        remainder: str = "pad",
        shuffle: bool = True,
        counts: list[int] | None = None,
        faults: FaultPolicy | None = None,
        verbose: bool = True,
    ):
        super().__init__()
        if rank is None or world_size is None:
            r, w = dist.rank_world()
            rank = r if rank is None else rank
            world_size = w if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if remainder not in ("pad", "drop"):
            raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
        self.shards, self.batch_size = list(shards), batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.epoch = resampled, epoch
        self.block = max(1, shuffle_buffer)
        self.remainder, self.shuffle = remainder, shuffle
        self.faults = faults or FaultPolicy()
        self.counts = list(counts) if counts is not None else shard_counts(self.shards, faults=self.faults)
        if len(self.counts) != len(self.shards):
            raise ValueError(f"{len(self.counts)} counts for {len(self.shards)} shards")
        self.num_samples = sum(self.counts)
        if self.num_samples == 0:
            raise ValueError(f"the {len(self.shards)} shards hold no samples (first: {self.shards[:1]})")
        self.start_batch = 0  # batches of this rank already consumed in `epoch` (set by the loader on resume)
        self.stats: dict[str, int] = {}  # faults met in this process (the loader's FaultLog counts all workers)
        self._pending: list[dict] = []
        self._worker = 0
        if not resampled:
            self.batches_per_rank = plan.batches_per_rank(self.num_samples, world_size, batch_size, remainder)
            if self.batches_per_rank == 0:
                raise ValueError(
                    f"remainder='drop' leaves no batch: {self.num_samples} samples < {world_size} ranks x "
                    f"batch {batch_size}; use remainder='pad' or a smaller batch"
                )
            extra = self.batches_per_rank * world_size * batch_size - self.num_samples
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
        return plan.worker_batches(self.batches_per_rank, logical, num_workers)

    def digest(self) -> str:
        """The shard set's identity for resume: names and sample counts in order (not the kind of URL)."""
        blob = json.dumps([[shard_name(s), c] for s, c in zip(self.shards, self.counts)]).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    # ---- where each logical worker's samples are -------------------------------------------------------------
    def _pieces(self, logical: int, num_workers: int) -> tuple[Iterator[plan.Piece], int | None, tuple]:
        """(this logical worker's pieces, its length in samples or None if endless, its block-seed tag)."""
        if self.resampled:
            pieces = plan.resampled_pieces(self.counts, seed=self.seed, rank=self.rank, logical=logical)
            return pieces, None, (self.rank, logical)
        order = plan.epoch_order(len(self.shards), self.seed, self.epoch, self.shuffle)
        plist, length = plan.exact_pieces(
            self.counts,
            order,
            rank=self.rank,
            batches=self.batches_per_rank,
            batch_size=self.batch_size,
            logical=logical,
            num_workers=num_workers,
        )
        return iter(plist), length, (self.epoch, self.rank, logical)

    def resume_points(self, consumed: int, num_workers: int) -> list[dict]:
        """For every logical worker: where its stream continues after the rank consumed `consumed` batches of
        this epoch (the shard URL and sample offset its current block starts at, and how many samples of that
        block were already consumed)."""
        out = []
        for logical in range(num_workers):
            skip = plan.batches_done(consumed, logical, num_workers) * self.batch_size
            block_start = skip // self.block * self.block
            pieces, length, _ = self._pieces(logical, num_workers)
            at = None if length is not None and skip >= length else plan.locate(pieces, block_start)
            out.append(
                {
                    "worker": logical,
                    "url": None if at is None else self.shards[at.shard],
                    "offset": None if at is None else at.start,
                    "consumed_in_block": skip - block_start,
                }
            )
        return out

    # ---- reading ---------------------------------------------------------------------------------------------
    def _report(self, kind: str, **fields) -> None:
        event = {"kind": kind, "rank": self.rank, "worker": self._worker, "time": time.time(), **fields}
        counter = {"retry": "retries", "skipped_shard": "skipped_shards", "bad_sample": "bad_samples"}
        self.stats[counter.get(kind, kind)] = self.stats.get(counter.get(kind, kind), 0) + int(fields.get("n", 1))
        warn(event)
        self._pending.append(event)

    def _read_block(self, cursor: ShardCursor, pieces: list[plan.Piece]) -> list[tuple[str, dict | None, bool, str]]:
        """[(key, raw members or None if unreadable, pad, where)] for the block's positions, in order."""
        out = []
        for p in pieces:
            url = self.shards[p.shard]
            rows = cursor.read(url, p.start, p.stop, expected=self.counts[p.shard])
            for k, row in enumerate(rows):
                if row is None:
                    out.append((f"{shard_name(url)}#{p.start + k}", None, p.pad, url))
                else:
                    out.append((row[0], row[1], p.pad, f"{url}:{row[0]}"))
        return out

    def _block_samples(self, cursor: ShardCursor, pieces: list[plan.Piece], block_id: tuple, skip: int):
        rows = self._read_block(cursor, pieces)
        rng = np.random.default_rng([self.seed, *block_id])
        perm = rng.permutation(len(rows)) if self.shuffle and len(rows) > 1 else np.arange(len(rows))
        params = rng.random((len(rows), NUM_PARAMS))
        rows = [rows[i] for i in perm]
        failed: set[int] = {i for i, r in enumerate(rows) if r[1] is None}

        def decode(i):
            if i in failed:
                return None
            _, raw, _, where = rows[i]
            try:
                return self.decode(raw, where)
            except ShardFormatError as e:
                self._report("bad_sample", url=where, error=str(e))
                failed.add(i)
                return None

        for i in range(skip, len(rows)):
            key, _, pad, where = rows[i]
            decoded = decode(i)
            if decoded is None:  # replace by the next readable sample of the block, flagged pad
                self._report("replaced", n=1, url=where)
                pad = True
                for j in range(1, len(rows)):
                    decoded = decode((i + j) % len(rows))
                    if decoded is not None:
                        key = rows[(i + j) % len(rows)][0]
                        break
            sample = self.blank_sample() if decoded is None else self.make_sample(decoded, params[i])
            events, self._pending = self._pending, []
            yield {**sample, "key": key, "pad": bool(pad), EVENTS: events}

    # ---- what a sample is (subclasses) ----------------------------------------------------------------------
    def decode(self, raw: dict[str, bytes], where: str):
        """Raw tar members of one sample -> decoded arrays; raises ShardFormatError naming `where`."""
        raise NotImplementedError

    def make_sample(self, decoded, params: np.ndarray) -> dict:
        """Decoded arrays -> the sample's tensors, with its random params (NUM_PARAMS floats in [0, 1))."""
        raise NotImplementedError

    def blank_sample(self) -> dict:
        """The sample served when nothing in a block is readable (flagged pad)."""
        raise NotImplementedError

    # ---- iteration -------------------------------------------------------------------------------------------
    def _logical_worker(self) -> tuple[int, int]:
        """(logical worker id, number of workers). Physical worker i plays logical (i + start_batch) % W so that
        after a resume the DataLoader's round-robin, which restarts at worker 0, continues the batch order."""
        info = get_worker_info()
        i, w = (info.id, info.num_workers) if info is not None else (0, 1)
        return (i + self.start_batch) % w, w

    def __iter__(self) -> Iterator[dict]:
        logical, nw = self._logical_worker()
        self._worker, self._pending = logical, []
        skip, K = plan.batches_done(self.start_batch, logical, nw) * self.batch_size, self.block
        pieces, length, tag = self._pieces(logical, nw)
        if length is not None and skip >= length:
            return
        b = skip // K
        cursor = ShardCursor(self.faults, self._report)
        try:
            for block in plan.blocks(pieces, K, b, length):
                yield from self._block_samples(cursor, block, (*tag, b, 4 if self.resampled else 5), skip - b * K)
                skip, b = b * K + K, b + 1
        finally:
            cursor.close()


class ShardLoader(DataLoader):
    """A DataLoader over a ShardStream that knows its position: `state_dict()` / `load_state_dict()` give exact
    resume; iterating again after a break continues where it stopped; a finished pass over an exact epoch moves
    to the next epoch. Workers are not persistent (each pass forks them with the current position).
    `faults` counts the data faults of all workers (and writes them to TensorBoard under `log_dir`); with
    `max_bad_fraction`, a window of `window` batches in which more than that fraction of the samples had to be
    replaced raises TooManyBadSamples (faults.FaultLog)."""

    def __init__(
        self,
        dataset: ShardStream,
        *,
        batch_size: int,
        num_workers: int = 0,
        log_dir: str | None = None,
        max_bad_fraction: float | None = None,
        window: int = 10,
        **kwargs,
    ):
        if dataset.batch_size != batch_size:
            raise ValueError(f"dataset batch_size {dataset.batch_size} != loader batch_size {batch_size}")
        kwargs.setdefault("collate_fn", collate)
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, **kwargs)
        self._epoch = dataset.epoch
        self._consumed = 0
        self._steps = 0  # batches handed out in this process, all epochs (the step axis of the fault log)
        self.faults = FaultLog(log_dir, rank=dataset.rank, max_bad_fraction=max_bad_fraction, window=window)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def stats(self) -> dict[str, int]:
        """Fault counts over all workers so far (see faults.py)."""
        return dict(self.faults.counts)

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first batch at the next iteration."""
        self._epoch, self._consumed = epoch, 0

    def __iter__(self):
        ds = self.dataset
        if not ds.resampled and self._consumed >= ds.batches_per_rank:
            self._epoch, self._consumed = self._epoch + 1, 0
        ds.epoch, ds.start_batch = self._epoch, self._consumed
        for batch in super().__iter__():
            self.faults.record(batch.pop(EVENTS, []), self._steps)
            self.faults.batch(len(batch["key"]), self._steps)  # may raise TooManyBadSamples (faults.py)
            self._consumed += 1
            self._steps += 1
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
            "shards_digest": ds.digest(),
        }

    def state_dict(self) -> dict:
        ds = self.dataset
        epoch, consumed = self._epoch, self._consumed
        if not ds.resampled and consumed >= ds.batches_per_rank:  # the epoch is finished: the next one starts
            epoch, consumed = epoch + 1, 0
        ds.epoch, saved = epoch, ds.epoch
        try:
            resume = ds.resume_points(consumed, max(1, self.num_workers))
        finally:
            ds.epoch = saved
        return {"epoch": epoch, "batches": consumed, **self._identity(), "resume": resume}

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        # keys newer than a checkpoint (absent from it) are not compared
        wrong = {k: (state[k], v) for k, v in mine.items() if k != "rank" and k in state and state[k] != v}
        if wrong:
            what = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(f"cannot resume the data stream exactly, the setup differs ({what})")
        self._epoch, self._consumed = int(state["epoch"]), int(state["batches"])
