"""SemanticConv: same parameters / state_dict as before the fused op (those of an nn.Conv2d over the one-hot), same
outputs and gradients on every backend, the out-of-range class-id error kept."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from svq_fast._ext import native_available
from svq_fast.nn.semantic_input import SemanticConv, semantic_conv_ref

C, COUT = 11, 6


def _labels(b=2, h=7, w=9):
    lab = torch.randint(0, C, (b, h, w))
    lab[0, 1, 2:5] = 255
    return lab


def _backends():
    """Backends that can run on CPU tensors here (Triton only in the interpreter)."""
    import svq_fast.kernels.semantic_conv as sc

    return ["ref"] + (["triton"] if sc._interpreting() else []) + (["native"] if native_available() else [])


@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_layout_unchanged(bias):
    """Keys, shapes and dtypes are those of nn.Conv2d(num_classes, Cout, k, padding=k // 2); backend is not state."""
    m = SemanticConv(C, COUT, kernel_size=3, bias=bias, backend="ref")
    conv = nn.Conv2d(C, COUT, 3, padding=1, bias=bias)
    sd, want = m.state_dict(), conv.state_dict()
    assert list(sd) == list(want) == (["weight", "bias"] if bias else ["weight"])
    for key in sd:
        assert sd[key].shape == want[key].shape and sd[key].dtype == want[key].dtype
    # a state_dict round-trips between backends and from a plain conv, and gives that conv's output on the one-hot
    m2 = SemanticConv(C, COUT, kernel_size=3, bias=bias, backend="auto")
    m2.load_state_dict(conv.state_dict())
    lab = _labels().clamp(max=C - 1)
    onehot = F.one_hot(lab, C).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(m2(lab), conv(onehot), rtol=1e-5, atol=1e-5)


def test_kernel_size_1_parameter_shape():
    m = SemanticConv(C, COUT, kernel_size=1)
    assert m.weight.shape == (COUT, C, 1, 1) and m.bias.shape == (COUT,)


@pytest.mark.parametrize("backend", _backends() + ["auto"])
def test_backends_agree_with_ref_in_output_and_gradients(backend):
    torch.manual_seed(1)
    ref = SemanticConv(C, COUT, backend="ref")
    with torch.no_grad():
        ref.bias.normal_()
    m = SemanticConv(C, COUT, backend=backend)
    m.load_state_dict(ref.state_dict())
    lab = _labels()
    out, out_ref = m(lab), ref(lab)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    out.backward(g)
    out_ref.backward(g)
    torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_out_of_range_class_ids_raise(backend):
    m = SemanticConv(C, COUT, backend=backend)
    lab = _labels()
    lab[1, 3, 3] = C
    with pytest.raises(ValueError, match=r"class ids \[11\] outside \[0, 11\) \(ignore id 255\)"):
        m(lab)


def test_ignore_pixels_contribute_nothing():
    m = SemanticConv(C, COUT, kernel_size=3, bias=False)
    lab = torch.full((1, 5, 5), 255)
    assert torch.count_nonzero(m(lab)) == 0
    lab[0, 2, 2] = 3  # one labelled pixel: its 3x3 neighbourhood sees weight[:, 3] (flipped position)
    out = m(lab)
    torch.testing.assert_close(out[0, :, 1:4, 1:4], m.weight[:, 3].flip(-1, -2).detach())
    assert torch.count_nonzero(out[0, :, 0]) == 0


def test_unknown_backend_rejected_and_repr():
    with pytest.raises(ValueError, match="unknown backend"):
        SemanticConv(C, COUT, backend="fast")
    assert "backend='auto'" in repr(SemanticConv(C, COUT))


def test_ref_reexported():
    from svq_fast.kernels.semantic_conv import semantic_conv_ref as kernel_ref

    assert semantic_conv_ref is kernel_ref
