"""Test launcher: the real stage-1 start-up (init_deepspeed, prepare_run, the engines, the loader) on a CPU rank that
believes it has two GPUs and an NCCL group. Recording fakes stand in for CUDA: torch.cuda.is_available / device_count
/ set_device / current_device, tensors asked for on cuda:k (created on the CPU, remembered as cuda:k), and
torch.distributed's collectives (each recorded with the device its tensor was meant to be on and the device bound at
that moment, then run for real over gloo). The training loop itself is replaced by a stub. Writes
<out>/startup_rank<R>.json. Usage: deepspeed tests/train/fake_cuda_startup.py --out=DIR <the recipe's arguments>."""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed itself stays on its CPU accelerator (chosen at import)
import deepspeed  # noqa: E402,F401
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402

EVENTS: list[dict] = []
BOUND = {"index": None}  # what torch.cuda.set_device was last given (None: never called)
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "barrier",
               "gather", "scatter", "reduce")  # fmt: skip


def _from_project(depth: int = 2) -> bool:
    """Whether the patched function was called directly from svq_fast code (not from DeepSpeed or torch)."""
    return "svq_fast" in sys._getframe(depth).f_code.co_filename


def _fake_device(t) -> str:
    return getattr(t, "_fake_device", str(t.device)) if isinstance(t, torch.Tensor) else "none"


def _cuda_target(device):
    if device is None:
        return None
    device = torch.device(device) if isinstance(device, (str, int)) and not isinstance(device, bool) else device
    if isinstance(device, torch.device) and device.type == "cuda":
        index = device.index if device.index is not None else (BOUND["index"] or 0)
        return f"cuda:{index}"
    return None


def _tag(out, target):
    if target is not None and isinstance(out, torch.Tensor):
        out._fake_device = target
    return out


def _fake_tensor_placement() -> None:
    """Tensor.to / .cuda and the factories: a cuda:k target makes a CPU tensor tagged `_fake_device = "cuda:k"`
    (methods are patched rather than a TorchFunctionMode, which the custom ops' Python bodies do not see)."""
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        target = _cuda_target(kwargs.get("device"))
        if target is not None:
            kwargs["device"] = "cpu"
        args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, (str, torch.device)) and _cuda_target(a) is not None:
                target, args[i] = _cuda_target(a), "cpu"
        return _tag(real_to(self, *args, **kwargs), target)

    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, device=None, **kw: to(self, device if device is not None else "cuda")
    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like"):
        real = getattr(torch, name)

        def factory(*args, _real=real, **kwargs):
            target = _cuda_target(kwargs.get("device"))
            if target is not None:
                kwargs["device"] = "cpu"
            return _tag(_real(*args, **kwargs), target)

        setattr(torch, name, factory)


def _record_collective(name, real):
    def collective(*args, **kwargs):
        tensor = args[0] if args else kwargs.get("tensor", kwargs.get("output_tensor"))
        if isinstance(tensor, list):  # all_gather(out_list, t): the input is the second argument
            tensor = args[1] if len(args) > 1 else kwargs.get("tensor")
        EVENTS.append({"event": "collective", "op": name, "tensor_device": _fake_device(tensor),
                       "bound": BOUND["index"], "from_project": _from_project()})  # fmt: skip
        return real(*args, **kwargs)

    return collective


def install_fakes() -> None:
    def set_device(device):
        index = device if isinstance(device, int) else torch.device(device).index
        BOUND["index"] = index
        EVENTS.append({"event": "set_device", "index": index})

    _fake_tensor_placement()
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 2
    torch.cuda.set_device = set_device
    torch.cuda.current_device = lambda: BOUND["index"] or 0
    real_backend = tdist.get_backend
    tdist.get_backend = lambda *a, **k: "nccl" if _from_project() else real_backend(*a, **k)
    for name in COLLECTIVES:
        if hasattr(tdist, name):
            setattr(tdist, name, _record_collective(name, getattr(tdist, name)))


def main(argv: list[str]) -> None:
    out = next(a.split("=", 1)[1] for a in argv if a.startswith("--out="))
    install_fakes()
    from svq_fast import dist
    from svq_fast.cli import parse
    from svq_fast.config import Stage1Config
    from svq_fast.train import loop
    from svq_fast.train.stage1 import train_stage1

    built = {}

    def stub_run(cfg, stage, **kw):  # the start-up is done: the engines and the loader exist
        built.update(engines=sorted(stage.engines), dev=str(kw["dev"]))
        return {}

    loop.run = stub_run
    cfg = parse([a for a in argv if not a.startswith("--out=")], "svqgan_tiny", Stage1Config)
    train_stage1(cfg)
    rank = dist.rank()
    dist.release_shm_allreduce_name(rank)  # the real init skipped it: it believed it was on GPUs
    with open(os.path.join(out, f"startup_rank{rank}.json"), "w") as f:
        json.dump({"local_rank": int(os.environ["LOCAL_RANK"]), "built": built, "events": EVENTS}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
