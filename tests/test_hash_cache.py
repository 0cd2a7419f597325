"""Large files' sha256 is remembered in the cache folder while their size and mtime are unchanged."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from coreml_sd.checkpoint import safeload


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("COREML_SD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(safeload, "HASH_CACHE_MIN_BYTES", 1)  # every test file counts as large
    return tmp_path / "cache"


def write(path, data: bytes, mtime_ns: int):
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_hash_is_remembered_until_the_file_changes(tmp_path, cache_dir):
    f = tmp_path / "model.safetensors"
    write(f, b"a" * 1000, 1_700_000_000_000_000_000)
    first = safeload.sha256_file(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    entries = json.loads((cache_dir / safeload.HASH_CACHE_FILE).read_text())
    assert [e["sha256"] for e in entries.values()] == [first]

    # Same size and mtime: the remembered digest answers without reading the file (its bytes
    # changed behind the cache's back, and the old digest comes back: proof it was not re-read).
    write(f, b"b" * 1000, 1_700_000_000_000_000_000)
    assert safeload.sha256_file(f) == first

    # A new mtime (what any real rewrite gives) makes it hash again.
    write(f, b"b" * 1000, 1_700_000_001_000_000_000)
    assert safeload.sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest()
    # So does a new size.
    write(f, b"b" * 999, 1_700_000_001_000_000_000)
    assert safeload.sha256_file(f) == hashlib.sha256(b"b" * 999).hexdigest()


def test_offsets_are_cached_apart(tmp_path, cache_dir):
    f = tmp_path / "lora.safetensors"
    write(f, bytes(range(256)) * 4, 1_700_000_000_000_000_000)
    whole, tail = safeload.sha256_file(f), safeload.sha256_file(f, offset=100)
    assert tail == hashlib.sha256((bytes(range(256)) * 4)[100:]).hexdigest() != whole
    assert safeload.sha256_file(f) == whole and safeload.sha256_file(f, offset=100) == tail


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": 3}'])
def test_a_corrupt_cache_is_ignored_and_replaced(tmp_path, cache_dir, content):
    cache_dir.mkdir()
    (cache_dir / safeload.HASH_CACHE_FILE).write_text(content)
    f = tmp_path / "model.ckpt"
    write(f, b"weights", 1_700_000_000_000_000_000)
    assert safeload.sha256_file(f) == hashlib.sha256(b"weights").hexdigest()
    assert safeload.sha256_file(f) == hashlib.sha256(b"weights").hexdigest()
    assert isinstance(json.loads((cache_dir / safeload.HASH_CACHE_FILE).read_text()), dict)


def test_an_unwritable_cache_folder_does_not_stop_hashing(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("x")
    monkeypatch.setenv("COREML_SD_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(safeload, "HASH_CACHE_MIN_BYTES", 1)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"data")
    assert safeload.sha256_file(f) == hashlib.sha256(b"data").hexdigest()


def test_small_files_are_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COREML_SD_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "embedding.pt"
    f.write_bytes(b"small")
    assert safeload.sha256_file(f) == hashlib.sha256(b"small").hexdigest()
    assert not (tmp_path / "cache").exists()
