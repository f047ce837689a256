"""The synthesis page's HTTP side: a Starlette app over one Synthesizer and one JobQueue, served by uvicorn.

Routes (JSON unless said otherwise; every error is {"error": sentence} with status 400, or 500 for a bug, and the
server keeps serving):
    GET  /                         the page (static/index.html; all assets local, nothing from the network)
    GET  /api/info                 the loaded model (size, palette, names, default settings) or why none is loaded
    POST /api/model                {"gpt": DIR, "stage1": DIR?} -> {"job"}: load another export (through the queue)
    GET  /api/heldout?index=I      a held-out map of the run's shards: {"map": base64 ids, "reference": PNG data URL}
    POST /api/upload               body = a label PNG -> {"map": base64 ids, "height", "width"} (validated: PNG, size,
                                   label space)
    POST /api/sample               {"map": base64 of H*W uint8 ids, "height"?, "width"? (default: the model's size;
                                   larger canvases up to Synthesizer.check_map's limit), "settings": {...}}
                                   -> {"job", "ahead"}
    GET  /api/jobs/ID              the job's progress (and, when done, its result)
    GET  /api/jobs/ID/events       the same as server-sent events, one per change, until done or failed
    GET  /api/jobs/ID/files/NAME   the job's PNGs and settings.json (samples, painted and understood maps)
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import json
import math
import os
import socket
import time
import traceback

import numpy as np

from svq_fast.app.jobs import DONE, ERROR, Job, JobQueue
from svq_fast.app.maps import MapError, decode_grid, decode_png, encode_grid, png_bytes
from svq_fast.app.synth import AppError, SampleSettings, Synthesizer

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
EVENT_POLL_S = 0.01


class AppState:
    """The server's one model (replaced only by a load job) and its queue."""

    def __init__(
        self,
        gpt: str,
        *,
        stage1: str = "",
        shards: str = "",
        device: str = "cpu",
        threads: int = 0,
        allow_stage1_mismatch: bool = False,  # every load accepts a stage-1 export other than the GPT's (export.py)
    ):
        self.device, self.shards, self.allow_stage1_mismatch = device, shards, allow_stage1_mismatch
        self.synth: Synthesizer | None = None
        self.load_error: str | None = None
        self.requested = gpt

        def set_threads():
            if threads > 0:
                import torch

                torch.set_num_threads(threads)

        self.jobs = JobQueue(on_thread_start=set_threads)
        job = self.jobs.submit("load", functools.partial(self._load_job, gpt, stage1))
        while job.state not in (DONE, ERROR):  # the first load, before the server listens
            time.sleep(0.01)

    def _load_job(self, gpt: str, stage1: str, job: Job) -> dict:
        self.requested = gpt
        job.progress("loading", 0, 1)
        try:
            synth = Synthesizer(
                gpt,
                stage1=stage1,
                shards=self.shards,
                device=self.device,
                allow_stage1_mismatch=self.allow_stage1_mismatch,
            )
        except AppError as e:
            if self.synth is None:
                self.load_error = str(e)
            raise
        self.synth, self.load_error = synth, None
        return {"summary": synth.info(), "files": {}}

    def require_model(self) -> Synthesizer:
        synth = self.synth
        if synth is None:
            raise AppError(self.load_error or "no model is loaded")
        return synth


def _error(status: int, message: str):
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _api(fn):
    """Route wrapper: AppError / MapError -> 400 with the message; anything else -> 500, logged, server lives."""

    @functools.wraps(fn)
    async def wrapped(request):
        try:
            return await fn(request)
        except (AppError, MapError) as e:
            return _error(400, str(e))
        except Exception as e:
            traceback.print_exc()
            return _error(500, f"internal error: {type(e).__name__}: {e} (the server log has the traceback)")

    return wrapped


async def _json_body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise AppError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise AppError("the request body must be a JSON object")
    return body


def _sample_job(synth: Synthesizer, label: np.ndarray, settings: SampleSettings, job: Job) -> dict:
    res = synth.sample(label, settings, job.progress)
    pal = synth.palette
    files = {
        "painted_ids.png": (png_bytes(res.painted), "image/png"),
        "painted_map.png": (png_bytes(pal.colorize(res.painted)), "image/png"),
        "understood_ids.png": (png_bytes(res.understood), "image/png"),
        "understood_map.png": (png_bytes(pal.colorize(res.understood)), "image/png"),
    }
    for j, img in enumerate(res.samples):
        files[f"sample_{j}.png"] = (png_bytes(img), "image/png")
    meta = {
        "gpt": synth.gpt_dir,
        "stage1": synth.cfg.stage1,
        "settings": dataclasses.asdict(settings),
        "semantic_tokens": "from the map alone (encode_semantic)",
        "agreement": None if math.isnan(res.agreement) else res.agreement,
        "timings": res.timings,
    }
    files["settings.json"] = (json.dumps(meta, indent=1).encode(), "application/json")
    base = f"/api/jobs/{job.id}/files/"
    summary = {
        "samples": [base + f"sample_{j}.png" for j in range(len(res.samples))],
        "understood": base + "understood_map.png",
        "painted": base + "painted_map.png",
        "files": {name: base + name for name in files},
        "agreement": meta["agreement"],
        "timings": res.timings,
        "settings": meta["settings"],
        "classes_painted": [int(c) for c in np.unique(res.painted)],
    }
    return {"summary": summary, "files": files}


def _job_view(state: AppState, job: Job) -> dict:
    snap = state.jobs.snapshot(job)
    if snap["state"] == DONE and isinstance(job.result, dict):
        snap["result"] = job.result.get("summary")
    return snap


def create_app(state: AppState):
    """The ASGI app (Starlette) over `state`."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    async def index(request):
        return FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-store"})

    @_api
    async def info(request):
        synth = state.synth
        return JSONResponse(
            {
                "model": synth.info() if synth is not None else None,
                "error": state.load_error if synth is None else None,
                "requested": state.requested,
            }
        )

    @_api
    async def load_model(request):
        body = await _json_body(request)
        gpt, stage1 = body.get("gpt", ""), body.get("stage1", "")
        if not isinstance(gpt, str) or not gpt.strip():
            raise AppError("give the path of a stage-2 export directory (e.g. runs/demo/stage2/export)")
        if not isinstance(stage1, str):
            raise AppError("stage1 must be a path")
        job = state.jobs.submit("load", functools.partial(state._load_job, gpt.strip(), stage1.strip()))
        return JSONResponse({"job": job.id, "ahead": state.jobs.ahead(job)})

    @_api
    async def heldout(request):
        synth = state.require_model()
        try:
            index = int(request.query_params.get("index", "0"))
        except ValueError:
            raise AppError("index must be an integer") from None
        i, count, key, label, image = await run_in_threadpool(synth.heldout, index)
        ref = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
        return JSONResponse({"index": i, "count": count, "key": key, "map": encode_grid(label), "reference": ref})

    @_api
    async def upload(request):
        synth = state.require_model()
        data = await request.body()
        name = request.headers.get("x-filename") or "the upload"
        what = repr(name) if name != "the upload" else name
        label = synth.check_map(decode_png(data, None, synth.palette, name=what), what)
        return JSONResponse(
            {
                "map": encode_grid(label),
                "height": label.shape[0],
                "width": label.shape[1],
                "classes": [int(c) for c in np.unique(label)],
            }
        )

    @_api
    async def sample(request):
        synth = state.require_model()
        body = await _json_body(request)
        unknown = sorted(set(body) - {"map", "height", "width", "settings"})
        if unknown:
            raise AppError(f"unknown fields {unknown} in the request; expected map, height, width and settings")
        shape = [body.get(k, synth.size) for k in ("height", "width")]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in shape):
            raise AppError(f"height and width must be integers, got {shape}")
        label = synth.check_map(decode_grid(body.get("map"), tuple(shape), synth.palette))
        settings = SampleSettings.from_request(body.get("settings", {}), synth.defaults)
        settings.check(synth.cfg.model.image_vocab)
        job = state.jobs.submit("sample", functools.partial(_sample_job, synth, label, settings))
        return JSONResponse({"job": job.id, "ahead": state.jobs.ahead(job)})

    def _job(request) -> Job:
        job = state.jobs.get(request.path_params["job"])
        if job is None:
            raise AppError(f"no job {request.path_params['job']!r} (finished jobs are kept for the last 64 requests)")
        return job

    @_api
    async def job_status(request):
        return JSONResponse(_job_view(state, _job(request)))

    @_api
    async def job_events(request):
        job = _job(request)

        async def stream():
            last = None
            while True:
                view = _job_view(state, job)
                key = (view["version"], view["ahead"])
                if key != last:
                    last = key
                    yield f"data: {json.dumps(view)}\n\n"
                if view["state"] in (DONE, ERROR):
                    return
                await asyncio.sleep(EVENT_POLL_S)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @_api
    async def job_file(request):
        job = _job(request)
        name = request.path_params["name"]
        files = job.result.get("files", {}) if job.state == DONE and isinstance(job.result, dict) else {}
        if name not in files:
            raise AppError(f"job {job.id} has no file {name!r} (it is {job.state})")
        content, media = files[name]
        return Response(content, media_type=media, headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/model", load_model, methods=["POST"]),
        Route("/api/heldout", heldout),
        Route("/api/upload", upload, methods=["POST"]),
        Route("/api/sample", sample, methods=["POST"]),
        Route("/api/jobs/{job}", job_status),
        Route("/api/jobs/{job}/events", job_events),
        Route("/api/jobs/{job}/files/{name}", job_file),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    async def not_found(request, exc):
        return _error(exc.status_code, f"{request.url.path}: {exc.detail}")

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); the caller prints its real address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"svq_fast app: cannot listen on {host}:{port} ({e}); pick another --port") from None
    sock.listen(128)
    return sock


def serve(state: AppState, sock: socket.socket) -> None:
    """Serve the app on an already listening socket until interrupted (Ctrl-C)."""
    import uvicorn

    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, timeout_graceful_shutdown=1)
    uvicorn.Server(config).run(sockets=[sock])
