"""Chunked linear + cross-entropy: loss = CE(hidden @ weight^T (+ bias), target) without all the logits.

What is fused: the output projection, log-softmax, the loss and its gradient. Rows are processed in chunks;
for each chunk the logits (chunk, V) are computed, a Triton kernel (one program per row) finds the
log-sum-exp and the loss and overwrites the logits IN PLACE with d loss / d logits = softmax - one_hot, and
two matmuls turn that into the chunk's d hidden and its contribution to d weight (and d bias). Everything
happens in the forward pass (the gradient is ready when the loss is); the backward only scales the stored
gradients by the incoming scalar, as Liger-Kernel's fused linear cross-entropy does.

Memory saved: the unfused path keeps logits (N, V) in the compute dtype, their fp32 copy for the softmax,
and the same again for the gradient, e.g. N = 8192 tokens x V = 16384 -> 0.5 GiB per fp32 copy. Here the
peak extra memory is one fp32 (chunk, V) buffer (64 MiB at the default 2^24 elements) plus d hidden (N, C)
and an fp32 d weight (V, C).

Where it is fast / slow:
- fast: large V (>= 8k) and many rows, bf16/fp16 on GPU (the two matmuls per chunk run on tensor cores;
  the softmax kernel reads and writes each logit twice, memory-bound but in one launch per chunk).
- slow: small V (the unfused path fits in memory anyway and has fewer launches), very few rows, or a
  chunk size so small that the matmuls are skinny. The gradient is computed even if the loss is only
  inspected (call under torch.no_grad() to skip it).
- d weight is accumulated in fp32 across chunks and cast once at the end.

Backends: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the same chunking, softmax in torch
ops), "auto" = triton on CUDA, torch otherwise. `chunked_cross_entropy_ref` is plain F.cross_entropy over
the materialised fp32 logits.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from svq_fast.kernels._library import define_op, define_triton_op, launch

__all__ = ["chunked_cross_entropy", "chunked_cross_entropy_ref", "chunked_ce_torch_op", "chunked_ce_triton_op"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CHUNK_ELEMENTS = 2**24  # fp32 logits per chunk (64 MiB)


def chunked_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """hidden (N, C), weight (V, C), target (N,) int64, bias (V,) -> fp32 loss (mean over non-ignored rows)."""
    logits = F.linear(hidden, weight, bias).float()  # (N, V)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


@triton.jit
def _ce_loss_grad_kernel(
    LOGITS,  # (R, V) fp32, overwritten with softmax - one_hot (0 for ignored rows)
    TARGET,  # (R,) int64
    LOSS,  # (R,) fp32, 0 for ignored rows
    stride_row,
    V,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    target = tl.load(TARGET + row)
    # pass 1: online max / sum of exp over the vocabulary
    # Padded lanes load -1e30 (not -inf) so no (-inf) - (-inf) ever happens; a lane that only saw padding
    # has m = -1e30 and drops out of the final sum through exp(-1e30 - m_row) = 0.
    m = tl.zeros([BLOCK_V], dtype=tl.float32) - 1.0e30  # per-lane running max
    s = tl.zeros([BLOCK_V], dtype=tl.float32)  # per-lane running sum of exp(x - m)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=-1.0e30)
        m_new = tl.maximum(m, x)
        s = s * tl.exp(m - m_new) + tl.exp(x - m_new)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    valid = target != ignore_index
    safe_target = tl.where(valid, target, 0)
    x_target = tl.load(base + safe_target)
    tl.store(LOSS + row, tl.where(valid, lse - x_target, 0.0))
    # pass 2: gradient in place
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + offs, mask=offs < V, other=0.0)
        g = tl.exp(x - lse) - tl.where(offs == safe_target, 1.0, 0.0)
        g = tl.where(valid, g, 0.0)
        tl.store(base + offs, g, mask=offs < V)


def _loss_grad_triton(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logits (R, V) fp32 -> per-row loss (R,); logits overwritten with d loss_row / d logits."""
    r, v = logits.shape
    loss = torch.empty(r, device=logits.device, dtype=torch.float32)
    block = min(4096 if _INTERPRET else 2048, triton.next_power_of_2(v))
    launch(_ce_loss_grad_kernel)[(r,)](logits, target, loss, logits.stride(0), v, ignore_index, BLOCK_V=block,
                               num_warps=8)  # fmt: skip
    return loss


def _loss_grad_torch(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    valid = target != ignore_index  # (R,)
    safe = torch.where(valid, target, 0)
    lse = torch.logsumexp(logits, dim=1)  # (R,)
    loss = (lse - logits.gather(1, safe[:, None])[:, 0]) * valid
    logits.sub_(lse[:, None]).exp_()  # softmax, in place
    logits[torch.arange(len(target), device=logits.device), safe] -= 1.0
    logits.mul_(valid[:, None])
    return loss


def _forward_with_grads(hidden, weight, bias, target, ignore_index: int, reduction: str, chunk_rows: int,
                        use_triton: bool, need_h: bool, need_w: bool, need_b: bool):  # fmt: skip
    """-> (loss () fp32, d loss / d hidden (N, C) or None, d weight (V, C) or None, d bias (V,) or None)."""
    n, c = hidden.shape  # (N, C)
    v = weight.shape[0]  # weight (V, C)
    grad_h = torch.empty_like(hidden) if need_h else None  # (N, C)
    grad_w = torch.zeros(v, c, device=weight.device, dtype=torch.float32) if need_w else None  # (V, C)
    grad_b = torch.zeros(v, device=weight.device, dtype=torch.float32) if need_b else None  # (V,)
    loss_rows = torch.empty(n, device=hidden.device, dtype=torch.float32)  # (N,)
    # One compute dtype (hidden's) for the matmuls, whatever autocast or the parameter dtype says.
    w = weight.to(hidden.dtype)  # (V, C)
    b = bias.to(hidden.dtype) if bias is not None else None  # (V,)
    for start in range(0, n, chunk_rows):
        h = hidden[start : start + chunk_rows]  # (R, C)
        t = target[start : start + chunk_rows]  # (R,)
        logits = F.linear(h, w, b).float()  # (R, V) fp32
        if use_triton:
            loss_rows[start : start + len(t)] = _loss_grad_triton(logits, t, ignore_index)
        else:
            loss_rows[start : start + len(t)] = _loss_grad_torch(logits, t, ignore_index)
        if grad_h is None and grad_w is None and grad_b is None:
            continue
        g = logits.to(hidden.dtype)  # (R, V) d loss_row / d logits
        if grad_h is not None:
            torch.mm(g, w, out=grad_h[start : start + len(t)])
        if grad_w is not None:
            grad_w += (g.t() @ h).float()
        if grad_b is not None:
            grad_b += logits.sum(0)
    if reduction == "mean":
        n_valid = (target != ignore_index).sum()
        loss = loss_rows.sum() / n_valid  # nan when every row is ignored, as F.cross_entropy
        scale = 1.0 / n_valid.clamp_min(1).float()
    else:
        loss, scale = loss_rows.sum(), None
    grads = []
    for gr, ref in ((grad_h, hidden), (grad_w, weight), (grad_b, bias)):
        if gr is not None:
            gr = gr * scale if scale is not None else gr
            gr = gr.to(ref.dtype)
        grads.append(gr)
    return loss, *grads


# Registered ops (svq_fast/kernels/_library.py): svq_fast::chunked_ce_torch / svq_fast::chunked_ce_triton return the
# loss and the gradients it already computed (empty when not asked for); the autograd formula scales them.
_CEOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _make_impl(use_triton: bool):
    def impl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
             ignore_index: int, reduction: str, chunk_rows: int, need_h: bool, need_w: bool, need_b: bool
             ) -> _CEOut:  # fmt: skip
        loss, gh, gw, gb = _forward_with_grads(hidden, weight, bias, target, ignore_index, reduction, chunk_rows,
                                               use_triton, need_h, need_w, need_b)  # fmt: skip
        return (loss, gh if need_h else hidden.new_empty(0), gw if need_w else weight.new_empty(0),
                gb if need_b else weight.new_empty(0))  # fmt: skip

    return impl


def _ce_fake(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
             ignore_index: int, reduction: str, chunk_rows: int, need_h: bool, need_w: bool, need_b: bool
             ) -> _CEOut:  # fmt: skip
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape if need_h else (0,)),
        weight.new_empty(weight.shape if need_w else (0,)),
        (bias if bias is not None else weight).new_empty((weight.shape[0],) if need_b else (0,)),
    )


def _ce_setup_context(ctx, inputs, output):
    _, gh, gw, gb = output
    ctx.mark_non_differentiable(gh, gw, gb)
    need = inputs[-3:]
    ctx.have = need
    ctx.save_for_backward(gh, gw, gb)


def _ce_backward(ctx, grad_loss, *_):  # grad_loss: () fp32
    out = [g * grad_loss.to(g.dtype) if have else None for have, g in zip(ctx.have, ctx.saved_tensors)]
    return out[0], out[1], out[2], None, None, None, None, None, None, None


chunked_ce_torch_op = define_op("chunked_ce_torch", _make_impl(False), _ce_fake)
chunked_ce_triton_op = define_triton_op("chunked_ce_triton", _make_impl(True), _ce_fake)
for _op in (chunked_ce_torch_op, chunked_ce_triton_op):
    _op.register_autograd(_ce_backward, setup_context=_ce_setup_context)


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """CE(hidden @ weight^T + bias, target) -> () fp32, same value and gradients as chunked_cross_entropy_ref.

    hidden (N, C) or (..., C) (flattened), weight (V, C), bias (V,) or None, target (N,) / (...) int64.
    reduction: "mean" over non-ignored rows (F.cross_entropy's default) or "sum".
    chunk_rows: rows per chunk (default: 2^24 / V). backend: "auto" | "triton" | "torch"."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"chunked_cross_entropy: unknown backend {backend!r} (auto|triton|torch)")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = target.reshape(-1)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"chunked_cross_entropy: weight must be (V, C={hidden.shape[1]}), got {tuple(weight.shape)}")
    if target.shape[0] != hidden.shape[0]:
        raise ValueError(f"chunked_cross_entropy: {target.shape[0]} targets for {hidden.shape[0]} rows")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"chunked_cross_entropy: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "torch"
    if backend == "triton" and not (hidden.is_cuda or (_INTERPRET and hidden.device.type == "cpu")):
        raise RuntimeError(
            "chunked_cross_entropy: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 before import "
            "for CPU tests); use backend='torch'"
        )
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
    target = target.to(device=hidden.device, dtype=torch.int64).contiguous()
    grad = torch.is_grad_enabled()
    need_h, need_w = grad and hidden.requires_grad, grad and weight.requires_grad
    need_b = grad and bias is not None and bias.requires_grad
    op = chunked_ce_triton_op if backend == "triton" else chunked_ce_torch_op
    with torch.autocast(hidden.device.type, enabled=False):
        loss, *_ = op(hidden, weight, bias, target, ignore_index, reduction, int(chunk_rows), need_h, need_w, need_b)
    return loss
