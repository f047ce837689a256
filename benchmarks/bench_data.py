"""Benchmark the data path on this machine: shard writing (images/s) and the streaming loader (samples/s).

    python benchmarks/bench_data.py                    # default sizes, ~1-2 minutes on 2 cores
    python benchmarks/bench_data.py --quick            # smaller counts, for a smoke run
    python benchmarks/bench_data.py --out results.json
    python benchmarks/bench_data.py --streams-only     # only the HTTP-vs-local loader comparison
    python benchmarks/bench_data.py --checks-only      # only the cost of the per-sample checks (sha256, ids)

Writers: `write_synthetic` (render + PNG encode) at 64 and 256 px, and the real-data converter on a generated
ADE20k-layout tree of 512x384 JPEG images with 8-bit maps (decode, LUT remap, checks, resize to 256, crop,
JPEG encode), each with 1 and 2 processes.
Loader: one full exact epoch per setting (first epoch includes worker start-up), batch 32, for num_workers
0, 1, 2, on the shards written above; samples/s = samples delivered / wall time.
Streams: the same epochs read over HTTP from a server on 127.0.0.1 (Python's http.server in a thread; the loader
streams through curl and WebDataset's tar iteration) against the local files, synthetic 64 and 256 px, for
num_workers 0 and 2; each pair is measured twice, interleaved, and the faster of each kept; printed as ratios.
Checks: the same loader epochs (synthetic 64 and 256 px png, num_workers 0) with the per-sample checks off
(`check_hashes=False`, no class range) and on (meta.json's sha256 of the image and label bytes verified, label
ids range-checked against the 16 synthetic classes), interleaved, 3 repeats, the faster of each kept; printed
as the ratio on / off.
Also prints the per-pixel colour baselines on the synthetic scenes (the difficulty check).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from device_info import cpu_name  # benchmarks/device_info.py (the script folder is on sys.path)
from PIL import Image

from svq_fast.data.loader import list_shards, make_loader
from svq_fast.data.make_shards import write_dataset, write_synthetic
from svq_fast.data.synthetic import NUM_CLASSES, SyntheticSpec, render_scene

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def fake_ade(root: str, n: int) -> None:
    img_dir = os.path.join(root, "ADEChallengeData2016", "images", "training")
    ann_dir = os.path.join(root, "ADEChallengeData2016", "annotations", "training")
    os.makedirs(img_dir)
    os.makedirs(ann_dir)
    spec = SyntheticSpec(size=512, seed=0)
    for i in range(n):
        img, lab = render_scene(spec, i)
        Image.fromarray(img[64:448]).save(os.path.join(img_dir, f"ADE_train_{i:08d}.jpg"), quality=90)
        Image.fromarray((lab[64:448] * 9 + 1).astype(np.uint8)).save(os.path.join(ann_dir, f"ADE_train_{i:08d}.png"))


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def bench_loader(
    shards: list[str], image_size: int, num_workers: int, batch: int = 32, checks: bool = False
) -> tuple[int, float]:
    ld = make_loader(
        shards,
        batch_size=batch,
        image_size=image_size,
        num_workers=num_workers,
        resampled=False,
        rank=0,
        world_size=1,
        shuffle_buffer=256,
        check_hashes=checks,
        num_classes=NUM_CLASSES if checks else None,
    )
    t = time.perf_counter()
    n = sum(b["image"].shape[0] for b in ld)
    return n, time.perf_counter() - t


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a loader that stops mid-shard closes its connection
        pass


@contextlib.contextmanager
def serve(root: str):
    """Base URL of an HTTP server on 127.0.0.1 serving `root` from a thread."""
    server = _Server(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def bench_streams(tmp: str, n64: int, n256: int) -> list[tuple]:
    """[(size, num_workers, local samples/s, http samples/s)] on freshly written synthetic shards."""
    out = []
    for size, n in ((64, n64), (256, n256)):
        root = os.path.join(tmp, f"streams{size}")
        write_synthetic(root, size=size, num_samples=n, samples_per_shard=250, processes=2, progress=False)
        local = list_shards(root)
        with serve(root) as url:
            remote = [f"{url}/{os.path.basename(p)}" for p in local]
            for nw in (0, 2):
                best = {"local": 0.0, "http": 0.0}
                for _ in range(2):
                    for kind, shards in (("local", local), ("http", remote)):
                        k, dt = bench_loader(shards, size, nw)
                        best[kind] = max(best[kind], k / dt)
                out.append((size, nw, best["local"], best["http"]))
                print(f"  {size}px num_workers={nw}: local {best['local']:.0f}/s, http {best['http']:.0f}/s")
    return out


def print_streams(rows: list[tuple]) -> None:
    print("\n| data | num_workers | local samples/s | http samples/s | http / local |")
    print("|---|---:|---:|---:|---:|")
    for size, nw, a, b in rows:
        print(f"| synthetic {size}px png | {nw} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")


def bench_checks(tmp: str, n64: int, n256: int, repeats: int = 3) -> list[tuple]:
    """[(size, samples/s without the checks, samples/s with them)] on freshly written synthetic shards."""
    out = []
    for size, n in ((64, n64), (256, n256)):
        root = os.path.join(tmp, f"checks{size}")
        write_synthetic(root, size=size, num_samples=n, samples_per_shard=250, processes=2, progress=False)
        shards = list_shards(root)
        best = {False: 0.0, True: 0.0}
        for _ in range(repeats):
            for checks in (False, True):
                k, dt = bench_loader(shards, size, 0, checks=checks)
                best[checks] = max(best[checks], k / dt)
        out.append((size, best[False], best[True]))
        print(f"  {size}px num_workers=0: checks off {best[False]:.0f}/s, on {best[True]:.0f}/s")
    return out


def print_checks(rows: list[tuple]) -> None:
    print("\n| data | num_workers | checks off samples/s | checks on samples/s | on / off |")
    print("|---|---:|---:|---:|---:|")
    for size, off, on in rows:
        print(f"| synthetic {size}px png | 0 | {off:.0f} | {on:.0f} | {on / off:.3f}x |")


def only_part(name: str, bench, show, tmp: str, n64: int, n256: int, out: str) -> int:
    """One part of the benchmark alone (--checks-only, --streams-only): measure, print its table, save {machine,
    name: rows} to `out` if given."""
    try:
        print(f"machine: {machine()}")
        rows = bench(tmp, n64, n256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    show(rows)
    if out:
        with open(out, "w") as f:
            json.dump({"machine": machine(), name: rows}, f, indent=1)
    return 0


def colour_baselines(n_train: int, n_val: int) -> tuple[float, float]:
    def pixels(offset, n):
        xs, ys = zip(*(render_scene(SyntheticSpec(size=64), offset + i) for i in range(n)))
        return np.concatenate([x.reshape(-1, 3) for x in xs]).astype(np.float32), np.concatenate(
            [y.ravel() for y in ys]
        )

    def miou(pred, y, c=NUM_CLASSES):
        cm = np.bincount(y.astype(np.int64) * c + pred, minlength=c * c).reshape(c, c)
        tp = np.diag(cm)
        present = cm.sum(1) > 0
        return float((tp / np.maximum(cm.sum(0) + cm.sum(1) - tp, 1))[present].mean())

    xtr, ytr = pixels(0, n_train)
    xva, yva = pixels(10_000_000, n_val)
    means = np.stack([xtr[ytr == k].mean(0) for k in range(NUM_CLASSES)])
    d = (xva**2).sum(1)[:, None] - 2 * xva @ means.T + (means**2).sum(1)[None]
    q = lambda x: ((x // 16).astype(np.int64) * [256, 16, 1]).sum(1)  # noqa: E731
    counts = np.zeros((4096, NUM_CLASSES))
    np.add.at(counts, (q(xtr), ytr), 1)
    return miou(d.argmin(1), yva), miou(counts.argmax(1)[q(xva)], yva)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="")
    p.add_argument("--streams-only", action="store_true", help="only the HTTP-vs-local loader rows")
    p.add_argument("--checks-only", action="store_true", help="only the per-sample check cost (sha256, ids)")
    args = p.parse_args(argv)
    n64, n256, nade = (400, 100, 40) if args.quick else (3000, 600, 300)
    rows = []
    tmp = tempfile.mkdtemp(prefix="bench_data_")
    if args.checks_only:
        return only_part("checks", bench_checks, print_checks, tmp, n64, n256, args.out)
    if args.streams_only:
        return only_part("streams", bench_streams, print_streams, tmp, n64, n256, args.out)
    try:
        print(f"machine: {machine()}")
        shards = {}
        for size, n in ((64, n64), (256, n256)):
            for procs in (1, 2):
                out = os.path.join(tmp, f"syn{size}_{procs}")
                _, dt = timed(
                    write_synthetic,
                    out,
                    size=size,
                    num_samples=n,
                    samples_per_shard=250,
                    processes=procs,
                    progress=False,
                )
                rows.append(("writer", f"synthetic {size}px png", f"processes={procs}", n, dt))
                shards[f"synthetic {size}px png"] = (list_shards(out), size)
        ade = os.path.join(tmp, "ade")
        fake_ade(ade, nade)
        for procs in (1, 2):
            out = os.path.join(tmp, f"ade_{procs}")
            _, dt = timed(
                write_dataset, "ade20k", ade, out, size=256, samples_per_shard=100, processes=procs, progress=False
            )
            rows.append(("writer", "ade20k layout 512x384 jpg -> 256 jpg", f"processes={procs}", nade, dt))
        shards["ade20k-converted 256px jpg"] = (list_shards(out), 256)
        for name, (sh, size) in shards.items():
            for nw in (0, 1, 2):
                n, dt = bench_loader(sh, size, nw)
                rows.append(("loader", name, f"num_workers={nw}", n, dt))
        streams = bench_streams(tmp, n64, n256)
        checks = bench_checks(tmp, n64, n256)
        nearest, lut = colour_baselines(300, 100)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print("\n| what | data | setting | items | seconds | items/s |")
    print("|---|---|---|---:|---:|---:|")
    for what, data, setting, n, dt in rows:
        print(f"| {what} | {data} | {setting} | {n} | {dt:.2f} | {n / dt:.0f} |")
    print_streams(streams)
    print_checks(checks)
    print(
        f"\nsynthetic 64px, 300 train / 100 val scenes: per-pixel nearest-mean colour mIoU {nearest:.3f}, "
        f"colour look-up (16^3 RGB bins) mIoU {lut:.3f}"
    )
    if args.out:
        with open(args.out, "w") as f:
            blob = {
                "machine": machine(),
                "rows": rows,
                "streams": streams,
                "checks": checks,
                "colour_baselines": [nearest, lut],
            }
            json.dump(blob, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
