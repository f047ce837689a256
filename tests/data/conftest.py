"""Fixture trees in each dataset's real on-disk layout, built with PIL, with bad files planted on request."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from svq_fast.data.shards import INDEX_NAME, encode_png, sample_members, write_tar

W, H = 40, 30  # fixture image size (width, height): landscape, so the crop has something to choose


def _save_image(path: str, rng: np.random.Generator, size=(W, H), fmt=None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


def _save_label(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr.astype(np.uint8), mode="L").save(path)


def halves(left: int, right: int, size=(W, H)) -> np.ndarray:
    """A label map whose left half is `left` and right half `right`."""
    arr = np.full((size[1], size[0]), right, np.uint8)
    arr[:, : size[0] // 2] = left
    return arr


# where each dataset puts image and label of file id `fid` in `split`, and what valid raw values look like
LAYOUTS = {
    "ade20k": dict(
        image=lambda root, split, fid: (
            f"{root}/ADEChallengeData2016/images/{ {'train': 'training', 'val': 'validation'}[split] }/{fid}.jpg"
        ),
        label=lambda root, split, fid: (
            f"{root}/ADEChallengeData2016/annotations/{ {'train': 'training', 'val': 'validation'}[split] }/{fid}.png"
        ),
        fid=lambda i: f"ADE_train_{i:08d}",
        valid=np.arange(1, 151),  # 0 = other -> ignore
        unlabeled=0,
        unknown=200,
        car=21,
        sky=3,
    ),
    "cityscapes": dict(
        image=lambda root, split, fid: f"{root}/leftImg8bit/{split}/aachen/{fid}_leftImg8bit.png",
        label=lambda root, split, fid: f"{root}/gtFine/{split}/aachen/{fid}_gtFine_labelIds.png",
        fid=lambda i: f"aachen_{i:06d}_000019",
        valid=np.array([7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]),
        unlabeled=1,  # ego vehicle: void -> ignore
        unknown=40,
        car=26,
        sky=23,
    ),
    "cocostuff": dict(
        image=lambda root, split, fid: f"{root}/images/{split}2017/{fid}.jpg",
        label=lambda root, split, fid: f"{root}/annotations/{split}2017/{fid}.png",
        fid=lambda i: f"{i:012d}",
        valid=np.arange(0, 182),  # png value = id - 1
        unlabeled=255,
        unknown=200,
        car=2,  # COCO id 3 (car) is stored as 2
        sky=156,  # COCO id 157 (sky-other)
    ),
    "folder": dict(
        image=lambda root, split, fid: f"{root}/images/{fid}.png",
        label=lambda root, split, fid: f"{root}/labels/{fid}.png",
        fid=lambda i: f"img{i:04d}",
        valid=np.arange(0, 240),
        unlabeled=255,
        unknown=250,  # unified ids stop at 244
        car=20,
        sky=2,
    ),
}

BAD_KINDS = ("corrupt_png", "corrupt_image", "size_mismatch", "unknown_id", "all_unlabeled", "missing_label")
BAD_REASON = {
    "corrupt_png": "unreadable label",
    "corrupt_image": "unreadable image",
    "size_mismatch": "size mismatch",
    "unknown_id": "unknown to the",
    "all_unlabeled": "empty label map",
    "missing_label": "missing label file",
}


def build_tree(root: str, dataset: str, split: str, n_good: int, bad: tuple = (), seed: int = 0) -> dict:
    """Write n_good valid samples (the first one a car|sky map) and one sample per bad kind.
    Returns {"good": [ids], "bad": {kind: id}}."""
    lay = LAYOUTS[dataset]
    rng = np.random.default_rng(seed)
    out = {"good": [], "bad": {}}
    fmt = "PNG" if dataset in ("cityscapes", "folder") else "JPEG"
    for i in range(n_good):
        fid = lay["fid"](i)
        _save_image(lay["image"](root, split, fid), rng, fmt=fmt)
        if i == 0:
            arr = halves(lay["car"], lay["sky"])
        else:
            arr = rng.choice(lay["valid"], size=(H, W)).astype(np.uint8)
            arr[:3] = lay["unlabeled"]  # some unlabeled pixels in a valid map are fine
        _save_label(lay["label"](root, split, fid), arr)
        out["good"].append(fid)
    for j, kind in enumerate(bad):
        fid = lay["fid"](1000 + j)
        img, lbl = lay["image"](root, split, fid), lay["label"](root, split, fid)
        _save_image(img, rng, fmt=fmt)
        arr = rng.choice(lay["valid"], size=(H, W)).astype(np.uint8)
        if kind == "corrupt_png":
            _save_label(lbl, arr)
            with open(lbl, "r+b") as f:  # keep the PNG signature, destroy the chunks after it
                f.seek(16)
                f.write(b"\x00garbage" * 8)
        elif kind == "corrupt_image":
            _save_label(lbl, arr)
            with open(img, "wb") as f:
                f.write(b"this is not an image")
        elif kind == "size_mismatch":
            _save_label(lbl, arr[:20, :25])
        elif kind == "unknown_id":
            arr[5, 5] = lay["unknown"]
            _save_label(lbl, arr)
        elif kind == "all_unlabeled":
            _save_label(lbl, np.full((H, W), lay["unlabeled"], np.uint8))
        elif kind == "missing_label":
            pass
        else:
            raise ValueError(kind)
        out["bad"][kind] = fid
    return out


def write_shard_dir(root: str, counts: list[int], size: int = 16, index: bool = True) -> list[str]:
    """Shards of tiny PNG samples with known content: sample (k, i) has key s{k}_{i}; its label is the column
    index x (0..size-1) and the image's red channel is 16 * x, the green channel encodes the sample number.
    Returns the shard paths."""
    os.makedirs(root, exist_ok=True)
    label = np.tile(np.arange(size, dtype=np.uint8), (size, 1))
    paths, entries, n = [], [], 0
    for k, c in enumerate(counts):
        members = []
        for i in range(c):
            image = np.zeros((size, size, 3), np.uint8)
            image[..., 0] = label * (256 // size)
            image[..., 1] = n % 256
            members += sample_members(f"s{k}_{i}", encode_png(image), encode_png(label), {"n": n}, "png")
            n += 1
        name = f"part-{k:06d}.tar"
        write_tar(os.path.join(root, name), members)
        paths.append(os.path.join(root, name))
        entries.append({"name": name, "samples": c})
    if index:
        with open(os.path.join(root, INDEX_NAME), "w") as f:
            json.dump({"shards": entries, "num_samples": sum(counts)}, f)
    return paths


@pytest.fixture
def fx():
    """The builders and constants above, for tests (conftest modules are not importable by name)."""
    return SimpleNamespace(
        build_tree=build_tree,
        write_shard_dir=write_shard_dir,
        halves=halves,
        LAYOUTS=LAYOUTS,
        BAD_KINDS=BAD_KINDS,
        BAD_REASON=BAD_REASON,
        W=W,
        H=H,
        serve_dir=serve_dir,
    )


class _ShardHandler(http.server.BaseHTTPRequestHandler):
    """Serves files under server.root; server.faults[name] makes one file fail:
    ("404",), ("cut", n): send the full Content-Length but close after n bytes, ("stall", n): send n bytes then
    nothing until the server stops (at most 60 s), ("flaky", k, n): cut after n bytes on the first k requests."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        name = os.path.basename(self.path.split("?")[0])
        server = self.server
        with server.lock:
            server.requests[name] = server.requests.get(name, 0) + 1
            nth = server.requests[name]
        path = os.path.join(server.root, name)
        fault = server.faults.get(name)
        if fault is not None and fault[0] == "flaky":
            fault = ("cut", fault[2]) if nth <= fault[1] else None
        if (fault is not None and fault[0] == "404") or not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        with open(path, "rb") as f:
            data = f.read()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if fault is None:
                self.wfile.write(data)
            elif fault[0] == "cut":
                self.wfile.write(data[: fault[1]])
                self.wfile.flush()
                self.close_connection = True
            elif fault[0] == "stall":
                self.wfile.write(data[: fault[1]])
                self.wfile.flush()
                server.stopping.wait(60)
        except (BrokenPipeError, ConnectionResetError):
            pass


@contextlib.contextmanager
def serve_dir(root: str, faults: dict | None = None):
    """An HTTP server on 127.0.0.1 (a free port) serving `root` in a thread; yields the server (its base URL is
    server.url). Stops (and releases stalled requests) on exit."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ShardHandler)
    server.daemon_threads = True
    server.root, server.faults, server.requests = root, dict(faults or {}), {}
    server.lock, server.stopping = threading.Lock(), threading.Event()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
