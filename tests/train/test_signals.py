"""What a cluster does to a 2-rank stage-1 job under the real `deepspeed` launcher, one launch per event:

- SIGTERM to the launcher's PID alone (a supervisor stopping the job): the ranks notice the launcher is gone,
  checkpoint (its manifest verifies against the real DeepSpeed files, and a flipped byte in an optimizer file is
  named), exit, and leave no orphan. Resuming is test_resume.py's; the refusal of a fresh start over checkpoints
  is tested in-process in test_reliability.py (through the launcher it is the same SystemExit(2), which deepspeed
  passes on: measured once, see benchmarks/results/reliability_cpu.md).
- SIGTERM to the whole process group with data.num_workers=2 (SLURM preemption, scancel): the DataLoader workers
  ignore it, every rank checkpoints and exits 0.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from svq_fast.dist import deepspeed_command
from svq_fast.train.checkpoint import verify_files

ROOT = Path(__file__).resolve().parents[2]
SIGNALLER = Path(__file__).with_name("signal_at_step.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _args(data, out, *extra):
    return [
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={data}",
        "--data.synthetic_train_samples=100",
        "--model.ch=16",
        "--optim.micro_batch=2",
        "--log.every=1",
        "--log.progress=false",
        "--log.tensorboard=false",
        "--loss.disc_start=2",
        "--loss.disc_warmup=1",
        "--run.save_every=2",
        f"--run.out_dir={out}",
        *extra,
    ]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(tmp, name, script, args, **popen):
    log = open(tmp / f"{name}.log", "w")
    cmd = deepspeed_command(script, *args)
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=_env(), **popen)


def _wait_for(paths, proc, timeout=240):
    t0 = time.time()
    while not all(p.exists() for p in paths):
        assert proc.poll() is None, f"the job ended before the marker (rc {proc.returncode})"
        assert time.time() - t0 < timeout, "no marker"
        time.sleep(0.2)


def _run(tmp, name, args):
    cmd = deepspeed_command(ROOT / "recipes/train_svqgan.py", *args)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=_env())
    (tmp / f"{name}.log").write_text(r.stdout + r.stderr)
    return r


def _signal_job(tmp, name, out, data, send, *extra):
    """Start the job, wait until both ranks passed step 2, send the signal with send(proc), wait for every process
    of the job to end -> (the launcher's returncode, the log, the rank pids)."""
    marker = tmp / f"{name}.marker"
    args = ["--marker-at-step=2", f"--marker={marker}", *_args(data, out, "--optim.max_steps=200", *extra)]
    proc = _start(tmp, name, SIGNALLER, args, start_new_session=True)
    _wait_for([Path(f"{marker}.rank0"), Path(f"{marker}.rank1")], proc)
    family = psutil.Process(proc.pid).children(recursive=True)
    ranks = [int(Path(f"{marker}.rank{r}").read_text().split()[0]) for r in (0, 1)]
    send(proc)
    _, alive = psutil.wait_procs(family, timeout=120)
    orphans = [p.pid for p in alive]
    for p in alive:  # clean up before asserting
        p.kill()
    rc = proc.wait(timeout=60)
    assert orphans == [], f"processes still running after the signal: {orphans}"
    return rc, (tmp / f"{name}.log").read_text(), ranks


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("signals")


def test_sigterm_to_the_launcher_alone_checkpoints_and_leaves_no_orphans(tmp):
    data, out = tmp / "data", tmp / "launcher"
    rc, log, ranks = _signal_job(tmp, "launcher", out, data, lambda p: p.send_signal(signal.SIGTERM))
    assert rc == -signal.SIGTERM  # the runner itself died of the signal
    assert "launcher process" in log and "is gone" in log, log[-3000:]
    assert "stopped at step" in log and "(preempted)" in log, log[-3000:]
    assert not any(psutil.pid_exists(p) for p in ranks)
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*") if (p / "COMPLETE").exists())
    assert tags, "no checkpoint"
    stopped = int(tags[-1][4:])
    manifest = json.loads((out / "checkpoints" / tags[-1] / "COMPLETE").read_text())
    assert manifest["step"] == stopped and manifest["run_id"] and manifest["files"]
    assert not (out / "export").exists() and not (out / "LOCK").exists()
    assert not list((out / "checkpoints").glob(".tmp-*"))

    # the real DeepSpeed files verify against the manifest; one flipped byte in an optimizer partition is named
    tag = out / "checkpoints" / tags[-1]
    assert verify_files(str(tag)) == []
    optim = next(tag.glob("generator/*optim_states.pt"))
    raw = bytearray(optim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    optim.write_bytes(bytes(raw))
    assert verify_files(str(tag)) == [f"{optim} does not match its sha256 in the manifest (damaged)"]


def test_groupwide_sigterm_with_loader_workers_checkpoints(tmp):
    data, out = tmp / "data", tmp / "group"
    rc, log, _ = _signal_job(
        tmp, "group", out, data, lambda p: os.killpg(p.pid, signal.SIGTERM), "--data.num_workers=2"
    )
    assert "Traceback" not in log and "DataLoader worker" not in log, log[-3000:]
    assert "stopped at step" in log and "(preempted)" in log, log[-3000:]
    tags = [p for p in (out / "checkpoints").glob("step*") if (p / "COMPLETE").exists()]
    assert tags and not (out / "export").exists()
    assert rc in (-signal.SIGTERM, 0, 1), log[-2000:]
