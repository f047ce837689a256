"""in_slices: CPU inference in slices of CPU_SLICE gives what one call over the whole batch gives."""

import torch

from svq_fast.models.slices import CPU_SLICE, in_slices


def test_slices_match_the_whole_batch_and_keep_tuples():
    x, y = torch.randn(2 * CPU_SLICE + 5, 3), torch.randn(2 * CPU_SLICE + 5, 3)
    seen = []

    def fn(a, b):
        seen.append(a.shape[0])
        return a + b, (a * b).sum(1)

    whole = fn(x, y)
    seen.clear()
    parts = in_slices(fn, x, y)
    assert seen == [CPU_SLICE, CPU_SLICE, 5]
    assert all(torch.equal(p, w) for p, w in zip(parts, whole))
    assert torch.equal(in_slices(lambda a: a * 2, x), x * 2)  # a single tensor out stays a tensor
    seen.clear()
    in_slices(fn, x[:CPU_SLICE], y[:CPU_SLICE])
    assert seen == [CPU_SLICE]  # a batch that fits goes in one call
