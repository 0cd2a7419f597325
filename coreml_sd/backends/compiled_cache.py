"""Compiled Core ML models (`.mlmodelc`), cached per user so that later launches do not recompile.

Core ML runs a package only after compiling it (seconds for a text encoder, a minute or more for
an SD UNet); tools that recompile at every launch are a common complaint. The first load compiles
into this cache; later loads find the compiled model by a cheap fingerprint of the package.

Keys, and what each costs:

* *quick fingerprint* (every launch, milliseconds): sha256 over each file's relative path, size and
  modification time, plus the full bytes of the small files (Manifest.json, the model spec
  `model.mlmodel`); the weight file (1.7 GB for an SD UNet) is never read. It names an index file
  pointing at an entry.
* *content hash* (once, when the fingerprint is new): sha256 of every byte of the package. Entries
  are named by it and the OS version, so a package that was copied or touched finds its compiled
  model again after one full read instead of a recompilation, and an OS update (a new compiler)
  compiles afresh.

Compute units are not part of the compiled model: Core ML compiles once and picks the units when
loading, so one `.mlmodelc` serves `ane`, `gpu`, `cpu` and `all` (keying it by the units would
store the same gigabytes four times). Each entry records the units it was loaded with.

Layout under the root (`~/Library/Caches/coreml-sd` on macOS, `$XDG_CACHE_HOME/coreml-sd`
elsewhere, `$COREML_SD_CACHE` when set):

    index/<fingerprint>.json              {"entry": "<entry name>", "package": "<path>"}
    compiled/<hash>-<os>/<Name>.mlmodelc   the compiled model
    compiled/<hash>-<os>/entry.json        package path, content hash, OS, creation time
    compiled/<hash>-<os>/units/<UNITS>     one empty file per compute units it was loaded with
    tmp/  locks/  trash/                   work areas

Writes are atomic: an entry is compiled into `tmp/` and renamed into `compiled/` whole (a rename
onto an existing entry fails, and the loser of a race uses the winner's); index files are written
to a temporary name and replaced. A lock per entry keeps two launches from compiling the same
package twice. Entries compiled for another OS version, and older entries of a package that
changed, are removed after a new compilation (renamed into `trash/` first, so no reader ever sees
half an entry).

Only `compile_fn` (coremltools, macOS) needs Core ML: everything else runs and is tested anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from coreml_sd.cachedir import ENV_VAR, cache_root  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SMALL_FILE = 16 << 20  # files up to this size (spec, manifests) are hashed whole in the quick fingerprint
ENTRY_FILE = "entry.json"

CompileFn = Callable[[Path, Path], object]  # (package, destination .mlmodelc) -> anything


def current_os_version() -> str:
    """The OS whose Core ML compiler made an entry, e.g. "macos-14.5" (elsewhere: the kernel release)."""
    mac = platform.mac_ver()[0]
    return f"macos-{mac}" if mac else f"{platform.system().lower()}-{platform.release()}"


def _files(package: Path) -> list[Path]:
    return sorted(p for p in Path(package).rglob("*") if p.is_file())


def quick_fingerprint(package: Path) -> str:
    """Cheap identity of a package's current bytes (see the module docstring)."""
    package = Path(package)
    h = hashlib.sha256(f"v{FORMAT_VERSION}\n".encode())
    for file in _files(package):
        st = file.stat()
        h.update(f"{file.relative_to(package).as_posix()}\0{st.st_size}\0".encode())
        if st.st_size <= SMALL_FILE:
            h.update(file.read_bytes())
        else:
            h.update(f"{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def content_hash(package: Path, chunk: int = 8 << 20) -> str:
    """sha256 over every file of the package: relative path, size, bytes."""
    package = Path(package)
    h = hashlib.sha256()
    for file in _files(package):
        h.update(f"{file.relative_to(package).as_posix()}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in text)


def _write_json_atomic(path: Path, data: dict) -> None:
    from coreml_sd.outputs import replacing

    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class CacheHit:
    """Where a package's compiled model is, and whether this call compiled it."""

    path: Path  # the .mlmodelc
    entry: Path
    compiled_now: bool


class CompiledModelCache:
    """Compiled models under `root` for packages on this OS (see the module docstring)."""

    def __init__(self, root: Path, *, os_version: str | None = None, compile_fn: CompileFn | None = None):
        self.root = Path(root)
        self.os_version = os_version or current_os_version()
        self.compile_fn = compile_fn

    # -- paths ------------------------------------------------------------------------------
    def entry_name(self, content: str) -> str:
        return f"{content[:32]}-{_slug(self.os_version)}"

    def _index_file(self, fingerprint: str) -> Path:
        return self.root / "index" / f"{fingerprint}.json"

    def _compiled_dir(self) -> Path:
        return self.root / "compiled"

    @staticmethod
    def _model_name(package: Path) -> str:
        return f"{Path(package).name.removesuffix('.mlpackage')}.mlmodelc"

    # -- lookups ----------------------------------------------------------------------------
    def lookup(self, package: Path, fingerprint: str | None = None) -> Path | None:
        """The compiled model of `package` if the cache holds one (cheap: no compilation, no full read)."""
        index = _read_json(self._index_file(fingerprint or quick_fingerprint(package)))
        if not index or not isinstance(index.get("entry"), str):
            return None
        entry = self._compiled_dir() / Path(index["entry"]).name
        model = entry / self._model_name(package)
        record = _read_json(entry / ENTRY_FILE)
        if record is None or record.get("os") != self.os_version or not model.is_dir():
            return None
        return model

    def compiled_path(self, package: Path, compute_units: str | None = None) -> CacheHit:
        """The package's compiled model, compiling it into the cache on the first call."""
        package = Path(package).resolve()
        fingerprint = quick_fingerprint(package)
        found = self.lookup(package, fingerprint)
        compiled_now = False
        if found is None:
            name = self.entry_name(content_hash(package))
            entry = self._compiled_dir() / name
            if not (entry / ENTRY_FILE).is_file():
                with self._lock(name):
                    if not (entry / ENTRY_FILE).is_file():  # another launch may have finished meanwhile
                        self._compile(package, name)
                        compiled_now = True
            _write_json_atomic(self._index_file(fingerprint), {"entry": name, "package": str(package)})
            found = entry / self._model_name(package)
            self.evict_stale(package, keep=name)
        if compute_units:
            self.record_units(found.parent, compute_units)
        return CacheHit(found, found.parent, compiled_now)

    def record_units(self, entry: Path, compute_units: str) -> None:
        units = entry / "units"
        units.mkdir(exist_ok=True)
        (units / _slug(compute_units)).touch()

    # -- writing ----------------------------------------------------------------------------
    def _compile(self, package: Path, name: str) -> None:
        if self.compile_fn is None:
            raise RuntimeError("this cache has no compiler (compile_fn); Core ML compiles only on macOS")
        tmp = self.root / "tmp" / f"{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            started = time.perf_counter()
            self.compile_fn(package, tmp / self._model_name(package))
            if not (tmp / self._model_name(package)).is_dir():
                raise RuntimeError(f"compiling {package} produced no {self._model_name(package)}")
            _write_json_atomic(tmp / ENTRY_FILE, {
                "format_version": FORMAT_VERSION, "package": str(package), "content_sha256_prefix": name.split("-")[0],
                "os": self.os_version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "compile_seconds": round(time.perf_counter() - started, 3)})
            self._compiled_dir().mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, self._compiled_dir() / name)
            except OSError:  # another launch renamed its copy first: use that one
                if not (self._compiled_dir() / name / ENTRY_FILE).is_file():
                    raise
            log.info("compiled %s into the cache (%s)", package.name, self._compiled_dir() / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _lock(self, name: str):
        """An exclusive lock per entry (POSIX); elsewhere the atomic rename alone keeps entries whole."""
        from coreml_sd.outputs import file_lock

        return file_lock(self.root / "locks" / f"{name}.lock")

    # -- eviction ---------------------------------------------------------------------------
    def entries(self) -> list[tuple[Path, dict]]:
        out = []
        for entry in sorted(self._compiled_dir().glob("*")) if self._compiled_dir().is_dir() else []:
            record = _read_json(entry / ENTRY_FILE)
            if record is not None:
                out.append((entry, record))
        return out

    def evict_stale(self, package: Path | None = None, *, keep: str | None = None) -> list[str]:
        """Remove entries compiled by another OS version, and other entries of `package` than `keep`
        (the package changed since). Index files left pointing nowhere go too. Returns the names."""
        removed = []
        package_text = str(Path(package).resolve()) if package is not None else None
        for entry, record in self.entries():
            other_os = record.get("os") != self.os_version
            replaced = package_text is not None and record.get("package") == package_text and entry.name != keep
            if other_os or replaced:
                self._remove(entry)
                removed.append(entry.name)
        index_dir = self.root / "index"
        for file in index_dir.glob("*.json") if index_dir.is_dir() else []:
            index = _read_json(file)
            if not index or not (self._compiled_dir() / str(index.get("entry")) / ENTRY_FILE).is_file():
                file.unlink(missing_ok=True)
        return removed

    def _remove(self, entry: Path) -> None:
        trash = self.root / "trash" / f"{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(entry, trash)  # atomic: readers see the whole entry or none
        except OSError:
            return  # already removed by another launch
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed stale compiled model %s", entry.name)
