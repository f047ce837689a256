"""losses/reconstruction.py:texture_loss: blur costs, a phase shift of the pattern costs little, and the option is
wired into stage 1's image terms and validated."""

import pytest
import torch
import torch.nn.functional as F

from svq_fast.config import ConfigError, apply_overrides
from svq_fast.losses.reconstruction import texture_loss
from svq_fast.named_configs import svqgan_tiny


def _stripes(phase: float, size: int = 32) -> torch.Tensor:
    xx = torch.arange(size).float().expand(size, size)
    return torch.sign(torch.sin(2 * torch.pi * 0.25 * xx + phase)).expand(1, 3, size, size) * 0.5


def test_blur_costs_and_a_phase_shift_does_not():
    x = _stripes(0.3)
    blurred = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    shifted = _stripes(0.3 + torch.pi)  # half a period: the worst case for L1
    assert texture_loss(x, x) == 0
    assert texture_loss(blurred, x) > 0.2
    assert texture_loss(shifted, x) < 0.02 < (shifted - x).abs().mean()
    assert (blurred - x).abs().mean() < (shifted - x).abs().mean()  # L1 prefers the blur; texture_loss does not


def test_gradient_raises_the_texture_of_a_flat_reconstruction():
    x = _stripes(0.3)
    x_hat = (torch.zeros_like(x) + 0.01 * torch.randn_like(x)).requires_grad_(True)
    before = texture_loss(x_hat, x)
    before.backward()
    with torch.no_grad():
        stepped = x_hat - 0.05 * x_hat.grad / x_hat.grad.abs().mean()
    assert texture_loss(stepped, x) < before


def test_window_must_divide_the_image():
    with pytest.raises(ValueError, match="window=3"):
        texture_loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), window=3)
    with pytest.raises(ConfigError, match="loss.texture_window=5"):
        apply_overrides(svqgan_tiny(), ["--loss.texture_weight=1", "--loss.texture_window=5"])


def test_stage1_adds_the_weighted_term_to_the_image_loss():
    from svq_fast.models.svq import SVQModel
    from svq_fast.train.stage1 import Stage1

    torch.manual_seed(0)
    cfg = svqgan_tiny()
    cfg.model.ch, cfg.loss.gan, cfg.loss.texture_weight = 16, False, 0.0
    model = SVQModel(cfg.model, cfg.quantizer)
    stage = Stage1.__new__(Stage1)  # only image_terms: no engines, loader or discriminator needed
    stage.cfg, stage.model, stage.perceptual, stage.disc, stage.dev = cfg, model, None, None, torch.device("cpu")
    stage.image_class_weight = None
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    out = {"x_hat": torch.tanh(torch.randn(2, 3, 64, 64)).requires_grad_(True)}
    _, plain, logs = stage.image_terms(out, x, None, step=0)
    assert "texture" not in logs
    cfg.loss.texture_weight = 2.0
    _, with_texture, logs = stage.image_terms(out, x, None, step=0)
    expected = logs["rec"].item() + 2.0 * texture_loss(out["x_hat"], x).item()  # logs are device tensors
    assert logs["texture"].item() > 0 and with_texture.item() == pytest.approx(expected, rel=1e-5)
    assert with_texture.item() == pytest.approx(plain.item() + 2.0 * logs["texture"].item(), rel=1e-5)
