"""One line per long phase on a terminal, so a command is never silent for long ("loading the source model...").

A phase's line appears only once the phase has run for `delay` seconds: quick phases print
nothing, and nothing is printed when stderr is not a terminal or the user asked for --quiet or
--json (the caller passes `enabled`).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class StatusLine:
    """`status("what is happening")` starts a phase; `close()` (or leaving the `with`) ends the last one."""

    def __init__(self, enabled: bool = True, *, stream: TextIO | None = None, delay: float = 1.0, prefix: str = ""):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.delay, self.prefix = delay, prefix
        self._timer: threading.Timer | None = None
        self._started = 0.0

    @classmethod
    def for_terminal(cls, *, quiet: bool, as_json: bool, prefix: str = "") -> "StatusLine":
        stream = sys.stderr
        return cls(not quiet and not as_json and stream.isatty(), stream=stream, prefix=prefix)

    def __call__(self, text: str) -> None:
        self.close()
        if not self.enabled:
            return
        self._started = time.perf_counter()
        self._timer = threading.Timer(self.delay, self._show, args=(text,))
        self._timer.daemon = True
        self._timer.start()

    def _show(self, text: str) -> None:
        self.stream.write(f"{self.prefix}{text}...\n")
        self.stream.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __enter__(self) -> "StatusLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
