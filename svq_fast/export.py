"""Exports: a trained model as <dir>/model.safetensors + <dir>/config.json (no pickle), written and read here only.

Both training stages and the evaluation segmenter write through `write_export`; `load_stage1`, `load_gpt`,
`load_tokenizer` and `load_segmenter` build frozen models from them for tokenization, sampling and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from svq_fast.config import Stage1Config, Stage2Config, from_json, to_json
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.segmenter import Segmenter, SegmenterConfig
from svq_fast.models.svq import SVQModel
from svq_fast.models.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SEGMENTER_TYPE = "SegmenterConfig"  # config.json of a segmenter: {"type": ..., "config": ..., "meta": ...}


class ExportMismatch(ValueError):
    pass


def write_export(tensors: dict[str, torch.Tensor], config_json: str, out_dir: str) -> str:
    """Write the weights and the config text into out_dir atomically: into out_dir.tmp, then one rename, so a
    reader never sees half an export."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(tmp, CONFIG), "w") as f:
        f.write(config_json)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def export_model(state_dict: dict[str, torch.Tensor], cfg, out_dir: str) -> str:
    """A training run's export: its weights and its whole typed config (Stage1Config / Stage2Config)."""
    return write_export(state_dict, to_json(cfg), out_dir)


def read_files(export_dir: str, missing_hint: str) -> tuple[str, dict[str, torch.Tensor]]:
    """-> (config.json text, tensors); a missing file is named together with `missing_hint` (how to make it)."""
    from safetensors.torch import load_file

    weights, config = os.path.join(export_dir, WEIGHTS), os.path.join(export_dir, CONFIG)
    for path in (weights, config):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {missing_hint}")
    with open(config) as f:
        text = f.read()
    return text, load_file(weights)


def read_export(export_dir: str):
    """-> (typed config object, tensors) of a training run's export."""
    text, tensors = read_files(
        export_dir, "export a trained model first (training writes <run_dir>/export/ at the end)"
    )
    return from_json(text), tensors


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors into module, validating names, shapes and dtypes; the error lists every mismatch."""
    own = module.state_dict()
    problems = []
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        problems.append(f"missing {len(missing)}: {missing[:6]}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {unexpected[:6]}")
    for k in sorted(set(own) & set(tensors)):
        if own[k].shape != tensors[k].shape:
            problems.append(f"{k}: shape {tuple(tensors[k].shape)} in file, model expects {tuple(own[k].shape)}")
        elif tensors[k].dtype.is_floating_point != own[k].dtype.is_floating_point:
            problems.append(f"{k}: dtype {tensors[k].dtype} in file, model expects {own[k].dtype}")
    if problems:
        raise ExportMismatch(f"{source} does not match the model: " + "; ".join(problems))
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def load_stage1(export_dir: str, device: torch.device | str = "cpu") -> tuple[SVQModel, Stage1Config]:
    """-> (frozen stage-1 model in eval mode, its config)."""
    cfg, tensors = read_export(export_dir)
    if not isinstance(cfg, Stage1Config):
        raise ValueError(f"{export_dir} holds a {type(cfg).__name__} export, expected a stage-1 model")
    model = SVQModel(cfg.model, cfg.quantizer)
    load_state_strict(model, tensors, os.path.join(export_dir, WEIGHTS))
    return model.to(device).eval().requires_grad_(False), cfg


def load_gpt(export_dir: str, device: torch.device | str = "cpu") -> tuple[SemanticGPT, Stage2Config]:
    """-> (frozen stage-2 GPT in eval mode, its config)."""
    cfg, tensors = read_export(export_dir)
    if not isinstance(cfg, Stage2Config):
        raise ValueError(f"{export_dir} holds a {type(cfg).__name__} export, expected a stage-2 GPT")
    model = SemanticGPT(cfg.model)
    load_state_strict(model, tensors, os.path.join(export_dir, WEIGHTS))
    return model.to(device).eval().requires_grad_(False), cfg


def load_tokenizer(cfg: Stage2Config, dev) -> Tokenizer:
    """The frozen stage-1 model(s) a stage-2 config names, checked against the GPT's vocabularies and grid."""
    image_model, s1 = load_stage1(cfg.stage1, dev)
    semantic_model = load_stage1(cfg.stage1_semantic, dev)[0] if cfg.stage1_semantic else None
    tok = Tokenizer(image_model, semantic_model)
    g = cfg.model
    if (g.image_vocab, g.semantic_vocab) != (tok.image_vocab, tok.semantic_vocab):
        raise ValueError(
            f"GPT vocabularies (image {g.image_vocab}, semantic {g.semantic_vocab}) differ from the "
            f"stage-1 codebooks (image {tok.image_vocab}, semantic {tok.semantic_vocab}); "
            "set --model.image_vocab / --model.semantic_vocab"
        )
    latent = s1.model.image_size // s1.model.downsampling
    if latent != g.grid:
        raise ValueError(f"stage-1 latents are {latent}x{latent} but model.grid={g.grid}")
    if cfg.data.image_size != s1.model.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but the stage-1 model expects {s1.model.image_size}")
    return tok


def export_segmenter(model: Segmenter, out_dir: str, meta: dict | None = None) -> str:
    """The evaluation segmenter with its config and `meta` (e.g. its own held-out mIoU)."""
    blob = {"type": SEGMENTER_TYPE, "config": dataclasses.asdict(model.cfg), "meta": meta or {}}
    return write_export(model.state_dict(), json.dumps(blob, indent=1), out_dir)


def load_segmenter(path: str, device: torch.device | str = "cpu") -> tuple[Segmenter, dict]:
    """-> (frozen segmenter in eval mode, meta). `path` is the directory export_segmenter wrote."""
    hint = (
        f"train one with `python recipes/train_segmenter.py --out {path}` (a few CPU minutes on the synthetic "
        "scenes) and pass that directory"
    )
    text, tensors = read_files(path, hint)
    config = os.path.join(path, CONFIG)
    blob = json.loads(text)
    if blob.get("type") != SEGMENTER_TYPE:
        raise ValueError(f"{config} holds a {blob.get('type')!r} config, expected {SEGMENTER_TYPE}")
    known = {f.name for f in dataclasses.fields(SegmenterConfig)}
    unknown = sorted(set(blob["config"]) - known)
    if unknown:
        raise ValueError(f"{config}: unknown segmenter config keys {unknown}")
    model = Segmenter(SegmenterConfig(**blob["config"]))
    load_state_strict(model, tensors, os.path.join(path, WEIGHTS))
    return model.to(device).eval().requires_grad_(False), blob.get("meta", {})
