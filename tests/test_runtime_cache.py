"""The compiled-model cache: where it lives, what its keys notice, compiling once, atomic and
concurrent writes, eviction. Compilation is stood in for by a copy (Core ML compiles only on macOS);
the real compiler is exercised by the macOS-marked test at the end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from coreml_sd.backends.compiled_cache import (CompiledModelCache, cache_root, content_hash,
                                               quick_fingerprint)


def make_package(path: Path, weight: bytes = b"\x01" * 4096, spec: bytes = b"spec-v1") -> Path:
    """A folder shaped like an .mlpackage (the cache never parses it)."""
    data = path / "Data" / "com.apple.CoreML"
    (data / "weights").mkdir(parents=True)
    (path / "Manifest.json").write_text('{"fileFormatVersion": "1.0.0"}')
    (data / "model.mlmodel").write_bytes(spec)
    (data / "weights" / "weight.bin").write_bytes(weight)
    return path


class CountingCompiler:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls: list[Path] = []
        self.delay, self.fail = delay, fail
        self.lock = threading.Lock()

    def __call__(self, package: Path, destination: Path) -> None:
        with self.lock:
            self.calls.append(package)
        time.sleep(self.delay)
        destination.mkdir()
        (destination / "model.espresso.net").write_bytes((package / "Data/com.apple.CoreML/model.mlmodel").read_bytes())
        if self.fail:
            raise RuntimeError("compiler crashed half-way")


def test_cache_root_follows_platform_and_environment(tmp_path):
    home = tmp_path / "home"
    assert cache_root({}, "darwin", home) == home / "Library/Caches/coreml-sd"
    assert cache_root({}, "linux", home) == home / ".cache/coreml-sd"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path / "xdg")}, "linux", home) == tmp_path / "xdg/coreml-sd"
    env = {"COREML_SD_CACHE": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache_root(env, "darwin", home) == tmp_path / "mine"


def test_quick_fingerprint_never_reads_big_weights_but_notices_changes(tmp_path, monkeypatch):
    import coreml_sd.backends.compiled_cache as cc

    monkeypatch.setattr(cc, "SMALL_FILE", 1024)  # the 4 KiB weight counts as big here
    pkg = make_package(tmp_path / "A.mlpackage")
    first = quick_fingerprint(pkg)
    assert quick_fingerprint(pkg) == first
    weight = pkg / "Data/com.apple.CoreML/weights/weight.bin"
    reads = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real_read_bytes(self))
    quick_fingerprint(pkg)
    assert "weight.bin" not in reads and "model.mlmodel" in reads
    monkeypatch.undo()
    monkeypatch.setattr(cc, "SMALL_FILE", 1024)
    st = weight.stat()
    weight.write_bytes(b"\x02" * 4096)  # same size ...
    os.utime(weight, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # ... a new mtime
    assert quick_fingerprint(pkg) != first
    second = quick_fingerprint(pkg)
    (pkg / "Data/com.apple.CoreML/model.mlmodel").write_bytes(b"spec-v2")  # small file: content counts
    assert quick_fingerprint(pkg) != second
    assert content_hash(pkg) != content_hash(make_package(tmp_path / "B.mlpackage"))


def test_compiles_once_then_loads_the_cached_model(tmp_path):
    pkg = make_package(tmp_path / "Unet.mlpackage")
    compiler = CountingCompiler()
    cache = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=compiler)
    assert cache.lookup(pkg) is None
    hit = cache.compiled_path(pkg, "CPU_AND_NE")
    assert hit.compiled_now and hit.path.name == "Unet.mlmodelc" and hit.path.is_dir()
    assert hit.path.parent.name.endswith("-macos-14.5")
    again = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=compiler)  # a new launch
    hit2 = again.compiled_path(pkg, "CPU_AND_GPU")
    assert not hit2.compiled_now and hit2.path == hit.path and len(compiler.calls) == 1
    assert cache.lookup(pkg) == hit.path
    # one compiled model serves every compute units; each is recorded
    assert sorted(p.name for p in (hit.entry / "units").iterdir()) == ["CPU_AND_GPU", "CPU_AND_NE"]
    record = json.loads((hit.entry / "entry.json").read_text())
    assert record["package"] == str(pkg.resolve()) and record["os"] == "macos-14.5"
    assert content_hash(pkg).startswith(record["content_sha256_prefix"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["compiled", "index", "locks", "tmp"]
    assert list((tmp_path / "cache/tmp").iterdir()) == []


def test_copied_or_touched_package_reuses_its_entry_after_one_full_hash(tmp_path):
    pkg = make_package(tmp_path / "a" / "Unet.mlpackage")
    compiler = CountingCompiler()
    cache = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=compiler)
    first = cache.compiled_path(pkg)
    copy = tmp_path / "b" / "Unet.mlpackage"
    import shutil

    shutil.copytree(pkg, copy)  # new paths and mtimes, same bytes
    weight = copy / "Data/com.apple.CoreML/weights/weight.bin"
    os.utime(weight, ns=(0, 10**9))
    hit = cache.compiled_path(copy)
    assert hit.path == first.path and not hit.compiled_now and len(compiler.calls) == 1


def test_changed_package_or_os_update_recompiles_and_evicts_the_stale_entry(tmp_path):
    pkg = make_package(tmp_path / "Unet.mlpackage")
    compiler = CountingCompiler()
    cache = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=compiler)
    old = cache.compiled_path(pkg)
    (pkg / "Data/com.apple.CoreML/weights/weight.bin").write_bytes(b"\x03" * 5000)  # converted again
    new = cache.compiled_path(pkg)
    assert new.compiled_now and new.path != old.path and not old.entry.exists()
    assert cache.lookup(pkg) == new.path
    assert len(list((tmp_path / "cache/index").glob("*.json"))) == 1  # the old index went with its entry
    updated = CompiledModelCache(tmp_path / "cache", os_version="macos-15.0", compile_fn=compiler)
    assert updated.lookup(pkg) is None  # an entry of another OS's compiler does not count
    after = updated.compiled_path(pkg)
    assert after.compiled_now and after.path.parent.name.endswith("-macos-15.0")
    assert [e.name for e, _ in updated.entries()] == [after.entry.name]
    assert len(compiler.calls) == 3 and not list((tmp_path / "cache/trash").iterdir())


def test_a_failed_compilation_leaves_nothing(tmp_path):
    pkg = make_package(tmp_path / "Unet.mlpackage")
    cache = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=CountingCompiler(fail=True))
    with pytest.raises(RuntimeError, match="compiler crashed"):
        cache.compiled_path(pkg)
    assert cache.lookup(pkg) is None and cache.entries() == []
    assert list((tmp_path / "cache/tmp").iterdir()) == [] and not (tmp_path / "cache/index").exists()


def test_concurrent_launches_compile_once(tmp_path):
    """Threads of one process (the lock) and a second process (lock + atomic rename) asking at once."""
    pkg = make_package(tmp_path / "Unet.mlpackage")
    compiler = CountingCompiler(delay=0.3)
    caches = [CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=compiler) for _ in range(4)]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.compiled_path(pkg))) for c in caches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(compiler.calls) == 1 and len({r.path for r in results}) == 1
    assert sum(r.compiled_now for r in results) == 1

    pkg2 = make_package(tmp_path / "Other.mlpackage", weight=b"\x07" * 100)
    script = textwrap.dedent(f"""
        import sys, time, shutil
        from pathlib import Path
        from coreml_sd.backends.compiled_cache import CompiledModelCache
        def compile_fn(p, d):
            time.sleep(0.5); shutil.copytree(p, d)
        hit = CompiledModelCache(Path({str(tmp_path / 'cache')!r}), os_version="macos-14.5",
                                 compile_fn=compile_fn).compiled_path(Path({str(pkg2)!r}))
        print(int(hit.compiled_now), hit.path)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in outs) == [0, 1] and outs[0][1] == outs[1][1]
    assert list((tmp_path / "cache/tmp").iterdir()) == []


def test_a_lost_rename_race_uses_the_winners_entry(tmp_path, monkeypatch):
    """Where locks do not hold (network file systems), two compilations may finish: the second rename
    fails and its copy is dropped."""
    pkg = make_package(tmp_path / "Unet.mlpackage")
    cache = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=CountingCompiler())
    winner = CompiledModelCache(tmp_path / "cache", os_version="macos-14.5", compile_fn=CountingCompiler())

    def compile_and_lose_the_race(package, destination):
        winner.compiled_path(package)  # the other launch finishes first, meanwhile
        CountingCompiler()(package, destination)

    cache.compile_fn = compile_and_lose_the_race
    monkeypatch.setattr(cache, "_lock", lambda name: __import__("contextlib").nullcontext())
    hit = cache.compiled_path(pkg)
    assert hit.path == winner.lookup(pkg) and len(cache.entries()) == 1
    assert list((tmp_path / "cache/tmp").iterdir()) == []


@pytest.mark.macos
def test_core_ml_compiles_into_the_cache_once(tmp_path):
    """macOS: the real compiler and loader; the second load of the package compiles nothing."""
    import coremltools as ct
    import numpy as np
    from coremltools.converters.mil import Builder as mb

    from coreml_sd.backends.coreml_backend import CoreMLOpener, compile_with_coremltools

    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 4))])
    def prog(x):
        return mb.mul(x=x, y=2.0, name="y")

    pkg = tmp_path / "Double.mlpackage"
    ct.convert(prog, convert_to="mlprogram").save(str(pkg))
    cache = CompiledModelCache(tmp_path / "cache", compile_fn=compile_with_coremltools)
    opener = CoreMLOpener(cache)
    model = opener.open(pkg, "CPU_ONLY")
    np.testing.assert_allclose(model.predict({"x": np.ones((1, 4), np.float32)})["y"], 2.0)
    assert not cache.compiled_path(pkg, "CPU_AND_NE").compiled_now
