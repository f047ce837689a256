"""Streaming metric states: batch-by-batch and merged results equal one-shot ones, and two gloo ranks give the
single-process result."""

import math
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from svq_fast.eval.metrics import (
    CodebookUsage,
    FeatureStats,
    MeanStat,
    confusion_update,
    per_class_stats,
)
from svq_fast.eval.miou import ConfusionMatrix

C = 5


def _data(seed=0, n=23):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, (n, 6, 7), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    pred = torch.where(
        torch.rand(target.shape, generator=g) < 0.6,
        target.clamp_max(C - 1),
        torch.randint(0, C, target.shape, generator=g),
    )
    pred[:, 0, 0] = 0
    values = torch.rand(n, generator=g, dtype=torch.float64)
    feats = torch.randn(n, 4, generator=g, dtype=torch.float64) * 3 + 10
    codes = torch.randint(0, 11, (n, 3, 3), generator=g)
    return pred, target, values, feats, codes


def _states():
    return ConfusionMatrix(C), MeanStat(), FeatureStats(4), CodebookUsage(16)


def _update(states, pred, target, values, feats, codes, keep):
    cm, mean, fs, cu = states
    confusion_update(cm, pred, target, keep)
    mean.update(values[keep])
    fs.update(feats[keep])
    cu.update(codes[keep])


def _summary(states):
    cm, mean, fs, cu = states
    return {
        "mat": cm.mat.clone(),
        "miou": cm.miou(),
        "mean": mean.mean(),
        "std": mean.std(),
        "n": mean.count,
        "mu": fs.mean(),
        "cov": fs.cov(),
        "codes": cu.counts.clone(),
        "perplexity": cu.perplexity(),
    }


def _assert_same(a, b):
    assert torch.equal(a["mat"], b["mat"]) and torch.equal(a["codes"], b["codes"]) and a["n"] == b["n"]
    assert a["miou"] == pytest.approx(b["miou"], rel=1e-12)
    assert a["mean"] == pytest.approx(b["mean"], rel=1e-12) and a["std"] == pytest.approx(b["std"], rel=1e-9)
    np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-12)
    np.testing.assert_allclose(a["cov"], b["cov"], rtol=1e-10)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-12)


def _one_shot(pred, target, values, feats, codes, keep):
    st = _states()
    _update(st, pred, target, values, feats, codes, keep)
    return _summary(st)


def test_streamed_batches_with_padding_equal_one_shot():
    pred, target, values, feats, codes = _data()
    n = pred.shape[0]
    pad = torch.zeros(n, dtype=torch.bool)
    pad[-3:] = True  # padded repeats at the end of an exact epoch: must not count
    full = _one_shot(pred, target, values, feats, codes, ~pad)
    st = _states()
    for lo in range(0, n, 4):
        sl = slice(lo, lo + 4)
        _update(st, pred[sl], target[sl], values[sl], feats[sl], codes[sl], ~pad[sl])
    _assert_same(_summary(st), full)
    # and the padded samples do change the result when counted (the test would see a missed mask)
    assert not torch.equal(
        _one_shot(pred, target, values, feats, codes, torch.ones(n, dtype=torch.bool))["mat"], full["mat"]
    )
    # independent checks of the one-shot values
    keep = ~pad
    assert full["mean"] == pytest.approx(float(values[keep].mean()))
    assert full["std"] == pytest.approx(float(values[keep].std()))
    np.testing.assert_allclose(full["cov"], np.cov(feats[keep].numpy(), rowvar=False), rtol=1e-10)


def test_merged_partitions_equal_one_shot():
    pred, target, values, feats, codes = _data(1)
    keep = torch.ones(pred.shape[0], dtype=torch.bool)
    full = _one_shot(pred, target, values, feats, codes, keep)
    parts = []
    for sl in (slice(0, 9), slice(9, 10), slice(10, None)):
        st = _states()
        _update(st, pred[sl], target[sl], values[sl], feats[sl], codes[sl], keep[sl])
        parts.append(st)
    merged = _states()
    for st in reversed(parts):  # merge order does not matter (up to round-off)
        for m, s in zip(merged, st):
            if isinstance(m, ConfusionMatrix):
                m.mat += s.mat
            else:
                m.merge(s)
    _assert_same(_summary(merged), full)


def test_codebook_usage_and_per_class():
    cu = CodebookUsage(8)
    cu.update(torch.arange(8).repeat(3))
    assert cu.used_fraction() == 1.0 and cu.perplexity() == pytest.approx(8.0)
    one = CodebookUsage(8)
    one.update(torch.full((5,), 3))
    assert one.used() == 1 and one.perplexity() == pytest.approx(1.0)
    two = CodebookUsage(4)
    two.update(torch.tensor([0, 0, 0, 1]))
    p = np.array([0.75, 0.25])
    assert two.perplexity() == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    with pytest.raises(ValueError, match="outside"):
        two.update(torch.tensor([4]))

    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, 255]]))
    rows = per_class_stats(cm, ["a", "b", "c"])
    assert [r["class"] for r in rows] == ["a", "b", "c"]
    assert rows[0]["gt_pixel_share"] == pytest.approx(2 / 3) and rows[0]["recall"] == pytest.approx(0.5)
    assert rows[1]["iou"] == pytest.approx(0.5) and math.isnan(rows[2]["iou"]) and math.isnan(rows[2]["recall"])


def test_without_process_group_all_reduce_is_identity():
    pred, target, values, feats, codes = _data(2)
    st = _states()
    _update(st, pred, target, values, feats, codes, torch.ones(pred.shape[0], dtype=torch.bool))
    before = _summary(st)
    cm, mean, fs, cu = st
    cm.all_reduce(), mean.all_reduce(), fs.all_reduce(), cu.all_reduce()
    _assert_same(_summary(st), before)


def _rank_main(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        pred, target, values, feats, codes = _data(3)
        n = pred.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        lo, hi = (0, 15) if rank == 0 else (15, n)  # uneven shares
        st = _states()
        _update(st, pred[lo:hi], target[lo:hi], values[lo:hi], feats[lo:hi], codes[lo:hi], keep[lo:hi])
        cm, mean, fs, cu = st
        cm.all_reduce(), mean.all_reduce(), fs.all_reduce(), cu.all_reduce()
        torch.save(_summary(st), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    ctx = mp.spawn(_rank_main, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=False)
    for _ in range(120):  # at most 120 s
        if ctx.join(timeout=1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail("the two gloo ranks did not finish in 120 s")
    pred, target, values, feats, codes = _data(3)
    full = _one_shot(pred, target, values, feats, codes, torch.ones(pred.shape[0], dtype=torch.bool))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    _assert_same(r0, full)
    _assert_same(r1, full)
    np.testing.assert_array_equal(r0["cov"], r1["cov"])  # every rank holds bit-identical results
