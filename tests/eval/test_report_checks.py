"""The map-following checks under the diagnostic table: each bar is met or not from the rows' own numbers."""

import math

from svq_fast.eval.report import diagnostics_markdown, map_following_checks


def _diagnostics(real=0.85, recon=0.6, swap=0.45, rand=(0.3, 12.0), gpt=(0.55, 8.0), gap=0.3, std=0.1, maps=128):
    rows = [
        {"images": "real images", "seg_miou": real, "fsd": 0.0},
        {"images": "reconstructions", "seg_miou": recon, "fsd": 7.0},
        {"images": "another scene's z_x", "seg_miou": swap, "fsd": 8.0},
        {"images": "random z_x", "seg_miou": rand[0], "fsd": rand[1]},
        {"images": "GPT samples", "seg_miou": gpt[0], "fsd": gpt[1]},
    ]
    nll = {"condition": 5.0, "null_condition": 5.0 + gap, "gap": gap, "gap_std_over_maps": std, "maps": maps}
    return {"rows": rows, "guidance": 3.0, "nll_bits_per_token": nll}


def _met(lines: list[str]) -> dict[str, str]:
    return {line.split(" | ")[0].lstrip("| "): line.rsplit(" | ", 1)[1].rstrip(" |") for line in lines[2:-1]}


def test_every_bar_met():
    met = _met(map_following_checks(_diagnostics()))
    assert len(met) == 6 and set(met.values()) == {"yes"}, met


def test_each_bar_can_fail():
    cases = {
        "the instrument: segmenter mIoU on real images (%)": _diagnostics(real=0.79),
        "GPT samples' seg. mIoU / real images'": _diagnostics(gpt=(0.5, 8.0)),  # 0.59 of 0.85
        "another scene's z_x / reconstructions (seg. mIoU)": _diagnostics(swap=0.41),  # 0.68
        "GPT samples vs random z_x, FSD": _diagnostics(rand=(0.3, 7.9)),
        "GPT samples vs random z_x, seg. mIoU (%)": _diagnostics(rand=(0.56, 12.0)),
        "bits per image token the condition gives the GPT": _diagnostics(gap=0.017, std=0.1, maps=128),  # < 2 SE
    }
    for name, d in cases.items():
        met = _met(map_following_checks(d))
        assert met[name] == "no", (name, met)
        assert sum(v == "no" for v in met.values()) == 1, (name, met)


def test_missing_numbers_never_pass_and_the_table_is_in_the_diagnostics():
    d = _diagnostics(gpt=(0.55, float("nan")))
    assert _met(map_following_checks(d))["GPT samples vs random z_x, FSD"] == "no"
    d = _diagnostics(gpt=(float("nan"), 8.0))
    assert _met(map_following_checks(d))["GPT samples vs random z_x, seg. mIoU (%)"] == "no"
    text = "\n".join(diagnostics_markdown(_diagnostics()))
    assert "| the instrument: segmenter mIoU on real images (%) | 85.00 | >= 80 | yes |" in text
    se = 0.1 / math.sqrt(128)
    assert f"0.300 (standard error {se:.3f})" in text
    # rows without a segmenter (NLL only): no checks table
    assert map_following_checks({"rows": [], "nll_bits_per_token": _diagnostics()["nll_bits_per_token"]}) == []
