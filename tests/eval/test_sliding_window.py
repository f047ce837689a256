"""Sliding-window sampling over latent grids larger than the GPT's (svq_fast/eval/sliding_window.py), with tiny
random-weight GPTs on a 4x4 training grid."""

import pytest
import torch

from svq_fast.config import GPTConfig
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.eval.sliding_window import sample_image_tokens_window, window_cost, window_starts
from svq_fast.models.gpt import SemanticGPT


def _gpt(**kw):
    cfg = GPTConfig(image_vocab=30, semantic_vocab=10, grid=4, n_layer=2, n_head=2, n_embd=32, attn_backend="sdpa")
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    m = SemanticGPT(cfg).double().eval()
    with torch.no_grad():  # a condition that moves the logits (at init, std 0.02, it hardly does)
        m.sem_emb.weight.mul_(50)
        if m.aligned_emb is not None:
            m.aligned_emb.weight.mul_(50)
    return m


def test_window_starts_taming_placement_at_stride_1_and_nearest_centre_otherwise():
    # stride 1: a window centred on every token, clamped to the grid (taming's i - g // 2)
    assert window_starts(10, 4, 1) == [max(0, min(i - 2, 6)) for i in range(10)]
    # stride 8 on 32 latents, window 16: windows at 0, 8, 16; ties go to the earlier window
    starts = window_starts(32, 16, 8)
    assert starts == [0] * 13 + [8] * 8 + [16] * 11
    local = [i - a for i, a in enumerate(starts)]
    assert min(local[13:21]) == 5 and max(local[:21]) == 12  # away from the borders: 5..12 of 16
    assert window_starts(16, 16, 8) == [0] * 16
    assert window_starts(20, 16, 8) == [0] * 11 + [4] * 9  # the last window always ends at the grid's end
    with pytest.raises(ValueError, match="smaller than the GPT's window"):
        window_starts(12, 16, 8)
    # stride = window (tiles): token 16 is at the first window's centre distance too, but only the second holds it
    assert window_starts(32, 16, 16) == [0] * 16 + [16] * 16
    for n, g, stride in [(32, 16, 16), (37, 16, 8), (20, 4, 3), (9, 4, 4), (64, 16, 5)]:
        assert all(a <= i < a + g for i, a in enumerate(window_starts(n, g, stride)))


def test_window_cost_counts_each_window_once():
    c = window_cost(32, 32, 16)
    assert c["windows"] == 9 and c["live_windows"] == 3
    assert c["positions"] <= 9 * 512
    assert c["recompute_positions"] > 80 * c["positions"]
    assert window_cost(16, 16, 16) == {
        "windows": 1,
        "positions": 256 + 255,
        "live_windows": 1,
        "recompute_positions": 256 * 256 + 255 * 256 // 2,
        "stride": 8,
    }


@pytest.mark.parametrize("aligned", [False, True])
def test_training_size_grid_gives_exactly_the_plain_sampler_tokens(aligned):
    m = _gpt(aligned_condition=aligned)
    sem = torch.randint(0, 10, (3, 16))
    kw = dict(temperature=1.0, top_k=20, guidance_scale=1.5)
    a = sample_image_tokens(m, sem, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_image_tokens_window(m, sem, (4, 4), generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "shape, stride, prefix_lm",
    [((8, 8), None, False), ((4, 8), None, True), ((6, 9), 1, False), ((6, 9), None, True), ((8, 8), 4, False)],
)
def test_cached_windows_equal_per_token_recomputation(shape, stride, prefix_lm):
    m = _gpt(aligned_condition=True, prefix_lm=prefix_lm)
    h, w = shape
    sem = torch.randint(0, 10, (2, h * w))
    kw = dict(temperature=1.0, top_k=0, top_p=0.9, guidance_scale=2.0, stride=stride)
    a = sample_image_tokens_window(m, sem, shape, generator=torch.Generator().manual_seed(4), **kw)
    b = sample_image_tokens_window(m, sem, shape, generator=torch.Generator().manual_seed(4), use_cache=False, **kw)
    assert torch.equal(a, b)
    assert a.shape == (2, h * w) and a.max() < 30


def test_a_token_sees_only_its_window():
    """Rows 0..2 of an 8x8 grid are drawn in windows of rows 0..3 (stride 2): a semantic token in the last row,
    outside all of them, cannot change them; one inside (at a drawn token's own cell) does."""
    m = _gpt(aligned_condition=True)
    with torch.no_grad():  # attention far from uniform, so that one prefix token moves the logits
        for p in m.blocks.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    h = w = 8
    sem = torch.randint(0, 10, (4, h * w))
    far, near = sem.clone(), sem.clone()
    far[:, (h - 1) * w + 3] = (far[:, (h - 1) * w + 3] + 1) % 10
    near[:, 1 * w + 1] = (near[:, 1 * w + 1] + 1) % 10
    n = 3 * w

    def run(s):
        return sample_image_tokens_window(m, s, (h, w), num_tokens=n, generator=torch.Generator().manual_seed(0))

    base = run(sem)
    assert torch.equal(run(far), base)
    assert not torch.equal(run(near), base)
    assert (base[:, n:] == 0).all()  # num_tokens stops early


def test_bad_shapes_are_named():
    m = _gpt()
    with pytest.raises(ValueError, match="semantic tokens for a 8x8 grid"):
        sample_image_tokens_window(m, torch.zeros(1, 60, dtype=torch.long), (8, 8))
    with pytest.raises(ValueError, match="smaller than the GPT's window"):
        sample_image_tokens_window(m, torch.zeros(1, 24, dtype=torch.long), (3, 8))
