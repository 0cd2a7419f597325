"""Helpers of the fault matrix: run `python -m coreml_sd ...` in a child with a fault (a signal at a
chosen moment, a file-size limit, no write permission) and inspect what it left behind."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What an interrupted writer may leave (hidden temporaries) and what the write probe makes.
LEFTOVER = re.compile(r"^\..*\.(partial|old)-\d+-[0-9a-f]{6}|^\.coreml-sd-probe-")
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("COLUMNS", None)
    return env


def _preexec(fsize: int | None, drop_dac: bool):
    def setup():
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a child of a background job would inherit SIG_IGN
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        if drop_dac:
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
                if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    return setup


def can_drop_root_write_override() -> bool:
    """Whether a child can be made subject to permission bits (not root, or root able to drop
    CAP_DAC_OVERRIDE), so that a read-only folder is read-only to it."""
    if os.geteuid() != 0:
        return True
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_preexec(None, True), capture_output=True)
    return probe.returncode == 0


def run_cli(*args, fsize: int | None = None, drop_dac: bool = False, timeout: float = 600) -> Outcome:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "coreml_sd", *map(str, args)], capture_output=True, text=True,
                          env=child_env(), timeout=timeout, preexec_fn=_preexec(fsize, drop_dac and os.geteuid() == 0))
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


def interrupt_cli(*args, delay: float, sig: int, timeout: float = 600) -> Outcome:
    """Start the command, send `sig` after `delay` seconds (if it is still running), wait for it."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "coreml_sd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), preexec_fn=_preexec(None, False))
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return Outcome(proc.returncode, out, err, time.perf_counter() - start)


def start_cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coreml_sd", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(), preexec_fn=_preexec(None, False))


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path (to show earlier outputs are untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if LEFTOVER.match(p.name)) if Path(folder).is_dir() else []


def image_is_complete(path: Path) -> bool:
    """The whole image decodes and carries its generation parameters."""
    from PIL import Image

    from coreml_sd.images import read_parameters

    with Image.open(path) as im:
        im.load()
    return bool(read_parameters(path))


def one_line_error(outcome: Outcome) -> str:
    """The last stderr line, checked to be our one-line error (no traceback)."""
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    lines = [ln for ln in outcome.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith(("Error: ", "Stopped: ")), outcome.stderr[-3000:]
    return lines[-1]
