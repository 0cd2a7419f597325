"""Facts about the machine a measurement ran on, and its memory use.

A latency without the machine, OS, chip, accelerator and library versions misleads, and so does
one taken on a busy machine: every result records these and the load average around the run.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

LIBRARIES = ("torch", "diffusers", "transformers", "coremltools", "numpy")


def _sysctl(name: str) -> str:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or platform.machine()
    return platform.processor() or platform.machine()


def os_name() -> str:
    if sys.platform == "darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{platform.system()} {platform.release()}"


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# Other work keeping half the cores busy already distorts latencies: torch's thread team waits for
# its slowest member, and a core shared with another process makes every parallel op slower.
BUSY_LOAD_PER_CORE = 0.5


def busy_note(load_before: list[float] | None, cores: int | None = None) -> str | None:
    """A warning when the machine was busy before a measurement started (None when it was quiet
    or the OS reports no load). The load before the run is other processes' alone."""
    if not load_before:
        return None
    cores = cores or os.cpu_count() or 1
    if load_before[0] < BUSY_LOAD_PER_CORE * cores:
        return None
    return (f"busy machine: 1-minute load average {load_before[0]} on {cores} cores before the run; latencies are "
            f"inflated and vary between runs, so compare ratios within one run and measure again when it is quiet")


def accelerator() -> str:
    """What could run the model besides the CPU: a CUDA GPU, Apple's GPU and Neural Engine, or none."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return f"{cpu_model()} GPU and Neural Engine"
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    return "none"


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing coremltools just to ask is slow)."""
    from importlib import metadata

    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict:
    """Machine, OS, chip/CPU, accelerator and library versions for a result file."""
    info = {
        "hostname_hint": platform.node()[:8],
        "os": os_name(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "accelerator": accelerator(),
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
    }
    info.update(library_versions())
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        if torch.cuda.is_available():
            info["cuda"] = torch.version.cuda
    return info


def peak_rss_gib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


class RSSSampler:
    """Peak RSS over a block (sampled every 20 ms), for phases inside one process."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self):
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        import psutil

        self.peak = psutil.Process().memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gib(self) -> float:
        return self.peak / 2**30


def evict_page_cache(paths) -> bool:
    """Drop the cached pages of every file under `paths` (Linux), so the next read is cold.

    Returns False where the OS offers no way to do this without privileges (macOS, Windows).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            with open(path, "rb") as fh:
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return True
