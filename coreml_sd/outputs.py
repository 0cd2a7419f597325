"""Writing outputs safely: check the place first, publish complete files only, say what an OS error means.

Every writer (images, `to-safetensors`, model folders) writes to a hidden temporary name in the
destination folder, `.<name>.partial-<pid>-<hex>`, and publishes it under its final name only
when complete. A SIGKILL cannot be caught, so temporaries whose process is gone are removed the
next time something is written to that folder (`remove_stale_partials`). OS errors (a full disk,
a file-size limit, a read-only or unwritable folder, a file where a folder belongs) become one
`OutputError` naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from coreml_sd.errors import OutputError
from coreml_sd.paths import os_error_text

PARTIAL_TAG = ".partial-"
OLD_TAG = ".old-"
# .<name>.partial-<pid>-<hex>[.ext] and .<name>.old-<pid>-<hex>: what a killed writer leaves behind.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<tag>partial|old)-(?P<pid>\d+)-[0-9a-f]{6}(?:\.\w+)?$")
# Errors that are about the destination whatever the file name says.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def temporary_name(final: Path, pid: int | None = None) -> Path:
    """A hidden name beside `final` that says whose it is (process id) and is unique (random hex)."""
    pid = os.getpid() if pid is None else pid
    return final.parent / f".{final.name}{PARTIAL_TAG}{pid}-{secrets.token_hex(3)}"


def default_file_mode() -> int:
    """0o666 less this process's umask: the mode `open()` would give a new file."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere umask can only be read by setting it; put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid at all: leave its files alone
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove temporaries in `folder` whose writer process is gone; return what was removed or restored.

    A `.old-` folder is a model folder set aside during `convert --force`: if its process died
    before the new folder took its place, it is put back instead of being deleted.
    """
    touched = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return touched
    for path in entries:
        m = _LEFTOVER.match(path.name)
        if not m or m.group("pid") == str(os.getpid()) or pid_alive(int(m.group("pid"))):
            continue
        final = path.parent / m.group("name")
        with contextlib.suppress(OSError):
            if m.group("tag") == "old" and not final.exists():
                os.rename(path, final)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            touched.append(path)
    return touched


def describe_os_error(exc: OSError, what: str, path: Path) -> OutputError:
    """One line: what could not be written, where, and why."""
    where = exc.filename if exc.filename and exc.errno not in _WRITE_ERRNOS else path
    return OutputError(f"cannot write {what} {where}: {os_error_text(exc)}")


def embedded_os_error(exc: BaseException) -> OSError | None:
    """The OS error inside a library's own exception (safetensors: "I/O error: ... (os error 28)";
    C++ writers: "No space left on device"), or None."""
    text = str(exc)
    m = re.search(r"\(os error (\d+)\)", text)
    if m:
        return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    for code in sorted(_WRITE_ERRNOS):
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


LOW_SPACE_BYTES = 64 << 20


def diagnose_write_failure(folder: Path) -> OSError | None:
    """The likely cause when a library's writer fails without saying why (coremltools' weight writer
    raises "[MIL FileWriter]: Unknown error occurred while writing data to the file"): a file-size
    limit, a (nearly) full disk or an unwritable folder; None when none of them holds."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            return OSError(errno.EFBIG, f"file too large for the file-size limit (ulimit -f: {soft} bytes)")
    except (ImportError, OSError, ValueError):
        pass
    try:
        if shutil.disk_usage(folder).free < LOW_SPACE_BYTES:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        pass
    if not os.access(folder, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES))
    return None


def write_failure(exc: BaseException, folder: Path) -> OSError | None:
    """The OS error behind `exc` raised while writing into `folder`: its own, one quoted in its message,
    or (for a library writer that failed without a reason) the diagnosed cause."""
    if isinstance(exc, OSError):
        return exc
    if not isinstance(exc, Exception):
        return None  # Ctrl-C, SystemExit
    inner = embedded_os_error(exc)
    if inner is None and "writ" in str(exc).lower():
        inner = diagnose_write_failure(folder)
    return inner


@contextlib.contextmanager
def output_errors(what: str, path: Path, *, library_errors: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn an OSError raised while writing `what` at `path` into an OutputError; `library_errors`:
    exception types of a writing library that carry an OS error in their message."""
    try:
        yield
    except OSError as exc:
        raise describe_os_error(exc, what, Path(path)) from None
    except library_errors as exc:
        inner = embedded_os_error(exc)
        if inner is None:
            raise
        raise describe_os_error(inner, what, Path(path)) from None


def nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(path: str | Path) -> Path:
    """Check, before any work, that `path` can be created (if absent) and written; nothing is left behind.

    Raises OutputError naming the path and the cause: a file where a folder belongs, no permission,
    a read-only file system. Stale temporaries of dead processes in the folder are removed.
    """
    path = Path(path).expanduser()
    base = nearest_existing(path)
    if not base.is_dir():
        raise OutputError(f"cannot write to {path}: {base} is {'a file' if base.is_file() else 'in the way'}, "
                          f"not a folder; choose another output folder")
    try:
        # A real probe: permission bits, ACLs, read-only mounts and full quotas all answer here.
        probe = tempfile.mkdtemp(prefix=".coreml-sd-probe-", dir=base)
        os.rmdir(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {path}: {base} is not writable ({os_error_text(exc)})") from None
    if base == path:
        remove_stale_partials(path)
    return path


def create_temporary(final: Path) -> tuple[int, Path]:
    """Open a new temporary file beside `final` for writing (mode from the umask, never an existing file)."""
    while True:
        tmp = temporary_name(final)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def publish(tmp: Path, final: Path) -> None:
    """Give the complete file `tmp` the name `final`, never replacing a file that is already there.

    A hard link fails if the name exists; where the file system has no hard links, a rename after
    a check is the fallback (a rename would silently replace a file that appeared in between).
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        if os.path.lexists(final):
            raise FileExistsError(errno.EEXIST, "File exists", str(final)) from None
        os.rename(tmp, final)
        return
    os.unlink(tmp)
