"""Issue 32 item 5: an evaluation says how many samples it actually scored. Held-out shards cut inside sample 8
score 7 images: metrics.json records samples_scored 7 and metrics.md warns under its title; shards of random bytes
score none: evaluate.py exits 1 naming the shards (it exited 0 with null metrics and 'first 16 samples')."""

import importlib.util
import json
import os
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from svq_fast import named_configs
from svq_fast.data.make_shards import write_synthetic
from svq_fast.export import export_model
from svq_fast.models.svq import SVQModel

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::UserWarning")]


def _evaluate():
    spec = importlib.util.spec_from_file_location("_recipe_evaluate_scored", ROOT / "recipes" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scored")
    torch.manual_seed(0)
    cfg = named_configs.svqgan_tiny()
    cfg.model.ch = 16
    export_model(SVQModel(cfg.model, cfg.quantizer).state_dict(), cfg, str(tmp / "stage1"))
    size = cfg.model.image_size
    write_synthetic(str(tmp / "val"), split="val", size=size, num_samples=16, samples_per_shard=16, progress=False)
    return tmp


def _run(assets, shards, out):
    argv = ["--mode", "stage1", "--stage1", str(assets / "stage1"), "--shards", str(shards), "--out", str(out),
            "--stats-cache", "none", "--cpu", "--batch-size", "16"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _evaluate().main(argv)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file():
            (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_a_shard_cut_inside_sample_8_scores_7_and_says_so(assets, tmp_path):
    val = _copy(assets / "val", tmp_path / "val")
    shard = next(val.glob("*.tar"))
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    eighth = [m for m in members if m.name.startswith(keys[7] + ".")][-1]
    raw = shard.read_bytes()
    shard.write_bytes(raw[: eighth.offset_data + 10])  # inside the 8th sample's last member; index.json lists 16
    assert _run(assets, val, tmp_path / "out") == 0
    res = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert res["settings"]["samples"] == 16 and res["settings"]["samples_scored"] == 7
    md = (tmp_path / "out" / "metrics.md").read_text()
    assert "**Warning: only 7 of the 16 planned samples could be read and were scored**" in md.splitlines()[2]
    assert "first 16 samples, only 7 of them readable and scored" in md


def test_shards_of_random_bytes_score_nothing_and_exit_1(assets, tmp_path, capsys):
    val = _copy(assets / "val", tmp_path / "val")
    for shard in val.glob("*.tar"):
        shard.write_bytes(os.urandom(shard.stat().st_size))  # index.json still lists 16 samples
    assert _run(assets, val, tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "error: no sample was scored" in err and str(next(val.glob("*.tar"))) in err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["samples_scored"] == 0
    (val / "index.json").unlink()  # unlisted random bytes: no sample to plan at all
    assert _run(assets, val, tmp_path / "out2") == 1
    assert "error: cannot evaluate on the 1 shard(s)" in capsys.readouterr().err


def test_a_hand_edited_export_is_one_error_line_naming_the_file_and_key(assets, tmp_path, capsys):
    export = _copy(assets / "stage1", tmp_path / "stage1")
    blob = json.loads((export / "config.json").read_text())
    blob["config"]["model"]["ch"] = "16"  # the probe, with config_sha256 deleted
    del blob["config_sha256"]
    (export / "config.json").write_text(json.dumps(blob))
    argv = ["--mode", "stage1", "--stage1", str(export), "--shards", str(assets / "val"), "--out", str(tmp_path / "o"),
            "--stats-cache", "none", "--cpu"]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert _evaluate().main(argv) == 1
    err = capsys.readouterr().err
    assert f"error: {export / 'config.json'} is not a valid config: model.ch" in err
