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
