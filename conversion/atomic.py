"""Write a folder atomically: build it under a hidden name beside the target, rename when done.

An exception, Ctrl-C or SIGTERM/SIGHUP removes the partial folder; a SIGKILL cannot be caught,
so its partial folder (hidden, named after the target and the process id) is removed by the next
conversion into the same parent folder once that process is gone (`coreml_sd.outputs`). The
target itself only ever appears complete. An OS error while writing (a full disk, a file-size
limit, a read-only folder) is one OutputError naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
from pathlib import Path
from typing import Iterator

from coreml_sd.errors import CoreMLSDError
from coreml_sd.outputs import check_output_dir, embedded_os_error
from coreml_sd.outputs import remove_stale_partials as remove_stale_in
from coreml_sd.outputs import temporary_name


class OutputExists(CoreMLSDError):
    """The output folder exists and --force was not given."""


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception, so cleanup runs as for Ctrl-C."""


def partial_name(target: Path, pid: int) -> Path:
    return temporary_name(target, pid)


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete partial folders (of any target) in `target`'s parent left by processes that no longer exist."""
    return remove_stale_in(target.parent) if target.parent.is_dir() else []


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
    check_output_dir(target.parent)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(target)
        tmp = partial_name(target, os.getpid())
        tmp.mkdir()
    except OSError as exc:
        raise _output_error(exc, target) from None
    try:
        with _signals_as_exceptions():
            yield tmp
            _replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        inner = exc if isinstance(exc, OSError) else embedded_os_error(exc) if isinstance(exc, Exception) else None
        if inner is not None and _about_output(inner, tmp, target):
            raise _output_error(inner, target) from None
        raise


def _about_output(exc: OSError, tmp: Path, target: Path) -> bool:
    """Whether an OS error concerns the folder being written (not, say, the source being read)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True
    name = str(exc.filename or "")
    return bool(name) and (name.startswith(str(tmp)) or name.startswith(str(target)))


def _output_error(exc: OSError, target: Path) -> CoreMLSDError:
    from coreml_sd.outputs import describe_os_error

    return describe_os_error(exc, "the model folder", target)


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
