"""Chunked linear + cross-entropy against F.cross_entropy on the full logits: loss and gradients of hidden,
weight and bias, with ignored rows, several chunks and a 16384-token vocabulary. The Triton kernel runs in
the interpreter on CPU (TRITON_INTERPRET=1 from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from svq_fast.kernels.cross_entropy import chunked_cross_entropy, chunked_cross_entropy_ref

CPU = not torch.cuda.is_available()
DEV = "cpu" if CPU else "cuda"


def _problem(n, c, v, dtype=torch.float32, bias=True, ignore_frac=0.25, device=DEV):
    h = (torch.randn(n, c, device=device) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, c, device=device) / c**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), device=device)
    t[torch.rand(n, device=device) < ignore_frac] = -100
    return h, w, b, t


def _loss_and_grads(fn, h, w, b, t, **kw):
    loss = fn(h, w, t, b, **kw)
    inputs = [x for x in (h, w, b) if x is not None]
    return (loss, *torch.autograd.grad(loss * 1.7, inputs))  # a non-unit upstream gradient


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,v,chunk_rows,bias", [(37, 16384, 8, True), (20, 1000, 7, False), (5, 3, None, True)])
def test_matches_f_cross_entropy(backend, reduction, n, v, chunk_rows, bias):
    h, w, b, t = _problem(n, 32, v, bias=bias)
    got = _loss_and_grads(chunked_cross_entropy, h, w, b, t, reduction=reduction, chunk_rows=chunk_rows,
                          backend=backend)  # fmt: skip
    want = _loss_and_grads(chunked_cross_entropy_ref, h, w, b, t, reduction=reduction)
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_ignore_index_and_extreme_logits(backend):
    h, w, b, t = _problem(24, 16, 500, ignore_frac=0.0)
    t[::3] = 7  # class 7 is the ignore index here, so those rows are skipped
    with torch.no_grad():
        h.mul_(30)  # logits in the hundreds: needs a stable log-sum-exp
    got = _loss_and_grads(chunked_cross_entropy, h, w, b, t, ignore_index=7, chunk_rows=5, backend=backend)
    want = _loss_and_grads(chunked_cross_entropy_ref, h, w, b, t, ignore_index=7)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_leading_dims_flattened_and_no_grad():
    h, w, _, t = _problem(12, 16, 64, bias=False, ignore_frac=0.0)
    want = chunked_cross_entropy_ref(h, w, t)
    got = chunked_cross_entropy(h.reshape(3, 4, 16), w, t.reshape(3, 4), chunk_rows=5)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(chunked_cross_entropy(h, w, t, chunk_rows=5), want.detach())


def test_only_weight_requires_grad():
    h, w, _, t = _problem(10, 16, 50, bias=False)
    h = h.detach()
    (gw,) = torch.autograd.grad(chunked_cross_entropy(h, w, t, chunk_rows=3), (w,))
    (rw,) = torch.autograd.grad(chunked_cross_entropy_ref(h, w, t), (w,))
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-4)


def test_fp16_interpreter_or_gpu():
    h, w, b, t = _problem(33, 64, 2048, dtype=torch.float16)
    got = _loss_and_grads(chunked_cross_entropy, h, w, b, t, chunk_rows=16, backend="triton")
    want = _loss_and_grads(chunked_cross_entropy_ref, h, w, b, t)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), atol=2e-3, rtol=2e-2)


def test_errors():
    h, w, b, t = _problem(4, 8, 10)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="weight must be"):
        chunked_cross_entropy(h, w[:, :4], t)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(h, w, t[:3])
    with pytest.raises(ValueError, match="unknown backend"):
        chunked_cross_entropy(h, w, t, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_vocab(dtype):
    h, w, b, t = _problem(4096, 512, 16384, dtype=dtype, device="cuda")
    got = _loss_and_grads(chunked_cross_entropy, h, w, b, t)
    want = _loss_and_grads(chunked_cross_entropy_ref, h, w, b, t)
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), r.float(), atol=1e-2, rtol=5e-2)
