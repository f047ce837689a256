"""PatchGAN losses (hinge or non-saturating), LeCam regularisation and taming's adaptive discriminator weight,
computed ZeRO-safely.

The adaptive weight is ||dL_rec/dW|| / ||dL_adv/dW|| at the image decoder's last conv weight W. Asking
autograd for dL/dW breaks under ZeRO-3 (W is partitioned outside forward). Instead we take the gradients
w.r.t. the decoder output x_hat (a plain activation) and form dL/dW = conv2d_weight(h, grad_out), where h is
the conv's input activation: exact, and independent of how W is stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_LOSSES = ("hinge", "non_saturating")


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """hinge (VQGAN) or non-saturating logistic (Goodfellow et al.; StyleGAN): softplus(-D(x)) + softplus(D(x_hat))."""
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "non_saturating":
        return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def generator_adv_loss(logits_fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial term: -D(x_hat) with the hinge loss, softplus(-D(x_hat)) non-saturating."""
    if kind == "hinge":
        return -logits_fake.float().mean()
    if kind == "non_saturating":
        return F.softplus(-logits_fake.float()).mean()
    raise ValueError(f"GAN loss must be one of {GAN_LOSSES}, got {kind!r}")


def lecam_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real, ema_fake) -> torch.Tensor:
    """LeCam regularisation (Tseng et al. 2021): keeps D(x) near the running mean of D(x_hat) and vice versa,
    ||relu(D(x) - ema_fake)||^2 + ||relu(ema_real - D(x_hat))||^2, so a discriminator trained on little data
    cannot push its logits apart without bound (which starves the generator of useful gradient)."""
    real, fake = logits_real.float(), logits_fake.float()
    return F.relu(real - ema_fake).pow(2).mean() + F.relu(ema_real - fake).pow(2).mean()


def conv_weight_grad(hidden: torch.Tensor, grad_out: torch.Tensor, weight_shape, padding: int) -> torch.Tensor:
    """dL/dW of y = conv2d(hidden, W) given dL/dy; hidden (B, Cin, H, W), grad_out (B, Cout, H, W)."""
    return torch.nn.grad.conv2d_weight(hidden.float(), tuple(weight_shape), grad_out.float(), padding=padding)


def adaptive_weight(
    rec_loss: torch.Tensor,
    adv_loss: torch.Tensor,
    x_hat: torch.Tensor,
    hidden: torch.Tensor,
    weight_shape,
    *,
    padding: int = 1,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """taming's d_weight = ||grad rec|| / (||grad adv|| + 1e-4), clamped to [0, max]; returns a detached scalar.

    rec_loss, adv_loss: scalars that depend on x_hat (B, 3, H, W), the output of the conv whose input is `hidden`.
    """
    g_rec = torch.autograd.grad(rec_loss, x_hat, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, x_hat, retain_graph=True)[0]
    n_rec = conv_weight_grad(hidden.detach(), g_rec, weight_shape, padding).norm()
    n_adv = conv_weight_grad(hidden.detach(), g_adv, weight_shape, padding).norm()
    return (n_rec / (n_adv + 1e-4)).clamp(0.0, max_weight).detach()
