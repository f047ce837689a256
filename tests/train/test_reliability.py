"""Issue 19's probes that need no second process: run identity, the lock, atomic verified checkpoints, no pickle
in the project's own checkpoint files, the workers' SIGTERM shield, export identity and config validation. Each
asserts the outcome (what is refused, what is left on disk, what the message names). The training loop runs with
a fake engine (as in test_loop.py); the multi-process probes are in test_signals.py."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from svq_fast import dist
from svq_fast.cli import parse
from svq_fast.config import ConfigError, GPTConfig, Stage1Config, Stage2Config, SVQModelConfig, apply_overrides
from svq_fast.export import ExportMismatch, export_model, load_gpt, load_stage1, load_tokenizer, weights_sha256
from svq_fast.models.gpt import SemanticGPT
from svq_fast.train import checkpoint as ckpt
from svq_fast.train import loop
from svq_fast.train.perf import PhaseTimer
from svq_fast.train.run_dir import LOCK, RunDirError, acquire_lock, prepare_run, read_run_id, release_lock

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


# -- a fake engine and stage (DeepSpeed's save/load contract on JSON files) ----------------------------------


class FakeEngine:
    def __init__(self):
        self.module = torch.nn.Linear(2, 2)
        self.steps = 0
        self.loaded_from: list[str] = []

    def zero_optimization_stage(self):
        return 0

    def save_checkpoint(self, save_dir, tag, client_state):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "state.json"), "w") as f:
            json.dump({"client": client_state, "steps": self.steps}, f)

    def load_checkpoint(self, load_dir, tag):
        self.loaded_from.append(load_dir)
        with open(os.path.join(load_dir, tag, "state.json")) as f:
            blob = json.load(f)
        self.steps = blob["steps"]
        return load_dir, blob["client"]


class FakeStage(loop.Stage):
    name = "test"

    def __init__(self, engine, on_step=None):
        super().__init__({"gpt": engine}, [{}], PhaseTimer(CPU))
        self.engine, self.on_step = engine, on_step

    def micro_step(self, batch, step):
        self.engine.steps += 1
        if self.on_step is not None:
            self.on_step(step, self.engine)
        return {"loss": 1.0 / (step + 1)}


def make_cfg(out, **run):
    cfg = Stage2Config(model=GPTConfig(image_vocab=8, semantic_vocab=4, grid=1, n_layer=1, n_head=1, n_embd=2))
    cfg.optim.max_steps, cfg.log.every, cfg.log.progress, cfg.log.tensorboard = 4, 1, False, False
    cfg.run.out_dir, cfg.run.save_every = str(out), 1
    for k, v in run.items():
        setattr(cfg.optim if k == "max_steps" else cfg.run, k, v)
    return cfg


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()  # prepare_run splits the cores between local ranks
    yield
    torch.set_num_threads(n)


def train(out, on_step=None, prepare=True, **run):
    """One start of a run in `out` (through prepare_run, as a recipe does) -> (loop.run's result, engine)."""
    cfg = make_cfg(out, **run)
    if prepare:
        prepare_run(cfg, 0)
    engine = FakeEngine()
    return loop.run(cfg, FakeStage(engine, on_step), rank=0, world=1, dev=CPU, run_dir=str(out)), engine


def tags(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").glob("step*"))


def manifest(out, step):
    return json.loads((Path(out) / "checkpoints" / f"step{step:08d}" / "COMPLETE").read_text())


# -- run identity -------------------------------------------------------------------------------------------


def test_fresh_start_over_another_runs_checkpoints_is_refused_then_overwrite_replaces_them(tmp_path, capsys):
    a, _ = train(tmp_path, keep_last=0)  # run A: steps 1..4, all kept
    before = {t: manifest(tmp_path, int(t[4:])) for t in tags(tmp_path)}
    config_before = (tmp_path / "config.json").read_text()
    assert {m["run_id"] for m in before.values()} == {a["run_id"]} == {read_run_id(str(tmp_path))}

    with pytest.raises(RunDirError) as refused:  # run B, fresh, same directory (the probe 1)
        train(tmp_path, seed=1, save_every=2, max_steps=6)
    assert refused.value.code == 2
    msg = str(refused.value)
    assert "already holds 4 checkpoint(s)" in msg and "step00000004" in msg and "--run.overwrite=true" in msg
    assert {t: manifest(tmp_path, int(t[4:])) for t in tags(tmp_path)} == before  # nothing deleted or rewritten
    assert (tmp_path / "config.json").read_text() == config_before
    assert not (tmp_path / LOCK).exists()

    b, _ = train(tmp_path, seed=1, save_every=2, max_steps=6, overwrite=True)
    assert "removed the previous run's checkpoints/" in capsys.readouterr().out
    assert b["run_id"] != a["run_id"] and tags(tmp_path) == ["step00000002", "step00000004", "step00000006"]
    assert {manifest(tmp_path, s)["run_id"] for s in (2, 4, 6)} == {b["run_id"]}


def test_pruning_and_resume_auto_see_only_this_runs_checkpoints(tmp_path):
    first, _ = train(tmp_path, max_steps=2, keep_last=2)
    # a checkpoint of another run dropped into the directory, newer than any of this run's
    foreign = tmp_path / "checkpoints" / "step00000099"
    os.rename(tmp_path / "checkpoints" / "step00000001", foreign)
    blob = json.loads((foreign / "COMPLETE").read_text())
    (foreign / "COMPLETE").write_text(json.dumps({**blob, "run_id": "someone-else", "step": 99}))
    out, engine = train(tmp_path, max_steps=5, keep_last=2, resume="auto")
    assert engine.loaded_from == [str(tmp_path / "checkpoints" / "step00000002")]  # not the foreign step 99
    assert out["run_id"] == first["run_id"]  # kept across the resume
    assert tags(tmp_path) == ["step00000004", "step00000005", "step00000099"]  # pruned its own only


def test_lock_refuses_a_live_job_and_takes_over_a_dead_ones(tmp_path):
    lock = tmp_path / LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = dist.process_start(sleeper.pid) or ""
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "start": start}))
        with pytest.raises(RunDirError, match=f"locked by a running job \\(pid {sleeper.pid}"):
            train(tmp_path)
        assert not (tmp_path / "checkpoints").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    out, _ = train(tmp_path)  # the holder is gone: its lock is stale
    assert out["step"] == 4 and not lock.exists()  # released at the end
    lock.write_text(json.dumps({"pid": 1, "host": "some-other-node", "start": ""}))
    with pytest.raises(RunDirError, match="locked by pid 1 on host some-other-node"):
        acquire_lock(str(tmp_path))
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "start": "0"}))  # a reused pid
    acquire_lock(str(tmp_path))
    release_lock(str(tmp_path))
    assert not lock.exists()


# -- atomic, verified checkpoints -----------------------------------------------------------------------------


def test_checkpoint_manifest_lists_every_file_and_no_temporary_tag_is_left(tmp_path):
    out, _ = train(tmp_path, max_steps=2)
    m = manifest(tmp_path, 2)
    tag = tmp_path / "checkpoints" / "step00000002"
    on_disk = sorted(str(p.relative_to(tag)) for p in tag.rglob("*") if p.is_file() and p.name != "COMPLETE")
    assert sorted(m["files"]) == on_disk and "state_rank0.json" in on_disk
    for rel, entry in m["files"].items():
        assert entry["size"] == (tag / rel).stat().st_size and entry["sha256"] == ckpt.sha256_file(str(tag / rel))
    assert (m["run_id"], m["step"], m["format"]) == (out["run_id"], 2, ckpt.FORMAT)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")) and not list(tag.rglob("*.pt"))
    state = json.loads((tag / "state_rank0.json").read_text())  # RNG and loader state: plain JSON
    assert state["step"] == 2 and len(state["rng"]["torch"]) == torch.get_rng_state().numel()


def test_rng_state_survives_json_exactly():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)  # noqa: NPY002
    saved = json.loads(json.dumps(ckpt.rng_state()))
    want = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # noqa: NPY002
    ckpt.set_rng_state(saved)
    got = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_resuming_a_finished_run_rewrites_nothing_and_warns(tmp_path, capsys):
    train(tmp_path)
    tag = tmp_path / "checkpoints" / "step00000004"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tag.rglob("*")}
    out, engine = train(tmp_path, resume="auto")
    assert out["step"] == 4 and engine.steps == 4  # restored, no step taken
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in tag.rglob("*")} == before
    assert "optim.max_steps=4 is at or below the resumed step 4" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_resume_auto_skips_a_damaged_checkpoint_before_loading_it_and_names_the_file(tmp_path, capsys, damage):
    train(tmp_path, save_every=2)  # steps 2 and 4
    bad = tmp_path / "checkpoints" / "step00000004" / "gpt" / "state.json"
    if damage == "flip":
        raw = bytearray(bad.read_bytes())
        raw[5] ^= 0x01
        bad.write_bytes(bytes(raw))
    elif damage == "truncate":
        bad.write_bytes(b"")
    else:
        bad.unlink()
    out, engine = train(tmp_path, max_steps=6, save_every=2, resume="auto")
    err = capsys.readouterr().err
    assert f"checkpoint {bad.parents[1]} is damaged and is skipped: {bad}" in err
    assert engine.loaded_from == [str(tmp_path / "checkpoints" / "step00000002")]  # step 4 was never opened
    assert out["step"] == 6 and engine.steps == 2 + 4
    # asked for by path, a damaged checkpoint is an error naming the file (no silent fallback)
    train(tmp_path, max_steps=8, save_every=2, resume="auto")  # (a healthy step 8 to corrupt)
    (tmp_path / "checkpoints" / "step00000008" / "state_rank0.json").write_text("{}")
    damaged = r"step00000008 is damaged: .*step00000008/state_rank0\.json has 2 bytes"
    with pytest.raises(ckpt.CheckpointError, match=damaged):
        train(tmp_path, max_steps=9, resume=str(tmp_path / "checkpoints" / "step00000008"))


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    train(tmp_path, max_steps=1)
    (tmp_path / "checkpoints" / "step00000001" / "gpt" / "state.json").write_text("{}")
    with pytest.raises(ckpt.CheckpointError, match="no intact checkpoint to resume from"):
        train(tmp_path, max_steps=3, resume="auto")


def test_nonfinite_parameters_are_never_marked_complete(tmp_path):
    def poison(step, engine):
        if step == 2:  # the third step leaves NaN weights
            with torch.no_grad():
                engine.module.weight.fill_(float("nan"))

    with pytest.raises(ckpt.CheckpointError) as e:
        train(tmp_path, on_step=poison)
    msg = str(e.value)
    assert "gpt.weight" in msg and "not saved" in msg and "step00000002" in msg  # names the last good one
    assert tags(tmp_path) == ["step00000001", "step00000002"]  # no step 3 tag, complete or not
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_full_disk_during_a_save_names_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """A real EFBIG: the save runs under a 64 KiB file-size limit (ulimit -f), its engine writes 1 MB."""
    script = f"""
import resource, sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_reliability as t
from svq_fast.train import checkpoint as ckpt
class Big(t.FakeEngine):
    def save_checkpoint(self, save_dir, tag, client_state):
        super().save_checkpoint(save_dir, tag, client_state)
        if self.steps >= 2:
            torch.save(torch.zeros(250_000), save_dir + "/" + tag + "/big.pt")
engine = Big()
cfg = t.make_cfg({str(tmp_path)!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    t.loop.run(cfg, t.FakeStage(engine), rank=0, world=1, dev=t.CPU, run_dir=cfg.run.out_dir)
except ckpt.CheckpointError as e:
    print("ERROR:", e)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert "ERROR: writing the step-2 checkpoint into" in r.stdout, r.stdout + r.stderr[-3000:]
    assert ".tmp-step00000002" in r.stdout and "big.pt" in r.stdout and "ulimit -f" in r.stdout
    assert "the last complete checkpoint is" in r.stdout and "step00000001" in r.stdout
    assert tags(tmp_path) == ["step00000001"] and not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_save_cut_off_mid_write_is_never_taken_for_a_checkpoint(tmp_path):
    class Dies(Exception):
        pass

    class CutOff(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state):
            super().save_checkpoint(save_dir, tag, client_state)
            if self.steps == 3:
                raise Dies  # stands in for a SIGKILL in the middle of DeepSpeed's writes

    cfg = make_cfg(tmp_path)
    with pytest.raises(Dies):
        loop.run(cfg, FakeStage(CutOff()), rank=0, world=1, dev=CPU, run_dir=str(tmp_path))
    assert tags(tmp_path) == ["step00000001", "step00000002"]  # the half-written step 3 is under .tmp-* only
    assert len(list((tmp_path / "checkpoints").glob(".tmp-step00000003-*"))) == 1
    out, engine = train(tmp_path, resume="auto", prepare=False)
    assert engine.loaded_from == [str(tmp_path / "checkpoints" / "step00000002")] and out["step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the next save of step 3 replaced the leftover


def test_a_late_sigterm_during_the_final_checkpoint_does_not_kill_it(tmp_path):
    """Two ranks' launcher watchers fire a moment apart: the second SIGTERM lands in the final checkpoint."""

    class Late(FakeEngine):
        def save_checkpoint(self, save_dir, tag, client_state):
            if self.steps == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            super().save_checkpoint(save_dir, tag, client_state)

    cfg = make_cfg(tmp_path, save_every=0)
    out = loop.run(cfg, FakeStage(Late()), rank=0, world=1, dev=CPU, run_dir=str(tmp_path))
    assert out["stop_reason"] == "max_steps" and tags(tmp_path) == ["step00000004"]
    assert (tmp_path / "export" / "model.safetensors").exists()


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PAYLOAD_FLAG', '/nonexistent/x')}",))


def test_a_planted_pickle_in_an_older_rng_file_does_not_run(tmp_path, monkeypatch):
    flag = tmp_path / "payload_ran"
    monkeypatch.setenv("PAYLOAD_FLAG", str(flag))
    tag = tmp_path / "checkpoints" / "step00000001"
    FakeEngine().save_checkpoint(str(tag), "gpt", {"step": 1})
    (tag / "COMPLETE").write_text(json.dumps({"step": 1, "engines": ["gpt"]}))  # an older version's marker
    torch.save({"python": _Payload()}, tag / "rng_rank0.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rng_rank0\.pt .*cannot be read with weights_only=True"):
        ckpt.load_checkpoint(str(tag), {"gpt": FakeEngine()})
    assert not flag.exists()


def test_a_missing_engine_directory_is_named(tmp_path):
    train(tmp_path, max_steps=1)
    tag = tmp_path / "checkpoints" / "step00000001"
    stage = FakeStage(FakeEngine())
    stage.engines = {"gpt": stage.engine, "discriminator": FakeEngine()}
    with pytest.raises(ckpt.CheckpointError, match=r"step00000001/discriminator is missing"):
        ckpt.load_checkpoint(str(tag), stage.engines)


# -- signals ------------------------------------------------------------------------------------------------


class _Slow(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(10_000):
            time.sleep(0.02)
            yield torch.tensor([i])


def test_loader_workers_ignore_sigterm_and_keep_serving():
    loader = torch.utils.data.DataLoader(_Slow(), batch_size=2, num_workers=2)
    loop._workers_ignore_sigterm(loader)
    it = iter(loader)
    next(it)
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so a worker forked with a Python handler can't hide it
    try:
        for w in it._workers:
            os.kill(w.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert all(w.is_alive() for w in it._workers)
        for _ in range(6):
            next(it)
    finally:
        signal.signal(signal.SIGTERM, old)
        del it


def test_a_rank_gets_sigterm_when_its_launcher_dies(tmp_path):
    """A stand-in launcher starts a 'rank' that calls watch_launcher, then dies: the rank gets SIGTERM."""
    flag = tmp_path / "got_sigterm"
    rank = f"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (open({str(flag)!r}, "w").close(), sys.exit(0)))
from svq_fast import dist
dist.watch_launcher(interval=0.2)
print("ready", flush=True)
time.sleep(30)
"""
    launcher = f"""
import os, subprocess, sys
p = subprocess.Popen([sys.executable, "-c", {rank!r}], stdout=subprocess.PIPE, text=True,
                     env={{**os.environ, "RANK": "0"}})
assert p.stdout.readline().strip() == "ready"
print(p.pid, flush=True)
os._exit(0)
"""
    r = subprocess.run([sys.executable, "-c", launcher], capture_output=True, text=True, timeout=60, cwd=ROOT)
    child = int(r.stdout.split()[0])
    t0 = time.time()
    while not flag.exists() and time.time() - t0 < 20:
        time.sleep(0.1)
    assert flag.exists(), r.stderr
    while dist.process_start(child) is not None and time.time() - t0 < 20:
        time.sleep(0.1)
    assert dist.process_start(child) is None  # no orphan


def test_launcher_chain_recognises_launchers():
    assert dist._is_launcher(["/venv/bin/python3", "-u", "-m", "deepspeed.launcher.launch", "--world_info=x"])
    assert dist._is_launcher(["/venv/bin/python3", "/venv/bin/deepspeed", "--num_gpus", "2", "train.py"])
    assert dist._is_launcher(["/venv/bin/torchrun", "--nproc_per_node", "2", "train.py"])
    assert not dist._is_launcher(["/bin/bash", "run_deepspeed_job.sh"])
    assert not dist._is_launcher(["python", "-m", "pytest", "tests/train"])


# -- exports ------------------------------------------------------------------------------------------------


def tiny_stage1():
    model = SVQModelConfig(image_size=16, num_classes=4, ch=8, ch_mult=(1, 2), num_res_blocks=0, attn_resolutions=(),
                           norm_groups=4, z_channels=8, semantic_z_channels=8)  # fmt: skip
    cfg = Stage1Config(model=model)
    cfg.quantizer.image_codebook_size, cfg.quantizer.semantic_codebook_size = 16, 8
    cfg.data.image_size = 16
    return cfg


@pytest.fixture
def stage1_export(tmp_path):
    from svq_fast.models.svq import SVQModel

    cfg = tiny_stage1()
    path = tmp_path / "s1"
    export_model(SVQModel(cfg.model, cfg.quantizer).state_dict(), cfg, str(path))
    return path


def test_export_records_and_checks_its_hashes(stage1_export):
    blob = json.loads((stage1_export / "config.json").read_text())
    assert blob["weights_sha256"] == weights_sha256(str(stage1_export))
    load_stage1(str(stage1_export))
    weights = stage1_export / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0x10
    weights.write_bytes(bytes(raw))
    with pytest.raises(ExportMismatch, match="model.safetensors does not match the sha256 recorded in"):
        load_stage1(str(stage1_export))


def test_an_edited_export_config_is_refused(stage1_export):
    path = stage1_export / "config.json"
    blob = json.loads(path.read_text())
    blob["config"]["model"]["ignore_index"] = 0  # the probe: a changed ignore_index
    path.write_text(json.dumps(blob))
    with pytest.raises(ExportMismatch, match="config.json was edited after the export was written"):
        load_stage1(str(stage1_export))
    path.write_text('{"type": "Stage1Config", "config": ')
    with pytest.raises(ExportMismatch, match=r"s1/config\.json is not valid JSON"):
        load_stage1(str(stage1_export))


def test_old_exports_load_with_a_warning_and_nonfinite_tensors_warn(stage1_export, tmp_path):
    path = stage1_export / "config.json"
    blob = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in blob.items() if not k.endswith("sha256")}))
    with pytest.warns(UserWarning, match="records no weights_sha256"):
        load_stage1(str(stage1_export))
    cfg = tiny_stage1()
    from svq_fast.models.svq import SVQModel

    sd = SVQModel(cfg.model, cfg.quantizer).state_dict()
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = torch.full_like(sd[name], float("nan"))
    export_model(sd, cfg, str(tmp_path / "nan"))
    with pytest.warns(UserWarning, match=f"tensors hold NaN or inf: \\['{name}'"):
        load_stage1(str(tmp_path / "nan"))


def test_random_bytes_in_an_old_export_are_named(stage1_export):
    path = stage1_export / "config.json"
    blob = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in blob.items() if not k.endswith("sha256")}))
    (stage1_export / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.warns(UserWarning), pytest.raises(ExportMismatch, match="not a readable safetensors file"):
        load_stage1(str(stage1_export))


def test_gpt_export_refuses_another_stage1_unless_allowed(stage1_export, tmp_path):
    from svq_fast.models.svq import SVQModel

    s1 = tiny_stage1()
    gpt_cfg = Stage2Config(model=GPTConfig(image_vocab=16, semantic_vocab=8, grid=8, n_layer=1, n_head=2, n_embd=8),
                           stage1=str(stage1_export))  # fmt: skip
    gpt_cfg.data.image_size = 16
    export_model(SemanticGPT(gpt_cfg.model).state_dict(), gpt_cfg, str(tmp_path / "gpt"))
    _, cfg = load_gpt(str(tmp_path / "gpt"))
    assert cfg.stage1_sha256 == weights_sha256(str(stage1_export))
    load_tokenizer(cfg, CPU)
    torch.manual_seed(1)  # stage 1 "trained further in place": other weights, same path
    export_model(SVQModel(s1.model, s1.quantizer).state_dict(), s1, str(stage1_export))
    with pytest.raises(ExportMismatch, match="the GPT was trained on the stage-1 model with sha256"):
        load_tokenizer(cfg, CPU)
    with pytest.warns(UserWarning, match="allowed by --allow-stage1-mismatch"):
        load_tokenizer(cfg, CPU, allow_stage1_mismatch=True)


def test_sample_and_evaluate_take_the_override_flag():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import evaluate

        args = evaluate.parse_args(["--mode", "stage2", "--gpt", "g", "--out", "o", "--allow-stage1-mismatch"])
        assert args.allow_stage1_mismatch is True
    finally:
        sys.path.remove(str(ROOT / "recipes"))
    assert "--allow-stage1-mismatch" in (ROOT / "recipes" / "sample.py").read_text()


def test_stage2_resume_refuses_a_changed_stage1(stage1_export, tmp_path):
    from svq_fast.models.svq import SVQModel
    from svq_fast.train.run_dir import record_stage1_identity

    cfg = Stage2Config(stage1=str(stage1_export))
    record_stage1_identity(cfg, str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({"type": "Stage2Config", "config": {"stage1_sha256": cfg.stage1_sha256}})
    )
    s1 = tiny_stage1()
    torch.manual_seed(2)
    export_model(SVQModel(s1.model, s1.quantizer).state_dict(), s1, str(stage1_export))
    again = Stage2Config(stage1=str(stage1_export))
    again.run.resume = "auto"
    with pytest.raises(RunDirError, match="changed since this GPT run started"):
        record_stage1_identity(again, str(tmp_path))


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, arg, key",
    [
        (Stage1Config, "--model.norm_groups=0", "model.norm_groups"),
        (Stage1Config, "--log.every=0", "log.every"),
        (Stage1Config, "--optim.max_steps=0", "optim.max_steps"),
        (Stage1Config, "--model.image_size=0", "model.image_size"),
        (Stage1Config, "--model.ch_mult=", "model.ch_mult"),
        (Stage1Config, "--quantizer.image_codebook_size=0", "quantizer.image_codebook_size"),
        (Stage1Config, "--quantizer.semantic_codebook_size=-1", "quantizer.semantic_codebook_size"),
        (Stage1Config, "--model.num_classes=0", "model.num_classes"),
        (Stage1Config, "--optim.lr=nan", "optim.lr"),
        (Stage1Config, "--loss.semantic_weight=inf", "loss.semantic_weight"),
        (Stage1Config, "--optim.betas=0.9,nan", "optim.betas"),
        (Stage1Config, "--optim.micro_batch=0", "optim.micro_batch"),
        (Stage1Config, "--model.dropout=1.5", "model.dropout"),
        (Stage2Config, "--model.n_head=0", "model.n_head"),
        (Stage2Config, "--model.image_vocab=0", "model.image_vocab"),
        (Stage2Config, "--sample.temperature=0", "sample.temperature"),
    ],
)
def test_bad_values_name_their_key(cls, arg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(cls(), [arg])


def test_cli_exits_2_naming_the_key(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--log.every=0"], "svqgan_tiny", Stage1Config)
    assert e.value.code == 2 and "log.every" in capsys.readouterr().err
