"""Exports: a trained model as <dir>/model.safetensors + <dir>/config.json (no pickle), written and read here only.

Both training stages and the evaluation segmenter write through `write_export`; `load_stage1`, `load_gpt`,
`load_tokenizer` and `load_segmenter` build frozen models from them for tokenization, sampling and evaluation.

Identity: config.json records `weights_sha256`, the sha256 of model.safetensors, checked on every load (an export
without it, from an older version, loads with a warning). A GPT's config records the hashes of its stage-1
exports (`stage1_sha256`, `stage1_semantic_sha256`, filled when its training starts); `load_tokenizer` refuses a
stage-1 export with other weights unless asked to allow it. Loading warns about NaN / inf tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import warnings

import torch

from svq_fast.config import ConfigError, Stage1Config, Stage2Config, set_value, to_json, validate
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.segmenter import Segmenter, SegmenterConfig
from svq_fast.models.svq import SVQModel
from svq_fast.models.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SEGMENTER_TYPE = "SegmenterConfig"  # config.json of a segmenter: {"type": ..., "config": ..., "meta": ...}


class ExportMismatch(ValueError):
    pass


_hashes: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256: each file is hashed once per process


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        _hashes[key] = h.hexdigest()
    return _hashes[key]


def weights_sha256(export_dir: str) -> str:
    """sha256 of an export's model.safetensors (FileNotFoundError naming the path when there is none)."""
    path = os.path.join(export_dir, WEIGHTS)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: export a trained model first (training writes <run_dir>/export/)")
    return file_sha256(path)


_IDENTITY_KEYS = ("weights_sha256", "config_sha256")


def config_digest(blob: dict) -> str:
    """sha256 of a config.json's contents apart from the identity keys (canonical JSON: sorted keys)."""
    rest = {k: v for k, v in blob.items() if k not in _IDENTITY_KEYS}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_export(tensors: dict[str, torch.Tensor], config_json: str, out_dir: str) -> str:
    """Write the weights and the config text (with the sha256 of the weights and of the config added) into
    out_dir atomically: into out_dir.tmp, then one rename, so a reader never sees half an export."""
    from safetensors.torch import save_file

    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, os.path.join(tmp, WEIGHTS), metadata={"format": "pt"})
    blob = json.loads(config_json)
    blob["weights_sha256"] = file_sha256(os.path.join(tmp, WEIGHTS))
    blob["config_sha256"] = config_digest(blob)
    with open(os.path.join(tmp, CONFIG), "w") as f:
        json.dump(blob, f, indent=2)
    _swap_into_place(tmp, out_dir)
    return out_dir


def _swap_into_place(tmp: str, out_dir: str) -> None:
    """Put the finished directory `tmp` at `out_dir`. An export already there is exchanged with it in one
    renameat2(RENAME_EXCHANGE) (Linux), so a reader always finds a whole export, the old one or the new one; where
    that call is missing, the old one is renamed aside first (a moment without an export), then removed."""
    if not os.path.isdir(out_dir):
        os.replace(tmp, out_dir)
        return
    if _exchange(tmp, out_dir):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous export
        return
    aside = f"{out_dir.rstrip('/')}.replaced-{os.getpid()}"
    os.replace(out_dir, aside)
    os.replace(tmp, out_dir)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2 RENAME_EXCHANGE) -> False where unsupported."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


def export_model(state_dict: dict[str, torch.Tensor], cfg, out_dir: str) -> str:
    """A training run's export: its weights and its whole typed config (Stage1Config / Stage2Config). A GPT config
    whose stage-1 hashes are not recorded yet gets those of the stage-1 exports it names (when present)."""
    if isinstance(cfg, Stage2Config):
        cfg = dataclasses.replace(cfg)
        for path_key, hash_key in (("stage1", "stage1_sha256"), ("stage1_semantic", "stage1_semantic_sha256")):
            path = getattr(cfg, path_key)
            if path and not getattr(cfg, hash_key) and os.path.isfile(os.path.join(path, WEIGHTS)):
                setattr(cfg, hash_key, weights_sha256(path))
    return write_export(state_dict, to_json(cfg), out_dir)


def read_files(export_dir: str, missing_hint: str) -> tuple[str, dict[str, torch.Tensor]]:
    """-> (config.json text, tensors), with the weights checked against the sha256 config.json records; a
    missing file is named together with `missing_hint` (how to make it), a broken one by its path."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config = os.path.join(export_dir, WEIGHTS), os.path.join(export_dir, CONFIG)
    for path in (weights, config):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: {missing_hint}")
    with open(config) as f:
        text = f.read()
    try:
        blob = json.loads(text)
    except ValueError as e:
        raise ExportMismatch(f"{config} is not valid JSON ({e}): the export is damaged; export the model again") from e
    if not isinstance(blob, dict):
        raise ExportMismatch(f"{config} holds a JSON {type(blob).__name__}, expected an object")
    missing = [k for k in _IDENTITY_KEYS if blob.get(k) is None]
    if missing:  # each hash is checked on its own: deleting one must not switch the other off
        unchecked = {"weights_sha256": weights, "config_sha256": f"its settings ({config})"}
        warnings.warn(
            f"{config} records no {' and no '.join(missing)} (an export of an older version, or one edited by "
            f"hand): {' and '.join(unchecked[k] for k in missing)} cannot be checked",
            stacklevel=3,
        )
    recorded = blob.get("weights_sha256")
    if recorded is not None and file_sha256(weights) != recorded:
        raise ExportMismatch(
            f"{weights} does not match the sha256 recorded in {config} (damaged, or replaced without its config)"
        )
    if blob.get("config_sha256") not in (None, config_digest(blob)):
        raise ExportMismatch(
            f"{config} was edited after the export was written (its contents no longer match config_sha256): "
            "a changed setting such as ignore_index would silently change every result; export the model again"
        )
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportMismatch(f"{weights} is not a readable safetensors file: {e}") from e
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        warnings.warn(f"{weights}: {len(bad)} tensors hold NaN or inf: {bad[:6]}", stacklevel=3)
    return text, tensors


def read_export(export_dir: str):
    """-> (typed config object, tensors) of a training run's export; its config.json goes through the CLI's strict
    typed parser (see typed_config)."""
    text, tensors = read_files(
        export_dir, "export a trained model first (training writes <run_dir>/export/ at the end)"
    )
    return typed_config(json.loads(text), os.path.join(export_dir, CONFIG)), tensors


_CONFIG_TYPES = {"Stage1Config": Stage1Config, "Stage2Config": Stage2Config}


def typed_config(blob: dict, where: str):
    """A training config from a config.json's contents, through the same strict parser as the command line
    (config.set_value + config.validate): every leaf is applied as if it were `--section.field=value`, so an
    unknown key, a value of the wrong type (a string "16" for an int, an int for a string) and a Literal outside
    its choices (`"kind": "evil"`) raise ExportMismatch naming `where` and the key. Keys the file leaves out keep
    their defaults, as for older exports."""
    cls = _CONFIG_TYPES.get(blob.get("type"))
    if cls is None:
        raise ExportMismatch(f"{where}: config type {blob.get('type')!r} is not one of {sorted(_CONFIG_TYPES)}")
    if not isinstance(blob.get("config"), dict):
        raise ExportMismatch(f"{where}: 'config' must be a JSON object of config sections")
    cfg = _apply_json(cls(), blob["config"], where)
    try:
        validate(cfg)  # the ranges and cross-field checks the command line applies
    except ConfigError as e:
        raise ExportMismatch(f"{where} is not a valid config: {e}") from e
    return cfg


def _apply_json(cfg, section: dict, where: str):
    """Set every leaf of `section` (nested JSON objects = config sections) on the dataclass `cfg`, strictly."""
    try:
        for key, value in _leaves(section):
            text = _override_text(value)
            if text is None:
                raise ConfigError(f"{key}: {json.dumps(value)} is not a value a config field takes")
            set_value(cfg, key, text)
            parsed = getattr(_parent(cfg, key), key.rsplit(".", 1)[-1])
            if not _same_json(parsed, value):  # parsed from text, but the file held another JSON type
                want = json.dumps(list(parsed) if isinstance(parsed, tuple) else parsed)
                raise ConfigError(f"{key}: {json.dumps(value)} is the wrong JSON type for this field (write {want})")
    except ConfigError as e:
        raise ExportMismatch(f"{where} is not a valid config: {e}") from e
    return cfg


def _leaves(section: dict, prefix: str = ""):
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _parent(cfg, dotted: str):
    for name in dotted.split(".")[:-1]:
        cfg = getattr(cfg, name)
    return cfg


def _override_text(value) -> str | None:
    """A JSON value as the command line spells it (None for one it cannot: nested lists, objects in lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (int, float, str)):
        return str(value)  # str(float) is its shortest round-tripping repr
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    return None


def _same_json(parsed, value) -> bool:
    """Whether the parsed field is the JSON value itself (int 1 for a float field is; "16" for an int is not)."""
    if isinstance(parsed, tuple):
        return isinstance(value, list) and len(parsed) == len(value) and all(map(_same_json, parsed, value))
    if isinstance(parsed, bool) or isinstance(value, bool):
        return type(parsed) is type(value) and parsed == value
    if isinstance(parsed, float) and isinstance(value, (int, float)):
        return parsed == value or (math.isnan(parsed) and math.isnan(value))
    return type(parsed) is type(value) and parsed == value


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


def check_stage1_identity(cfg: Stage2Config, *, allow_mismatch: bool = False) -> None:
    """The stage-1 exports a GPT config names must be the ones it was trained on (their recorded sha256);
    ExportMismatch otherwise, or a warning with allow_mismatch. A config without hashes (older) warns."""
    for path_key, hash_key in (("stage1", "stage1_sha256"), ("stage1_semantic", "stage1_semantic_sha256")):
        path, recorded = getattr(cfg, path_key), getattr(cfg, hash_key)
        if not path:
            continue
        if not recorded:
            warnings.warn(f"the GPT config records no {hash_key} (older export): {path} is unchecked", stacklevel=3)
            continue
        now = weights_sha256(path)
        if now != recorded:
            msg = (
                f"{os.path.join(path, WEIGHTS)} has sha256 {now[:16]}..., but the GPT was trained on the stage-1 model "
                f"with sha256 {recorded[:16]}... (was stage 1 trained further or replaced in place?): its tokens "
                "would not be the ones the GPT learned"
            )
            if not allow_mismatch:
                raise ExportMismatch(msg + "; pass --allow-stage1-mismatch to use it anyway")
            warnings.warn(msg + " (allowed by --allow-stage1-mismatch)", stacklevel=3)


def load_tokenizer(cfg: Stage2Config, dev, *, allow_stage1_mismatch: bool = False) -> Tokenizer:
    """The frozen stage-1 model(s) a stage-2 config names, checked to be the ones it was trained on (see
    check_stage1_identity) and against the GPT's vocabularies and grid."""
    check_stage1_identity(cfg, allow_mismatch=allow_stage1_mismatch)
    image_model, s1 = load_stage1(cfg.stage1, dev)
    semantic_model = load_stage1(cfg.stage1_semantic, dev)[0] if cfg.stage1_semantic else None
    tok = Tokenizer(image_model, semantic_model, condition=cfg.condition)
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
    blob = json.loads(text)  # valid JSON: read_files checked it
    if blob.get("type") != SEGMENTER_TYPE:
        raise ValueError(f"{config} holds a {blob.get('type')!r} config, expected {SEGMENTER_TYPE}")
    if not isinstance(blob.get("config"), dict):
        raise ExportMismatch(f"{config}: 'config' must be a JSON object")
    seg_cfg = _apply_json(SegmenterConfig(), blob["config"], config)  # strict, as a training config
    try:
        seg_cfg = SegmenterConfig(**dataclasses.asdict(seg_cfg))  # its own cross-field checks
    except ValueError as e:
        raise ExportMismatch(f"{config} is not a valid config: {e}") from e
    model = Segmenter(seg_cfg)
    load_state_strict(model, tensors, os.path.join(path, WEIGHTS))
    return model.to(device).eval().requires_grad_(False), blob.get("meta", {})
