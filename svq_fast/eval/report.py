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
    scored = s.get("samples_scored", s["samples"])  # older metrics.json files: every planned sample was scored
    read = f"first {s['samples']} samples"
    if scored < s["samples"]:
        read += f", only {scored} of them readable and scored"
    data = f"{len(s['shards'])} shard(s) in {where}, {read}, {s['image_size']}px"
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
            f"{sm['top_p']}, guidance {sm['guidance_scale']}, seed {sm['seed']}, z_s: {sm['semantic_tokens']}. "
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
    if "protocol" in s:
        lines += ["", *protocol_markdown(s["protocol"], s)]
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
    if scored < s["samples"]:  # right under the title: every number covers the scored images only
        lines[1:1] = ["", f"**Warning: only {scored} of the {s['samples']} planned samples could be read and were "
                      f"scored**; the other {s['samples'] - scored} were unreadable (see the evaluation's "
                      f"svq_fast.data warnings). Every number below covers those {scored} images only."]  # fmt: skip
    if "diversity" in m:
        lines += diversity_markdown(m["diversity"])
    return "\n".join(lines)


def protocol_markdown(p: dict, settings: dict | None = None) -> list[str]:
    """The evaluation protocol of a metrics.json (settings.protocol, svq_fast/eval/tasks.py:protocol) as a list."""
    seg = p.get("segmenter")
    seg_text = (f"`{os.path.basename(seg['path'])}` sha256 {seg['sha256'][:16]}... (its own val mIoU "
                f"{_fmt(seg.get('val_miou'), 2, 100)}%)" if seg else "none")  # fmt: skip
    items = [("segmenter", seg_text), ("FSD", p["fsd"]), ("FID", p["fid"]), ("LPIPS", p["lpips"]),
             ("resolution", f"{p['resolution']}px")]  # fmt: skip
    if settings is not None and "samples" in settings:
        items.append(("held-out maps", f"{settings['samples']} (of {settings.get('samples_available', '?')})"))
    items.append(("draws per map", f"{p['draws_per_map']} (Table 1)"))
    if "diversity" in p:
        items.append(("diversity rows", f"{p['diversity']['draws_per_map']} draws for each of the first "
                                        f"{p['diversity']['maps']} maps"))  # fmt: skip
    if "sampling" in p:
        sm = p["sampling"]
        items.append(("sampling", ", ".join(f"{k} {v}" for k, v in sm.items())))
    if "z_s" in p:
        items.append(("z_s", f"{p['z_s']}; the GPT was trained on condition {p.get('gpt_trained_on')!r}"))
    items += [(f"{name} export sha256", f"{h[:16]}...") for name, h in p["exports_sha256"].items()]
    return ["## Protocol", "", *[f"- {k}: {v}" for k, v in items], ""]


def diversity_markdown(d: dict) -> list[str]:
    """The diversity rows and the z_x probe of svq_fast/eval/diversity.py."""
    lines = [
        f"## One map, many images ({d['draws_per_map']} draws for each of the first {d['maps']} held-out maps)",
        "",
        f"Spread: mean pairwise distance between the draws of one map (pixel L1 in [0, 1]; L2 of segmenter "
        f"features; diversity-LPIPS), and its ratio to the real re-renders' (the same layout with fresh textures: "
        f"{d['rerenders']}). FSD to re-renders: all draws against all re-renders of the same maps (coverage). Colour "
        f"to reference / to re-renders: per class, the draws' mean colour against the real image of the map, and "
        f"against a re-render of it (L2 in [0, 1] RGB); copy ratio: the first over the second, ~1 for draws "
        f"independent of the reference, below 1 for draws that copy its appearance. The decode rows use z_s of kind "
        f"{d['decode_rows_condition']!r}.",
        "",
        "| images | maps | pixel L1 | ratio | feature L2 | ratio | LPIPS | ratio | FSD to re-renders | colour to "
        "reference | to re-renders | copy ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lpips = "n/a" if isinstance(r["lpips"], str) else _fmt(r["lpips"], 3)
        lpips_ratio = "n/a" if isinstance(r["lpips_ratio"], str) else _fmt(r["lpips_ratio"], 2)
        cells = [r["images"], str(r["maps"]), _fmt(r["pixel_l1"], 3), _ratio(r["pixel_ratio"]),
                 _fmt(r["feature_l2"], 3), _ratio(r["feature_ratio"]), lpips, lpips_ratio,
                 _fmt(r["fsd_to_rerenders"], 3), _fmt(r["colour_distance_to_reference"], 3),
                 _fmt(r.get("colour_distance_to_rerenders", "n/a"), 3),
                 _fmt(r.get("reference_copy_ratio", "n/a"), 2)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if d["rows"] and isinstance(d["rows"][0]["lpips"], str):
        lines += ["", f"LPIPS: {d['rows'][0]['lpips']}."]
    probe = d["zx_probe"]
    lines += [
        "",
        "z_x probe: decode(z_s of map A, z_x of scene B) on the pixels where A and B have the same class; is the "
        "decode's mean colour there closer to B's (the z_x source) than to A's? (a case: a class with >= 16 such "
        "pixels and A's and B's colours >= 0.1 apart)",
        "",
        "| z_s of A | cases | closer to B (z_x) | colour distance to B | to A | bar | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in probe.items():
        lines.append(
            f"| {kind} | {r['cases']} | {_fmt(r['share_following_zx'], 3)} | "
            f"{_fmt(r['colour_distance_to_zx_source'], 3)} | {_fmt(r['colour_distance_to_zs_source'], 3)} | "
            f"{r['bar']} | {_yes(r['met'])} |"
        )
    return [*lines, ""]


def _ratio(v) -> str:
    return "n/a" if isinstance(v, str) else f"{v:.2f}x"


def _yes(v) -> str:
    return v if isinstance(v, str) else ("yes" if v else "no")


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
