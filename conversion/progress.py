"""Timing and memory of each conversion stage, reported to a callback as it ends."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from coreml_sd.memory import peak_rss_bytes, release_memory

__all__ = ["StageRecord", "StageTimer", "current_rss_bytes", "peak_rss_bytes", "release_memory"]


def current_rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class StageRecord:
    component: str  # "model" for whole-model stages (load, hash, write)
    stage: str  # load | hash | reference | trace | compress | convert | verify | gate wait | compile | write
    seconds: float
    peak_rss_gib: float  # highest RSS seen during this stage (sampled), or the process peak so far
    detail: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 2)
        d["peak_rss_gib"] = round(self.peak_rss_gib, 3)
        return d


class _Sampler:
    """Samples RSS every 20 ms in a thread (Linux); elsewhere falls back to the process peak."""

    def __init__(self):
        self.peak = current_rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True) if self.peak else None

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, current_rss_bytes() or 0)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()
            self.peak = max(self.peak, current_rss_bytes() or 0)
        else:
            self.peak = peak_rss_bytes()


class StageTimer:
    """`with timer(component, stage):` records a StageRecord and passes it to `on_stage`."""

    def __init__(self, on_stage: Callable[[StageRecord], None] | None = None):
        self.on_stage = on_stage
        self.records: list[StageRecord] = []

    @contextlib.contextmanager
    def __call__(self, component: str, stage: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        with _Sampler() as sampler:
            yield
        self.record(StageRecord(component, stage, time.perf_counter() - start, sampler.peak / 2**30, detail))

    def record(self, record: StageRecord) -> None:
        """Add a stage measured elsewhere (a gate run in the worker process)."""
        self.records.append(record)
        if self.on_stage is not None:
            self.on_stage(record)

    def summary(self) -> dict[str, dict]:
        """Per component: total seconds and the peak RSS over its stages."""
        out: dict[str, dict] = {}
        for r in self.records:
            s = out.setdefault(r.component, {"seconds": 0.0, "peak_rss_gib": 0.0})
            s["seconds"] = round(s["seconds"] + r.seconds, 2)
            s["peak_rss_gib"] = round(max(s["peak_rss_gib"], r.peak_rss_gib), 3)
        return out
