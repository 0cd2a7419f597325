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


# What coreml-sd itself puts in the cache folder. `cache clear` removes only these names, so a
# $COREML_SD_CACHE pointed at a folder with other files (by mistake, at $HOME) loses nothing else.
CACHE_ENTRIES = {
    "compiled": "compiled Core ML models (.mlmodelc)",
    "index": "fingerprints of packages -> compiled models",
    "hashes.json": "sha256 of large checkpoints, by path, size and mtime",
    "bench": "benchmark models with random weights and their conversions",
    "tmp": "work area of compilations in progress",
    "locks": "compilation locks",
    "trash": "entries being removed",
}


def tree_size(path: Path) -> int:
    """Bytes of the files under `path` (a file: its size; links are not followed; unreadable parts count 0)."""
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
    except OSError:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path, onerror=lambda exc: None):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def cache_usage(root: Path | None = None) -> dict:
    """Where the cache is and what it holds:
    {"path", "exists", "set_by", "size_bytes", "entries": {name: bytes}, "other": [names not ours]}."""
    root = cache_root() if root is None else Path(root)
    entries, other = {}, []
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.name in CACHE_ENTRIES:
                entries[child.name] = tree_size(child)
            else:
                other.append(child.name)
    return {"path": str(root), "exists": root.is_dir(), "set_by": ENV_VAR if os.environ.get(ENV_VAR) else "default",
            "size_bytes": sum(entries.values()), "entries": entries, "other": other}


def clear_cache(root: Path | None = None) -> dict:
    """Remove what coreml-sd keeps in the cache (CACHE_ENTRIES only); returns what was removed and its size.

    Everything in it can be made again: compiled models recompile on next load, hashes are recomputed.
    Run it while no other coreml-sd process is compiling into the same cache.
    """
    import shutil

    usage = cache_usage(root)
    root = Path(usage["path"])
    removed = []
    for name in usage["entries"]:
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(name)
    return {"path": str(root), "removed": removed, "freed_bytes": usage["size_bytes"], "kept": usage["other"]}
