"""Multi-GPU start-up, checked on CPU: two ranks run the real stage-1 start-up (init_deepspeed, prepare_run, both
engines, the loader) under recording CUDA fakes (fake_cuda_startup.py). Each rank must bind cuda:LOCAL_RANK before its
first collective, and every collective tensor our code issues must live on that device. Before the binding existed,
nothing called torch.cuda.set_device until deepspeed.initialize, so prepare_run's broadcasts ran on cuda:0 on every
rank (NCCL: rank 1's tensor on another device than its group's)."""

import json
import subprocess
from pathlib import Path

import pytest

from svq_fast.dist import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("fake_cuda_startup.py")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def startup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_binding")
    cmd = deepspeed_command(
        SCRIPT,
        f"--out={tmp}",
        "--config",
        "svqgan_tiny",
        f"--data.synthetic_default={tmp / 'data'}",
        "--data.synthetic_train_samples=32",
        "--model.ch=16",
        "--log.progress=false",
        f"--run.out_dir={tmp / 'run'}",
    )
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return [json.loads((tmp / f"startup_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_the_startup_really_ran_through_the_engines(startup):
    for blob in startup:
        assert blob["built"]["engines"] == ["discriminator", "generator"]
        assert any(e["event"] == "collective" and e["from_project"] for e in blob["events"])


def test_each_rank_binds_its_local_gpu_before_its_first_collective(startup):
    for blob in startup:
        events, local = blob["events"], blob["local_rank"]
        first_collective = next(i for i, e in enumerate(events) if e["event"] == "collective")
        binds = [i for i, e in enumerate(events[:first_collective]) if e["event"] == "set_device"]
        assert binds, f"rank {local}: {events[first_collective]['op']} ran before any torch.cuda.set_device"
        assert events[binds[-1]]["index"] == local, f"rank {local} bound cuda:{events[binds[-1]]['index']}"
        assert all(e["index"] == local for e in events if e["event"] == "set_device"), events


def test_every_collective_tensor_of_ours_lives_on_the_bound_device(startup):
    for blob in startup:
        local = blob["local_rank"]
        ours = [e for e in blob["events"] if e["event"] == "collective" and e["from_project"] and e["op"] != "barrier"]
        wrong = [e for e in ours if e["tensor_device"] != f"cuda:{local}" or e["bound"] != local]
        assert not wrong, f"rank {local}: collectives off cuda:{local}: {wrong[:5]}"
