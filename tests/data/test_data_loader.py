"""Streaming loader: exact epochs over 2 ranks x 2 workers with uneven shards, resampled reproducibility,
exact resume, damaged shards, joint transforms, rank defaults from torch.distributed."""

import collections
import contextlib
import tarfile

import pytest
import torch

from svq_fast.data import plan
from svq_fast.data.faults import DataFaultWarning
from svq_fast.data.loader import SemanticShardStream, make_loader

COUNTS = [7, 3, 11, 0, 1, 5]  # uneven, one empty shard: 27 samples


def _run(shards, *, rank, world, nw, batches=None, **kw):
    """Batches of one rank as plain lists: [(keys, pad, image tensor)]."""
    kw = {"batch_size": 2, "image_size": 12, "seed": 3, "resampled": False, "shuffle_buffer": 5, **kw}
    ld = make_loader(shards, rank=rank, world_size=world, num_workers=nw, **kw)
    out = []
    for b in ld:
        out.append((list(b["key"]), b["pad"].tolist(), b["image"], b["label"]))
        if batches is not None and len(out) == batches:
            break
    return ld, out


def _seen(batches):
    real = collections.Counter(k for keys, pad, *_ in batches for k, p in zip(keys, pad) if not p)
    pads = sum(p for _, pad, *_ in batches for p in pad)
    return real, pads


@pytest.mark.timeout(90)
@pytest.mark.parametrize("nw", [0, 2])
def test_exact_epoch_2_ranks_x_2_workers(tmp_path, fx, nw):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    all_keys = {f"s{k}_{i}" for k, c in enumerate(COUNTS) for i in range(c)}
    per_rank, seen, pads = [], collections.Counter(), 0
    for rank in (0, 1):
        ld, batches = _run(shards, rank=rank, world=2, nw=nw, batch_size=4)
        assert len(ld) == len(batches)
        per_rank.append(len(batches))
        r, p = _seen(batches)
        seen += r
        pads += p
        assert all(len(k) == 4 for k, *_ in batches)
    assert per_rank == [4, 4]  # ceil(27 / (2 * 4)) batches on every rank
    assert set(seen) == all_keys and set(seen.values()) == {1}, "every sample exactly once per epoch"
    assert pads == 2 * 4 * 4 - 27


@pytest.mark.timeout(60)
def test_drop_remainder_and_epochs_reshuffle(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    seen_epochs = []
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in (0, 1):
            _, batches = _run(shards, rank=rank, world=2, nw=0, batch_size=4, remainder="drop", epoch=epoch)
            assert len(batches) == 3  # floor(27 / 8)
            r, p = _seen(batches)
            assert p == 0
            seen += r
        assert len(seen) == 24 and set(seen.values()) == {1}
        seen_epochs.append(seen)
    order = [[k for k, *_ in _run(shards, rank=0, world=1, nw=0, epoch=e)[1]] for e in (0, 1)]
    assert order[0] != order[1], "a new epoch must reshuffle"


@pytest.mark.timeout(60)
def test_loader_iterates_epochs_and_tracks_them(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    ld = make_loader(shards, batch_size=5, image_size=12, resampled=False, world_size=1, rank=0)
    e0 = [k for b in ld for k in b["key"]]
    assert ld.epoch == 1 and ld.state_dict()["batches"] == 0
    e1 = [k for b in ld for k in b["key"]]
    assert len(e0) == len(e1) == 30 and e0 != e1


def _images_equal(a, b):
    return len(a) == len(b) and all(
        x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2]) and torch.equal(x[3], y[3]) for x, y in zip(a, b)
    )


@pytest.mark.timeout(90)
def test_resampled_reproducible_with_seed(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    kw = dict(rank=1, world=2, resampled=True, batches=12)
    _, a = _run(shards, nw=2, **kw)
    _, b = _run(shards, nw=2, **kw)
    _, c = _run(shards, nw=2, seed=4, **kw)
    assert _images_equal(a, b)
    assert [x[0] for x in a] != [x[0] for x in c]
    _, r0 = _run(shards, nw=2, **{**kw, "rank": 0})
    assert [x[0] for x in a] != [x[0] for x in r0], "ranks must draw different streams"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("resampled", [False, True])
@pytest.mark.parametrize("nw", [0, 2])
def test_resume_gives_the_same_next_batches(tmp_path, fx, nw, resampled):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    kw = dict(batch_size=2, image_size=12, seed=5, resampled=resampled, shuffle_buffer=5, rank=1, world_size=2)
    total, cut = 11, 3  # exact mode: 7 batches per rank, so the reference crosses into epoch 1

    def take(ld, n):
        out = []
        while len(out) < n:
            for b in ld:
                out.append((list(b["key"]), b["pad"].tolist(), b["image"], b["label"]))
                if len(out) == n:
                    break
        return out

    ref = take(make_loader(shards, num_workers=nw, **kw), total)
    first = make_loader(shards, num_workers=nw, **kw)
    head = take(first, cut)
    state = first.state_dict()
    assert state["batches"] == cut and state["epoch"] == 0
    resumed = make_loader(shards, num_workers=nw, **kw)
    resumed.load_state_dict(state)
    tail = take(resumed, total - cut)
    assert _images_equal(head + tail, ref)
    # breaking out of a loop and iterating again continues too (the loader keeps its position)
    again = make_loader(shards, num_workers=nw, **kw)
    parts = take(again, 2) + take(again, 4) + take(again, total - 6)
    assert _images_equal(parts, ref)


def test_resume_refuses_a_different_setup(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    state = make_loader(shards, batch_size=2, image_size=12, num_workers=2, rank=0, world_size=1).state_dict()
    other = make_loader(shards, batch_size=2, image_size=12, num_workers=0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="num_workers: saved 2, now 0"):
        other.load_state_dict(state)


@pytest.mark.timeout(90)
def test_corrupt_member_and_truncated_shard_never_crash(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    # destroy the image bytes of one sample in shard 0 (PNG data after its header) and truncate shard 2
    with tarfile.open(shards[0]) as tar:
        member = tar.getmember("s0_2.image.png")
        off, size = member.offset_data, member.size
    with open(shards[0], "r+b") as f:
        f.seek(off + 20)
        f.write(b"\xff" * (size - 40))
    data = open(shards[2], "rb").read()
    with open(shards[2], "wb") as f:
        f.write(data[: len(data) // 2 + 100])

    for nw in (0, 2):
        per_rank, seen, stats = [], collections.Counter(), collections.Counter()
        with pytest.warns(DataFaultWarning) if nw == 0 else contextlib.nullcontext():  # workers warn in theirs
            for rank in (0, 1):
                ld, batches = _run(shards, rank=rank, world=2, nw=nw, batch_size=4)
                per_rank.append(len(batches))
                seen += _seen(batches)[0]
                stats.update(ld.stats)  # counted over the workers: the faults travel with the batches
        assert per_rank == [4, 4], "damage must not change the batch count (a rank would wait forever)"
        assert set(seen.values()) == {1}
        assert "s0_2" not in seen  # the broken sample is replaced, not served
        assert 13 <= len(seen) < 26
        assert stats["bad_samples"] == 1 and stats["replaced_samples"] >= 1 and stats["skipped_shards"] >= 1, stats


def test_joint_transform_keeps_image_and_label_aligned(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS, size=16)
    flipped = 0
    for b in make_loader(shards, batch_size=3, image_size=12, resampled=False, flip=True, rank=0, world_size=1):
        red = ((b["image"][:, 0] + 1) * 127.5).round().long()  # (B, 12, 12)
        assert torch.equal(red, b["label"] * 16), "crop/flip differ between image and label"
        assert b["label"].dtype == torch.int64 and b["image"].shape[1:] == (3, 12, 12)
        flipped += int((b["label"][:, 0, 0] > b["label"][:, 0, -1]).sum())
    assert flipped > 0, "some samples should be flipped"


def test_small_samples_are_resized_up(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), [4], size=8)
    b = next(iter(make_loader(shards, batch_size=4, image_size=16, resampled=False, rank=0, world_size=1)))
    assert b["image"].shape == (4, 3, 16, 16) and b["label"].shape == (4, 16, 16)


def test_missing_index_counts_local_shards_by_scanning(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS, index=False)
    with pytest.warns(UserWarning, match="scanning"):
        ds = SemanticShardStream(shards, image_size=12, batch_size=2, resampled=False, rank=0, world_size=1)
    assert ds.counts == COUNTS and ds.num_samples == 27


def test_rank_and_world_default_from_torch_distributed(tmp_path, fx, monkeypatch):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    ds = SemanticShardStream(shards, image_size=12, batch_size=2, resampled=False)
    assert (ds.rank, ds.world_size) == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    ds = SemanticShardStream(shards, image_size=12, batch_size=2, resampled=False)
    assert (ds.rank, ds.world_size) == (1, 3) and ds.batches_per_rank == 5  # ceil(27 / 6)
    ds = SemanticShardStream(shards, image_size=12, batch_size=2, resampled=False, rank=0, world_size=1)
    assert (ds.rank, ds.world_size) == (0, 1), "explicit arguments win"


def test_blocks_cut_pieces_by_arithmetic():
    P = plan.Piece
    pieces = [P(0, 0, 5), P(1, 0, 3), P(2, 2, 9)]
    blocks = list(plan.blocks(iter(pieces), 4, 0, 15))
    assert [sum(p.stop - p.start for p in b) for b in blocks] == [4, 4, 4, 3]
    assert blocks[1] == [P(0, 4, 5), P(1, 0, 3)]
    assert list(plan.blocks(iter(pieces), 4, 3, 15)) == [[P(2, 6, 9)]]
    assert plan.locate(iter(pieces), 9) == P(2, 3, 9) and plan.locate(iter(pieces), 15) is None


def test_ordered_loader_reads_every_sample_once_in_shard_order_whatever_the_process_group(tmp_path, fx, monkeypatch):
    """What evaluation, tokenization and the held-out batches read: one global sequence in shard order, center crops,
    no flips, on every rank alike."""
    from svq_fast.data.loader import ordered_loader

    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    want = [f"s{k}_{i}" for k, c in enumerate(COUNTS) for i in range(c)]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    runs = []
    for batch_size in (1, 4):
        batches = list(ordered_loader(shards, batch_size=batch_size, image_size=12))
        keys = [k for b in batches for k, p in zip(b["key"], b["pad"].tolist()) if not p]
        assert keys == want, batch_size
        runs.append(torch.cat([b["image"][~b["pad"]] for b in batches]))
    assert torch.equal(runs[0], runs[1])  # no random flip or crop: the images do not depend on the batching
