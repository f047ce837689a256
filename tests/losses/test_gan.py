import torch

from svq_fast.losses.gan import adaptive_weight, hinge_d_loss


def test_adaptive_weight_matches_autograd_on_the_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 3, 3, padding=1)
    hidden = torch.randn(2, 6, 8, 8, requires_grad=True)
    x_hat = conv(hidden)
    target = torch.randn(2, 3, 8, 8)
    rec = (x_hat - target).abs().mean()
    adv = -(x_hat * torch.randn_like(x_hat)).mean()
    g_rec = torch.autograd.grad(rec, conv.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, conv.weight, retain_graph=True)[0]
    expected = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4)
    got = adaptive_weight(rec, adv, x_hat, hidden, conv.weight.shape)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-6)


def test_hinge_loss_zero_when_separated():
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)) == 1.0


def test_non_saturating_losses_and_unknown_kind():
    import pytest

    from svq_fast.losses.gan import discriminator_loss, generator_adv_loss

    real, fake = torch.full((4,), 3.0), torch.full((4,), -3.0)
    sp = torch.nn.functional.softplus
    torch.testing.assert_close(discriminator_loss(real, fake, "non_saturating"), sp(torch.tensor(-3.0)))
    torch.testing.assert_close(generator_adv_loss(fake, "non_saturating"), sp(torch.tensor(3.0)))
    assert generator_adv_loss(fake, "hinge") == 3.0
    with pytest.raises(ValueError, match="GAN loss"):
        discriminator_loss(real, fake, "wgan")


def test_lecam_penalty_only_beyond_the_running_means():
    from svq_fast.losses.gan import lecam_penalty

    # real logits below the fake running mean and fake logits above the real one: no penalty
    assert lecam_penalty(torch.full((4,), -1.0), torch.full((4,), 1.0), torch.tensor(0.0), torch.tensor(0.0)) == 0
    # real 2 above the fake mean 0, fake 1 below the real mean 0: 2^2 + 1^2
    got = lecam_penalty(torch.full((4,), 2.0), torch.full((4,), -1.0), torch.tensor(0.0), torch.tensor(0.0))
    assert got == 5.0
