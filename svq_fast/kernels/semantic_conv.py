"""Fused convolution over the one-hot of a semantic map (the semantic half of the sVQ encoder's first layer).

Contract (shared by every backend):
    semantic_conv(labels, weight, bias=None, *, ignore_index=255, backend="auto", deterministic=True)
        -> out (B, Cout, H, W) in weight's dtype
    labels: (B, H, W) integer class ids in [0, C) or == ignore_index (anything else raises ValueError naming the
        ids, in every backend). weight: (Cout, C, k, k), bias: (Cout,) or None.
    out == F.conv2d(onehot(labels), weight, bias, padding=k // 2), where onehot is (B, C, H, W) and all-zero at
    ignore pixels. Equivalently a gather of weight columns by class id over each k x k window:
        out[b, o, y, x] = bias[o] + sum_{dy, dx} weight[o, labels[b, y + dy - p, x + dx - p], dy, dx]
    over the in-bounds taps whose label is not ignore_index (p = k // 2, zero padding as in the conv).
    Gradients: dweight[o, c, dy, dx] = sum of dout[b, o, y, x] over the pixels whose tap (dy, dx) label is c;
    dbias = dout summed over (B, H, W); none to labels.

What is fused: the one-hot expansion and the convolution. Forward (Triton): one program per (BLOCK_P pixels,
BLOCK_O output channels) tile loops over the k * k taps, loads the tap's label for each pixel and gathers the row
`label * k * k + tap` of the weight transposed to (C * k * k, Cout) (contiguous Cout-vectors, so each gather is a
contiguous load; the whole table is C * k * k * Cout elements, 1.1 MiB in fp32 for C=243, k=3, Cout=128, and stays
in L2), accumulating in fp32. Backward (Triton) for dweight, deterministic (default): pixels are sorted by class
id (stable torch.sort), each class's run is cut into chunks of CHUNK pixels, one program per (chunk, tap, channel
block) sums the upstream gradient at the pixels shifted by the tap into a partial row, and a second kernel sums
each class's partials in chunk order: no atomics, same bits run to run. deterministic=False instead scatters with
tl.atomic_add per (pixel block, tap), with one pre-summed atomic per channel when every valid pixel of the block
has the same label at that tap (the common case in piecewise-constant label maps).

Memory saved: one-hot + conv materialises the (B, C, H, W) one-hot in the weight dtype (F.one_hot even makes it
int64 first, plus a masked copy): for B=8, 256x256, C=243 that is 486 MiB fp32 (+ 2 x 972 MiB int64
temporaries), saved for the backward, plus whatever im2col / layout buffers the conv uses. The fused op keeps no
activation: it saves the labels (already alive) and allocates only the output, a (C * k * k, Cout) weight table
and, in the backward, O(B * H * W) int64 sort buffers and (B * H * W / CHUNK + C) * k * k * Cout fp32 partials.

Where it is fast / slow: the work is k * k * Cout adds per pixel instead of the conv's 2 * C * k * k * Cout
flops, so it wins by ~2 * C for large C (the encoder's C=243..~300 classes); the forward is bound by writing the
output. With few classes (C of a few) a dense cuDNN conv over a tiny one-hot is just as good. The deterministic
backward pays a sort of B * H * W keys; the atomic backward degrades when a block's labels are all different
(random label noise) because it then issues one atomic per element.

CPU: the native op in csrc/semantic_conv_cpu.cpp does the same with contiguous Cout-vector adds per tap, parallel
over image rows (see that file). `semantic_conv_ref` is the one-hot + F.conv2d definition.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from svq_fast._ext import native_available, native_error, native_ops
from svq_fast.kernels._library import define_op, define_triton_op, launch, tracing

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    _HAS_TRITON = False

BACKENDS = ("auto", "triton", "native", "ref")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CHUNK = 512  # pixels per partial-sum chunk in the deterministic Triton backward


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by every backend
# ----------------------------------------------------------------------------------------------------------------


def _check_inputs(labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if labels.dim() != 3:
        raise ValueError(f"semantic_conv: labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"semantic_conv: labels must hold integer class ids, got dtype {labels.dtype}")
    if weight.dim() != 4:
        raise ValueError(f"semantic_conv: weight must be (Cout, num_classes, k, k), got {tuple(weight.shape)}")
    if weight.shape[1] < 1:
        raise ValueError("semantic_conv: weight has no class columns (num_classes=0)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"semantic_conv: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    devs = {labels.device, weight.device} | ({bias.device} if bias is not None else set())
    if len(devs) > 1:
        raise ValueError(f"semantic_conv: labels, weight and bias must be on one device, got {sorted(map(str, devs))}")


def check_class_ids(labels: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Raise ValueError naming the ids (up to 8) of `labels` outside [0, num_classes) that are not ignore_index.
    One fused min/max reduction and one host sync."""
    if labels.numel() == 0:
        return
    lo, hi = torch.aminmax(torch.where(labels == ignore_index, 0, labels))
    if tracing():  # inside a compiled graph: a device-side assert instead of the host sync (and no ids named)
        msg = f"semantic map holds class ids outside [0, {num_classes}) (ignore id {ignore_index})"
        torch._assert_async((lo >= 0) & (hi < num_classes), msg)
        return
    if bool((lo < 0) | (hi >= num_classes)):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        ids = torch.unique(labels[bad]).tolist()[:8]
        raise ValueError(
            f"semantic map holds class ids {ids} outside [0, {num_classes}) (ignore id {ignore_index}); "
            "remap the labels to the model's classes or set ignore_index"
        )


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def semantic_conv_ref(
    labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, ignore_index: int = 255
) -> torch.Tensor:
    """The definition: one-hot (B, C, H, W) in weight's dtype, then F.conv2d(padding=k // 2).
    labels (B, H, W) int, weight (Cout, C, k, k) -> (B, Cout, H, W)."""
    _check_inputs(labels, weight, bias)
    num_classes = weight.shape[1]
    check_class_ids(labels, num_classes, ignore_index)
    valid = labels != ignore_index  # (B, H, W)
    onehot = F.one_hot(torch.where(valid, labels, 0).long(), num_classes).permute(0, 3, 1, 2)  # (B, C, H, W)
    onehot = (onehot * valid[:, None]).to(weight.dtype)
    return F.conv2d(onehot, weight, bias, padding=weight.shape[-1] // 2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if _HAS_TRITON:

    @triton.jit
    def _sc_forward_kernel(
        labels_ptr,  # (B, H, W) int, contiguous
        wt_ptr,  # (C * KSIZE * KSIZE, Cout) weight table, contiguous: row = c * k * k + dy * k + dx
        bias_ptr,  # (Cout,) or a placeholder when not HAS_BIAS
        out_ptr,  # (B, Cout, H, W), contiguous
        N,  # B * H * W
        H,
        W,
        Cout,
        ignore_index,
        KSIZE: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        PAD: tl.constexpr = KSIZE // 2
        KK: tl.constexpr = KSIZE * KSIZE
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,) flat (b, y, x)
        oc = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        p_mask = pix < N
        o_mask = oc < Cout
        hw = H * W
        b = pix // hw
        rem = pix % hw
        y = rem // W
        x = rem % W
        acc = tl.zeros((BLOCK_P, BLOCK_O), tl.float32)
        for t in tl.static_range(KK):
            yy = y + (t // KSIZE - PAD)
            xx = x + (t % KSIZE - PAD)
            inb = p_mask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            lab = tl.load(labels_ptr + (b * hw + yy * W + xx), mask=inb, other=ignore_index).to(tl.int64)
            ok = inb & (lab != ignore_index)  # (BLOCK_P,)
            row = lab * KK + t
            w = tl.load(wt_ptr + row[:, None] * Cout + oc[None, :], mask=ok[:, None] & o_mask[None, :], other=0.0)
            acc += w.to(tl.float32)  # (BLOCK_P, BLOCK_O)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + oc, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        dst = b.to(tl.int64)[:, None] * Cout * hw + oc[None, :].to(tl.int64) * hw + rem[:, None]
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & o_mask[None, :])

    @triton.jit
    def _sc_grad_chunk_kernel(
        g_ptr,  # (B, Cout, H, W) upstream gradient, any strides
        order_ptr,  # (N,) int64 flat pixel ids sorted by class id (stable)
        chunk_start_ptr,  # (M,) int64 first position in `order` of each chunk
        chunk_end_ptr,  # (M,) int64 one past the last (start == end for unused chunks)
        part_ptr,  # (M, KSIZE * KSIZE, Cout) fp32 out: per-chunk sums
        H,
        W,
        Cout,
        stride_gb,
        stride_go,
        stride_gh,
        stride_gw,
        KSIZE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        # Every pixel q of this chunk has the same class c. For tap t the output pixel that reads q through t is
        # q - offset(t): sum dout there (when in bounds) into part[chunk, t]. Program id 0 = chunk * KK + t: the
        # k * k programs of one chunk are launched together and share its dout neighbourhood in L2.
        PAD: tl.constexpr = KSIZE // 2
        KK: tl.constexpr = KSIZE * KSIZE
        chunk = tl.program_id(0) // KK
        t = tl.program_id(0) % KK
        oc = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        o_mask = oc < Cout
        sy = t // KSIZE - PAD
        sx = t % KSIZE - PAD
        start = tl.load(chunk_start_ptr + chunk)
        end = tl.load(chunk_end_ptr + chunk)
        hw = H * W
        offs = tl.arange(0, BLOCK_P)
        acc = tl.zeros((BLOCK_P, BLOCK_O), tl.float32)
        for p0 in range(start, end, BLOCK_P):
            pos = p0 + offs
            m = pos < end
            q = tl.load(order_ptr + pos, mask=m, other=0)  # (BLOCK_P,) int64
            b = q // hw
            rem = q % hw
            yy = rem // W - sy
            xx = rem % W - sx
            inb = m & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            src = b * stride_gb + yy * stride_gh + xx * stride_gw
            g = tl.load(
                g_ptr + src[:, None] + oc[None, :].to(tl.int64) * stride_go,
                mask=inb[:, None] & o_mask[None, :],
                other=0.0,
            )
            acc += g.to(tl.float32)
        dst = (chunk.to(tl.int64) * KK + t) * Cout + oc
        tl.store(part_ptr + dst, tl.sum(acc, axis=0), mask=o_mask)

    @triton.jit
    def _sc_grad_segment_kernel(
        part_ptr,  # (M, KK, Cout) fp32
        chunk_cum_ptr,  # (C + 1,) int64: chunks of class c are [chunk_cum[c], chunk_cum[c + 1])
        dwt_ptr,  # (C * KK, Cout) fp32 out
        Cout,
        KK: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        c = tl.program_id(0)
        t = tl.program_id(1)
        oc = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        o_mask = oc < Cout
        j0 = tl.load(chunk_cum_ptr + c)
        j1 = tl.load(chunk_cum_ptr + c + 1)
        acc = tl.zeros((BLOCK_O,), tl.float32)
        for j in range(j0, j1):  # fixed (chunk) order: deterministic
            acc += tl.load(part_ptr + (j * KK + t) * Cout + oc, mask=o_mask, other=0.0)
        tl.store(dwt_ptr + (c.to(tl.int64) * KK + t) * Cout + oc, acc, mask=o_mask)

    @triton.jit
    def _sc_grad_atomic_kernel(
        labels_ptr,  # (B, H, W) int, contiguous
        g_ptr,  # (B, Cout, H, W) any strides
        dwt_ptr,  # (C * KK, Cout) fp32, zero-initialised, accumulated with atomics
        N,
        H,
        W,
        Cout,
        ignore_index,
        stride_gb,
        stride_go,
        stride_gh,
        stride_gw,
        KSIZE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        PAD: tl.constexpr = KSIZE // 2
        KK: tl.constexpr = KSIZE * KSIZE
        pix = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BLOCK_P,)
        oc = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)  # (BLOCK_O,)
        p_mask = pix < N
        o_mask = oc < Cout
        hw = H * W
        b = pix // hw
        rem = pix % hw
        y = rem // W
        x = rem % W
        src = b.to(tl.int64) * stride_gb + y * stride_gh + x * stride_gw
        g = tl.load(
            g_ptr + src[:, None] + oc[None, :].to(tl.int64) * stride_go,
            mask=p_mask[:, None] & o_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_P, BLOCK_O)
        for t in tl.static_range(KK):
            yy = y + (t // KSIZE - PAD)
            xx = x + (t % KSIZE - PAD)
            inb = p_mask & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
            lab = tl.load(labels_ptr + (b * hw + yy * W + xx), mask=inb, other=ignore_index).to(tl.int64)
            ok = inb & (lab != ignore_index)
            lo = tl.min(tl.where(ok, lab, 2**62), axis=0)
            hi = tl.max(tl.where(ok, lab, -1), axis=0)
            if lo == hi:  # every valid pixel of the block has one label at this tap: one atomic per channel
                gs = tl.sum(tl.where(ok[:, None], g, 0.0), axis=0)  # (BLOCK_O,)
                tl.atomic_add(dwt_ptr + (lo * KK + t) * Cout + oc, gs, mask=o_mask, sem="relaxed")
            elif hi >= 0:
                row = tl.where(ok, lab, 0) * KK + t
                dst = dwt_ptr + row[:, None] * Cout + oc[None, :]
                tl.atomic_add(dst, g, mask=ok[:, None] & o_mask[None, :], sem="relaxed")


def _block_o(cout: int) -> int:
    return min(128, max(16, triton.next_power_of_2(cout)))


def _warps(block_p: int, block_o: int) -> int:
    """Pinned warp count of the (BLOCK_P, BLOCK_O) tile kernels: a 64 x 128 fp32 tile over 4 warps spills on sm_90a
    (up to 1036 B, triton 3.6), over 8 warps it does not (benchmarks/results/sm90_static.md)."""
    return 8 if block_p * block_o >= 64 * 128 else 4


def _weight_table(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, C, k, k) -> (C * k * k, Cout) contiguous, row c * k * k + dy * k + dx."""
    cout = weight.shape[0]
    return weight.detach().permute(1, 2, 3, 0).reshape(-1, cout).contiguous()


def _table_to_weight(table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(C * k * k, Cout) fp32 -> (Cout, C, k, k) in weight's dtype."""
    cout, c, kh, kw = weight.shape
    return table.view(c, kh, kw, cout).permute(3, 0, 1, 2).to(weight.dtype).contiguous()


def _triton_forward(labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ignore_index: int):
    bsz, h, w = labels.shape
    cout, _, k, _ = weight.shape
    labels = labels.contiguous()
    table = _weight_table(weight)  # (C * k * k, Cout)
    out = torch.empty((bsz, cout, h, w), device=weight.device, dtype=weight.dtype)  # (B, Cout, H, W)
    n = bsz * h * w
    block_p, block_o = (32, _block_o(cout)) if _interpreting() else (64, _block_o(cout))
    grid = (triton.cdiv(n, block_p), triton.cdiv(cout, block_o))
    launch(_sc_forward_kernel)[grid](
        labels, table, bias if bias is not None else table, out, n, h, w, cout, ignore_index,
        KSIZE=k, HAS_BIAS=bias is not None, BLOCK_P=block_p, BLOCK_O=block_o, num_warps=_warps(block_p, block_o),
    )  # fmt: skip
    return out


def _triton_grad_weight(labels, g, weight, ignore_index: int, deterministic: bool) -> torch.Tensor:
    """labels (B, H, W), g (B, Cout, H, W) -> dweight (Cout, C, k, k) in weight's dtype (fp32 accumulation)."""
    bsz, h, w = labels.shape
    cout, num_classes, k, _ = weight.shape
    kk = k * k
    n = bsz * h * w
    dev = labels.device
    labels = labels.contiguous()
    block_o = _block_o(cout)
    sg = g.stride()
    if not deterministic:
        table = torch.zeros((num_classes * kk, cout), device=dev, dtype=torch.float32)  # (C * k * k, Cout)
        block_p = 32 if _interpreting() else 64
        grid = (triton.cdiv(n, block_p), triton.cdiv(cout, block_o))
        launch(_sc_grad_atomic_kernel)[grid](
            labels, g, table, n, h, w, cout, ignore_index, *sg,
            KSIZE=k, BLOCK_P=block_p, BLOCK_O=block_o, num_warps=_warps(block_p, block_o),
        )  # fmt: skip
        return _table_to_weight(table, weight)
    # Sort pixels by class (ignore pixels get key C and sort last), cut each class's run into chunks of _CHUNK.
    flat = labels.view(-1)
    key = torch.where(flat == ignore_index, num_classes, flat).long()  # (N,)
    order = torch.sort(key, stable=True).indices  # (N,) pixel ids grouped by class, increasing inside a class
    counts = torch.zeros(num_classes + 1, device=dev, dtype=torch.int64).index_add_(0, key, torch.ones_like(key))
    counts = counts[:num_classes]  # (C,)
    seg_start = torch.cumsum(counts, 0) - counts  # (C,) first position of class c in `order`
    n_chunks = (counts + _CHUNK - 1) // _CHUNK  # (C,)
    chunk_cum = torch.zeros(num_classes + 1, device=dev, dtype=torch.int64)  # (C + 1,)
    torch.cumsum(n_chunks, 0, out=chunk_cum[1:])
    m = triton.cdiv(n, _CHUNK) + num_classes  # upper bound on the number of chunks: no host sync
    j = torch.arange(m, device=dev)  # (M,)
    cls = torch.searchsorted(chunk_cum[1:], j, right=True).clamp_(max=num_classes - 1)  # (M,) class of chunk j
    used = j < chunk_cum[-1]
    start = seg_start[cls] + (j - chunk_cum[cls]) * _CHUNK
    end = torch.minimum(start + _CHUNK, seg_start[cls] + counts[cls])
    start = torch.where(used, start, 0)
    end = torch.where(used, end, 0)
    part = torch.empty((m, kk, cout), device=dev, dtype=torch.float32)  # (M, k * k, Cout)
    block_p = 32 if _interpreting() else 64
    launch(_sc_grad_chunk_kernel)[(m * kk, triton.cdiv(cout, block_o))](
        g,
        order,
        start,
        end,
        part,
        h,
        w,
        cout,
        *sg,
        KSIZE=k,
        BLOCK_P=block_p,
        BLOCK_O=block_o,
        num_warps=_warps(block_p, block_o),
    )
    table = torch.empty((num_classes * kk, cout), device=dev, dtype=torch.float32)  # (C * k * k, Cout)
    launch(_sc_grad_segment_kernel)[(num_classes, kk, triton.cdiv(cout, block_o))](
        part, chunk_cum, table, cout, KK=kk, BLOCK_O=block_o, num_warps=4
    )
    return _table_to_weight(table, weight)


# ----------------------------------------------------------------------------------------------------------------
# Registered ops (svq_fast/kernels/_library.py): svq_fast::semantic_conv_native / _triton, their backward ops and the
# autograd formula. The class-id check runs inside the forward op (one host sync, opaque to a compile trace).
# ----------------------------------------------------------------------------------------------------------------

_Opt = torch.Tensor | None


def _sc_native_impl(labels: torch.Tensor, weight: torch.Tensor, bias: _Opt, ignore_index: int, deterministic: bool
                    ) -> torch.Tensor:  # fmt: skip
    # labels (B, H, W) int64, weight (Cout, C, k, k), bias (Cout,) or None -> (B, Cout, H, W)
    check_class_ids(labels, weight.shape[1], ignore_index)
    return native_ops().semantic_conv_forward(labels, weight.detach(), _detach(bias), ignore_index)


def _sc_triton_impl(labels: torch.Tensor, weight: torch.Tensor, bias: _Opt, ignore_index: int, deterministic: bool
                    ) -> torch.Tensor:  # fmt: skip
    check_class_ids(labels, weight.shape[1], ignore_index)
    return _triton_forward(labels, weight, bias, ignore_index)


def _sc_fake(labels: torch.Tensor, weight: torch.Tensor, bias: _Opt, ignore_index: int, deterministic: bool
             ) -> torch.Tensor:  # fmt: skip
    b, h, w = labels.shape
    return weight.new_empty((b, weight.shape[0], h, w))


def _sc_native_backward_impl(
    g: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    ignore_index: int,
    deterministic: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dweight (Cout, C, k, k) or empty, dbias (Cout,) or empty)."""  # fmt: skip
    gw, gb = native_ops().semantic_conv_backward(g, labels, weight.detach(), ignore_index, need_w, need_b, 0)
    # dbias is a view into the native op's accumulation buffer: a fresh tensor, as the fake kernel promises
    return (gw if need_w else weight.new_empty(0)), (gb.clone() if need_b else weight.new_empty(0))


def _sc_triton_backward_impl(
    g: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    ignore_index: int,
    deterministic: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gw = _triton_grad_weight(labels, g, weight, ignore_index, deterministic) if need_w else weight.new_empty(0)
    gb = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(weight.dtype) if need_b else weight.new_empty(0)
    return gw, gb


def _sc_backward_fake(
    g: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    ignore_index: int,
    deterministic: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    gw = weight.new_empty(weight.shape if need_w else (0,))
    return gw, weight.new_empty((weight.shape[0],) if need_b else (0,))


def _sc_setup_context(ctx, inputs, output):
    labels, weight, bias, ignore_index, deterministic = inputs
    ctx.save_for_backward(labels, weight)
    ctx.has_bias = bias is not None
    ctx.ignore_index, ctx.deterministic = ignore_index, deterministic


def _sc_make_backward(backward_op):
    def backward(ctx, g):
        labels, weight = ctx.saved_tensors
        need_w = ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if not (need_w or need_b):
            return None, None, None, None, None
        gw, gb = backward_op(g, labels, weight, ctx.ignore_index, ctx.deterministic, need_w, need_b)
        return None, (gw if need_w else None), (gb if need_b else None), None, None

    return backward


semantic_conv_native_op = define_op("semantic_conv_native", _sc_native_impl, _sc_fake)
semantic_conv_native_backward_op = define_op("semantic_conv_native_backward", _sc_native_backward_impl,
                                             _sc_backward_fake)  # fmt: skip
semantic_conv_triton_op = define_triton_op("semantic_conv_triton", _sc_triton_impl, _sc_fake)
semantic_conv_triton_backward_op = define_triton_op("semantic_conv_triton_backward", _sc_triton_backward_impl,
                                                    _sc_backward_fake)  # fmt: skip
for _fwd_op, _bwd_op in (
    (semantic_conv_native_op, semantic_conv_native_backward_op),
    (semantic_conv_triton_op, semantic_conv_triton_backward_op),
):
    _fwd_op.register_autograd(_sc_make_backward(_bwd_op), setup_context=_sc_setup_context)


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _autocast(weight: torch.Tensor, bias: torch.Tensor | None):
    """Under torch.autocast, cast weight and bias to the autocast dtype (differentiably), as F.conv2d does with its
    inputs, so every backend returns the dtype the reference returns."""
    dev = weight.device.type
    try:
        enabled = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4: no device argument
        enabled = torch.is_autocast_enabled() if dev == "cuda" else False
    if not enabled or not weight.is_floating_point():
        return weight, bias
    dtype = torch.get_autocast_dtype(dev) if hasattr(torch, "get_autocast_dtype") else torch.get_autocast_gpu_dtype()
    return weight.to(dtype), (bias.to(dtype) if bias is not None else None)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


def _fused_unsupported(weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Shape / dtype reasons common to both fused paths, or None."""
    k, kw = weight.shape[-2:]
    if k != kw or k % 2 == 0:
        return f"it supports square odd kernels (1, 3, 5, ...), got {k}x{kw}; use backend='ref'"
    if bias is not None and bias.dtype != weight.dtype:
        return f"bias dtype {bias.dtype} differs from weight dtype {weight.dtype}; cast them to one dtype"
    return None


def _triton_unavailable(labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why backend='triton' cannot serve these inputs, or None when it can."""
    if not _HAS_TRITON:
        return "triton is not installed"
    dev = weight.device.type
    if dev != "cuda" and not _interpreting():
        return (
            f"it needs CUDA tensors (got {dev}); use backend='native' or 'ref' on CPU "
            "(or set TRITON_INTERPRET=1 before importing svq_fast to run the kernels in the slow interpreter)"
        )
    if dev == "cuda" and _interpreting():
        return "TRITON_INTERPRET=1 is set but the tensors are on CUDA; unset it to compile the kernels"
    if weight.dtype not in _TRITON_DTYPES:
        return f"dtype {weight.dtype} is not supported (float32, float16, bfloat16); use backend='ref'"
    return _fused_unsupported(weight, bias)


def _native_unavailable(labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why backend='native' cannot serve these inputs, or None when it can."""
    if weight.device.type != "cpu":
        return f"the native op runs on CPU tensors only (got {weight.device.type}); use backend='triton' or 'ref'"
    if weight.dtype not in _NATIVE_DTYPES:
        return f"dtype {weight.dtype} is not supported (float32, float64, float16, bfloat16)"
    why = _fused_unsupported(weight, bias)
    if why:
        return why
    if not native_available():
        return (
            f"the svq_fast._C extension is not built ({native_error()}); rebuild with "
            "`pip install --no-build-isolation -e .` or use backend='ref'"
        )
    if not hasattr(native_ops(), "semantic_conv_forward"):
        return (
            "the built svq_fast._C predates the semantic_conv op; rebuild with `pip install --no-build-isolation -e .`"
        )
    return None


def resolve_backend(
    labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, backend: str = "auto"
) -> str:
    """The backend `semantic_conv` will run: explicit wins (raises RuntimeError saying why when it cannot serve the
    inputs); auto = triton on CUDA, native on CPU when built, ref otherwise (also for dtypes / kernel shapes the
    fused paths do not support)."""
    if backend not in BACKENDS:
        raise ValueError(f"semantic_conv: unknown backend {backend!r} (one of {'|'.join(BACKENDS)})")
    if backend == "ref":
        return backend
    if backend == "triton":
        why = _triton_unavailable(labels, weight, bias)
        if why:
            raise RuntimeError(f"semantic_conv: backend='triton' cannot run here: {why}")
        return backend
    if backend == "native":
        why = _native_unavailable(labels, weight, bias)
        if why:
            raise RuntimeError(f"semantic_conv: backend='native' cannot run here: {why}")
        return backend
    if weight.device.type == "cuda" and _triton_unavailable(labels, weight, bias) is None:
        return "triton"
    if weight.device.type == "cpu" and _native_unavailable(labels, weight, bias) is None:
        return "native"
    return "ref"


def semantic_conv(
    labels: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = 255,
    backend: str = "auto",
    deterministic: bool = True,
) -> torch.Tensor:
    """conv2d(onehot(labels), weight, bias, padding=k // 2) without the one-hot; see the module docstring.

    labels (B, H, W) integer, weight (Cout, C, k, k), bias (Cout,) or None -> (B, Cout, H, W) in weight's dtype.
    backend: "auto" | "triton" | "native" | "ref" (explicit wins and raises when it cannot serve the inputs).
    deterministic: weight gradient by a fixed-order segment sum (triton); False uses atomics on the GPU. The
        native CPU backward is deterministic for a fixed torch thread count.
    """
    _check_inputs(labels, weight, bias)
    weight, bias = _autocast(weight, bias)
    chosen = resolve_backend(labels, weight, bias, backend)
    if chosen == "ref" or labels.numel() == 0 or weight.shape[0] == 0:
        return semantic_conv_ref(labels, weight, bias, ignore_index)  # checks the class ids itself
    labels = labels if labels.dtype == torch.int64 else labels.long()
    op = semantic_conv_triton_op if chosen == "triton" else semantic_conv_native_op
    return op(labels, weight, bias, int(ignore_index), bool(deterministic))  # checks the class ids first
