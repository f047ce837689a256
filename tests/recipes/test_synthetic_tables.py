"""The experiment's report: tables in the paper's layout, mean ± std over seeds, n/a where a metric is absent."""

import argparse
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes" / "experiments"))
import synthetic_tables as st  # noqa: E402


def _seed_results(offset: float) -> dict:
    stage1 = {
        m: {"ssim": 0.5 + offset, "psnr_db": 20.0 + offset, "fsd": 3.0, "semantic_miou": 0.6 + offset}
        for m in st.STAGE1
    }
    stage1["svqgan_mapdrop"]["semantic_miou_map_only"] = 0.4 + offset
    stage1["semantic_vqvae"]["semantic_miou_map_only"] = "n/a (not a coupled model)"  # strings never enter a mean
    stage2 = {
        name: {"fsd": 2.0 + offset, "ssim": 0.3, "segmenter_miou_generated": 0.25, "psnr_db": 12.0}
        for name in st.STAGE2
    }
    return {"stage1": stage1, "stage2": stage2}


def test_report_tables_mean_and_spread():
    args = argparse.Namespace(
        seeds=[0, 1], stage1_steps=400, stage2_steps=400, stage2_lr=1e-3, machine="m", eval_samples=256
    )
    text = st.report([_seed_results(0.0), _seed_results(0.1)], args, {"segmenter": 12.0}, 600.0)
    spread = statistics.stdev([0.6, 0.7]) * 100
    assert "## Table 1" in text and "## Table 2" in text and "## Table 3" in text
    for name in st.STAGE2:
        assert f"| {name} | 2.050 ± 0.071 | 0.3000 ± 0.0000 | 25.00 ± 0.00 |" in text
    assert f"| svqgan | 65.00 ± {spread:.2f} |" in text
    row = next(line for line in text.splitlines() if line.startswith("| svqgan_mapdrop |"))
    assert row.endswith(f"| 45.00 ± {spread:.2f} |")  # map-only mIoU column
    table3 = text.split("## Table 3")[1].splitlines()
    assert next(line for line in table3 if line.startswith("| semantic_vqvae |")).endswith("| n/a |")
    assert "Wall-clock of all parts: 10.0 min" in text and "| segmenter | 12 |" in text
    assert "stage 2 400 steps at lr 0.001, batch 8" in text


def test_gpts_train_at_the_experiments_own_lr_not_gpt_tinys(tmp_path, monkeypatch):
    """The tables' batch-8 GPTs keep STAGE2_LR (see its comment) whatever gpt_tiny's lr is."""
    from svq_fast.named_configs import get_config

    assert st.STAGE2_LR != get_config("gpt_tiny").optim.lr
    commands = []

    def fake_run(cmd, log):
        commands.append(cmd)
        raise SystemExit  # stop at the first training: only its command line is checked

    monkeypatch.setattr(st, "run", fake_run)
    monkeypatch.setattr(st, "STAGE1", ())  # go straight to stage 2
    args = argparse.Namespace(
        out=str(tmp_path),
        train_samples=8,
        stage1_steps=4,
        stage2_steps=4,
        stage2_lr=st.STAGE2_LR,
        conditions=["reference"],
        seeds=[0],
    )
    with pytest.raises(SystemExit):
        st.train_seed(0, args, str(tmp_path / "data"), "seg", {})
    assert "train_transformer.py" in " ".join(commands[0]) and f"--optim.lr={st.STAGE2_LR}" in commands[0]


def test_single_seed_cells_have_no_spread():
    args = argparse.Namespace(seeds=[0], stage1_steps=4, stage2_steps=4, stage2_lr=1e-3, machine="m", eval_samples=8)
    text = st.report([_seed_results(0.0)], args, {}, 60.0)
    tables = text.split("## Table 1")[1].split("## Samples")[0]
    assert "| vqvae | 0.5000 | 20.00 | 3.000 |" in tables and "±" not in tables


def test_default_budgets_are_the_tiny_configs_own():
    from svq_fast.named_configs import get_config

    stage1, stage2 = get_config("svqgan_tiny"), get_config("gpt_tiny")
    assert st.tiny_defaults() == (stage1.optim.max_steps, stage2.optim.max_steps, stage2.sample.top_k)


def _with_stage2(result: dict, model: str, seg: float, fsd: float) -> dict:
    result["stage2"][model].update(segmenter_miou_generated=seg, fsd=fsd)
    result["stage2"][model]["diagnostics"] = {
        "rows": [{"images": "real images", "seg_miou": 0.8, "fsd": 0.0}, {"images": "GPT samples", "seg_miou": seg}],
        "nll_bits_per_token": {"gap": 0.2 + seg},
    }
    return result


def test_coupled_vs_separate_says_which_differences_exceed_the_seed_spread():
    seeds = [_seed_results(0.0), _seed_results(0.0)]
    for r, jitter in zip(seeds, (0.0, 0.01)):
        _with_stage2(r, "sVQGAN-T", 0.40 + jitter, 3.0 + jitter)  # far above VQGAN-T: beyond the spread
        _with_stage2(r, "VQGAN-T", 0.10 + jitter, 3.1 - jitter)  # FSD: means 0.09 apart, spread 0.007 + 0.007
        _with_stage2(r, "sVQVAE-T", 0.205 + 2 * jitter, 5.0)
        _with_stage2(r, "VQVAE-T", 0.21, 5.0)  # seg. mIoU 0.21 vs 0.205-0.225: within the spread
    rows = {line.split(" | ")[0] + "/" + line.split(" | ")[1]: line for line in st.coupled_vs_separate(seeds)
            if line.startswith("| s")}  # fmt: skip
    seg = "seg. mIoU (%) (higher is better)"
    assert rows[f"| sVQGAN-T vs VQGAN-T/{seg}"].endswith("| +30.00 | sVQGAN-T | yes |")
    assert rows["| sVQGAN-T vs VQGAN-T/FSD (lower is better)"].endswith("| -0.090 | sVQGAN-T | yes |")
    assert rows[f"| sVQVAE-T vs VQVAE-T/{seg}"].endswith("| sVQVAE-T | no |")  # +0.50 points, spread 1.41
    assert rows["| sVQVAE-T vs VQVAE-T/FSD (lower is better)"].endswith("| +0.000 | neither | no |")
    one = st.coupled_vs_separate(seeds[:1])
    assert all(line.endswith("| n/a (one seed) |") for line in one if line.startswith("| sVQ"))


def test_diagnostics_table_has_one_row_per_model_and_the_condition_bits():
    seeds = [_seed_results(0.0)]
    for m in st.STAGE2:
        _with_stage2(seeds[0], m, 0.3, 3.0)
    lines = st.diagnostics_table(seeds)
    assert lines[2] == "| model | real images | GPT samples | condition's bits per image token |"
    assert "| sVQGAN-T | 80.00 | 30.00 | 0.500 |" in lines
    assert st.diagnostics_table([_seed_results(0.0)]) == []  # no diagnostics recorded: no table
    title = "## Where the semantics get lost (FSD, every column scored against the conditioning map)"
    fsd = lines[lines.index(title) :]
    assert fsd[2] == "| model | real images | GPT samples |"
    assert "| sVQGAN-T | 0.00 | n/a |" in fsd  # a row without an FSD is n/a, not 0


def _with_random(result: dict, model: str, gpt: tuple[float, float], random: tuple[float, float]) -> dict:
    """Diagnostic rows (seg. mIoU, FSD) of the GPT samples and of the random-z_x decodes."""
    result["stage2"][model]["diagnostics"] = {
        "rows": [
            {"images": "random z_x", "seg_miou": random[0], "fsd": random[1]},
            {"images": "GPT samples", "seg_miou": gpt[0], "fsd": gpt[1]},
        ]
    }
    return result


def test_gpt_vs_random_tokens_pairs_the_seeds():
    seeds = [_seed_results(0.0) for _ in range(3)]
    # sVQGAN-T: the seeds vary a lot (FSD 4-8), but the GPT is better by 3 +- 0.5 in each: beyond the spread
    for r, base, gap in zip(seeds, (4.0, 6.0, 8.0), (2.5, 3.0, 3.5)):
        _with_random(r, "sVQGAN-T", (0.30, base), (0.25, base + gap))
    # VQGAN-T: one seed where random tokens score the better FSD: the signs disagree, not beyond the spread
    for r, gap in zip(seeds, (2.0, 2.0, -0.5)):
        _with_random(r, "VQGAN-T", (0.10, 5.0), (0.10, 5.0 + gap))
    rows = {line.split(" | ")[0] + "/" + line.split(" | ")[1]: line for line in st.gpt_vs_random_tokens(seeds)
            if line.startswith("| ") and " is better" in line}  # fmt: skip
    assert rows["| sVQGAN-T/FSD (lower is better)"].endswith("| -3.00 ± 0.50 | GPT | yes |")
    assert rows["| sVQGAN-T/seg. mIoU (%) (higher is better)"].endswith("| 5.00 ± 0.00 | GPT | yes |")
    assert rows["| VQGAN-T/FSD (lower is better)"].endswith("| mixed | no |")
    assert rows["| VQGAN-T/seg. mIoU (%) (higher is better)"].endswith("| neither | no |")  # equal in every seed
    assert "| sVQVAE-T/" not in " ".join(rows)  # no diagnostics: no row
    one = st.gpt_vs_random_tokens(seeds[:1])
    assert all(line.endswith("| n/a (one seed) |") for line in one if line.startswith("| sVQGAN-T"))
    assert st.gpt_vs_random_tokens([_seed_results(0.0)]) == []  # no diagnostics recorded: no section


def test_coupled_gpts_train_in_each_requested_condition(tmp_path, monkeypatch):
    """--conditions reference,map: the coupled GPTs also train on map-only z_s (issue 29), the separate ones once."""
    commands = []

    def fake_run(cmd, log):
        if "evaluate.py" in " ".join(cmd):
            raise SystemExit  # every training is recorded; stop at the first evaluation
        commands.append(cmd)
        return 0.0

    monkeypatch.setattr(st, "run", fake_run)
    monkeypatch.setattr(st, "STAGE1", ())
    args = argparse.Namespace(out=str(tmp_path), train_samples=8, stage1_steps=4, stage2_steps=4, seeds=[0],
                              stage2_lr=st.STAGE2_LR, conditions=["reference", "map"], eval_samples=8)  # fmt: skip
    with pytest.raises(SystemExit):
        st.train_seed(0, args, str(tmp_path / "data"), "seg", {})
    runs = {next(a for a in c if a.startswith("--run.out_dir=")).rsplit("/", 1)[1]:
            next(a for a in c if a.startswith("--condition=")) for c in commands}  # fmt: skip
    assert runs == {"gpt_vqvae": "--condition=reference", "gpt_svqvae": "--condition=reference",
                    "gpt_svqvae_map": "--condition=map", "gpt_vqgan": "--condition=reference",
                    "gpt_svqgan": "--condition=reference", "gpt_svqgan_map": "--condition=map"}  # fmt: skip
    assert st.stage2_models(["reference"]) == ["VQVAE-T", "sVQVAE-T", "VQGAN-T", "sVQGAN-T"]


def test_diversity_table_and_pairs_of_the_map_only_models():
    seeds = [_seed_results(0.0)]
    div = {"rows": [
        {"images": "real re-renders", "pixel_l1": 0.19, "pixel_ratio": 1.0, "feature_ratio": 1.0,
         "fsd_to_rerenders": 0.0, "colour_distance_to_reference": 0.3},
        {"images": "GPT samples, map-only z_s", "pixel_l1": 0.13, "pixel_ratio": 0.7, "feature_ratio": 0.8,
         "fsd_to_rerenders": 1.5, "colour_distance_to_reference": 0.25, "reference_copy_ratio": 0.98},
        {"images": "GPT samples, reference z_s", "pixel_l1": 0.03, "pixel_ratio": 0.16, "feature_ratio": 0.2,
         "fsd_to_rerenders": 4.0, "colour_distance_to_reference": 0.07, "reference_copy_ratio": 0.3},
        {"images": "decodes, the re-renders' z_x", "pixel_l1": 0.14, "pixel_ratio": 0.75, "feature_ratio": 1.1,
         "fsd_to_rerenders": 2.0, "colour_distance_to_reference": 0.3, "reference_copy_ratio": 1.0}]}  # fmt: skip
    seeds[0]["stage2"]["sVQGAN-T"]["diversity"] = div
    lines = st.diversity_table(seeds)
    assert "| sVQGAN-T | samples, map-only z_s | 0.70 | 0.80 | 1.500 | 0.250 | 0.98 |" in lines
    assert "| sVQGAN-T | samples, reference z_s | 0.16 | 0.20 | 4.000 | 0.070 | 0.30 |" in lines
    assert (
        "| sVQGAN-T | decodes of the re-renders' z_x (stage 1's ceiling) | 0.75 | 1.10 | 2.000 | 0.300 | 1.00 |"
        in lines
    )
    assert any("pixel L1 between draws 0.190" in line for line in lines)
    assert st.diversity_table([_seed_results(0.0)]) == []  # no diversity recorded: no section
    pairs = [line for line in st.coupled_vs_separate(seeds) if line.startswith("| sVQGAN-T map z_s vs VQGAN-T")]
    assert len(pairs) == len(st.COMPARED)  # the controlled comparison: map-only coupled vs separate
    for name in ("sVQGAN-T map z_s", "sVQVAE-T map z_s"):  # an invocation without map-only GPTs: no rows for them
        del seeds[0]["stage2"][name]
    assert not any(
        "map z_s" in line
        for line in st.coupled_vs_separate(seeds)
        + st.report(
            seeds,
            argparse.Namespace(seeds=[0], stage1_steps=4, stage2_steps=4, stage2_lr=1e-3, machine="m", eval_samples=8),
            {},
            60.0,
        )
        .split("## Samples")[0]
        .splitlines()
    )


def test_a_seed_whose_evaluations_are_on_disk_trains_only_what_is_missing(tmp_path, monkeypatch):
    """Evaluations copied from another machine make their trainings unnecessary; a missing one trains its models."""
    import json

    root = tmp_path / "seed1"
    models = st.stage2_models(["reference", "map"])
    for folder in [*set(st.TABLE2) | set(st.TABLE3), *(st.gpt_dir(n) for n in models)]:
        (root / "eval" / folder).mkdir(parents=True)
        (root / "eval" / folder / "metrics.json").write_text(json.dumps({"metrics": {"fsd": 1.0}}))
    commands = []

    def fake_run(cmd, log):  # an evaluation writes its metrics.json
        commands.append(" ".join(cmd))
        if "evaluate.py" in commands[-1]:
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"metrics": {"fsd": 2.0}}))
        return 0.0

    monkeypatch.setattr(st, "run", fake_run)
    args = argparse.Namespace(out=str(tmp_path), train_samples=8, stage1_steps=4, stage2_steps=4, seeds=[0, 1],
                              stage2_lr=st.STAGE2_LR, conditions=["reference", "map"], eval_samples=8,
                              top_k=50)  # fmt: skip
    results = st.train_seed(1, args, str(tmp_path / "data"), "seg", {})
    assert commands == [] and set(results["stage2"]) == set(models)  # seed 1 draws no grids
    (root / "eval" / "gpt_svqgan_map" / "metrics.json").unlink()
    st.train_seed(1, args, str(tmp_path / "data"), "seg", {})
    trained = [c.split("--run.out_dir=")[1].split()[0].rsplit("/", 1)[1] for c in commands if "--run.out_dir=" in c]
    assert trained == ["svqgan", "gpt_svqgan_map"]
    assert sum("evaluate.py" in c for c in commands) == 1


def test_family_gan_trains_the_gan_comparison_only(tmp_path, monkeypatch):
    """--family gan: VQGAN-T against the sVQGAN-Ts in both conditions, with the stage-1 models they read."""
    commands = []

    def fake_run(cmd, log):
        if "evaluate.py" in " ".join(cmd):
            raise SystemExit  # every training is recorded; stop at the first evaluation
        commands.append(next(a for a in cmd if a.startswith("--run.out_dir=")).rsplit("/", 1)[1])
        return 0.0

    monkeypatch.setattr(st, "run", fake_run)
    args = argparse.Namespace(out=str(tmp_path), train_samples=8, stage1_steps=4, stage2_steps=4, seeds=[0],
                              stage2_lr=st.STAGE2_LR, conditions=["reference", "map"], eval_samples=8,
                              family="gan", machine="m")  # fmt: skip
    with pytest.raises(SystemExit):
        st.train_seed(0, args, str(tmp_path / "data"), "seg", {})
    assert commands == ["semantic_vqvae", "vqgan", "svqgan", "gpt_vqgan", "gpt_svqgan", "gpt_svqgan_map"]
    one_seed = {"stage1": {"vqgan": {"ssim": 0.4}, "svqgan": {"ssim": 0.5}}, "stage2": {}}
    text = st.report([one_seed], argparse.Namespace(**{**vars(args), "stage2_lr": 1e-3}), {}, 60.0)
    assert "| vqgan |" in text and "| vqvae |" not in text and "--family gan" in text  # rows of trained models only
