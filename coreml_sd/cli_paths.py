"""A click path type that says what is wrong with a path: a symlink loop, a FIFO, a folder where a file belongs.

click's own `Path(exists=True)` reports a symlink loop as "does not exist" and accepts a FIFO,
which a reader then waits on forever.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import click

from coreml_sd.paths import describe_missing, file_kind


class InputPath(click.ParamType):
    """An existing file (`file_okay`) or folder (`dir_okay`), returned as a `Path`."""

    name = "path"

    def __init__(self, *, file_okay: bool = True, dir_okay: bool = True):
        self.file_okay, self.dir_okay = file_okay, dir_okay

    def convert(self, value, param, ctx) -> Path:
        if isinstance(value, Path):
            path = value
        else:
            path = Path(os.fsdecode(value)).expanduser()
        problem = describe_missing(path)
        if problem:
            self.fail(problem, param, ctx)
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode) and not self.dir_okay:
            self.fail(f"{path} is a folder; expected a file", param, ctx)
        if not stat.S_ISDIR(mode) and not self.file_okay:
            self.fail(f"{path} is {file_kind(mode)}; expected a folder", param, ctx)
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            self.fail(f"{path} is {file_kind(mode)}, not a regular file", param, ctx)
        return path
