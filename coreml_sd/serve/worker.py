"""The one thread that runs generations, its FIFO queue, live progress and the loaded model.

Every request that touches the model (a generation, a model switch) becomes a `Task` in one queue
and runs on this thread, one at a time, in arrival order: the device never runs two generations at
once, and a model is never switched under a running one. HTTP handlers wait on the task's future.
Progress is kept under a lock as plain values plus a reference to the latest latents, so reading
it (/progress, the page's event stream) never waits for a step.
"""

from __future__ import annotations

import collections
import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from coreml_sd.errors import InputError
from coreml_sd.serve import catalog
from coreml_sd.serve.config import ServeConfig
from coreml_sd.serve.errors import ApiError, field_error
from coreml_sd.serve.runner import Control, Outcome, run_request
from coreml_sd.serve.translate import GenerationRequest

log = logging.getLogger(__name__)
Loader = Callable[[catalog.ModelEntry], Any]


@dataclass
class Task:
    id: str
    kind: str  # "generate" | "switch"
    payload: Any  # GenerationRequest | model title
    future: Future = field(default_factory=Future)


@dataclass
class JobResult:
    outcome: Outcome
    saved: dict[int, Path]  # request index -> file written to --output
    model_title: str


@dataclass
class Live:
    """What the running task is doing, for /progress and the page."""

    task_id: str | None = None
    job: str = ""
    started: float = 0.0
    timestamp: str = ""
    num_images: int = 0
    first: int = 0  # request index of the first image being sampled
    batch: int = 1
    step: int = 0
    steps: int = 0
    latents: Any = None  # Progress.latents of the last step, when the pipeline gives them
    interrupted: bool = False
    skipped: bool = False

    @property
    def fraction(self) -> float:
        if not self.num_images or not self.steps:
            return 0.0
        return min((self.first + self.batch * self.step / self.steps) / self.num_images, 1.0)


def load_pipeline(entry: catalog.ModelEntry, config: ServeConfig):
    from coreml_sd.pipeline import Pipeline

    return Pipeline.load(entry.load_path, backend=config.backend, device=config.device, precision=config.precision,
                         compute_units=config.compute_units, reduce_memory=config.reduce_memory)


def initial_entries(config: ServeConfig) -> tuple[list[catalog.ModelEntry], str]:
    """The catalog and the title of the model to load first (--model: a title or a path)."""
    entries = catalog.scan(config.models_dir)
    if config.model is None:
        return entries, catalog.BUILTIN_TITLE
    try:
        return entries, catalog.resolve(entries, config.model).title
    except InputError:
        entry = catalog.entry_for_path(config.model)
        return entries + [entry], entry.title


class Worker:
    def __init__(self, config: ServeConfig, loader: Loader | None = None):
        self.config = config
        self.entries, self.option_title = initial_entries(config)
        self.control = Control()
        self._loader = loader or (lambda entry: load_pipeline(entry, config))
        self._cv = threading.Condition()
        self._waiting: collections.deque[Task] = collections.deque()
        self._running: Task | None = None
        self._finished: collections.deque[str] = collections.deque(maxlen=1024)
        self._stopping = False
        self.live = Live()
        self.pipe = None
        self.pipe_title: str | None = None
        self._thread = threading.Thread(target=self._loop, name="coreml-sd-generate", daemon=True)

    # -- the queue, from HTTP handlers ------------------------------------------------------------
    def start(self, preload: bool = True) -> None:
        self._thread.start()
        if preload:  # the first request should find the model warm
            self.submit(Task("load", "switch", self.option_title))

    def submit(self, task: Task) -> Future:
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise ApiError(503, f"the queue is full ({self.config.max_queue} requests waiting); try again later",
                               {"Retry-After": "10"})
            if task.kind == "generate" and self.status(task.id) in ("queued", "running"):
                raise field_error("force_task_id", f"task {task.id!r} is already queued or running")
            self._waiting.append(task)
            self._cv.notify()
        return task.future

    def position(self, task_id: str) -> int | None:
        """0: running; n: n-th in the queue; None: not queued."""
        with self._cv:
            if self._running and self._running.id == task_id:
                return 0
            for n, task in enumerate(self._waiting, start=1):
                if task.id == task_id:
                    return n
        return None

    def status(self, task_id: str) -> str:
        position = self.position(task_id)
        if position is not None:
            return "running" if position == 0 else "queued"
        return "done" if task_id in self._finished else "unknown"

    def queue_size(self) -> int:
        with self._cv:
            return len(self._waiting)

    def interrupt(self) -> None:
        with self._cv:
            if self._running is not None:
                self.live.interrupted = True
                self.control.interrupt()

    def skip(self) -> None:
        with self._cv:
            if self._running is not None:
                self.live.skipped = True
                self.control.skip()

    def snapshot(self) -> tuple[Live, int]:
        """A copy of the live state and the number of requests waiting."""
        with self._cv:
            return Live(**vars(self.live)), len(self._waiting)

    def begin_shutdown(self) -> None:
        """Cancel the current image between steps and refuse everything queued (Ctrl-C)."""
        with self._cv:
            self._stopping = True
            if self._running is not None:
                self.live.interrupted = True
                self.control.interrupt()
            while self._waiting:
                future = self._waiting.popleft().future
                if future.set_running_or_notify_cancel():
                    future.set_exception(ApiError(503, "the server is shutting down"))
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # -- the generation thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                task = self._waiting.popleft()
                if not task.future.set_running_or_notify_cancel():
                    continue  # its client went away while it waited
                self._running = task
                self.control.reset()
                self.live = Live(task_id=task.id, job=task.kind, started=time.monotonic(),
                                 timestamp=datetime.now().strftime("%Y%m%d%H%M%S"))
            result, error = None, None
            try:
                result = self._run(task)
            except BaseException as exc:  # the handler answers it; this thread keeps serving
                if not isinstance(exc, (ApiError, InputError)):
                    log.exception("task %s failed", task.id)
                error = exc
            with self._cv:  # idle before the client hears back, so its next /progress says so
                self._running = None
                self._finished.append(task.id)
                self.live = Live()
            task.future.set_exception(error) if error is not None else task.future.set_result(result)

    def _run(self, task: Task):
        if task.kind == "switch":
            entry = self._pipeline_for(task.payload)[1]
            self.option_title = entry.title
            return entry
        request: GenerationRequest = task.payload
        with self._cv:
            self.live.num_images, self.live.steps = request.num_images, request.steps
            self.live.job = request.kind
        pipe, entry = self._pipeline_for(request.model or self.option_title)
        saved: dict[int, Path] = {}

        def on_image(index: int, image) -> None:
            if request.save:
                saved[index] = self._save(request, index, image)

        outcome = run_request(pipe, request, self.control, self._on_progress, on_image)
        return JobResult(outcome, saved, entry.title)

    def _on_progress(self, offset: int, event) -> None:
        with self._cv:
            live = self.live
            live.first, live.batch = offset + event.image_index, event.batch
            live.step, live.steps = event.step, event.steps
            live.latents = getattr(event, "latents", None)

    def _save(self, request: GenerationRequest, index: int, image) -> Path:
        from coreml_sd.images import save_image, slugify

        stem = f"{slugify(request.prompt)}-s{image.seed}-{index}"
        return save_image(image.image, self.config.output, stem, self.config.fmt, image.params)

    def _pipeline_for(self, title: str):
        """The pipeline of model `title`, loading it (and freeing the one loaded before) if needed."""
        try:
            entry = catalog.resolve(self.entries, title)
        except InputError as exc:
            raise field_error("sd_model_checkpoint", str(exc)) from None
        if self.pipe is not None and self.pipe_title == entry.title:
            return self.pipe, entry
        if self.pipe is not None:
            log.info("freeing %s", self.pipe_title)
            self.pipe, self.pipe_title = None, None
            gc.collect()  # the components hold the weights; drop them before the next model loads
        log.info("loading %s", entry.title)
        self.pipe = self._loader(entry)
        self.pipe_title = entry.title
        return self.pipe, entry

    def rescan(self) -> None:
        """Read --models-dir again (A1111's refresh-checkpoints); the loaded model stays."""
        entries, _ = initial_entries(self.config)
        with self._cv:
            self.entries = entries
