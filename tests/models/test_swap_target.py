"""The recoloured latent-swap target: layout and texture of the sample, per-class mean colours of the z_x donor."""

import torch

from svq_fast.models.svq.swap_target import class_mean_colours, recoloured_swap_target
from svq_fast.named_configs import svqgan_tiny
from svq_fast.train.stage1 import Stage1

C, IGNORE = 4, 255


def scenes():
    """Two 8x8 scenes, each the other's z_x donor under roll(1, 0): sample 0 has classes {0, 1, 2} and an ignored row,
    sample 1 has classes {0, 1, 3}; small textures around per-class base colours."""
    g = torch.Generator().manual_seed(0)
    s = torch.zeros(2, 8, 8, dtype=torch.long)
    s[0, :, 4:], s[0, 6:, :] = 1, 2
    s[0, 0] = IGNORE
    s[1, 4:, :], s[1, :2, :2] = 1, 3
    base = torch.tensor(
        [
            [[0.1, -0.2, 0.3], [-0.4, 0.5, 0.0], [0.2, 0.2, -0.6], [0.0, 0.0, 0.0]],
            [[-0.3, 0.1, 0.1], [0.3, -0.1, 0.2], [0.0, 0.0, 0.0], [0.6, -0.5, 0.4]],
        ]
    )  # (B, C, 3)
    index = s.clamp_max(C - 1).flatten(1).unsqueeze(-1).expand(-1, -1, 3)  # (B, HW, 3); ignored pixels: class 3's
    x = base.gather(1, index).transpose(1, 2).reshape(2, 3, 8, 8)
    return x + 0.05 * torch.randn(2, 3, 8, 8, generator=g), s


def test_class_mean_colours_match_a_per_class_loop_and_skip_ignored_pixels():
    x, s = scenes()
    means, counts = class_mean_colours(x, s, C, IGNORE)
    for b in range(2):
        for c in range(C):
            mask = s[b] == c
            assert counts[b, c] == int(mask.sum())
            if mask.any():
                torch.testing.assert_close(means[b, c], x[b][:, mask].mean(1))
            else:
                assert torch.equal(means[b, c], torch.zeros(3))
    assert counts.sum() == (s != IGNORE).sum()


def test_recoloured_target_takes_the_donors_class_colours_and_keeps_the_rest():
    x, s = scenes()
    target = recoloured_swap_target(x, s, torch.tensor([True, False]), C, IGNORE)
    assert torch.equal(target[1], x[1])  # not swapped: its own image
    own, _ = class_mean_colours(x, s, C, IGNORE)
    new, _ = class_mean_colours(target, s, C, IGNORE)
    donor = own[1]  # sample 0's donor is sample 1 (roll(1, 0) of a batch of two)
    for c in (0, 1):  # in both maps: the donor's mean colour, the sample's own texture around it
        torch.testing.assert_close(new[0, c], donor[c])
        mask = s[0] == c
        torch.testing.assert_close(target[0][:, mask] - new[0, c, :, None], x[0][:, mask] - own[0, c, :, None])
    keep = (s[0] == 2) | (s[0] == IGNORE)  # a class the donor lacks, and ignored pixels: unchanged
    assert torch.equal(target[0][:, keep], x[0][:, keep])


def test_recoloured_target_stays_in_the_image_range_and_dtype():
    x, s = scenes()
    x[1] += 0.9  # the donor is much brighter: shifted colours would leave [-1, 1]
    target = recoloured_swap_target(x.clamp(-1, 1).bfloat16(), s, torch.tensor([True, True]), C, IGNORE)
    assert target.dtype == torch.bfloat16
    assert float(target.max()) <= 1.0 and float(target.min()) >= -1.0


def test_stage1_image_terms_compare_with_the_swap_target_when_the_forward_returns_one():
    cfg = svqgan_tiny()
    cfg.loss.gan = False
    stage = Stage1.__new__(Stage1)  # only image_terms: no engines, loader or discriminator needed
    stage.cfg, stage.model, stage.perceptual, stage.disc, stage.dev = cfg, None, None, None, torch.device("cpu")
    stage.image_class_weight = None
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    out = {"x_hat": target.clone().requires_grad_(True)}
    _, against_x, _ = stage.image_terms(out, x, None, step=0)
    _, against_target, _ = stage.image_terms(dict(out, x_target=target), x, None, step=0)
    assert float(against_x) > 0.1 and float(against_target) == 0.0
