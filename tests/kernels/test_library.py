"""The fused ops as registered torch ops (svq_fast/kernels/_library.py): torch.library.opcheck on every forward and
backward op (native on CPU, the Triton paths in the interpreter), the dispatchers under torch.compile(fullgraph=True),
fp32 under autocast for the VQ, and (in a process without the interpreter) the triton_op launchers traced on fake
CUDA tensors into wrap_triton kernel nodes, which is what inductor compiles on a GPU."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import svq_fast.kernels.vq as V
from svq_fast._ext import native_available, native_error
from svq_fast.kernels.cross_entropy import chunked_ce_torch_op, chunked_ce_triton_op, chunked_cross_entropy
from svq_fast.kernels.semantic_conv import (
    semantic_conv,
    semantic_conv_native_backward_op,
    semantic_conv_native_op,
    semantic_conv_triton_backward_op,
    semantic_conv_triton_op,
)

needs_native = pytest.mark.skipif(not native_available(), reason=f"native extension not built: {native_error()}")
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton interpreter tests (CPU)")


def _gen():
    return torch.Generator().manual_seed(0)


def _check(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs)
    assert all(v == "SUCCESS" for v in result.values()), result


def _vq_args(dtype=torch.float32):
    g = _gen()
    z = torch.randn(50, 16, generator=g).to(dtype).requires_grad_()
    e = torch.randn(37, 16, generator=g).to(dtype).requires_grad_()
    return z, e


def _vq_backward_args():
    g = _gen()
    z, e = torch.randn(50, 16, generator=g), torch.randn(37, 16, generator=g)
    idx = torch.randint(0, 37, (50,), generator=g)
    return torch.randn(50, 16, generator=g), z, e, idx, torch.tensor(1.5), torch.tensor(0.5), 0.25, True


def _sc_args(bias=True):
    g = _gen()
    labels = torch.randint(0, 12, (2, 9, 11), generator=g)
    labels[0, :2] = 255
    w = torch.randn(8, 12, 3, 3, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_() if bias else None
    return labels, w, b, 255, True


def _ce_args():
    g = _gen()
    h = torch.randn(20, 16, generator=g).requires_grad_()
    w = torch.randn(30, 16, generator=g).requires_grad_()
    t = torch.randint(0, 30, (20,), generator=g)
    t[:2] = -100
    return h, w, None, t, -100, "mean", 7, True, True, False


# -- opcheck ----------------------------------------------------------------------------------------------------------


@needs_native
def test_opcheck_native_vq():
    _check(V.vq_native_op, (*_vq_args(), 0.25, True))
    _check(V.vq_native_op, (*_vq_args(torch.float64), 0.3, True))
    for need_z, need_e in ((True, True), (True, False), (False, True)):
        _check(V.vq_native_backward_op, (*_vq_backward_args(), need_z, need_e))


@needs_native
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_native_semantic_conv(bias):
    _check(semantic_conv_native_op, _sc_args(bias))
    labels, w, b, ig, det = _sc_args(bias)
    g = torch.randn(2, 8, 9, 11, generator=_gen())
    _check(semantic_conv_native_backward_op, (g, labels, w.detach(), ig, det, True, bias))


def test_opcheck_chunked_cross_entropy_torch():
    _check(chunked_ce_torch_op, _ce_args())


@interp
def test_opcheck_triton_ops_in_the_interpreter():
    from svq_fast.kernels.attention import flash_attention_backward_op, flash_attention_op

    _check(V.vq_triton_op, (*_vq_args(), 0.25, True))
    _check(V.vq_triton_backward_op, (*_vq_backward_args(), True, True))
    _check(semantic_conv_triton_op, _sc_args())
    labels, w, _, ig, det = _sc_args()
    _check(semantic_conv_triton_backward_op, (torch.randn(2, 8, 9, 11), labels, w.detach(), ig, det, True, True))
    _check(chunked_ce_triton_op, _ce_args())
    g = _gen()
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).requires_grad_() for _ in range(3))
    _check(flash_attention_op, (q, k, v, 0, 0.25, []))
    o, lse = flash_attention_op(q.detach(), k.detach(), v.detach(), 5, 0.25, [16, 16])
    _check(flash_attention_backward_op, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, 5, 0.25, []))


# -- the dispatchers compile whole ----------------------------------------------------------------------------------


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", ["native", "ref"])
def test_vq_compiles_without_graph_breaks_and_matches_eager(backend):
    if backend == "native" and not native_available():
        pytest.skip(native_error())

    def step(z, e):
        out = V.vq(z, e, 0.25, backend=backend)
        return out.z_q, out.indices, out.loss_codebook + out.loss_commit, out.min_dist

    z, e = _vq_args()
    want = step(z, e)
    torch.autograd.backward(want[0].sum() + want[2])
    gz, ge = z.grad.clone(), e.grad.clone()
    z.grad = e.grad = None
    got = _compiled(step)(z, e)
    torch.autograd.backward(got[0].sum() + got[2])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(z.grad, gz, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(e.grad, ge, rtol=1e-6, atol=1e-7)


@needs_native
def test_semantic_conv_and_chunked_ce_compile_without_graph_breaks():
    labels, w, b, ig, _ = _sc_args()

    def conv(labels, w, b):
        return semantic_conv(labels, w, b, ignore_index=ig, backend="native")

    want = conv(labels, w, b)
    got = _compiled(conv)(labels, w, b)
    assert torch.equal(got, want)
    got.sum().backward()
    assert w.grad is not None and b.grad is not None

    h, wt, _, t, *_ = _ce_args()
    loss = _compiled(lambda h, w, t: chunked_cross_entropy(h, w, t, chunk_rows=7, backend="torch"))(h, wt, t)
    assert torch.equal(loss, chunked_cross_entropy(h, wt, t, chunk_rows=7, backend="torch"))
    loss.backward()
    assert h.grad is not None and wt.grad is not None


@interp
def test_flash_attention_compiles_without_graph_breaks_in_the_interpreter():
    from svq_fast.kernels.attention import flash_attention

    g = _gen()
    q, k, v = (torch.randn(1, 2, 24, 16, generator=g).requires_grad_() for _ in range(3))
    got = _compiled(lambda q, k, v: flash_attention(q, k, v, causal=True, prefix_len=6))(q, k, v)
    assert torch.equal(got, flash_attention(q, k, v, causal=True, prefix_len=6))
    got.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


def test_native_vq_runs_in_fp32_under_autocast():
    """The nearest-code search never runs in bf16: under autocast the op computes in fp32 and z_q comes back in z's
    dtype; its distances are those of the fp32 search on the same (bf16-rounded) inputs."""
    z, e = _vq_args()
    zb = z.detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = V.vq(zb, e.detach().bfloat16(), 0.25)
    ref = V.vq_ref(zb.float(), e.detach().bfloat16().float(), 0.25)
    assert out.z_q.dtype == torch.bfloat16 and out.min_dist.dtype == torch.float32
    assert out.loss_codebook.dtype == torch.float32
    torch.testing.assert_close(out.min_dist, ref.min_dist, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.indices, ref.indices)


# -- the GPU path: triton_op, traced on fake CUDA tensors ------------------------------------------------------------

_TRACE = textwrap.dedent(
    """
    import torch
    from torch._library.triton import triton_ops_to_kernels
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    import svq_fast.kernels.vq as V, svq_fast.kernels.attention as A
    import svq_fast.kernels.semantic_conv as S, svq_fast.kernels.cross_entropy as C

    V._num_sms = lambda dev: 132  # no GPU to ask
    names = ["vq_triton", "vq_triton_backward", "semantic_conv_triton", "semantic_conv_triton_backward",
             "flash_attention", "flash_attention_backward", "chunked_ce_triton"]
    missing = [n for n in names if "svq_fast::" + n not in triton_ops_to_kernels]
    assert not missing, f"not registered as triton_op: {missing}"

    def kernels(fn, *args):
        gm = make_fx(fn, tracing_mode="fake")(*args)
        return sum("TritonKernelWrapper" in type(n.target).__name__ for n in gm.graph.nodes)

    with FakeTensorMode():
        cu, bf = dict(device="cuda"), torch.bfloat16
        z, e = torch.empty(300, 64, dtype=bf, **cu), torch.empty(1000, 64, dtype=bf, **cu)
        idx, one = torch.empty(300, dtype=torch.int64, **cu), torch.empty((), **cu)
        lab, w = torch.empty(2, 32, 32, dtype=torch.int64, **cu), torch.empty(64, 20, 3, 3, dtype=bf, **cu)
        b, g = torch.empty(64, dtype=bf, **cu), torch.empty(2, 64, 32, 32, dtype=bf, **cu)
        q, lse = torch.empty(2, 4, 128, 64, dtype=bf, **cu), torch.empty(2, 4, 128, **cu)
        h, t = torch.empty(100, 64, dtype=bf, **cu), torch.empty(100, dtype=torch.int64, **cu)
    counts = {
        "vq": kernels(lambda z, e: V._vq_triton_impl(z, e, 0.25, True), z, e),
        "vq_bwd": kernels(lambda g, z, e, i, a, c: V._vq_triton_backward_impl(g, z, e, i, a, c, 0.25, True, True,
                          True), z, z, e, idx, one, one),
        "sc": kernels(lambda l, w, b: S._sc_triton_impl(l, w, b, 255, True), lab, w, b),
        "sc_bwd": kernels(lambda g, l, w: S._sc_triton_backward_impl(g, l, w, 255, True, True, True), g, lab, w),
        "attn": kernels(lambda q, k, v: A._flash_impl(q, k, v, 0, 0.125, []), q, q, q),
        "attn_bwd": kernels(lambda d, q, k, v, o, l: A._flash_backward_impl(d, q, k, v, o, l, 0, 0.125, []),
                            q, q, q, q, q, lse),
        "ce": kernels(lambda h, w, t: C._make_impl(True)(h, w, None, t, -100, "mean", 64, True, True, False), h, e, t),
    }
    print(counts)
    assert counts == {"vq": 2, "vq_bwd": 2, "sc": 1, "sc_bwd": 2, "attn": 1, "attn_bwd": 3, "ce": 2}, counts
    """
)


def test_triton_launchers_trace_into_wrap_triton_kernels_on_fake_cuda_tensors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _TRACE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ema", [False, True])
def test_opcheck_quantizer_state_ops(dtype, ema):
    """The quantizer's bookkeeping ops (svq_fast/nn/quantizer.py), both phases, the lookup input in fp32 or bf16
    (autocast): schema (the buffers they write are declared mutated), fake kernel, and the compile trace."""
    from svq_fast.nn.quantizer import VectorQuantizer, quantizer_state_ema_op, quantizer_state_grad_op

    q = VectorQuantizer(16, 4, ema=ema, restart_after=1000)
    g = _gen()
    x = torch.randn(40, 4, generator=g).to(dtype)
    idx = torch.randint(0, 16, (40,), generator=g)
    q.step.fill_(3)  # not fresh: "init" leaves the codebook alone (opcheck runs the op several times)
    tensors, cfg = q._state_args(x)
    op = quantizer_state_ema_op if ema else quantizer_state_grad_op
    for phase in ("init", "update"):
        _check(op, (phase, x, idx, x, *tensors, *cfg))
