"""DeepSpeed's CPU start compiles no shared-memory allreduce op (svq_fast.dist.skip_shm_allreduce_build)."""

import os
import subprocess
import sys

SCRIPT = """
import importlib
from svq_fast import dist
rank, world = dist.init_deepspeed()
assert (rank, world) == (0, 1), (rank, world)
assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None
print("ok")
"""


def test_cpu_start_builds_no_shm_allreduce_op(tmp_path):
    # an empty extensions cache, as on a fresh machine: the op would be compiled into it (36 s) at init_distributed
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CUDA_VISIBLE_DEVICES": ""}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    built = list((tmp_path / "ext").rglob("*.so")) if (tmp_path / "ext").exists() else []
    assert built == [], f"DeepSpeed compiled {built}"
    assert "deepspeed_shm_comm" not in r.stdout + r.stderr
