"""Fused nearest-codebook vector quantization: distance GEMM + running argmin + losses + straight-through.

Contract (shared by every backend):
    vq(z, codebook, beta=0.25, *, backend="auto", cosine=False, deterministic=True)
        -> VQOutput(z_q, indices, loss_codebook, loss_commit, min_dist)
    z: (N, D) latents, codebook: (K, D).
    indices: (N,) int64 argmin_k ||z_n - e_k||^2 (first index on exact ties).
    min_dist: (N,) ||z_n - e[indices_n]||^2 in fp32 (fp64 for fp64 inputs), recomputed exactly from the chosen
        code (not from the expanded ||z||^2 - 2 z.e + ||e||^2, which cancels); carries no gradient.
    z_q: (N, D) in z's dtype, value e[indices] (bit-exact copy), gradient passed to z unchanged.
    loss_codebook = mean((sg[z] - e)^2)        -> gradient to the codebook only
    loss_commit   = beta * mean((z - sg[e])^2) -> gradient to z only (beta on the commitment term)
    Both means run over the N * D elements. z and codebook of different dtypes are computed in the promoted
    dtype. cosine=True l2-normalises z and the codebook (differentiable torch) before the lookup.

What is fused (Triton, GPU): one kernel streams the codebook in (BLOCK_K, BLOCK_D) tiles against a
(BLOCK_N, BLOCK_D) tile of z, accumulates z.e with tl.dot in fp32 whatever the input dtype, turns it into
||e||^2 - 2 z.e and folds each (BLOCK_N, BLOCK_K) block into a running min / argmin held in registers; a second,
O(N * D) kernel merges the split-K partial minima, gathers e[idx] into z_q and computes the exact per-row squared
error, which gives min_dist and both losses (a sum over N values) without touching an N x K buffer again.
Backward: dL/dz = g_zq + 2 beta g_commit (z - e[idx]) / (N D) is one elementwise kernel; dL/de_k =
2 g_cb (count_k e_k - sum_{idx_n = k} z_n) / (N D) is a segment sum over rows sorted by index (deterministic:
fixed order, no atomics) or, with deterministic=False, an atomic scatter-add.

Memory saved: the textbook version materialises the (N, K) fp32 distance matrix (plus 2-3 temporaries of that
size in eager torch): 512 MiB each for N=8192, K=16384. The fused op keeps only (SPLIT, N) partials, the (K,)
code norms and the outputs: O(N * SPLIT + K + N * D).

Where it is fast / slow: it is a GEMM with a reduction epilogue, so it runs near GEMM speed when N * K * D is
large (N >= 4096, K >= 1024, D >= 64). Small N alone is handled by splitting K across programs (SPLIT) so the
GPU stays full. Slow relative to peak: tiny D (D=8 pads the dot to 16 and is bound by the argmin reduction, not
the tensor cores), very small N * K (launch-bound), and fp32: at torch's default "highest" matmul precision the dot
runs as "tf32x3" (3 TF32 tensor-core dots, ~fp32 accuracy, ~1/3 of TF32 speed); "high" gives plain TF32; exact
fp32 FMA dots ("ieee", no tensor cores) only with SVQ_FAST_VQ_FP32_IEEE=1 or `with fp32_precision("ieee")`.
Configs are pinned per dtype (see _default_argmin_config); SVQ_FAST_AUTOTUNE=1 autotunes over 4 candidates.

CPU: the native op in csrc/vq_cpu.cpp does the same with blocked BLAS calls (see that file). `vq_ref` is the
textbook torch version that builds the (N, K) matrix; every backend returns the same outputs.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from svq_fast._ext import native_available, native_error, native_ops
from svq_fast.kernels._library import define_op, define_triton_op, launch
from svq_fast.kernels._tuning import autotune_enabled, pow2_bucket

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    _HAS_TRITON = False

BACKENDS = ("auto", "triton", "native", "ref")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class VQOutput(NamedTuple):
    z_q: torch.Tensor  # (N, D), dtype of z
    indices: torch.Tensor  # (N,) int64
    loss_codebook: torch.Tensor  # () fp32 (fp64 for fp64 inputs)
    loss_commit: torch.Tensor  # () fp32 (fp64 for fp64 inputs)
    min_dist: torch.Tensor  # (N,) fp32 (fp64 for fp64 inputs)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def vq_ref(z: torch.Tensor, codebook: torch.Tensor, beta: float = 0.25, *, cosine: bool = False) -> VQOutput:
    """The textbook implementation: builds the (N, K) distance matrix. Computes in fp32 (fp64 for fp64 inputs),
    also inside a bf16/fp16 autocast region (which would run z @ e^T in bf16 and pick other codes), as the fused
    ops do (registered fp32 under autocast)."""
    _check_shapes(z, codebook)
    if cosine:
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    ct = torch.promote_types(torch.promote_types(z.dtype, codebook.dtype), torch.float32)
    zf, ef = z.to(ct), codebook.to(ct)
    with torch.autocast(z.device.type, enabled=False):
        # ||z||^2 - 2 z.e + ||e||^2 : (N, K)
        dist = zf.pow(2).sum(1, keepdim=True) - 2 * zf @ ef.t() + ef.pow(2).sum(1)[None, :]
    indices = dist.argmin(dim=1)  # (N,)
    e = codebook[indices]  # (N, D)
    loss_codebook = (z.detach().to(ct) - e.to(ct)).pow(2).mean()
    loss_commit = beta * (z.to(ct) - e.detach().to(ct)).pow(2).mean()
    min_dist = (z.detach().to(ct) - e.detach().to(ct)).pow(2).sum(1)  # (N,) exact distance at the chosen code
    z_q = e.detach().to(z.dtype) + (z - z.detach())  # value e (bit-exact), gradient straight through to z
    return VQOutput(z_q, indices, loss_codebook, loss_commit, min_dist)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit(do_not_specialize=["N_BUCKET"])
    def _vq_argmin_kernel(
        z_ptr,  # (N, D), row stride stride_z, unit column stride
        e_ptr,  # (K, D), row stride stride_e, unit column stride
        esq_ptr,  # (K,) fp32 ||e_k||^2
        part_val_ptr,  # (SPLIT, N) fp32 per-split min of ||e||^2 - 2 z.e
        part_idx_ptr,  # (SPLIT, N) int32 per-split argmin
        N,
        K,
        D,
        stride_z,
        stride_e,
        k_per_split,
        N_BUCKET,  # autotune key only (power-of-two bucket of N), unused in the body
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SINGLE_D: tl.constexpr,  # BLOCK_D >= D: load the z tile once, the K loop is the pipelined loop
        IS_FP32: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,  # "tf32x3", "tf32" or "ieee", fp32 inputs only
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_mask = rows < N
        z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z  # (BLOCK_N, 1) row pointers
        offs_k = tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)

        best = tl.full((BLOCK_N,), float("inf"), tl.float32)  # running min of ||e||^2 - 2 z.e
        best_idx = tl.zeros((BLOCK_N,), tl.int32)  # running argmin
        if SINGLE_D:
            d_mask = offs_d < D
            z_tile = tl.load(z_rows + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        for k0 in range(k_start, k_end, BLOCK_K):
            ks = k0 + offs_k  # (BLOCK_K,)
            k_mask = ks < k_end
            e_cols = e_ptr + ks[None, :] * stride_e  # (1, BLOCK_K) code pointers
            if SINGLE_D:
                e_tile = tl.load(e_cols + offs_d[:, None], mask=k_mask[None, :] & d_mask[:, None], other=0.0)
                if IS_FP32:
                    acc = tl.dot(z_tile, e_tile, input_precision=INPUT_PRECISION)  # (BLOCK_N, BLOCK_K) fp32
                else:
                    acc = tl.dot(z_tile, e_tile, out_dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    ds = d0 + offs_d
                    d_mask = ds < D
                    zt = tl.load(z_rows + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
                    et = tl.load(e_cols + ds[:, None], mask=k_mask[None, :] & d_mask[:, None], other=0.0)
                    if IS_FP32:
                        acc = tl.dot(zt, et, acc, input_precision=INPUT_PRECISION)
                    else:
                        acc = tl.dot(zt, et, acc)
            esq = tl.load(esq_ptr + ks, mask=k_mask, other=float("inf"))  # masked codes score +inf
            scores = esq[None, :] - 2.0 * acc  # (BLOCK_N, BLOCK_K)
            blk_min, blk_arg = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = blk_min < best  # strict: earlier blocks win ties (first index)
            best = tl.where(better, blk_min, best)
            best_idx = tl.where(better, blk_arg.to(tl.int32) + k0, best_idx)
        out = pid_s * N + rows
        tl.store(part_val_ptr + out, best, mask=row_mask)
        tl.store(part_idx_ptr + out, best_idx, mask=row_mask)

    def _single_d(args):
        return args["BLOCK_D"] >= args["D"]

    _vq_argmin = triton.heuristics({"SINGLE_D": _single_d})(_vq_argmin_kernel)

    def _argmin_configs():
        # The SVQ_FAST_AUTOTUNE=1 candidates (at most 4; BLOCK_D is clamped to the padded D by the pruner).
        # Every one compiles for sm_90a with 0 spills and <= 227 KiB shared memory in bf16/fp16 and fp32-tf32
        # (benchmarks/check_sm90.py --candidates).
        tiles = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 32, 8, 4))
        return [
            triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bn, bk, bd, w, s in tiles
        ]

    def _prune_argmin_configs(configs, named_args, **kwargs):
        # BLOCK_D beyond the padded D only wastes registers/shared memory: clamp it (tl.dot needs >= 16) and dedupe.
        d_cap = max(16, triton.next_power_of_2(named_args["D"]))
        fp32 = named_args["z_ptr"].dtype == torch.float32
        seen, out = set(), []
        for c in configs:
            kw = dict(c.kwargs)
            kw["BLOCK_D"] = min(kw["BLOCK_D"], d_cap)
            bn, bk = kw["BLOCK_N"], kw["BLOCK_K"]
            if fp32 and d_cap > 64:  # tf32x3 at D = 256 with 64-wide D chunks spills (124-600 B on sm_90a)
                kw["BLOCK_D"] = min(kw["BLOCK_D"], 32)
            if fp32 and bn * bk > 128 * 64:  # fp32 tiles are twice the bytes (and tf32x3 triples the dots)
                bn, bk = min(bn, 128), min(bk, 64)
                kw["BLOCK_N"], kw["BLOCK_K"] = bn, bk
            key = (kw["BLOCK_N"], kw["BLOCK_K"], kw["BLOCK_D"], c.num_warps, c.num_stages)
            if key not in seen:
                seen.add(key)
                out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        return out

    # Autotune key: N bucketed to a power of two (each new exact N would otherwise re-tune), the split size, K, D,
    # the fp32 dot precision; the autotuner adds the pointer dtypes itself.
    _vq_argmin_tuned = triton.autotune(
        configs=_argmin_configs(),
        key=["N_BUCKET", "K", "D", "k_per_split", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_argmin_configs},
    )(_vq_argmin)

    @triton.jit
    def _vq_epilogue_kernel(
        z_ptr,  # (N, D)
        e_ptr,  # (K, D)
        part_val_ptr,  # (SPLIT, N) fp32
        part_idx_ptr,  # (SPLIT, N) int32
        idx_ptr,  # (N,) int64 out
        zq_ptr,  # (N, D) out, dtype of z (= dtype of e)
        dist_ptr,  # (N,) fp32 out: ||z - e[idx]||^2
        N,
        D,
        SPLIT,
        stride_z,
        stride_e,
        stride_q,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        row_mask = rows < N
        best = tl.load(part_val_ptr + rows, mask=row_mask, other=float("inf"))
        best_idx = tl.load(part_idx_ptr + rows, mask=row_mask, other=0)
        for s in range(1, SPLIT):  # splits cover increasing code ranges: strict < keeps the first index
            v = tl.load(part_val_ptr + s * N + rows, mask=row_mask, other=float("inf"))
            i = tl.load(part_idx_ptr + s * N + rows, mask=row_mask, other=0)
            better = v < best
            best = tl.where(better, v, best)
            best_idx = tl.where(better, i, best_idx)
        tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=row_mask)
        rows64 = rows.to(tl.int64)
        codes = best_idx.to(tl.int64)
        err = tl.zeros((BLOCK_N,), tl.float32)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + offs_d
            m = row_mask[:, None] & (ds < D)[None, :]
            zt = tl.load(z_ptr + rows64[:, None] * stride_z + ds[None, :], mask=m, other=0.0)  # (BLOCK_N, BLOCK_D)
            et = tl.load(e_ptr + codes[:, None] * stride_e + ds[None, :], mask=m, other=0.0)  # (BLOCK_N, BLOCK_D)
            tl.store(zq_ptr + rows64[:, None] * stride_q + ds[None, :], et, mask=m)
            diff = zt.to(tl.float32) - et.to(tl.float32)
            err += tl.sum(diff * diff, axis=1)
        tl.store(dist_ptr + rows, err, mask=row_mask)

    @triton.jit
    def _vq_grad_z_kernel(
        gzq_ptr,  # (N, D) any strides (may be an expanded view), unused when not HAS_GZQ
        z_ptr,  # (N, D)
        e_ptr,  # (K, D)
        idx_ptr,  # (N,) int64
        coef_ptr,  # (1,) fp32: 2 beta g_commit / (N D)
        out_ptr,  # (N, D) dtype of z
        N,
        D,
        stride_g0,
        stride_g1,
        stride_z,
        stride_e,
        stride_o,
        HAS_GZQ: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        row_mask = rows < N
        m = row_mask[:, None] & (ds < D)[None, :]
        rows64 = rows.to(tl.int64)
        codes = tl.load(idx_ptr + rows, mask=row_mask, other=0)
        coef = tl.load(coef_ptr)
        zt = tl.load(z_ptr + rows64[:, None] * stride_z + ds[None, :], mask=m, other=0.0).to(tl.float32)
        et = tl.load(e_ptr + codes[:, None] * stride_e + ds[None, :], mask=m, other=0.0).to(tl.float32)
        g = coef * (zt - et)  # (BLOCK_N, BLOCK_D) commitment gradient
        if HAS_GZQ:
            g += tl.load(gzq_ptr + rows64[:, None] * stride_g0 + ds[None, :] * stride_g1, mask=m, other=0.0).to(
                tl.float32
            )
        tl.store(out_ptr + rows64[:, None] * stride_o + ds[None, :], g.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _vq_grad_e_segment_kernel(
        z_ptr,  # (N, D)
        e_ptr,  # (K, D)
        order_ptr,  # (N,) int64 rows sorted by code (stable)
        offsets_ptr,  # (K + 1,) int64 segment starts in `order`
        coef_ptr,  # (1,) fp32: 2 g_cb / (N D)
        out_ptr,  # (K, D) dtype of the codebook
        D,
        stride_z,
        stride_e,
        stride_o,
        BLOCK_R: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        code = tl.program_id(0)
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        d_mask = ds < D
        start = tl.load(offsets_ptr + code)
        end = tl.load(offsets_ptr + code + 1)
        offs_r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_D,), tl.float32)  # sum of the z rows assigned to this code, in a fixed order
        for r0 in range(start, end, BLOCK_R):
            r = r0 + offs_r
            r_mask = r < end
            src = tl.load(order_ptr + r, mask=r_mask, other=0)  # (BLOCK_R,) row ids
            m = r_mask[:, None] & d_mask[None, :]
            zt = tl.load(z_ptr + src[:, None] * stride_z + ds[None, :], mask=m, other=0.0)  # (BLOCK_R, BLOCK_D)
            acc += tl.sum(zt.to(tl.float32), axis=0)
        count = (end - start).to(tl.float32)
        e = tl.load(e_ptr + code.to(tl.int64) * stride_e + ds, mask=d_mask, other=0.0).to(tl.float32)
        g = tl.load(coef_ptr) * (count * e - acc)
        tl.store(out_ptr + code.to(tl.int64) * stride_o + ds, g.to(out_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _vq_scatter_add_kernel(
        z_ptr,  # (N, D)
        idx_ptr,  # (N,) int64
        sum_ptr,  # (K, D) fp32, zero-initialised: sum_ptr[idx_n] += z_n (atomics: order not fixed)
        N,
        D,
        stride_z,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_mask = rows < N
        m = row_mask[:, None] & (ds < D)[None, :]
        codes = tl.load(idx_ptr + rows, mask=row_mask, other=0)
        zt = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + ds[None, :], mask=m, other=0.0)
        tl.atomic_add(sum_ptr + codes[:, None] * D + ds[None, :], zt.to(tl.float32), mask=m)


# Small fixed tiles for the CPU interpreter (slow: every tile op is numpy); tests pass their own.
_INTERPRET_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_D": 64}


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: exercise the split path on larger test shapes


def _default_split(n: int, k: int, device: torch.device, block_n: int) -> int:
    """Split the codebook across programs when N alone cannot fill the GPU: about 2 waves of the launched
    BLOCK_N-row tiles (row blocks x splits ~ 2 x SMs), keeping >= 256 codes per split."""
    row_blocks = triton.cdiv(n, block_n)
    want = max(1, (2 * _num_sms(device)) // row_blocks)
    return max(1, min(want, triton.cdiv(k, 256)))


# fp32 dot precision. torch's "highest" (the default) means near-fp32 accuracy: "tf32x3" (three TF32 tensor-core
# dots, hi*hi + hi*lo + lo*hi, ~fp32 accuracy on wgmma). "high"/"medium" allow plain TF32. Exact fp32 FMA dots
# ("ieee": no tensor cores, ~10x slower) only on request: SVQ_FAST_VQ_FP32_IEEE=1 or `with fp32_precision("ieee")`.
_FP32_PRECISIONS = ("tf32x3", "tf32", "ieee")
_precision_override: list[str | None] = [None]


@contextlib.contextmanager
def fp32_precision(precision: str | None):
    """Force the fp32 dot precision of the Triton VQ kernel inside the block ("tf32x3" | "tf32" | "ieee");
    None keeps the default (from torch.get_float32_matmul_precision and SVQ_FAST_VQ_FP32_IEEE)."""
    if precision is not None and precision not in _FP32_PRECISIONS:
        raise ValueError(f"fp32_precision: {precision!r} is not one of {_FP32_PRECISIONS}")
    old, _precision_override[0] = _precision_override[0], precision
    try:
        yield
    finally:
        _precision_override[0] = old


def pin_fp32_precision(precision: str | None) -> None:
    """Set for the whole process the fp32 dot precision of the Triton VQ kernel, whatever torch's matmul precision
    says (None: follow it again). Training pins "tf32x3" when it lets the model's matmuls run in TF32 ("high"): the
    nearest-code search keeps ~fp32 distances (train/engine.py configure_backends)."""
    if precision is not None and precision not in _FP32_PRECISIONS:
        raise ValueError(f"pin_fp32_precision: {precision!r} is not one of {_FP32_PRECISIONS}")
    _precision_override[0] = precision


def _input_precision() -> str:
    if _precision_override[0] is not None:
        return _precision_override[0]
    if os.environ.get("SVQ_FAST_VQ_FP32_IEEE", "0") == "1":
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _default_argmin_config(d: int, dtype: torch.dtype, precision: str) -> dict:
    """The pinned argmin config (no autotuning): 0 spills and <= 227 KiB shared memory on sm_90a, triton 3.6
    (benchmarks/results/sm90_static.md). {"BLOCK_N", "BLOCK_K", "BLOCK_D", "num_warps", "num_stages"}."""
    d_pad = max(16, triton.next_power_of_2(d))
    if dtype != torch.float32:  # bf16 / fp16 wgmma: a 128x128 fp32 accumulator over 8 warps
        bd = d_pad if d_pad <= 128 else 64  # single D tile up to 128 (K loop pipelined), else loop over D
        return dict(BLOCK_N=128, BLOCK_K=128, BLOCK_D=bd, num_warps=8, num_stages=3)
    if precision == "ieee":  # FMA dots: every operand element lives in registers; keep the tiles small
        return dict(BLOCK_N=64, BLOCK_K=64, BLOCK_D=min(d_pad, 16), num_warps=4, num_stages=2)
    bd = d_pad if d_pad <= 64 else 32  # fp32 bytes are twice bf16's; tf32x3 splits each operand in hi/lo
    return dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=bd, num_warps=8, num_stages=3)


def argmin_candidates(d: int, dtype: torch.dtype) -> list[dict]:
    """The SVQ_FAST_AUTOTUNE=1 candidates after pruning for this D and dtype, as explicit configs."""
    if dtype == torch.float32 and _input_precision() == "ieee":
        return []  # never autotuned
    named = {"D": d, "z_ptr": torch.empty(0, dtype=dtype)}
    out = []
    for c in _prune_argmin_configs(_argmin_configs(), named):
        out.append(dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages))
    return out


def _argmin_launch_config(d: int, dtype: torch.dtype, precision: str, config: dict | None) -> dict | None:
    """The argmin kernel's config: the caller's, the interpreter's small tiles, the pinned default, or None
    (SVQ_FAST_AUTOTUNE=1: the autotuner picks at launch)."""
    if config is not None:
        return config
    if _interpreting():
        return _INTERPRET_CONFIG
    if not autotune_enabled() or (dtype == torch.float32 and precision == "ieee"):
        # pinned; exact-fp32 FMA dots never autotune (their larger candidate tiles spill kilobytes)
        return _default_argmin_config(d, dtype, precision)
    return None


def _argmin_split(n: int, k: int, z: torch.Tensor, config: dict | None, split: int | None, precision: str) -> int:
    """Codebook splits for the launch: the caller's, or _default_split for the tile the kernel launches with (under
    autotuning the tile is chosen at launch and k_per_split is part of its key, so the split reads the pinned
    default's BLOCK_N, as the autotuner's first candidate does)."""
    if split is not None:
        return max(1, min(int(split), k))
    tile = config if config is not None else _default_argmin_config(z.shape[1], z.dtype, precision)
    return _default_split(n, k, z.device, tile["BLOCK_N"])


def _triton_forward(
    z: torch.Tensor,
    e: torch.Tensor,
    *,
    config: dict | None = None,
    split: int | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (N, D), e (K, D), same dtype -> (indices (N,) int64, min_dist (N,) fp32, z_q (N, D)).

    config: {"BLOCK_N", "BLOCK_K", "BLOCK_D"} (+ optional num_warps, num_stages); default: the pinned config of
    _default_argmin_config (autotuned over _argmin_configs with SVQ_FAST_AUTOTUNE=1);
    split: number of codebook splits (default: enough programs for two waves);
    out: preallocated (indices, min_dist, z_q), contiguous (tests poison them to check every element is written)."""
    z = z if z.stride(1) == 1 else z.contiguous()
    e = e if e.stride(1) == 1 else e.contiguous()
    n, d = z.shape
    k = e.shape[0]
    esq = torch.linalg.vector_norm(e, dim=1, dtype=torch.float32).square_()  # (K,) fp32
    precision = _input_precision()
    common = dict(IS_FP32=z.dtype == torch.float32, INPUT_PRECISION=precision)
    config = _argmin_launch_config(d, z.dtype, precision, config)
    split = _argmin_split(n, k, z, config, split, precision)
    k_per_split = triton.cdiv(k, split)
    split = triton.cdiv(k, k_per_split)  # no empty split
    part_val = torch.empty((split, n), device=z.device, dtype=torch.float32)  # (SPLIT, N)
    part_idx = torch.empty((split, n), device=z.device, dtype=torch.int32)  # (SPLIT, N)
    args = (z, e, esq, part_val, part_idx, n, k, d, z.stride(0), e.stride(0), k_per_split, pow2_bucket(n))
    if config is None:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), split)

        launch(_vq_argmin_tuned)[grid](*args, **common)
    else:
        cfg = dict(config)
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
        single_d = cfg["BLOCK_D"] >= d  # what the _vq_argmin heuristic would set (wrap_triton takes no heuristics)
        launch(_vq_argmin_kernel)[grid](*args, **common, **cfg, SINGLE_D=single_d)

    if out is None:
        indices = torch.empty((n,), device=z.device, dtype=torch.int64)
        min_dist = torch.empty((n,), device=z.device, dtype=torch.float32)
        z_q = torch.empty((n, d), device=z.device, dtype=z.dtype)
    else:
        indices, min_dist, z_q = out
    block_n = 32
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    launch(_vq_epilogue_kernel)[(triton.cdiv(n, block_n),)](
        z, e, part_val, part_idx, indices, z_q, min_dist, n, d, split, z.stride(0), e.stride(0), z_q.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return indices, min_dist, z_q


def _triton_grad_z(g_zq, z, e, indices, coef, out: torch.Tensor | None = None) -> torch.Tensor:
    """g_zq (N, D) or None, coef (1,) fp32 -> dL/dz (N, D) in z's dtype."""
    n, d = z.shape
    out = torch.empty_like(z, memory_format=torch.contiguous_format) if out is None else out
    block_n, block_d = 32, min(128, max(16, triton.next_power_of_2(d)))
    g = g_zq if g_zq is not None else z  # placeholder pointer when HAS_GZQ is False
    launch(_vq_grad_z_kernel)[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
        g, z, e, indices, coef, out, n, d, g.stride(0), g.stride(1), z.stride(0), e.stride(0), out.stride(0),
        HAS_GZQ=g_zq is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out


def _code_counts(indices: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) int64 codes in [0, K) -> (K,) int64 counts; bincount's output size depends on the data (max + 1), which
    a compile trace cannot know, so the counts are an index_add into K zeros (the same integers)."""
    return torch.zeros(k, device=indices.device, dtype=torch.int64).index_add_(0, indices, torch.ones_like(indices))


def _triton_grad_e(z, e, indices, coef, deterministic: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """coef (1,) fp32 -> dL/de (K, D) in e's dtype: coef * (count_k e_k - sum_{idx_n=k} z_n)."""
    n, d = z.shape
    k = e.shape[0]
    block_d = min(128, max(16, triton.next_power_of_2(d)))
    if deterministic:
        order = torch.argsort(indices, stable=True)  # (N,) rows grouped by code, increasing row id inside a code
        offsets = torch.zeros(k + 1, device=z.device, dtype=torch.int64)  # (K + 1,)
        torch.cumsum(_code_counts(indices, k), 0, out=offsets[1:])
        out = torch.empty_like(e, memory_format=torch.contiguous_format) if out is None else out
        launch(_vq_grad_e_segment_kernel)[(k, triton.cdiv(d, block_d))](
            z, e, order, offsets, coef, out, d, z.stride(0), e.stride(0), out.stride(0),
            BLOCK_R=16, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
        return out
    sums = torch.zeros((k, d), device=z.device, dtype=torch.float32)  # (K, D)
    block_n = 32
    launch(_vq_scatter_add_kernel)[(triton.cdiv(n, block_n), triton.cdiv(d, block_d))](
        z, indices, sums, n, d, z.stride(0), BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4
    )
    counts = _code_counts(indices, k).to(torch.float32)  # (K,)
    grad = (coef * (counts[:, None] * e.float() - sums)).to(e.dtype)
    return grad if out is None else out.copy_(grad)


# ----------------------------------------------------------------------------------------------------------------
# Registered ops (svq_fast/kernels/_library.py): svq_fast::vq_native / svq_fast::vq_triton, their backward ops, the
# autograd formula that links them, and fp32 under autocast (the distances and the argmin never run in bf16/fp16).
# ----------------------------------------------------------------------------------------------------------------

_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _with_losses(z: torch.Tensor, beta: float, indices, min_dist, z_q) -> _Outputs:
    n, d = z.shape
    sq = min_dist.sum()  # () sum of squared errors over the N * D elements
    return z_q, indices, sq / (n * d), sq * (beta / (n * d)), min_dist


def _vq_native_impl(z: torch.Tensor, codebook: torch.Tensor, beta: float, deterministic: bool) -> _Outputs:
    # z (N, D), codebook (K, D): same dtype, contiguous (the dispatcher makes them so)
    indices, min_dist, z_q = native_ops().vq_forward(z, codebook)
    return _with_losses(z, beta, indices, min_dist, z_q)


def _vq_triton_impl(z: torch.Tensor, codebook: torch.Tensor, beta: float, deterministic: bool) -> _Outputs:
    indices, min_dist, z_q = _triton_forward(z, codebook)
    return _with_losses(z, beta, indices, min_dist, z_q)


def _vq_fake(z: torch.Tensor, codebook: torch.Tensor, beta: float, deterministic: bool) -> _Outputs:
    n, d = z.shape
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return (
        z.new_empty((n, d)),  # z_q
        z.new_empty((n,), dtype=torch.int64),  # indices
        z.new_empty((), dtype=acc),  # loss_codebook
        z.new_empty((), dtype=acc),  # loss_commit
        z.new_empty((n,), dtype=acc),  # min_dist
    )


_Opt = torch.Tensor | None


def _vq_native_backward_impl(
    g_zq: _Opt, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, g_cb: _Opt, g_commit: _Opt,
    beta: float, deterministic: bool, need_z: bool, need_e: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """-> (dL/dz (N, D) or empty, dL/dcodebook (K, D) or empty); need_z needs g_commit, need_e needs g_cb."""
    n, d = z.shape
    scale = 2.0 / (n * d)
    coef_z = float(g_commit) * scale * beta if need_z else 0.0
    coef_e = float(g_cb) * scale if need_e else 0.0
    gz, ge = native_ops().vq_backward(g_zq, z, codebook, indices, coef_z, coef_e, need_z, need_e)
    return (gz if need_z else z.new_empty(0)), (ge if need_e else codebook.new_empty(0))


def _vq_triton_backward_impl(
    g_zq: _Opt, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, g_cb: _Opt, g_commit: _Opt,
    beta: float, deterministic: bool, need_z: bool, need_e: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    n, d = z.shape
    scale = 2.0 / (n * d)
    gz = ge = None
    if need_z:
        gz = _triton_grad_z(g_zq, z, codebook, indices, (g_commit.float() * (scale * beta)).reshape(1))
    if need_e:
        ge = _triton_grad_e(z, codebook, indices, (g_cb.float() * scale).reshape(1), deterministic)
    return (gz if need_z else z.new_empty(0)), (ge if need_e else codebook.new_empty(0))


def _vq_backward_fake(
    g_zq: _Opt, z: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, g_cb: _Opt, g_commit: _Opt,
    beta: float, deterministic: bool, need_z: bool, need_e: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return (z.new_empty(z.shape if need_z else (0,)), codebook.new_empty(codebook.shape if need_e else (0,)))


def _setup_context(ctx, inputs, output):
    z, codebook, beta, deterministic = inputs
    _, indices, _, _, min_dist = output
    ctx.mark_non_differentiable(indices, min_dist)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z, codebook, indices)
    ctx.beta, ctx.deterministic = beta, deterministic


def _make_backward(backward_op):
    def backward(ctx, g_zq, _g_idx, g_cb, g_commit, _g_dist):
        z, codebook, indices = ctx.saved_tensors
        need_z, need_e = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_z = grad_e = None
        if need_z and g_commit is None:  # the commitment loss is unused: the straight-through gradient alone
            grad_z = g_zq.to(z.dtype) if g_zq is not None else None
            need_z = False
        need_e = need_e and g_cb is not None
        if need_z or need_e:
            args = (g_zq, z, codebook, indices, g_cb, g_commit, ctx.beta, ctx.deterministic, need_z, need_e)
            gz, ge = backward_op(*args)
            grad_z = gz if need_z else grad_z
            grad_e = ge if need_e else None
        return grad_z, grad_e, None, None

    return backward


vq_native_op = define_op("vq_native", _vq_native_impl, _vq_fake)
vq_native_backward_op = define_op("vq_native_backward", _vq_native_backward_impl, _vq_backward_fake)
vq_triton_op = define_triton_op("vq_triton", _vq_triton_impl, _vq_fake)
vq_triton_backward_op = define_triton_op("vq_triton_backward", _vq_triton_backward_impl, _vq_backward_fake)
for _fwd_op, _bwd_op in ((vq_native_op, vq_native_backward_op), (vq_triton_op, vq_triton_backward_op)):
    _fwd_op.register_autograd(_make_backward(_bwd_op), setup_context=_setup_context)
    for _dev in ("cpu", "cuda"):  # the nearest-code search of a bf16/fp16 autocast region runs in fp32
        torch.library.register_autocast(_fwd_op, _dev, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def _check_shapes(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"vq: expected z (N, D) and codebook (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq: z has D={z.shape[1]} but the codebook has D={codebook.shape[1]}")
    if codebook.shape[0] < 1:
        raise ValueError("vq: the codebook is empty (K=0)")
    if z.device != codebook.device:
        raise ValueError(f"vq: z is on {z.device} but the codebook is on {codebook.device}")
    if not (z.is_floating_point() and codebook.is_floating_point()):
        raise TypeError(f"vq: floating-point inputs required, got {z.dtype} and {codebook.dtype}")


def _triton_unavailable(z: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why backend='triton' cannot serve these inputs, or None when it can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    if z.device.type != "cuda" and not _interpreting():
        return (
            f"it needs CUDA tensors (got {z.device.type}); use backend='native' or 'ref' on CPU "
            "(or set TRITON_INTERPRET=1 before importing svq_fast to run the kernels in the slow interpreter)"
        )
    if z.device.type == "cuda" and _interpreting():
        return "TRITON_INTERPRET=1 is set but the tensors are on CUDA; unset it to compile the kernels"
    if dtype not in _TRITON_DTYPES:
        return f"dtype {dtype} is not supported (float32, float16, bfloat16); use backend='ref' for {dtype}"
    if dtype == torch.bfloat16 and _interpreting():
        return "the Triton CPU interpreter computes bf16 tl.dot wrongly; test bf16 on a GPU or use float16/float32"
    return None


def _native_unavailable(z: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Why backend='native' cannot serve these inputs, or None when it can."""
    if z.device.type != "cpu":
        return f"the native op runs on CPU tensors only (got {z.device.type}); use backend='triton' or 'ref'"
    if dtype not in _NATIVE_DTYPES:
        return f"dtype {dtype} is not supported (float32, float64, float16, bfloat16)"
    if not native_available():
        return (
            f"the svq_fast._C extension is not built ({native_error()}); rebuild with "
            "`pip install --no-build-isolation -e .` or use backend='ref'"
        )
    return None


def resolve_backend(z: torch.Tensor, codebook: torch.Tensor, backend: str = "auto") -> str:
    """The backend `vq` will run: explicit wins (raises if it cannot serve the inputs); auto = triton on CUDA,
    native on CPU when built, ref otherwise (also for dtypes the fused paths do not support)."""
    if backend not in BACKENDS:
        raise ValueError(f"vq: unknown backend {backend!r} (one of {'|'.join(BACKENDS)})")
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    if backend == "triton":
        why = _triton_unavailable(z, dtype)
        if why:
            raise RuntimeError(f"vq: backend='triton' cannot run here: {why}")
        return backend
    if backend == "native":
        why = _native_unavailable(z, dtype)
        if why:
            raise RuntimeError(f"vq: backend='native' cannot run here: {why}")
        return backend
    if backend == "ref":
        return backend
    if z.device.type == "cuda" and _triton_unavailable(z, dtype) is None:
        return "triton"
    if z.device.type == "cpu" and _native_unavailable(z, dtype) is None:
        return "native"
    return "ref"


def vq(
    z: torch.Tensor,
    codebook: torch.Tensor,
    beta: float = 0.25,
    *,
    backend: str = "auto",
    cosine: bool = False,
    deterministic: bool = True,
) -> VQOutput:
    """Quantize z (N, D) against codebook (K, D); see the module docstring for the contract.

    backend: "auto" | "triton" | "native" | "ref" (explicit wins and raises when it cannot serve the inputs).
    cosine: l2-normalise z and the codebook (differentiably) first.
    deterministic: codebook gradient by a fixed-order segment sum (triton; native and ref on CPU always are);
        False uses atomics on the GPU (order, hence the last bits, may vary run to run).
    """
    _check_shapes(z, codebook)
    chosen = resolve_backend(z, codebook, backend)
    if cosine:
        z, codebook = F.normalize(z, dim=1), F.normalize(codebook, dim=1)
    if chosen == "ref" or z.shape[0] == 0:
        return vq_ref(z, codebook, beta)
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    op = vq_triton_op if chosen == "triton" else vq_native_op
    # the kernels (and the tensors saved for the backward) assume unit column stride
    out = op(z.to(dtype).contiguous(), codebook.to(dtype).contiguous(), float(beta), bool(deterministic))
    z_q, indices, loss_codebook, loss_commit, min_dist = out
    return VQOutput(z_q.to(z.dtype), indices, loss_codebook, loss_commit, min_dist)
