"""The one place that wraps models in DeepSpeed engines: device, optimizer groups, lr schedule, precision."""

from __future__ import annotations

import math
import os
import warnings

import torch

from svq_fast.config import OptimConfig, Stage1Config, Stage2Config, to_deepspeed
from svq_fast.train.deepspeed_sync import keep_grad_norm_on_device


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), int(os.environ.get("LOCAL_RANK", "0")))


def configure_backends(cfg: Stage1Config | Stage2Config, dev: torch.device) -> None:
    """A run's GPU math settings, before its first forward (nothing changes on CPU, so CPU runs stay bit-identical):
    run.tf32 lets fp32 matmuls and convolutions use TF32 tensor cores (torch's "high", as torchtitan and nanoGPT
    set it; ~8x the fp32 rate on an H100), while the nearest-code search keeps near-fp32 "tf32x3" distances (a TF32
    distance can flip near-tied codes); run.cudnn_benchmark autotunes convolutions for training's fixed shapes."""
    if dev.type != "cuda":
        return
    from svq_fast.kernels.vq import pin_fp32_precision

    torch.set_float32_matmul_precision("high" if cfg.run.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = cfg.run.tf32
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    pin_fp32_precision("tf32x3" if cfg.run.tf32 else None)


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


def deepspeed_config(cfg: Stage1Config | Stage2Config, world_size: int) -> dict:
    """The DeepSpeed config dict the engines get: `to_deepspeed(cfg)`, with zero.precision=bf16 run as torch autocast
    over fp32 weights (DeepSpeed's `torch_autocast` section) instead of DeepSpeed's bf16 engine: convolutions and
    matmuls run in bf16, while the parameters, the optimizer, the gradient all-reduce (no module is listed as
    lower-precision safe), the VQ nearest-code search (svq_fast::vq_* run in fp32 under autocast) and the losses (the
    engine's floating outputs are cast to fp32, see `_outputs_to_fp32`) stay fp32. fp16 keeps DeepSpeed's fp16 engine
    with its loss scaling."""
    ds = to_deepspeed(cfg, world_size)
    if cfg.zero.precision == "bf16":
        ds.pop("bf16", None)
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return ds


def build_engine(model: torch.nn.Module, cfg: Stage1Config | Stage2Config, *, lr: float | None = None, world_size: int):
    """Wrap `model` in a DeepSpeed engine with a torch AdamW and the generated config dict; apply the run's
    layout (model.channels_last), precision (zero.precision) and compile (run.compile) options to it first."""
    import deepspeed

    prepare_module(model, cfg)
    keep_grad_norm_on_device(cfg.zero.precision)
    opt = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=lr or opt.lr, betas=opt.betas, fused=fused_adam(opt, device())
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opt))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, world_size)
    )
    return engine, optimizer, scheduler


def fused_adam(opt: OptimConfig, dev: torch.device) -> bool | None:
    """optim.fused_adam: "auto" = fused on CUDA (one kernel per parameter group, and its step counts stay on the
    device: the default foreach AdamW reads each group's step count to the host every step), torch's default
    elsewhere (keeps CPU runs bit-identical to earlier ones)."""
    if opt.fused_adam == "auto":
        return True if dev.type == "cuda" else None
    return opt.fused_adam == "on"


def input_dtype(cfg: Stage1Config | Stage2Config) -> torch.dtype:
    """The dtype a stage casts the engine's floating inputs (images) to: fp16 under DeepSpeed's fp16 engine (fp16
    weights), fp32 otherwise (bf16 runs under autocast over fp32 weights: the targets of the losses stay fp32)."""
    return torch.float16 if cfg.zero.precision == "fp16" else torch.float32


def autocast_dtype(cfg: Stage1Config | Stage2Config) -> torch.dtype:
    """Kept for callers that cast inputs with it: the same as `input_dtype` (the autocast dtype itself is bf16 for
    zero.precision=bf16, applied by the engine)."""
    return input_dtype(cfg)


# ----------------------------------------------------------------------------------------------------
# Layout, precision and compile options, applied to the module before DeepSpeed wraps it. With every option off
# (the default) the module is left exactly as it is.


def prepare_module(model: torch.nn.Module, cfg: Stage1Config | Stage2Config) -> torch.nn.Module:
    if getattr(cfg.model, "channels_last", False):
        use_channels_last(model)
    if cfg.zero.precision == "bf16":
        model.register_forward_hook(_outputs_to_fp32)
    if cfg.run.compile:
        compile_module(model, backend=cfg.run.compile_backend)
    return model


def _to_channels_last(module, args):
    x = args[0]
    if x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def use_channels_last(model: torch.nn.Module) -> int:
    """Make every nn.Conv2d input NHWC (a forward pre-hook; a no-op when it already is). Convolutions pick the
    channels-last kernels from their input, the elementwise ops and GroupNorm between them keep it, so most of the
    net runs NHWC with at most one copy where a non-conv op hands over NCHW (the quantizer's output). Parameters are
    not converted: ZeRO flattens them into contiguous buffers, and checkpoints stay layout-free. -> convs hooked."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(_to_channels_last)
            n += 1
    return n


def _fp32(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() and x.dtype != torch.float32 else x
    if isinstance(x, dict):  # activations handed out for a later gradient (`*_hidden`) stay as computed: the
        # adaptive GAN weight casts x_hat_hidden when it uses it, and an fp32 copy of a full-resolution activation
        # every step would cost memory and bandwidth for nothing before disc_start
        return {k: v if k.endswith("_hidden") else _fp32(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_fp32(v) for v in x)
    return x


def _outputs_to_fp32(module, args, output):
    """bf16 autocast: the module's floating outputs (reconstructions, logits, losses) leave the autocast region in
    fp32, so every loss computed from them runs in fp32."""
    return _fp32(output)


class _CompiledOrEager:
    """A module's forward, compiled (fullgraph: a graph break is a compile error). Only forward: the module's hooks
    (DeepSpeed's step counters and timers, which would recompile every step) run eagerly around it. When compiling
    fails (at the first call or at a recompile, e.g. eval mode or the recompile limit), one RuntimeWarning names the
    module and the cause and the module runs eagerly from then on. Errors of the model itself (bad inputs) are raised
    as they are."""

    def __init__(self, module: torch.nn.Module, backend: str):
        self.module, self.backend = module, backend
        self.compiled = torch.compile(module.forward, backend=backend, fullgraph=True, dynamic=False)

    def __call__(self, *args, **kwargs):
        import torch._dynamo.exc as dynamo_exc

        try:
            return self.compiled(*args, **kwargs)
        except (dynamo_exc.TorchDynamoException, dynamo_exc.FailOnRecompileLimitHit) as e:
            text = str(e).strip()
            cause = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
            warnings.warn(
                f"run.compile: torch.compile(backend={self.backend!r}) failed for {type(self.module).__name__} "
                f"({cause[:500]}); it runs EAGERLY from now on (eager speed). Set run.compile=false to silence this, "
                "or TORCH_LOGS=graph_breaks,recompiles for the details.",
                RuntimeWarning,
                stacklevel=2,
            )
            del self.module.forward  # the class's forward again
            return self.module.forward(*args, **kwargs)


def compile_module(model: torch.nn.Module, *, backend: str = "inductor") -> torch.nn.Module:
    """Compile `model`'s forward in place (its state_dict keys do not change; an instance attribute `forward` is the
    compiled one), falling back to eager with one warning if compiling fails. Inductor draws random numbers with
    torch's own generator (fallback_random) so a compiled run draws what the eager run draws."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True
    model.forward = _CompiledOrEager(model, backend)
    return model
