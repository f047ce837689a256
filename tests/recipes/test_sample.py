"""recipes/sample.py over tiny untrained exports (a 32x32 sVQ model, 8x8 latents, a one-layer GPT), run in-process
so that the samples can be compared with the library's sampling path: the condition flag, and maps from files (any
size, every bad input, a .txt list, the label-space checks, an ADE20k annotation)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from svq_fast.config import DataConfig, GPTConfig, QuantizerConfig, Stage1Config, Stage2Config, SVQModelConfig
from svq_fast.data import labels
from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.make_shards import write_synthetic
from svq_fast.eval.sampling import sample_images
from svq_fast.eval.visualize import to_unit
from svq_fast.export import export_model, load_gpt, load_tokenizer
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.svq import SVQModel

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32


def load_recipe():
    spec = importlib.util.spec_from_file_location("_recipe_sample", ROOT / "recipes" / "sample.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_exports(tmp, num_classes=16):
    """Untrained stage-1 (image_dropout > 0, so encode_semantic uses a learned fill) and stage-2 exports + shards."""
    torch.manual_seed(0)
    s1 = Stage1Config(
        model=SVQModelConfig(
            image_size=SIZE,
            num_classes=num_classes,
            ch=8,
            ch_mult=(1, 2, 2),
            num_res_blocks=0,
            attn_resolutions=(),
            norm_groups=4,
            z_channels=8,
            semantic_z_channels=4,
            image_dropout=0.5,
            image_decoder_semantic="spade",
            spade_hidden=8,
        ),
        quantizer=QuantizerConfig(image_codebook_size=64, semantic_codebook_size=32),
    )
    s1.data.image_size = SIZE
    model = SVQModel(s1.model, s1.quantizer)
    with torch.no_grad():
        model.image_fill.fill_(0.3)
    stage1 = str(tmp / "stage1")
    export_model(model.state_dict(), s1, stage1)
    shards = str(tmp / "val")
    write_synthetic(shards, split="val", size=SIZE, num_samples=4, samples_per_shard=4, processes=1, progress=False)
    s2 = Stage2Config(
        model=GPTConfig(
            image_vocab=64, semantic_vocab=32, grid=SIZE // 4, n_layer=1, n_head=2, n_embd=32, aligned_condition=True
        ),
        stage1=stage1,
        data=DataConfig(image_size=SIZE, val_shards=shards),
    )
    gpt = str(tmp / "gpt")
    export_model(SemanticGPT(s2.model).state_dict(), s2, gpt)
    return {"tmp": tmp, "stage1": stage1, "gpt": gpt, "shards": shards}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return make_exports(tmp_path_factory.mktemp("sample_exports"))


def _first_maps(shards, n):
    loader = make_loader(
        list_shards(shards), batch_size=n, image_size=SIZE, resampled=False, flip=False, shuffle_buffer=1
    )
    return next(iter(loader))


@pytest.mark.parametrize("condition", ["map", "reference"])
def test_condition_flag_picks_where_z_s_comes_from(exports, tmp_path, condition):
    out = tmp_path / condition
    args = ["--gpt", exports["gpt"], "--out", str(out), "--shards", exports["shards"], "--num-maps", "2"]
    args += ["--samples-per-map", "1", "--seed", "3", "--condition", condition]
    assert load_recipe().main(args) == 0
    gpt, cfg = load_gpt(exports["gpt"], "cpu")
    tok = load_tokenizer(cfg, "cpu")
    batch = _first_maps(exports["shards"], 2)
    x, s = batch["image"], batch["label"]
    by_map = tok.image_model.encode_semantic(s).flatten(1)
    by_reference = tok(x, s)[0]
    assert not torch.equal(by_map, by_reference)  # the two conditions differ on these maps, so the test can tell
    sem = by_map if condition == "map" else by_reference
    want = sample_images(
        gpt,
        tok,
        sem,
        temperature=cfg.sample.temperature,
        top_k=cfg.sample.top_k,
        top_p=cfg.sample.top_p,
        guidance_scale=cfg.sample.guidance_scale,
        generator=torch.Generator().manual_seed(3),
    )
    for i, key in enumerate(batch["key"]):
        got = np.asarray(Image.open(out / f"{key}_sample0.png"))
        ref = (to_unit(want[i]) * 255).round().byte().permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1


def test_default_condition_is_the_gpts_own(exports, tmp_path):
    """Issue 29: a GPT trained on map-only z_s (config condition "map") samples map-only unless told otherwise."""
    from svq_fast.export import read_export

    cfg, tensors = read_export(exports["gpt"])
    cfg.condition = "map"
    export_model(tensors, cfg, str(tmp_path / "gpt_map"))
    common = ["--out", None, "--shards", exports["shards"], "--num-maps", "2", "--samples-per-map", "1", "--seed", "3"]
    for name, extra in (
        ("default", ["--gpt", str(tmp_path / "gpt_map")]),
        ("map", ["--gpt", exports["gpt"], "--condition", "map"]),
        ("reference", ["--gpt", str(tmp_path / "gpt_map"), "--condition", "reference"]),
    ):
        args = list(common)
        args[1] = str(tmp_path / name)
        assert load_recipe().main(args + extra) == 0
    assert json.loads((tmp_path / "default" / "settings.json").read_text())["condition"] == "map"
    batch = _first_maps(exports["shards"], 2)
    for key in batch["key"]:
        default, by_map, by_ref = (np.asarray(Image.open(tmp_path / n / f"{key}_sample0.png"))
                                   for n in ("default", "map", "reference"))  # fmt: skip
        assert np.array_equal(default, by_map) and not np.array_equal(default, by_ref)


def _save(path, array):
    Image.fromarray(array).save(path)
    return str(path)


def _synthetic_label(h, w, seed):
    return np.random.default_rng(seed).integers(0, 16, (h, w)).astype(np.uint8)


def test_maps_from_files_any_size_and_every_bad_input(exports, tmp_path):
    """A folder of good maps (the training size, 2x2 windows, 1x2 windows) and bad ones: the good ones are sampled
    (a larger map's sample is what the library's sliding window gives), each bad one is named with its reason in
    failed.json, and the exit status says some failed."""
    maps = tmp_path / "maps"
    maps.mkdir()
    good = {"a_square": (32, 32), "b_big": (64, 64), "c_wide": (32, 64)}
    for i, (name, hw) in enumerate(good.items()):
        _save(maps / f"{name}.png", _synthetic_label(*hw, seed=i))
    unknown = _synthetic_label(32, 32, 9)
    unknown[3, 3] = 77
    bad = {
        "d_unknown": (_save(maps / "d_unknown.png", unknown), "ids outside this model's label space: 77"),
        "e_mode": (_save(maps / "e_mode.png", np.zeros((32, 32, 2), np.uint8)), "PNG mode LA"),
        "f_empty": (str(maps / "f_empty.png"), "is empty"),
        "g_odd": (_save(maps / "g_odd.png", _synthetic_label(34, 32, 1)), "multiples of the model's downsampling"),
        "h_small": (_save(maps / "h_small.png", _synthetic_label(16, 32, 1)), "at least 32x32"),
        "i_ignore": (_save(maps / "i_ignore.png", np.full((32, 32), 255, np.uint8)), "empty label map"),
        "j_broken": (str(maps / "j_broken.png"), "not a readable PNG"),
    }
    (maps / "f_empty.png").write_bytes(b"")
    (maps / "j_broken.png").write_bytes((maps / "a_square.png").read_bytes()[:50])
    out = tmp_path / "out"
    args = ["--gpt", exports["gpt"], "--out", str(out), "--maps", str(maps), "--samples-per-map", "2"]
    assert load_recipe().main(args + ["--seed", "5", "--batch-size", "1"]) == 1
    failed = json.loads((out / "failed.json").read_text())
    assert sorted(failed) == sorted(p for p, _ in bad.values())
    for path, reason in bad.values():
        assert reason in failed[path] and path in failed[path]
    for name, (h, w) in good.items():
        folder = out / name
        for f in ("sample0.png", "sample1.png", "map.png", "understood.png"):
            assert Image.open(folder / f).size == (w, h)
        settings = json.loads((folder / "settings.json").read_text())
        assert settings["latent_grid"] == [h // 4, w // 4] and settings["sliding_window"] == ((h, w) != (32, 32))
    assert (out / "grid_64x64.png").exists() and (out / "grid_32x64.png").exists()

    # the 64x64 map (batch 1 of the size-ordered batches: sizes in file order) against the library's path
    gpt, cfg = load_gpt(exports["gpt"], "cpu")
    tok = load_tokenizer(cfg, "cpu")
    s = torch.from_numpy(_synthetic_label(64, 64, seed=1).astype(np.int64))[None]
    sem = tok.image_model.encode_semantic(s).flatten(1)
    settings = json.loads((out / "b_big" / "settings.json").read_text())
    want = sample_images(
        gpt,
        tok,
        sem,
        samples_per_map=2,
        temperature=cfg.sample.temperature,
        top_k=cfg.sample.top_k,
        top_p=cfg.sample.top_p,
        guidance_scale=cfg.sample.guidance_scale,
        generator=torch.Generator().manual_seed(5 + settings["batch"]),
        latent_shape=(16, 16),
    )
    for j in range(2):
        got = np.asarray(Image.open(out / "b_big" / f"sample{j}.png")).astype(int)
        ref = (to_unit(want[j]) * 255).round().byte().permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - ref).max() <= 1


def test_a_list_file_and_the_label_space_checks(exports, tmp_path):
    _save(tmp_path / "one.png", _synthetic_label(32, 32, 0))
    (tmp_path / "list.txt").write_text("# maps\none.png\nmissing.png\n")
    out = tmp_path / "out"
    base = ["--gpt", exports["gpt"], "--out", str(out), "--samples-per-map", "1"]
    assert load_recipe().main(base + ["--maps", str(tmp_path / "list.txt")]) == 1
    assert (out / "one" / "sample0.png").exists()
    assert "cannot be read" in json.loads((out / "failed.json").read_text())[str(tmp_path / "missing.png")]
    assert load_recipe().main(base + ["--maps", str(tmp_path / "one.png"), "--label-space", "synthetic"]) == 0
    for extra, match in [
        (["--label-space", "unified"], "this model's label space is synthetic"),
        (["--from-dataset", "ade20k"], "remaps to the unified label space"),
    ]:
        with pytest.raises(SystemExit, match=match):
            load_recipe().main(base + ["--maps", str(tmp_path / "one.png")] + extra)


def test_an_ade20k_annotation_samples_with_a_unified_space_model(tmp_path):
    """--from-dataset ade20k: ADE's own ids (0 = other -> ignore) through the make_shards table, into a model of the
    unified space; the map it saves is the remapped one."""
    ex = make_exports(tmp_path / "unified", num_classes=labels.NUM_CLASSES)
    raw = np.random.default_rng(0).choice([0, 1, 3, 13, 150], size=(32, 64)).astype(np.uint8)
    path = _save(tmp_path / "ADE_val_00000001.png", raw)
    out = tmp_path / "out"
    args = ["--gpt", ex["gpt"], "--out", str(out), "--maps", path, "--from-dataset", "ade20k", "--samples-per-map", "1"]
    assert load_recipe().main(args) == 0
    shown = np.asarray(Image.open(out / "ADE_val_00000001" / "map.png"))
    unified = labels.lut("ade20k")[raw]
    assert (shown == labels.get_space("unified").colorize(unified)).all()
