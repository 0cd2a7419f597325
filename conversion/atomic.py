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
from coreml_sd.outputs import check_output_dir, write_failure
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
            _replace(tmp, target, force)
    except BaseException as exc:
        inner = write_failure(exc, tmp)  # before the partial folder goes: a full disk is still full now
        shutil.rmtree(tmp, ignore_errors=True)
        if inner is not None and _about_output(inner, tmp, target, exc):
            raise _output_error(inner, target) from None
        raise


def _about_output(inner: OSError, tmp: Path, target: Path, raised: BaseException) -> bool:
    """Whether an OS error concerns the folder being written (not, say, the source being read)."""
    if inner.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True  # only writing runs into these
    where = str(inner.filename or "") if inner is raised else str(raised)
    return str(tmp) in where or str(target) in where


def _output_error(exc: OSError, target: Path) -> CoreMLSDError:
    from coreml_sd.outputs import describe_os_error

    return describe_os_error(exc, "the model folder", target)


def _replace(tmp: Path, target: Path, force: bool) -> None:
    """Rename the finished folder into place. Without `force` a folder that appeared meanwhile (another
    conversion to the same -o) is never replaced: this one fails and the other's stays whole."""
    try:
        os.rename(tmp, target)  # refused if target is a non-empty folder
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
    if not force:
        raise OutputExists(f"{target} appeared while converting (another conversion to the same folder?); it was "
                           f"left as it is: pass --force to replace it, or choose another -o folder")
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
