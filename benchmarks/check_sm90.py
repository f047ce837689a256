"""Static Hopper check without a GPU: compile every Triton kernel x default config x dtype for sm_90a with the GPU
machine's triton (3.6.0) and report registers, spills, shared memory and which tensor-core / async-copy paths the
code uses.

    python benchmarks/check_sm90.py                     # writes benchmarks/results/sm90_static.md, exit 1 on a failure
    python benchmarks/check_sm90.py --candidates        # also the SVQ_FAST_AUTOTUNE=1 candidates (report only)
    python benchmarks/check_sm90.py --only vq,attention --json out.json

How: triton==3.6.0 is fetched with `pip download --no-deps` into a cache folder (default
~/.cache/svq_fast/triton-3.6.0, never into the environment) and unpacked; a child process imports it first on
PYTHONPATH. The child calls the real launchers of svq_fast/kernels/*.py on CPU tensors with JITFunction.run
replaced by a recorder, so every launch is captured with its actual arguments; the recorder then runs triton's own
binder and _pack_args (the run-time specialisation: 16-byte-aligned pointers and sizes divisible by 16 tagged
tt.divisibility, integer 1 turned constexpr) and triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)).
Registers and spills come from the wheel's ptxas (`ptxas -v --gpu-name=sm_90a`), shared memory from
metadata.shared, wgmma / cp.async / TMA from the PTX and the SASS (cuobjdump).

A default config fails when it needs > 227 KiB of shared memory (the sm_90 per-block limit: launch fails) or spills
any bytes. Candidates are reported, never failed on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRITON_VERSION = "3.6.0"
SMEM_LIMIT = 227 * 1024  # bytes: sm_90's max dynamic shared memory per block
DEFAULT_CACHE = Path(os.environ.get("SVQ_FAST_TRITON36_DIR", Path.home() / ".cache/svq_fast/triton-3.6.0"))
DEFAULT_MD = ROOT / "benchmarks/results/sm90_static.md"


class FetchError(RuntimeError):
    """triton 3.6.0 could not be downloaded / unpacked (no network, no wheel for this Python)."""


# ---------------------------------------------------------------------------------------------------- fetch


def ensure_triton(dest: Path = DEFAULT_CACHE) -> Path:
    """dest holding an unpacked triton==3.6.0 wheel for this interpreter (downloaded once)."""
    if (dest / "triton/__init__.py").exists() and (dest / "triton/backends/nvidia/bin/ptxas").exists():
        return dest
    wheels = dest.parent / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           f"triton=={TRITON_VERSION}", "-d", str(wheels)]  # fmt: skip
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"pip download triton=={TRITON_VERSION} failed: {e}") from e
    found = sorted(wheels.glob(f"triton-{TRITON_VERSION}-*.whl"))
    if r.returncode != 0 or not found:
        raise FetchError(f"pip download triton=={TRITON_VERSION} failed: {(r.stderr or r.stdout)[-400:]}")
    tmp = dest.with_name(dest.name + ".partial")
    with zipfile.ZipFile(found[-1]) as zf:
        zf.extractall(tmp)
    for tool in (tmp / "triton/backends/nvidia/bin").glob("*"):
        tool.chmod(0o755)  # zipfile drops the executable bits
    tmp.rename(dest)
    return dest


# ---------------------------------------------------------------------------------------------------- child

_CANDIDATE = [False]  # set while the autotune candidates are launched: their rows are report-only


@contextlib.contextmanager
def candidate():
    _CANDIDATE[0] = True
    try:
        yield
    finally:
        _CANDIDATE[0] = False


def _cases(only: set[str], candidates: bool):
    """(op, label, launch) triples; launch() calls the real launchers on CPU tensors. Shapes are the paper's (so
    the divisibility specialisation is the one training sees) but small where the size does not change the code."""
    import torch

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    out = []
    if "vq" in only:
        import svq_fast.kernels.vq as V

        for name, dt in dtypes.items():
            precisions = ("tf32x3", "ieee", "tf32") if dt == torch.float32 else (None,)
            for prec in precisions:
                for d in (8, 64, 256):
                    n, k = 8192, 16384
                    lab = f"{name}{'-' + prec if prec else ''} N={n} K={k} D={d}"

                    def launch(n=n, k=k, d=d, dt=dt, prec=prec):
                        z, e = torch.randn(n, d).to(dt), torch.randn(k, d).to(dt)
                        with V.fp32_precision(prec):
                            V._triton_forward(z, e, split=1)
                        if candidates:
                            with candidate(), V.fp32_precision(prec):
                                for cfg in V.argmin_candidates(d, dt):
                                    V._triton_forward(z, e, config=cfg, split=1)

                    out.append(("vq", lab, launch))
                if prec not in (None, "tf32x3"):
                    continue

                def launch_bwd(dt=dt):
                    n, k, d = 8192, 16384, 256
                    z, e = torch.randn(n, d).to(dt), torch.randn(k, d).to(dt)
                    idx, coef = torch.randint(0, k, (n,)), torch.ones(1)
                    V._triton_grad_z(z, z, e, idx, coef)
                    V._triton_grad_e(z, e, idx, coef, deterministic=True)
                    V._triton_grad_e(z, e, idx, coef, deterministic=False)

                out.append(("vq", f"{name} backward N=8192 K=16384 D=256", launch_bwd))
    if "attention" in only:
        import svq_fast.kernels.attention as A

        for name in ("fp16", "bf16"):
            for d in (64, 128):
                # causal and prefix compile to one binary (the mask is a run-time argument); a prefix of 257
                # is not divisible by 16 and so is a second specialisation
                for mask, prefix in (("causal", 0), ("prefix", 257)):
                    b, h, t = 2, 8, 1024

                    def launch(dt=dtypes[name], d=d, prefix=prefix, b=b, h=h, t=t):
                        q, k, v = (torch.randn(b, h, t, d).to(dt) for _ in range(3))
                        o, lse = A._fwd(q, k, v, prefix, d**-0.5, None)
                        A._bwd(o, q, k, v, o, lse, prefix, d**-0.5, None)
                        if candidates:
                            with candidate():
                                for blocks in A.candidate_blocks(d):
                                    o, lse = A._fwd(q, k, v, prefix, d**-0.5, blocks)
                                    A._bwd(o, q, k, v, o, lse, prefix, d**-0.5, blocks)

                    out.append(("attention", f"{name} d={d} {mask} B={b} H={h} T={t}", launch))
    if "semantic_conv" in only:
        import svq_fast.kernels.semantic_conv as S

        for name, dt in dtypes.items():
            for cout in (64, 128):

                def launch(dt=dt, cout=cout):
                    b, h, w, c = 2, 256, 256, 243
                    labels = torch.randint(0, c, (b, h, w))
                    weight = torch.randn(cout, c, 3, 3).to(dt)
                    out_ = S._triton_forward(labels, weight, torch.randn(cout).to(dt), 255)
                    g = torch.randn_like(out_)
                    S._triton_grad_weight(labels, g, weight, 255, deterministic=True)
                    S._triton_grad_weight(labels, g, weight, 255, deterministic=False)

                out.append(("semantic_conv", f"{name} Cout={cout} C=243 k=3 256x256", launch))
    if "cross_entropy" in only:
        import svq_fast.kernels.cross_entropy as C

        def launch_ce():
            logits = torch.randn(64, 16384 + 256)  # (R, V) fp32: the kernel always sees fp32 logits
            C._loss_grad_triton(logits, torch.randint(0, 16384, (64,)), -100)

        out.append(("cross_entropy", "fp32 logits V=16640", launch_ce))
    return out


def _ptxas_stats(ptx: str, bin_dir: Path) -> dict:
    """Registers / spills from `ptxas -v --gpu-name=sm_90a`; wgmma / mma / cp.async / TMA from PTX + SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        r = subprocess.run([str(bin_dir / "ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(cubin)],
                           capture_output=True, text=True)  # fmt: skip
        log = r.stdout + r.stderr
        if r.returncode != 0:
            raise RuntimeError(f"ptxas failed: {log[-800:]}")
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    stack = re.search(r"(\d+) bytes stack frame", log)
    if "wgmma.mma_async" in ptx or "HGMMA" in sass:
        mma = "wgmma"
    elif "mma.sync" in ptx or re.search(r"\bHMMA\b", sass):
        mma = "mma.sync"
    else:
        mma = "none"  # no tensor-core instruction (elementwise kernels; fp32 'ieee' dots run as FFMA)
    return {
        "regs": int(regs.group(1)) if regs else None,
        "spill_bytes": max(spill) if spill else 0,  # stores and loads: report the larger
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "mma": mma,
        "cp_async": "cp.async" in ptx or "LDGSTS" in sass,
        "tma": "cp.async.bulk.tensor" in ptx or "UTMALDG" in sass,
    }


def child(args) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if triton.__version__ != TRITON_VERSION:
        print(f"error: imported triton {triton.__version__} from {triton.__file__}, want {TRITON_VERSION}")
        return 3
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bin_dir = Path(triton.__file__).parent / "backends/nvidia/bin"
    launches: list = []

    def record(self, *a, grid, warmup, **kw):  # replaces JITFunction.run: nothing runs, the launch is kept
        launches.append((self, a, kw, _CANDIDATE[0]))
        return None

    JITFunction.run = record
    rows, seen = [], set()
    for op, label, launch in _cases(set(args.only), args.candidates):
        launches.clear()
        launch()
        for fn, a, kw, cand in launches:
            kw = dict(kw, debug=False)
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            bound, spec, opts = binder(*a, **kw)
            options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
            consts = {fn.arg_names[p[0]]: v for p, v in constexprs.items()}
            ptr_types = sorted({v for v in signature.values() if v.startswith("*")})
            key = (fn.__name__, str(sorted(consts.items())), str(signature), str(sorted(attrs.items())),
                   options.num_warps, options.num_stages)  # fmt: skip
            if key in seen:
                continue
            seen.add(key)
            row = {"op": op, "case": label, "kernel": fn.__name__, "ptr_types": ",".join(ptr_types),
                   "constexprs": {k: v for k, v in consts.items() if isinstance(v, (int, str, bool, type(None)))},
                   "num_warps": options.num_warps, "num_stages": options.num_stages, "default": not cand}  # fmt: skip
            try:
                k = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=target,
                                   options=options.__dict__)  # fmt: skip
                row["shared_bytes"] = int(k.metadata.shared)
                row.update(_ptxas_stats(k.asm["ptx"], bin_dir))
            except Exception as e:  # noqa: BLE001 - reported per kernel
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(_line(row), flush=True)
    Path(args.child).write_text(json.dumps(rows, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------- report


def _cfg(r) -> str:
    c = r["constexprs"]
    blocks = " ".join(f"{k[6:]}{c[k]}" for k in sorted(c) if k.startswith("BLOCK_"))  # e.g. D64 K128 N128
    return f"{blocks} w{r['num_warps']} s{r['num_stages']}"


def _failures(r) -> list[str]:
    why = []
    if "error" in r:
        why.append(r["error"])
    else:
        if r["shared_bytes"] > SMEM_LIMIT:
            why.append(f"shared {r['shared_bytes'] / 1024:.0f} KiB > 227 KiB")
        if r["spill_bytes"]:
            why.append(f"spills {r['spill_bytes']} B")
    return why


def _line(r) -> str:
    if "error" in r:
        return f"{r['kernel']:28s} {r['case']:40s} {_cfg(r):22s} ERROR {r['error'][:120]}"
    return (f"{r['kernel']:28s} {r['case']:40s} {_cfg(r):22s} regs {r['regs']:>3} spill {r['spill_bytes']:>5} "
            f"smem {r['shared_bytes'] / 1024:6.1f}K {r['mma']:8s} cp.async={int(r['cp_async'])} "
            f"tma={int(r['tma'])}")  # fmt: skip


def markdown(rows: list[dict], cmd: str) -> str:
    bad = [r for r in rows if r["default"] and _failures(r)]
    lines = [
        "# sm_90a static check (no GPU)",
        "",
        f"`{cmd}` with triton {TRITON_VERSION} (pip download, unpacked in a cache folder), its bundled ptxas "
        "(`ptxas -v --gpu-name=sm_90a`) for registers and spills, `metadata.shared` for shared memory, "
        "wgmma / cp.async / TMA read from the PTX and the SASS. Run-time specialisation: the real launchers were "
        "called and their launches captured. Limit: 227 KiB shared memory per block, 0 spill bytes.",
        "",
        f"Default configs: {sum(r['default'] for r in rows)} compiled, {len(bad)} failing.",
        "",
        "| op | case | kernel | ptr dtypes | config | default | regs | spill B | smem KiB | mma | cp.async | TMA "
        "| ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fail = "; ".join(_failures(r))
        if "error" in r:
            cells = ["-"] * 6
        else:
            cells = [str(r["regs"]), str(r["spill_bytes"]), f"{r['shared_bytes'] / 1024:.1f}", r["mma"],
                     "yes" if r["cp_async"] else "no", "yes" if r["tma"] else "no"]  # fmt: skip
        ok = ("FAIL: " if r["default"] else "(candidate) ") + fail if fail else "ok"
        lines.append(f"| {r['op']} | {r['case']} | {r['kernel']} | {r['ptr_types']} | {_cfg(r)} | "
                     f"{'yes' if r['default'] else 'no'} | " + " | ".join(cells) + f" | {ok} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="vq,attention,semantic_conv,cross_entropy")
    p.add_argument("--candidates", action="store_true", help="also compile the SVQ_FAST_AUTOTUNE=1 candidates")
    p.add_argument("--triton-dir", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--md", type=Path, default=DEFAULT_MD, help="markdown report ('' to skip)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: compile, write rows as JSON here
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    if args.child:
        return child(args)
    try:
        tdir = ensure_triton(args.triton_dir)
    except FetchError as e:
        print(f"skip: {e}", file=sys.stderr)
        return 4
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SVQ_FAST_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(tdir), str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        env["TRITON_CACHE_DIR"] = str(Path(tmp, "cache"))  # a fresh cache: every kernel really compiles
        out = Path(tmp, "rows.json")
        cmd = [sys.executable, __file__, "--child", str(out), "--only", ",".join(args.only)]
        cmd += ["--candidates"] if args.candidates else []
        r = subprocess.run(cmd, env=env, cwd=ROOT)
        if r.returncode != 0 or not out.exists():
            print(f"error: the compile process exited with {r.returncode}", file=sys.stderr)
            return 2
        rows = json.loads(out.read_text())
    shown = " ".join(["python benchmarks/check_sm90.py", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if str(args.md):
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown(rows, shown.strip()))
    bad = [r for r in rows if r["default"] and _failures(r)]
    for r in bad:
        print(f"FAIL {r['kernel']} {r['case']} {_cfg(r)}: {'; '.join(_failures(r))}", file=sys.stderr)
    print(f"{len(rows)} kernels compiled for sm_90a, {len(bad)} default configs failing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
