"""Running the parity gate's packages beside the conversion, in a worker process.

A package's gate run (load it, run it in the `mil` executor's exact mode or Core ML, on the seeded
inputs) needs nothing from the conversion but files and a few small arrays. So while the worker
checks one component, the conversion goes on with the next: the text encoder's and the VAE's
checks overlap the UNet's reference, trace and coremltools conversion, which run Python on one
core. The conversion then waits for every check before the folder is renamed into place: a
failed check still means nothing is written, and the figures are the same as run in-process.

Both processes use one torch thread each while the worker is busy (two threads each on two cores
spin and wait for each other); the check submitted last, when the conversion has nothing left to
do, gets every core unless other programs keep the machine busy: exact mode's thousands of small
ops then wait for a descheduled second thread at every op (the SD 1.5 UNet's check took 250-330 s
with two threads at load 5, ~30 s on an idle machine). `inline` runs the checks in this process,
one at a time, for small models where starting a worker costs more than it saves.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from conversion.export import ConversionError

log = logging.getLogger(__name__)

# A chain step: (package path, [(input name, "fp16" | "fp32" | ...)]) run in order; each package
# takes its inputs by name from the gate's inputs and the earlier packages' outputs.
ChainStep = tuple[Path, list[tuple[str, str]]]


def run_chain(run: Callable[[Path, dict], dict], chain: list[ChainStep], inputs: dict[str, np.ndarray],
              outputs: list[str]) -> dict[str, np.ndarray]:
    from coreml_sd.memory import release_memory

    values = dict(inputs)
    for package, specs in chain:
        feed = {name: np.asarray(values[name], dtype=np.float16 if dtype == "fp16" else np.float32)
                for name, dtype in specs}
        values.update(run(package, feed))
        release_memory()
    return {name: values[name] for name in outputs}


@dataclass
class GateRun:
    component: str
    outputs: dict[str, np.ndarray]
    seconds: float
    peak_rss_gib: float
    every_core: bool = False  # ran with torch's own thread count, not one thread


_DEFAULT_THREADS: int | None = None  # torch's thread count in the process running gate jobs


def _run_job(job: dict) -> GateRun:
    """One gate run (in whichever process): the chain's outputs, time and peak memory."""
    import torch

    from conversion.progress import _Sampler
    from conversion.verify import PackageRunner

    global _DEFAULT_THREADS
    if _DEFAULT_THREADS is None:
        _DEFAULT_THREADS = torch.get_num_threads()
    torch.set_num_threads(job["threads"] or _DEFAULT_THREADS)
    start = time.perf_counter()
    runner, outputs = PackageRunner(), {}
    with _Sampler() as sampler, runner.keep_loaded(len(job["cases"]) > 1):
        for label, inputs in job["cases"]:  # several sizes through one package, loaded once
            got = run_chain(runner.run, job["chain"], inputs, job["outputs"])
            outputs.update({f"{name}{label}": value for name, value in got.items()})
    return GateRun(job["component"], outputs, time.perf_counter() - start, sampler.peak / 2**30,
                   every_core=job["threads"] is None)


def _worker(jobs, results, parent: int) -> None:
    """The worker's loop: jobs in order until None, or until the converting process is gone."""
    while True:
        try:
            job = jobs.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:  # the conversion was killed: stop instead of lingering
                return
            continue
        if job is None:
            return
        try:
            results.put(("ok", _run_job(job)))
        except BaseException as exc:  # reported to the conversion, which fails with it
            results.put(("error", (job["component"], f"{type(exc).__name__}: {exc}")))


def others_running() -> bool:
    """Whether other programs are running now (coreml_sd.threads.runnable_now; elsewhere False)."""
    from coreml_sd.threads import runnable_now

    return (runnable_now() or 0) > 1


class GateRunner:
    """Submit gate runs; collect them in order. `background`: in a worker process, else inline."""

    def __init__(self, *, background: bool):
        import torch

        self.background = background
        self.threads = torch.get_num_threads()  # this process's, restored when the worker is idle
        self.pending: list[str] = []
        self.done: list[GateRun] = []
        self.process = None
        if background:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # never fork a process that runs torch threads
            self.jobs, self.results = ctx.Queue(), ctx.Queue()
            self.process = ctx.Process(target=_worker, args=(self.jobs, self.results, os.getpid()),
                                       name="coreml-sd-gate", daemon=True)
            self.process.start()

    @property
    def busy(self) -> bool:
        self._collect(block=False)
        return bool(self.pending)

    def submit(self, component: str, chain: list[ChainStep], cases: list[tuple[str, dict[str, np.ndarray]]],
               outputs: list[str], *, last: bool = False) -> None:
        """Start a gate run over `cases` [(label, inputs)]: each output comes back as name + label.
        `last`: nothing else will run meanwhile, so it may use every core."""
        every_core = last and not others_running()
        job = {"component": component, "chain": chain, "cases": cases, "outputs": outputs,
               "threads": None if every_core or not self.background else 1}
        if not self.background:
            job["threads"] = self.threads
            self.done.append(_run_job(job))
            return
        self.pending.append(component)
        self.jobs.put(job)

    def balance_threads(self) -> None:
        """This process's torch threads: one while the worker runs a check, else all."""
        import torch

        want = 1 if self.background and self.busy else self.threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def take(self) -> list[GateRun]:
        """Finished runs not taken yet (raises when a run failed)."""
        self._collect(block=False)
        done, self.done = self.done, []
        return done

    def wait(self) -> list[GateRun]:
        """Every submitted run, waiting for those still running."""
        while self.pending:
            self._collect(block=True)
        return self.take()

    def _collect(self, *, block: bool) -> None:
        while self.pending:
            try:
                status, value = self.results.get(timeout=5.0) if block else self.results.get_nowait()
            except queue.Empty:
                if block and not self.process.is_alive():
                    raise ConversionError(f"the gate worker stopped (exit code {self.process.exitcode}) while "
                                          f"checking {self.pending[0]}; nothing was written") from None
                if block:
                    continue
                return
            self.pending.pop(0)
            if status == "error":
                component, message = value
                raise ConversionError(f"the parity gate could not run {component}: {message}; nothing was written")
            self.done.append(value)

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            if self.pending:
                self.process.terminate()
            else:
                self.jobs.put(None)
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
        self.process = None
