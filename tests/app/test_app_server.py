"""The app's HTTP side on a real socket (uvicorn in a thread) over tiny untrained exports: a sample request gives what
the library's sampling path gives for the same map and seed, progress streams, requests queue without mixing
outputs, and bad input of every kind gets a 400 with a message while the server keeps serving."""

import base64
import dataclasses
import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="the app extra is not installed (pip install -e '.[app]')")
pytest.importorskip("uvicorn", reason="the app extra is not installed (pip install -e '.[app]')")

from svq_fast.app.maps import encode_grid, png_bytes, read_png  # noqa: E402
from svq_fast.app.server import AppState, bind, create_app  # noqa: E402
from svq_fast.app.synth import SampleSettings, Synthesizer  # noqa: E402
from svq_fast.eval.sampling import sample_images  # noqa: E402
from svq_fast.eval.visualize import to_unit  # noqa: E402
from svq_fast.export import export_model, read_export  # noqa: E402
from svq_fast.models.svq import SVQModel  # noqa: E402

pytestmark = pytest.mark.timeout(300)


class Server:
    def __init__(self, state: AppState):
        import uvicorn

        self.state = state
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def request(self, path, body=None, *, raw=None, headers=None):
        """-> (status, parsed JSON or bytes)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, content, ctype = r.status, r.read(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, content, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        return status, (json.loads(content) if "json" in ctype else content)

    def events(self, job):
        """Every server-sent event of a job until it finishes."""
        out = []
        with urllib.request.urlopen(f"{self.url}/api/jobs/{job}/events", timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    out.append(json.loads(line[6:]))
        return out

    def sample(self, label, **settings):
        status, body = self.request("/api/sample", {"map": encode_grid(label), "settings": settings})
        assert status == 200, body
        return body

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.state.jobs.close()


@pytest.fixture(scope="module")
def server(exports):
    srv = Server(AppState(exports["gpt"], device="cpu"))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def synth(exports):
    return Synthesizer(exports["gpt"], device="cpu")


def _scene(size, seed):
    rng = np.random.default_rng(seed)
    lab = np.full((size, size), 2, np.uint8)  # grass
    lab[: size // 3] = 0  # sky
    y, x = rng.integers(size // 3, size - 6, 2)
    lab[y : y + 6, x : x + 8] = 8  # a car
    lab[0, :4] = 255
    return lab


def _ids(server, url):
    status, content = server.request(url)
    assert status == 200
    return read_png(content)


def test_info_describes_the_model(server, exports):
    status, info = server.request("/api/info")
    assert status == 200 and info["error"] is None
    m = info["model"]
    assert m["size"] == exports["size"] and m["grid"] == 8
    assert m["palette"]["space"] == "synthetic" and m["palette"]["names"][:3] == ["sky-clear", "sky-cloudy", "grass"]
    assert m["defaults"]["top_k"] == 20 and m["limits"]["top_k"] == 64
    status, page = server.request("/")
    assert status == 200 and b'<canvas id="canvas"' in page and b"/static/app.js" in page
    for asset in ("app.js", "app.css"):
        assert server.request(f"/static/{asset}")[0] == 200
    assert b"http" not in server.request("/")[1].replace(b"http-equiv", b"")  # nothing from the network


def test_sample_is_the_library_sampling_path(server, synth):
    label = _scene(32, 0)
    job = server.sample(label, num_samples=3, seed=7, temperature=0.9, top_k=16, top_p=0.95, guidance_scale=1.5)
    final = server.events(job["job"])[-1]
    assert final["state"] == "done", final
    res = final["result"]
    assert len(res["samples"]) == 3 and res["settings"]["seed"] == 7
    got = np.stack([read_png(server.request(u)[1]) for u in res["samples"]])
    # the same request straight through the library: map-only z_s, then eval.sampling.sample_images
    sem = synth.semantic_tokens(label)
    gen = torch.Generator().manual_seed(7)
    images = sample_images(
        synth.gpt,
        synth.tokenizer,
        sem,
        samples_per_map=3,
        temperature=0.9,
        top_k=16,
        top_p=0.95,
        guidance_scale=1.5,
        generator=gen,
    )
    want = ((images + 1) / 2).clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, want)
    # the map the server received is the one sent; the understood map is the semantic decoder's reading of z_s
    assert np.array_equal(_ids(server, res["files"]["painted_ids.png"]), label)
    assert np.array_equal(_ids(server, res["files"]["understood_ids.png"]), synth.understood(sem))
    colours = _ids(server, res["files"]["understood_map.png"])
    assert colours.shape == (32, 32, 3)
    meta = server.request(res["files"]["settings.json"])[1]
    assert meta["settings"]["top_p"] == 0.95 and set(meta["timings"]) >= {"encode_s", "tokens_s", "decode_s"}


def test_defaults_come_from_the_gpt_config(server, synth):
    label = _scene(32, 1)
    res = server.events(server.sample(label)["job"])[-1]["result"]
    assert res["settings"] == {**synth.info()["defaults"], "num_samples": 1, "seed": 0}
    again = server.events(server.sample(label)["job"])[-1]["result"]
    assert server.request(res["samples"][0])[1] == server.request(again["samples"][0])[1]  # same seed, same image


def test_progress_streams_while_a_job_runs(server):
    def slow(job):
        for i in range(1, 6):
            time.sleep(0.05)
            job.progress("sampling", i, 5)
        return {"summary": {"ok": True}, "files": {}}

    job = server.state.jobs.submit("sample", slow)
    events = server.events(job.id)
    done = [e["done"] for e in events if e["stage"] == "sampling"]
    assert len(done) >= 3 and done == sorted(done)  # one event per change (the last may coincide with "done")
    assert events[-1]["state"] == "done" and events[-1]["done"] == 5 and events[-1]["result"] == {"ok": True}


def test_two_requests_queue_and_keep_their_own_outputs(server, synth):
    gate = threading.Event()
    blocker = server.state.jobs.submit("sample", lambda job: gate.wait(30) and {"summary": {}, "files": {}})
    maps = [_scene(32, 2), _scene(32, 3)]
    jobs, threads = [None, None], []

    def post(i):
        jobs[i] = server.sample(maps[i], seed=10 + i, num_samples=2)

    for i in range(2):
        threads.append(threading.Thread(target=post, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join(30)
    assert sorted(j["ahead"] for j in jobs) == [1, 2]  # both wait behind the blocker, in arrival order
    status, snap = server.request(f"/api/jobs/{jobs[0]['job']}")
    assert snap["state"] == "queued" and snap["ahead"] >= 1
    gate.set()
    results = [server.events(j["job"])[-1]["result"] for j in jobs]
    assert server.events(blocker.id)[-1]["state"] == "done"
    for i, res in enumerate(results):
        solo = synth.sample(maps[i], SampleSettings(**{**synth.info()["defaults"], "seed": 10 + i, "num_samples": 2}))
        got = [read_png(server.request(u)[1]) for u in res["samples"]]
        assert all(np.array_equal(g, s) for g, s in zip(got, solo.samples))
        assert np.array_equal(_ids(server, res["files"]["painted_ids.png"]), maps[i])


def _png_of(array, mode=None):
    import io

    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_input_gets_a_message_not_a_crash(server):
    good = _scene(32, 4)
    b64 = encode_grid(good)
    off_ids = good.copy()
    off_ids[5, 5] = 40
    cases = [
        ("/api/upload", dict(raw=b"GIF89a not a png"), "not a PNG"),
        (
            "/api/upload",
            dict(raw=png_bytes(np.zeros((16, 16), np.uint8))),
            "is 16x16; this model takes maps from 32x32",
        ),
        ("/api/upload", dict(raw=png_bytes(off_ids)), "outside this model's label space: 40"),
        ("/api/upload", dict(raw=_png_of(np.full((32, 32, 3), 7, np.uint8))), "not this model's class colours"),
        ("/api/sample", dict(raw=b"{not json"), "not JSON"),
        ("/api/sample", dict(body=[1, 2]), "JSON object"),
        ("/api/sample", dict(body={"settings": {}}), "no map"),
        ("/api/sample", dict(body={"map": encode_grid(good[:16])}), "this model takes 32x32"),
        ("/api/sample", dict(body={"map": encode_grid(off_ids)}), "valid ids are 0..15"),
        ("/api/sample", dict(body={"map": b64, "settings": {"top_p": 0}}), r"top_p = 0.0 is out of range"),
        ("/api/sample", dict(body={"map": b64, "settings": {"num_samples": 99}}), "num_samples = 99"),
        ("/api/sample", dict(body={"map": b64, "settings": {"top_k": 1000}}), "image vocabulary, 64"),
        ("/api/sample", dict(body={"map": b64, "settings": {"temperature": "hot"}}), "must be a number"),
        ("/api/sample", dict(body={"map": b64, "settings": {"seed": 1.5}}), "must be an integer"),
        ("/api/sample", dict(body={"map": b64, "settings": {"topk": 3}}), "unknown settings"),
        ("/api/sample", dict(body={"map": b64, "extra": 1}), "unknown fields"),
        ("/api/heldout?index=x", {}, "index must be an integer"),
        ("/api/jobs/9999", {}, "no job '9999'"),
        ("/api/jobs/1/files/secret.txt", {}, "has no file"),
        ("/api/model", dict(body={"gpt": ""}), "stage-2 export directory"),
    ]
    for path, kw, match in cases:
        status, body = server.request(path, **kw)
        assert status == 400, (path, kw, status, body)
        assert re.search(match, body["error"]), (match, body)
    assert server.request("/nowhere")[0] == 404
    # still serving, and a good request after all that works
    assert server.request("/api/info")[0] == 200
    ok = server.request("/api/upload", raw=png_bytes(good))
    assert ok[0] == 200 and ok[1]["map"] == b64
    assert server.events(server.sample(good)["job"])[-1]["state"] == "done"


def test_heldout_maps_come_from_the_run_shards(server, synth):
    status, h = server.request("/api/heldout?index=7")
    assert status == 200 and h["count"] == 6 and h["index"] == 1
    _, _, key, label, _ = synth.heldout(1)
    assert h["key"] == key and base64.b64decode(h["map"]) == label.tobytes()
    assert h["reference"].startswith("data:image/png;base64,")


def test_loading_a_missing_or_wrong_export_says_why(server, exports, tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (str(tmp_path / "nope"), "does not exist"),
        (str(tmp_path / "empty"), "is not an export: model.safetensors is missing"),
        (exports["stage1"], "is a stage-1 export"),
    ]
    for path, match in cases:
        status, job = server.request("/api/model", {"gpt": path})
        assert status == 200
        final = server.events(job["job"])[-1]
        assert final["state"] == "error" and match in final["error"], final
        assert server.request("/api/info")[1]["model"]["gpt"] == exports["gpt"]  # the loaded model stays
    status, job = server.request("/api/model", {"gpt": exports["gpt"]})
    assert server.events(job["job"])[-1]["state"] == "done"


def test_a_bad_export_at_start_still_serves_the_page(exports, tmp_path):
    srv = Server(AppState(exports["stage1"], device="cpu"))
    try:
        status, info = srv.request("/api/info")
        assert status == 200 and info["model"] is None and "is a stage-1 export" in info["error"]
        assert srv.request("/")[0] == 200
        status, body = srv.request("/api/sample", {"map": "", "settings": {}})
        assert status == 400 and "is a stage-1 export" in body["error"]
        status, job = srv.request("/api/model", {"gpt": exports["gpt"]})
        assert srv.events(job["job"])[-1]["state"] == "done"
        assert srv.request("/api/info")[1]["model"]["size"] == 32
    finally:
        srv.close()
    # a stage-2 export whose stage-1 model is gone (here: an override pointing nowhere)
    state = AppState(exports["gpt"], stage1=str(tmp_path / "deleted_stage1"), device="cpu")
    try:
        assert "stage-1 export" in state.load_error and "does not exist" in state.load_error
    finally:
        state.jobs.close()


def test_a_stage1_model_other_than_the_gpts_is_refused_unless_allowed(exports, tmp_path):
    """The app checks the stage-1 weights against the hash the GPT recorded, as sample.py and evaluate.py do, and
    takes the same override flag."""
    import warnings

    s1, _ = read_export(exports["stage1"])
    torch.manual_seed(7)  # another stage-1 model of the same shape: its tokens are not the ones the GPT learned
    other = str(tmp_path / "other_stage1")
    export_model(SVQModel(s1.model, s1.quantizer).state_dict(), s1, other)
    state = AppState(exports["gpt"], stage1=other, device="cpu")
    try:
        assert "the GPT was trained on the stage-1 model" in state.load_error
        assert "--allow-stage1-mismatch" in state.load_error
    finally:
        state.jobs.close()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = AppState(exports["gpt"], stage1=other, device="cpu", allow_stage1_mismatch=True)
    try:
        assert state.load_error is None and state.synth.info()["stage1"] == other
        assert any("allowed by --allow-stage1-mismatch" in str(w.message) for w in caught)
    finally:
        state.jobs.close()
    app = (Path(__file__).resolve().parents[2] / "recipes" / "app.py").read_text()
    assert "allow_stage1_mismatch=args.allow_stage1_mismatch" in app


# -- larger canvases (issue 30): sliding-window sampling up to the page's stated limit ------------------------------


def _wide_scene(h, w, seed):
    rng = np.random.default_rng(seed)
    lab = np.full((h, w), 2, np.uint8)
    lab[: h // 3] = 0
    for _ in range(3):
        y, x = rng.integers(h // 3, h - 6), rng.integers(0, w - 8)
        lab[y : y + 6, x : x + 8] = 8
    return lab


def test_info_states_the_canvases_and_their_limit(server):
    m = server.request("/api/info")[1]["model"]
    assert m["canvases"] == [[32, 32], [32, 64], [64, 32], [64, 64]] and m["limits"]["canvas_side"] == 64


def test_a_larger_canvas_is_the_library_sliding_window(server, synth):
    label = _wide_scene(32, 64, 1)
    body = {"map": encode_grid(label), "height": 32, "width": 64, "settings": {"num_samples": 2, "seed": 3}}
    status, job = server.request("/api/sample", body)
    assert status == 200, job
    events = server.events(job["job"])
    final = events[-1]
    assert final["state"] == "done", final
    res = final["result"]
    got = np.stack([read_png(server.request(u)[1]) for u in res["samples"]])
    assert got.shape == (2, 32, 64, 3)
    assert _ids(server, res["files"]["understood_ids.png"]).shape == (32, 64)
    # the progress counts the 8x16 latent grid's tokens
    assert {e["total"] for e in events if e.get("stage") == "sampling"} == {8 * 16}
    sem = synth.semantic_tokens(label)
    images = sample_images(
        synth.gpt,
        synth.tokenizer,
        sem,
        samples_per_map=2,
        generator=torch.Generator().manual_seed(3),
        latent_shape=(8, 16),
        **{k: v for k, v in dataclasses.asdict(synth.defaults).items() if k not in ("num_samples", "seed")},
    )
    want = (to_unit(images) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "height, width, pixels, match",
    [
        (96, 32, 96 * 32, r"is 96x32; this model takes maps from 32x32 \(its training size\) up to 64x64"),
        (34, 32, 34 * 32, "each side a multiple of 4"),
        (16, 32, 16 * 32, "from 32x32"),
        (32, 64, 32 * 32, "has 1024 pixels, this model takes 32x64 = 2048"),
        ("32", 64, 32 * 64, "height and width must be integers"),
    ],
)
def test_bad_canvases_are_refused_with_the_limit(server, height, width, pixels, match):
    body = {"map": encode_grid(np.full(pixels, 2, np.uint8)), "height": height, "width": width, "settings": {}}
    status, err = server.request("/api/sample", body)
    assert status == 400 and re.search(match, err["error"]), err


def test_an_upload_sets_the_canvas_to_its_size(server):
    lab = _wide_scene(64, 32, 2)
    status, body = server.request("/api/upload", raw=png_bytes(lab), headers={"X-Filename": "tall.png"})
    assert status == 200 and (body["height"], body["width"]) == (64, 32), body
    assert (np.frombuffer(base64.b64decode(body["map"]), np.uint8).reshape(64, 32) == lab).all()
    status, err = server.request("/api/upload", raw=png_bytes(_wide_scene(128, 64, 0)), headers={"X-Filename": "x.png"})
    assert status == 400 and "'x.png' is 128x64; this model takes maps from 32x32" in err["error"], err
