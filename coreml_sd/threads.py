"""How many CPU threads torch should use for a model on this machine.

torch's default (one thread per core) is right for a big model on an idle machine and badly wrong
for a small one or on a busy machine: a thread team re-forms for every op, and when a core is
taken by another process the team waits for its slowest member. On the 2-core VM this project is
developed on, one UNet call of the built-in model took 2.8 s with 2 threads and 36 ms with one
while other jobs ran (issue 19; remeasured in benchmarks/results/threads_builtin.json). So:

* a small model (under SMALL_MODEL_PARAMS parameters) gets one thread: its ops are too short to
  split;
* a big one gets the physical cores that the load average leaves idle, at least one. Hyper-threads
  share one core's matrix units, which a UNet's convolutions already keep busy.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

SMALL_MODEL_PARAMS = 50_000_000  # the built-in model has 3 M; SD 1.5's UNet alone 860 M
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def choose_threads(model_params: int, cores: int, load: float) -> int:
    """Threads for a model of `model_params` parameters on `cores` physical cores whose other work
    keeps `load` of them busy (the 1-minute load average, less this process)."""
    cores = max(1, int(cores))
    if model_params < SMALL_MODEL_PARAMS:
        return 1
    idle = cores - max(0.0, float(load))
    return max(1, min(cores, int(idle + 0.5)))


def physical_cores() -> int:
    """Physical cores this process may run on (affinity and hyper-threads taken into account)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_core = _threads_per_core()
    return max(1, logical // per_core)


def _threads_per_core() -> int:
    if sys.platform == "darwin":
        return 1  # Apple silicon has no SMT; Intel Macs report hw.physicalcpu, but 2 is the rule there
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            text = fh.read()
    except OSError:
        return 1
    siblings = [int(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("siblings")]
    cores = [int(ln.split(":")[1]) for ln in text.splitlines() if ln.startswith("cpu cores")]
    if siblings and cores and cores[0] > 0:
        return max(1, siblings[0] // cores[0])
    return 1


def other_load() -> float:
    """How many cores other programs keep busy now: on Linux the runnable count of /proc/loadavg
    (sampled over 0.1 s, median, less this process); elsewhere the 1-minute load average.

    The load average lags by about a minute: right after another job ends it still reports that
    job, and a conversion started then ran on one thread of two at half speed (issue 18: the SD 1.5
    conversion's VAE reference took 59 s instead of 29 s after the benchmark's own model build).
    """
    now = runnable_now()
    if now is not None:
        return float(max(0, now - 1))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def runnable_now(samples: int = 5, interval: float = 0.02) -> int | None:
    """The median runnable-thread count of /proc/loadavg (this reader included) over `samples`
    readings `interval` s apart; None where the OS has no /proc/loadavg."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/loadavg", encoding="ascii") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]))
        except (OSError, ValueError, IndexError):
            return None
        if i + 1 < samples:
            time.sleep(interval)
    return sorted(counts)[len(counts) // 2]


def estimate_params(path: str | Path | None) -> int:
    """Parameters of the model at `path`, from its weight files' size (2 bytes each, as fp16 stores them).

    Good to the factor of two that the 50 M threshold needs; nothing is read. None: the built-in model.
    """
    if path is None:
        from coreml_sd.sources import builtin_checkpoint

        path = builtin_checkpoint()
    path = Path(path)
    if path.is_file():
        return path.stat().st_size // 2
    if path.is_dir():
        files = (p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES or p.name == "weight.bin")
        return sum(p.stat().st_size for p in files if p.is_file()) // 2
    return 0


def apply_threads(requested: int | None, model_params: int) -> int:
    """Set torch's thread count (where torch is loaded) to `requested`, or to `choose_threads`' choice."""
    threads = requested or choose_threads(model_params, physical_cores(), other_load())
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    log.info("using %d CPU thread(s) for a model of about %d M parameters", threads, model_params // 10**6)
    return threads
