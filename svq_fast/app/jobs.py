"""One worker thread that runs the page's requests in arrival order, each into its own Job.

Sampling and model loads go through the same FIFO queue, so two requests at once never share the model (the
second waits, and its page shows its place in the queue) and each job's outputs live in its own Job object,
never in shared buffers. The server's event loop only reads job snapshots, so it answers (progress, other pages)
while a job computes. A job that fails keeps its error message; nothing a job raises stops the worker.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from svq_fast.app.maps import MapError
from svq_fast.app.synth import AppError

QUEUED, RUNNING, DONE, ERROR = "queued", "running", "done", "error"


class Job:
    def __init__(self, job_id: str, kind: str, fn: Callable[[Job], Any]):
        self.id, self.kind, self.fn = job_id, kind, fn
        self.state, self.stage, self.done, self.total = QUEUED, "queued", 0, 0
        self.result: Any = None
        self.error: str | None = None
        self.created, self.started, self.finished = time.time(), None, None
        self.version = 0  # bumped on every change: the event stream sends a snapshot when it moves
        self._lock = threading.Lock()

    def progress(self, stage: str, done: int, total: int) -> None:
        with self._lock:
            self.stage, self.done, self.total = stage, int(done), int(total)
            self.version += 1

    def _set(self, **fields) -> None:
        with self._lock:
            for k, v in fields.items():
                setattr(self, k, v)
            self.version += 1

    def snapshot(self, position: int = 0) -> dict:
        with self._lock:
            return {
                "job": self.id,
                "kind": self.kind,
                "state": self.state,
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "ahead": position,
                "error": self.error,
                "version": self.version,
                "elapsed_s": (self.finished or time.time()) - self.created,
            }

    @property
    def finished_ok(self) -> bool:
        return self.state == DONE


class JobQueue:
    """FIFO of jobs on one daemon thread; keeps the last `keep` finished jobs for their downloads."""

    def __init__(self, keep: int = 64, on_thread_start: Callable[[], None] | None = None):
        self.keep = keep
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._order: list[str] = []  # ids of queued jobs, oldest first
        self._running: str | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._work, args=(on_thread_start,), name="svq-app-worker", daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[Job], Any]) -> Job:
        with self._lock:
            job = Job(f"{next(self._ids)}", kind, fn)
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._trim()
        self._queue.put(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def ahead(self, job: Job) -> int:
        """How many jobs run before this one: the running one and those queued earlier (0 once it runs)."""
        with self._lock:
            if job.id not in self._order:
                return 0
            return self._order.index(job.id) + (self._running is not None)

    def snapshot(self, job: Job) -> dict:
        return job.snapshot(self.ahead(job))

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def _trim(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in (DONE, ERROR)]
        for k in finished[: max(0, len(finished) - self.keep)]:
            del self._jobs[k]

    def _work(self, on_thread_start) -> None:
        if on_thread_start is not None:
            on_thread_start()
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._order.remove(job.id)
                self._running = job.id
            job._set(state=RUNNING, stage="starting", started=time.time())
            try:
                result = job.fn(job)
            except (AppError, MapError) as e:
                job._set(state=ERROR, error=str(e), finished=time.time())
            except Exception as e:  # a bug, not the person's input: say so, keep serving
                traceback.print_exc()
                job._set(
                    state=ERROR,
                    error=f"internal error while running this {job.kind} request: {type(e).__name__}: {e} "
                    "(the server log has the traceback)",
                    finished=time.time(),
                )
            else:
                job._set(state=DONE, stage="done", result=result, finished=time.time())
            with self._lock:
                self._running = None
                self._trim()
