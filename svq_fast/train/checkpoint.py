"""Checkpoints: DeepSpeed engine state plus per-rank RNG and loader state, resumable exactly, written atomically and
verified before they are loaded (the export a finished run writes is svq_fast.export's).

Layout of a run directory:
    checkpoints/step00001000/<engine>/...        DeepSpeed state of each engine (generator, discriminator, gpt)
    checkpoints/step00001000/state_rank{r}.json  rank r's RNG states and loader position (JSON, no pickle)
    checkpoints/step00001000/COMPLETE            the manifest, written last: run id, step, every file's size and
                                                 sha256; only a tag with a valid manifest is ever loaded

Writing: every rank saves into `checkpoints/.tmp-step00001000-<run id>`; after a barrier the ranks hash the files
(each its share), the parameters are checked to be finite, rank 0 writes the manifest into the temporary tag and
renames it to `step00001000`. An existing tag is never rewritten in place: it is renamed aside first and removed
after the new one is in place. A complete tag that records another run id is never replaced (CheckpointError
before anything is written), and pruning (`keep_last`) only ever removes tags of this run.

Reading: the manifest's sizes and hashes are checked (each rank its share) before DeepSpeed opens a file;
`resume=auto` skips a damaged tag, says which file is wrong and falls back to the previous complete one (also
when the manifest itself is unreadable). RNG files of versions before the JSON state (`rng_rank{r}.pt`) load with
weights_only=True and an allowlist of the four numpy globals they hold.

DeepSpeed's own engine files (`<engine>/*.pt`) are pickles that `torch.load` them with weights_only=False inside
DeepSpeed: a checkpoint directory must come from a trusted source. The hashes guard against damage, not against
someone who can also rewrite the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from svq_fast import dist

COMPLETE = "COMPLETE"
FORMAT = 2  # manifest format; 1 = the marker of older versions ({"step", "engines"}, no hashes, pickled RNG)
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the directory and the file."""


def tag_name(step: int) -> str:
    return f"step{step:08d}"


# -- RNG and per-rank state (JSON) ----------------------------------------------------------------------------


def rng_state() -> dict:
    """This process's RNG states as JSON-able values (torch states are uint8 tensors: stored as byte lists)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002 (legacy global state others use)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _state_file(rank: int) -> str:
    return f"state_rank{rank}.json"


def _write_json(path: str, blob) -> None:
    with open(path, "w") as f:
        json.dump(blob, f)
        f.flush()
        os.fsync(f.fileno())


# -- manifests ----------------------------------------------------------------------------------------------


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _files(tag_dir: str) -> list[str]:
    """Every file under tag_dir except the manifest, as sorted relative paths."""
    out = []
    for root, _, names in os.walk(tag_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), tag_dir)
            if rel not in (COMPLETE, COMPLETE + ".tmp"):
                out.append(rel)
    return sorted(out)


def _hash_share(tag_dir: str, files: list[str]) -> dict[str, dict]:
    """Collective: size and sha256 of every file, each rank hashing files[rank::world]."""
    r, w = dist.rank_world()
    paths = {rel: os.path.join(tag_dir, rel) for rel in files[r::w]}
    mine = {rel: {"size": os.path.getsize(p), "sha256": sha256_file(p)} for rel, p in paths.items()}
    merged: dict[str, dict] = {}
    for text in dist.all_gather_text(json.dumps(mine)):
        merged.update(json.loads(text))
    return merged


def read_manifest(tag_dir: str) -> dict | None:
    """The COMPLETE marker's contents; None when absent or unreadable (an incomplete tag)."""
    try:
        with open(os.path.join(tag_dir, COMPLETE)) as f:
            blob = json.load(f)
    except (OSError, ValueError):
        return None
    return blob if isinstance(blob, dict) else None


def verify_files(tag_dir: str) -> list[str]:
    """Collective: what is wrong with tag_dir's files against its manifest (each rank checks its share of the
    files, every rank gets every problem) -> [] when every file has the recorded size and sha256."""
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return [f"{os.path.join(tag_dir, COMPLETE)} is missing or unreadable (the save was cut off)"]
    files = manifest.get("files")
    if files is None:  # an older version's marker: nothing to check against
        return []
    r, w = dist.rank_world()
    problems = []
    for rel in sorted(files)[r::w]:
        path, want = os.path.join(tag_dir, rel), files[rel]
        if not os.path.isfile(path):
            problems.append(f"{path} is missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{path} has {os.path.getsize(path)} bytes, the manifest says {want['size']}")
        elif sha256_file(path) != want["sha256"]:
            problems.append(f"{path} does not match its sha256 in the manifest (damaged)")
    return [p for text in dist.all_gather_text(json.dumps(problems)) for p in json.loads(text)]


# -- saving -------------------------------------------------------------------------------------------------


def nonfinite_parameters(engines: dict) -> list[str]:
    """Names of this rank's parameters (its ZeRO-3 partition, if partitioned) holding NaN or inf."""
    bad = []
    for name, engine in engines.items():
        for pname, p in engine.module.named_parameters():
            t = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
            if t.numel() and not bool(torch.isfinite(t.detach()).all()):
                bad.append(f"{name}.{pname}")
    return bad


def _after_nonfinite(run_dir: str, run_id: str, last_good: str | None) -> str:
    """What to do after non-finite parameters: the last complete checkpoint is the state they grew from, so
    resuming it unchanged repeats the same steps (the run is deterministic) and the same divergence."""
    if not last_good:
        return "There is no complete checkpoint of this run: lower optim.lr or check the data and start again."
    earlier = complete_checkpoints(run_dir, run_id)[:-1]
    older = f"; earlier ones: {', '.join(os.path.basename(t) for t in earlier[-3:])}" if earlier else ""
    return (
        f"The last complete checkpoint, {last_good}, is the state this diverged from: resuming it as it is "
        "replays the same data with the same random draws and diverges again. Lower optim.lr (or raise "
        f"optim.warmup_steps, or fix the data) before resuming it, or resume an earlier checkpoint{older}."
    )


def _save_failed(tag_dir: str, step: int, err: BaseException, last_good: str | None) -> CheckpointError:
    """A clear error for a failed write (full disk, file-size limit, permissions), naming the file."""
    newest = ""
    try:
        files = [os.path.join(tag_dir, f) for f in _files(tag_dir)]
        if files:
            path = max(files, key=os.path.getmtime)
            newest = f"; the file being written was probably {path} ({os.path.getsize(path)} bytes)"
    except OSError:
        pass
    try:
        usage = shutil.disk_usage(os.path.dirname(tag_dir))
        free = f"{usage.free / 2**30:.2f} GiB free on that file system"
    except OSError:
        free = "free space unknown"
    previous = f"the last complete checkpoint is {last_good}" if last_good else "there is no earlier checkpoint"
    return CheckpointError(
        f"writing the step-{step} checkpoint into {tag_dir} failed on rank {dist.rank()}: {err}{newest} ({free}). "
        f"Is the disk full or a file-size limit (ulimit -f) reached? Nothing was marked complete; {previous}."
    )


def save_checkpoint(
    run_dir: str, step: int, engines: dict, client_state: dict, keep_last: int = 3, *, run_id: str = ""
) -> str:
    """Collective: every rank calls it. Writes into a temporary tag, verifies, renames -> the tag directory.
    `client_state` (JSON-able: the step, this rank's loader position) goes into this rank's state file."""
    root = os.path.join(run_dir, "checkpoints")
    final = os.path.join(root, tag_name(step))
    tmp = os.path.join(root, f".tmp-{tag_name(step)}-{run_id or 'norun'}")
    rank = dist.rank()
    last_good = next(iter(complete_checkpoints(run_dir, run_id)[::-1]), None)
    refusal = dist.broadcast_text(_foreign_tag(final, run_id, step) if rank == 0 else "")
    if refusal:
        raise CheckpointError(refusal)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    dist.barrier()
    try:
        for name, engine in engines.items():
            engine.save_checkpoint(tmp, tag=name, client_state={"step": step} if name == next(iter(engines)) else {})
        _write_json(os.path.join(tmp, _state_file(rank)), {"step": step, "rng": rng_state(), **client_state})
    except (OSError, RuntimeError) as e:
        error = _save_failed(tmp, step, e, last_good)
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    dist.barrier()
    bad = nonfinite_parameters(engines)
    bad_all = [b for text in dist.all_gather_text(json.dumps(bad)) for b in json.loads(text)]
    if bad_all:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        raise CheckpointError(
            f"step {step}: {len(bad_all)} parameter tensors hold NaN or inf (first: {bad_all[:3]}); this state was "
            f"not saved as a checkpoint. {_after_nonfinite(run_dir, run_id, last_good)}"
        )
    files = _hash_share(tmp, _files(tmp))
    if rank == 0:
        manifest = {"format": FORMAT, "run_id": run_id, "step": step, "engines": list(engines),
                    "world_size": dist.world_size(), "time": time.time(), "files": files}  # fmt: skip
        try:
            _write_json(os.path.join(tmp, COMPLETE + ".tmp"), manifest)
            os.replace(os.path.join(tmp, COMPLETE + ".tmp"), os.path.join(tmp, COMPLETE))
            _install(tmp, final)
        except OSError as e:
            raise _save_failed(tmp, step, e, last_good) from e
        mine = [t for t in complete_checkpoints(run_dir) if checkpoint_run_id(t) == run_id]  # never another run's
        for old in mine[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _foreign_tag(final: str, run_id: str, step: int) -> str:
    """Why `final` must not be replaced by this run's save ('' when it may): it is a complete checkpoint that
    records another run id. (Tags of older versions carry no run id and cannot be told apart: replaced as before.)"""
    other = checkpoint_run_id(final) if os.path.isdir(final) else ""
    if not other or other == run_id:
        return ""
    return (
        f"the step-{step} checkpoint of run {run_id or '(no id)'} would replace {final}, a complete checkpoint of "
        f"another run, {other}: another run's checkpoints are never overwritten, so nothing was saved. The "
        f"directory's run.json and its checkpoints disagree: train into another --run.out_dir, or move "
        f"{os.path.dirname(final)} away first"
    )


def _install(tmp: str, final: str) -> None:
    """Rename the finished temporary tag to its final name; a tag already there is renamed aside first, so at
    every moment each name holds either a whole old checkpoint or a whole new one."""
    aside = None
    if os.path.exists(final):
        aside = f"{final}.replaced-{os.getpid()}"
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- finding and loading ------------------------------------------------------------------------------------


def complete_checkpoints(run_dir: str, run_id: str | None = None) -> list[str]:
    """Tag directories that hold a COMPLETE marker, oldest first; with `run_id`, only that run's."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    out = []
    for t in sorted(d for d in os.listdir(root) if _TAG.match(d)):
        manifest = read_manifest(os.path.join(root, t))
        if manifest is None:
            continue
        if run_id and manifest.get("run_id", "") != run_id:
            continue
        out.append(os.path.join(root, t))
    return out


def unreadable_manifests(run_dir: str) -> list[str]:
    """Tag directories whose COMPLETE file exists but does not parse (a save never leaves one: damage)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    tags = [os.path.join(root, t) for t in sorted(os.listdir(root)) if _TAG.match(t)]
    return [t for t in tags if os.path.exists(os.path.join(t, COMPLETE)) and read_manifest(t) is None]


def checkpoint_run_id(tag_dir: str) -> str:
    """The run id a checkpoint's manifest records ('' for older versions' markers)."""
    return str((read_manifest(tag_dir) or {}).get("run_id", ""))


def resolve_resume(run_dir: str, resume: str, run_id: str | None = None) -> str | None:
    """'' -> None; 'auto' -> newest complete checkpoint (of `run_id`, if given) or None; a path -> that path
    (must be complete). The files are not checked here: see resume_candidates / verify_files."""
    found = resume_candidates(run_dir, resume, run_id)
    return found[0] if found else None


def resume_candidates(run_dir: str, resume: str, run_id: str | None = None) -> list[str]:
    """The checkpoints to try, newest first: 'auto' -> every complete one of the run, a path -> [path]."""
    if not resume:
        return []
    if resume == "auto":
        for tag in unreadable_manifests(run_dir):
            print(
                f"warning: {os.path.join(tag, COMPLETE)} exists but is not a readable manifest (truncated or "
                "damaged): resume=auto skips that checkpoint and takes the newest complete one before it",
                file=sys.stderr,
                flush=True,
            )
        return complete_checkpoints(run_dir, run_id)[::-1]
    if not os.path.exists(os.path.join(resume, COMPLETE)):
        raise FileNotFoundError(f"checkpoint {resume} has no {COMPLETE} marker: it is missing or was cut off mid-write")
    return [resume]


def load_checkpoint(tag_dir: str, engines: dict, *, verified: bool = False) -> dict:
    """Collective. Verifies the files against the manifest (unless `verified`), loads every engine and this
    rank's RNG state; returns the client state ({"step", "loader"})."""
    if not verified:
        problems = verify_files(tag_dir)
        if problems:
            raise CheckpointError(f"checkpoint {tag_dir} is damaged: " + "; ".join(problems[:4]))
    manifest = read_manifest(tag_dir) or {}
    client: dict = {}
    for name, engine in engines.items():
        path = os.path.join(tag_dir, name)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is missing: the checkpoint has no state for the {name!r} engine")
        try:
            load_path, state = engine.load_checkpoint(tag_dir, tag=name)
        except Exception as e:  # DeepSpeed's own errors (AssertionError, zip errors) name no file
            raise CheckpointError(f"loading the {name!r} engine from {path} failed: {type(e).__name__}: {e}") from e
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint files of the {name!r} engine under {path}")
        if name == next(iter(engines)):
            client = state or {}
    state_file = os.path.join(tag_dir, _state_file(dist.rank()))
    if os.path.exists(state_file):
        try:
            with open(state_file) as f:
                blob = json.load(f)
        except ValueError as e:
            raise CheckpointError(f"{state_file} is not valid JSON ({e})") from e
        set_rng_state(blob["rng"])
        client = {k: v for k, v in blob.items() if k != "rng"}
    else:
        legacy = os.path.join(tag_dir, f"rng_rank{dist.rank()}.pt")
        if os.path.exists(legacy):  # older versions: torch.save'd RNG states, read without unpickling code
            try:
                with torch.serialization.safe_globals(_legacy_rng_globals()):
                    set_rng_state_legacy(torch.load(legacy, weights_only=True))
            except Exception as e:
                raise CheckpointError(
                    f"{legacy} (an older version's RNG file) cannot be read with weights_only=True: {e}"
                ) from e
        elif manifest.get("files") is not None:
            raise CheckpointError(f"{state_file} is missing: the checkpoint was written by another world size?")
    if manifest.get("files") is None and dist.rank() == 0:
        print(f"warning: {tag_dir} was written by an older version: its files carry no hashes", file=sys.stderr)
    return client


def _legacy_rng_globals() -> list:
    """Exactly what an older version's `torch.save`d RNG file needs beyond weights_only's defaults: numpy's global
    state (np.random.get_state) pickles its uint32 key array as ndarray + dtype (+ its class UInt32DType) +
    _reconstruct (numpy 2 writes numpy._core..., numpy 1 numpy.core...). Nothing that runs code: a payload in the
    file is still refused."""
    from numpy._core.multiarray import _reconstruct

    return [np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct,
            (_reconstruct, "numpy.core.multiarray._reconstruct")]  # fmt: skip


def set_rng_state_legacy(state: dict) -> None:
    """RNG states as the older format held them (python / numpy tuples, torch tensors)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (gathered under ZeRO-3); None on other ranks under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if dist.rank() == 0 else None
    return engine.module.state_dict()
