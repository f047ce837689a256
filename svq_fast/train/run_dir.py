"""Per-run set-up shared by both stages: the run directory (its lock, its owner's run id, config.json), the
fresh-start-or-resume decision, and CPU thread counts.

    <run_dir>/LOCK         {"pid", "host", "start"} of the job writing the directory (created whole: written aside,
                           then hard-linked into place); a second job refuses to start while that process lives (a
                           lock left by a dead process on this host, or by a process whose pid was reused, is
                           taken over, saying which)
    <run_dir>/run.json     {"run_id", "events"}: the run that owns the directory (fresh per start, kept by resumes)
    <run_dir>/config.json  the typed config of the latest start
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import sys
import time
import uuid

import torch

from svq_fast import dist
from svq_fast.config import Stage2Config, to_json
from svq_fast.train.checkpoint import checkpoint_run_id, complete_checkpoints, read_manifest

LOCK = "LOCK"
RUN_FILE = "run.json"
# what a fresh start with run.overwrite=true removes (the previous run's outputs)
_PREVIOUS_OUTPUTS = ("checkpoints", "export", "history.json", "tb", RUN_FILE)


class RunDirError(SystemExit):
    """The run directory cannot be used as asked (another job holds it, or a fresh start would mix two runs).
    A SystemExit with status 2, like a config error: raise it on every rank."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def prepare_run(cfg, rank: int) -> str:
    """Collective. Lock run.out_dir, refuse a fresh start over another run's checkpoints (unless run.overwrite),
    write config.json (rank 0), and split CPU cores between local ranks -> the run directory."""
    run_dir = cfg.run.out_dir
    error = ""
    if rank == 0:
        try:
            os.makedirs(run_dir, exist_ok=True)
            acquire_lock(run_dir)
            check_start(run_dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
            if isinstance(cfg, Stage2Config):
                record_stage1_identity(cfg, run_dir)
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                f.write(to_json(cfg))
        except RunDirError as e:
            error = e.message
        except FileNotFoundError as e:  # e.g. the stage-1 export a GPT config names
            error = str(e)
        except OSError as e:
            error = f"cannot prepare the run directory {run_dir}: {e}"
    error = dist.broadcast_text(error)
    if error:
        release_lock(run_dir)  # if this call took it
        if rank == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        raise RunDirError(error)
    if isinstance(cfg, Stage2Config):  # every rank uses the identity rank 0 recorded
        cfg.stage1_sha256 = dist.broadcast_text(cfg.stage1_sha256)
        cfg.stage1_semantic_sha256 = dist.broadcast_text(cfg.stage1_semantic_sha256)
    if not torch.cuda.is_available():
        # Several CPU ranks on one machine would otherwise each start one thread per core.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    dist.barrier()
    return run_dir


def record_stage1_identity(cfg: Stage2Config, run_dir: str) -> None:
    """Fill the GPT config's stage-1 hashes (sha256 of each stage-1 export's weights) when not pinned already, so
    the GPT's export names the exact stage-1 model it was trained on. A resume refuses when a stage-1 export
    changed since the run started (its tokens would change under the GPT), unless the new hash is pinned."""
    from svq_fast.export import weights_sha256

    before = {}
    if cfg.run.resume:
        try:
            with open(os.path.join(run_dir, "config.json")) as f:
                before = json.load(f).get("config", {})
        except (OSError, ValueError, AttributeError):
            before = {}
    for path_key, hash_key in (("stage1", "stage1_sha256"), ("stage1_semantic", "stage1_semantic_sha256")):
        path = getattr(cfg, path_key)
        if not path or getattr(cfg, hash_key):
            continue  # no such model, or pinned by the user
        now = weights_sha256(path)
        recorded = before.get(hash_key) if isinstance(before, dict) else None
        if recorded and recorded != now:
            raise RunDirError(
                f"the stage-1 export {path} changed since this GPT run started (its weights' sha256 was "
                f"{recorded[:16]}..., now {now[:16]}...): resuming would train on other tokens. Restore that export, "
                f"or pass --{hash_key}={now} to continue on the new one."
            )
        setattr(cfg, hash_key, now)


# -- fresh start or resume ----------------------------------------------------------------------------------


def check_start(run_dir: str, *, resume: str, overwrite: bool) -> None:
    """A fresh start (resume '') in a directory that holds complete checkpoints refuses, so two runs never mix;
    with overwrite it removes the previous run's outputs first. A resume refuses when run.json (or the checkpoint
    asked for) names another run than the directory's checkpoints: it would start afresh, or continue another
    run, and its saves would land on those checkpoints' names."""
    if resume:
        check_resume_owner(run_dir, resume)
        return
    found = complete_checkpoints(run_dir)
    if not found:
        return
    newest = found[-1]
    owner = (read_manifest(newest) or {}).get("run_id") or "of an older version"
    if not overwrite:
        raise RunDirError(
            f"{run_dir} already holds {len(found)} checkpoint(s) of run {owner} (newest: {newest}); a fresh start "
            "there would mix two runs. Resume it with --run.resume=auto, choose another --run.out_dir, or pass "
            "--run.overwrite=true to delete that run's checkpoints, export and history and start over."
        )
    removed = []
    for name in _PREVIOUS_OUTPUTS:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
            removed.append(name + "/")
        elif os.path.exists(path):
            os.remove(path)
            removed.append(name)
    print(f"run.overwrite=true: removed the previous run's {', '.join(removed)} from {run_dir}", flush=True)


def _runs(tags: list[str]) -> dict[str, list[str]]:
    """{run id: its tags, oldest first} ('' for tags of older versions, which record none)."""
    out: dict[str, list[str]] = {}
    for t in tags:
        out.setdefault(checkpoint_run_id(t), []).append(t)
    return out


def _describe(runs: dict[str, list[str]]) -> str:
    return "; ".join(
        f"{len(t)} of run {rid or '(none: written by an older version)'}, newest {os.path.basename(t[-1])}"
        for rid, t in runs.items()
    )


def check_resume_owner(run_dir: str, resume: str) -> None:
    """RunDirError when the run a resume would continue is not the run of the directory's checkpoints: with
    resume=auto, run.json naming a run none of them belongs to (e.g. checkpoints copied in from elsewhere); with
    a path, a checkpoint of another run than the ones in the directory."""
    found = complete_checkpoints(run_dir)
    if not found:
        return
    runs = _runs(found)
    run_file = os.path.join(run_dir, RUN_FILE)
    owner = read_run_id(run_dir)
    if resume == "auto":
        if not owner or owner in runs:
            return
        newest = checkpoint_run_id(found[-1])
        raise RunDirError(
            f"{run_file} names run {owner}, but none of the {len(found)} complete checkpoint(s) in "
            f"{os.path.join(run_dir, 'checkpoints')} belongs to it ({_describe(runs)}): --run.resume=auto would "
            f"start run {owner} afresh at step 0 beside them, and another run's checkpoints are never overwritten. "
            f'If they are this run\'s, set "run_id" in {run_file} to {newest or "the id they record"} (or delete '
            f"{run_file}) and resume again; to start a new run, choose another --run.out_dir, or pass "
            "--run.resume= --run.overwrite=true to delete them first."
        )
    mine = checkpoint_run_id(resume)
    # the directory's run: run.json's when its checkpoints are here, else every run id its checkpoints record
    others = {rid: t for rid, t in runs.items() if rid and rid != mine and (rid == owner or owner not in runs)}
    if mine and others:
        raise RunDirError(
            f"--run.resume={resume} is a checkpoint of run {mine}, but {run_dir} holds checkpoints of another run "
            f"({_describe(others)}): continuing run {mine} there would mix two runs in one directory. Resume into "
            "another --run.out_dir."
        )


def new_run_id() -> str:
    """A fresh run id (time + random; drawn from os.urandom, so no training RNG is consumed)."""
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


def read_run_id(run_dir: str) -> str:
    """The id of the run that owns run_dir ('' when none is recorded)."""
    try:
        with open(os.path.join(run_dir, RUN_FILE)) as f:
            return str(json.load(f).get("run_id", ""))
    except (OSError, ValueError, AttributeError):
        return ""


def record_run(run_dir: str, run_id: str, event: str, step: int) -> None:
    """Rank 0: make run_id the directory's owner and append this start to its events."""
    path = os.path.join(run_dir, RUN_FILE)
    try:
        with open(path) as f:
            blob = json.load(f)
    except (OSError, ValueError):
        blob = {}
    if not isinstance(blob, dict) or blob.get("run_id") != run_id:
        blob = {"run_id": run_id, "events": []}
    blob["events"].append({"event": event, "step": step, "time": time.time(), "host": socket.gethostname(),
                           "pid": os.getpid()})  # fmt: skip
    os.makedirs(run_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(blob, f, indent=1)
    os.replace(tmp, path)


# -- the lock -----------------------------------------------------------------------------------------------


def _start_time(pid: int) -> str:
    return dist.process_start(pid) or ""


def _gone(pid: int, start: str) -> str:
    """Why the lock holder `pid` (started at `start`, clock ticks since boot) no longer runs; '' while it does: the
    pid exists, is no zombie, and (with /proc) started when the holder did."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} on this host is gone"
    except PermissionError:
        return ""
    if not os.path.isdir("/proc/self"):
        return ""
    now = dist.process_start(pid)
    if now is None:
        return f"pid {pid} on this host is gone (a zombie)"
    if start and now != start:
        return (
            f"pid {pid} now belongs to another process, started at clock tick {now} since boot; the lock's holder "
            f"started at tick {start}"
        )
    return ""


_held: set[str] = set()
_LOCK_FILL_SECONDS = 5.0  # how long an empty or half-written LOCK is taken for one being written (older versions)


def _create_lock(path: str, blob: dict) -> None:
    """Create `path` holding `blob` in one step (FileExistsError if it exists): the JSON goes into a private file
    first, which is then hard-linked to the lock's name, so no reader ever sees an empty LOCK."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(blob, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create, then fill (a short empty moment)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(blob, f)
    finally:
        os.remove(tmp)


def _read_holder(path: str) -> dict | None:
    """The lock's holder ({} for a lock that stays empty or unreadable; None when it vanished meanwhile). A lock
    that does not parse yet while it is young may be being written: read again for up to _LOCK_FILL_SECONDS."""
    while True:
        try:
            with open(path) as f:
                text = f.read()
            age = time.time() - os.path.getmtime(path)
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            blob = json.loads(text)
            return blob if isinstance(blob, dict) else {}
        except ValueError:
            if not 0 <= age < _LOCK_FILL_SECONDS:
                return {}
        time.sleep(0.1)


def acquire_lock(run_dir: str) -> None:
    """Create <run_dir>/LOCK for this process, or raise RunDirError naming the live holder. A lock whose process
    is gone (same host) is stale and taken over; one held on another host cannot be checked and refuses."""
    path = os.path.join(run_dir, LOCK)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()), "time": time.time()}
    for _ in range(3):
        try:
            _create_lock(path, me)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released while we looked: try again
            if holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                _held.add(os.path.abspath(path))
                return  # this process already holds it
            if holder.get("host") not in (None, me["host"]):
                raise RunDirError(
                    f"{run_dir} is locked by pid {holder.get('pid')} on host {holder.get('host')} ({path}); another "
                    "job is writing this run directory. If that job is dead, delete the lock file and start again."
                ) from None
            pid = holder.get("pid")
            valid = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
            why = _gone(pid, str(holder.get("start", ""))) if valid else "it names no process: empty or damaged"
            if not why:
                raise RunDirError(
                    f"{run_dir} is locked by a running job (pid {pid} on this host, {path}): two jobs must not write "
                    "one run directory. Wait for it to finish (or stop it), or choose another --run.out_dir."
                ) from None
            print(f"removing the stale lock {path} ({why})", flush=True)
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        _held.add(os.path.abspath(path))
        return
    raise RunDirError(f"cannot take the lock {path}: it keeps being re-created by another job")


def release_lock(run_dir: str) -> None:
    """Remove <run_dir>/LOCK if this process holds it (a no-op otherwise)."""
    path = os.path.abspath(os.path.join(run_dir, LOCK))
    if path not in _held:
        return
    _held.discard(path)
    try:
        with open(path) as f:
            if json.load(f).get("pid") != os.getpid():
                return
        os.remove(path)
    except (OSError, ValueError):
        pass


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release_lock(os.path.dirname(path))
