"""The one place that wraps models in DeepSpeed engines: device, optimizer groups, lr schedule, precision."""

from __future__ import annotations

import math
import os

import torch

from svq_fast.config import OptimConfig, Stage1Config, Stage2Config, to_deepspeed


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), int(os.environ.get("LOCAL_RANK", "0")))


def lr_lambda(opt: OptimConfig):
    """Multiplier on the base lr at optimizer step `step`: linear warmup, then constant or cosine to 10%."""

    def f(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.lr_schedule == "cosine":
            span = max(1, opt.max_steps - opt.warmup_steps)
            t = min(1.0, (step - opt.warmup_steps) / span)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return f


def build_engine(model: torch.nn.Module, cfg: Stage1Config | Stage2Config, *, lr: float | None = None, world_size: int):
    """Wrap `model` in a DeepSpeed engine with a torch AdamW and the generated config dict."""
    import deepspeed

    opt = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or opt.lr, betas=opt.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=to_deepspeed(cfg, world_size)
    )
    return engine, optimizer, scheduler


def autocast_dtype(cfg: Stage1Config | Stage2Config) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.zero.precision]
