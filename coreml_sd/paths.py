"""What is at a path, said precisely: a symlink loop, a FIFO or a missing file each get their own words.

`Path.exists()` answers False for a symlink loop and a permission problem alike, and opening a
FIFO for reading blocks until some other process writes to it; so an input file is `stat`ed first
and only a regular file (or a folder, where one is expected) is ever opened.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from coreml_sd.errors import ModelError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def os_error_text(exc: OSError) -> str:
    """The cause of an OS error in words: 'no space left on the device', 'permission denied', ..."""
    words = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file too large for the file-size limit (ulimit -f) or the file system",
             errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a folder",
             errno.ELOOP: "a symbolic link loop", errno.ENOENT: "no such file or folder",
             errno.EISDIR: "is a folder", errno.ENAMETOOLONG: "the name is too long"}
    return words.get(exc.errno, exc.strerror or str(exc))


def describe_missing(path: Path) -> str | None:
    """Why `path` cannot be read as an existing file or folder, or None when it can be stat'ed."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop (a link that points back to itself)"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return f"{path} is a broken symbolic link (it points to {os.readlink(path)}, which does not exist)"
        if exc.errno == errno.ENOENT:
            return f"{path} does not exist"
        return f"cannot read {path}: {os_error_text(exc)}"
    return None


def describe_input(path: Path) -> str | None:
    """Why `path` is not an input file or folder (missing, a link loop, a FIFO, a device), or None."""
    problem = describe_missing(path)
    if problem:
        return problem
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return f"{path} is {file_kind(mode)}, not a file or folder"
    return None


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def require_regular_file(path: Path, what: str = "a tensor file") -> os.stat_result:
    """The stat of `path` if it is a regular file (after symlinks); a ModelError saying what it is otherwise."""
    problem = describe_missing(path)
    if problem:
        raise ModelError(f"{problem}; expected {what}")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{path} is {file_kind(st.st_mode)}, not a regular file; expected {what}")
    return st
