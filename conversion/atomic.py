"""Write a folder atomically: build it under a hidden name beside the target, rename when done.

An exception, Ctrl-C or SIGTERM/SIGHUP removes the partial folder; a SIGKILL cannot be caught,
so its partial folder (hidden, named after the target and the process id) is removed by the next
conversion to the same target once that process is gone. The target itself only ever appears
complete.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from coreml_sd.errors import CoreMLSDError

PARTIAL_TAG = ".partial-"


class OutputExists(CoreMLSDError):
    """The output folder exists and --force was not given."""


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception, so cleanup runs as for Ctrl-C."""


def partial_name(target: Path, pid: int) -> Path:
    return target.parent / f".{target.name}{PARTIAL_TAG}{pid}-{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete partial folders of `target` left by processes that no longer exist."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.glob(f".{target.name}{PARTIAL_TAG}*"):
        pid_text = p.name[len(f".{target.name}{PARTIAL_TAG}"):].split("-")[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_target(target: Path, *, force: bool) -> Path:
    target = Path(target).expanduser().absolute()
    if target.exists() and not force:
        raise OutputExists(f"{target} already exists; pass --force to replace it, or choose another -o folder")
    if target.exists() and not target.is_dir():
        raise OutputExists(f"{target} exists and is a file, not a model folder; remove it or choose another -o")
    return target


@contextlib.contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def atomic_folder(target: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `target`; on success it becomes `target`."""
    target = check_target(target, force=force)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = partial_name(target, os.getpid())
    tmp.mkdir()
    try:
        with _signals_as_exceptions():
            yield tmp
            _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(3)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def link_copy(source: Path, target: Path) -> None:
    """A second name for a folder's files: hard links (no extra disk) where the file system allows,
    copies where it does not."""
    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)
