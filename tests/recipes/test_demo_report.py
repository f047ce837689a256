"""recipes/demo_report.py on hand-made evaluation results: the report carries the diagnostic table, the NLL gap
and the discriminator's held-out logits, each with its numbers."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("_recipe_demo_report", ROOT / "recipes" / "demo_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_report_has_diagnostics_and_discriminator_health(tmp_path):
    rec = {"ssim": 0.5, "psnr_db": 20.0, "fsd": 7.9, "semantic_miou": 0.9, "semantic_pixel_acc": 0.98,
           "semantic_miou_map_only": 0.91, "images_scored": 128}  # fmt: skip
    rows = [
        {"images": "real images", "seg_miou": 0.67, "fsd": 0.0},
        {"images": "GPT samples", "seg_miou": 0.24, "fsd": 8.85},
    ]
    nll = {"condition": 5.469, "null_condition": 5.727, "gap": 0.258, "gap_std_over_maps": 0.114, "maps": 128}
    gen = {"ssim": 0.2, "psnr_db": 13.0, "fsd": 8.85, "segmenter_miou_generated": 0.24, "segmenter_miou_real": 0.67,
           "images_scored": 128, "diagnostics": {"rows": rows, "guidance": 3.0, "nll_bits_per_token": nll}}  # fmt: skip
    _write(tmp_path / "eval/stage1/metrics.json", {"metrics": rec})
    _write(tmp_path / "eval/stage2/metrics.json", {"metrics": gen})
    last1 = {"step": 400, "rec": 0.2, "disc_heldout_real": 4.0, "disc_heldout_recon": -2.0, "disc_heldout_gap": 6.0}
    _write(tmp_path / "stage1/history.json", [last1])
    _write(tmp_path / "stage2/history.json", [{"step": 300, "loss": 3.8}])
    assert _load().main(["--run-dir", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Where the semantics get lost" in text
    assert "| GPT samples | 24.00 | 8.850 |" in text and "| real images | 67.00 | 0.000 |" in text
    assert "0.258 bits per token" in text
    assert "| 4.000 | -2.000 | 6.000 |" in text
    assert "(stage 1 on ? ranks, stage 2 on ?)" in text  # no checkpoints here


def test_report_names_each_stages_ranks_from_its_checkpoint(tmp_path):
    from svq_fast.train.checkpoint import COMPLETE, tag_name

    for stage, world in (("stage1", 2), ("stage2", 1)):
        _write(tmp_path / stage / "checkpoints" / tag_name(300) / COMPLETE, {"step": 300, "world_size": world})
    assert _load()._ranks(str(tmp_path / "stage1")) == "2" and _load()._ranks(str(tmp_path / "stage2")) == "1"


def test_report_has_diversity_protocol_and_the_rerender_grid(tmp_path):
    """Issue 29: the diversity rows, the evaluation protocol and the grid of samples beside real re-renders."""
    from PIL import Image

    from svq_fast.data.make_shards import write_synthetic

    rec = {"ssim": 0.5, "psnr_db": 20.0, "fsd": 7.9, "semantic_miou": 0.9, "semantic_pixel_acc": 0.98,
           "images_scored": 8}  # fmt: skip
    row = {"images": "real re-renders", "maps": 2, "pixel_l1": 0.19, "pixel_ratio": 1.0, "feature_l2": 0.5,
           "feature_ratio": 1.0, "lpips": "n/a (no --vgg-weights)", "lpips_ratio": "n/a (no --vgg-weights)",
           "fsd_to_rerenders": 0.0, "colour_distance_to_reference": 0.31}  # fmt: skip
    gen_row = {**row, "images": "GPT samples, map-only z_s", "pixel_l1": 0.14, "pixel_ratio": 0.74}
    probe = {
        "cases": 10,
        "share_following_zx": 0.9,
        "colour_distance_to_zx_source": 0.05,
        "colour_distance_to_zs_source": 0.2,
        "bar": ">= 0.75 of the cases closer to the z_x source",
        "met": True,
    }
    div = {"maps": 2, "draws_per_map": 4, "decode_rows_condition": "map", "rerenders": "texture seeds",
           "rows": [row, gen_row], "zx_probe": {"map": probe, "reference": probe}}  # fmt: skip
    gen = {"ssim": 0.2, "psnr_db": 13.0, "fsd": 3.9, "images_scored": 8, "diversity": div}
    protocol = {
        "segmenter": {"path": "/x/segmenter_synthetic64", "sha256": "ab" * 32, "val_miou": 0.82},
        "fsd": "pooled features",
        "fid": "n/a",
        "lpips": "n/a",
        "resolution": 64,
        "draws_per_map": 1,
        "z_s": "map alone (encode_semantic)",
        "gpt_trained_on": "map",
        "exports_sha256": {"gpt": "cd" * 32},
    }
    _write(tmp_path / "eval/stage1/metrics.json", {"metrics": rec})
    _write(
        tmp_path / "eval/stage2/metrics.json",
        {"metrics": gen, "settings": {"protocol": protocol, "samples": 8, "samples_available": 256}},
    )
    _write(tmp_path / "stage1/history.json", [{"step": 1, "rec": 0.2}])
    _write(tmp_path / "stage2/history.json", [{"step": 1, "loss": 3.8}])
    shards = tmp_path / "data/64px/val"
    write_synthetic(str(shards), split="val", size=64, num_samples=2, processes=1, progress=False)
    keys = ["syn010000000", "syn010000001"]
    (tmp_path / "samples").mkdir()
    for k in keys:
        for j in range(4):
            Image.new("RGB", (64, 64), (40 * j, 0, 0)).save(tmp_path / f"samples/{k}_sample{j}.png")
    _write(tmp_path / "samples/settings.json", {"keys": keys, "condition": "map"})
    assert _load().main(["--run-dir", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| GPT samples, map-only z_s | 2 | 0.140 | 0.74x |" in text and "## One map, many images" in text
    assert "## Protocol" in text and "sha256 abababababababab..." in text and "held-out maps: 8 (of 256)" in text
    assert "(z_s: map;" in text and "![samples beside re-renders](samples/grid_rerenders.png)" in text
    grid = Image.open(tmp_path / "samples/grid_rerenders.png")
    assert grid.size == (2 + 7 * 66, 2 + 2 * 66)  # map | 2 re-renders | 4 samples, per map
