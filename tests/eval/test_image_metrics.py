"""SSIM against scikit-image's reference implementation, PSNR by hand, 8-bit rounding, and the LPIPS metric with a
random VGG-16 backbone saved to a temporary file."""

import numpy as np
import pytest
import torch

from svq_fast.eval.image_metrics import LPIPSMetric, psnr, quantize_uint8, ssim


def _fixed_images():
    """Two deterministic RGB pairs in [-1, 1]: smooth structure + texture, and a noisy, shifted copy."""
    h, w = 40, 52
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([np.sin(xx / 5.0) * np.cos(yy / 7.0), (xx - yy) / (h + w), np.cos((xx + 2 * yy) / 4.0)])
    rng = np.random.default_rng(0)
    a = np.stack([base, 0.5 * base[::-1]])  # (2, 3, h, w)
    b = a + rng.normal(0, 0.25, a.shape)
    b[:, :, :, 3:] = b[:, :, :, :-3]  # a small shift as well
    to = lambda v: torch.from_numpy(np.clip(v, -1, 1))  # noqa: E731
    return to(a), to(b)


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    x, y = _fixed_images()
    ours = ssim(x, y)
    assert ours.shape == (2,) and ours.dtype == torch.float64
    for i in range(2):
        ref = structural_similarity(
            ((x[i].numpy() + 1) / 2),
            ((y[i].numpy() + 1) / 2),
            channel_axis=0,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-9)
    assert 0.05 < float(ours.min()) < 0.95  # a non-trivial pair (the test would notice a constant result)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_ssim_rejects_tiny_or_mismatched_images():
    with pytest.raises(ValueError, match="too small"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shape"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 17))


def test_psnr_by_hand():
    x, y = _fixed_images()
    mse = (((x + 1) / 2 - (y + 1) / 2) ** 2).mean((1, 2, 3))
    assert torch.allclose(psnr(x, y), 10 * torch.log10(1 / mse), rtol=1e-6)  # torchmetrics: float32 log(10)
    assert torch.isinf(psnr(x, x)).all()


def test_quantize_uint8_is_the_png_grid():
    x = torch.rand(2, 3, 8, 8) * 2.4 - 1.2
    q = quantize_uint8(x)
    levels = (q + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4) and q.min() >= -1 and q.max() <= 1
    assert (q - x.clamp(-1, 1)).abs().max() <= 1 / 255 + 1e-6
    u8 = torch.randint(0, 256, (1, 3, 4, 4)).float()
    as_loaded = u8 / 127.5 - 1  # how the shard loader produces images
    assert torch.equal(((quantize_uint8(as_loaded) + 1) * 127.5).round(), u8)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """torchvision's vgg16 `features.*` tensors with random weights (the classifier is not needed by LPIPS)."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    feats = make_layers(cfgs["D"], batch_norm=False)
    path = tmp_path_factory.mktemp("vgg") / "random_vgg16.pth"
    torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, path)
    return str(path)


def test_lpips_per_image_with_random_backbone(vgg_file):
    from svq_fast.losses.perceptual import load_vgg_backbone

    metric = LPIPSMetric(vgg_file)  # (builds torchvision's whole vgg16 inside lpips: slow, so only once)
    assert not metric.training
    x, y = (t.float() for t in _fixed_images())
    d = metric(x, y)
    assert d.shape == (2,) and torch.isfinite(d).all() and (d > 0).all()
    assert torch.allclose(metric(x, x), torch.zeros(2, dtype=torch.float64), atol=1e-7)
    assert torch.allclose(metric(x[1:], y[1:]), d[1:], rtol=1e-4)  # per image: independent of the batch
    assert float(d.mean()) == pytest.approx(float(metric.loss(x, y)), rel=1e-5)  # LPIPSLoss is their mean
    # the backbone really is the file's: other random weights give other distances
    from torchvision.models.vgg import cfgs, make_layers

    alt = vgg_file + ".other.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, alt)
    load_vgg_backbone(metric.loss.model, alt)
    assert not torch.allclose(metric(x, y), d)


def test_lpips_missing_backbone_names_the_path(tmp_path):
    missing = tmp_path / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        LPIPSMetric(str(missing))
