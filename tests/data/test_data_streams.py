"""Shards streamed through WebDataset from a real HTTP server on 127.0.0.1 and from `pipe:` commands: the same
batches as local files, exact resume across kinds of URL, the index read beside the shards, and faults (a cut
connection, a 404, a stalled server, a failing command) retried, skipped and counted without unequal batch counts.
Every server, loader and retry here is bounded: pytest-timeout per test, FaultPolicy timeouts of about a second."""

import collections
import glob
import os

import pytest
import torch

from svq_fast.data.faults import DataFaultWarning
from svq_fast.data.index import MissingIndex, index_url, list_shards, read_index, shard_counts, shard_name
from svq_fast.data.loader import make_loader
from svq_fast.data.reader import FaultPolicy, ShardCursor, StreamError, iter_samples

COUNTS = [7, 3, 11, 0, 1, 5]  # 27 samples, uneven, one empty shard
FAST = FaultPolicy(retries=2, backoff=0.01, timeout=1.0)


def _names(shards):
    return [os.path.basename(s) for s in shards]


def _batches(shards, *, rank=0, world=1, nw=0, n=None, **kw):
    kw = {"batch_size": 2, "image_size": 12, "seed": 3, "resampled": False, "shuffle_buffer": 5, **kw}
    ld = make_loader(shards, rank=rank, world_size=world, num_workers=nw, **kw)
    out = []
    for b in ld:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return ld, out


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["pad"], y["pad"])
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])


def test_shard_specs_name_every_kind_of_url(tmp_path, fx):
    local = fx.write_shard_dir(str(tmp_path / "d"), [1, 1, 1])
    d = str(tmp_path / "d")
    assert list_shards(d) == local == list_shards(f"{d}/*.tar") == list_shards(f"{d}/part-{{000000..000002}}.tar")
    http = "http://127.0.0.1:1/ade-{000000..000002}.tar"
    urls = list_shards(f"{http}::pipe:cat {d}/part-{{000000,000001}}.tar,{local[2]}")
    assert urls[:3] == [f"http://127.0.0.1:1/ade-00000{i}.tar" for i in range(3)]
    assert urls[3:] == [f"pipe:cat {d}/part-000000.tar", f"pipe:cat {d}/part-000001.tar", local[2]]
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# train shards\n{http}\n\nd/part-000001.tar\nfile://{local[0]}\n")
    assert list_shards(str(listing)) == [*urls[:3], local[1], local[0]]
    with pytest.raises(FileNotFoundError, match="nope.tar not found"):
        list_shards(str(tmp_path / "nope.tar"))
    assert [shard_name(u) for u in urls] == ["ade-000000.tar", "ade-000001.tar", "ade-000002.tar", *_names(local)]
    assert index_url("https://h:8/a/b/x-000001.tar?sig=1") == "https://h:8/a/b/index.json"
    assert index_url("pipe:aws s3 cp s3://bkt/ade/a-000001.tar -") == "pipe:aws s3 cp s3://bkt/ade/index.json -"
    assert index_url(local[0]) == os.path.join(d, "index.json")


@pytest.mark.timeout(120)
def test_http_and_pipe_stream_the_local_batches_and_resume_across_them(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), COUNTS)
    pipes = [f"pipe:cat {s}" for s in shards]
    with fx.serve_dir(str(tmp_path)) as server:
        http = [f"{server.url}/{n}" for n in _names(shards)]
        assert shard_counts(http) == shard_counts(pipes) == COUNTS  # from index.json, through the same opener
        for kw in (dict(rank=1, world=2, nw=2), dict(rank=0, world=2, nw=0, resampled=True, n=9)):
            _, ref = _batches(shards, **kw)
            _same(_batches(http, **kw)[1], ref)
            _same(_batches(pipes, **kw)[1], ref)
        assert server.requests["index.json"] == 3  # once per loader: not per shard, not per worker

        # a run streaming over HTTP is cut after 3 batches and resumed from pipe: commands
        kw = dict(rank=1, world_size=2, num_workers=2, batch_size=2, image_size=12, seed=5, shuffle_buffer=5)
        ref = list(make_loader(shards, resampled=False, **kw))
        first = make_loader(http, resampled=False, **kw)
        head = [b for _, b in zip(range(3), first)]
        state = first.state_dict()
        assert state["batches"] == 3 and len(state["resume"]) == 2
        for point in state["resume"]:  # where each worker's stream continues: a shard URL and a sample offset
            assert point["url"] in http and 0 <= point["offset"] < COUNTS[http.index(point["url"])]
        resumed = make_loader(pipes, resampled=False, **kw)
        resumed.load_state_dict(state)
        _same(head + list(resumed), ref)
    other = make_loader(shards[:-1], resampled=False, **kw)
    with pytest.raises(ValueError, match="shards_digest"):
        other.load_state_dict(state)


def test_a_missing_index_names_the_url_it_tried(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), [2, 2], index=False)
    with fx.serve_dir(str(tmp_path)) as server:
        url = f"{server.url}/{_names(shards)[0]}"
        with pytest.raises(MissingIndex, match=rf"{server.url}/index\.json.*404.*make_shards"):
            make_loader([url], batch_size=2, image_size=8, rank=0, world_size=1, faults=FAST)
    with pytest.raises(MissingIndex, match=rf"pipe:cat {tmp_path}/index\.json.*exit status 1"):
        read_index(f"pipe:cat {shards[0]}", faults=FAST)
    with pytest.warns(UserWarning, match="scanning"):  # local shards are still counted from their tar headers
        assert shard_counts(shards) == [2, 2]


@pytest.mark.timeout(120)
def test_faults_are_retried_then_skipped_and_counted_with_equal_batch_counts(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), [6, 6, 6, 6, 6, 6])
    names = _names(shards)
    size = os.path.getsize(shards[0])
    faults = {
        names[0]: ("cut", size // 2),  # every connection dropped mid-shard
        names[1]: ("404",),
        names[2]: ("stall", 3000),  # headers and 3000 bytes, then silence
        names[3]: ("flaky", 1, size // 3),  # dropped once, then fine: a retry recovers it
    }
    with fx.serve_dir(str(tmp_path), faults) as server:
        urls = [f"{server.url}/{n}" for n in names]
        per_rank, seen, stats = [], collections.Counter(), collections.Counter()
        with pytest.warns(DataFaultWarning) as caught:
            for rank in (0, 1):
                ld, batches = _batches(urls, rank=rank, world=2, nw=0, batch_size=3, shuffle_buffer=6, faults=FAST)
                per_rank.append(len(batches))
                seen += collections.Counter(k for b in batches for k, p in zip(b["key"], b["pad"]) if not p)
                stats.update(ld.stats)
        requests = dict(server.requests)
    assert per_rank == [6, 6], "a rank that loses shards still yields its share of batches"
    assert {k.split("_")[0] for k in seen} <= {"s0", "s3", "s4", "s5"} and set(seen.values()) == {1}
    assert {f"s{k}_{i}" for k in (3, 4, 5) for i in range(6)} <= set(seen), "the flaky shard was recovered"
    assert requests[names[1]] == requests[names[2]] == 3 and requests[names[3]] == 2
    assert stats["skipped_shards"] == 3 and stats["timeouts"] == 3 and stats["retries"] == 2 * 3 + 1, stats
    text = "\n".join(str(w.message) for w in caught)
    assert f"skipped {urls[1]} after 3 attempts (exit status 22: curl: (22)" in text
    assert f"{urls[2]}: no data for 1 s (stalled)" in text and f"skipped {urls[0]}" in text


@pytest.mark.timeout(60)
def test_a_failing_pipe_command_is_an_error_naming_it(tmp_path, fx):
    shards = fx.write_shard_dir(str(tmp_path), [4])
    ok = f"pipe:cat {shards[0]}"
    assert [k for k, _ in iter_samples(ok, start=1)] == ["s0_1", "s0_2", "s0_3"]
    late = f"pipe:cat {shards[0]}; exit 3"  # all the data, then a failure: the last sample is not trusted
    with pytest.raises(StreamError, match="exit 3.*exit status 3"):
        list(iter_samples(late))
    got = []
    with pytest.raises(StreamError):
        for key, _ in iter_samples(late):
            got.append(key)
    assert got == ["s0_0", "s0_1", "s0_2"]
    with pytest.raises(StreamError, match="exit status 1: cat: .*missing.tar"):
        list(iter_samples(f"pipe:cat {tmp_path}/missing.tar"))
    with pytest.raises(StreamError, match="no data for 0.3 s"):
        list(iter_samples(f"pipe:sleep 30; cat {shards[0]}", timeout=0.3))


@pytest.mark.timeout(60)
def test_fault_counts_reach_tensorboard(tmp_path, fx):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    shards = fx.write_shard_dir(str(tmp_path / "d"), [3, 3])
    urls = [f"pipe:cat {s}" for s in shards]
    os.remove(shards[1])  # still listed in index.json: the loader plans with it, then cannot read it
    logs = str(tmp_path / "tb")
    ld = make_loader(urls, batch_size=2, image_size=8, rank=0, world_size=1, resampled=False, faults=FAST, log_dir=logs)
    with pytest.warns(DataFaultWarning, match="part-000001.tar"):
        batches = list(ld)
    assert len(batches) == 3 and ld.stats["skipped_shards"] == 1
    ld.faults.close()
    acc = event_accumulator.EventAccumulator(glob.glob(f"{logs}/data_rank0")[0])
    acc.Reload()
    assert acc.Scalars("data/skipped_shards")[-1].value == 1.0
    assert acc.Scalars("data/retries")[-1].value == FAST.retries


def test_a_given_up_shard_is_not_retried_during_its_cooldown(tmp_path):
    sleeps, events = [], []
    policy = FaultPolicy(retries=2, backoff=0.5, timeout=1.0, cooldown=60.0)
    cursor = ShardCursor(policy, lambda kind, **f: events.append((kind, f)), sleep=sleeps.append)
    url = f"pipe:cat {tmp_path}/missing.tar"
    assert cursor.read(url, 0, 3, expected=3) == [None] * 3
    assert sleeps == [0.5, 1.0] and [k for k, _ in events] == ["retry", "retry", "skipped_shard"]
    assert events[-1][1]["attempts"] == 3 and "exit status 1" in events[-1][1]["error"]
    assert cursor.read(url, 0, 2, expected=3) == [None] * 2  # within the cooldown: skipped at once
    assert sleeps == [0.5, 1.0] and "skipped again" in events[-1][1]["error"]
    again = ShardCursor(FaultPolicy(retries=0, cooldown=0.0), lambda kind, **f: events.append((kind, f)))
    assert again.read(url, 0, 1, expected=3) == [None] and again.read(url, 0, 1, expected=3) == [None]
    assert [f.get("attempts") for k, f in events[-2:]] == [1, 1]  # no cooldown: each read tries once more
