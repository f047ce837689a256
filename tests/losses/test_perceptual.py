import pytest
import torch
import torchvision

from svq_fast.losses.perceptual import LPIPSLoss, build_perceptual


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision vgg16 checkpoint with random weights (the real one cannot be downloaded here)."""
    path = tmp_path_factory.mktemp("w") / "vgg16.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    return str(path)


def test_loads_backbone_from_local_file(vgg_file):
    loss = LPIPSLoss(vgg_file)
    sd = torch.load(vgg_file, weights_only=True)
    torch.testing.assert_close(loss.model.net.slice3.state_dict()["10.weight"], sd["features.10.weight"])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).abs() < 1e-6
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
    d = loss(x, y)
    assert torch.isfinite(d) and d > 0
    d.backward()
    assert y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_missing_backbone_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="vgg16"):
        LPIPSLoss(str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth.*is not a file"):
        build_perceptual(1.0, str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="lpips_vgg_path \\(unset\\)"):
        build_perceptual(1.0, "")
    assert build_perceptual(0.0, "") is None


def test_wrong_checkpoint_is_named(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        LPIPSLoss(str(bad))
