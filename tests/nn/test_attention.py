"""The attention dispatch: every backend computes the same masks (causal, prefix-causal, none, KV cache),
and a backend that cannot serve the inputs raises an error that says why."""

from __future__ import annotations

import pytest
import torch

import svq_fast.nn.attention as attn_mod
from svq_fast.nn.attention import BackendUnavailableError, attention, prefix_causal_mask

CPU = not torch.cuda.is_available()


def _qkv(t_q, t_k, d=32, b=1, h=2, dtype=torch.float32, device="cpu"):
    return [torch.randn(b, h, t, d, dtype=dtype, device=device) for t in (t_q, t_k, t_k)]


def _dense_ref(q, k, v, allowed):
    """Independent of the package: softmax over an explicit (T_q, T_k) boolean mask, in float64."""
    s = (q.double() @ k.double().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v.double()


# (t_q, t_k, causal, prefix_len)
MASKS = [
    (19, 19, True, 0),
    (19, 19, True, 7),
    (19, 19, True, 19),
    (19, 19, True, 50),
    (19, 19, False, 0),
    (1, 23, True, 0),
    (4, 23, True, 0),
    (4, 23, True, 22),
    (4, 23, True, 10),
    (30, 7, False, 0),
]
CPU_BACKENDS = ["sdpa", "ref", "auto"] + (["triton"] if CPU else [])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("t_q,t_k,causal,prefix_len", MASKS)
def test_backends_match_dense_mask(backend, t_q, t_k, causal, prefix_len):
    q, k, v = _qkv(t_q, t_k)
    allowed = prefix_causal_mask(t_q, t_k, prefix_len) if causal else None
    got = attention(q, k, v, causal=causal, prefix_len=prefix_len, backend=backend)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double(), _dense_ref(q, k, v, allowed), atol=2e-5, rtol=1e-4)


def test_prefix_causal_mask_semantics():
    m = prefix_causal_mask(5, 5, 2)
    want = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, want)
    # KV cache: the 2 queries are positions 3 and 4 of 5.
    assert torch.equal(prefix_causal_mask(2, 5, 0), want[3:])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("prefix_len", [0, 9])
def test_kv_cache_decoding_matches_full_sequence(backend, prefix_len):
    """Decoding the last rows with a KV cache gives the rows of the full-sequence call."""
    q, k, v = _qkv(24, 24)
    full = attention(q, k, v, prefix_len=prefix_len, backend=backend)
    for t_q in (1, 3):
        step = attention(q[:, :, -t_q:], k, v, prefix_len=prefix_len, backend=backend)
        torch.testing.assert_close(step, full[:, :, -t_q:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["sdpa", "ref"] + (["triton"] if CPU else []))
def test_gradients_match_sdpa(backend):
    q, k, v = (x.requires_grad_() for x in _qkv(21, 21))
    do = torch.randn_like(q)
    outs = {}
    for name in ("sdpa", backend):
        o = attention(q, k, v, prefix_len=6, backend=name)
        outs[name] = torch.autograd.grad(o, (q, k, v), do)
    for g, w in zip(outs[backend], outs["sdpa"]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4)


def test_scale_argument():
    q, k, v = _qkv(9, 9)
    got = attention(q, k, v, prefix_len=3, scale=0.2, backend="sdpa")
    want = attention(q * (0.2 * 32**0.5), k, v, prefix_len=3, backend="ref")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------ dispatch errors


def test_unknown_backend():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="unknown backend 'flash'"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize("backend", ["sdpa", "ref", "auto"])
def test_causal_needs_t_q_le_t_k(backend):
    q, k, v = _qkv(5, 4)
    with pytest.raises(ValueError, match="t_q <= t_k"):
        attention(q, k, v, backend=backend)


def test_shape_dtype_errors():
    q, k, v = _qkv(4, 4)
    with pytest.raises(ValueError, match="do not match"):
        attention(q, k[..., :16], v)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="dtypes differ"):
        attention(q, k.double(), v)
    with pytest.raises(ValueError, match="prefix_len"):
        attention(q, k, v, prefix_len=-1)


@pytest.mark.skipif(not CPU, reason="CPU-only error paths")
def test_xformers_on_cpu_is_refused():
    q, k, v = _qkv(4, 4)
    with pytest.raises(BackendUnavailableError, match="xformers") as e:
        attention(q, k, v, backend="xformers")
    assert isinstance(e.value, RuntimeError) and isinstance(e.value, ValueError)
    assert "CPU" in str(e.value)


@pytest.mark.skipif(not CPU, reason="CPU-only error paths")
def test_triton_refusals_on_cpu(monkeypatch):
    q, k, v = _qkv(4, 4, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        attention(q, k, v, backend="triton")
    q, k, v = _qkv(4, 4, d=48)
    with pytest.raises(BackendUnavailableError, match="head dim 48"):
        attention(q, k, v, backend="triton")
    # Without the interpreter, CPU tensors are refused (and auto never picks triton on CPU).
    monkeypatch.setattr(attn_mod, "_triton_interpreting", lambda: False)
    q, k, v = _qkv(4, 4)
    with pytest.raises(BackendUnavailableError, match="needs CUDA tensors"):
        attention(q, k, v, backend="triton")
    torch.testing.assert_close(attention(q, k, v), attention(q, k, v, backend="sdpa"))


def test_auto_on_cpu_is_sdpa(monkeypatch):
    if not CPU:
        pytest.skip("CPU dispatch")
    calls = []
    monkeypatch.setattr(attn_mod, "_sdpa", lambda *a: calls.append(1) or a[0])
    q, k, v = _qkv(4, 4)
    attention(q, k, v)
    assert calls == [1]


def test_head_dims_and_prefix_rule_agree_with_kernels():
    from svq_fast.kernels import attention as kattn

    assert attn_mod._TRITON_HEAD_DIMS == kattn.HEAD_DIMS
    for t_q, t_k in [(1, 1), (5, 5), (3, 9), (1, 9)]:
        for p in range(0, t_k + 3):
            for causal in (True, False):
                assert attn_mod._effective_prefix(t_q, t_k, p, causal) == kattn.effective_prefix_len(
                    t_q, t_k, p, causal
                )


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t_q,t_k,prefix_len", [(256, 256, 0), (256, 256, 100), (64, 256, 200), (1, 256, 0)])
def test_gpu_backends_agree(dtype, t_q, t_k, prefix_len):
    q, k, v = _qkv(t_q, t_k, d=64, b=2, h=4, dtype=dtype, device="cuda")
    want = attention(q, k, v, prefix_len=prefix_len, backend="ref").float()
    backends = ["auto", "sdpa", "triton"]
    try:
        import xformers.ops  # noqa: F401

        backends.append("xformers")
    except ImportError:
        pass
    for name in backends:
        got = attention(q, k, v, prefix_len=prefix_len, backend=name)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
def test_gpu_auto_picks_triton_for_half_and_sdpa_for_fp32(monkeypatch):
    import svq_fast.kernels.attention as kattn

    calls = []
    real = kattn.flash_attention
    monkeypatch.setattr(kattn, "flash_attention", lambda *a, **kw: calls.append("triton") or real(*a, **kw))
    q, k, v = _qkv(128, 128, d=64, dtype=torch.bfloat16, device="cuda")
    attention(q, k, v)
    assert calls == ["triton"]
    q, k, v = _qkv(128, 128, d=64, dtype=torch.float32, device="cuda")
    attention(q, k, v)
    assert calls == ["triton"]
    with pytest.raises(BackendUnavailableError, match="fp16/bf16"):
        attention(q, k, v, backend="triton")
