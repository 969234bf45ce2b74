"""Generations in order: one worker thread owns the loaded pipeline and runs jobs first in, first out.

A `Job` is one request (of `iterations` batches, A1111's n_iter); it reports every step (a cheap
latent preview, TAESD's decode when the server has `--taesd`, and a full VAE decode every few steps when
asked) to whoever watches: A1111's
global /progress, and our per-job event streams. Interrupt and skip are flags the step callback
checks after each step; it raises `Stopped`, and the worker decodes the last predicted latents, so
an interrupted job still returns what it had (as A1111 does). Model switches are tasks in the
same queue, so a switch waits for the jobs ahead of it and never runs during one.

The queue is bounded: `submit` raises `QueueFull` (the server answers 503 with Retry-After) when
`queue_size` jobs already wait.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from sdtorch.errors import SdtorchError
from sdtorch.images import to_pil
from sdtorch.metadata import infotext
from sdtorch.pipeline import Pipeline
from sdtorch.png import write_png
from sdtorch.preview import LatentPreview
from sdtorch.request import GenerationRequest
from sdtorch.samplers import StepEvent

from .models import ModelEntry, ModelRegistry

log = logging.getLogger("sdtorch.server")

FINISHED = ("done", "interrupted", "failed", "cancelled")


class Stopped(Exception):
    """Raised from the step callback to stop sampling: kind "interrupt" (stop the job) or "skip"
    (stop this batch, go on with the next)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class QueueFull(SdtorchError):
    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"the queue is full ({waiting} jobs waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


def png_bytes(image: Image.Image, text: str | None = None) -> bytes:
    buffer = io.BytesIO()
    write_png(buffer, image, {"parameters": text} if text else {})
    return buffer.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def tile(images: list[Image.Image]) -> Image.Image:
    """A batch side by side, 2 pixels apart."""
    if len(images) == 1:
        return images[0]
    w, h = images[0].size
    canvas = Image.new("RGB", (len(images) * (w + 2) - 2, h), "white")
    for i, image in enumerate(images):
        canvas.paste(image, (i * (w + 2), 0))
    return canvas


@dataclass
class Output:
    """One finished picture: the request that makes it again alone, and its A1111 parameters text."""

    image: Image.Image
    request: GenerationRequest
    infotext: str
    partial: bool = False  # interrupted or skipped: the last step's prediction, decoded
    _png: bytes | None = field(default=None, repr=False)

    @property
    def png(self) -> bytes:
        if self._png is None:
            self._png = png_bytes(self.image, self.infotext)
        return self._png


class _Task:
    """Something the worker runs, that async and sync code can wait for."""

    def __init__(self):
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._cb_lock = threading.Lock()
        self.error: Exception | None = None

    @property
    def is_done(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[], None]) -> None:
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn()

    def _finish(self) -> None:
        with self._cb_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a waiter that went away must not stop the worker
                log.exception("a job's done callback failed")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class _LoadTask(_Task):
    def __init__(self, entry: ModelEntry):
        super().__init__()
        self.entry = entry


class Job(_Task):
    """One generation request: `iterations` batches of `request.batch` images, seeds continuing."""

    def __init__(self, request: GenerationRequest, *, iterations: int = 1, model: ModelEntry | None = None,
                 kind: str = "txt2img", full_preview_every: int = 0):
        super().__init__()
        if request.seed is None:
            request = request.with_seed()
        self.id = uuid.uuid4().hex
        self.request = request
        self.iterations = iterations
        self.model = model
        self.kind = kind
        self.full_preview_every = full_preview_every
        self.state = "queued"
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.iteration = 0
        self.step = 0
        self.total = 0
        self.outputs: list[Output] = []
        self.model_entry: ModelEntry | None = None  # the model it ran with
        self.interrupt_requested = False
        self.skip_requested = False
        self.preview: Image.Image | None = None
        self.preview_kind = ""
        self.preview_id = 0
        self._preview_png: tuple[int, bytes] | None = None
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._lock = threading.Lock()

    # --- what watchers see -------------------------------------------------------------------

    @property
    def progress(self) -> float:
        if self.state in FINISHED:
            return 1.0
        if not self.total:
            return 0.0
        return min(1.0, (self.iteration + self.step / self.total) / self.iterations)

    @property
    def eta(self) -> float | None:
        """Seconds left, from the time per step so far."""
        if self.started is None or not self.progress or self.state in FINISHED:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.progress - elapsed)

    def preview_png(self) -> bytes | None:
        with self._lock:
            if self.preview is None:
                return None
            if self._preview_png is None or self._preview_png[0] != self.preview_id:
                self._preview_png = (self.preview_id, png_bytes(self.preview))
            return self._preview_png[1]

    def status(self, position: int | None = None) -> dict:
        """The job as our API shows it (no images: those come with the 'done' event and /images)."""
        out = {"id": self.id, "kind": self.kind, "state": self.state, "position": position,
               "iteration": self.iteration, "iterations": self.iterations, "step": self.step, "total": self.total,
               "progress": round(self.progress, 4), "eta": self.eta,
               "seconds": round((self.finished or time.time()) - self.started, 3) if self.started else None,
               "images": len(self.outputs),
               "error": str(self.error) if self.error else None}
        if self.model_entry is not None:
            out["model"] = self.model_entry.title
        return out

    def done_event(self) -> dict:
        from .native import request_json

        event = self.status()
        event |= {"type": "done",
                  "images": [data_url(o.png) for o in self.outputs],
                  "infotexts": [o.infotext for o in self.outputs],
                  "seeds": [o.request.seed for o in self.outputs],
                  "partial": [o.partial for o in self.outputs],
                  "parameters": [request_json(o.request) for o in self.outputs]}
        return event

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
        """A queue of this job's events from now on, starting with where it is."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            finished = self.state in FINISHED
            if not finished:
                self._subscribers.append((loop, queue))
        if finished:
            queue.put_nowait(self.done_event())
        else:
            queue.put_nowait(self.status() | {"type": "state"})
            png = self.preview_png()
            if png is not None:
                queue.put_nowait(self._step_event(png))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [(lp, q) for lp, q in self._subscribers if q is not queue]

    def _step_event(self, png: bytes) -> dict:
        return self.status() | {"type": "step", "preview": data_url(png), "preview_kind": self.preview_kind}

    def emit(self, event_or_factory) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return
        event = event_or_factory() if callable(event_or_factory) else event_or_factory
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that loop is closed: the watcher is gone
                self.unsubscribe(queue)

    def _finish(self) -> None:
        self.finished = time.time()
        self.preview_kind = ""
        self.emit(self.done_event)
        with self._lock:
            self._subscribers = []
        super()._finish()


class JobQueue:
    """The worker thread, its queue and the loaded model."""

    def __init__(self, registry: ModelRegistry, *, queue_size: int = 16, device: str = "auto",
                 dtype: str | None = None, keep_finished: int = 64, lora_dir: str | None = None,
                 embeddings_dir: str | None = None, taesd: str | None = None):
        if queue_size < 1:
            raise SdtorchError(f"--queue-size must be at least 1, got {queue_size}")
        self.registry = registry
        self.queue_size = queue_size
        self.device, self.dtype = device, dtype
        self.lora_dir, self.embeddings_dir = lora_dir, embeddings_dir
        self.taesd = taesd  # TAESD weights: every model's live preview, and decoder="taesd" requests
        self.default_entry: ModelEntry = registry.default()
        self.current: Job | None = None
        self._queue: deque[_Task] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._pipe: Pipeline | None = None
        self._pipe_entry: ModelEntry | None = None
        self._previews: dict[tuple, tuple[object, str]] = {}  # (preview, its kind) per model
        self._seconds_per_job = 1.0
        self._jobs: OrderedDict[str, Job] = OrderedDict()  # those of our own API, for lookups
        self._keep_finished = keep_finished

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> JobQueue:
        """Load the first model here (its errors are the caller's), then start the worker."""
        self._ensure(self.default_entry)
        self._thread = threading.Thread(target=self._work, name="sdtorch-worker", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._closed = True
            pending = [t for t in self._queue]
            self._queue.clear()
            if self.current is not None:
                self.current.interrupt_requested = True
            self._cond.notify_all()
        for task in pending:
            task.error = SdtorchError("the server is shutting down")
            if isinstance(task, Job):
                task.state = "cancelled"
            task._finish()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def model(self):
        """The loaded model (for checks that depend on it)."""
        return self._pipe.model if self._pipe is not None else None

    # --- submitting ---------------------------------------------------------------------------

    def submit(self, job: Job, *, track: bool = False) -> int:
        """Queue `job`; its position among the waiting jobs (0: next). QueueFull when full."""
        with self._cond:
            if self._closed:
                raise SdtorchError("the server is shutting down")
            waiting = sum(isinstance(t, Job) for t in self._queue)
            if waiting >= self.queue_size:
                raise QueueFull(waiting, max(1, round(self._seconds_per_job * (waiting + 1))))
            self._queue.append(job)
            if track:
                self._jobs[job.id] = job
                self._forget_old()
            self._cond.notify()
            return waiting

    def switch_model(self, entry: ModelEntry) -> _Task:
        """Queue a switch of the default model (after the jobs already waiting); wait on the task."""
        task = _LoadTask(entry)
        with self._cond:
            if self._closed:
                raise SdtorchError("the server is shutting down")
            self._queue.append(task)
            self._cond.notify()
        return task

    def position(self, job: Job) -> int | None:
        with self._cond:
            waiting = [t for t in self._queue if isinstance(t, Job)]
        return waiting.index(job) if job in waiting else None

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """Take a waiting job out of the queue, or interrupt it if it runs."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.state = "cancelled"
            else:
                job.interrupt_requested = True
                return
        job._finish()

    def interrupt(self) -> None:
        job = self.current
        if job is not None:
            job.interrupt_requested = True

    def skip(self) -> None:
        job = self.current
        if job is not None:
            job.skip_requested = True

    def waiting(self) -> int:
        with self._cond:
            return sum(isinstance(t, Job) for t in self._queue)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.state in FINISHED]
        for key in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[key]

    # --- A1111's /progress --------------------------------------------------------------------

    def a1111_progress(self, skip_current_image: bool = False) -> dict:
        job, waiting = self.current, self.waiting()
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if job is None:
            # Idle is exactly progress 0 and job_count 0, as clients test; jobs still waiting count.
            state["job_count"] = waiting
            if waiting:
                state["job"] = "queued"
            return {"progress": 0, "eta_relative": 0, "state": state, "current_image": None, "textinfo": None}
        state |= {"skipped": job.skip_requested, "interrupted": job.interrupt_requested, "job": f"scripts_{job.kind}",
                  "job_count": job.iterations, "job_no": job.iteration, "sampling_step": job.step,
                  "sampling_steps": job.total,
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created))}
        # A1111's formula: 0.01 + job_no / job_count + step / steps / job_count, at most 1.
        progress = 0.01 + job.iteration / job.iterations
        if job.total:
            progress += job.step / job.total / job.iterations
        progress = min(progress, 1.0)
        elapsed = time.time() - (job.started or time.time())
        png = None if skip_current_image else job.preview_png()
        return {"progress": progress, "eta_relative": elapsed / progress - elapsed, "state": state,
                "current_image": base64.b64encode(png).decode("ascii") if png else None,
                "textinfo": f"step {job.step}/{job.total}" if job.total else None}

    # --- the worker ---------------------------------------------------------------------------

    def _next(self) -> _Task | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            task = self._queue.popleft()
            if isinstance(task, Job):
                task.state = "running"
                task.started = time.time()
                self.current = task
            return task

    def _work(self) -> None:
        while (task := self._next()) is not None:
            try:
                if isinstance(task, _LoadTask):
                    self._load(task)
                else:
                    self._run(task)
            finally:
                self.current = None
                task._finish()

    def _ensure(self, entry: ModelEntry) -> Pipeline:
        """The pipeline for `entry`, loading it (in place of the one loaded) if need be."""
        if self._pipe is not None and self._pipe_entry == entry:
            return self._pipe
        started = time.perf_counter()
        pipe = Pipeline.load(entry.path, device=self.device, dtype=self.dtype, lora_dir=self.lora_dir,
                             embeddings_dir=self.embeddings_dir, taesd=self.taesd)
        for warning in pipe.adapters.warnings:
            log.warning("%s", warning)
        if entry.short_hash:
            pipe.__dict__["model_hash"] = entry.short_hash  # computed already: seed the cached property
        key = (entry.path, entry.sha256)
        if key not in self._previews:
            if pipe.taesd is not None:
                from sdtorch.taesd import TAESDPreview

                self._previews[key] = TAESDPreview(pipe.taesd), "taesd"
            else:
                self._previews[key] = LatentPreview.fit(pipe.model.vae), "cheap"
        self._pipe, self._pipe_entry = pipe, entry
        gc.collect()
        log.info("loaded %s in %.1f s", entry.title, time.perf_counter() - started)
        return pipe

    def adapters(self):
        """The loaded pipeline's LoRAs and embeddings (none before a model is loaded)."""
        from sdtorch.adapters.library import Adapters

        return self._pipe.adapters if self._pipe is not None else Adapters()

    def _load(self, task: _LoadTask) -> None:
        try:
            self._ensure(task.entry)
            self.default_entry = task.entry
        except SdtorchError as e:
            task.error = e
        except Exception as e:  # a bug: say so, keep serving
            log.exception("loading %s failed", task.entry.title)
            task.error = e

    def _run(self, job: Job) -> None:
        job.emit(lambda: job.status() | {"type": "state"})
        try:
            entry = job.model or self.default_entry
            pipe = self._ensure(entry)
            job.model_entry = entry
            preview = self._previews[(entry.path, entry.sha256)]
            for it in range(job.iterations):
                if job.interrupt_requested:
                    break
                job.iteration, job.step, job.total = it, 0, 0
                job.skip_requested = False
                request = job.request.replace(seed=job.request.seed + it * job.request.batch)
                last: list[StepEvent] = []
                try:
                    result = pipe.run(request, self._callback(job, pipe, preview, last))
                    images, resolved, partial = result.images, result.request, False
                except Stopped as stop:
                    if not last:
                        if stop.kind == "interrupt":
                            break
                        continue
                    with torch.no_grad():
                        images = to_pil(pipe.decode(last[0].denoised))
                    resolved, partial = request.resolved(pipe.model), True
                for image, one in zip(images, resolved.per_image()):
                    text = infotext(one, model_name=pipe.model_name, model_hash=pipe.model_hash)
                    job.outputs.append(Output(image, one, text, partial))
            job.state = "interrupted" if job.interrupt_requested else "done"
        except SdtorchError as e:
            job.state, job.error = "failed", e
        except Exception as e:
            log.exception("job %s failed", job.id)
            job.state, job.error = "failed", e
        finally:
            job.preview = None
            if job.started is not None:
                seconds = time.time() - job.started
                self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * seconds

    def _callback(self, job: Job, pipe: Pipeline, preview: tuple[object, str], last: list[StepEvent]):
        preview, preview_kind = preview
        def callback(event: StepEvent) -> None:
            last[:] = [event]
            job.total = event.total
            every = job.full_preview_every
            if every and (event.step + 1) % every == 0 and event.step + 1 < event.total:
                frame, kind = tile(to_pil(pipe.decode(event.denoised))), "full"
            else:
                frame, kind = tile(preview(event.denoised)), preview_kind
            with job._lock:
                job.preview, job.preview_kind = frame, kind
                job.preview_id += 1
                job.step = event.step + 1
            job.emit(lambda: job._step_event(job.preview_png()))
            if job.interrupt_requested:
                raise Stopped("interrupt")
            if job.skip_requested:
                raise Stopped("skip")

        return callback
