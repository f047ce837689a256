"""semantic_conv: the fused paths (Triton in the CPU interpreter, native C++) equal one-hot + conv2d in output and
weight / bias gradients; errors for bad ids and backends that cannot serve the inputs. GPU tests add bf16 compiled
Triton and run-to-run determinism."""

import pytest
import torch

import svq_fast.kernels.semantic_conv as sc
from svq_fast._ext import native_available
from svq_fast.kernels.semantic_conv import resolve_backend, semantic_conv, semantic_conv_ref

IGNORE = 255
B, H, W, C, COUT = 2, 9, 11, 7, 5  # odd H, W: every border case in a few hundred pixels
TOL = {  # output / gradient vs an fp64 reference from the same (rounded) inputs: accumulate in fp32, round once
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2),
}

needs_native = pytest.mark.skipif(not native_available(), reason="svq_fast._C not built")
# Triton on CPU tensors runs in the interpreter only (conftest sets TRITON_INTERPRET=1 when there is no GPU); on a
# GPU machine these are covered by the compiled -m gpu tests at the end.
interp = pytest.mark.skipif(
    not (sc._HAS_TRITON and sc._interpreting()), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)


def _labels(b=B, h=H, w=W, c=C, device="cpu", blocky=False):
    """(b, h, w) int64 in [0, c) with ignore pixels on the border, a corner and scattered inside."""
    if blocky:  # piecewise constant like real maps; with w=32 a Triton pixel block (32 in the interpreter) is a row,
        # so image 0 has one label per block and tap (the atomic backward's pre-summed path), image 1 two labels
        lab = (torch.arange(h)[:, None] // 3 + torch.zeros(w, dtype=torch.long)[None, :]) % c
        lab = lab.expand(b, h, w).clone()
        lab[1, :, w // 2 :] = (lab[1, :, w // 2 :] + 2) % c
    else:
        lab = torch.randint(0, c, (b, h, w))
    lab[0, 0, :] = IGNORE  # a whole border row
    lab[0, :, -1] = IGNORE  # a whole border column
    lab[1, h // 2, w // 2] = IGNORE
    lab[1, 3, :2] = IGNORE
    return lab.to(device)


def _params(k, dtype, bias=True, cout=COUT, c=C, device="cpu"):
    w = torch.randn(cout, c, k, k, device=device).to(dtype)
    b = torch.randn(cout, device=device).to(dtype) if bias else None
    return w, b


def _check(labels, w, b, backend, grad=None, **kw):
    """Run backend and the fp64 reference on the same inputs; compare output and gradients."""
    wf = w.clone().requires_grad_()
    bf = b.clone().requires_grad_() if b is not None else None
    out = semantic_conv(labels, wf, bf, ignore_index=IGNORE, backend=backend, **kw)
    assert out.dtype == w.dtype and out.shape == (labels.shape[0], w.shape[0], *labels.shape[1:])
    g = torch.randn(out.shape, device=out.device).to(w.dtype) if grad is None else grad
    out.backward(g)
    wr = w.double().requires_grad_()
    br = b.double().requires_grad_() if b is not None else None
    ref = semantic_conv_ref(labels, wr, br, IGNORE)
    ref.backward(g.double())
    tol = TOL[w.dtype]
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(wf.grad.double(), wr.grad, **tol)
    assert wf.grad.dtype == w.dtype
    if b is not None:
        torch.testing.assert_close(bf.grad.double(), br.grad, **tol)
    return out, wf.grad


# -- the reference is the one-hot + conv definition ---------------------------------------------------------------


def test_ref_matches_the_explicit_gather():
    """semantic_conv_ref == the per-pixel sum of weight columns over in-bounds, non-ignored taps (brute force)."""
    lab = _labels()
    w, b = _params(3, torch.float64)
    out = semantic_conv_ref(lab, w, b, IGNORE)
    want = b[None, :, None, None].repeat(B, 1, H, W)
    for bi in range(B):
        for y in range(H):
            for x in range(W):
                for dy in range(3):
                    for dx in range(3):
                        yy, xx = y + dy - 1, x + dx - 1
                        if 0 <= yy < H and 0 <= xx < W and lab[bi, yy, xx] != IGNORE:
                            want[bi, :, y, x] += w[:, lab[bi, yy, xx], dy, dx]
    torch.testing.assert_close(out, want)


# -- Triton (interpreter on CPU) ---------------------------------------------------------------------------------


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_matches_ref(dtype, k, deterministic):
    """bf16 is safe in the interpreter here: the kernels use no tl.dot (the interpreter's bf16 bug)."""
    w, b = _params(k, dtype)
    _check(_labels(), w, b, "triton", deterministic=deterministic)


@interp
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_k5(deterministic):
    w, b = _params(5, torch.float32)
    _check(_labels(), w, b, "triton", deterministic=deterministic)


@interp
@pytest.mark.parametrize("deterministic", [True, False])
def test_triton_blocky_labels_many_chunks(monkeypatch, deterministic):
    """Piecewise-constant labels (atomic path: one pre-summed atomic per block and tap) and chunks of 16 pixels
    (segment path: many chunks per class, summed in order), no bias."""
    monkeypatch.setattr(sc, "_CHUNK", 16)
    w, _ = _params(3, torch.float32, bias=False)
    _check(_labels(h=10, w=32, blocky=True), w, None, "triton", deterministic=deterministic)


@interp
def test_triton_non_contiguous_grad_and_bias_only():
    """out.sum() gives an expanded (stride 0) upstream gradient; a frozen weight gets no gradient."""
    lab = _labels()
    w, b = _params(3, torch.float32)
    bf = b.clone().requires_grad_()
    semantic_conv(lab, w, bf, ignore_index=IGNORE, backend="triton").sum().backward()
    torch.testing.assert_close(bf.grad, torch.full_like(b, B * H * W))
    wf = w.clone().requires_grad_()
    semantic_conv(lab, wf, None, ignore_index=IGNORE, backend="triton").sum().backward()
    wr = w.clone().requires_grad_()
    semantic_conv_ref(lab, wr, None, IGNORE).sum().backward()
    torch.testing.assert_close(wf.grad, wr.grad)


# -- native C++ op -----------------------------------------------------------------------------------------------


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_native_matches_ref(dtype, k):
    w, b = _params(k, dtype)
    _check(_labels(), w, b, "native")


@needs_native
def test_native_blocky_wide_channels_no_bias():
    """Cout=70: one 64-channel register block plus a tail; no bias; piecewise-constant labels."""
    w, _ = _params(3, torch.float32, bias=False, cout=70, c=13)
    _check(_labels(b=3, h=17, w=8, c=13, blocky=True), w, None, "native")


@needs_native
def test_native_non_contiguous_grad_int32_labels():
    lab = _labels().to(torch.int32)
    w, b = _params(3, torch.float32)
    wf, bf = w.clone().requires_grad_(), b.clone().requires_grad_()
    semantic_conv(lab, wf, bf, ignore_index=IGNORE, backend="native").sum().backward()
    wr, br = w.clone().requires_grad_(), b.clone().requires_grad_()
    semantic_conv_ref(lab.long(), wr, br, IGNORE).sum().backward()
    torch.testing.assert_close(wf.grad, wr.grad)
    torch.testing.assert_close(bf.grad, br.grad)


@needs_native
def test_native_backward_deterministic_for_fixed_partitions():
    """The weight gradient depends on num_partitions only, not on the thread count that runs them."""
    from svq_fast._ext import native_ops

    lab = _labels(b=4, h=31, w=29)
    w, _ = _params(3, torch.float32)
    g = torch.randn(4, COUT, 31, 29)
    threads = torch.get_num_threads()
    res = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            res.append(native_ops().semantic_conv_backward(g, lab, w, IGNORE, True, True, 4))
    finally:
        torch.set_num_threads(threads)
    for gw, gb in res[1:]:
        assert torch.equal(gw, res[0][0]) and torch.equal(gb, res[0][1])
    gw1, _ = native_ops().semantic_conv_backward(g, lab, w, IGNORE, True, False, 1)
    torch.testing.assert_close(gw1, res[0][0], rtol=1e-4, atol=1e-4)  # other partitions: other rounding


@needs_native
def test_native_op_rejects_bad_ids_itself():
    """Called directly (no Python check in front), the op still refuses out-of-range ids instead of reading
    out of bounds."""
    from svq_fast._ext import native_ops

    lab = _labels()
    lab[1, 2, 3] = C
    w, b = _params(3, torch.float32)
    with pytest.raises(RuntimeError, match="class id 7 outside"):
        native_ops().semantic_conv_forward(lab, w, b, IGNORE)
    with pytest.raises(RuntimeError, match="class id 7 outside"):
        native_ops().semantic_conv_backward(torch.zeros(B, COUT, H, W), lab, w, IGNORE, True, True, 0)


# -- errors and dispatch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "backend", ["ref", pytest.param("triton", marks=interp), pytest.param("native", marks=needs_native), "auto"]
)
def test_bad_class_ids_raise_value_error_naming_them(backend):
    lab = _labels()
    lab[0, 4, 4], lab[1, 5, 6], lab[1, 0, 0] = C, -3, 300
    w, b = _params(3, torch.float32)
    with pytest.raises(ValueError, match=r"class ids \[-3, 7, 300\] outside \[0, 7\)"):
        semantic_conv(lab, w, b, ignore_index=IGNORE, backend=backend)


@interp
def test_ignore_index_inside_the_class_range():
    """ignore_index may be a real class id (e.g. 0): those pixels contribute nothing, in every backend."""
    lab = _labels().clamp(max=C - 1)
    w, b = _params(3, torch.float32)
    ref = semantic_conv_ref(lab, w, b, 0)
    backends = ["triton"] + (["native"] if native_available() else [])
    for backend in backends:
        torch.testing.assert_close(semantic_conv(lab, w, b, ignore_index=0, backend=backend), ref)
    assert not torch.allclose(ref, semantic_conv_ref(lab, w, b, IGNORE))


def test_unavailable_backends_say_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check: the dtype / shape checks answer
    lab = _labels()
    w, b = _params(3, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        semantic_conv(lab, w, b, backend="cuda")
    w64 = w.double()
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: dtype torch.float64"):
        semantic_conv(lab, w64, None, backend="triton")
    w_even = torch.randn(COUT, C, 2, 2)
    with pytest.raises(RuntimeError, match="square odd kernels"):
        semantic_conv(lab, w_even, None, backend="triton")
    with pytest.raises(RuntimeError, match="bias dtype"):
        semantic_conv(lab, w, b.half(), backend="triton")
    assert resolve_backend(lab, w_even, None, "auto") == "ref"
    monkeypatch.delenv("TRITON_INTERPRET")  # CPU tensors without the interpreter
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        semantic_conv(lab, w, b, backend="triton")
    monkeypatch.setattr(sc, "native_available", lambda: False)
    monkeypatch.setattr(sc, "native_error", lambda: "ImportError: pretend")
    with pytest.raises(RuntimeError, match="backend='native' cannot run here: .*not built .*pretend"):
        semantic_conv(lab, w, b, backend="native")
    assert resolve_backend(lab, w, b, "auto") == "ref"
    torch.testing.assert_close(semantic_conv(lab, w, b), semantic_conv_ref(lab, w, b, IGNORE))


def test_shape_and_type_errors():
    w, b = _params(3, torch.float32)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\)"):
        semantic_conv(torch.zeros(H, W, dtype=torch.long), w, b)
    with pytest.raises(TypeError, match="integer class ids"):
        semantic_conv(torch.zeros(B, H, W), w, b)
    with pytest.raises(ValueError, match="bias must be"):
        semantic_conv(_labels(), w, torch.zeros(COUT + 1))


@needs_native
def test_auto_is_native_on_cpu():
    lab = _labels()
    w, b = _params(3, torch.float32)
    assert resolve_backend(lab, w, b) == "native"
    assert resolve_backend(lab, w.double(), b.double()) == "native"


def test_autocast_gives_the_reference_dtype():
    """Under autocast the fused op runs in the autocast dtype like F.conv2d does; gradients reach the fp32 weight."""
    lab = _labels()
    w, b = _params(3, torch.float32)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = semantic_conv_ref(lab, w, b, IGNORE)
        out = semantic_conv(lab, w, b, ignore_index=IGNORE)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, **TOL[torch.bfloat16])
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32


def test_empty_batch():
    w, b = _params(3, torch.float32)
    out = semantic_conv(torch.zeros(0, H, W, dtype=torch.long), w, b)
    assert out.shape == (0, COUT, H, W)


# -- GPU (compiled Triton) ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_triton_matches_ref(dtype, k, deterministic):
    lab = _labels(b=3, h=67, w=45, c=37, device="cuda")
    w, b = _params(k, dtype, cout=96, c=37, device="cuda")
    _check(lab, w, b, "triton", deterministic=deterministic)
    assert resolve_backend(lab, w, b) == "triton"


@pytest.mark.gpu
def test_gpu_triton_blocky_and_deterministic():
    """Large piecewise-constant map: the deterministic backward gives the same bits twice."""
    lab = _labels(b=2, h=128, w=96, c=19, device="cuda", blocky=True)
    w, b = _params(3, torch.float32, cout=128, c=19, device="cuda")
    g = torch.randn(2, 128, 128, 96, device="cuda")
    grads = []
    for _ in range(2):
        _, gw = _check(lab, w, b, "triton", grad=g, deterministic=True)
        grads.append(gw)
    assert torch.equal(grads[0], grads[1])
    _check(lab, w, b, "triton", grad=g, deterministic=False)
