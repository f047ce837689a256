"""Convert listed samples into balanced, resumable WebDataset shards (the engine behind `make_shards`).

Per sample, in worker processes: load image + raw label map, remap the label through the dataset's LUT, reject
bad input (unreadable file, missing label, image/label size mismatch, label ids unknown to the dataset's table,
all-ignore map), resize the shorter side to `size` (bicubic image, nearest label), crop to size x size
(random for train, deterministic per (seed, file id); center otherwise), encode (image.jpg|png, label.png,
meta.json). The main process writes the shards.

Shard assignment is fixed before any work: items are shuffled with `seed` (so a shard is a random subset, not
one city or one scene type) and dealt into n = ceil(N / samples_per_shard) contiguous runs whose lengths
differ by at most one (balanced: same sample count, and same pixel count since all samples are size x size).
A finished shard has its tar and `manifests/<shard>.json`, whose fingerprint hashes the conversion settings
and the shard's file ids (and which records the tar's size); a rerun skips shards whose manifest matches and
whose tar has that size, and redoes the rest, so an interrupted
run resumes where it stopped and its result is byte-identical to an uninterrupted one.

Outputs: the shards, `index.json` (shard names and sample counts, class histogram, settings), and
`rejects.jsonl` (one line per rejected input: file, label file, id, reason, shard). If more than
`max_reject_fraction` of the inputs are rejected, `TooManyRejects` is raised and no index.json is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import re
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

from svq_fast.data import labels
from svq_fast.data.shards import INDEX_NAME, encode_jpg, encode_png, sample_members, write_tar
from svq_fast.data.sources import Reject

REJECTS_NAME = "rejects.jsonl"
MANIFEST_DIR = "manifests"


class TooManyRejects(RuntimeError):
    """More than the allowed fraction of inputs was rejected; the message names the count and rejects file."""


@dataclass(frozen=True, kw_only=True)
class ConvertSpec:
    dataset: str  # recorded in meta.json and index.json
    split: str
    label_table: str  # svq_fast.data.labels.lut name the raw maps go through
    label_space: str = "unified"  # the space of the written labels: unified | synthetic
    size: int = 256  # shorter side is resized to this, then a size x size crop; 0 keeps the original
    crop: str = "center"  # random | center
    seed: int = 0
    image_format: str = "jpg"
    jpeg_quality: int = 95
    samples_per_shard: int = 1000
    shuffle: bool = True  # shuffle items before dealing them into shards
    prefix: str = "shard"  # shard names: {prefix}-{NNNNNN}.tar
    key_prefix: str = ""  # sample keys: {key_prefix}{file id with . and / made _}


def sample_key(spec: ConvertSpec, item_id: str) -> str:
    return spec.key_prefix + re.sub(r"[^A-Za-z0-9_-]", "_", item_id)


def resize_crop(
    image: np.ndarray, label: np.ndarray, size: int, crop: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Shorter side -> size (image bicubic, label nearest), then a size x size crop (random or center).
    Returns (image, label, [top, left] of the crop in the resized image)."""
    if size <= 0:
        return image, label, [0, 0]
    h, w = label.shape
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
        label = np.asarray(Image.fromarray(label).resize((nw, nh), Image.NEAREST))
        h, w = nh, nw
    if crop == "random":
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    elif crop == "center":
        top, left = (h - size) // 2, (w - size) // 2
    else:
        raise ValueError(f"crop must be random or center, got {crop!r}")
    return image[top : top + size, left : left + size], label[top : top + size, left : left + size], [top, left]


def process_item(spec: ConvertSpec, item) -> dict:
    """Load, check, remap, resize/crop and encode one item. Returns {"ok": True, key, members, hist} or
    {"ok": False, reason}. `item` has `.id` and `.load() -> (image (H,W,3) uint8, raw label (H,W), meta)`."""
    try:
        image, raw, meta = item.load()
        label, unknown = labels.remap(raw, spec.label_table)
        if unknown:
            shown = ", ".join(map(str, unknown[:12])) + (", ..." if len(unknown) > 12 else "")
            raise Reject(f"label ids unknown to the {spec.label_table} table: {shown}")
        if not (label != labels.IGNORE).any():
            raise Reject("empty label map (all pixels ignore)")
        rng = np.random.default_rng([spec.seed, zlib.crc32(item.id.encode())])
        image, label, box = resize_crop(image, label, spec.size, spec.crop, rng)
        if not (label != labels.IGNORE).any():
            raise Reject("empty label map after the crop")
    except Reject as r:
        return {"ok": False, "reason": str(r)}
    except Exception as e:  # anything else about this one file is a reject too, never a crashed run
        return {"ok": False, "reason": f"failed to convert ({type(e).__name__}: {e})"}
    meta = {"dataset": spec.dataset, "split": spec.split, "id": item.id, **meta, "crop_top_left": box}
    image = np.ascontiguousarray(image)
    enc = encode_jpg(image, spec.jpeg_quality) if spec.image_format == "jpg" else encode_png(image)
    key = sample_key(spec, item.id)
    members = sample_members(key, enc, encode_png(np.ascontiguousarray(label)), meta, spec.image_format)
    return {"ok": True, "key": key, "members": members, "hist": np.bincount(label.ravel(), minlength=256)}


def _process_chunk(args) -> list[dict]:
    spec, items = args
    return [process_item(spec, it) for it in items]


def plan_shards(items: Sequence, spec: ConvertSpec) -> list[list[int]]:
    """Item indices of each shard: shuffled with spec.seed, dealt into balanced contiguous runs."""
    n = len(items)
    order = np.random.default_rng([spec.seed, 7]).permutation(n) if spec.shuffle else np.arange(n)
    n_shards = max(1, math.ceil(n / spec.samples_per_shard))
    return [order[k * n // n_shards : (k + 1) * n // n_shards].tolist() for k in range(n_shards)]


def _fingerprint(spec: ConvertSpec, ids: list[str]) -> str:
    blob = json.dumps({"spec": dataclasses.asdict(spec), "ids": ids}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()


def _read_manifest(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj, lines: bool = False) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        if lines:
            f.writelines(json.dumps(o) + "\n" for o in obj)
        else:
            json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _results(jobs: list, processes: int, chunk: int = 4) -> Iterator[dict]:
    """process_item over jobs [(spec, item)], in order, with a bounded number of chunks in flight."""
    chunks = [(jobs[i][0], [it for _, it in jobs[i : i + chunk]]) for i in range(0, len(jobs), chunk)]
    if processes <= 1:
        for c in chunks:
            yield from _process_chunk(c)
        return
    ctx = multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        pending: deque = deque()
        it = iter(chunks)
        for c in it:
            pending.append(pool.submit(_process_chunk, c))
            if len(pending) >= 4 * processes:
                break
        while pending:
            yield from pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(_process_chunk, nxt))


def convert(
    items: Sequence,
    out: str,
    spec: ConvertSpec,
    *,
    processes: int = 0,
    progress: bool = True,
    max_reject_fraction: float = 0.05,
    files_of: Callable[[object], dict] | None = None,
    index_extra: dict | None = None,
) -> dict:
    """Write shards of `items` to `out` (see the module docstring). Returns the index dict.
    files_of(item) -> {"file": ..., "label": ...} names an item in rejects.jsonl (default: its paths)."""
    if not items:
        raise ValueError(f"{spec.dataset} {spec.split}: no input samples found")
    os.makedirs(os.path.join(out, MANIFEST_DIR), exist_ok=True)
    files_of = files_of or (lambda it: {"file": getattr(it, "image", None), "label": getattr(it, "label", None)})
    plan = plan_shards(items, spec)
    names = [f"{spec.prefix}-{k:06d}.tar" for k in range(len(plan))]
    prints = [_fingerprint(spec, [items[i].id for i in idx]) for idx in plan]

    old = _read_manifest(os.path.join(out, INDEX_NAME))
    if old is not None:
        if (old.get("dataset"), old.get("split")) not in ((spec.dataset, spec.split), (None, None)):
            raise ValueError(
                f"{out} holds the shards of {old.get('dataset')} {old.get('split')}; "
                f"write {spec.dataset} {spec.split} to its own directory (one directory per split)"
            )
    # forget stale outputs: shards of this prefix outside the plan, an index of an earlier run
    planned = set(names)
    for f in os.listdir(out):
        if re.fullmatch(re.escape(spec.prefix) + r"-\d{6}\.tar(\.tmp)?", f) and f.removesuffix(".tmp") not in planned:
            os.remove(os.path.join(out, f))
            mpath = os.path.join(out, MANIFEST_DIR, f.removesuffix(".tmp") + ".json")
            if os.path.exists(mpath):
                os.remove(mpath)
    if old is not None:
        os.remove(os.path.join(out, INDEX_NAME))

    def manifest_path(k):
        return os.path.join(out, MANIFEST_DIR, names[k] + ".json")

    def complete(k):
        m = _read_manifest(manifest_path(k))
        path = os.path.join(out, names[k])
        return (
            m is not None
            and m.get("fingerprint") == prints[k]
            and os.path.exists(path)
            and os.path.getsize(path) == m.get("bytes")
        )

    todo = [k for k in range(len(plan)) if not complete(k)]
    done_before = len(plan) - len(todo)
    processes = processes or min(8, os.cpu_count() or 1)
    bar = tqdm(
        total=len(items),
        initial=sum(len(plan[k]) for k in range(len(plan)) if k not in set(todo)),
        disable=not progress,
        desc=f"{spec.dataset} {spec.split}",
        unit="img",
    )
    results = _results([(spec, items[i]) for k in todo for i in plan[k]], processes)
    for k in todo:
        hist = np.zeros(256, np.int64)
        rejects: list[dict] = []

        def members(k=k, hist=hist, rejects=rejects):
            for i in plan[k]:
                r = next(results)
                bar.update(1)
                if r["ok"]:
                    hist += r["hist"]
                    yield from r["members"]
                else:
                    rejects.append({**files_of(items[i]), "id": items[i].id, "reason": r["reason"], "shard": names[k]})

        n_members = write_tar(os.path.join(out, names[k]), members())
        manifest = {
            "name": names[k],
            "fingerprint": prints[k],
            "samples": n_members // 3,
            "bytes": os.path.getsize(os.path.join(out, names[k])),
            "inputs": len(plan[k]),
            "rejects": rejects,
            "class_histogram": {str(c): int(n) for c, n in enumerate(hist) if n},
        }
        _write_json(manifest_path(k), manifest)
    bar.close()

    manifests = [_read_manifest(manifest_path(k)) for k in range(len(plan))]
    all_rejects = [r for m in manifests for r in m["rejects"]]
    _write_json(os.path.join(out, REJECTS_NAME), all_rejects, lines=True)
    hist = np.zeros(256, np.int64)
    for m in manifests:
        for c, n in m["class_histogram"].items():
            hist[int(c)] += n
    space = labels.get_space(spec.label_space)
    index = {
        "format": "svq_fast.shards/1",
        "dataset": spec.dataset,
        "split": spec.split,
        "image_size": spec.size,
        "image_format": spec.image_format,
        "label_space": spec.label_space,
        "num_classes": space.num_classes,
        "class_names": list(space.names),
        "seed": spec.seed,
        "crop": spec.crop,
        "shards": [{"name": m["name"], "samples": m["samples"]} for m in manifests],
        "num_samples": sum(m["samples"] for m in manifests),
        "num_inputs": len(items),
        "num_rejected": len(all_rejects),
        "shards_reused": done_before,
        "class_histogram": {str(c): int(n) for c, n in enumerate(hist) if n},
        **(index_extra or {}),
    }
    n_rej = len(all_rejects)
    if n_rej > max_reject_fraction * len(items):
        raise TooManyRejects(
            f"{spec.dataset} {spec.split}: {n_rej} of {len(items)} inputs rejected "
            f"({n_rej / len(items):.1%} > --max-reject-fraction {max_reject_fraction:g}); "
            f"reasons are in {os.path.join(out, REJECTS_NAME)}. No index.json was written; the finished shards "
            "are kept, so a rerun (after fixing the data or raising the limit) only redoes what changed."
        )
    _write_json(os.path.join(out, INDEX_NAME), index)
    return index
