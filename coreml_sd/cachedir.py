"""Where coreml-sd keeps what it can make again: compiled Core ML models, file hashes, bench models."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Mapping

ENV_VAR = "COREML_SD_CACHE"
APP = "coreml-sd"


def cache_root(environ: Mapping[str, str] | None = None, system: str | None = None, home: Path | None = None) -> Path:
    """$COREML_SD_CACHE, else the platform's user cache folder (~/Library/Caches, $XDG_CACHE_HOME, ~/.cache)."""
    environ = os.environ if environ is None else environ
    system = sys.platform if system is None else system
    home = Path.home() if home is None else Path(home)
    if environ.get(ENV_VAR):
        return Path(environ[ENV_VAR]).expanduser()
    if system == "darwin":
        return home / "Library" / "Caches" / APP
    if environ.get("XDG_CACHE_HOME"):
        return Path(environ["XDG_CACHE_HOME"]).expanduser() / APP
    return home / ".cache" / APP
