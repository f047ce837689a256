"""Build models from safetensors exports (no pickle): the frozen stage-1 model and the stage-2 GPT."""

from __future__ import annotations

import torch

from svq_fast.config import Stage1Config, Stage2Config
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.svq import SVQModel
from svq_fast.train.checkpoint import load_state_strict, read_export


def load_stage1(export_dir: str, device: torch.device | str = "cpu") -> tuple[SVQModel, Stage1Config]:
    cfg, tensors = read_export(export_dir)
    if not isinstance(cfg, Stage1Config):
        raise ValueError(f"{export_dir} holds a {type(cfg).__name__} export, expected a stage-1 model")
    model = SVQModel(cfg.model, cfg.quantizer)
    load_state_strict(model, tensors, f"{export_dir}/model.safetensors")
    return model.to(device).eval().requires_grad_(False), cfg


def load_gpt(export_dir: str, device: torch.device | str = "cpu") -> tuple[SemanticGPT, Stage2Config]:
    cfg, tensors = read_export(export_dir)
    if not isinstance(cfg, Stage2Config):
        raise ValueError(f"{export_dir} holds a {type(cfg).__name__} export, expected a stage-2 GPT")
    model = SemanticGPT(cfg.model)
    load_state_strict(model, tensors, f"{export_dir}/model.safetensors")
    return model.to(device).eval().requires_grad_(False), cfg
