"""Files are read without running code from them; broken files fail with a clear message."""

from __future__ import annotations

import collections
import os
import struct

import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from helpers_checkpoint import HOSTILE, write_hostile, write_tiny_checkpoint  # noqa: E402

from coreml_sd.checkpoint.safeload import ALLOWED_GLOBALS, check_pickle, load_pickle, read_safetensors_header  # noqa: E402
from coreml_sd.cli import main  # noqa: E402
from coreml_sd.errors import ModelError, UnsafeFileError  # noqa: E402
from coreml_sd.sources import open_model  # noqa: E402


@pytest.mark.parametrize("container", ["zip", "raw"])
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_pickles_are_refused_naming_the_global(tmp_path, kind, container):
    marker = tmp_path / "pwned"
    path = write_hostile(tmp_path / "evil.ckpt", kind, marker, container=container)
    with pytest.raises(UnsafeFileError) as err:
        load_pickle(path)
    assert HOSTILE[kind][1] in str(err.value) and "Nothing from the file was executed" in str(err.value)
    with pytest.raises(UnsafeFileError):
        open_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["checkpoint", "inspect"], ["checkpoint", "to-safetensors"],
                                     ["generate", "a cat", "--model"]])
def test_cli_refuses_hostile_files_and_writes_nothing(tmp_path, command):
    marker = tmp_path / "pwned"
    path = write_hostile(tmp_path / "evil.ckpt", "os.system", marker)
    out = tmp_path / "out"
    args = [*command, str(path)] + (["-o", str(out)] if command[0] == "generate" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "posix.system" in result.output or "nt.system" in result.output
    assert not marker.exists() and not out.exists() and not (tmp_path / "evil.safetensors").exists()


def test_the_side_effect_would_happen_with_plain_pickle(tmp_path):
    """The hostile fixtures are real: plain unpickling runs them (so the tests above mean something)."""
    import pickle

    marker = tmp_path / "pwned"
    path = write_hostile(tmp_path / "evil.ckpt", "builtins.exec", marker, container="raw")
    pickle.loads(path.read_bytes())  # noqa: S301 - deliberately unsafe, on our own fixture
    assert marker.exists()


def test_real_metadata_pickles_load(tmp_path, monkeypatch):
    """CompVis .ckpt files carry Lightning callback state and numpy scalars: loaded as inert data."""
    import sys
    import types

    import numpy as np

    class ModelCheckpoint:  # pickled under Lightning's name, as in sd-v1-x.ckpt
        def __init__(self):
            self.monitor, self.best_model_score = None, torch.tensor(0.5)

    ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
    sd = collections.OrderedDict({"model.diffusion_model.out.2.bias": torch.ones(4, dtype=torch.float16)})
    torch.save({"state_dict": sd, "global_step": np.int64(470000), "epoch": 6,
                "callbacks": {ModelCheckpoint: ModelCheckpoint()}}, tmp_path / "old.ckpt")
    torch.save({"state_dict": sd}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    monkeypatch.undo()  # loading must not need Lightning
    obj = load_pickle(tmp_path / "old.ckpt")
    assert torch.equal(obj["state_dict"]["model.diffusion_model.out.2.bias"], sd["model.diffusion_model.out.2.bias"])
    assert int(obj["global_step"]) == 470000
    (callback,) = obj["callbacks"].values()
    assert type(callback).__name__ == "ModelCheckpoint" and "best_model_score" in callback.state
    assert torch.equal(load_pickle(tmp_path / "legacy.ckpt")["state_dict"]["model.diffusion_model.out.2.bias"],
                       sd["model.diffusion_model.out.2.bias"])
    assert set(check_pickle(tmp_path / "legacy.ckpt")) <= ALLOWED_GLOBALS


def write(dst, data: bytes):
    dst.write_bytes(data)
    return dst


def truncated(src, dst, keep: float):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("tiny")
    st, _, _ = write_tiny_checkpoint(base / "tiny.safetensors", sidecar=False)
    ck, _, _ = write_tiny_checkpoint(base / "tiny.ckpt", fmt="ckpt", sidecar=False)
    return st, ck


@pytest.mark.parametrize("which, damage, needle", [
    ("st", lambda p, d: truncated(p, d, 0.6), "truncated"),
    ("st", lambda p, d: truncated(p, d, 0.0001), "truncated"),
    ("st", lambda p, d: write(d, struct.pack("<Q", 40) + b"{" + b"not json" * 5 + b"tensor data"), "not JSON"),
    ("st", lambda p, d: write(d, b""), "empty"),
    ("ck", lambda p, d: truncated(p, d, 0.5), "truncated or corrupt"),
    ("ck", lambda p, d: write(d, b"\x80\x02}q\x00(X\x01\x00\x00\x00aq"), "corrupt or truncated"),
    ("ck", lambda p, d: write(d, b"\x00\x00" + os.urandom(62)), "not a tensor file"),
])
def test_broken_files_fail_clearly(tiny_files, tmp_path, which, damage, needle):
    src = tiny_files[0] if which == "st" else tiny_files[1]
    bad = damage(src, tmp_path / f"bad{src.suffix}")
    with pytest.raises(ModelError, match=needle):
        open_model(bad)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a cat", "--model", str(bad), "-o", str(out)])
    assert result.exit_code == 1 and "Traceback" not in result.output and not out.exists()


def test_safetensors_header_describes_the_file(tiny_files):
    shapes, meta = read_safetensors_header(tiny_files[0])
    assert shapes["model.diffusion_model.out.2.bias"].shape == (4,)
    assert meta.get("format") == "pt"


def test_merging_into_loaded_weights_never_changes_the_file(tiny_files, tmp_path):
    """Tensors are views of a private memory map: writing to them copies pages, the file stays as it was."""
    import hashlib

    from coreml_sd.checkpoint.safeload import load_safetensors

    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(tiny_files[0].read_bytes())
    before = hashlib.sha256(copy.read_bytes()).hexdigest()
    sd = load_safetensors(copy)
    bias = sd["model.diffusion_model.out.2.bias"]
    bias.add_(1.0)
    del sd, bias
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == before
