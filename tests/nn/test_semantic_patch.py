import pytest
import torch
import torch.nn.functional as F

from svq_fast.nn.semantic_patch import SemanticPatchEmbed


def onehot_patch_conv(module: SemanticPatchEmbed, labels: torch.Tensor) -> torch.Tensor:
    """The definition: Conv2d(C, out, f, stride=f, bias=False) over onehot(labels), ignore pixels all-zero."""
    c, f = module.num_classes, module.factor
    valid = labels != module.ignore_index
    onehot = F.one_hot(labels.clamp(0, c - 1), c).permute(0, 3, 1, 2).float() * valid[:, None]  # (B, C, H, W)
    rows = module.weight[:-1]  # (C * f * f, out): row class * f^2 + i * f + j
    kernel = rows.view(c, f, f, -1).permute(3, 0, 1, 2)  # (out, C, f, f)
    return F.conv2d(onehot, kernel, stride=f)


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_equals_onehot_patch_conv_in_output_and_weight_gradient(factor):
    torch.manual_seed(0)
    m = SemanticPatchEmbed(5, 6, factor, ignore_index=255)
    labels = torch.randint(0, 5, (2, 8, 12))
    labels[0, :3, :5] = 255  # ignore pixels, some filling whole patches
    out = m(labels)
    assert out.shape == (2, 6, 8 // factor, 12 // factor)
    g = torch.randn_like(out)
    (grad_fused,) = torch.autograd.grad(out, m.weight, g)
    ref = onehot_patch_conv(m, labels)
    (grad_ref,) = torch.autograd.grad(ref, m.weight, g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_fused, grad_ref, rtol=1e-5, atol=1e-6)
    assert grad_fused[-1].abs().sum() == 0  # the padding row that ignore pixels select is never trained


def test_position_in_the_patch_matters():
    m = SemanticPatchEmbed(3, 4, 2)
    a = torch.zeros(1, 2, 2, dtype=torch.long)
    b = a.clone()
    a[0, 0, 0], b[0, 1, 1] = 2, 2  # the same class at two positions of one patch
    assert not torch.allclose(m(a), m(b))
    ignored = torch.full((1, 2, 2), 255)
    assert m(ignored).abs().sum() == 0


def test_label_map_not_a_multiple_of_the_factor_is_refused():
    with pytest.raises(ValueError, match="multiple of the factor 4"):
        SemanticPatchEmbed(3, 4, 4)(torch.zeros(1, 8, 6, dtype=torch.long))
