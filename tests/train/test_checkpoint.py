import os

import pytest
import torch

from svq_fast.config import GPTConfig, Stage2Config
from svq_fast.export import ExportMismatch, export_model, load_gpt, load_stage1
from svq_fast.models.gpt import SemanticGPT
from svq_fast.train.checkpoint import COMPLETE, complete_checkpoints, resolve_resume


def small_cfg():
    return Stage2Config(model=GPTConfig(image_vocab=20, semantic_vocab=8, grid=2, n_layer=1, n_head=2, n_embd=16))


def test_export_roundtrip(tmp_path):
    cfg = small_cfg()
    m = SemanticGPT(cfg.model)
    export_model(m.state_dict(), cfg, str(tmp_path / "export"))
    loaded, cfg2 = load_gpt(str(tmp_path / "export"))
    assert cfg2 == cfg
    for k, v in m.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_export_mismatch_names_tensor(tmp_path):
    cfg = small_cfg()
    sd = SemanticGPT(cfg.model).state_dict()
    sd["head.weight"] = torch.zeros(21, 16)
    del sd["ln_f.weight"]
    export_model(sd, cfg, str(tmp_path / "e"))
    with pytest.raises(ExportMismatch, match=r"head\.weight: shape \(21, 16\).*|missing.*ln_f\.weight"):
        load_gpt(str(tmp_path / "e"))


def test_missing_export_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_stage1(str(tmp_path / "nothing"))


def test_wrong_stage_export_is_refused(tmp_path):
    cfg = small_cfg()
    export_model(SemanticGPT(cfg.model).state_dict(), cfg, str(tmp_path / "e"))
    with pytest.raises(ValueError, match="stage-1"):
        load_stage1(str(tmp_path / "e"))


def test_resume_auto_ignores_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in [(10, True), (20, True), (30, False)]:
        d = root / f"step{step:08d}"
        os.makedirs(d)
        if complete:
            (d / COMPLETE).write_text("{}")
    assert [os.path.basename(p) for p in complete_checkpoints(str(tmp_path))] == ["step00000010", "step00000020"]
    assert resolve_resume(str(tmp_path), "auto").endswith("step00000020")
    assert resolve_resume(str(tmp_path), "") is None
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        resolve_resume(str(tmp_path), str(root / "step00000030"))
