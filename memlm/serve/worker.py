"""The engine's own thread: the server's one decode loop.

HTTP handlers run on the asyncio event loop; the engine runs here, stepping while any request is
unfinished and sleeping otherwise. Handlers hand requests over with `submit` and take them back
with `abort`; each step's deltas go back to the handler that owns them through its asyncio queue
(`call_soon_threadsafe`). torch releases the GIL inside its kernels, so the event loop keeps
serving while a step runs. A bug inside a step fails the requests it touched, never the server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from memlm.errors import QueueFullError
from memlm.generation.embedding import embed_token_lists
from memlm.generation.engine import Engine
from memlm.generation.request import Request, StreamDelta
from memlm.serve.metrics import Metrics

log = logging.getLogger("memlm.serve")


class ServerStopping(RuntimeError):
    """Posted to every job when the server shuts down: its handler answers 503 at once instead of
    holding the shutdown until uvicorn cancels it."""


@dataclass
class Job:
    """One HTTP request's engine requests (n choices, or several prompts) and where their deltas go."""

    requests: list[Request]
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    first_token: dict[str, float] = field(default_factory=dict)  # request id -> time of its first token
    last_token: dict[str, float] = field(default_factory=dict)

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class EmbeddingJob:
    """Token-id lists to embed; the [N, d] result (or the error) is set on `future` from the engine thread."""

    inputs: list[list[int]]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def finish(self, result) -> None:
        def settle():
            if self.future.done():  # the client went away
                return
            if isinstance(result, Exception):
                self.future.set_exception(result)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(settle)


class EngineWorker:
    def __init__(self, engine: Engine, metrics: Metrics):
        self.engine, self.metrics = engine, metrics
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._incoming: list[Job] = []
        self._embeddings: list[EmbeddingJob] = []
        self._aborts: list[str] = []
        self._jobs: dict[str, Job] = {}  # request id -> its job (worker thread only)
        self._stop = False
        self._closing: str | None = None  # set by shutdown(): fail everything with this message
        self._thread = threading.Thread(target=self._loop, name="memlm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- called from the event loop ---------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job's requests, or raise QueueFullError when the waiting queue has no room for them."""
        limit = self.engine.scheduler.max_queue
        with self._lock:
            if self._closing is not None:
                raise ServerStopping(self._closing)
            waiting = self.engine.num_waiting + sum(len(j.requests) for j in self._incoming)
            if limit is not None and waiting + len(job.requests) > limit:
                raise QueueFullError(f"the server is busy ({waiting} requests waiting); retry shortly")
            self._incoming.append(job)
        self._wake.set()

    def submit_embeddings(self, job: EmbeddingJob) -> None:
        """Embed between two decode steps, on this thread: the model is never run from two threads."""
        with self._lock:
            if self._closing is not None:
                raise ServerStopping(self._closing)
            self._embeddings.append(job)
        self._wake.set()

    def shutdown(self, message: str = "the server is shutting down") -> None:
        """Fail every queued and running request now (their handlers answer 503) and refuse new ones."""
        with self._lock:
            self._closing = message
        self._wake.set()

    def abort(self, requests: list[Request]) -> None:
        """Abort these requests (a client went away); their rows are freed before the next step."""
        with self._lock:
            self._aborts += [r.id for r in requests if not r.finished]
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        while not self._stop:
            self._take_mail()
            self._embed()
            if not engine.has_unfinished:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                deltas = engine.step()
            except Exception as e:  # a bug: fail what was running, keep serving
                log.exception("engine step failed")
                self._fail_all(f"internal error while generating: {type(e).__name__}: {e}")
                continue
            self._deliver(deltas)

    def _take_mail(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, []
        for job in incoming:
            for r in job.requests:
                self._jobs[r.id] = job
                self.engine.scheduler.add(r, bounded=False)
        if self._closing is not None and self.engine.has_unfinished:
            self._fail_all(self._closing, ServerStopping)
        for request_id in aborts:
            if self.engine.abort(request_id):
                job = self._jobs.pop(request_id, None)
                self.metrics.finished("abort", None)
                if job is not None:
                    job.post(None)  # wakes a handler still waiting on it
        self.metrics.observe_engine(self.engine)

    def _embed(self) -> None:
        with self._lock:
            jobs, self._embeddings = self._embeddings, []
        for job in jobs:
            if job.future.done():  # cancelled: its client left
                continue
            try:
                job.finish(embed_token_lists(self.engine.model, job.inputs, self.engine.scheduler.max_prefill_tokens))
            except Exception as e:  # noqa: BLE001  (a bug or a bad input: that request fails, the server lives)
                log.exception("embedding failed")
                job.finish(e)

    def _deliver(self, deltas: list[StreamDelta]) -> None:
        now = time.monotonic()
        for d in deltas:
            r = d.request
            job = self._jobs.get(r.id)
            if job is None:
                continue
            if d.token_id is not None:
                if r.id not in job.first_token:
                    job.first_token[r.id] = now
                    self.metrics.first_token(r, now)
                else:
                    self.metrics.inter_token(now - job.last_token[r.id])
                job.last_token[r.id] = now
            self.metrics.step(d)
            job.post(d)
            if d.finish_reason is not None:
                del self._jobs[r.id]
                self.metrics.finished(d.finish_reason, r, now)
        self.metrics.observe_engine(self.engine)

    def _fail_all(self, message: str, kind: type[Exception] = RuntimeError) -> None:
        for r in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            self.engine.abort(r.id)
            job = self._jobs.pop(r.id, None)
            if job is not None:
                job.post(kind(message))
        self.metrics.observe_engine(self.engine)
