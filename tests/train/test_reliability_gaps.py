"""Issue 32's gaps, in-process (the fake engine and stage of test_reliability.py): another run's checkpoints are
never overwritten whatever run.json says, old RNG files resume, a truncated manifest and a refused NaN save say
what to do, exports are swapped in whole and their config.json parsed as strictly as the command line, and the
run-directory lock is never seen half-written. Each test fails on the code before the issue."""

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from svq_fast import dist, export
from svq_fast.export import ExportMismatch, export_model, load_segmenter, load_stage1
from svq_fast.train import checkpoint as ckpt
from svq_fast.train import loop, run_dir
from svq_fast.train.run_dir import LOCK, RunDirError, acquire_lock, release_lock

sys.path.insert(0, str(Path(__file__).parent))  # the fake engine, stage and helpers of test_reliability.py
from test_reliability import CPU, FakeEngine, FakeStage, make_cfg, stage1_export, tags, tiny_stage1, train  # noqa: E402

__all__ = ["stage1_export"]  # a fixture: imported for the export tests below


def _snapshot(out):
    """(inode, mtime, size) of every file under <out>/checkpoints: any rewrite or deletion changes it."""
    root = out / "checkpoints"
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}  # fmt: skip


# -- 1. another run's checkpoints --------------------------------------------------------------------------


def test_resume_auto_under_a_run_json_of_another_run_is_refused_and_overwrites_nothing(tmp_path):
    a, _ = train(tmp_path, keep_last=0)  # run A: complete checkpoints at steps 1..4
    before = _snapshot(tmp_path)
    blob = json.loads((tmp_path / "run.json").read_text())
    (tmp_path / "run.json").write_text(json.dumps({**blob, "run_id": "20261207-000000-0ther1d0"}))
    with pytest.raises(RunDirError) as refused:  # the probe: resume=auto, more steps, save every step
        train(tmp_path, resume="auto", max_steps=6, keep_last=0)
    msg = str(refused.value)
    assert refused.value.code == 2
    assert "20261207-000000-0ther1d0" in msg and a["run_id"] in msg and "run.json" in msg  # both run ids
    assert "--run.out_dir" in msg and "--run.overwrite=true" in msg
    assert _snapshot(tmp_path) == before and not (tmp_path / LOCK).exists()


def test_a_save_never_replaces_a_complete_checkpoint_of_another_run(tmp_path):
    """Whatever run.json says (prepare_run bypassed): the save itself refuses, and pruning leaves it alone."""
    train(tmp_path, keep_last=0)
    before = _snapshot(tmp_path)
    (tmp_path / "run.json").unlink()
    cfg = make_cfg(tmp_path, keep_last=1)  # resume '' and no check_start: a fresh run id saving over steps 1..4
    with pytest.raises(ckpt.CheckpointError, match=r"would replace .*step00000001, a complete checkpoint of another"):
        loop.run(cfg, FakeStage(FakeEngine()), rank=0, world=1, dev=CPU, run_dir=str(tmp_path))
    assert _snapshot(tmp_path) == before
    # a run whose own tags sit beside the other run's: pruning (keep_last=1) removes its own only
    for step in (5, 6, 7):
        ckpt.save_checkpoint(str(tmp_path), step, {"gpt": FakeEngine()}, {}, keep_last=1, run_id="mine")
    assert tags(tmp_path) == [f"step0000000{s}" for s in (1, 2, 3, 4, 7)]


def test_resuming_another_runs_checkpoint_into_a_directory_of_checkpoints_is_refused(tmp_path):
    other = tmp_path / "other"
    b, _ = train(other, max_steps=2)
    train(tmp_path / "a", max_steps=2)
    with pytest.raises(RunDirError, match=f"is a checkpoint of run {b['run_id']}, but .* holds checkpoints of"):
        train(tmp_path / "a", resume=str(other / "checkpoints" / "step00000002"), max_steps=4)


# -- 2. RNG files of the versions before the JSON state -----------------------------------------------------


def test_a_genuine_old_rng_file_resumes_with_its_exact_draws(tmp_path):
    tag = tmp_path / "checkpoints" / "step00000001"
    FakeEngine().save_checkpoint(str(tag), "gpt", {"step": 1})
    (tag / "COMPLETE").write_text(json.dumps({"step": 1, "engines": ["gpt"]}))  # an older version's marker
    random.seed(5), np.random.seed(5), torch.manual_seed(5)  # noqa: NPY002
    old = {  # what checkpoint.rng_state() returned before the JSON state, saved the way it saved it
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    torch.save(old, tag / "rng_rank0.pt")
    want = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    random.seed(9), np.random.seed(9), torch.manual_seed(9)  # noqa: NPY002
    ckpt.load_checkpoint(str(tag), {"gpt": FakeEngine()})
    got = (random.random(), np.random.rand(), torch.rand(3))  # noqa: NPY002
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


# -- 6. the smaller items -----------------------------------------------------------------------------------


def test_a_truncated_manifest_is_named_when_resume_falls_back(tmp_path, capsys):
    train(tmp_path, save_every=2)  # steps 2 and 4
    marker = tmp_path / "checkpoints" / "step00000004" / "COMPLETE"
    marker.write_text(marker.read_text()[:40])
    out, engine = train(tmp_path, resume="auto", max_steps=5, save_every=2)
    err = capsys.readouterr().err
    assert f"{marker} exists but is not a readable manifest" in err and "skips that checkpoint" in err
    assert engine.loaded_from == [str(tmp_path / "checkpoints" / "step00000002")] and out["step"] == 5


def test_a_refused_nonfinite_save_does_not_advise_resuming_unchanged(tmp_path):
    def poison(step, engine):
        if step == 2:
            with torch.no_grad():
                engine.module.weight.fill_(float("nan"))

    with pytest.raises(ckpt.CheckpointError) as e:
        train(tmp_path, on_step=poison, keep_last=0)
    msg = str(e.value)
    assert "step00000002, is the state this diverged from" in msg and "diverges again" in msg
    assert "before resuming it" in msg and "earlier ones: step00000001" in msg


def test_a_rewritten_export_is_never_absent(stage1_export, monkeypatch):
    """Resuming a finished run writes its export again: at every rename or removal the export is whole."""
    seen = []
    files = [stage1_export / "model.safetensors", stage1_export / "config.json"]

    def watch(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            seen.append((fn.__name__, all(f.is_file() for f in files)))
            return out

        return wrapped

    monkeypatch.setattr(export.shutil, "rmtree", watch(export.shutil.rmtree))
    monkeypatch.setattr(export.os, "replace", watch(export.os.replace))
    cfg = tiny_stage1()
    from svq_fast.models.svq import SVQModel

    torch.manual_seed(4)
    export_model(SVQModel(cfg.model, cfg.quantizer).state_dict(), cfg, str(stage1_export))
    monkeypatch.undo()
    assert seen and all(whole for _, whole in seen), seen
    assert not list(stage1_export.parent.glob("s1.*"))  # no temporary or replaced copy left beside it
    load_stage1(str(stage1_export))


def test_the_lock_is_never_seen_empty_by_a_second_job(tmp_path, monkeypatch):
    lock = tmp_path / LOCK
    seen = []
    real_dump = json.dump

    def dump(obj, f, *a, **k):  # while the lock's JSON is written, is a LOCK file already there for others?
        seen.append(lock.exists())
        return real_dump(obj, f, *a, **k)

    monkeypatch.setattr(run_dir.json, "dump", dump)
    acquire_lock(str(tmp_path))
    monkeypatch.undo()
    assert seen == [False] and json.loads(lock.read_text())["pid"] == os.getpid()
    release_lock(str(tmp_path))
    assert not list(tmp_path.iterdir())  # neither the lock nor its private temporary file is left


def test_a_lock_being_written_by_a_live_job_is_not_taken_for_stale(tmp_path):
    """An older version's writer creates LOCK empty and fills it a moment later: the second job waits for it."""
    lock = tmp_path / LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"pid": sleeper.pid, "host": socket.gethostname(), "start": dist.process_start(sleeper.pid)}
        lock.write_text("")
        filler = threading.Timer(0.3, lambda: lock.write_text(json.dumps(holder)))
        filler.start()
        with pytest.raises(RunDirError, match=f"locked by a running job \\(pid {sleeper.pid}"):
            acquire_lock(str(tmp_path))
        filler.join()
        assert json.loads(lock.read_text()) == holder  # left in place
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_reused_pid_is_named_as_such_not_as_gone(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(run_dir, "_LOCK_FILL_SECONDS", 0.2, raising=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # the lock's pid now runs another process: its start time differs from the holder's
        (tmp_path / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "start": "1"}))
        acquire_lock(str(tmp_path))
        out = capsys.readouterr().out
        assert f"pid {sleeper.pid} now belongs to another process" in out and "is gone" not in out
        release_lock(str(tmp_path))
        (tmp_path / LOCK).write_text("")  # empty and older than the fill window: stale, and said why
        time.sleep(0.3)
        acquire_lock(str(tmp_path))
        assert "it names no process" in capsys.readouterr().out
        release_lock(str(tmp_path))
    finally:
        sleeper.kill()
        sleeper.wait()


# -- 4. hand-edited exports ---------------------------------------------------------------------------------


def _edit(export_dir, drop=("config_sha256",), **model):
    path = export_dir / "config.json"
    blob = json.loads(path.read_text())
    blob["config"]["model"].update(model)
    path.write_text(json.dumps({k: v for k, v in blob.items() if k not in drop}))


def test_a_missing_config_sha256_warns_and_config_json_is_parsed_strictly(stage1_export):
    _edit(stage1_export, ignore_index=3)  # the probe: the hash deleted, then a setting changed
    with pytest.warns(UserWarning, match=r"records no config_sha256 .*its settings \(.*s1/config\.json\) cannot"):
        load_stage1(str(stage1_export))
    cases = [(dict(ch="16"), "model.ch"), (dict(kind="evil"), "model.kind"), (dict(ch_mult=[1, "2"]), "model.ch_mult"),
             (dict(no_such_key=1), "no_such_key"), (dict(norm_groups=0), "model.norm_groups"),
             (dict(image_size=True), "model.image_size")]  # fmt: skip
    for change, key in cases:
        _edit(stage1_export, **change)
        with pytest.warns(UserWarning), pytest.raises(ExportMismatch, match=r"s1/config\.json is not a valid config"):
            try:
                load_stage1(str(stage1_export))
            except ExportMismatch as e:
                assert key in str(e), (key, str(e))
                raise
        _edit(stage1_export, **{k: getattr(tiny_stage1().model, k, None) for k in change if k != "no_such_key"})
        if "no_such_key" in change:
            path = stage1_export / "config.json"
            blob = json.loads(path.read_text())
            del blob["config"]["model"]["no_such_key"]
            path.write_text(json.dumps(blob))


def test_deleting_weights_sha256_does_not_switch_off_the_config_check(stage1_export):
    _edit(stage1_export, drop=("weights_sha256",), ignore_index=3)
    with pytest.warns(UserWarning, match="records no weights_sha256"):
        with pytest.raises(ExportMismatch, match="config.json was edited after the export was written"):
            load_stage1(str(stage1_export))


def test_a_segmenter_config_is_parsed_strictly(tmp_path):
    from svq_fast.export import export_segmenter
    from svq_fast.models.segmenter import Segmenter, SegmenterConfig

    export_segmenter(Segmenter(SegmenterConfig(width=8, levels=1, groups=4)), str(tmp_path / "seg"))
    path = tmp_path / "seg" / "config.json"
    blob = json.loads(path.read_text())
    blob["config"]["width"] = "8"
    path.write_text(json.dumps({k: v for k, v in blob.items() if k != "config_sha256"}))
    with pytest.warns(UserWarning), pytest.raises(ExportMismatch, match=r"seg/config\.json .*width"):
        load_segmenter(str(tmp_path / "seg"))
