"""Issue 32 item 3: a stray `.tar` beside the shards that its index.json does not list (an empty file, random bytes,
a copy cut short) is counted by its readable samples and named in a DataFaultWarning; the run starts and goes on
under data.max_bad_fraction instead of stopping at start-up in count_samples (it did: StreamError)."""

import os
import tarfile
import warnings

import pytest

from svq_fast.data.faults import DataFaultWarning
from svq_fast.data.index import list_shards, shard_counts
from svq_fast.data.loader import make_loader
from svq_fast.data.make_shards import write_synthetic


@pytest.fixture
def shard_dir(tmp_path):
    """Three listed shards of 4 synthetic samples each, and three unlisted strays beside them."""
    d = tmp_path / "shards"
    write_synthetic(str(d), split="train", size=16, num_samples=12, samples_per_shard=4, progress=False)
    listed = sorted(d.glob("*.tar"))
    (d / "stray_empty.tar").write_bytes(b"")
    (d / "stray_random.tar").write_bytes(os.urandom(3000))
    raw = listed[0].read_bytes()
    with tarfile.open(listed[0]) as tf:
        members = tf.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    third = next(m for m in members if m.name.split(".")[0] == keys[2])
    (d / "stray_cut.tar").write_bytes(raw[: third.offset_data + 10])  # cut inside the 3rd sample's first member
    return d


def test_unreadable_unlisted_shards_are_counted_by_their_readable_samples_and_named(shard_dir):
    shards = list_shards(str(shard_dir))
    with pytest.warns(DataFaultWarning) as caught:
        counts = dict(zip((os.path.basename(s) for s in shards), shard_counts(shards)))
    assert counts["stray_empty.tar"] == 0 and counts["stray_random.tar"] == 0 and 0 < counts["stray_cut.tar"] < 3
    assert all(counts[n] == 4 for n in counts if n.startswith("synthetic"))
    said = [str(w.message) for w in caught if issubclass(w.category, DataFaultWarning)]
    for name, why in (("stray_empty.tar", "empty file"), ("stray_random.tar", "ReadError"), ("stray_cut.tar", "")):
        line = next(m for m in said if f"{shard_dir / name}: unreadable after sample {counts[name]}" in m)
        assert why in line and "index.json" in line and "the run goes on" in line


@pytest.mark.parametrize("nw", [0, 2])
def test_a_run_over_them_starts_and_stays_under_the_bound(shard_dir, nw):
    shards = list_shards(str(shard_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ld = make_loader(shards, batch_size=4, image_size=16, rank=0, world_size=1, num_workers=nw,
                         resampled=False, shuffle_buffer=4, max_bad_fraction=0.05, window=1)  # fmt: skip
        batches = list(ld)
    read = sum(int((~b["pad"]).sum()) for b in batches)
    assert read == 12 + shard_counts_quiet(shards)[shards.index(str(shard_dir / "stray_cut.tar"))]
    assert ld.stats.get("replaced_samples", 0) == 0  # nothing planned from them had to be replaced


def shard_counts_quiet(shards):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return shard_counts(shards)
