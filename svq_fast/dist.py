"""The one owner of rank, world size, process-group set-up and the collectives every layer uses.

Everything here works with or without a process group: without one, this process is rank 0 of a world of 1
and every collective is the identity. Collective tensors live on `comm_device()` (NCCL wants this rank's GPU).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank_world() -> tuple[int, int]:
    return rank(), world_size()


def is_multi_rank() -> bool:
    return world_size() > 1


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def comm_device() -> torch.device:
    """Where collective tensors must live for the current backend (NCCL: this rank's GPU)."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# -- joining the launcher's process group ---------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: the rendezvous port of a single-process group, or of a launcher a test or
    benchmark starts (taken by the first process that binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(script, *args, ranks: int = 2) -> list[str]:
    """argv that runs `script args` on `ranks` local processes under this interpreter's deepspeed launcher, with
    a free rendezvous port: how tests and benchmarks start a multi-rank run. The launcher is started as a module of
    this interpreter (`python -m deepspeed.launcher.runner`, what the `deepspeed` script runs), so it is found
    wherever deepspeed is importable: also a `pip --target` install, which puts no script next to the interpreter."""
    runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    return [*runner, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *map(str, args)]


def bind_local_device() -> torch.device | None:
    """Make cuda:LOCAL_RANK this process's current device (None without CUDA). Must run before the first
    collective: DeepSpeed 0.19 binds the NCCL group to cuda:LOCAL_RANK (`device_id=` in init_process_group) but never
    calls torch.cuda.set_device before deepspeed.initialize, so a collective issued earlier (the run id's broadcast,
    a barrier) would run on cuda:0 on every rank: rank 1's tensor on another device than its group's, and a CUDA
    context of every rank on GPU 0."""
    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local} but this node shows {torch.cuda.device_count()} GPU(s) (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}): start as many ranks per node as it has GPUs"
        )
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_deepspeed() -> tuple[int, int]:
    """Join the process group set up by the launcher (deepspeed / torchrun / accelerate), or make a
    single-process one when the script was started with plain `python`. Returns (rank, world_size)."""
    import deepspeed

    launched = "RANK" in os.environ or "LOCAL_RANK" in os.environ
    if launched:
        watch_launcher()
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
    if not is_initialized():
        bind_local_device()
        if not torch.cuda.is_available():
            skip_shm_allreduce_build()
        deepspeed.init_distributed(
            dist_backend=None if torch.cuda.is_available() else "gloo", auto_mpi_discovery=False, verbose=False
        )
        if not torch.cuda.is_available():  # the shm workspace belongs to DeepSpeed's CPU accelerator only
            release_shm_allreduce_name(rank())
    watch_peers()
    return rank_world()


def init_from_env() -> tuple[int, int]:
    """Join a torch.distributed group when the launcher's environment asks for more than one rank (no DeepSpeed:
    for jobs such as offline tokenization). Returns (rank, world_size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_initialized():
        device = bind_local_device()
        tdist.init_process_group("nccl" if device is not None else "gloo", device_id=device)
        watch_peers()
    return rank_world()


def shm_allreduce_path(rank_: int) -> str:
    """/dev/shm file of DeepSpeed's CPU shared-memory allreduce workspace for `rank_` of this launch
    (the name deepspeed/ops/csrc/cpu/comm/shm.cpp gives it: uid, MASTER_ADDR, MASTER_PORT, rank)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank_}"


def skip_shm_allreduce_build() -> None:
    """Keep DeepSpeed's CPU backend from compiling its shared-memory allreduce op at init_distributed.

    DeepSpeed (0.19) JIT-builds that op on every CPU start whose ~/.cache/torch_extensions lacks it: 36 s on the
    2-vCPU development VM, so on every fresh machine (CI, a new clone's `make demo`). The op only serves
    inference_all_reduce, which training never calls: its collectives go to torch.distributed (gloo) either way.
    Without the op no /dev/shm workspace is made either. A DeepSpeed without build_shm_op is left alone."""
    import importlib

    comm = importlib.import_module("deepspeed.comm.torch")  # `import deepspeed.comm.torch` binds the torch module
    if hasattr(comm, "build_shm_op"):
        comm.build_shm_op = lambda: None


def release_shm_allreduce_name(rank_: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory allreduce file once every rank has mapped it.

    DeepSpeed (0.19) creates one ~66 MB /dev/shm file per rank when all ranks are local (LOCAL_SIZE == world size,
    as under the deepspeed launcher) and never removes it, so every launch would leave its workspace in RAM. Each
    rank maps all ranks' files inside deepspeed.init_distributed, so after a barrier the names can go; the mappings
    stay valid and the memory is returned when the processes exit, also when they crash.
    """
    barrier()
    try:
        os.unlink(shm_allreduce_path(rank_))
    except FileNotFoundError:  # not a local-ranks launch (torchrun, accelerate, plain python): nothing was created
        pass


# -- the launcher's death -----------------------------------------------------------------------------

_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner", "torch.distributed.run",
                     "torch.distributed.launch", "accelerate.commands.launch")  # fmt: skip
_LAUNCHER_SCRIPTS = ("deepspeed", "ds", "torchrun", "accelerate")
_PR_SET_PDEATHSIG = 1
_watching: list[tuple[int, str]] = []


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks) of a live process from /proc, or None when it is gone (a zombie,
    dead but not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]  # ppid, starttime (fields 4 and 22 of proc(5))


def process_start(pid: int) -> str | None:
    """A live process's start time (clock ticks since boot, from /proc: tells a reused pid from the original);
    None when it is gone or a zombie, or without /proc."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _argv(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _is_launcher(argv: list[str]) -> bool:
    """A deepspeed / torchrun / accelerate launcher process (its script, or python -m its module)."""
    return any(a in _LAUNCHER_MODULES for a in argv) or any(os.path.basename(a) in _LAUNCHER_SCRIPTS for a in argv[:2])


def launcher_chain() -> list[tuple[int, str, str]]:
    """[(pid, start time, command)] of the launcher processes above this rank: the parent, and above it every
    ancestor whose command line is a launcher's (the `deepspeed` runner above deepspeed.launcher.launch)."""
    chain, pid = [], os.getppid()
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            break
        argv = _argv(pid)
        if chain and not _is_launcher(argv):
            break
        cmd = " ".join(argv)
        chain.append((pid, stat[1], cmd))
        pid = stat[0]
    if not chain and os.getppid() > 1:  # no /proc: the parent alone, watched through os.getppid()
        chain.append((os.getppid(), "", ""))
    return chain


def watch_launcher(interval: float = 1.0) -> None:
    """Make this rank notice its launcher's death: the kernel sends SIGTERM when the parent dies
    (prctl PR_SET_PDEATHSIG), and a watcher thread polls the launcher processes above it (the `deepspeed` runner
    sits above its launch.py, so a SIGTERM to the runner alone leaves the parent alive). Either way this process
    gets a SIGTERM, which the training loop turns into a checkpoint and a clean exit at the next step boundary.
    Idempotent; consumes no random numbers."""
    if _watching:
        return
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    chain = launcher_chain()
    _watching.extend((pid, start) for pid, start, _ in chain)
    if os.getppid() != parent or parent <= 1:  # died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
        return

    def alive(pid: int, start: str) -> bool:
        if pid == parent:
            return os.getppid() == parent
        stat = _proc_stat(pid)
        return stat is not None and (not start or stat[1] == start)

    def watch() -> None:
        while True:
            time.sleep(interval)
            gone = [(pid, cmd) for pid, start, cmd in chain if not alive(pid, start)]
            if gone:
                pid, cmd = gone[0]
                print(
                    f"[rank {rank()}] launcher process {pid} ({cmd.strip()[:80] or 'parent'}) is gone: "
                    "checkpointing at the next step boundary, then exiting",
                    file=sys.stderr,
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=watch, name="svq-launcher-watch", daemon=True).start()


# -- one rank's failure stops every rank ------------------------------------------------------------------
# A rank that raises leaves its peers blocked in their next collective until the launcher notices (or NCCL's
# 30-minute timeout), and they die without saying why. Instead the failing rank writes its error into the process
# group's key-value store (the launcher's rendezvous TCPStore, which every rank already talks to), and a thread on
# every rank polls that key: a rank that finds it prints the failed rank's error and exits at once, even from the
# middle of a collective. The store is polled, not waited on, so the thread never holds a store request open.

FAILURE_KEY = "svq_fast/failure"
SEEN_KEY = "svq_fast/failure_seen"  # counts the ranks that printed the failure
PEER_POLL_SECONDS = 0.5
ANNOUNCE_WAIT_SECONDS = 5.0  # the failing rank waits this long at most for the others to print its error
PEER_EXIT_CODE = 3  # a rank stopped because another rank failed (the failed rank exits with its own error)
_peer_watch: dict = {}


def _store():
    try:
        return tdist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):  # no default group, or a backend without a store
        return None


def announce_failure(error: BaseException) -> None:
    """Tell every rank that this one failed with `error` (first failure wins; a no-op without a multi-rank group)."""
    store = _store() if is_multi_rank() else None
    if store is None:
        return
    _peer_watch["stopped"] = True
    text = f"rank {rank()}: {type(error).__name__}: {error}"
    try:
        if store.check([FAILURE_KEY]):
            return  # another rank failed first: its error is the one every rank prints
        store.set(FAILURE_KEY, text[:4000])
        # Let the others print it before this rank exits: the launcher kills every rank once one has exited.
        deadline = time.monotonic() + ANNOUNCE_WAIT_SECONDS
        while store.add(SEEN_KEY, 0) < world_size() - 1 and time.monotonic() < deadline:
            time.sleep(PEER_POLL_SECONDS / 5)
    except (RuntimeError, OSError):  # the store (rank 0's process) may be gone already
        pass


def watch_peers(interval: float = PEER_POLL_SECONDS) -> None:
    """Start (once per process) the thread that stops this rank when another rank announced a failure: it prints
    that rank's error and exits with PEER_EXIT_CODE. Without a multi-rank group it does nothing."""
    store = _store() if is_multi_rank() else None
    if store is None or _peer_watch.get("thread"):
        return
    me = rank()

    def poll() -> None:
        while True:
            time.sleep(interval)
            if _peer_watch.get("stopped"):  # this rank is done or failing itself: the store may go any moment
                return
            try:
                failed = store.check([FAILURE_KEY])
            except (RuntimeError, OSError):  # the store went away: the job is ending; the launcher takes over
                return
            if not failed:
                continue
            try:
                text = store.get(FAILURE_KEY).decode(errors="replace")
            except (RuntimeError, OSError):
                text = "(its error could not be read)"
            print(f"[rank {me}] stopping: {text}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            try:
                store.add(SEEN_KEY, 1)
            except (RuntimeError, OSError):
                pass
            os._exit(PEER_EXIT_CODE)  # the main thread may sit in a collective that will never complete

    _peer_watch["thread"] = threading.Thread(target=poll, name="svq-peer-watch", daemon=True)
    _peer_watch["thread"].start()


class fail_together:
    """Context manager around a rank's work: an exception inside it (other than a clean SystemExit(0)) is announced
    to every rank before it propagates, so the others stop within PEER_POLL_SECONDS with this rank's error. Leaving
    it, by an error or not, ends this rank's watching."""

    def __enter__(self):
        _peer_watch["stopped"] = False
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and not (isinstance(error, SystemExit) and error.code in (0, None)):
            announce_failure(error)
        _peer_watch["stopped"] = True  # done here: stop polling a store that rank 0 takes down when it exits
        return False


# -- collectives --------------------------------------------------------------------------------------


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place global sum of a tensor on any device (returned for chaining); identity without a group."""
    if is_multi_rank():
        buf = t.to(comm_device())
        tdist.all_reduce(buf)
        if buf is not t:
            t.copy_(buf.to(t.device))
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of rank src's tensor to every rank (returned for chaining)."""
    if is_multi_rank():
        buf = t.to(comm_device())
        tdist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf.to(t.device))
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order, on t's device (a one-element list alone)."""
    if not is_multi_rank():
        return [t]
    buf = t.to(comm_device())
    out = [torch.empty_like(buf) for _ in range(world_size())]
    tdist.all_gather(out, buf)
    return [o.to(t.device) for o in out]


def broadcast_text(text: str, src: int = 0) -> str:
    """Rank src's string on every rank (no pickle: UTF-8 bytes in a uint8 tensor)."""
    if not is_multi_rank():
        return text
    data = text.encode() if rank() == src else b""
    n = int(broadcast_(torch.tensor([len(data)], dtype=torch.int64), src).item())
    if n == 0:
        return ""
    buf = torch.zeros(n, dtype=torch.uint8)
    if rank() == src and data:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return bytes(broadcast_(buf, src).tolist()).decode()


def all_gather_text(text: str) -> list[str]:
    """Every rank's string, in rank order (UTF-8 bytes padded to the longest)."""
    if not is_multi_rank():
        return [text]
    data = text.encode()
    lengths = [int(t.item()) for t in all_gather(torch.tensor([len(data)], dtype=torch.int64))]
    buf = torch.zeros(max(1, *lengths), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return [bytes(t[:n].tolist()).decode() for t, n in zip(all_gather(buf), lengths)]


def all_reduce_mean(values: dict[str, float], dev: torch.device) -> dict[str, float]:
    """Average scalar metrics over ranks (one collective for the whole dict)."""
    if not values or not is_multi_rank():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    tdist.all_reduce(t)
    t /= world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks of a tensor on any device (returned for chaining); no host read."""
    if is_multi_rank():
        all_reduce_sum_(t).div_(world_size())
    return t


def all_reduce_mean_tensors(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average 0-dim device tensors over ranks -> host floats: one stacked all-reduce and one read for the dict
    (the logging step's read of the window)."""
    if not values:
        return {}
    keys = sorted(values)  # the same order on every rank
    t = torch.stack([values[k].reshape(()).double() for k in keys])
    if is_multi_rank():
        t = t.to(comm_device())
        tdist.all_reduce(t)
        t /= world_size()
    return dict(zip(keys, t.tolist()))


def any_rank(flag: bool, dev: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one (e.g. a stop request, a non-finite loss)."""
    if not is_multi_rank():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=dev)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def any_rank_flags(flags: torch.Tensor) -> int:
    """(n,) flags (0/1, on the compute device) -> an int whose bit i is set when flags[i] is set on at least one
    rank: n collective decisions for one all-reduce and one host read (the only read: the packed bits)."""
    flags = flags.float()
    if is_multi_rank():
        buf = flags.to(comm_device())
        tdist.all_reduce(buf, op=tdist.ReduceOp.MAX)
        flags = buf
    weights = torch.pow(2.0, torch.arange(flags.numel(), device=flags.device, dtype=torch.float64))
    return int(((flags > 0).double() * weights).sum().item())
