"""Keep DeepSpeed's ZeRO step free of host reads when nothing is loss-scaled.

DeepSpeed 0.19's ZeRO-1/2 (and ZeRO-3) optimizer computes the global gradient norm on the device, then reads it to the
host three times per step (`is_invalid_grad_norm`: once as an overflow check, once per parameter group as a guard
before clipping). The check exists for fp16 loss scaling, where an overflow must skip the step and lower the scale.
Our runs with fp32 weights (zero.precision fp32, or bf16 as autocast over fp32 weights) have no loss scale: there
the checks only stop the GPU, three times per engine per step (measured with svq_fast/train/host_reads.py). DeepSpeed's
own bf16 optimizer skips the overflow check by default (`bf16.check_grad_overflow=false`); this does the same for
our precisions: a tensor norm is taken as valid without reading it, so clipping and the update stay on the device.

What guards against a non-finite step instead: every micro-batch's loss is checked before its backward, on every rank
at once (Stage.agree in train/loop.py), and a non-finite one is skipped. A finite loss whose backward overflows is
not caught in bf16 / fp32 (as in torchtitan and nanoGPT); the checkpoint writer refuses non-finite weights.
Under zero.precision=fp16 nothing is patched: the loss scaler needs the check.
"""

from __future__ import annotations

import functools

import torch

_MODULES = ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.zero.stage3")
_state = {"device_side": False, "patched": False}


def _norm_check(original):
    @functools.wraps(original)
    def is_invalid_grad_norm(norm):
        if _state["device_side"] and torch.is_tensor(norm):
            return False  # no loss scale to protect: leave the norm on the device (see the module docstring)
        return original(norm)

    return is_invalid_grad_norm


def keep_grad_norm_on_device(precision: str) -> None:
    """Called once per engine before deepspeed.initialize: patch DeepSpeed's ZeRO optimizers' norm check (once per
    process) and switch it on for fp32 / bf16 runs, off for fp16 ones (a process trains one precision)."""
    import importlib

    if not _state["patched"]:
        for name in _MODULES:
            module = importlib.import_module(name)
            if hasattr(module, "is_invalid_grad_norm"):
                module.is_invalid_grad_norm = _norm_check(module.is_invalid_grad_norm)
        _state["patched"] = True
    _state["device_side"] = precision != "fp16"
