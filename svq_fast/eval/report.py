"""Evaluation results as JSON-safe values and as markdown in the paper's table layouts."""

from __future__ import annotations

import math
import os


def json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [json_safe(x) for x in v]
    return v


def _fmt(v, digits: int = 4, scale: float = 1.0) -> str:
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v * scale:.{digits}f}"


def markdown(res: dict) -> str:
    m, s = res["metrics"], res["settings"]
    name = res["model"]
    where = os.path.dirname(s["shards"][0])
    data = f"{len(s['shards'])} shard(s) in {where}, first {s['samples']} samples, {s['image_size']}px"
    lines = []
    if res["mode"] == "stage1":
        lines += [
            f"# Reconstruction: {name}",
            "",
            f"Data: {data}. Reconstructions rounded to 8 bits before scoring.",
            "",
            "## Image reconstruction (paper Table 2 layout)",
            "",
            "| model | FID↓ | SSIM↑ | LPIPS↓ |",
            "|---|---|---|---|",
            f"| {name} | {_fmt(m['fid'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['lpips'])} |",
            "",
            "## Semantic reconstruction (paper Table 3 layout)",
            "",
            "| model | mIoU (%)↑ |",
            "|---|---|",
            f"| {name} | {_fmt(m['semantic_miou'], 2, 100)} |",
        ]
        fake = "recon"
    else:
        sm = s["sampling"]
        lines += [
            f"# Semantic image synthesis: {name}",
            "",
            f"Data: {data}. One sample per map: temperature {sm['temperature']}, top-k {sm['top_k']}, top-p "
            f"{sm['top_p']}, guidance {sm['guidance_scale']}, seed {sm['seed']}, z_s from {sm['semantic_tokens']}. "
            "SSIM / LPIPS against the real image with the same map; samples rounded to 8 bits.",
            "",
            "## Generation (paper Table 1 layout)",
            "",
            "| model | FID↓ | SSIM↑ | LPIPS↓ |",
            "|---|---|---|---|",
            f"| {name} | {_fmt(m['fid'], 2)} | {_fmt(m['ssim'])} | {_fmt(m['lpips'])} |",
        ]
        fake = "generated"
    lines += ["", "## Other metrics", "", "| metric | value |", "|---|---|"]
    other = [
        ("PSNR (dB)", _fmt(m["psnr_db"], 2)),
        ("SSIM std over images", _fmt(m.get("ssim_std"))),
        ("FSD (Frechet segmenter distance)", _fmt(m["fsd"], 4)),
        (f"segmenter mIoU on {fake} images (%)", _fmt(m.get(f"segmenter_miou_{fake}", "n/a"), 2, 100)),
        ("segmenter mIoU on real images (%), its reference", _fmt(m.get("segmenter_miou_real", "n/a"), 2, 100)),
    ]
    if res["mode"] == "stage1":
        other.append(("semantic pixel accuracy (%)", _fmt(m["semantic_pixel_acc"], 2, 100)))
        other.append(
            (
                f"semantic mIoU from the map alone (%) (image dropout {m.get('image_dropout', 0)})",
                _fmt(m.get("semantic_miou_map_only", "n/a"), 2, 100),
            )
        )
    for cb_name, cb in m["codebook"].items():
        if isinstance(cb, dict):
            other.append(
                (
                    f"codebook usage: {cb_name}",
                    f"{cb['codes_used']}/{cb['codebook_size']} codes ({100 * cb['used_fraction']:.1f}%), "
                    f"perplexity {cb['perplexity']:.1f}",
                )
            )
        else:
            other.append((f"codebook usage: {cb_name}", cb))
    lines += [f"| {k} | {v} |" for k, v in other]
    cols = [c for c in res["per_class"][0] if c not in ("class", "id")] if res["per_class"] else []
    headers = {
        "gt_pixel_share": "ground-truth pixels",
        "semantic_iou": "semantic reconstruction IoU",
        f"segmenter_iou_{fake}": f"segmenter IoU on {fake}",
        "segmenter_iou_real": "segmenter IoU on real",
    }
    head = " | ".join(headers.get(c, c) for c in cols)
    lines += ["", "## Per class (%)", "", f"| class | {head} |", "|---|" + "---|" * len(cols)]
    for r in res["per_class"]:
        vals = [_fmt(r[c], 2, 100) for c in cols]
        lines.append(f"| {r['class']} | " + " | ".join(vals) + " |")
    lines += ["", "n/a: the class is absent from both the ground truth and the prediction.", ""]
    if "diagnostics" in m:
        lines += diagnostics_markdown(m["diagnostics"])
    return "\n".join(lines)


def diagnostics_markdown(d: dict) -> list[str]:
    """The diagnostic table of svq_fast/eval/diagnostics.py and the NLL gap."""
    nll = d["nll_bits_per_token"]
    lines = ["## Where the semantics get lost", ""]
    if d["rows"]:
        lines += [
            "Every row is scored by the same segmenter against the conditioning map (z_s = the map's tokens); "
            "the first row is the instrument's own score on real images.",
            "",
            "| images | seg. mIoU (%)↑ | FSD↓ |",
            "|---|---|---|",
        ]
        lines += [f"| {r['images']} | {_fmt(r['seg_miou'], 2, 100)} | {_fmt(r['fsd'], 3)} |" for r in d["rows"]]
        lines.append("")
    lines += map_following_checks(d)
    lines += [
        f"Image-token NLL over {nll['maps']} held-out scenes (bits per token): with the true condition "
        f"{_fmt(nll['condition'], 3)}, with the null condition {_fmt(nll['null_condition'], 3)}; the condition "
        f"tells the GPT {_fmt(nll['gap'], 3)} bits per token (std over scenes {_fmt(nll['gap_std_over_maps'], 3)}).",
        "",
    ]
    return lines


def map_following_checks(d: dict) -> list[str]:
    """The diagnostic rows read as the questions a user asks of the pipeline, each with its measured value and the
    bar it should clear: does the instrument itself score >= 80% on real images; do generations follow the map
    nearly as well as real images score (generated / real seg. mIoU >= 0.6); does the layout survive another
    scene's z_x (>= 0.7 of the reconstructions); does the GPT beat random image tokens with the same z_s (lower
    FSD, seg. mIoU at least as high); does the condition inform it (NLL gap > 2 standard errors over scenes)."""
    from svq_fast.eval.diagnostics import RANDOM, REAL, RECON, SAMPLES, SWAP

    rows = {r["images"]: r for r in d["rows"]}
    if not all(k in rows for k in (REAL, RECON, SWAP, RANDOM, SAMPLES)):
        return []
    real, recon, swap = rows[REAL]["seg_miou"], rows[RECON]["seg_miou"], rows[SWAP]["seg_miou"]
    gpt, rand = rows[SAMPLES], rows[RANDOM]
    nll = d["nll_bits_per_token"]
    std, maps = nll["gap_std_over_maps"], nll["maps"]
    se = std / math.sqrt(maps) if isinstance(std, float) and maps else float("nan")  # of the mean over scenes

    def ratio(a, b):
        return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 else float("nan")

    def verdict(ok) -> str:
        return "yes" if ok else "no"

    checks = [
        ("the instrument: segmenter mIoU on real images (%)", _fmt(real, 2, 100), ">= 80",
         verdict(isinstance(real, float) and real >= 0.8)),
        ("GPT samples' seg. mIoU / real images'", f"{ratio(gpt['seg_miou'], real):.2f}", ">= 0.60",
         verdict(ratio(gpt["seg_miou"], real) >= 0.6)),
        ("another scene's z_x / reconstructions (seg. mIoU)", f"{ratio(swap, recon):.2f}", ">= 0.70",
         verdict(ratio(swap, recon) >= 0.7)),
        ("GPT samples vs random z_x, FSD", f"{_fmt(gpt['fsd'], 3)} vs {_fmt(rand['fsd'], 3)}", "lower",
         verdict(_lt(gpt["fsd"], rand["fsd"]))),
        ("GPT samples vs random z_x, seg. mIoU (%)",
         f"{_fmt(gpt['seg_miou'], 2, 100)} vs {_fmt(rand['seg_miou'], 2, 100)}", "at least as high",
         verdict(_lt(rand["seg_miou"], gpt["seg_miou"]) or rand["seg_miou"] == gpt["seg_miou"])),
        ("bits per image token the condition gives the GPT", f"{_fmt(nll['gap'], 3)} (standard error {_fmt(se, 3)})",
         "> 2 standard errors", verdict(_lt(2 * se, nll["gap"]))),
    ]  # fmt: skip
    lines = ["| check | measured | bar | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {value} | {bar} | {met} |" for name, value, bar, met in checks]
    return [*lines, ""]


def _lt(a, b) -> bool:
    """a < b for finite floats; False when either is missing ('n/a')."""
    return isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b) and a < b
