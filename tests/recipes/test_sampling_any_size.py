"""The any-size experiment's instruments (recipes/experiments/sampling_any_size.py): the 64x64 pieces and the seam
measure, on images made to have (or not have) a seam where the windows change."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "experiments"))

from sampling_any_size import pieces, seam_stats  # noqa: E402

from svq_fast.eval.sliding_window import window_starts  # noqa: E402


def test_pieces_are_the_quarters_row_major():
    x = torch.arange(2 * 128 * 128, dtype=torch.float32).view(2, 1, 128, 128)
    p = pieces(x)
    assert p.shape == (8, 1, 64, 64)
    assert (
        torch.equal(p[1], x[0, :, :64, 64:])
        and torch.equal(p[2], x[0, :, 64:, :64])
        and torch.equal(p[7], x[1, :, 64:, 64:])
    )


def test_the_seam_measure_sees_a_step_at_the_window_changes_only():
    g, f, stride, n = 16, 4, 8, 32
    torch.manual_seed(0)
    smooth = torch.rand(4, 3, 128, 128) * 0.2 - 0.1  # images in [-1, 1]: iid noise, no seams
    plain = seam_stats(smooth, (n, n), g, stride, f)
    assert 0.95 < plain["ratio_vs_all_pairs"] < 1.05 and 0.95 < plain["ratio_vs_token_boundaries"] < 1.05
    # add a brightness step at every pixel column / row where the window changes
    seamed = smooth.clone()
    starts = window_starts(n, g, stride)
    for j in range(1, n):
        if starts[j] != starts[j - 1]:
            seamed[..., :, j * f :] += 0.3
            seamed[..., j * f :, :] += 0.3
    seamed = seamed.clamp(-1, 1)
    stats = seam_stats(seamed, (n, n), g, stride, f)
    assert stats["ratio_vs_all_pairs"] > 2 and stats["ratio_vs_token_boundaries"] > 2
    # the same step at a token boundary next to a window change (not one itself) does not count as a seam
    other = smooth.clone()
    other[..., :, 12 * f :] += 0.3
    assert starts[12] == starts[11] and starts[13] != starts[12]
    assert seam_stats(other.clamp(-1, 1), (n, n), g, stride, f)["ratio_vs_token_boundaries"] < 1
