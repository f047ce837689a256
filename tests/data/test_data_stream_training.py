"""2-rank deepspeed training runs (CPU, gloo) streaming their shards from an HTTP server on 127.0.0.1 and through
`pipe:cat` commands, each SIGKILLed (the launcher's whole process group) once a checkpoint is complete and then
resumed, reproduce each other's losses step for step. The kills are staggered (the HTTP run after step 2, the
pipe: run after step 4), so every resumed step is checked against a run that was not interrupted there:
steps 3-4 of the resumed HTTP run against the pipe: run's first launch, steps 5-6 of the resumed pipe: run
against the HTTP run, which ran through them in one go. (Four launches, not five: a separate uninterrupted run
would cost another ~25 s.) The index (sample counts, the class histogram of the class-balanced loss) is read
beside the shards through the same opener.

Bounded: every launch has a timeout, the wait for a checkpoint a deadline, the server talks to 127.0.0.1 only."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from svq_fast.data.make_shards import write_synthetic
from svq_fast.dist import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS, SAVE_EVERY = 6, 2


def _cmd(shards: str, out: Path, *extra: str) -> list[str]:
    return deepspeed_command(
        ROOT / "recipes/train_svqgan.py",
        "--config",
        "svqvae_tiny",
        f"--data.train_shards={shards}",
        "--model.ch=16",
        f"--optim.max_steps={STEPS}",
        "--log.every=1",
        "--log.tensorboard=false",
        "--optim.micro_batch=4",
        f"--run.save_every={SAVE_EVERY}",
        "--log.progress=false",
        f"--run.out_dir={out}",
        *extra,
    )


def _run(shards: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(shards, out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=300)


def _run_and_kill(shards: str, out: Path, log: Path, at: int) -> None:
    """Start a run in its own process group and SIGKILL the group once the checkpoint of step `at` is COMPLETE."""
    marker = out / "checkpoints" / f"step{at:08d}" / "COMPLETE"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(shards, out), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            # the checkpoint, and the loss history rank 0 writes right after it (the loop writes history.json
            # after the COMPLETE marker: a kill between the two would lose the losses this test compares)
            while not (marker.exists() and at in _losses(out)):
                assert proc.poll() is None, f"the run ended before its checkpoint: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"no checkpoint of step {at} within 240 s"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for _ in range(200):  # every process of the group is gone (bounded: 10 s)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("processes of the killed run are still alive")
    assert not (out / "export").exists(), "the kill came after the run finished"


def _losses(out: Path) -> dict[int, dict]:
    try:
        history = json.loads((out / "history.json").read_text())
    except (OSError, ValueError):  # not written yet
        return {}
    return {h["step"]: {k: v for k, v in h.items() if k in ("loss", "rec", "sem_ce", "vq_x", "vq_s")} for h in history}


def test_streamed_runs_killed_and_resumed_reproduce_each_other(tmp_path, fx):
    data = tmp_path / "shards"
    write_synthetic(
        str(data), split="train", size=64, num_samples=160, samples_per_shard=40, processes=1, progress=False
    )
    names = sorted(p.name for p in data.glob("*.tar"))
    assert names == [f"synthetic-train-{k:06d}.tar" for k in range(4)]
    pattern = "synthetic-train-{000000..000003}.tar"
    runs = {}
    with fx.serve_dir(str(data)) as server:
        plans = (("http", f"{server.url}/{pattern}", 2), ("pipe", f"pipe:cat {data}/{pattern}", 4))
        for kind, shards, kill_at in plans:
            out = tmp_path / kind
            _run_and_kill(shards, out, tmp_path / f"{kind}_killed.log", kill_at)
            resumed = _run(shards, out, "--run.resume=auto")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert "resumed from" in resumed.stdout + resumed.stderr
            assert (out / "export" / "model.safetensors").exists()
            runs[kind] = _losses(out)
        requests = dict(server.requests)
    assert sorted(runs["http"]) == sorted(runs["pipe"]) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        a, b = runs["http"][step], runs["pipe"][step]
        assert a.keys() == b.keys() and "loss" in a, step
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), step
    # the index (counts, class histogram) and the shards were read over HTTP by both ranks of both HTTP launches
    assert requests["index.json"] >= 4 and sum(requests.get(n, 0) for n in names) >= 4, requests
