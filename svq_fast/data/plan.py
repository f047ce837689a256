"""Which samples each rank and DataLoader worker reads, in which order: pure arithmetic on shard sample counts.

Samples are addressed by position (shard number, sample number inside the shard), never by reading order, so
the plan is known before anything is read and a resume can skip by arithmetic. Inside a rank the work is split
over DataLoader workers ("logical workers": worker l produces the rank's batches l, l + W, l + 2W, ... which
the DataLoader's round-robin returns in order).

Exact epochs (`resampled=False`): epoch e concatenates the shards in a (seed, e)-shuffled order into one
sequence of N samples. Every rank yields the same number of batches, nb = ceil(N / (R * B)) with
remainder="pad" or floor(N / (R * B)) with remainder="drop":
- pad: the sequence is extended cyclically to nb * R * B positions; the extra samples are repeats flagged `pad`.
- drop: the last N - nb * R * B samples of the epoch's order are not seen this epoch (a different set each epoch).
Rank r takes positions [r * nb * B, (r + 1) * nb * B); its logical worker l takes a contiguous run of nb_l * B
of those (nb_l = nb // W, +1 for l < nb % W).

Resampled (`resampled=True`): an infinite sequence; logical worker l of rank r draws whole shards with
replacement (probability proportional to their sample count) from a generator seeded by (seed, r, l).

A worker's sequence is cut into blocks of `shuffle_buffer` positions (the unit that is read and permuted).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Piece:
    """Positions [start, stop) of shard number `shard`; `pad` marks repeats that extend an exact epoch."""

    shard: int
    start: int
    stop: int
    pad: bool = False


def batches_per_rank(num_samples: int, world_size: int, batch_size: int, remainder: str) -> int:
    per_step = world_size * batch_size
    if remainder == "pad":
        return -(-num_samples // per_step)
    if remainder == "drop":
        return num_samples // per_step
    raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")


def worker_batches(batches: int, logical: int, num_workers: int) -> int:
    """Batches of a rank's `batches` that logical worker `logical` of `num_workers` produces."""
    return batches // num_workers + (logical < batches % num_workers)


def batches_done(consumed: int, logical: int, num_workers: int) -> int:
    """Of the rank's first `consumed` batches, how many logical worker `logical` produced (j % W == logical)."""
    return consumed // num_workers + (logical < consumed % num_workers)


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 1]).permutation(num_shards)


def exact_pieces(
    counts: Sequence[int],
    order: np.ndarray,
    *,
    rank: int,
    batches: int,
    batch_size: int,
    logical: int,
    num_workers: int,
) -> tuple[list[Piece], int]:
    """(pieces covering logical worker `logical`'s run of the epoch sequence, its length in samples)."""
    ordered = [counts[i] for i in order]
    cum = np.concatenate([[0], np.cumsum(ordered)])
    n, B = int(cum[-1]), batch_size
    before = sum(worker_batches(batches, m, num_workers) for m in range(logical))
    start = rank * batches * B + before * B
    length = worker_batches(batches, logical, num_workers) * B
    pieces: list[Piece] = []
    pos, stop = start, start + length
    while pos < stop:
        wrapped, pad = pos % n, pos >= n
        j = bisect.bisect_right(cum, wrapped) - 1  # shard (in epoch order) holding position `wrapped`
        take = min(stop - pos, int(cum[j + 1]) - wrapped, n - wrapped)
        pieces.append(Piece(int(order[j]), int(wrapped - cum[j]), int(wrapped - cum[j] + take), pad))
        pos += take
    return pieces, length


def resampled_pieces(counts: Sequence[int], *, seed: int, rank: int, logical: int) -> Iterator[Piece]:
    """Whole shards drawn with replacement, with probability proportional to their sample count (so every sample
    is equally likely however uneven the shards are). Endless."""
    rng = np.random.default_rng([seed, rank, logical, 3])
    total = sum(counts)
    weights = np.asarray(counts, np.float64) / total
    while True:
        for i in rng.choice(len(counts), size=256, p=weights):
            yield Piece(int(i), 0, counts[int(i)])


def blocks(pieces: Iterator[Piece], size: int, first: int, length: int | None = None) -> Iterator[list[Piece]]:
    """Cut the concatenated `pieces` into blocks of `size` positions (the last one ends at `length` when given),
    starting with block number `first`. Pieces before it are skipped by arithmetic, not read."""

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


def locate(pieces: Iterator[Piece], position: int) -> Piece | None:
    """The piece holding sequence position `position`, cut to start there (None past the end)."""
    pos = 0
    for p in pieces:
        n = p.stop - p.start
        if position < pos + n:
            return Piece(p.shard, p.start + position - pos, p.stop, p.pad)
        pos += n
    return None
