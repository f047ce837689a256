"""Triton flash attention against attention_ref: output and dQ, dK, dV.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1 from tests/conftest.py), fp32 (and one
fp16 case), B=1, H=2 and pinned small blocks so the file runs in well under a minute. GPU tests (-m gpu)
cover bf16/fp16 with the autotuned configs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import svq_fast.kernels.attention as attn
from svq_fast.kernels.attention import HEAD_DIMS, attention_ref, effective_prefix_len, flash_attention

CPU = not torch.cuda.is_available()
DEV = "cpu" if CPU else "cuda"


def _inputs(b, h, t_q, t_k, d, dtype, device=DEV, layout="bhtd"):
    if layout == "bthd":  # what a GPT produces: (B, T, H, d) viewed as (B, H, T, d), non-contiguous
        q = torch.randn(b, t_q, h, d, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(b, t_k, h, d, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, t_k, h, d, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(b, h, t_q, d, device=device, dtype=dtype)
        k = torch.randn(b, h, t_k, d, device=device, dtype=dtype)
        v = torch.randn(b, h, t_k, d, device=device, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v)]


def _fwd_bwd(fn, q, k, v, do):
    o = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


def _ref_lowp(q, k, v, *, causal, prefix_len):
    """The same math with the matmul inputs kept in q.dtype (what any fp16/bf16 kernel does)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
    if causal:
        q_pos = torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
        k_pos = torch.arange(t_k, device=q.device)[None, :]
        s = s.masked_fill(~((k_pos <= q_pos) | (k_pos < prefix_len)), float("-inf"))
    return torch.softmax(s, -1).to(q.dtype) @ v


def _check_against_ref(q, k, v, *, causal, prefix_len, blocks=None, atol, rtol):
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype)
    got = _fwd_bwd(
        lambda q_, k_, v_: flash_attention(q_, k_, v_, causal=causal, prefix_len=prefix_len, _blocks=blocks),
        q,
        k,
        v,
        do,
    )
    # The reference in float64 (CPU) / float32 (GPU), from the same inputs.
    hi = torch.float64 if q.device.type == "cpu" else torch.float32
    qr, kr, vr = (x.detach().to(hi).requires_grad_() for x in (q, k, v))
    want = _fwd_bwd(
        lambda q_, k_, v_: attention_ref(q_, k_, v_, causal=causal, prefix_len=prefix_len), qr, kr, vr, do.to(hi)
    )
    lowp = None
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type == "cuda":
        # flash-attention's criterion: at most 2x the error of the same math in the same low precision.
        ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
        lowp = _fwd_bwd(lambda q_, k_, v_: _ref_lowp(q_, k_, v_, causal=causal, prefix_len=prefix_len),
                        ql, kl, vl, do)  # fmt: skip
    for i, (name, g, w) in enumerate(zip(("out", "dq", "dk", "dv"), got, want)):
        assert g.shape == w.shape and g.dtype == q.dtype, name
        assert torch.isfinite(g).all(), name
        if lowp is None:
            torch.testing.assert_close(g.to(hi), w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            err = (g.to(hi) - w).abs().max().item()
            err_lowp = (lowp[i].to(hi) - w).abs().max().item()
            assert err <= 2 * err_lowp + atol, f"{name}: max err {err:.3e} vs low-precision ref {err_lowp:.3e}"


# (T, d, causal, prefix_len, blocks): odd lengths, both masks, P in {0, odd, T}, BLOCK_M != BLOCK_N both ways.
CASES = [
    (1, 32, True, 0, None),
    (1, 64, True, 1, None),
    (17, 32, True, 0, None),
    (17, 32, True, 5, None),
    (17, 64, True, 17, None),
    (17, 64, False, 0, None),
    (33, 128, True, 9, None),
    (257, 64, True, 0, (32, 16)),
    (257, 32, True, 37, (16, 32)),
    (257, 64, True, 257, (32, 32)),
    (257, 32, True, 131, (32, 16)),
    (512, 64, True, 0, (32, 32)),
    (512, 32, True, 255, (32, 64)),
]


@pytest.mark.parametrize("t,d,causal,prefix_len,blocks", CASES)
def test_matches_ref_fp32(t, d, causal, prefix_len, blocks):
    q, k, v = _inputs(1, 2, t, t, d, torch.float32)
    _check_against_ref(q, k, v, causal=causal, prefix_len=prefix_len, blocks=blocks, atol=2e-5, rtol=1e-4)


# KV cache: queries are the last t_q of t_k positions (prefix longer / shorter than the cache offset; offsets
# t_k - t_q = 30, 17 put the causal edge one row/column off a block boundary).
@pytest.mark.parametrize(
    "t_q,t_k,prefix_len,blocks",
    [(1, 37, 0, None), (5, 40, 0, None), (5, 40, 38, None), (5, 40, 20, None), (17, 50, 40, (16, 32)),
     (33, 70, 0, (32, 16)), (16, 46, 0, (16, 16)), (20, 50, 0, (16, 32)), (40, 57, 0, (16, 16))],
)  # fmt: skip
def test_kv_cache_queries_at_the_end(t_q, t_k, prefix_len, blocks):
    q, k, v = _inputs(1, 2, t_q, t_k, 32, torch.float32)
    _check_against_ref(q, k, v, causal=True, prefix_len=prefix_len, blocks=blocks, atol=2e-5, rtol=1e-4)


def test_non_causal_t_q_greater_than_t_k():
    q, k, v = _inputs(1, 2, 40, 9, 32, torch.float32)
    _check_against_ref(q, k, v, causal=False, prefix_len=0, atol=2e-5, rtol=1e-4)


def test_strided_bthd_layout():
    q, k, v = _inputs(2, 3, 45, 45, 32, torch.float32, layout="bthd")
    assert not q.is_contiguous()
    _check_against_ref(q, k, v, causal=True, prefix_len=11, blocks=(16, 32), atol=2e-5, rtol=1e-4)


class _GridSpy:
    """Stands in for a Triton kernel: records each launch grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_grid_keeps_batch_and_heads_off_the_65535_axes():
    # issue 28 item 12: B * H on grid axis 1 failed to launch above 65535 (B = 4096, H = 16 is 65536)
    assert attn._grid(8, 4096, 16) == (8, 16, 4096)
    assert attn._MAX_GRID_YZ == 65535
    with pytest.raises(ValueError, match="heads exceed"):
        attn._grid(8, 1, 70000)
    slices = attn._batch_slices(200_000)
    assert [s.stop - s.start for s in slices] == [65535, 65535, 65535, 3395]
    assert slices[0].start == 0 and all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_batch_above_the_grid_limit_is_launched_in_slices(monkeypatch):
    # the grid limit lowered to 3 so that the interpreter runs the sliced path on a small batch (B = 7, H = 3)
    monkeypatch.setattr(attn, "_MAX_GRID_YZ", 3)
    spies = {}
    for name in ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        spies[name] = _GridSpy(getattr(attn, name))
        monkeypatch.setattr(attn, name, spies[name])
    q, k, v = _inputs(7, 3, 17, 17, 32, torch.float32)
    _check_against_ref(q, k, v, causal=True, prefix_len=5, atol=2e-5, rtol=1e-4)
    for name, spy in spies.items():
        assert [g[2] for g in spy.grids] == [3, 3, 1], (name, spy.grids)  # batch slices on axis 2
        assert all(g[1] == 3 for g in spy.grids), (name, spy.grids)  # heads on axis 1


def test_fp16_interpreter_or_gpu():
    q, k, v = _inputs(1, 2, 65, 65, 64, torch.float16)
    _check_against_ref(q, k, v, causal=True, prefix_len=21, atol=2e-2, rtol=2e-2)


def test_sm_scale():
    q, k, v = _inputs(1, 2, 20, 20, 32, torch.float32)
    got = flash_attention(q, k, v, causal=True, prefix_len=3, sm_scale=0.3)
    want = attention_ref(q, k, v, causal=True, prefix_len=3, sm_scale=0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the poisoned rows >= 32, in numpy
@pytest.mark.parametrize("prefix_len", [0, 20])
def test_fully_masked_key_blocks_are_skipped(prefix_len):
    """Key/value blocks that no row of a query block can see must never be read: poisoning them with NaN
    leaves those rows bit-identical (a kernel that loads and masks them would produce 0 * NaN = NaN)."""
    t, bm_bn = 64, (16, 16)
    q, k, v = _inputs(1, 2, t, t, 32, torch.float32)
    do = torch.randn(q.shape)
    fa = lambda q_, k_, v_: flash_attention(q_, k_, v_, prefix_len=prefix_len, _blocks=bm_bn)  # noqa: E731
    clean = _fwd_bwd(fa, q, k, v, do)
    # Rows 0..31 see keys < 32 at most (causal, or prefix 20 < 32) -> poison keys >= 32.
    kp, vp = k.detach().clone(), v.detach().clone()
    kp[:, :, 32:] = float("nan")
    vp[:, :, 32:] = float("nan")
    kp.requires_grad_(), vp.requires_grad_()
    o, dq, _, _ = _fwd_bwd(fa, q, kp, vp, do)
    assert torch.equal(o[:, :, :32], clean[0][:, :, :32])
    assert torch.equal(dq[:, :, :32], clean[1][:, :, :32])
    # Keys >= 32 are seen only by rows >= 32 -> poison the upstream gradient of rows < 32.
    dop = do.clone()
    dop[:, :, :32] = float("nan")
    _, _, dk, dv = _fwd_bwd(fa, q, k, v, dop)
    assert torch.equal(dk[:, :, 32:], clean[2][:, :, 32:])
    assert torch.equal(dv[:, :, 32:], clean[3][:, :, 32:])


def test_effective_prefix_len():
    assert effective_prefix_len(10, 10, 0, True) == 0
    assert effective_prefix_len(10, 10, 1, True) == 0  # key 0 is visible causally anyway
    assert effective_prefix_len(10, 10, 2, True) == 2
    assert effective_prefix_len(10, 10, 99, True) == 10
    assert effective_prefix_len(10, 10, 3, False) == 10
    assert effective_prefix_len(2, 10, 9, True) == 0  # first query at position 8 sees keys 0..8 anyway
    assert effective_prefix_len(2, 10, 10, True) == 10
    with pytest.raises(ValueError, match="prefix_len"):
        effective_prefix_len(4, 4, -1, True)


def test_input_errors():
    q, k, v = _inputs(1, 2, 8, 8, 48, torch.float32)
    with pytest.raises(ValueError, match="head dim 48"):
        flash_attention(q, k, v)
    q, k, v = _inputs(1, 2, 9, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="T_q <= T_k"):
        flash_attention(q, k, v)
    q, k, v = _inputs(1, 2, 8, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        flash_attention(q, k[:, :1], v)
    assert HEAD_DIMS == (16, 32, 64, 128)


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import svq_fast.kernels.attention as A

assert not A._INTERPRET
PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
for fn, bm, bn, warps in [(A._attn_fwd, 128, 64, 4), (A._attn_bwd_dkdv, 64, 128, 8), (A._attn_bwd_dq, 128, 64, 8),
                          (A._attn_bwd_preprocess, 64, None, 4)]:
    const = {"HEAD_DIM": 64, "BLOCK_M": bm} | ({"BLOCK_N": bn} if bn else {})
    sig = {n: "constexpr" if n in const else "*bf16" if n in PTRS else "*fp32" if n in ("LSE", "DELTA")
           else "fp32" if n == "sm_scale" else "i32" for n in fn.arg_names}
    triton.compile(ASTSource(fn, sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": warps, "num_stages": 3})
print("compiled")
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler does: compile the bf16 kernels down to an H100
    cubin (triton's bundled ptxas; no GPU needed) in a fresh process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("triton's ptxas is not available here")
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "t,d,prefix_frac",
    [(17, 64, 0.37), (257, 64, 0.0), (257, 128, 0.37), (1000, 64, 1.0), (1000, 128, 0.0), (300, 32, 0.5)],
)
def test_gpu_default_configs_match_ref(dtype, t, d, prefix_frac):  # pinned per-kernel configs
    q, k, v = _inputs(2, 3, t, t, d, dtype, device="cuda")
    p = math.ceil(prefix_frac * t)
    _check_against_ref(q, k, v, causal=True, prefix_len=p, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [(64, 128), (128, 64), (128, 128), (64, 64)])
@pytest.mark.parametrize("t_q,t_k,p", [(300, 300, 0), (300, 300, 151), (77, 300, 280), (1, 300, 0)])
def test_gpu_fixed_blocks_matches_ref(blocks, t_q, t_k, p):
    q, k, v = _inputs(2, 3, t_q, t_k, 64, torch.bfloat16, device="cuda", layout="bthd")
    _check_against_ref(q, k, v, causal=True, prefix_len=p, blocks=blocks, atol=1e-3, rtol=0)


@pytest.mark.gpu
def test_gpu_fp32_kernel_correct_with_tf32_dots():
    # fp32 on GPU is not offered by the dispatch, but the kernel itself must stay correct (TF32 dots).
    q, k, v = _inputs(1, 2, 130, 130, 64, torch.float32, device="cuda")
    _check_against_ref(q, k, v, causal=True, prefix_len=40, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_autotune_smoke(monkeypatch):
    """SVQ_FAST_AUTOTUNE=1 (opt-in): the candidates of the three kernels compile, run and match; one shape."""
    monkeypatch.setenv("SVQ_FAST_AUTOTUNE", "1")
    q, k, v = _inputs(1, 2, 300, 300, 128, torch.bfloat16, device="cuda")
    _check_against_ref(q, k, v, causal=True, prefix_len=120, atol=1e-3, rtol=0)


def test_default_and_candidate_configs_are_few():
    # pinned defaults for every kernel and head-dim class; at most 4 autotune candidates per kernel
    for kind in ("fwd", "dkdv", "dq"):
        assert {(kind, 64), (kind, 128)} <= set(attn._DEFAULTS)
        assert len(attn._TUNED[kind]) <= 4
        assert len(attn.candidate_blocks(128)) == 4
    assert attn._launch_cfg("fwd", 64, (32, 16)) == (32, 16, 4, 3)
    assert attn._mask_kind(0, 100) == 0 and attn._mask_kind(10, 100) == 1 and attn._mask_kind(100, 100) == 2
