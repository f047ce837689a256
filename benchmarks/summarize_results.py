"""The ratio table of a gpu_suite.sh run: every ratio against its baseline measured in the same run.

    python benchmarks/summarize_results.py OUT --write        # also writes OUT/summary.md and OUT/summary.json
    python benchmarks/summarize_results.py OUT --table-only   # print the compact table (the suite's last output)

Reads OUT/rows.jsonl (rows appended by the benchmarks as measured), OUT/device.json and OUT/pytest-gpu.xml.
Ratios are speedups (baseline time / time, > 1 = faster) unless named `t/gemm` (time / bare GEMM time).
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# (what, target) from DESIGN.md and benchmarks/README.md
TARGETS = {
    "vq triton vs ref": ">= 4x (bf16)",
    "vq triton t/gemm": "<= 1.5 (bf16)",
    "attention triton vs best sdpa": ">= 0.9x fwd+bwd causal",
    "attention triton vs sdpa masked": ">= 2x prefix",
}


def load_rows(folder: Path) -> list[dict]:
    path = folder / "rows.jsonl"
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return rows


def pytest_counts(folder: Path) -> dict | None:
    path = folder / "pytest-gpu.xml"
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return {"error": "unreadable junit file"}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    return {k: int(suite.get(k, 0)) for k in keys} if suite is not None else None


def ratios(rows: list[dict]) -> list[dict]:
    """One dict per ratio: {what, case, ratio, baseline, target}."""
    out = []
    vq = [r for r in rows if r.get("bench") == "vq"]
    idx = {(r["dtype"], r["N"], r["K"], r["D"], r["mode"], r["provider"]): r for r in vq}
    for r in vq:
        if r["provider"] != "triton":
            continue
        key = (r["dtype"], r["N"], r["K"], r["D"], r["mode"])
        case = f"{r['dtype']} {r['N']}x{r['K']}x{r['D']} {r['mode']}"
        for base, what in (("ref", "vq triton vs ref"), ("vqp", "vq triton vs vqp")):
            b = idx.get((*key, base))
            if b:
                out.append(dict(what=what, case=case, ratio=b["ms_median"] / r["ms_median"], baseline=base))
        g = idx.get((*key, "gemm"))
        if g and r["mode"] == "forward":
            out.append(dict(what="vq triton t/gemm", case=case, ratio=r["ms_median"] / g["ms_median"], baseline="gemm"))
    for r in rows:
        if r.get("bench") == "attention" and r["provider"] == "triton" and r.get("vs_sdpa"):
            what = "attention triton vs best sdpa" if r["mask"] == "causal" else "attention triton vs sdpa masked"
            case = f"{r['dtype']} {r['B']},{r['H']},{r['T']},{r['d']} {r['mask']} {r['mode']}"
            out.append(dict(what=what, case=case, ratio=r["vs_sdpa"], baseline=r["best_sdpa"]))
        if r.get("bench") == "ops" and r["provider"] != r.get("baseline"):
            case = f"{r['dtype']} {r['shape']} {r['mode']}"
            out.append(dict(what=f"{r['op']} {r['provider']} vs ref", case=case, ratio=r["vs_base"], baseline="ref"))
    train = [r for r in rows if r.get("bench") == "train"]
    for recipe, unit in (("stage1", "images_per_s"), ("stage2", "tokens_per_s")):
        stack = [r for r in train if r["recipe"] == recipe and r["variant"] == "fused"]
        eager = [r for r in train if r["recipe"] == recipe and r["variant"] == "eager"]
        if stack and eager:
            s, e = stack[-1], eager[-1]
            case = f"{s['config']} {unit} {s[unit]:.1f} vs {e[unit]:.1f} (stop: {s.get('stop_reason', '?')}); "
            case += f"MFU {s['mfu']:.3f} vs {e['mfu']:.3f} of {s.get('mfu_peak', '?')}"
            out.append(
                dict(what=f"train {recipe} stack vs eager", case=case, ratio=s[unit] / e[unit], baseline="eager")
            )
    sampling = [r for r in rows if r.get("bench") == "sampling" and "images_per_s" in r]
    for r in sampling:
        if r["mode"] != "cuda-graph":
            continue
        base = next((b for b in sampling if b["mode"] == "static" and b["batch"] == r["batch"]), None)
        if base:
            case = f"batch {r['batch']} CFG {r.get('guidance')}: {r['images_per_s']:.2f} vs {base['images_per_s']:.2f}"
            ratio = r["images_per_s"] / base["images_per_s"]
            out.append(dict(what="sampling cuda-graph vs static", case=case + " images/s", ratio=ratio,
                            baseline="static cache"))  # fmt: skip
    for o in out:
        o["target"] = TARGETS.get(o["what"], "")
    return out


def table(folder: Path) -> tuple[str, dict]:
    rows = load_rows(folder)
    dev_path = folder / "device.json"
    dev = json.loads(dev_path.read_text()) if dev_path.exists() else {}
    steps = [r for r in rows if r.get("bench") == "suite"]
    rat = ratios(rows)
    tests = pytest_counts(folder)
    plan = next((r for r in rows if r.get("step") == "pytest-gpu-plan"), None)
    not_run = len(plan["not_run"]) if plan else "?"
    lines = [
        f"device: {dev.get('device')}  driver: {dev.get('driver')}  torch: {dev.get('torch')}  "
        f"triton: {dev.get('triton')}  python: {dev.get('python')}",
        "steps: " + ", ".join(f"{s['step']} {s['status']} {s.get('seconds', 0)}s" for s in steps if "status" in s),
        f"pytest -m gpu: {tests}; not run (outside benchmarks/gpu_core_tests.txt): {not_run}",
        f"{'ratio':34s} {'case':58s} {'x':>7s}  {'vs':14s} target",
    ]
    for r in rat:
        lines.append(
            f"{r['what']:34s} {r['case'][:58]:58s} {r['ratio']:7.2f}  {r['baseline'] or '-':14s} {r['target']}"
        )
    if not rat:
        lines.append("(no ratios: no benchmark rows with both a provider and its baseline)")
    summary = {"device": dev, "steps": steps, "pytest": tests, "ratios": rat, "n_rows": len(rows)}
    return "\n".join(lines), summary


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    folder = Path(args[0] if args else "benchmarks/results")
    text, summary = table(folder)
    if "--write" in argv:
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (folder / "summary.md").write_text(f"# gpu_suite summary\n\n```\n{text}\n```\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
