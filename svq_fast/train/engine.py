"""The one place that wraps models in DeepSpeed engines, and the process-group helpers around it."""

from __future__ import annotations

import math
import os
import socket

import torch

from svq_fast.config import OptimConfig, Stage1Config, Stage2Config, to_deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by the launcher (deepspeed / torchrun / accelerate), or make a
    single-process one when the script was started with plain `python`. Returns (rank, world_size)."""
    import deepspeed

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(
            dist_backend=None if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False, verbose=False
        )
        if not torch.cuda.is_available():  # the shm workspace belongs to DeepSpeed's CPU accelerator only
            release_shm_allreduce_name(torch.distributed.get_rank())
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def shm_allreduce_path(rank: int) -> str:
    """/dev/shm file of DeepSpeed's CPU shared-memory allreduce workspace for `rank` of this launch
    (the name deepspeed/ops/csrc/cpu/comm/shm.cpp gives it: uid, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_allreduce_name(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce file once every rank has mapped it.

    DeepSpeed (0.19) creates one ~66 MB /dev/shm file per rank when all ranks are local (LOCAL_SIZE == world size,
    as under the deepspeed launcher) and never removes it, so every launch leaves its workspaces in RAM: 268 of them
    (18 GB) had piled up on the development VM after a day of test runs and starved it of memory. Each rank maps all
    ranks' files inside deepspeed.init_distributed, so after a barrier the names can go; the mappings stay valid and
    the memory is returned when the processes exit, also when they crash.
    """
    torch.distributed.barrier()
    try:
        os.unlink(shm_allreduce_path(rank))
    except FileNotFoundError:  # not a local-ranks launch (torchrun, accelerate, plain python): nothing was created
        pass


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


def all_reduce_mean(values: dict[str, float], dev: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict)."""
    if not values or not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    torch.distributed.all_reduce(t)
    t /= torch.distributed.get_world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, dev: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a stop request, a non-finite loss)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def nonfinite_anywhere(loss: torch.Tensor) -> bool:
    """Whether the loss is NaN/inf on any rank; all ranks must agree before skipping a backward."""
    return any_rank(not bool(torch.isfinite(loss.detach()).all()), loss.device)
