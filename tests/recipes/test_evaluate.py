"""recipes/evaluate.py end to end on a tiny random stage-1 export (and a tiny GPT) and a few synthetic shards, with
random-weight VGG / Inception / segmenter files; the numbers are checked against a direct recomputation."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from svq_fast import named_configs
from svq_fast.config import DataConfig, GPTConfig, Stage2Config
from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.make_shards import write_synthetic
from svq_fast.eval.image_metrics import quantize_uint8, ssim
from svq_fast.eval.miou import ConfusionMatrix
from svq_fast.eval.ranks import eval_loader, my_batches, split_contiguous
from svq_fast.export import export_model, load_segmenter, load_stage1, weights_sha256
from svq_fast.models.gpt import SemanticGPT
from svq_fast.models.svq import SVQModel

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


evaluate = _load("evaluate")
train_segmenter = _load("train_segmenter")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torchvision
    from torchvision.models.vgg import cfgs, make_layers

    tmp = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    cfg = named_configs.svqgan_tiny()
    cfg.model.ch = 16
    export_model(SVQModel(cfg.model, cfg.quantizer).state_dict(), cfg, str(tmp / "stage1"))
    write_synthetic(str(tmp / "val"), split="val", size=64, num_samples=14, samples_per_shard=5, progress=False)
    vgg = tmp / "vgg16.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 112, 112) * 2 - 1)  # calibrate BatchNorm so random features are O(1)
    inception = tmp / "inception.pth"
    torch.save(net.state_dict(), inception)
    # a few steps of the real training recipe (train = val = the test shards), so its output format is what is used
    seg = str(tmp / "seg")
    argv = [
        "--out",
        seg,
        "--train-shards",
        str(tmp / "val"),
        "--val-shards",
        str(tmp / "val"),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--width",
        "8",
        "--levels",
        "2",
        "--log-every",
        "1",
    ]
    assert train_segmenter.main(argv) == 0
    return {
        "tmp": tmp,
        "stage1": str(tmp / "stage1"),
        "shards": str(tmp / "val"),
        "vgg": str(vgg),
        "inception": str(inception),
        "segmenter": seg,
    }


def _run(assets, out, *extra):
    argv = ["--out", str(out), "--shards", assets["shards"], "--stats-cache", str(assets["tmp"] / "cache"), *extra]
    assert evaluate.main(argv) == 0
    return json.loads((Path(out) / "metrics.json").read_text()), (Path(out) / "metrics.md").read_text()


def _direct_stage1(assets, n, batch_size):
    """Semantic mIoU (with and without the reference image) and mean SSIM of the first n samples in shard order,
    computed without the recipe, in the same batches (float32 convolutions, and so the 8-bit rounding of x_hat,
    depend slightly on the batch size)."""
    model, cfg = load_stage1(assets["stage1"])
    loader = make_loader(
        list_shards(assets["shards"]),
        batch_size=batch_size,
        image_size=64,
        resampled=False,
        flip=False,
        shuffle=False,
        crop="center",
    )
    cm = ConfusionMatrix(cfg.model.num_classes, cfg.model.ignore_index)
    cm_map_only = ConfusionMatrix(cfg.model.num_classes, cfg.model.ignore_index)
    ssims = []
    for batch in loader:
        keep = slice(0, n - len(ssims))  # samples past the first n do not count (and are not run, as in the recipe)
        x, s = batch["image"][keep], batch["label"][keep]
        with torch.no_grad():
            out = model(x, s)
            z_s = model.quantizer_s.lookup(model.encode_semantic(s))
            cm_map_only.update(model.decode_semantic(z_s).argmax(1), s)
        cm.update(out["s_logits"].argmax(1), s)
        ssims += ssim(quantize_uint8(out["x_hat"]), x).tolist()
        if len(ssims) >= n:
            break
    return cm.miou(), cm_map_only.miou(), sum(ssims) / n


@pytest.mark.filterwarnings("ignore:.*not pytorch-fid.*:RuntimeWarning")
def test_stage1_with_all_networks(assets):
    out = assets["tmp"] / "out_full"
    args = [
        "--mode",
        "stage1",
        "--stage1",
        assets["stage1"],
        "--max-samples",
        "4",
        "--batch-size",
        "3",
        "--vgg-weights",
        assets["vgg"],
        "--inception-weights",
        assets["inception"],
        "--segmenter",
        assets["segmenter"],
    ]
    res, md = _run(assets, out, *args)
    m = res["metrics"]
    assert res["settings"]["samples"] == 4 and res["settings"]["samples_available"] == 14
    assert m["images_scored"] == 4
    for k in (
        "ssim",
        "psnr_db",
        "lpips",
        "fid",
        "fsd",
        "semantic_miou",
        "semantic_pixel_acc",
        "semantic_miou_map_only",
        "segmenter_miou_recon",
        "segmenter_miou_real",
    ):
        assert isinstance(m[k], float) and math.isfinite(m[k]), k
    assert m["fid"] > 0 and m["fsd"] > 0 and m["lpips"] > 0 and -1 <= m["ssim"] <= 1
    assert m["fid_samples"] == {"fake": 4, "real": 4, "real_cached": False}
    # the recipe scored exactly the first 4 samples (the second batch of 3 is cut after 1)
    miou, miou_map_only, mean_ssim = _direct_stage1(assets, 4, batch_size=3)
    assert m["semantic_miou"] == pytest.approx(miou, rel=1e-9)
    assert m["semantic_miou_map_only"] == pytest.approx(miou_map_only, rel=1e-9)
    assert m["ssim"] == pytest.approx(mean_ssim, rel=1e-9)
    cb = m["codebook"]
    assert cb["image"]["codebook_size"] == 1024 and cb["image"]["tokens"] == 4 * 16 * 16
    assert 0 < cb["semantic"]["used_fraction"] <= 1 and cb["semantic"]["perplexity"] >= 1
    assert len(res["per_class"]) == 16 and res["per_class"][0]["class"] == "sky-clear"
    assert sum(r["gt_pixel_share"] for r in res["per_class"]) == pytest.approx(1.0)
    assert "semantic_iou" in res["per_class"][0] and "segmenter_iou_recon" in res["per_class"][0]
    assert "| model | FID↓ | SSIM↑ | LPIPS↓ |" in md and "| model | mIoU (%)↑ |" in md
    assert f"| {100 * m['semantic_miou']:.2f} |" in md

    # the real images' statistics were cached for the next run
    assert len(list((assets["tmp"] / "cache").glob("fid-*.npz"))) == 1


def test_real_statistics_cache_is_reused(assets, tmp_path):
    args = ["--mode", "stage1", "--stage1", assets["stage1"], "--max-samples", "5", "--segmenter", assets["segmenter"]]
    cache = ["--stats-cache", str(tmp_path / "cache")]
    first, _ = _run(assets, tmp_path / "a", *args, *cache)
    again, _ = _run(assets, tmp_path / "b", *args, *cache)
    assert not first["metrics"]["fsd_samples"]["real_cached"] and again["metrics"]["fsd_samples"]["real_cached"]
    assert again["metrics"]["fsd"] == pytest.approx(first["metrics"]["fsd"], rel=1e-9)
    other, _ = _run(
        assets, tmp_path / "c", *args[:-4], "--max-samples", "6", "--segmenter", assets["segmenter"], *cache
    )
    assert not other["metrics"]["fsd_samples"]["real_cached"]  # another sample count is another key
    assert len(list((tmp_path / "cache").glob("fsd-*.npz"))) == 2


def test_train_segmenter_output(assets):
    model, meta = load_segmenter(assets["segmenter"])
    assert model.cfg.num_classes == 16 and model.cfg.width == 8 and meta["steps"] == 3
    assert 0 <= meta["val_miou"] <= 1 and len(meta["val_per_class_iou"]) == 16
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    logits, feats = model.forward_features(x)
    assert logits.shape == (2, 16, 64, 64) and feats.shape == (2, 8) and torch.isfinite(feats).all()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 3, 30, 30))


def test_train_segmenter_is_reproducible_and_channels_last_matches_the_default_layout(assets, tmp_path):
    # the layout is a speed option: same data, same seed -> the same model up to float reassociation, and the
    # export is written in the default layout (safetensors refuses non-contiguous tensors). Compared on outputs:
    # a conv bias in front of a GroupNorm has a gradient of pure rounding noise, whose sign Adam's first steps follow
    common = ["--train-shards", assets["shards"], "--val-shards", assets["shards"], "--steps", "2"]
    common += ["--batch-size", "4", "--width", "8", "--levels", "2", "--val-samples", "4"]
    assert train_segmenter.main(["--out", str(tmp_path / "nchw"), *common]) == 0
    assert train_segmenter.main(["--out", str(tmp_path / "nhwc"), *common, "--channels-last"]) == 0
    # the committed instrument's README promises a bit-for-bit reproduction: the same command, the same weights
    assert train_segmenter.main(["--out", str(tmp_path / "nhwc_again"), *common, "--channels-last"]) == 0
    assert weights_sha256(str(tmp_path / "nhwc")) == weights_sha256(str(tmp_path / "nhwc_again"))
    a, _ = load_segmenter(str(tmp_path / "nchw"))
    b, _ = load_segmenter(str(tmp_path / "nhwc"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), atol=1e-4, rtol=1e-4)


def test_stage1_without_weights_reports_na(assets):
    res, md = _run(
        assets,
        assets["tmp"] / "out_bare",
        "--mode",
        "stage1",
        "--stage1",
        assets["stage1"],
        "--max-samples",
        "5",
        "--batch-size",
        "8",
    )
    m = res["metrics"]
    for k in ("lpips", "fid", "fsd", "segmenter_miou_recon", "segmenter_miou_real"):
        assert m[k] == "n/a (no weights)", k
    assert isinstance(m["ssim"], float) and m["images_scored"] == 5
    assert md.count("n/a (no weights)") >= 4


def test_missing_weight_file_names_it(assets, tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _run(
            assets,
            tmp_path / "o",
            "--mode",
            "stage1",
            "--stage1",
            assets["stage1"],
            "--inception-weights",
            str(missing),
        )
    with pytest.raises(FileNotFoundError, match="train_segmenter.py"):
        _run(assets, tmp_path / "o", "--mode", "stage1", "--stage1", assets["stage1"], "--segmenter", str(tmp_path))


class _FakeRanks:
    def __init__(self, rank, world):
        self.rank, self.world = rank, world

    def split(self, items):
        return split_contiguous(items, self.rank, self.world)


def test_split_is_accelerates():
    from types import SimpleNamespace

    from accelerate.state import PartialState

    for n in (0, 1, 5, 7, 12):
        for world in (1, 2, 3, 4):
            for rank in range(world):
                fake_state = SimpleNamespace(num_processes=world, process_index=rank)
                with PartialState.split_between_processes(fake_state, list(range(n))) as theirs:
                    assert split_contiguous(list(range(n)), rank, world) == list(theirs)


def test_rank_split_covers_each_sample_once(assets):
    args = evaluate.parse_args(["--mode", "stage1", "--stage1", "x", "--out", "x", "--batch-size", "3"])
    shards = list_shards(assets["shards"])

    def keys(rank, world, n):
        loader = eval_loader(shards, args.batch_size, args.num_workers, 64)
        batches = my_batches(loader, _FakeRanks(rank, world), n, 3)
        return [(b, k) for b, batch in batches for k in batch["key"]]

    for n in (14, 10):
        single = keys(0, 1, n)
        assert len(single) == n and len({k for _, k in single}) == n
        for world in (2, 3):
            split = [kb for r in range(world) for kb in keys(r, world, n)]
            assert split == single  # same batches, same samples, same order: independent of the world size


def test_stage2_end_to_end(assets):
    tmp = assets["tmp"]
    torch.manual_seed(0)
    q = named_configs.svqgan_tiny().quantizer  # the vocabularies of the stage-1 model in `assets`
    cfg = Stage2Config(
        model=GPTConfig(
            image_vocab=q.image_codebook_size,
            semantic_vocab=q.semantic_codebook_size,
            grid=16,
            n_layer=1,
            n_head=2,
            n_embd=32,
        ),
        stage1=assets["stage1"],
        data=DataConfig(image_size=64),
    )
    export_model(SemanticGPT(cfg.model).state_dict(), cfg, str(tmp / "gpt"))
    args = [
        "--mode",
        "stage2",
        "--gpt",
        str(tmp / "gpt"),
        "--max-samples",
        "2",
        "--batch-size",
        "2",
        "--top-k",
        "50",
        "--seed",
        "7",
        "--segmenter",
        assets["segmenter"],
    ]
    res, md = _run(assets, tmp / "out_gen", *args)
    m = res["metrics"]
    assert m["images_scored"] == 2 and isinstance(m["ssim"], float) and isinstance(m["fsd"], float)
    assert isinstance(m["segmenter_miou_generated"], float) and m["fid"] == "n/a (no weights)"
    assert m["codebook"]["generated_image_tokens"]["tokens"] == 2 * 256
    assert res["settings"]["sampling"]["top_k"] == 50 and res["settings"]["sampling"]["seed"] == 7
    assert "| model | FID↓ | SSIM↑ | LPIPS↓ |" in md and "Semantic image synthesis" in md
    again, _ = _run(assets, tmp / "out_gen2", *args)  # seeded by (seed, batch number): the same samples
    assert again["metrics"]["ssim"] == m["ssim"] and again["metrics"]["codebook"] == m["codebook"]
    # the diagnostic table: every row scored against the map; the real row is the instrument's own score
    d = m["diagnostics"]
    names = [r["images"] for r in d["rows"]]
    assert names == [
        "real images",
        "reconstructions",
        "another scene's z_x",
        "random z_x",
        "GPT samples",
        "GPT samples, null condition",
        "GPT samples, guidance 3",
    ]
    assert d["rows"][0]["seg_miou"] == m["segmenter_miou_real"]  # same segmenter, same images
    assert d["rows"][0]["fsd"] == 0.0 or d["rows"][0]["fsd"] < 1e-6  # real against itself
    assert d["rows"][4]["seg_miou"] == m["segmenter_miou_generated"]  # the evaluation's own samples
    nll = d["nll_bits_per_token"]
    assert nll["maps"] == 2 and abs(nll["gap"] - (nll["null_condition"] - nll["condition"])) < 1e-9
    # an untrained GPT predicts ~uniformly over the image vocabulary: log2(V) bits per token
    assert abs(nll["condition"] - math.log2(q.image_codebook_size)) < 0.5
    assert "## Where the semantics get lost" in md and "bits per token" in md


def test_stage2_diversity_rows_and_protocol(assets):
    """K draws per map against real re-renders of the map (issue 29), the z_x probe, and the protocol in
    metrics.json; the GPT's own condition is the default z_s kind."""
    import itertools

    import numpy as np

    from svq_fast.data.synthetic import SyntheticSpec, render_scene

    tmp = assets["tmp"]
    torch.manual_seed(0)
    q = named_configs.svqgan_tiny().quantizer
    cfg = Stage2Config(
        model=GPTConfig(image_vocab=q.image_codebook_size, semantic_vocab=q.semantic_codebook_size, grid=16,
                        n_layer=1, n_head=2, n_embd=32),
        stage1=assets["stage1"], data=DataConfig(image_size=64), condition="map",
    )  # fmt: skip
    export_model(SemanticGPT(cfg.model).state_dict(), cfg, str(tmp / "gpt_map"))
    args = ["--mode", "stage2", "--gpt", str(tmp / "gpt_map"), "--max-samples", "4", "--batch-size", "4",
            "--segmenter", assets["segmenter"], "--diversity-maps", "3", "--diversity-draws", "3",
            "--diagnostics-guidance", "0"]  # fmt: skip
    res, md = _run(assets, tmp / "out_div", *args)
    d = res["metrics"]["diversity"]
    names = [r["images"] for r in d["rows"]]
    assert names == ["real re-renders", "decodes, the re-renders' z_x", "GPT samples, map-only z_s",
                     "GPT samples, reference z_s",
                     "decodes, other scenes' z_x", "decodes, random z_x"]  # fmt: skip
    assert all(r["maps"] == 3 for r in d["rows"]) and d["draws_per_map"] == 3
    real = d["rows"][0]
    # the real spread, recomputed: the val split's first 3 scenes, texture seeds 0..2, mean pairwise L1 in [0, 1]
    spreads = []
    for i in range(3):
        imgs = [render_scene(SyntheticSpec(size=64, seed=0), 10_000_000 + i, texture_seed=t)[0] / 255.0
                for t in range(3)]  # fmt: skip
        spreads.append(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(imgs, 2)]))
    assert abs(real["pixel_l1"] - float(np.mean(spreads))) < 1e-6
    assert real["pixel_ratio"] == 1.0 and real["feature_ratio"] == 1.0 and real["fsd_to_rerenders"] < 1e-6
    assert real["lpips"].startswith("n/a (no --vgg-weights")
    for r in d["rows"][1:]:
        assert isinstance(r["pixel_ratio"], float) and isinstance(r["fsd_to_rerenders"], float)
    assert set(d["zx_probe"]) == {"map", "reference"}
    # the z_s kind defaults to the GPT's condition, and the protocol names instruments, settings and exports
    assert res["settings"]["sampling"]["semantic_tokens"] == "map alone (encode_semantic)"
    p = res["settings"]["protocol"]
    assert p["segmenter"]["sha256"] == weights_sha256(assets["segmenter"])
    assert p["exports_sha256"] == {"gpt": weights_sha256(str(tmp / "gpt_map")),
                                   "stage1": weights_sha256(assets["stage1"])}  # fmt: skip
    assert p["resolution"] == 64 and p["diversity"] == {"maps": 3, "draws_per_map": 3}
    assert p["z_s"] == "map alone (encode_semantic)" and p["gpt_trained_on"] == "map"
    assert "## One map, many images" in md and "## Protocol" in md and "z_x probe" in md
    ref, _ = _run(assets, tmp / "out_div_ref", *args, "--condition", "reference", "--diversity-maps", "0")
    assert ref["settings"]["protocol"]["z_s"] == "reference (real image, map)" and "diversity" not in ref["metrics"]
    assert ref["metrics"]["ssim"] != res["metrics"]["ssim"]  # another condition, other samples
