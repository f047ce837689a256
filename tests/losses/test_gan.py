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
