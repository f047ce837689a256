"""Flash attention (forward + backward) in Triton, with causal and prefix-causal masks.

What is fused: S = Q K^T * scale, the mask, the softmax and O = P V run in one kernel per query block
with an online softmax (running max and running sum), so the (T_q, T_k) score and probability matrices
never exist in memory. The forward saves only O and the row log-sum-exp (fp32, (B, H, T_q)). The
backward recomputes P block by block from Q, K and that log-sum-exp:
    1. `_attn_bwd_preprocess`: delta = rowsum(dO * O)            (B, H, T_q) fp32
    2. `_attn_bwd_dkdv`: one program per key block, loops over query blocks -> dK, dV (no atomics)
    3. `_attn_bwd_dq`:   one program per query block, loops over key blocks  -> dQ   (no atomics)

Memory saved: the reference (and SDPA's math backend) holds B*H*T_q*T_k scores and probabilities
(fp32 here: 2 * 4 bytes per entry, e.g. 2 GiB for B=32, H=16, T=1024 per saved matrix); this op holds
O (the output, needed anyway) and 4 bytes per query row.

Masks (one rule covers all three): query row i sits at absolute position p = i + (T_k - T_q) (queries are
the LAST T_q of the T_k positions, as in KV-cache decoding) and may attend key j iff
    j <= p  or  j < prefix_len.
prefix_len = 0 is causal, 0 < P < T_k is prefix-causal (the first P tokens attend to each other
bidirectionally, the rest causally), P = T_k is full (non-causal) attention. Key blocks that no row of a
query block can see are skipped entirely (about half the work for causal); blocks that every row sees
completely run without any mask arithmetic; only the blocks on the diagonal / prefix edge / sequence end
are masked. Any T works: the ragged ends are masked inside the kernels, callers never pad.

Where it is fast / slow:
- fast: fp16/bf16 on a recent GPU, head_dim 64 or 128, T >= 256 (enough query blocks * B * H to fill the
  SMs); causal and prefix-causal masks (skipped blocks). The layout is FlashAttention-2's (as in the Triton
  tutorial); it has no warp specialisation or TMA (the GPU environment pins triton 3.6, and this file uses
  only plain pointer loads), so expect it below FlashAttention-3 / cuDNN on H100. Its GPU speed had not
  been measured when this was written: see benchmarks/bench_attention.py and benchmarks/results/.
- slow: tiny T (< 64) or tiny B*H (few programs), head_dim 16/32 (tensor cores underused), and
  decoding with T_q = 1 (one program per head does all the work; SDPA/flash-decoding is better there).
- The backward recomputes Q K^T twice (7 matmuls instead of 5) to avoid atomics; that is the price of
  the deterministic, atomic-free two-kernel layout.
- fp32 is what the interpreter tests use (TRITON_INTERPRET=1 on CPU; a correctness path, never a
  performance path). On a GPU fp32 dots would run as TF32, so the dispatch offers fp16/bf16 only there.

Shapes: q (B, H, T_q, d), k and v (B, H, T_k, d), T_q <= T_k when masked, d in {16, 32, 64, 128}.
Any strides (the kernels take all four strides; only a non-unit last-dim stride is copied).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl

from svq_fast.kernels._library import define_triton_op, launch, tracing
from svq_fast.kernels._tuning import autotune_enabled, pow2_bucket

__all__ = [
    "HEAD_DIMS",
    "attention_ref",
    "effective_prefix_len",
    "flash_attention",
    "flash_attention_op",
]

# Autotune-key-only kernel arguments: never specialised (value 1 would otherwise compile a second binary).
_KEY_ONLY = ["T_BUCKET", "TQ_BUCKET", "MASK_KIND"]
# Decided once, at import: the interpreter must be on before the @triton.jit functions below are defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HEAD_DIMS = (16, 32, 64, 128)
# The interpreter runs one numpy op per tl op per block: small fixed blocks keep the tests fast.
_INTERPRET_BLOCKS = (16, 16)


def effective_prefix_len(t_q: int, t_k: int, prefix_len: int, causal: bool) -> int:
    """The prefix length the kernels see, normalised so that equal masks get equal numbers.

    Not causal -> t_k (every key visible). A prefix that every query already sees causally (the first query
    sits at position t_k - t_q, so keys j <= t_k - t_q are visible anyway) collapses to 0 (plain causal);
    a prefix longer than t_k is clamped to t_k (full attention)."""
    if not causal:
        return t_k
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    if prefix_len <= t_k - t_q + 1:
        return 0
    return min(prefix_len, t_k)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    prefix_len: int = 0,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Pure torch reference: materialises the (T_q, T_k) scores, computes in fp32, returns q.dtype.

    Same mask rule as the kernels: query i is at position i + T_k - T_q and sees key j iff j <= pos or
    j < prefix_len (causal=False: every key)."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, H, T_q, T_k)
    if causal:
        q_pos = torch.arange(t_k - t_q, t_k, device=q.device)[:, None]
        k_pos = torch.arange(t_k, device=q.device)[None, :]
        allowed = (k_pos <= q_pos) | (k_pos < prefix_len)  # (T_q, T_k)
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return (p @ v.float()).to(q.dtype)  # (B, H, T_q, d)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_inner(
    acc,  # (BLOCK_M, HEAD_DIM) fp32
    l_i,  # (BLOCK_M,) fp32 running sum
    m_i,  # (BLOCK_M,) fp32 running max (log2 units)
    q,  # (BLOCK_M, HEAD_DIM)
    k_base,
    v_base,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_m,  # (BLOCK_M,) query rows
    q_shift,  # absolute position of query row 0 = T_K - T_Q
    lo,
    hi,
    T_K,
    PREFIX,
    qk_scale,  # sm_scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd  # (HEAD_DIM, BLOCK_N)
        v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, HEAD_DIM)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < T_K, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T_K, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, kT) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, log2 units
        if MASKED:
            visible = (offs_n[None, :] <= offs_m[:, None] + q_shift) | (offs_n[None, :] < PREFIX)
            visible = visible & (offs_n[None, :] < T_K)
            qk = tl.where(visible, qk, -1.0e30)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_KEY_ONLY)
def _attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,  # (B * H, T_Q) fp32, log2 units of the scaled scores
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    H,
    T_Q,
    T_K,
    PREFIX,
    sm_scale,
    T_BUCKET,  # autotune key only (power-of-two bucket of T_K), unused in the body
    TQ_BUCKET,  # autotune key only (power-of-two bucket of T_Q)
    MASK_KIND,  # autotune key only: 0 causal, 1 prefix-causal, 2 full
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)  # grid (blocks, H, B): see _grid
    off_b = tl.program_id(2).to(tl.int64)
    pid_bh = off_b * H + off_h  # row of the (B * H, T_Q) LSE / DELTA
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0
    )  # (BLOCK_M, HEAD_DIM)

    q_shift = T_K - T_Q
    qk_scale = sm_scale * 1.4426950408889634
    # Masked scores (and the initial running max) are -1e30, not -inf: a row that so far saw only masked
    # keys never computes -inf - (-inf) = nan, and exp2(-1e30 - m) is exactly 0 next to any real score.
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Keys [0, full_end) are visible to every row of this block (row start_m sees keys <= start_m + q_shift,
    # and everyone sees the prefix); [full_end, hi) is the masked edge; keys >= hi are seen by no row.
    full_end = tl.minimum(tl.maximum(start_m + q_shift + 1, PREFIX), T_K)
    n_full = (full_end // BLOCK_N) * BLOCK_N
    hi = tl.minimum(tl.maximum(start_m + BLOCK_M + q_shift, PREFIX), T_K)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, q_shift, 0, n_full, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_N, False,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, q_shift, n_full, hi, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_N, True,
    )  # fmt: skip

    acc = acc / l_i[:, None]
    lse = m_i + tl.math.log2(l_i)  # (BLOCK_M,)
    tl.store(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, lse, mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    O,
    DO,
    DELTA,  # (B * H, T_Q) fp32
    stride_ob,
    stride_oh,
    stride_ot,
    stride_od,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    H,
    T_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)  # grid (blocks, H, B): see _grid
    off_b = tl.program_id(2).to(tl.int64)
    pid_bh = off_b * H + off_h  # row of the (B * H, T_Q) LSE / DELTA
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * T_Q + offs_m, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk,  # (BLOCK_N, HEAD_DIM) fp32
    dv,  # (BLOCK_N, HEAD_DIM) fp32
    k,  # (BLOCK_N, HEAD_DIM)
    v,  # (BLOCK_N, HEAD_DIM)
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qt,
    stride_qd,
    stride_dot,
    stride_dod,
    offs_n,  # (BLOCK_N,) key rows
    q_shift,
    lo,
    hi,
    T_Q,
    T_K,
    PREFIX,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        # Rows past T_Q load q = dO = 0 and lse = delta = 0: their p is finite and their contribution
        # (p^T dO and p * (dO v^T - delta)) is exactly zero, so only loads need the row mask.
        row_ok = offs_m < T_Q
        q = tl.load(
            q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0
        )  # (BLOCK_M, HEAD_DIM)
        do = tl.load(
            do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
            mask=row_ok[:, None],
            other=0.0,
        )  # (BLOCK_M, HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
        qkT = tl.dot(k, tl.trans(q)) * qk_scale  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            visible = (offs_n[:, None] <= offs_m[None, :] + q_shift) | (offs_n[:, None] < PREFIX)
            visible = visible & (offs_n[:, None] < T_K) & row_ok[None, :]
            pT = tl.where(visible, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do)
        dpT = tl.dot(v, tl.trans(do)).to(tl.float32)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q)
    return dk, dv


@triton.jit(do_not_specialize=_KEY_ONLY)
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dkb,
    stride_dkh,
    stride_dkt,
    stride_dkd,
    stride_dvb,
    stride_dvh,
    stride_dvt,
    stride_dvd,
    H,
    T_Q,
    T_K,
    PREFIX,
    sm_scale,
    T_BUCKET,  # autotune key only
    TQ_BUCKET,  # autotune key only
    MASK_KIND,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query block (inner loop)
    BLOCK_N: tl.constexpr,  # key block (this program)
):
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)  # grid (blocks, H, B): see _grid
    off_b = tl.program_id(2).to(tl.int64)
    pid_bh = off_b * H + off_h  # row of the (B * H, T_Q) LSE / DELTA
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_base = LSE + pid_bh.to(tl.int64) * T_Q
    delta_base = DELTA + pid_bh.to(tl.int64) * T_Q

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T_K
    k = tl.load(
        K + off_b * stride_kb + off_h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
        mask=key_ok[:, None],
        other=0.0,
    )  # (BLOCK_N, HEAD_DIM)
    v = tl.load(
        V + off_b * stride_vb + off_h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
        mask=key_ok[:, None],
        other=0.0,
    )  # (BLOCK_N, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    q_shift = T_K - T_Q
    qk_scale = sm_scale * 1.4426950408889634
    t_q_pad = tl.cdiv(T_Q, BLOCK_M) * BLOCK_M
    # First query row that sees any key of this block: row i sees key start_n iff i + q_shift >= start_n,
    # every row sees it when it is in the prefix.
    m_lo = tl.maximum(start_n - q_shift, 0)
    m_lo = tl.where(start_n < PREFIX, 0, m_lo)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    # First query block whose rows see every key of this block (key start_n + BLOCK_N - 1 visible):
    # before it the causal edge needs the mask. Whole block in the prefix: no edge. Ragged last key block:
    # mask everything (it also zeroes the padded key columns).
    m_full = tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0)
    m_full = ((m_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    m_full = tl.where(start_n + BLOCK_N <= PREFIX, m_lo, m_full)
    m_full = tl.where(start_n + BLOCK_N > T_K, t_q_pad, m_full)
    m_full = tl.minimum(tl.maximum(m_full, m_lo), t_q_pad)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, q_shift, m_lo, m_full, T_Q, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_M, True,
    )  # fmt: skip
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
        offs_n, q_shift, m_full, t_q_pad, T_Q, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_M, False,
    )  # fmt: skip

    dk = dk * sm_scale
    dk_ptrs = DK + off_b * stride_dkb + off_h * stride_dkh + offs_n[:, None] * stride_dkt
    tl.store(dk_ptrs + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=key_ok[:, None])
    dv_ptrs = DV + off_b * stride_dvb + off_h * stride_dvh + offs_n[:, None] * stride_dvt
    tl.store(dv_ptrs + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=key_ok[:, None])


@triton.jit
def _attn_bwd_dq_inner(
    dq,  # (BLOCK_M, HEAD_DIM) fp32
    q,  # (BLOCK_M, HEAD_DIM)
    do,  # (BLOCK_M, HEAD_DIM)
    lse,  # (BLOCK_M,)
    delta,  # (BLOCK_M,)
    k_base,
    v_base,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    offs_m,
    q_shift,
    lo,
    hi,
    T_K,
    PREFIX,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd  # (BLOCK_N, HEAD_DIM)
        vT_ptrs = v_base + offs_n[None, :] * stride_vt + offs_d[:, None] * stride_vd  # (HEAD_DIM, BLOCK_N)
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T_K, other=0.0)
            vT = tl.load(vT_ptrs, mask=offs_n[None, :] < T_K, other=0.0)
        else:
            k = tl.load(k_ptrs)
            vT = tl.load(vT_ptrs)
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            visible = (offs_n[None, :] <= offs_m[:, None] + q_shift) | (offs_n[None, :] < PREFIX)
            visible = visible & (offs_n[None, :] < T_K)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit(do_not_specialize=_KEY_ONLY)
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    LSE,
    DELTA,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_dob,
    stride_doh,
    stride_dot,
    stride_dod,
    stride_dqb,
    stride_dqh,
    stride_dqt,
    stride_dqd,
    H,
    T_Q,
    T_K,
    PREFIX,
    sm_scale,
    T_BUCKET,  # autotune key only
    TQ_BUCKET,  # autotune key only
    MASK_KIND,  # autotune key only
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query block (this program)
    BLOCK_N: tl.constexpr,  # key block (inner loop)
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)  # grid (blocks, H, B): see _grid
    off_b = tl.program_id(2).to(tl.int64)
    pid_bh = off_b * H + off_h  # row of the (B * H, T_Q) LSE / DELTA
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T_Q
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BLOCK_M, HEAD_DIM)
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
        mask=row_ok[:, None],
        other=0.0,
    )  # (BLOCK_M, HEAD_DIM)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0)  # (BLOCK_M,)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    q_shift = T_K - T_Q
    qk_scale = sm_scale * 1.4426950408889634
    # Same key ranges as the forward.
    full_end = tl.minimum(tl.maximum(start_m + q_shift + 1, PREFIX), T_K)
    n_full = (full_end // BLOCK_N) * BLOCK_N
    hi = tl.minimum(tl.maximum(start_m + BLOCK_M + q_shift, PREFIX), T_K)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, q_shift, 0, n_full, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_N, False,
    )  # fmt: skip
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
        offs_m, q_shift, n_full, hi, T_K, PREFIX, qk_scale,
        HEAD_DIM, BLOCK_N, True,
    )  # fmt: skip

    dq = dq * sm_scale
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqt
    tl.store(dq_ptrs + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------------
# Autotuned variants (compiled mode only; the interpreter uses the plain kernels with fixed blocks)
# ----------------------------------------------------------------------------------------------------


def _configs(pairs):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in pairs]


def _prune(configs, named_args, **kwargs):
    # Blocks larger than the (bucketed) sequence only add masked work; configs that spill at d = 128 are kept for
    # d <= 64 only; keep at least one config.
    t = named_args["T_BUCKET"]
    big_d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64)) > 64
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(t, 64)
        and c.kwargs["BLOCK_N"] <= max(t, 64)
        and not (big_d and (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in _SPILL_AT_D128)
    ]
    return kept or configs[:1]


# Pinned defaults, (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim class (d <= 64 | d = 128),
# fp16 and bf16 alike: each compiles for sm_90a (triton 3.6) with 0 spills and <= 227 KiB shared memory
# (benchmarks/results/sm90_static.md). At d = 128 the fp32 accumulators (dK and dV: 2 x BLOCK_N x 128) need 8 warps
# or a 64-row key block to stay in registers.
_DEFAULTS = {
    ("fwd", 64): (128, 64, 4, 3),
    ("fwd", 128): (128, 64, 8, 3),  # 4 warps spill 252 B at d = 128
    ("dkdv", 64): (64, 128, 8, 3),
    ("dkdv", 128): (64, 64, 8, 2),  # 64x128 spills 36-40 B, 64x64 with 4 warps 184 B
    ("dq", 64): (128, 64, 8, 3),
    ("dq", 128): (128, 64, 8, 3),  # 4 warps spill at d = 128
}
# SVQ_FAST_AUTOTUNE=1 candidates (at most 4 per kernel; compiled per head dim, dtype and key). Every one compiles
# clean at d = 64 and d = 128, except those in _SPILL_AT_D128, which _prune keeps for d <= 64 only
# (benchmarks/check_sm90.py --candidates).
_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)])
_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 3), (32, 128, 8, 3)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 3)])
_SPILL_AT_D128 = {(128, 64, 4, 3), (64, 128, 8, 3)}
_TUNED = {"fwd": _FWD_CONFIGS, "dkdv": _DKDV_CONFIGS, "dq": _DQ_CONFIGS}
# Autotune key: key length bucket, query length bucket (decoding vs training), mask kind, head dim; the autotuner
# adds the pointer dtypes.
_KEY = ["T_BUCKET", "TQ_BUCKET", "MASK_KIND", "HEAD_DIM"]
if not _INTERPRET:
    _attn_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
        _attn_fwd
    )
    _attn_bwd_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
        _attn_bwd_dkdv
    )
    _attn_bwd_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": _prune})(
        _attn_bwd_dq
    )


def candidate_blocks(d: int) -> list[dict]:
    """The autotune candidates for head dim d (after the d = 128 filter) as explicit per-kernel configs
    {"fwd"|"dkdv"|"dq": (BM, BN, warps, stages)}, one dict per candidate index (benchmarks/check_sm90.py)."""
    per_kind = []
    for kind in ("fwd", "dkdv", "dq"):
        cfgs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in _TUNED[kind]]
        cfgs = [c for c in cfgs if not (d > 64 and c in _SPILL_AT_D128)]
        per_kind.append(cfgs + cfgs[-1:] * (4 - len(cfgs)))  # pad by repeating (deduplicated by the check)
    return [dict(zip(("fwd", "dkdv", "dq"), r)) for r in zip(*per_kind)]


# ----------------------------------------------------------------------------------------------------
# Launchers + autograd
# ----------------------------------------------------------------------------------------------------


def _bucket(t: int) -> int:
    return pow2_bucket(t, 16, 8192)


def _mask_kind(prefix: int, t_k: int) -> int:
    return 0 if prefix == 0 else (2 if prefix >= t_k else 1)


def _launch_cfg(kind: str, d: int, blocks) -> tuple[int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel, or None to autotune.
    blocks: None (interpreter: small fixed blocks; GPU: pinned default, autotuned with SVQ_FAST_AUTOTUNE=1),
    (BLOCK_M, BLOCK_N) pinned by the caller (4 warps, 3 stages), or {kind: (BM, BN, warps, stages)}."""
    if isinstance(blocks, dict):
        return blocks[kind]
    if blocks is not None:
        return (*blocks, 4, 3)
    if _INTERPRET:
        return (*_INTERPRET_BLOCKS, 4, 3)
    if autotune_enabled():
        return None
    return _DEFAULTS[(kind, 128 if d > 64 else 64)]


def _strides(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


# CUDA limits grid axes 1 and 2 to 65535 programs (axis 0 to 2^31 - 1). The query / key blocks stay on axis 0 and
# vary fastest, so the programs running together share one head's K and V in L2 (FlashAttention-2's order); heads go
# on axis 1 and the batch on axis 2 (a single B * H axis failed to launch above 65535, e.g. B = 4096 with H = 16).
# A batch above the limit is launched in slices of at most _MAX_GRID_YZ (the kernels see a view of the slice).
_MAX_GRID_YZ = 65535


def _grid(n_blocks: int, b: int, h: int) -> tuple[int, int, int]:
    """Launch grid (blocks along T, heads, batch) of every attention kernel, for a batch slice of b <= _MAX_GRID_YZ."""
    if h > _MAX_GRID_YZ:
        raise ValueError(f"flash_attention: {h} heads exceed the CUDA grid limit of {_MAX_GRID_YZ} on axis 1")
    if b > _MAX_GRID_YZ:
        raise ValueError(f"flash_attention: batch slice {b} exceeds {_MAX_GRID_YZ}; launch it via _batch_slices")
    return (n_blocks, h, b)


def _batch_slices(b: int) -> list[slice]:
    """Batch slices of at most _MAX_GRID_YZ samples, one launch each."""
    return [slice(lo, min(lo + _MAX_GRID_YZ, b)) for lo in range(0, b, _MAX_GRID_YZ)]


def _fwd(q, k, v, prefix: int, sm_scale: float, blocks):
    b, h, t_q, d = q.shape
    o = torch.empty_like(q)  # (B, H, T_q, d)
    lse = torch.empty((b, h, t_q), device=q.device, dtype=torch.float32)  # (B, H, T_q) log2 units
    for sl in _batch_slices(b):
        _fwd_launch(q[sl], k[sl], v[sl], o[sl], lse[sl], prefix, sm_scale, blocks)
    return o, lse


def _fwd_launch(q, k, v, o, lse, prefix: int, sm_scale: float, blocks) -> None:
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o))
    args += (h, t_q, t_k, prefix, sm_scale, _bucket(t_k), _bucket(t_q), _mask_kind(prefix, t_k))
    cfg = _launch_cfg("fwd", d, blocks)
    if cfg is None:
        grid = lambda meta: _grid(triton.cdiv(t_q, meta["BLOCK_M"]), b, h)  # noqa: E731
        launch(_attn_fwd_tuned)[grid](*args, HEAD_DIM=d)
    else:
        bm, bn, warps, stages = cfg
        launch(_attn_fwd)[_grid(triton.cdiv(t_q, bm), b, h)](
            *args, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )


def _bwd(do, q, k, v, o, lse, prefix: int, sm_scale: float, blocks):
    delta = torch.empty_like(lse)  # (B, H, T_q) fp32
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    for sl in _batch_slices(q.shape[0]):
        _bwd_launch(do[sl], q[sl], k[sl], v[sl], o[sl], lse[sl], delta[sl], dq[sl], dk[sl], dv[sl], prefix,
                    sm_scale, blocks)  # fmt: skip
    return dq, dk, dv


def _bwd_launch(do, q, k, v, o, lse, delta, dq, dk, dv, prefix: int, sm_scale: float, blocks) -> None:
    b, h, t_q, d = q.shape
    t_k = k.shape[2]
    pre_block = 16 if _INTERPRET else 64
    launch(_attn_bwd_preprocess)[_grid(triton.cdiv(t_q, pre_block), b, h)](
        o, do, delta, *_strides(o), *_strides(do), h, t_q, HEAD_DIM=d, BLOCK_M=pre_block
    )
    common = (h, t_q, t_k, prefix, sm_scale, _bucket(t_k), _bucket(t_q), _mask_kind(prefix, t_k))
    dkdv_args = (q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do))
    dkdv_args += (*_strides(dk), *_strides(dv), *common)
    dq_args = (q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v), *_strides(do))
    dq_args += (*_strides(dq), *common)
    cfg = _launch_cfg("dkdv", d, blocks)
    if cfg is None:
        grid_kv = lambda meta: _grid(triton.cdiv(t_k, meta["BLOCK_N"]), b, h)  # noqa: E731
        launch(_attn_bwd_dkdv_tuned)[grid_kv](*dkdv_args, HEAD_DIM=d)
    else:
        bm, bn, warps, stages = cfg
        launch(_attn_bwd_dkdv)[_grid(triton.cdiv(t_k, bn), b, h)](
            *dkdv_args, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    cfg = _launch_cfg("dq", d, blocks)
    if cfg is None:
        grid_q = lambda meta: _grid(triton.cdiv(t_q, meta["BLOCK_M"]), b, h)  # noqa: E731
        launch(_attn_bwd_dq_tuned)[grid_q](*dq_args, HEAD_DIM=d)
    else:
        bm, bn, warps, stages = cfg
        launch(_attn_bwd_dq)[_grid(triton.cdiv(t_q, bm), b, h)](
            *dq_args, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device (a compiled graph guards its device
    itself, and a fake-tensor trace has none to set)."""
    return torch.cuda.device(t.device) if t.is_cuda and not tracing() else contextlib.nullcontext()


# Registered ops (svq_fast/kernels/_library.py): svq_fast::flash_attention -> (o, lse) and its backward op. `blocks`
# travels as an int list: [] (defaults), [BLOCK_M, BLOCK_N] (every kernel, 4 warps, 3 stages) or 12 ints, the
# (BM, BN, warps, stages) of fwd, dkdv and dq.
_KINDS = ("fwd", "dkdv", "dq")


def _encode_blocks(blocks) -> list[int]:
    if blocks is None:
        return []
    if isinstance(blocks, dict):
        return [int(x) for kind in _KINDS for x in blocks[kind]]
    return [int(x) for x in blocks]


def _decode_blocks(blocks: list[int]):
    if not blocks:
        return None
    if len(blocks) == 2:
        return tuple(blocks)
    return {kind: tuple(blocks[4 * i : 4 * i + 4]) for i, kind in enumerate(_KINDS)}


def _flash_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, sm_scale: float, blocks: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """o = softmax(q k^T * sm_scale + mask) v with the mask given by `prefix` (already normalised, see
    `effective_prefix_len`) -> (o (B, H, T_q, d), lse (B, H, T_q) fp32, log2 units)."""
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    with _device_guard(q):
        return _fwd(q, k, v, prefix, sm_scale, _decode_blocks(blocks))


def _flash_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: int, sm_scale: float, blocks: list[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    b, h, t_q, _ = q.shape
    return torch.empty_like(_unit_last(q)), q.new_empty((b, h, t_q), dtype=torch.float32)


def _flash_backward_impl(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, prefix: int, sm_scale: float, blocks: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    with _device_guard(q):
        return _bwd(_unit_last(do), q, k, v, o, lse, prefix, sm_scale, _decode_blocks(blocks))


def _flash_backward_fake(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, prefix: int, sm_scale: float, blocks: list[int]
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return torch.empty_like(_unit_last(q)), torch.empty_like(_unit_last(k)), torch.empty_like(_unit_last(v))


def _flash_setup_context(ctx, inputs, output):
    q, k, v, prefix, sm_scale, blocks = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.prefix, ctx.sm_scale, ctx.blocks = prefix, sm_scale, blocks


def _flash_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_backward_op(do, q, k, v, o, lse, ctx.prefix, ctx.sm_scale, ctx.blocks)
    return dq, dk, dv, None, None, None


flash_attention_op = define_triton_op("flash_attention", _flash_impl, _flash_fake)
flash_attention_backward_op = define_triton_op("flash_attention_backward", _flash_backward_impl, _flash_backward_fake)
flash_attention_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def _check(q, k, v, causal: bool):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be (B, H, T, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"flash_attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(need q (B, H, T_q, d) and k, v (B, H, T_k, d))"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {q.shape[3]} not supported (supported: {HEAD_DIMS})")
    if k.shape[2] == 0 or q.shape[2] == 0:
        raise ValueError("flash_attention: empty sequence")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"flash_attention: masked attention needs T_q <= T_k (queries are the last T_q of the T_k "
            f"positions), got T_q={q.shape[2]}, T_k={k.shape[2]}"
        )


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    prefix_len: int = 0,
    sm_scale: float | None = None,
    _blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Triton flash attention. q (B, H, T_q, d), k and v (B, H, T_k, d) -> (B, H, T_q, d) in q.dtype.

    causal=True: query i (at position i + T_k - T_q) sees keys j <= its position, plus keys j < prefix_len.
    causal=False: every key (prefix_len ignored). Differentiable in q, k, v.
    `_blocks=(BLOCK_M, BLOCK_N)` pins the block sizes of every kernel (tests); default: pinned per-kernel configs
    on GPU (autotuned with SVQ_FAST_AUTOTUNE=1), small fixed blocks in the interpreter."""
    _check(q, k, v, causal)
    prefix = effective_prefix_len(q.shape[2], k.shape[2], prefix_len, causal)
    scale = 1.0 / math.sqrt(q.shape[3]) if sm_scale is None else float(sm_scale)
    return flash_attention_op(q, k, v, prefix, scale, _encode_blocks(_blocks))[0]
