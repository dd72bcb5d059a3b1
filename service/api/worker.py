"""One inference thread with dynamic micro-batching.

Torch never runs on the event loop: request handlers `submit` decoded images and await a future; this thread takes
them from a bounded queue. With batching on it takes the first waiting image, then keeps collecting until
`max_batch_size` images or `max_batch_wait_ms` have passed (a backlog fills a batch at once). It only waits while
other requests are on their way (inside a handler, reading or decoding, announced by `arrival()`): a lone request on
a quiet line runs at once instead of paying the wait for company that is not coming. Images that need different work
(another object word for s_pr, heatmap or not) are run as
separate `Detector.detect` calls from the same batch. A full queue raises `QueueFull` at once (the API turns it into
503 + Retry-After) instead of letting latency grow without bound.

When a batch is scored, the requests it completes are told so (`submit_many(on_done=...)`) before any of their
answers is handed back: the results store then commits the rows of the whole batch in one transaction
(`results.CommitSlot`) instead of one per request.

The detector is read through `get_detector` at every batch, so a reload swaps models between batches without a
pause. `stop()` refuses new work, lets the thread finish what is queued, then fails anything left.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

log = logging.getLogger("zsad.api")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("inference queue is full")
        self.retry_after = retry_after


class WorkerStopped(Exception):
    """The worker is shutting down (or has no model) and takes no new work."""


class _Request:
    """The images of one request still being scored; `on_done` runs when the last of them is."""

    __slots__ = ("remaining", "on_done")

    def __init__(self, count: int, on_done: Callable[[], None]):
        self.remaining, self.on_done = count, on_done


@dataclass
class Job:
    image: Any  # a PIL image, or a detector.Prepared made in the decode threads
    object_name: str | None
    heatmap: bool
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    memory: Any = None  # fewshot.ReferenceMemory: score in few-shot mode against it
    task: Any = None  # callable (detector, items) -> list, run instead of detect (calibration: embed, score)
    request: _Request | None = None
    map_score: str | None = None  # the score whose map the answer shows: made in the batch (`Detector.detect`)


@dataclass
class JobResult:
    detection: Any  # service.detector.Detection
    timings: dict[str, float]  # stage seconds of the batch this image ran in
    batch_size: int
    queue_wait: float
    model_name: str
    model_version: str
    clip: str


class Arrival:
    """A request's announcement to the batcher; `done()` (idempotent) when its images are queued or it failed."""

    def __init__(self, worker: InferenceWorker):
        self._worker, self._open = worker, True

    def done(self) -> None:
        if self._open:
            self._open = False
            self._worker._arrived()

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()


class InferenceWorker:
    def __init__(
        self,
        get_detector: Callable[[], Any],
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        batching: bool = True,
        queue_size: int = 64,
        metrics: Any = None,
    ):
        self.get_detector = get_detector
        self.max_batch_size = max_batch_size if batching else 1
        self.max_wait = max_wait_ms / 1000.0 if batching else 0.0
        self.batching = batching
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.queue_size = queue_size
        self.metrics = metrics
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._per_image_s = 0.05  # running estimate of service time per image, for Retry-After
        self.batches = 0
        self._arriving = 0  # requests announced by arrival() that have not queued their images yet
        self._arriving_lock = threading.Lock()

    # --- lifecycle ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="zsad-inference", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish the queued work (up to `timeout`), fail whatever is left."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._fail_pending(WorkerStopped("the service is shutting down"))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- submitting -----------------------------------------------------------------------------------------------------
    def arrival(self) -> Arrival:
        """Announce a request that will submit soon (use as a context manager around read + decode + submit)."""
        with self._arriving_lock:
            self._arriving += 1
        return Arrival(self)

    def _arrived(self) -> None:
        with self._arriving_lock:
            self._arriving -= 1

    @property
    def arriving(self) -> int:
        return self._arriving

    def retry_after(self) -> int:
        backlog = self.queue.qsize() + self.max_batch_size
        return int(min(60, max(1, math.ceil(backlog * self._per_image_s))))

    def submit(self, image: Image.Image, object_name: str | None, heatmap: bool, memory: Any = None,
               task: Any = None, request: _Request | None = None, map_score: str | None = None) -> Future:
        if self._stopping.is_set():
            raise WorkerStopped("the service is shutting down")
        job = Job(image, object_name, heatmap, memory=memory, task=task, request=request,
                  map_score=map_score if heatmap else None)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            if self.metrics is not None:
                self.metrics.queue_rejections.inc()
            raise QueueFull(self.retry_after()) from None
        if self.metrics is not None:
            self.metrics.queue_depth.set(self.queue.qsize())
        return job.future

    def submit_many(self, images: list[Image.Image], object_name: str | None, heatmap: bool,
                    arrival: Arrival | None = None, memory: Any = None, task: Any = None,
                    on_done: Callable[[], None] | None = None, map_score: str | None = None) -> list[Future]:
        """All or nothing: when the queue cannot take every image, the ones already queued are cancelled.

        `arrival` (from `arrival()`) is settled once the images are queued, so the batcher stops waiting for them.
        `memory` scores in few-shot mode; `task(detector, items)` replaces `detect` (same batching and queue).
        `on_done` runs on the inference thread once every image is scored, before the last result is handed back
        (and before any result of the batch that completes it).
        """
        futures: list[Future] = []
        request = _Request(len(images), on_done) if on_done is not None else None
        try:
            for image in images:
                futures.append(self.submit(image, object_name, heatmap, memory, task, request, map_score))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if arrival is not None:
                arrival.done()
        return futures

    # --- the thread -------------------------------------------------------------------------------------------------------
    def _collect(self, first: Job) -> list[Job]:
        """`first` plus whatever is queued, plus what arrives within the wait while requests are on their way."""
        batch = [first]
        deadline = time.perf_counter() + self.max_wait
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or self._arriving <= 0:
                break  # nobody else is on the way: waiting would only add latency
            try:  # short polls: an arrival that fails (bad image) must not hold the batch for the whole wait
                batch.append(self.queue.get(timeout=min(remaining, 0.001)))
            except queue.Empty:
                continue
        return batch

    def _run(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            batch = self._collect(first)
            if self.metrics is not None:
                self.metrics.queue_depth.set(self.queue.qsize())
            # Drop jobs whose requests gave up (timeout, disconnect): their futures were cancelled.
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            groups: dict[tuple[str | None, bool, int, int, str | None], list[Job]] = {}
            for job in live:
                key = (job.object_name, job.heatmap, id(job.memory), id(job.task), job.map_score)
                groups.setdefault(key, []).append(job)
            for (object_name, heatmap, _, _, map_score), jobs in groups.items():
                self._run_group(jobs, object_name, heatmap, map_score)

    def _run_group(self, jobs: list[Job], object_name: str | None, heatmap: bool,
                   map_score: str | None = None) -> None:
        start = time.perf_counter()
        memory, task = jobs[0].memory, jobs[0].task
        try:
            detector = self.get_detector()
            if detector is None:
                raise WorkerStopped("no model is loaded")
            timings: dict[str, float] = {}
            items = [j.image for j in jobs]
            extra = {"map_score": map_score} if map_score and getattr(detector, "maps_on_device", False) else {}
            if task is not None:
                detections = task(detector, items)
            elif memory is not None:
                detections = detector.detect(items, object_name, heatmap=heatmap, timings=timings, memory=memory,
                                             **extra)
            else:
                detections = detector.detect(items, object_name, heatmap=heatmap, timings=timings, **extra)
            if len(detections) != len(jobs):
                raise RuntimeError(f"detector returned {len(detections)} results for {len(jobs)} images")
            clip = detector.backend.spec.label()
        except BaseException as exc:  # every waiting request gets the error; the thread lives on
            if not isinstance(exc, WorkerStopped):
                log.exception("inference failed for a batch of %d", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        self._per_image_s = 0.8 * self._per_image_s + 0.2 * (elapsed / len(jobs))
        self.batches += 1
        m = self.metrics
        if m is not None:
            m.batch_size.observe(len(jobs))
            m.observe_stages(timings)
        for job in jobs:  # first tell the requests this batch completes, then hand back any answer
            req = job.request
            if req is not None:
                req.remaining -= 1
                if req.remaining == 0:
                    try:
                        req.on_done()
                    except Exception:  # a hook must never cost the batch its answers
                        log.exception("on_done hook failed")
        for job, detection in zip(jobs, detections):
            wait = start - job.enqueued
            if m is not None:
                m.queue_wait.observe(wait)
            job.future.set_result(JobResult(detection, timings, len(jobs), wait, detector.name, detector.version, clip))

    def _fail_pending(self, exc: Exception) -> None:
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)
